"""Tests of tfp_kernels.integrations.training: the collator for pre-packed rows, the label-token counts and
the loss normalisation over gradient accumulation and ranks, and TFPDataCollator's ordering and counts.

Oracles:
- a collated set of pre-packed rows (written by ``tfp-pack``'s own table writer) equals ``assemble`` of the
  same packs (``select_packs``), field for field, bit for bit;
- the gradient of a tiny Llama trained on packed micro-batches on 2 gloo ranks (DDP, gradient
  accumulation, ``global_num_items_in_batch``) equals the gradient of the unpacked per-token mean over all
  samples, computed sample by sample in this process; the per-rank-mean normalisation, checked the same
  way, differs (so the comparison can fail).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tfp_kernels import (
    DistributedPackSampler,
    PackedRowsCollator,
    TFPDataCollator,
    count_label_tokens,
    global_num_items_in_batch,
)
from tfp_kernels.assembly import IGNORE_INDEX, assemble
from tfp_kernels.packing import pack_lengths, select_packs
from tfp_kernels.testing import assert_equal

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 61
WORLD = 2
MICRO_STEPS = 2  # gradient accumulation steps per optimizer step
GATHER_TIMEOUT_S = 240


def make_samples(lengths, seed=0, prompt_every=3):
    """(ids, labels) per sample; every ``prompt_every``-th sample has its first half outside the loss."""
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, VOCAB, (n,), generator=generator) for n in lengths]
    labels = [t.clone() for t in ids]
    for label in labels[::prompt_every]:
        label[: max(1, label.numel() // 2)] = IGNORE_INDEX
    return ids, labels


def packed_rows(ids, labels, max_len, attention, strategy="next_fit"):
    """The rows tfp-pack writes to packed.parquet (its own writer), and the batch they come from."""
    from tfp_kernels.text.writers import packed_table

    packing = pack_lengths([t.numel() for t in ids], max_len=max_len, strategy=strategy)
    batch = assemble(ids, packing, attention=attention, labels=labels)
    return packed_table(batch).to_pylist(), batch


# ---------------------------------------------------------------------------------------- pre-packed rows


@pytest.mark.parametrize("attention", ["pack", "sample"])
def test_rows_collate_to_the_batch_of_their_packs(attention):
    ids, labels = make_samples([5, 17, 1, 8, 3, 12, 6, 2, 9, 4, 11, 7])
    rows, batch = packed_rows(ids, labels, 20, attention)
    assert batch.num_packs >= 4
    collator = PackedRowsCollator(max_len=20)
    for picked in ([0], [2, 0, 3], list(range(batch.num_packs))[::-1]):
        got = collator.pack([rows[i] for i in picked])
        expected = assemble(ids, select_packs(batch.packing, picked), attention=attention, labels=labels)
        for name in (
            "input_ids",
            "labels",
            "position_ids",
            "cu_seqlens",
            "sample_index",
            "pack_index",
            "pack_offsets",
        ):
            assert_equal(getattr(got, name), getattr(expected, name), name)
        for name in ("pack_id", "sample_index", "offset", "length", "pack_offsets"):
            assert_equal(getattr(got.packing, name), getattr(expected.packing, name), f"packing.{name}")
        assert (got.max_seqlen, got.max_len, got.max_pack_length) == (
            expected.max_seqlen,
            expected.max_len,
            expected.max_pack_length,
        )
        out = collator([rows[i] for i in picked])
        assert_equal(out["cu_seq_lens_q"], expected.cu_seqlens, "cu_seq_lens_q")
        assert out["cu_seq_lens_q"].dtype == torch.int32 and out["max_length_q"] == expected.max_seqlen
        assert out["num_items_in_batch"].item() == int((expected.labels[:, 1:] != IGNORE_INDEX).sum())
        assert "attention_mask" not in out
    # the segments the model receives: one per pack (pack) or one per sample (sample)
    whole = collator.pack(rows)
    assert whole.attention == attention
    assert whole.num_segments == (batch.num_packs if attention == "pack" else len(ids))


def test_rows_without_segment_columns():
    ids, labels = make_samples([4, 3, 6, 2], seed=1)
    rows, batch = packed_rows(ids, labels, 8, "sample")
    collator = PackedRowsCollator()
    full = collator.pack(rows)
    # segments read from seq_lengths (TRL's column) when cu_seqlens is missing, else from position_ids
    no_cu = [{k: v for k, v in row.items() if k != "cu_seqlens"} for row in rows]
    assert_equal(collator.pack(no_cu).cu_seqlens, full.cu_seqlens, "cu_seqlens from seq_lengths")
    only_positions = [
        {k: v for k, v in row.items() if k not in ("cu_seqlens", "seq_lengths")} for row in rows
    ]
    assert_equal(collator.pack(only_positions).cu_seqlens, full.cu_seqlens, "cu_seqlens from position_ids")
    only_lengths = [{k: v for k, v in row.items() if k not in ("cu_seqlens", "position_ids")} for row in rows]
    assert_equal(collator.pack(only_lengths).cu_seqlens, full.cu_seqlens, "cu_seqlens from seq_lengths alone")
    one_run = [dict(row, position_ids=list(range(len(row["input_ids"])))) for row in no_cu]
    with pytest.raises(ValueError, match="do not restart at the segments"):  # seq_lengths win over positions
        collator.pack(one_run)
    # without either: one segment per row (pack attention); default labels: -100 at each row start
    bare = [{"input_ids": row["input_ids"]} for row in rows]
    packed = collator.pack(bare)
    assert packed.attention == "pack"
    assert_equal(packed.cu_seqlens_cpu, batch.pack_offsets.to(torch.int32), "one segment per row")
    assert packed.sample_index.tolist() == [-1] * len(rows)
    expected_labels = packed.input_ids.clone()
    expected_labels[0, batch.pack_offsets[:-1]] = IGNORE_INDEX
    assert_equal(packed.labels, expected_labels, "default labels")
    # tensors and numpy arrays are rows too; micro-batches of a collated batch are whole rows
    as_tensors = [{k: torch.tensor(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]
    assert_equal(collator.pack(as_tensors).input_ids, full.input_ids, "tensor rows")
    first, second = full.micro_batches(2)
    assert_equal(first.input_ids, collator.pack(rows[: first.num_packs]).input_ids, "micro-batch 0")
    assert_equal(second.cu_seqlens, collator.pack(rows[first.num_packs :]).cu_seqlens, "micro-batch 1")


def test_dataloader_with_pack_sampler_on_parquet(tmp_path):
    """The issue's case: DataLoader(packs, batch_sampler=DistributedPackSampler(...)) on packed.parquet."""
    datasets = pytest.importorskip("datasets")
    from tfp_kernels.text.writers import packed_table, write_parquet

    ids, labels = make_samples([7, 3, 12, 5, 9, 1, 4, 15, 6, 2, 8, 11, 3, 10], seed=2)
    packing = pack_lengths([t.numel() for t in ids], max_len=16)
    batch = assemble(ids, packing, attention="sample", labels=labels)
    write_parquet(packed_table(batch), str(tmp_path / "packed.parquet"))
    packs = datasets.load_dataset("parquet", data_files=str(tmp_path / "packed.parquet"), split="train")
    seen = []
    for rank in range(2):
        sampler = DistributedPackSampler(packs["length"], num_replicas=2, rank=rank, packs_per_step=2, seed=3)
        loader = torch.utils.data.DataLoader(packs, batch_sampler=sampler, collate_fn=PackedRowsCollator())
        for step, out in zip(sampler, loader):
            expected = assemble(ids, select_packs(packing, step), attention="sample", labels=labels)
            assert_equal(out["input_ids"], expected.input_ids, "input_ids")
            assert_equal(out["labels"], expected.labels, "labels")
            assert_equal(out["cu_seq_lens_q"], expected.cu_seqlens, "cu_seq_lens_q")
            seen += step
    assert sorted(set(seen)) == list(range(packing.num_packs))


