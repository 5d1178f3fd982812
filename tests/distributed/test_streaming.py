"""Tests of the streaming TFP dataset (tfp_kernels.distributed.streaming), with the real ``pack_gpu``.

The oracle: every emitted piece is identified by ``(source_index, source_offset, length)``; over a whole
pass (one run, or a run interrupted and resumed from ``state_dict()``, or all ranks x workers) the pieces
must tile every source sample exactly once (minus the samples an ``overlong="drop"`` policy counts), and
each piece's tokens and labels must be the source's.

``equal_batches`` runs on 2 gloo processes (this file is also their worker script): every rank yields the
same number of batches, the extra ones are flagged repeats with every label -100, and the batches that are
not repeats still cover the stream exactly once, also across a resume.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from tfp_kernels.assembly import IGNORE_INDEX, PackedBatch
from tfp_kernels.distributed import StreamBatch, TFPStreamingDataset, as_repeat, equalize_batches, streaming

pytestmark = pytest.mark.filterwarnings("ignore:all .* pairs of embeddings are at distance 0")
RANDOM = {"order": "random"}  # the real pack_gpu, without the ordering cost where the order is not the point


def make_stream(n, *, seed=0, max_tokens=40, labels=False):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_tokens + 1, (n,), generator=generator).tolist()
    stream = []
    for i, length in enumerate(lengths):
        item = {"input_ids": torch.randint(0, 5000, (length,), generator=generator), "id": i}
        if labels:
            item["labels"] = item["input_ids"] + 100000
        stream.append(item)
    return stream


def pieces_of(batches):
    """(source_index, source_offset, length) of every emitted piece."""
    out = []
    for batch in batches:
        lengths = batch.packing.length.tolist()
        out += list(zip(batch.source_index.tolist(), batch.source_offset.tolist(), lengths))
    return out


def assert_exactly_once(batches, stream, *, max_len=None, skip=()):
    """The pieces tile every sample of ``stream`` (but those in ``skip``) exactly once, content checked."""
    covered = {}
    for batch in batches:
        assert isinstance(batch, StreamBatch) and isinstance(batch, PackedBatch)
        ids, labels, offset = batch.input_ids[0], batch.labels[0], 0
        starts = set(batch.cu_seqlens_cpu.tolist())
        for index, start, length in zip(
            batch.source_index.tolist(), batch.source_offset.tolist(), batch.packing.length.tolist()
        ):
            source = stream[index]["input_ids"] if isinstance(stream[index], dict) else stream[index]
            source = torch.as_tensor(source)
            assert torch.equal(ids[offset : offset + length], source[start : start + length].to(torch.int64))
            if isinstance(stream[index], dict) and "labels" in stream[index]:
                expected = stream[index]["labels"][start : start + length].clone()
                if offset in starts:
                    expected[0] = IGNORE_INDEX
                assert torch.equal(labels[offset : offset + length], expected)
            covered.setdefault(index, []).append((start, length))
            offset += length
        assert offset == batch.num_tokens
    expected_samples = [i for i in range(len(stream)) if i not in set(skip)]
    assert sorted(covered) == expected_samples
    for index, ranges in covered.items():
        source = stream[index]["input_ids"] if isinstance(stream[index], dict) else stream[index]
        total = len(source) if max_len is None else min(len(source), max_len)
        position = 0
        for start, length in sorted(ranges):
            assert start == position, f"sample {index}: token ranges {sorted(ranges)} overlap or leave a gap"
            position += length
        assert position == total, f"sample {index}: {position} of {total} tokens emitted"


def run_interrupted(make_dataset, stops):
    """Iterate, stopping after each count in ``stops`` and resuming a fresh dataset from the state."""
    emitted, state = [], None
    for stop in [*stops, None]:
        dataset = make_dataset()
        if state is not None:
            dataset.load_state_dict(state)
        if stop == 0:  # interrupted before the first batch
            state = dataset.state_dict()
            continue
        for taken, batch in enumerate(dataset, start=1):
            emitted.append(batch)
            if stop is not None and taken == stop:
                break
        state = dataset.state_dict()
        if state["shards"] and all(shard["done"] for shard in state["shards"].values()):
            break  # finished: iterating a dataset restored from this state would start the next epoch
    return emitted, state


# ---------------------------------------------------------------------------------------- one shard


@pytest.mark.parametrize("packs_per_batch", [1, 3, None])
@pytest.mark.parametrize("order", ["tfp", "random"])
def test_single_pass_exactly_once(packs_per_batch, order):
    stream = make_stream(150, labels=True)
    dataset = TFPStreamingDataset(
        stream, buffer_size=32, max_len=96, packs_per_batch=packs_per_batch, pack_kwargs={"order": order}
    )
    batches = list(dataset)
    assert_exactly_once(batches, stream)
    # every batch holds packs_per_batch packs, but the last of each buffer; None: one batch per buffer
    if packs_per_batch is None:
        assert len(batches) == 5  # 150 = 4 x 32 + 22: the last partial buffer is packed and emitted too
    else:
        assert all(b.num_packs <= packs_per_batch for b in batches)
        assert sum(b.num_packs < packs_per_batch for b in batches) <= 5
    assert all(b.max_pack_length <= 96 and b.cu_seqlens.dtype == torch.int32 for b in batches)
    state = dataset.state_dict()["shards"][0]
    assert state["done"] and state["items_consumed"] == 150 and state["num_batches"] == len(batches)


def test_packs_follow_tfp_within_a_buffer():
    """Without the pack shuffle, one buffer's batch is exactly pack_gpu of that buffer."""
    from tfp_kernels import pack_gpu

    stream = make_stream(40, seed=3)
    dataset = TFPStreamingDataset(stream, buffer_size=40, max_len=64, packs_per_batch=None, shuffle=False)
    (batch,) = list(dataset)
    expected = pack_gpu([item["input_ids"] for item in stream], max_len=64, seed=batch_seed(dataset))
    assert torch.equal(batch.input_ids, expected.input_ids)
    assert torch.equal(batch.cu_seqlens, expected.cu_seqlens)
    assert torch.equal(batch.source_index, expected.sample_index)


