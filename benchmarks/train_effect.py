"""Does TFP help? Train the same model on the same tokens under several packings and compare what it learned.

Every condition trains a model from the same initialisation (per seed) on the same training samples, for the
same number of optimizer steps, with the same optimizer, learning-rate schedule and batch size in tokens; the
conditions differ only in how the samples are ordered and packed and in what attention sees:

=================  =======  ==========  =====================================================================
condition          order    attention   what it is
=================  =======  ==========  =====================================================================
``random+pack``    random   pack        random packing, causal attention over the whole pack (the paper's
                                        baseline)
``tfp+pack``       TFP      pack        TFP order, causal attention over the whole pack: later samples see
                                        earlier, related ones (the paper's method)
``random+sample``  random   sample      one attention segment per sample (what transformers'
                                        ``DataCollatorWithFlattening`` does)
``tfp+sample``     TFP      sample      TFP order, but no attention across samples
=================  =======  ==========  =====================================================================

All four pack with ``next_fit`` (the package's order-keeping strategy: a new pack when the next sample does
not fit, no sample split), and the TFP ones walk by the paper's rule, so only the order and the attention
differ. When the package's default packing (``pack_gpu``'s default ``strategy`` and ``policy``) is another
one, ``tfp+pack`` with it is added: since the ``spread`` policy became ``pack_gpu``'s default,
``tfp+pack/spread`` (the paper's rule until no unvisited sample is at distance >= t from the window, then the
farthest one instead of the nearest; exact-duplicate groups taken as soon as they are valid).
``--conditions`` takes any list of ``ORDER:ATTENTION[:STRATEGY[:POLICY]]`` (e.g. ``tfp:pack:stream``, the
paper's own packer, which splits samples at pack boundaries; ``tfp:sample:next_fit:spread``).

How a run goes (one task, one condition, one seed):

1. the training samples are tokenized once (labels: the response tokens only, as ``tfp-pack`` does);
   ``order="tfp"`` orders them by :func:`tfp_kernels.tfp_order` over the embeddings of their instruction
   (default embedder: the package's hashed byte n-gram bag; threshold: the 2% quantile of pair distances,
   window 4, no cap: the package's defaults), once per task; ``order="random"`` uses a permutation drawn
   from the seed. :func:`tfp_kernels.pack_gpu` makes the packs.
2. ``--epochs`` epochs; before each the packs are shuffled (:func:`tfp_kernels.shuffle_packs` with the seed
   and the epoch; the order inside a pack is kept). The concatenated epochs are cut into ``--steps`` batches
   of consecutive packs holding about the same number of tokens (so every condition sees every sample
   ``--epochs`` times, in the same number of steps, with batches of the same size in tokens up to one pack).
3. each batch is assembled by :func:`tfp_kernels.assemble` in the flat ``[1, T]`` layout with ``cu_seqlens``
   (one segment per pack or per sample) and fed to the model with ``PackedBatch.to_hf_kwargs()``; attention
   runs through :func:`tfp_kernels.varlen_attention`, registered as a transformers attention function, so that
   the segments of ``cu_seqlens`` are exactly what attention sees, on the CPU as on a GPU.
4. AdamW (lr ``--lr``, betas (0.9, 0.95), weight decay 0.01), linear warm-up over 10% of the steps then
   cosine decay to 10% of ``--lr``, gradients clipped at norm 1; loss: mean cross-entropy over the batch's
   response tokens.
5. the seed sets the model's initialisation, the random order and the pack shuffles; the same seed gives the
   same initialisation in every condition (so TFP and random are compared per seed, paired).

Tasks of the default run (CPU, nothing downloaded; the model is a tiny Llama, ``transformers.LlamaConfig``,
trained from scratch, over the package's byte tokenizer: 259 token ids):

``sft``
    the bundled default SFT set (``tfp_kernels/data/sft_default.jsonl.gz``: 4,000 synthetic Alpaca records on
    8 topics, 5% planted near-duplicates), split by record with a fixed seed into training and held-out records
    (a subset of each, ``--sft-train`` / ``--sft-eval``, to fit the time budget). Metrics on the held-out
    records: ``heldout_loss`` (below) and ``first_line_exact``: the fraction of held-out records whose first
    response line (the fact or the computed result: a capital, a unit conversion, a weekday, ``a + b = c``,
    the corrected sentence, ...; the later lines of the bundled answers are filler drawn at random) is
    reproduced exactly by greedy decoding, with its end (the newline, or the end-of-sequence token of a
    one-line answer).

``families``
    a task built so that related context *can* help (written here before any result was seen, and not
    changed after). Families of questions share a hidden rule: family ``f`` has an invented name (e.g.
    ``"tavoru"``), a key of 3 random letters and a side (prefix or suffix). Every question of the family reads
    ``"Apply the <name> code to: <word>"`` for a random word of 4-6 letters, and its answer is the word with
    the key glued on that side (``key + word`` or ``word + key``). A model can answer from its weights (it
    has learnt the family's key and side) or from context (a solved example of the same family earlier in
    the same attention segment shows the key and the side: copying them is enough). 24 families are
    trained on, 40 questions each; 24 is few enough that same-family pairs (1/24 of all pairs) lie well
    inside TFP's 2% distance quantile, so TFP *can* put family members next to each other (with many more,
    smaller families, TFP's threshold would keep them apart). 12 more families are never trained on.
    Metrics (all exact matches are of the whole answer and the end-of-sequence token, by greedy decoding):

    - ``heldout_loss`` and ``alone_exact``: 8 new words per trained family, each question alone;
    - ``fewshot_seen_exact``: the same questions, each preceded (in the same attention segment) by 3 solved
      training questions of its family;
    - ``fewshot_unseen_exact``: 8 questions of each never-trained family, each preceded by 3 solved questions
      of that family: only in-context use of the examples can answer them.

    Hypothesis stated before the first run: ``tfp+pack`` beats ``random+pack`` on ``fewshot_unseen_exact``
    (training with related samples in view teaches the model to use them), and both ``*+sample`` conditions
    stay near 0 there (they never attend across samples). No direction is predicted for ``alone_exact`` and
    ``heldout_loss`` (answers visible in context may also let a model learn less into its weights).

Metrics common to every task:

- ``heldout_loss``: mean cross-entropy per response token (and end-of-sequence token) of the held-out
  samples, each alone (one attention segment per sample: nothing from other samples leaks in);
- exact matches (above) are computed in one teacher-forced pass: greedy decoding reproduces the reference
  span exactly if and only if every reference token of the span is the arg-max of the model's prediction
  given the reference tokens before it (ties go to the lower id, as ``argmax`` does);
- training loss per step (the curves; not comparable between pack and sample attention, where the context
  differs), held-out loss at ``--eval-points`` points of training;
- per condition, what the packing feeds the model: packs, fill, samples per pack, the share of samples with
  an earlier sample of the same group (topic / family) in their pack, segments per batch.

Results: mean and standard deviation over the seeds per task x condition x metric, and per seed the paired
difference TFP minus random for each attention mode (mean, standard deviation, wins). Written to
``<output>/train_effect_<device>.json`` (conditions x seeds x metrics, arguments, versions, git commit, wall
times) and ``<output>/train_effect_<device>.png`` (training-loss curves, held-out loss curves, final metrics).

Your own model and data::

    python -m benchmarks.train_effect --model PATH --train train.jsonl --eval eval.jsonl \\
        --max-len 2048 --steps 500 --batch-tokens 65536 --device cuda --output out/

``--model``: a local causal LM for transformers (``AutoModelForCausalLM``, no download; its tokenizer from the
same folder unless ``--tokenizer``), optionally trained through LoRA (``--lora R``, needs ``peft``);
``--train``/``--eval``: records in any format ``tfp-pack`` reads (JSON, JSONL, Parquet, a saved ``datasets``
folder; alpaca, chat, prompt/completion, text); metrics: ``heldout_loss`` and ``first_line_exact``.
``--embedder hashed|minilm|PATH`` as ``tfp-pack``. ``--smoke``: every condition, 2 seeds, a few steps of a
very small model (the CI test).

Run from the repository root: ``python -m benchmarks.train_effect`` (the default run: 78 min on 2 CPU cores
shared with other jobs; ~30 min estimated on 2 idle cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks import _harness
from benchmarks._train_effect import model as model_lib
from benchmarks._train_effect import report, tasks
from benchmarks._train_effect.plan import (
    PreparedTask,
    default_conditions,
    package_default_strategy,
    packing_diagnostics,
    parse_condition,
    versions,
)
from benchmarks._train_effect.train import TrainConfig, train_run

TASKS = ("families", "sft")
#: Per task: passes over the training samples, tokens per pack, tokens per optimizer step (--epochs,
#: --max-len, --batch-tokens override them). A step of the default run holds about 2 packs (its size in
#: tokens varies by up to a pack around the mean; every condition gets the same total in the same steps).
#: Chosen, with the tiny model's size and learning rate, so that the default run fits ~30 min on 2 CPU cores
#: and the baseline ``random+sample`` learns something (calibrated on that condition, seed 0, only).
TASK_DEFAULTS = {
    "families": {"epochs": 16, "max_len": 512, "batch_tokens": 1024},
    "sft": {"epochs": 2, "max_len": 1024, "batch_tokens": 2048},
    "custom": {"epochs": 1, "max_len": 2048, "batch_tokens": 16384},
}
#: The --smoke settings: every condition, 2 seeds, a few steps of a very small model on small data.
SMOKE = {
    "seeds": [0, 1],
    "model_size": "smoke",
    "epochs": 1,
    "batch_tokens": 1024,
    "sft_train": 24,
    "sft_eval": 8,
    "families": {"num_families": 4, "per_family": 10, "eval_per_family": 2, "num_unseen": 2, "shots": 2},
    "eval_points": 1,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_effect",
        description="Train the same model on the same tokens under several packings (TFP / random order, "
        "pack / sample attention) and compare what it learned, over seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("experiment")
    g.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS,
                   help="tasks of the default run (ignored with --train/--eval)")
    g.add_argument("--conditions", nargs="+", default=None, metavar="ORDER:ATTENTION[:STRATEGY[:POLICY]]",
                   help="conditions to train, e.g. tfp:pack random:sample tfp:pack:stream; default: "
                   "random/tfp x pack/sample with next_fit and the paper's rule (+ tfp:pack with the package "
                   "default strategy and policy if it differs)")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per seed and condition")
    g.add_argument("--smoke", action="store_true",
                   help="every condition, 2 seeds, a few steps of a tiny model")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="a local causal LM for transformers; default: a tiny Llama trained from scratch")
    g.add_argument("--model-size", default="small", choices=sorted(model_lib.TINY_CONFIGS),
                   help="size of the tiny Llama")
    g.add_argument("--tokenizer", default=None, metavar="byte|PATH",
                   help="default: 'byte' for the tiny Llama, the model's folder for --model")
    g.add_argument("--lora", type=int, default=0, metavar="R", help="train LoRA adapters of rank R (peft)")
    g.add_argument("--dtype", default="auto", help="--model weights' dtype (auto, float32, bfloat16, ...)")
    g = p.add_argument_group("data")
    g.add_argument("--train", default=None, metavar="FILE", help="training records (formats of tfp-pack)")
    g.add_argument("--eval", default=None, metavar="FILE", help="held-out records (formats of tfp-pack)")
    g.add_argument("--format", default="auto",
                   choices=("auto", "alpaca", "chat", "prompt_completion", "text"))
    g.add_argument("--group-field", default=None, metavar="FIELD",
                   help="record field naming each record's group (diagnostics of the packing only)")
    g.add_argument("--answer-span", default="first_line", choices=tasks.ANSWER_SPANS,
                   help="what greedy decoding must reproduce for an exact match (--train/--eval)")
    g.add_argument("--limit-train", type=int, default=None, metavar="N")
    g.add_argument("--limit-eval", type=int, default=None, metavar="N")
    g.add_argument("--sft-train", type=int, default=1200, metavar="N", help="training records of task sft")
    g.add_argument("--sft-eval", type=int, default=200, metavar="N", help="held-out records of task sft")
    g = p.add_argument_group("ordering and packing")
    g.add_argument("--embedder", default="hashed", metavar="hashed|minilm|PATH", help="as tfp-pack's")
    g.add_argument("--metric", default="l2", choices=("l2", "cosine"))
    g.add_argument("--quantile", type=float, default=0.02)
    g.add_argument("--window", type=int, default=4)
    g.add_argument("--max-len", type=int, default=None,
                   help="tokens per pack; default per task (TASK_DEFAULTS)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None,
                   help="passes over the training samples; default per task (TASK_DEFAULTS)")
    g.add_argument("--steps", type=int, default=None,
                   help="optimizer steps; default: epochs x training tokens / --batch-tokens")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per step when --steps is not given; default per task (TASK_DEFAULTS)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate; default 5e-3 (tiny Llama), 1e-4 (--lora), 2e-5 (--model)")
    g.add_argument("--eval-points", type=int, default=4, help="held-out loss measured this many times")
    g.add_argument("--eval-batch-tokens", type=int, default=8192, help="tokens per evaluation forward pass")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    g.add_argument("--jobs", type=int, default=0,
                   help="runs trained at the same time, in worker processes; 0: one per CPU core up to "
                   "2 for the tiny model on the CPU, else 1")
    g.add_argument("--threads", type=int, default=0,
                   help="torch threads per run; 0: the CPU cores divided among the --jobs")
    g.add_argument("--output", default=None, metavar="DIR",
                   help="where the JSON and PNG go (default benchmarks/results)")
    g.add_argument("--quiet", action="store_true")
    return p


def _log_to(quiet: bool):
    start = time.perf_counter()

    def log(message: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

    return log


def _check_args(p: argparse.ArgumentParser, args) -> None:
    if (args.train is None) != (args.eval is None):
        p.error("--train and --eval go together")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds must be distinct non-negative ints, got {args.seeds}")
    for name in ("eval_batch_tokens", "sft_train", "sft_eval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_len", "batch_tokens", "epochs", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads < 0 or args.jobs < 0:
        p.error("--threads and --jobs must be >= 0")
    if args.eval_points < 0:
        p.error("--eval-points must be >= 0")


def _tokenizer(args):
    from tfp_kernels.text import load_tokenizer

    spec = args.tokenizer or (args.model if args.model else "byte")
    return load_tokenizer(spec)


def _task_list(args, tokenizer) -> list:
    if args.train is not None:
        return [
            tasks.custom_task(
                tokenizer, args.train, args.eval, fmt=args.format, group_field=args.group_field,
                answer_span=args.answer_span, limit_train=args.limit_train, limit_eval=args.limit_eval,
            )
        ]
    out = []
    for name in args.tasks:
        if name == "families":
            out.append(tasks.families_task(tokenizer, **(SMOKE["families"] if args.smoke else {})))
        else:
            out.append(tasks.sft_task(tokenizer, num_train=args.sft_train, num_eval=args.sft_eval))
    return out


def _task_setting(args, task_name: str, name: str) -> int:
    value = getattr(args, name)
    return value if value is not None else TASK_DEFAULTS[task_name][name]


def _make_model(args, tokenizer, seed: int, max_len: int):
    if args.model:
        return model_lib.load_pretrained(args.model, seed, lora_rank=args.lora, dtype=args.dtype)
    return model_lib.tiny_llama(
        tokenizer.vocab_size, max_len, seed, args.model_size,
        bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=getattr(tokenizer, "PAD_ID", 0),
    )


def _default_lr(args) -> float:
    if args.lr is not None:
        return args.lr
    if args.model:
        return 1e-4 if args.lora else 2e-5
    return 5e-3


def run(args, log) -> dict:
    """The whole experiment; returns the results document (also written after every run)."""
    device = torch.device(args.device)
    conditions = [parse_condition(c) for c in args.conditions] if args.conditions else default_conditions()
    if len({c.name for c in conditions}) != len(conditions):
        raise SystemExit(f"--conditions lists a condition twice: {[c.name for c in conditions]}")
    tokenizer = _tokenizer(args)
    from tfp_kernels.embed import load_embedder

    embedder = load_embedder(args.embedder) if any(c.order == "tfp" for c in conditions) else None
    out_dir = Path(args.output) if args.output else _harness.RESULTS_DIR
    stage = "train_effect_smoke" if args.smoke else "train_effect"
    probe = _make_model(args, tokenizer, 0, 2048)
    results = {
        "arguments": vars(args),
        "versions": versions(),
        "package_default_strategy": package_default_strategy(),
        "model": {
            "name": args.model or f"tiny Llama ({args.model_size})",
            "parameters": model_lib.count_parameters(probe),
            "config": probe.config.to_diff_dict() if hasattr(probe.config, "to_diff_dict") else {},
        },
        "tokenizer": getattr(tokenizer, "name", "byte"),
        "tasks": {},
    }
    del probe
    started = time.perf_counter()
    prepared_tasks, plan = {}, []
    for task in _task_list(args, tokenizer):
        log(f"task {task.name}: {task.num_train} training samples, {task.num_train_tokens} tokens; "
            f"eval sets {task.info['eval_sets']}")
        prepared, config = _prepare(args, task, embedder)
        prepared_tasks[task.name] = (prepared, config)
        entry = {
            "info": task.info,
            "train": {**dataclasses.asdict(config), "max_len": prepared.max_len,
                      "tokens_per_step": config.epochs * task.num_train_tokens / config.steps},
            "conditions": {
                c.name: {"condition": dataclasses.asdict(c), "diagnostics": {}, "runs": [], "summary": {}}
                for c in conditions
            },
        }
        results["tasks"][task.name] = entry
    # seed by seed (all tasks and conditions of a seed first): a run cut short leaves complete pairs
    for seed in args.seeds:
        for task_name, (prepared, config) in prepared_tasks.items():
            entry = results["tasks"][task_name]
            for condition in conditions:
                diag = packing_diagnostics(prepared.packing(condition, seed), prepared.task.train_groups)
                cond_entry = entry["conditions"][condition.name]
                if condition.order == "tfp" or not cond_entry["diagnostics"]:
                    cond_entry["diagnostics"] = diag
                plan.append((task_name, condition, seed, diag))
            entry["order_stats"] = prepared.order_stats

    def record(task_name, condition, seed, diag, out) -> None:
        entry = results["tasks"][task_name]
        cond_entry = entry["conditions"][condition.name]
        out["seed"] = seed
        out["diagnostics"] = diag
        cond_entry["runs"].append(out)
        cond_entry["runs"].sort(key=lambda r: args.seeds.index(r["seed"]))
        cond_entry["summary"] = report.summarize(cond_entry["runs"])
        entry["paired"] = report.paired_comparisons(entry["conditions"])
        results["wall_s"] = time.perf_counter() - started
        log(f"  done {task_name} {condition.name} seed {seed}: "
            f"{', '.join(f'{k} {v:.4f}' for k, v in out['metrics'].items())} "
            f"({out['wall_s']:.0f} s, {out['tokens_per_s']:.0f} tokens/s)")
        _write(results, stage, device, out_dir)

    if args.jobs == 1:
        for task_name, condition, seed, diag in plan:
            prepared, config = prepared_tasks[task_name]
            log(f"  {task_name} {condition.name} seed {seed}: {diag['num_packs']} packs, "
                f"{config.steps} steps")
            model = _make_model(args, tokenizer, seed, prepared.max_len)
            out = train_run(model, prepared, condition, seed, config, device, log=log)
            record(task_name, condition, seed, diag, out)
            del model
    else:
        import concurrent.futures
        import multiprocessing

        from benchmarks._train_effect import worker

        log(f"  {len(plan)} runs on {args.jobs} worker processes ({args.threads} thread(s) each)")
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=context, initializer=worker.init, initargs=(vars(args),)
        ) as pool:
            futures = {
                pool.submit(worker.run_one, task_name, dataclasses.asdict(condition), seed): (
                    task_name, condition, seed, diag)
                for task_name, condition, seed, diag in plan
            }
            for future in concurrent.futures.as_completed(futures):
                record(*futures[future], future.result())
    return results


def _prepare(args, task, embedder):
    """The task's :class:`PreparedTask` and :class:`TrainConfig` from the arguments and its defaults."""
    max_len = _task_setting(args, task.name, "max_len")
    prepared = PreparedTask(task, embedder, max_len, metric=args.metric, quantile=args.quantile,
                            window=args.window)
    epochs = _task_setting(args, task.name, "epochs")
    batch_tokens = _task_setting(args, task.name, "batch_tokens")
    steps = args.steps or max(1, round(epochs * task.num_train_tokens / batch_tokens))
    config = TrainConfig(epochs=epochs, steps=steps, lr=_default_lr(args), eval_points=args.eval_points,
                         eval_batch_tokens=args.eval_batch_tokens)
    return prepared, config