@pytest.mark.parametrize(
    "rows, error, match",
    [
        ([{"ids": [1, 2]}], ValueError, r"row 0 has no 'input_ids'"),
        ([{"input_ids": [1, 2]}, {"input_ids": []}], ValueError, "row 1 has no tokens"),
        ([{"input_ids": [1.5, 2.0]}], TypeError, "row 0: 'input_ids' must be a 1-D sequence of ints"),
        ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], ValueError, "row 0: 'labels' has 2 entries"),
        (
            [{"input_ids": [1, 2, 3], "cu_seqlens": [0, 2]}],
            ValueError,
            "must rise strictly from 0 to the row's 3",
        ),
        ([{"input_ids": [1, 2, 3], "cu_seqlens": [0, 0, 3]}], ValueError, "must rise strictly"),
        (
            [{"input_ids": [1, 2, 3], "cu_seqlens": [0, 2, 3], "position_ids": [0, 1, 2]}],
            ValueError,
            r"row 0: 'position_ids' do not restart at the segments",
        ),
        (
            [{"input_ids": [1, 2, 3], "sample_ids": [4, 5], "sample_lengths": [1, 1]}],
            ValueError,
            "must add up to the row's 3 tokens",
        ),
        (
            [
                {
                    "input_ids": [1, 2, 3],
                    "cu_seqlens": [0, 2, 3],
                    "sample_ids": [4, 5],
                    "sample_lengths": [1, 2],
                }
            ],
            ValueError,
            "starts or ends inside a piece",
        ),
        (
            [{"input_ids": [1, 2, 3], "seq_lengths": [1, 1]}],
            ValueError,
            r"row 0: 'seq_lengths' \(the attention segments' lengths\) must be positive and add up to the row's 3",
        ),
        (
            [{"input_ids": [1, 2, 3], "cu_seqlens": [0, 3], "seq_lengths": [1, 2]}],
            ValueError,
            r"row 0: 'seq_lengths' \[1, 2\] are not the lengths of the segments of 'cu_seqlens' \[0, 3\]",
        ),
        ({"input_ids": [1, 2]}, TypeError, "rows must be a list of rows"),
        ([], ValueError, "received no rows"),
        (["abc"], TypeError, "row 0 must be a mapping"),
    ],
)
def test_bad_rows(rows, error, match):
    with pytest.raises(error, match=match):
        PackedRowsCollator()(rows)