def batch_seed(dataset):
    return streaming._mixed_seed(dataset.seed, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("stops", [[0], [1], [4], [9], [3, 5], [1, 1, 1, 1], [100]])
def test_resume_exactly_once(stops):
    stream = make_stream(120, seed=1, labels=True)

    def make():
        return TFPStreamingDataset(stream, buffer_size=25, max_len=80, packs_per_batch=2, seed=4)

    emitted, state = run_interrupted(make, stops)
    assert_exactly_once(emitted, stream)
    assert state["shards"][0]["done"]
    # restored from the state of a finished pass: the next epoch, every sample once more
    following = make()
    following.load_state_dict(state)
    again = list(following)
    assert_exactly_once(again, stream)
    assert {b.stream_state["epoch"] for b in again} == {1}


def test_resume_inside_split_samples():
    """overlong="split": a long sample's pieces may straddle the interruption; its token ranges still tile it."""
    stream = make_stream(60, seed=2, max_tokens=150)

    def make():
        return TFPStreamingDataset(
            stream, buffer_size=16, max_len=48, pack_kwargs={"overlong": "split", "order": "tfp"}
        )

    for stops in ([2], [5, 7]):
        emitted, _ = run_interrupted(make, stops)
        assert_exactly_once(emitted, stream)
        assert any(start > 0 for _, start, _ in pieces_of(emitted))


def test_overlong_drop_is_counted_not_silent():
    stream = make_stream(50, seed=5, max_tokens=60)
    too_long = [i for i, item in enumerate(stream) if len(item["input_ids"]) > 32]
    assert too_long
    dataset = TFPStreamingDataset(stream, buffer_size=10, max_len=32, pack_kwargs={"overlong": "drop"})
    batches = list(dataset)
    assert_exactly_once(batches, stream, skip=too_long)
    assert dataset.state_dict()["shards"][0]["num_dropped"] == len(too_long)
    # a buffer whose samples are all dropped emits nothing and the stream goes on
    stream = [torch.arange(40), torch.arange(50), torch.arange(5), torch.arange(45), torch.arange(7)]
    dataset = TFPStreamingDataset(stream, buffer_size=2, max_len=32, pack_kwargs={"overlong": "drop"})
    assert_exactly_once(list(dataset), stream, skip=[0, 1, 3])
    assert dataset.state_dict()["shards"][0]["num_dropped"] == 3
    truncating = TFPStreamingDataset(stream, buffer_size=10, max_len=32, pack_kwargs={"overlong": "truncate"})
    assert_exactly_once(list(truncating), stream, max_len=32)


def test_state_survives_torch_save(tmp_path):
    stream = make_stream(80, seed=6)

    def make():
        return TFPStreamingDataset(stream, buffer_size=20, max_len=64)

    first = make()
    iterator = iter(first)
    head = [next(iterator) for _ in range(6)]
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert_exactly_once(head + list(resumed), stream)


def test_in_process_break_then_iterate_again_resumes_then_next_epoch():
    stream = make_stream(70, seed=7)
    dataset = TFPStreamingDataset(stream, buffer_size=16, max_len=64)
    head = []
    for batch in dataset:
        head.append(batch)
        if len(head) == 5:
            break
    tail = list(dataset)  # the same object: continues where the first loop stopped
    assert_exactly_once(head + tail, stream)
    again = list(dataset)  # the stream was finished: a new epoch, every sample again, packs reshuffled
    assert_exactly_once(again, stream)
    assert again[0].stream_state["epoch"] == 1
    assert [b.source_index.tolist() for b in again] != [b.source_index.tolist() for b in head + tail]


# ---------------------------------------------------------------------------------------- sharding


def fake_worker(monkeypatch, worker_id, num_workers):
    info = types.SimpleNamespace(id=worker_id, num_workers=num_workers)
    monkeypatch.setattr(streaming, "get_worker_info", lambda: info)


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (3, 2), (4, 3)])
def test_ranks_times_workers_cover_once(monkeypatch, world, workers):
    stream = make_stream(100, seed=8)
    everything = []
    for rank in range(world):
        for worker in range(workers):
            fake_worker(monkeypatch, worker, workers)
            dataset = TFPStreamingDataset(
                stream,
                buffer_size=7,
                max_len=64,
                rank=rank,
                world_size=world,
                pack_kwargs=RANDOM,
                equal_batches=False,  # the ranks are simulated in one process: nothing to agree with
            )
            batches = list(dataset)
            shard = rank * workers + worker
            assert all(b.shard == shard for b in batches)
            assert all(i % (world * workers) == shard for b in batches for i in b.source_index.tolist())
            everything += batches
    assert_exactly_once(everything, stream)