def _write(results: dict, stage: str, device, out_dir: Path) -> Path:
    """Write the results (with a fresh environment: commit, versions, time) to ``<stage>_<device>.json``."""
    payload = {k: v for k, v in results.items() if k != "environment"}
    path = _harness.write_results(stage, device, payload, out_dir=out_dir)
    results["environment"] = _harness.environment(device)
    return path


def main(argv=None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    if args.smoke:
        args.seeds = SMOKE["seeds"]
        args.model_size = SMOKE["model_size"]
        args.epochs = SMOKE["epochs"]
        args.batch_tokens = SMOKE["batch_tokens"]
        args.sft_train, args.sft_eval = SMOKE["sft_train"], SMOKE["sft_eval"]
        args.eval_points = SMOKE["eval_points"]
    if args.jobs == 0:
        args.jobs = 1 if (args.smoke or args.model or args.device == "cuda") else min(2, os.cpu_count() or 1)
    if args.threads == 0:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    torch.set_num_threads(args.threads)
    log = _log_to(args.quiet)
    results = run(args, log)
    out_dir = Path(args.output) if args.output else _harness.RESULTS_DIR
    stage = "train_effect_smoke" if args.smoke else "train_effect"
    json_path = _write(results, stage, torch.device(args.device), out_dir)
    png_path = json_path.with_suffix(".png")
    report.plot(results, png_path)
    log(f"wrote {json_path} and {png_path} ({results['wall_s']:.0f} s)")
    if not args.quiet:
        print(report.markdown_tables(results))
    return results


if __name__ == "__main__":
    main()
