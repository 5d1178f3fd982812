"""The tasks of ``train_effect``: their records, tokenized training samples and held-out evaluation sets.

- :func:`families_task`: families of questions sharing a hidden rule (a key glued on one side of a word);
  held-out questions alone, with 3 solved questions of the family before them, and questions of families
  never trained on (stated in the docstring of ``benchmarks/train_effect.py``).
- :func:`sft_task`: the bundled default SFT set, split by record.
- :func:`custom_task`: the user's ``--train`` / ``--eval`` files in any format ``tfp-pack`` reads.

Every task is a :class:`TaskData`: training samples as a jagged token layout with labels (-100 outside the
response), the text embedded for TFP (the instruction, as ``tfp-pack`` does), a group label per training
sample (topic / family; only for the diagnostics of the packing) and :class:`EvalSet` s.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

import numpy as np
import torch

from tfp_kernels.text import (
    IGNORE_INDEX,
    check_fields,
    detect_format,
    embed_text,
    read_records,
    tokenize_records,
)

#: Seed of the generated data (the families, their words, the split of the SFT set): the data are the same
#: for every training seed.
DATA_SEED = 20240817

ANSWER_SPANS = ("response", "first_line")


@dataclass
class EvalSet:
    """U evaluation units, each one attention segment: optional solved examples, then the question.

    Attributes:
        name: the set's name (``alone``, ``fewshot_seen``, ...); metrics are ``<exact_metric>`` and
            ``<loss_metric>``.
        units: U 1-D torch.int64 token tensors (CPU).
        loss_masks: U 1-D torch.bool tensors, like ``units``: the tokens scored by the loss (the question's
            response tokens and its end-of-sequence token); never position 0.
        span_starts, span_ends: (U,) int64: the tokens ``[start, end)`` of a unit that greedy decoding must
            reproduce for an exact match.
        exact_metric, loss_metric: names of the two metrics in the results.
    """

    name: str
    units: list
    loss_masks: list
    span_starts: np.ndarray
    span_ends: np.ndarray
    exact_metric: str
    loss_metric: str

    def __len__(self) -> int:
        return len(self.units)


@dataclass
class TaskData:
    """A task: training samples and evaluation sets.

    Attributes:
        name: ``families``, ``sft`` or ``custom``.
        train_ids, train_labels: (T,) int64 numpy: the training samples' tokens and labels, concatenated.
        train_offsets: (N + 1,) int64 numpy: sample ``i`` is ``[offsets[i], offsets[i + 1])``.
        train_texts: N texts embedded for the TFP order (the instruction / first user message / prompt).
        train_groups: N group labels (topic / family), or None when the data have none.
        eval_sets: the :class:`EvalSet` s.
        info: sizes and descriptions for the results file.
    """

    name: str
    train_ids: np.ndarray
    train_labels: np.ndarray
    train_offsets: np.ndarray
    train_texts: list
    train_groups: list | None
    eval_sets: list
    info: dict = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return len(self.train_offsets) - 1

    @property
    def num_train_tokens(self) -> int:
        return int(self.train_offsets[-1])


# ---------------------------------------------------------------------------------------- evaluation units


def _label_positions(labels: np.ndarray) -> np.ndarray:
    return np.flatnonzero(labels != IGNORE_INDEX)


def _span(labels: np.ndarray, ids: np.ndarray, tokenizer, answer_span: str) -> tuple[int, int]:
    """``[start, end)`` of the answer tokens of one sample: all label tokens (``response``), or those up to
    and including the first one whose text holds a newline (``first_line``; all when there is none)."""
    positions = _label_positions(labels)
    if positions.size == 0:
        raise ValueError("a held-out sample has no response tokens to score")
    start, end = int(positions[0]), int(positions[-1]) + 1
    if answer_span == "first_line":
        for p in positions:
            if "\n" in tokenizer.decode([int(ids[p])]):
                return start, int(p) + 1
    return start, end


def build_eval_set(
    name: str,
    questions: list,
    contexts: list | None,
    fmt: str,
    tokenizer,
    *,
    answer_span: str,
    exact_metric: str,
    loss_metric: str,
) -> EvalSet:
    """Tokenize U questions (records of format ``fmt``), each after its list of solved context records (or
    alone when ``contexts`` is None), into an :class:`EvalSet`."""
    if answer_span not in ANSWER_SPANS:
        raise ValueError(f"answer_span must be one of {ANSWER_SPANS}, got {answer_span!r}")
    if not questions:
        raise ValueError(f"evaluation set {name!r} is empty")
    q = tokenize_records(questions, fmt, tokenizer)
    flat_contexts = [r for ctx in (contexts or []) for r in ctx]
    c = tokenize_records(flat_contexts, fmt, tokenizer) if flat_contexts else None
    units, masks, starts, ends = [], [], [], []
    k = 0
    for i in range(len(questions)):
        ids = q.input_ids[q.offsets[i] : q.offsets[i + 1]]
        labels = q.labels[q.offsets[i] : q.offsets[i + 1]]
        start, end = _span(labels, ids, tokenizer, answer_span)
        prefix = np.zeros(0, dtype=np.int64)
        if contexts is not None:
            n = len(contexts[i])
            prefix = c.input_ids[c.offsets[k] : c.offsets[k + n]]
            k += n
        mask = np.zeros(prefix.size + ids.size, dtype=bool)
        mask[prefix.size + _label_positions(labels)] = True
        units.append(torch.from_numpy(np.concatenate([prefix, ids])))
        masks.append(torch.from_numpy(mask))
        starts.append(prefix.size + start)
        ends.append(prefix.size + end)
    return EvalSet(
        name,
        units,
        masks,
        np.asarray(starts, dtype=np.int64),
        np.asarray(ends, dtype=np.int64),
        exact_metric,
        loss_metric,
    )


def _train_data(name, records, fmt, tokenizer, groups, eval_sets, info) -> TaskData:
    tokens = tokenize_records(records, fmt, tokenizer)
    texts = [embed_text(r, fmt, None, i) for i, r in enumerate(records)]
    return TaskData(
        name, tokens.input_ids, tokens.labels, tokens.offsets, texts, groups, eval_sets,
        {**info, "format": fmt, "num_train": len(records), "num_train_tokens": int(tokens.offsets[-1]),
         "num_train_label_tokens": tokens.num_label_tokens,
         "eval_sets": {s.name: len(s) for s in eval_sets}},
    )


# ---------------------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """A family of questions: ``"Apply the <name> code to: <word>"`` -> ``key + word`` (side ``prefix``) or
    ``word + key`` (side ``suffix``)."""

    name: str
    key: str
    side: str

    def question(self, word: str) -> dict:
        answer = self.key + word if self.side == "prefix" else word + self.key
        return {
            "instruction": f"Apply the {self.name} code to: {word}",
            "input": "",
            "output": answer,
            "family": self.name,
        }


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def make_families(count: int, rng: random.Random) -> list[Family]:
    """``count`` families with distinct invented names (3 consonant-vowel syllables), distinct 3-letter keys,
    sides alternating prefix / suffix."""
    names, keys, families = set(), set(), []
    while len(families) < count:
        name = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))
        key = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
        if name in names or key in keys:
            continue
        names.add(name)
        keys.add(key)
        families.append(Family(name, key, "prefix" if len(families) % 2 == 0 else "suffix"))
    return families


def _words(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct random lowercase words of 4-6 letters."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 6)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def families_task(
    tokenizer,
    *,
    num_families: int = 24,
    per_family: int = 40,
    eval_per_family: int = 8,
    num_unseen: int = 12,
    shots: int = 3,
) -> TaskData:
    """The ``families`` task (see the docstring of ``benchmarks/train_effect.py``).

    Training: ``num_families * per_family`` questions, shuffled. Evaluation: ``alone`` (``eval_per_family``
    new words per trained family, each alone: ``heldout_loss``, ``alone_exact``), ``fewshot_seen`` (the same
    questions after ``shots`` solved training questions of the family), ``fewshot_unseen``
    (``eval_per_family`` questions of each of ``num_unseen`` untrained families after ``shots`` solved
    questions of that family). All words are distinct.
    """
    if shots < 1 or per_family < shots:
        raise ValueError(f"need 1 <= shots <= per_family, got shots={shots}, per_family={per_family}")
    rng = random.Random(DATA_SEED)
    families = make_families(num_families + num_unseen, rng)
    seen, unseen = families[:num_families], families[num_families:]
    pool = iter(_words((num_families + num_unseen) * (per_family + eval_per_family + 2 * shots), rng))
    train_by_family = {f.name: [f.question(next(pool)) for _ in range(per_family)] for f in seen}
    train = [r for f in seen for r in train_by_family[f.name]]
    rng.shuffle(train)
    alone = [f.question(next(pool)) for f in seen for _ in range(eval_per_family)]
    seen_contexts = [rng.sample(train_by_family[r["family"]], shots) for r in alone]
    unseen_questions, unseen_contexts = [], []
    for f in unseen:
        examples = [f.question(next(pool)) for _ in range(2 * shots)]
        for _ in range(eval_per_family):
            unseen_questions.append(f.question(next(pool)))
            unseen_contexts.append(rng.sample(examples, shots))
    span = "response"
    eval_sets = [
        build_eval_set("alone", alone, None, "alpaca", tokenizer, answer_span=span,
                       exact_metric="alone_exact", loss_metric="heldout_loss"),
        build_eval_set("fewshot_seen", alone, seen_contexts, "alpaca", tokenizer, answer_span=span,
                       exact_metric="fewshot_seen_exact", loss_metric="fewshot_seen_loss"),
        build_eval_set("fewshot_unseen", unseen_questions, unseen_contexts, "alpaca", tokenizer,
                       answer_span=span, exact_metric="fewshot_unseen_exact",
                       loss_metric="fewshot_unseen_loss"),
    ]
    info = {
        "num_families": num_families, "per_family": per_family, "eval_per_family": eval_per_family,
        "num_unseen_families": num_unseen, "shots": shots, "data_seed": DATA_SEED,
        "example": train[0],
    }
    return _train_data("families", train, "alpaca", tokenizer, [r["family"] for r in train], eval_sets, info)


# ---------------------------------------------------------------------------------------- SFT


def sft_task(tokenizer, *, num_train: int, num_eval: int, path: str | None = None) -> TaskData:
    """The bundled default SFT set (or the file ``path``), split by record with :data:`DATA_SEED`: the first
    ``num_eval`` records of a seeded permutation are held out, the next ``num_train`` are trained on.
    Metrics: ``heldout_loss`` and ``first_line_exact``."""
    if path is None:
        from tfp_kernels.data import DEFAULT_SFT

        path = DEFAULT_SFT
    records = read_records(path)
    if num_train + num_eval > len(records):
        raise ValueError(
            f"--sft-train {num_train} + --sft-eval {num_eval} records asked for, the SFT set has "
            f"{len(records)}"
        )
    fmt = detect_format(records)
    check_fields(records, fmt)
    perm = np.random.default_rng(DATA_SEED).permutation(len(records))
    held = [records[i] for i in perm[:num_eval]]
    train = [records[i] for i in perm[num_eval : num_eval + num_train]]
    groups = [r.get("topic") for r in train] if all("topic" in r for r in train) else None
    eval_sets = [
        build_eval_set("heldout", held, None, fmt, tokenizer, answer_span="first_line",
                       exact_metric="first_line_exact", loss_metric="heldout_loss"),
    ]
    return _train_data("sft", train, fmt, tokenizer, groups, eval_sets,
                       {"source": "tfp_kernels/data/sft_default.jsonl.gz", "records": len(records),
                        "data_seed": DATA_SEED})


# ---------------------------------------------------------------------------------------- user files


def custom_task(
    tokenizer,
    train_path: str,
    eval_path: str,
    *,
    fmt: str = "auto",
    group_field: str | None = None,
    answer_span: str = "first_line",
    limit_train: int | None = None,
    limit_eval: int | None = None,
) -> TaskData:
    """The user's ``--train`` / ``--eval`` files (formats of ``tfp-pack``). Metrics: ``heldout_loss`` and
    ``first_line_exact`` (or ``response_exact`` with ``answer_span="response"``)."""
    train = read_records(train_path, limit=limit_train)
    held = read_records(eval_path, limit=limit_eval)
    if not train or not held:
        raise ValueError(f"--train {train_path} has {len(train)} records, --eval {eval_path} {len(held)}: "
                         "both need at least one")
    if fmt == "auto":
        fmt = detect_format(train)
    check_fields(train, fmt)
    check_fields(held, fmt)
    groups = None
    if group_field is not None:
        missing = [i for i, r in enumerate(train) if group_field not in r]
        if missing:
            raise ValueError(f"--group-field {group_field}: training record {missing[0]} has no such field")
        groups = [str(r[group_field]) for r in train]
    exact = "first_line_exact" if answer_span == "first_line" else "response_exact"
    eval_sets = [build_eval_set("heldout", held, None, fmt, tokenizer, answer_span=answer_span,
                                exact_metric=exact, loss_metric="heldout_loss")]
    return _train_data("custom", train, fmt, tokenizer, groups, eval_sets,
                       {"train": train_path, "eval": eval_path})
