"""Shared harness of the benchmark scripts: timing, environment, and a JSON results file per device.

Every ``benchmarks/bench_<stage>.py`` runs its baseline and its fast paths in the same process with
:func:`time_call`, then :func:`write_results` writes ``benchmarks/results/<stage>_<device-name>.json`` with
the environment (device, torch / CUDA / Python versions, git commit), the sizes, the timings and the ratios.
Nothing is downloaded.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def device_name(device: str | torch.device = "cpu") -> str:
    """``torch.cuda.get_device_name`` for a CUDA device, else ``"cpu-<nproc>core"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}core"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def git_commit() -> str:
    """HEAD of the repository, with ``-dirty`` when tracked files differ from it; ``"unknown"`` outside git.

    ``TFP_GIT_COMMIT`` in the environment overrides it (for copies of the tree without ``.git``, e.g. on a
    rented GPU machine).
    """
    if os.environ.get("TFP_GIT_COMMIT"):
        return os.environ["TFP_GIT_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def environment(device: str | torch.device = "cpu") -> dict:
    """Where the numbers come from: device, versions, commit, CPU count, time."""
    device = torch.device(device)
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        from tfp_kernels import __version__, has_cuda_ops, has_extension

        env.update(tfp_kernels=__version__, extension=has_extension(), extension_cuda=has_cuda_ops())
    except ImportError:
        pass
    return env


def time_call(
    fn: Callable[[], object],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeat: int = 10,
    max_seconds: float = 20.0,
) -> dict:
    """Wall-clock timings of ``fn()`` in milliseconds (CUDA synchronised before and after each call).

    Returns:
        ``{"median_ms", "p20_ms", "p80_ms", "min_ms", "runs"}``: quantiles 0.5 / 0.2 / 0.8 over the runs.
        Stops early once ``max_seconds`` of timed runs are spent (at least one run).
    """
    is_cuda = torch.device(device).type == "cuda"

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    spent = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        spent += elapsed
        if spent > max_seconds:
            break
    if len(times) >= 2:
        p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")[0:4]
    else:
        p20 = p80 = times[0]
    return {
        "median_ms": statistics.median(times),
        "p20_ms": p20,
        "p80_ms": p80,
        "min_ms": min(times),
        "runs": len(times),
    }


def write_results(
    stage: str, device: str | torch.device, payload: dict, *, out_dir: Path | None = None
) -> Path:
    """Write ``{"environment": ..., **payload}`` to ``<out_dir>/<stage>_<device-name>.json``; return the path."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stage}_{_slug(device_name(device))}.json"
    document = {"benchmark": stage, "environment": environment(device), **payload}
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
