"""Worker process and launcher of the sharded ordering tests (tests/distributed/test_order_sharded.py).

The launcher starts ``world_size`` Python processes running this file; they join a gloo group through a
``FileStore`` (no ports), run every case of a case file on their shard and save what they got (path,
stats or the error) to ``<out>/rank<r>.pt``. A hang ends at the timeout, with every process killed.

    python tests/distributed/_helpers_order.py RANK WORLD STORE_FILE CASES_FILE OUT_DIR
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
#: seconds a worker's collective waits for the other ranks (gloo's timeout; below :func:`finish`'s deadlines)
COLLECTIVE_TIMEOUT_S = 150


def make_embeddings(n: int, d: int, *, seed: int, clusters: int = 0, dtype=torch.float32) -> torch.Tensor:
    """(n, d) Gaussian rows (around ``clusters`` centres when > 0): no distance ties in practice."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if clusters:
        centres = 3.0 * torch.randn(clusters, d, generator=g, dtype=torch.float64)
        x = centres[torch.randint(0, clusters, (n,), generator=g)] + 0.5 * x
    return x.to(dtype)


def case_embeddings(case: dict) -> torch.Tensor:
    x = make_embeddings(
        case["n"],
        case["d"],
        seed=case.get("seed", 0),
        clusters=case.get("clusters", 0),
        dtype=case.get("dtype", torch.float32),
    )
    if case.get("duplicates"):  # `duplicates` rows spread evenly over all rows equal row 0: one duplicate group
        step = case["n"] // case["duplicates"]
        x[: step * case["duplicates"] : step] = x[0].clone()
    if case.get("copies"):  # `copies` random rows replaced by copies of other random rows: duplicate groups of
        # several sizes, their members on different ranks (a copy of a copy joins its source's group)
        g = torch.Generator().manual_seed(case.get("seed", 0) + 1)
        targets = torch.randperm(case["n"], generator=g)[: case["copies"]]
        sources = torch.randint(0, case["n"], (case["copies"],), generator=g)
        for target, source in zip(targets.tolist(), sources.tolist()):
            x[target] = x[source]
    if case.get("shell"):  # `shell` rows spread evenly over all rows: 3 e_i, all pairwise at squared distance 18
        x = 10.0 * x
        step = case["n"] // case["shell"]
        x[: step * case["shell"] : step] = 3.0 * torch.eye(case["shell"], case["d"], dtype=x.dtype)
    return x