def test_shard_layout_change_is_refused(monkeypatch):
    stream = make_stream(30)
    fake_worker(monkeypatch, 0, 2)
    dataset = TFPStreamingDataset(stream, buffer_size=4, max_len=64)
    next(iter(dataset))
    state = dataset.state_dict()
    fake_worker(monkeypatch, 0, 3)
    resumed = TFPStreamingDataset(stream, buffer_size=4, max_len=64)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="same world_size and num_workers"):
        iter(resumed)
    with pytest.raises(ValueError, match="rank 0 of world_size 1"):
        TFPStreamingDataset(stream, buffer_size=4, max_len=64, rank=1, world_size=2).load_state_dict(state)


def test_dataloader_two_workers_resume():
    """A real DataLoader with 2 workers: cover the stream once, and resume through update_state."""
    stream = make_stream(90, seed=9)

    def make():
        return TFPStreamingDataset(stream, buffer_size=12, max_len=64, packs_per_batch=2, seed=1)

    full = list(DataLoader(make(), batch_size=None, num_workers=2))
    assert {b.shard for b in full} == {0, 1}
    assert_exactly_once(full, stream)

    dataset = make()
    head = []
    for batch in DataLoader(dataset, batch_size=None, num_workers=2, prefetch_factor=4):
        dataset.update_state(batch)
        head.append(batch)
        if len(head) == 7:
            break  # batches the workers prefetched but we did not take are emitted again after resume
    state = dataset.state_dict()
    assert set(state["shards"]) == {0, 1}
    resumed = make()
    resumed.load_state_dict(state)
    tail = list(DataLoader(resumed, batch_size=None, num_workers=2))
    assert_exactly_once(head + tail, stream)