def test_row_longer_than_max_len_and_bad_arguments():
    with pytest.raises(ValueError, match="row 0 has 5 tokens, more than max_len=4"):
        PackedRowsCollator(max_len=4)([{"input_ids": [1, 2, 3, 4, 5]}])
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        PackedRowsCollator(max_len=0)
    with pytest.raises(ValueError, match="return_tensors must be 'pt'"):
        PackedRowsCollator()([{"input_ids": [1]}], return_tensors="np")


# ---------------------------------------------------------------------------------------- label counts


def test_count_label_tokens_forms():
    labels = torch.tensor([[5, -100, 6, 7], [-100, -100, 1, -100]])
    assert count_label_tokens(labels).item() == 3  # the first column never counts (the shift)
    assert count_label_tokens({"labels": labels}).item() == 3
    assert count_label_tokens({"labels": labels, "shift_labels": labels}).item() == 4  # already shifted
    assert count_label_tokens({"labels": labels, "num_items_in_batch": 9}).item() == 9
    ids, lab = make_samples([3, 4])
    batch = assemble(ids, pack_lengths([3, 4], max_len=8), labels=lab, attention="sample")
    assert count_label_tokens(batch).item() == int((batch.labels != IGNORE_INDEX).sum())
    with pytest.raises(TypeError, match="integer tensor"):
        count_label_tokens(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="the batch has no 'labels'"):
        count_label_tokens({"input_ids": labels})


def test_global_count_one_process_sums_micro_batches():
    micro = [{"labels": torch.tensor([[-100, 1, 2]])}, torch.tensor([[-100, -100, 3, 4]]), 5, torch.tensor(2)]
    total = global_num_items_in_batch(micro)
    assert total.dtype == torch.int64 and total.dim() == 0 and total.item() == 2 + 2 + 5 + 2
    assert global_num_items_in_batch({"labels": torch.tensor([[-100, 1]])}).item() == 1
    with pytest.raises(ValueError, match="batches is empty"):
        global_num_items_in_batch([])
    with pytest.raises(TypeError, match="not a bool"):
        global_num_items_in_batch([True])


# ---------------------------------------------------------------------------------------- TFPDataCollator