def start(world_size: int, cases: list[dict], tmp_dir: Path, env: dict | None = None) -> dict:
    """Start ``world_size`` worker processes on ``cases`` (``env``: more environment variables); :func:`finish`
    collects them."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    cases_file = tmp_dir / "cases.pt"
    torch.save(cases, cases_file)
    store = tmp_dir / "store"
    store.unlink(missing_ok=True)  # a FileStore left by an earlier run would hand out stale addresses
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        **(env or {}),
    )
    procs = []
    for rank in range(world_size):
        log = tmp_dir / f"stderr{rank}.txt"
        with open(log, "w") as err:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        str(rank),
                        str(world_size),
                        str(store),
                        str(cases_file),
                        str(tmp_dir),
                    ],
                    stdout=err,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=REPO_ROOT,
                )
            )
    return {"procs": procs, "dir": tmp_dir, "world": world_size, "started": time.monotonic()}


def finish(handle: dict, *, timeout: float = COLLECTIVE_TIMEOUT_S + 90) -> list[list[dict]]:
    """Wait for the workers of :func:`start`; return ``results[rank][case]``.

    Raises AssertionError with the workers' output when a worker fails or the run exceeds ``timeout``
    seconds from its start (every worker is then killed).
    """
    procs, tmp_dir, world = handle["procs"], handle["dir"], handle["world"]
    deadline = handle["started"] + timeout
    timed_out = False
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = "\n".join(
        f"--- rank {r} (rc {p.returncode}) ---\n" + (tmp_dir / f"stderr{r}.txt").read_text()[-3000:]
        for r, p in enumerate(procs)
    )
    assert not timed_out, f"the {world} workers did not finish within {timeout} s\n{logs}"
    assert all(p.returncode == 0 for p in procs), f"a worker failed\n{logs}"
    return [torch.load(tmp_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def launch(world_size: int, cases: list[dict], tmp_dir: Path, *, timeout: float = COLLECTIVE_TIMEOUT_S + 90,
           env: dict | None = None) -> list[list[dict]]:
    """Run ``cases`` on ``world_size`` gloo processes and wait: :func:`start` + :func:`finish`."""
    return finish(start(world_size, cases, tmp_dir, env), timeout=timeout)


def _run_case(case: dict, rank: int, world: int) -> dict:
    import torch.distributed as dist

    from tfp_kernels import tfp_order
    from tfp_kernels.distributed import shard_bounds, tfp_order_sharded

    emb = case_embeddings(case)
    s, e = shard_bounds(emb.shape[0], world)[rank]
    shard = emb[s:e]
    if "d_on_rank" in case and rank in case["d_on_rank"]:
        shard = make_embeddings(e - s, case["d_on_rank"][rank], seed=1)
    if "nan_on_rank" in case and rank == case["nan_on_rank"] and shard.shape[0]:
        shard = shard.clone()
        shard[0, 0] = float("nan")
    kwargs = dict(case.get("kwargs", {}))
    if "kwargs_on_rank" in case and rank in case["kwargs_on_rank"]:
        kwargs.update(case["kwargs_on_rank"][rank])
    kwargs["settings"] = case_settings(case)
    if "settings_on_rank" in case and rank in case["settings_on_rank"]:
        from tfp_kernels.order import EngineSettings

        kwargs["settings"] = EngineSettings(**case["settings_on_rank"][rank])
    with failing_long_lists(case.get("long_fail_on_rank", {}).get(rank)), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if case.get("direct"):
                path, stats = tfp_order_sharded(shard, group=dist.group.WORLD, return_stats=True, **kwargs)
            else:
                path, stats = tfp_order(shard, group=dist.group.WORLD, return_stats=True, **kwargs)
        except (TypeError, ValueError) as err:
            return {"error": (type(err).__name__, str(err))}
    return {"path": path, "stats": stats, "warnings": [str(w.message) for w in caught]}


class failing_long_lists:
    """Context manager: ``spec`` = (name, at): the function ``name`` of ``tfp_kernels.distributed.order`` (this
    rank's part of the long lists, ``_local_long_lists``, or rank 0's preparation of a round, ``_long_query``)
    raises at its call number ``at`` (0: the first build's round), as out of memory would; None: no failure."""

    def __init__(self, spec: tuple[str, int] | None):
        self.spec, self.saved = spec, None

    def __enter__(self):
        from tfp_kernels.distributed import order

        if self.spec is None:
            return
        name, at = self.spec
        self.saved, calls = getattr(order, name), [0]

        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] - 1 == at:
                raise RuntimeError(f"injected failure of {name}")
            return self.saved(*args, **kwargs)

        setattr(order, name, failing)

    def __exit__(self, *exc):
        from tfp_kernels.distributed import order

        if self.saved is not None:
            setattr(order, self.spec[0], self.saved)


def case_settings(case: dict):
    """The case's engine settings (``"settings"``: EngineSettings fields), or None for the defaults."""
    from tfp_kernels.order import EngineSettings

    return EngineSettings(**case["settings"]) if "settings" in case else None


def _worker(rank: int, world: int, store_file: str, cases_file: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_file, world)
    # a collective waits up to COLLECTIVE_TIMEOUT_S for a slower rank: the 2- and 4-process runs share the CI's
    # 2 cores with each other and with the test process (27 s alone, 3-4x that together); a hang still ends
    # with gloo's error naming the collective before finish()'s deadline kills the workers
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        cases = torch.load(cases_file, weights_only=False)
        results = [_run_case(case, rank, world) for case in cases]
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
