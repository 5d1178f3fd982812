"""Tokenizers for ``tfp-pack`` and the tokenization of SFT records into ids + labels.

- :class:`ByteTokenizer` (``--tokenizer byte``, the default): UTF-8 bytes shifted by 3, no files needed.
  Ids: 0 = PAD, 1 = BOS, 2 = EOS, ``3 + b`` for byte ``b`` (vocabulary 259).
- :class:`HFTokenizer` (``--tokenizer PATH``): a local transformers tokenizer (``AutoTokenizer``, no
  download); for conversations it uses the tokenizer's chat template when it has one.

:func:`tokenize_records` turns N records into a jagged token layout (values + offsets) and labels of the
same layout, -100 on every token outside the loss (prompts, BOS).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .formats import Segment, conversation, plain_chat_segments, segments
from .readers import InputError

IGNORE_INDEX = -100


class ByteTokenizer:
    """UTF-8 byte tokenizer: id = byte + 3; ``PAD_ID = 0``, ``BOS_ID = 1``, ``EOS_ID = 2``; 259 ids.

    Examples::

        >>> tok = ByteTokenizer()
        >>> tok.encode("hé").tolist()
        [107, 198, 172]
        >>> tok.decode([1, 107, 198, 172, 2])
        'hé'
    """

    PAD_ID = 0
    BOS_ID = 1
    EOS_ID = 2
    OFFSET = 3
    name = "byte"
    vocab_size = 259
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    has_chat_template = False

    def encode(self, text: str) -> np.ndarray:
        """(L,) int64 ids of ``text``'s UTF-8 bytes (no BOS/EOS)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + self.OFFSET

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Text of ``ids`` (special ids are skipped)."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[ids >= self.OFFSET] - self.OFFSET
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A local transformers tokenizer (``AutoTokenizer.from_pretrained(path, local_files_only=True)``).

    Texts are encoded without special tokens; :func:`tokenize_records` adds ``bos_token_id`` /
    ``eos_token_id`` around a non-template sample when the tokenizer has them.
    """

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise InputError(
                f"--tokenizer {path}: no such directory (give 'byte' or a local tokenizer folder)"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise InputError(
                "--tokenizer PATH needs the 'transformers' package (pip install transformers)"
            ) from None
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"--tokenizer {path}: cannot load a tokenizer ({first})") from None
        self.name = path
        self.vocab_size = len(self.tok)
        self.bos_token_id = self.tok.bos_token_id
        self.eos_token_id = self.tok.eos_token_id
        self.has_chat_template = bool(getattr(self.tok, "chat_template", None))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        out = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int64) for ids in out]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=True)

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )


def load_tokenizer(spec: str):
    """``"byte"`` -> :class:`ByteTokenizer`; anything else is a local tokenizer folder -> :class:`HFTokenizer`."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def chat_template_segments(
    tokenizer: HFTokenizer, messages: Sequence[dict], first_trained: int
) -> list[Segment] | None:
    """The conversation rendered by the tokenizer's chat template, cut into prompt/label segments.

    The label span of assistant message ``i`` is the text the template adds between
    ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])``. Returns None
    when the template is not prefix-stable (a later render does not extend an earlier one), so the
    caller can fall back to the plain layout.
    """
    full = tokenizer.render_chat(messages)
    cuts: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained:
            continue
        start = len(tokenizer.render_chat(messages[:i], add_generation_prompt=True)) if i else 0
        upto = tokenizer.render_chat(messages[: i + 1])
        if not full.startswith(upto) or start > len(upto) or (cuts and start < cuts[-1][1]):
            return None
        cuts.append((start, len(upto)))
    out: list[Segment] = []
    pos = 0
    for start, end in cuts:
        if start > pos:
            out.append((full[pos:start], False))
        out.append((full[start:end], True))
        pos = end
    if pos < len(full):
        out.append((full[pos:], False))
    return out


@dataclass(frozen=True)
class Tokenized:
    """N tokenized records in a jagged layout (sample i is ``values[offsets[i]:offsets[i + 1]]``).

    Attributes:
        input_ids: (T,) int64 token ids of all samples, concatenated.
        labels: (T,) int64, same layout: the token id where it is in the loss, -100 elsewhere.
        offsets: (N + 1,) int64, ``offsets[0] == 0``, increasing (every sample has >= 1 token).
        num_template_fallbacks: conversations laid out without the chat template (not prefix-stable).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    num_template_fallbacks: int = 0

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int64 tokens per sample."""
        return np.diff(self.offsets)

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def tokenize_records(
    records: Sequence[dict], fmt: str, tokenizer, *, progress: bool = False, batch_size: int = 4096
) -> Tokenized:
    """Tokenize N records of format ``fmt`` (see :mod:`tfp_kernels.text.formats`).

    Each sample is ``[BOS] + segment tokens + [EOS]`` (BOS/EOS only when the tokenizer has them; not
    added around a chat-template rendering, which carries its own). Labels: -100 on BOS and on prompt
    segments; the token ids on label segments and on the EOS that follows a label segment.

    Returns:
        :class:`Tokenized`.
    """
    from tqdm.auto import tqdm

    use_template = fmt in ("chat", "prompt_completion") and getattr(tokenizer, "has_chat_template", False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    fallbacks = 0
    ids_parts: list[np.ndarray] = []
    label_parts: list[np.ndarray] = []
    lengths = np.zeros(len(records), dtype=np.int64)
    bos_arr = np.array([bos], dtype=np.int64) if bos is not None else None
    eos_arr = np.array([eos], dtype=np.int64) if eos is not None else None
    ignore_bos = np.array([IGNORE_INDEX], dtype=np.int64)
    with tqdm(total=len(records), unit="rec", desc="tokenizing", disable=not progress) as bar:
        for b in range(0, len(records), batch_size):
            batch_segments: list[tuple[list[Segment], bool]] = []
            for i in range(b, min(b + batch_size, len(records))):
                segs, templated = None, False
                if use_template:
                    conv = conversation(records[i], fmt, i)
                    if conv is not None:
                        segs = chat_template_segments(tokenizer, *conv)
                        templated = segs is not None
                        if segs is None:
                            fallbacks += 1
                            segs = plain_chat_segments(*conv)
                if segs is None:
                    segs = segments(records[i], fmt, i)
                batch_segments.append((segs, templated))
            texts = [text for segs, _ in batch_segments for text, _ in segs]
            encoded = iter(tokenizer.encode_batch(texts))
            for j, (segs, templated) in enumerate(batch_segments):
                n = 0
                last_label = False
                if bos_arr is not None and not templated:
                    ids_parts.append(bos_arr)
                    label_parts.append(ignore_bos)
                    n += 1
                for _, is_label in segs:
                    ids = next(encoded)
                    ids_parts.append(ids)
                    label_parts.append(ids if is_label else np.full(ids.size, IGNORE_INDEX, dtype=np.int64))
                    n += ids.size
                    if ids.size:
                        last_label = is_label
                if eos_arr is not None and not templated:
                    ids_parts.append(eos_arr)
                    label_parts.append(eos_arr if last_label else ignore_bos)
                    n += 1
                if n == 0:
                    raise InputError(
                        f"record {b + j} has no tokens (empty text and a tokenizer without BOS/EOS)"
                    )
                lengths[b + j] = n
            bar.update(len(batch_segments))
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    empty = np.empty(0, dtype=np.int64)
    input_ids = np.concatenate(ids_parts) if ids_parts else empty
    labels = np.concatenate(label_parts) if label_parts else empty
    return Tokenized(input_ids, labels, offsets, fallbacks)