# ---------------------------------------------------------------------------------------- sources


def test_source_kinds():
    generator = torch.Generator().manual_seed(10)
    tensors = [torch.randint(0, 99, (int(n),), generator=generator) for n in torch.randint(1, 30, (45,))]
    kinds = {
        "tensors": tensors,
        "lists": [t.tolist() for t in tensors],
        "numpy int32": [t.numpy().astype(np.int32) for t in tensors],
        "callable": lambda: iter(tensors),
        "generator function output (one pass)": (t for t in tensors),
    }
    for name, source in kinds.items():
        dataset = TFPStreamingDataset(source, buffer_size=10, max_len=50, pack_kwargs=RANDOM)
        assert_exactly_once(list(dataset), tensors), name
    # a callable source can be resumed (it gives a fresh iterator every time)
    emitted, _ = run_interrupted(
        lambda: TFPStreamingDataset(lambda: iter(tensors), buffer_size=10, max_len=50, pack_kwargs=RANDOM),
        [3],
    )
    assert_exactly_once(emitted, tensors)
    # tokenize: any item -> tokens
    texts = ["abc", "hello world", "x", "tfp packs similar samples together"] * 5
    dataset = TFPStreamingDataset(
        texts, buffer_size=8, max_len=64, tokenize=lambda text: list(text.encode()), packs_per_batch=None
    )
    batches = list(dataset)
    assert_exactly_once(batches, [list(t.encode()) for t in texts])


def test_huggingface_datasets_sources():
    datasets = pytest.importorskip("datasets")
    stream = make_stream(60, seed=11, labels=True)
    rows = {
        "input_ids": [item["input_ids"].tolist() for item in stream],
        "labels": [item["labels"].tolist() for item in stream],
    }
    table = datasets.Dataset.from_dict(rows)
    iterable = table.to_iterable_dataset(num_shards=3)
    for source in (table, iterable):
        emitted, _ = run_interrupted(
            lambda source=source: TFPStreamingDataset(source, buffer_size=16, max_len=64), [2]
        )
        assert_exactly_once(emitted, stream)
    # in DataLoader workers a datasets.IterableDataset would split itself by worker on top of our split
    dataset = TFPStreamingDataset(iterable, buffer_size=16, max_len=64, pack_kwargs=RANDOM)
    assert_exactly_once(list(DataLoader(dataset, batch_size=None, num_workers=2)), stream)


def test_embedding_field_is_used():
    stream = make_stream(30, seed=12)
    for item in stream:
        item["emb"] = torch.randn(8, generator=torch.Generator().manual_seed(item["id"]))
    dataset = TFPStreamingDataset(
        stream, buffer_size=30, max_len=64, embedding_field="emb", packs_per_batch=None
    )
    (batch,) = list(dataset)
    assert_exactly_once([batch], stream)
    assert batch.order is not None and batch.order_stats is not None  # those of the buffer
    from tfp_kernels import pack_gpu

    expected = pack_gpu(
        [item["input_ids"] for item in stream],
        max_len=64,
        embeddings=torch.stack([item["emb"] for item in stream]),
    )
    shuffled = sorted(pieces_of([batch]))
    assert shuffled == sorted(
        zip(expected.sample_index.tolist(), [0] * expected.num_pieces, expected.packing.length.tolist())
    )