def test_collator_order_default_and_warning():
    features = [{"input_ids": list(range(1, n + 1))} for n in (4, 2, 6, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults do not warn
        sample = TFPDataCollator()
        pack = TFPDataCollator(attention="pack", max_len=8)
    assert sample.order == "keep" and pack.order == "tfp"
    assert sample.pack(features).order.tolist() == [0, 1, 2, 3]
    with pytest.warns(
        UserWarning, match="with per-sample attention the order inside a batch changes nothing"
    ):
        TFPDataCollator(order="tfp", attention="sample")
    with pytest.warns(UserWarning, match="order='random', attention='sample'"):
        TFPDataCollator(order="random")
    out = sample(features)
    assert out["num_items_in_batch"].item() == int((out["labels"][:, 1:] != IGNORE_INDEX).sum()) == 15 - 4
    assert "num_items_in_batch" not in TFPDataCollator(return_num_items_in_batch=False)(features)


def test_sample_attention_order_changes_nothing_measurable():
    """Why the warning: with per-sample attention the loss of a batch does not depend on its order."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    ids, _ = make_samples([9, 4, 13, 7, 2, 11, 5, 8], seed=4)
    features = [{"input_ids": t.tolist()} for t in ids]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ordered = TFPDataCollator(order="tfp", max_len=16)(features)
    kept = TFPDataCollator(order="keep", max_len=16)(features)
    assert not torch.equal(ordered["input_ids"], kept["input_ids"])  # the orders differ ...
    with torch.no_grad():
        a = model(**ordered, use_cache=False).loss
        b = model(**kept, use_cache=False).loss
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # ... the loss does not


# ---------------------------------------------------------------------------------------- 2 ranks, gradients


def _tiny_llama():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").float()


def _rank_samples():
    """Samples of the two ranks: rank 0 has most of the label tokens (as in the measurement that showed
    0.07x to 16x label tokens between ranks at near-equal token counts)."""
    lengths = [[11, 5, 14, 3, 9, 7, 12, 6], [13, 10, 4, 12, 8, 14, 5, 9]]
    out = []
    for rank, rank_lengths in enumerate(lengths):
        ids, labels = make_samples(rank_lengths, seed=10 + rank, prompt_every=1 if rank else 4)
        if rank == 1:  # mostly prompts: keep only the last two tokens of every sample in the loss
            for t, label in zip(ids, labels):
                label.copy_(torch.full_like(t, IGNORE_INDEX))
                label[-2:] = t[-2:]
        out.append((ids, labels))
    return out


def _worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    store = dist.FileStore(store_path, world)
    dist.init_process_group(
        "gloo",
        store=store,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=GATHER_TIMEOUT_S - 60),
    )
    ids, labels = _rank_samples()[rank]
    packing = pack_lengths([t.numel() for t in ids], max_len=24, strategy="next_fit")
    batch = assemble(ids, packing, attention="sample", labels=labels)
    micro = batch.micro_batches(MICRO_STEPS)
    results = {}
    for mode in ("global", "per_rank_mean"):
        model = torch.nn.parallel.DistributedDataParallel(_tiny_llama().train())
        if mode == "global":
            n = global_num_items_in_batch(micro)
            results["global_count"] = int(n)
            results["local_count"] = sum(int(count_label_tokens(mb)) for mb in micro)
        for step, mb in enumerate(micro):
            kwargs = mb.to_hf_kwargs(num_items_in_batch=n) if mode == "global" else mb.to_hf_kwargs()
            sync = step == len(micro) - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                loss = model(**kwargs, use_cache=False).loss
                scale = world if mode == "global" else 1.0 / len(micro)  # DDP averages over ranks
                (loss * scale).backward()
        results[mode] = {name: p.grad.detach().clone() for name, p in model.module.named_parameters()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _launch(tmp_path: Path, world: int) -> list[dict]:
    store = tmp_path / "store"
    store.unlink(missing_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )
    procs = []
    with contextlib.ExitStack() as logs:
        for rank in range(world):
            log = logs.enter_context(open(tmp_path / f"log{rank}.txt", "w"))
            command = [sys.executable, __file__, str(rank), str(world), str(store), str(tmp_path)]
            procs.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
            )
        deadline = time.monotonic() + GATHER_TIMEOUT_S
        try:
            for proc in procs:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    text = "\n".join(
        f"--- rank {r} (rc {p.returncode}) ---\n" + (tmp_path / f"log{r}.txt").read_text()[-3000:]
        for r, p in enumerate(procs)
    )
    assert all(p.returncode == 0 for p in procs), f"a worker failed or timed out\n{text}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_two_ranks_packed_gradient_equals_unpacked_per_token_mean(tmp_path):
    pytest.importorskip("transformers")
    results = _launch(tmp_path, WORLD)
    # the reference: every sample of every rank alone, one per-token mean over all of them
    samples = [s for ids, labels in _rank_samples() for s in zip(ids, labels)]
    total = sum(int((label[1:] != IGNORE_INDEX).sum()) for _, label in samples)
    local = [sum(int((label[1:] != IGNORE_INDEX).sum()) for label in labels) for _, labels in _rank_samples()]
    assert [r["global_count"] for r in results] == [total, total]
    assert [r["local_count"] for r in results] == local
    assert max(local) > 3 * min(local)  # the ranks' label counts are far apart
    model = _tiny_llama().train()
    for ids, label in samples:
        out = model(input_ids=ids[None], labels=label[None], num_items_in_batch=total, use_cache=False)
        out.loss.backward()
    reference = {name: p.grad for name, p in model.named_parameters()}
    worst_global = worst_mean = 0.0
    for name, expected in reference.items():
        scale = float(expected.abs().max()) + 1e-12
        for result in results:  # DDP leaves the same averaged gradient on both ranks
            torch.testing.assert_close(result["global"][name], expected, atol=2e-6 * scale + 1e-9, rtol=1e-4)
            worst_global = max(worst_global, float((result["global"][name] - expected).abs().max()) / scale)
            worst_mean = max(
                worst_mean, float((result["per_rank_mean"][name] - expected).abs().max()) / scale
            )
    print(
        f"max relative gradient difference: global count {worst_global:.2e}, per-rank mean {worst_mean:.2e}"
    )
    assert worst_global < 1e-5
    assert worst_mean > 0.05, "the per-rank mean should weigh the samples unequally"


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
