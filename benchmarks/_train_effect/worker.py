"""Worker processes of ``train_effect --jobs N``: each rebuilds the tasks once (the same data and TFP order:
both are deterministic), then trains the runs it is given."""

from __future__ import annotations

import argparse
import sys
import time

import torch

_STATE: dict = {}


def init(arguments: dict) -> None:
    """Build the tokenizer, embedder and prepared tasks of the run described by ``arguments``
    (``vars(args)``)."""
    from benchmarks import train_effect

    args = argparse.Namespace(**arguments)
    torch.set_num_threads(args.threads)
    tokenizer = train_effect._tokenizer(args)
    from tfp_kernels.embed import load_embedder

    embedder = load_embedder(args.embedder)
    prepared = {
        task.name: train_effect._prepare(args, task, embedder)
        for task in train_effect._task_list(args, tokenizer)
    }
    _STATE.update(args=args, tokenizer=tokenizer, prepared=prepared, module=train_effect)


def run_one(task_name: str, condition: dict, seed: int) -> dict:
    """Train and evaluate one run; returns what :func:`~benchmarks._train_effect.train.train_run` returns."""
    from benchmarks._train_effect.plan import Condition
    from benchmarks._train_effect.train import train_run

    args, module = _STATE["args"], _STATE["module"]
    prepared, config = _STATE["prepared"][task_name]
    condition = Condition(**condition)
    start = time.perf_counter()

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[worker {time.perf_counter() - start:6.1f}s] {task_name} {condition.name} seed {seed}:"
                  f"{message}", file=sys.stderr, flush=True)

    model = module._make_model(args, _STATE["tokenizer"], seed, prepared.max_len)
    return train_run(model, prepared, condition, seed, config, torch.device(args.device), log=log)