def test_defaults_from_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        dataset = TFPStreamingDataset([[1, 2]], buffer_size=1, max_len=4)
        assert (dataset.rank, dataset.world_size) == (0, 1)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"buffer_size": 0}, ValueError, "buffer_size"),
        ({"max_len": 0}, ValueError, "max_len"),
        ({"packs_per_batch": 0}, ValueError, "packs_per_batch"),
        ({"rank": 2, "world_size": 2}, ValueError, "rank"),
        ({"world_size": 0}, ValueError, "world_size"),
        ({"seed": -1}, ValueError, "seed"),
        ({"shuffle": "yes"}, TypeError, "shuffle"),
        ({"tokenize": 3}, TypeError, "tokenize"),
        ({"pack_kwargs": {"max_len": 9}}, ValueError, "pack_kwargs"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    arguments = {"buffer_size": 4, "max_len": 16} | kwargs
    with pytest.raises(error, match=match):
        TFPStreamingDataset([[1, 2]], **arguments)
    with pytest.raises(TypeError, match="source"):
        TFPStreamingDataset(3, buffer_size=4, max_len=16)


@pytest.mark.parametrize(
    ("item", "error", "match"),
    [
        ({"text": "a"}, ValueError, "stream item 1 has no field 'input_ids'"),
        ([], ValueError, "stream item 1 has no tokens"),
        ([1.5, 2.5], TypeError, "stream item 1 tokens must hold integers"),
        ([[1, 2]], ValueError, "stream item 1 tokens must be 1-D"),
        ({"input_ids": [1, 2], "labels": [1]}, ValueError, "stream item 1 has 2 tokens but 1 labels"),
        (list(range(17)), ValueError, "stream item 1 has 17 tokens, more than max_len=16"),
    ],
)
def test_bad_items_name_their_position(item, error, match):
    dataset = TFPStreamingDataset([[1, 2, 3], item, [4]], buffer_size=3, max_len=16)
    with pytest.raises(error, match=match):
        list(dataset)


def test_changed_source_is_detected_on_resume():
    stream = make_stream(20, seed=13)
    dataset = TFPStreamingDataset(stream, buffer_size=20, max_len=64)
    next(iter(dataset))
    resumed = TFPStreamingDataset(stream[:10], buffer_size=20, max_len=64)
    resumed.load_state_dict(dataset.state_dict())
    with pytest.raises(ValueError, match="the source gave 10 items where the saved state expects 20"):
        list(resumed)
    with pytest.raises(ValueError, match="not a TFPStreamingDataset state"):
        resumed.load_state_dict({"shards": {}})
    with pytest.raises(TypeError, match="StreamBatch"):
        resumed.update_state(object())


# ---------------------------------------------------------------------------------------- properties


@settings(max_examples=40)
@given(
    n=st.integers(0, 60),
    buffer_size=st.integers(1, 20),
    max_len=st.integers(8, 64),
    packs_per_batch=st.sampled_from([1, 2, 5, None]),
    world=st.integers(1, 3),
    stops=st.lists(st.integers(0, 12), max_size=3),
    overlong=st.sampled_from(["split", "truncate"]),
    seed=st.integers(0, 2**16),
)
def test_resume_property(n, buffer_size, max_len, packs_per_batch, world, stops, overlong, seed):
    stream = make_stream(n, seed=seed, max_tokens=50)
    emitted = []
    for rank in range(world):

        def make(rank=rank):
            return TFPStreamingDataset(
                stream,
                buffer_size=buffer_size,
                max_len=max_len,
                packs_per_batch=packs_per_batch,
                rank=rank,
                world_size=world,
                seed=seed,
                pack_kwargs={"overlong": overlong, "order": "random"},
                equal_batches=False,
            )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches, _ = run_interrupted(make, stops)
        emitted += batches
    assert_exactly_once(emitted, stream, max_len=max_len if overlong == "truncate" else None)


# ---------------------------------------------------------------------------------------- equal batches over ranks

REPO_ROOT = Path(__file__).resolve().parents[2]
EQUAL_TIMEOUT_S = 240
EQUAL_STREAM = {"n": 61, "seed": 12, "max_tokens": 40, "labels": True}
EQUAL_KWARGS = {"buffer_size": 5, "max_len": 48, "seed": 2, "pack_kwargs": RANDOM}


def test_equal_batches_single_process_changes_nothing():
    stream = make_stream(40, seed=3)
    default = list(TFPStreamingDataset(stream, **EQUAL_KWARGS))
    plain = list(TFPStreamingDataset(stream, **EQUAL_KWARGS, equal_batches=False))
    assert len(default) == len(plain) and not any(b.repeat for b in default)
    for a, b in zip(default, plain):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.source_index, b.source_index)


def test_equal_batches_needs_a_group_and_the_main_process(monkeypatch):
    stream = make_stream(20)
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        iter(TFPStreamingDataset(stream, buffer_size=4, max_len=64, rank=0, world_size=2))
    fake_worker(monkeypatch, 0, 2)
    with pytest.raises(RuntimeError, match="equalize_batches"):
        iter(TFPStreamingDataset(stream, buffer_size=4, max_len=64, rank=0, world_size=2))
    with pytest.raises(TypeError, match="equal_batches must be a bool"):
        TFPStreamingDataset(stream, buffer_size=4, max_len=64, equal_batches=1)


def test_as_repeat_and_equalize_without_a_group():
    stream = make_stream(12, seed=5, labels=True)
    batch = next(iter(TFPStreamingDataset(stream, buffer_size=6, max_len=64, pack_kwargs={"pad_to": 64})))
    repeat = as_repeat(batch)
    assert repeat.repeat and not batch.repeat
    assert bool((repeat.labels == IGNORE_INDEX).all()) and repeat.num_items_in_batch.item() == 0
    assert bool((repeat.padded.labels == IGNORE_INDEX).all())
    assert torch.equal(repeat.input_ids, batch.input_ids) and batch.num_items_in_batch.item() > 0
    as_dict = as_repeat({"labels": batch.labels, "input_ids": batch.input_ids, "num_items_in_batch": 5})
    assert bool((as_dict["labels"] == IGNORE_INDEX).all()) and as_dict["num_items_in_batch"].item() == 0
    with pytest.raises(TypeError, match="cannot make a repeat"):
        as_repeat({"input_ids": batch.input_ids})
    assert list(equalize_batches([1, 2, 3])) == [1, 2, 3]  # one process: nothing to agree on


def test_micro_batches_of_a_stream_batch_slice_its_pieces():
    stream = make_stream(30, seed=6)
    batch = next(iter(TFPStreamingDataset(stream, buffer_size=30, max_len=64, packs_per_batch=4, seed=1)))
    parts = batch.micro_batches(3)
    assert all(isinstance(p, StreamBatch) and p.stream_state is batch.stream_state for p in parts)
    assert torch.equal(torch.cat([p.source_index for p in parts]), batch.source_index)
    assert torch.equal(torch.cat([p.source_offset for p in parts]), batch.source_offset)
    assert_exactly_once(parts, stream, skip=set(range(30)) - set(batch.source_index.tolist()))


def _equal_batches_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    store = dist.FileStore(store_path, world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=EQUAL_TIMEOUT_S - 60)
    )
    stream = make_stream(**EQUAL_STREAM)

    def make(**extra):
        return TFPStreamingDataset(stream, **EQUAL_KWARGS, **extra)

    out = {}
    loader = DataLoader(make(), batch_size=None)
    out["epoch0"] = list(loader)
    out["epoch1"] = list(loader)  # the next epoch, agreed again
    total = len(out["epoch0"])
    for stop in (2, total - 1):  # early, and while the short rank is already repeating
        first = make()
        head = []
        for batch in first:
            head.append(batch)
            if len(head) == stop:
                break
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        out[f"resume{stop}"] = head + list(resumed)
    loader = DataLoader(make(equal_batches=False), batch_size=None, num_workers=2)
    out["workers"] = list(equalize_batches(loader))
    out["placeholder"] = list(TFPStreamingDataset(stream[:1], buffer_size=2, max_len=64, pack_kwargs=RANDOM))
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _launch_equal_batches(tmp_path: Path, world: int) -> list[dict]:
    store = tmp_path / "store"
    store.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = []
    with contextlib.ExitStack() as logs:
        for r in range(world):
            log = logs.enter_context(open(tmp_path / f"log{r}.txt", "w"))
            command = [sys.executable, __file__, str(r), str(world), str(store), str(tmp_path)]
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT))
        deadline = time.monotonic() + EQUAL_TIMEOUT_S
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
    assert all(p.returncode == 0 for p in procs), f"a worker failed or timed out (a hang?)\n{text}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _check_equal(per_rank, stream, *, last_real=True):
    """Same count on every rank; repeats only after a rank's real batches, flagged, labels all -100."""
    assert len({len(batches) for batches in per_rank}) == 1, [len(b) for b in per_rank]
    real = []
    for batches in per_rank:
        flags = [b.repeat for b in batches]
        first_repeat = flags.index(True) if True in flags else len(flags)
        assert all(flags[first_repeat:])  # once a rank repeats, it repeats until the end
        for batch in batches[first_repeat:]:
            assert bool((batch.labels == IGNORE_INDEX).all()) and batch.num_items_in_batch.item() == 0
            if last_real and first_repeat > 0:  # a repeat of this rank's last real batch
                assert torch.equal(batch.input_ids, batches[first_repeat - 1].input_ids)
        real += batches[:first_repeat]
    assert_exactly_once(real, stream)
    return real


def test_equal_batches_on_two_ranks(tmp_path):
    stream = make_stream(**EQUAL_STREAM)
    alone = [
        len(list(TFPStreamingDataset(stream, **EQUAL_KWARGS, rank=r, world_size=2, equal_batches=False)))
        for r in range(2)
    ]
    assert alone[0] != alone[1]  # without equal_batches the ranks stop at different steps
    results = _launch_equal_batches(tmp_path, 2)
    epoch0 = [r["epoch0"] for r in results]
    _check_equal(epoch0, stream)
    assert len(epoch0[0]) == max(alone) and sum(b.repeat for b in epoch0[0] + epoch0[1]) == abs(alone[0] - alone[1])
    epoch1 = [r["epoch1"] for r in results]
    _check_equal(epoch1, stream)
    assert {b.stream_state["epoch"] for batches in epoch1 for b in batches} == {1}
    for stop in (2, max(alone) - 1):
        resumed = [r[f"resume{stop}"] for r in results]
        _check_equal(resumed, stream, last_real=stop == 2)
        assert len(resumed[0]) == max(alone)
    workers = [r["workers"] for r in results]
    _check_equal(workers, stream)
    assert sum(b.repeat for batches in workers for b in batches) > 0  # the workers' shards differ too
    placeholder = [r["placeholder"] for r in results]
    assert [len(b) for b in placeholder] == [1, 1]
    assert not placeholder[0][0].repeat and placeholder[1][0].repeat
    assert placeholder[1][0].source_index.tolist() == [-1] and placeholder[1][0].num_items_in_batch.item() == 0


if __name__ == "__main__":
    _equal_batches_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
