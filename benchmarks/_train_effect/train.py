"""Training and evaluation of one ``train_effect`` run (one task, condition and seed).

:func:`train_run` trains a fresh model on the condition's batches and evaluates it; :func:`evaluate` scores an
:class:`~benchmarks._train_effect.tasks.EvalSet` with every unit alone in its own attention segment.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from tfp_kernels import assemble, pack_lengths

from .plan import Condition, PreparedTask, step_batch, step_packs


@dataclass
class TrainConfig:
    """Optimisation settings shared by every condition of a run."""

    epochs: int
    steps: int
    lr: float
    warmup_fraction: float = 0.1
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    eval_points: int = 4
    eval_batch_tokens: int = 8192


def lr_factor(step: int, steps: int, warmup_fraction: float, final_fraction: float) -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to ``final_fraction``."""
    warmup = max(1, round(warmup_fraction * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def model_inputs(batch, device: torch.device, *, labels: bool = True) -> dict:
    """``batch.to_hf_kwargs()`` on ``device`` (no ``labels`` when ``labels`` is False)."""
    kwargs = batch.to_hf_kwargs()
    if not labels:
        kwargs.pop("labels")
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()
    }


# ---------------------------------------------------------------------------------------- evaluation


def _chunks(lengths: list, max_tokens: int) -> list:
    """Consecutive index ranges of at most ``max_tokens`` tokens (at least one unit each)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > max_tokens:
            out.append((start, i))
            start, total = i, 0
        total += n
    out.append((start, len(lengths)))
    return out


@torch.no_grad()
def evaluate(model, eval_set, device: torch.device, *, max_tokens: int = 8192) -> dict:
    """Loss and exact matches of every unit of ``eval_set``, each unit in its own attention segment.

    The units are assembled ``attention="sample"`` (one segment per unit, position ids from 0), in chunks of
    at most ``max_tokens`` tokens; the model returns the logits at the positions that predict a scored token.

    Returns:
        ``{loss_metric: mean cross-entropy per scored token, exact_metric: share of units whose span is the
        arg-max at every position, "num_units", "num_scored_tokens"}``.
    """
    was_training = model.training
    model.eval()
    lengths = [u.numel() for u in eval_set.units]
    nll_sum, scored, exact = 0.0, 0, 0
    for a, b in _chunks(lengths, max_tokens):
        units = eval_set.units[a:b]
        packing = pack_lengths(lengths[a:b], max_len=sum(lengths[a:b]), strategy="next_fit")
        batch = assemble(units, packing, attention="sample")
        starts = np.cumsum([0] + lengths[a:b])[:-1]
        mask = torch.cat(eval_set.loss_masks[a:b])
        span = torch.zeros_like(mask)
        for j, i in enumerate(range(a, b)):
            span[starts[j] + eval_set.span_starts[i] : starts[j] + eval_set.span_ends[i]] = True
        # a scored token t is predicted by the logits at t - 1 (t >= 1 inside its unit: masks never hold 0)
        wanted = torch.nonzero(mask | span).reshape(-1)
        inputs = model_inputs(batch, device, labels=False)
        logits = model(**inputs, logits_to_keep=(wanted - 1).to(device)).logits
        logits = logits[0].float()
        targets = batch.input_ids[0].index_select(0, wanted).to(device)
        logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        in_loss = mask.index_select(0, wanted).to(device)
        nll_sum += float(-(logp * in_loss).sum())
        scored += int(in_loss.sum())
        hit = (logits.argmax(-1) == targets).cpu()
        in_span = span.index_select(0, wanted)
        unit_of = torch.repeat_interleave(torch.arange(b - a), torch.tensor(lengths[a:b]))
        misses = torch.zeros(b - a, dtype=torch.int64)
        misses.index_add_(0, unit_of.index_select(0, wanted), (in_span & ~hit).to(torch.int64))
        exact += int((misses == 0).sum())
    model.train(was_training)
    return {
        eval_set.loss_metric: nll_sum / scored,
        eval_set.exact_metric: exact / len(eval_set),
        "num_units": len(eval_set),
        "num_scored_tokens": scored,
    }


def evaluate_all(model, eval_sets, device, *, max_tokens: int) -> dict:
    out = {}
    for s in eval_sets:
        result = evaluate(model, s, device, max_tokens=max_tokens)
        out[s.loss_metric] = result[s.loss_metric]
        out[s.exact_metric] = result[s.exact_metric]
    return out


# ---------------------------------------------------------------------------------------- training


def train_run(
    model,
    prepared: PreparedTask,
    condition: Condition,
    seed: int,
    config: TrainConfig,
    device: torch.device,
    *,
    log=None,
) -> dict:
    """Train ``model`` (fresh, on ``device``) on ``condition``'s batches of ``prepared`` and evaluate it.

    Returns:
        ``{"metrics": final metrics of every eval set, "train_loss": per step, "eval_curve": [(step,
        heldout loss)], "step_tokens": {"mean", "min", "max"}, "step_segments": mean segments per batch,
        "step_groups": mean distinct groups (topics / families) per batch, or None without groups,
        "first_batch": {"num_segments", "num_packs", "num_pieces"}, "wall_s", "tokens_per_s"}``.
    """
    packing = prepared.packing(condition, seed)
    plan = step_packs(packing, seed=seed, epochs=config.epochs, steps=config.steps)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, config.warmup_fraction, config.final_lr_fraction)
    )
    main_eval = prepared.task.eval_sets[0]
    eval_at = {round(config.steps * (k + 1) / config.eval_points) for k in range(config.eval_points)}
    losses, curve, step_tokens, segments, step_groups = [], [], [], [], []
    groups = prepared.task.train_groups
    first_batch = None
    eval_s = 0.0
    start = time.perf_counter()
    for step, packs in enumerate(plan):
        batch = step_batch(prepared, packing, packs, condition.attention)
        if first_batch is None:
            first_batch = {
                "num_segments": batch.num_segments,
                "num_packs": batch.num_packs,
                "num_pieces": batch.num_pieces,
            }
        loss = model(**model_inputs(batch, device), use_cache=False).loss
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{condition.name}, seed {seed}: loss {loss_value} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss_value)
        step_tokens.append(batch.num_tokens)
        segments.append(batch.num_segments)
        if groups is not None:
            step_groups.append(len({groups[i] for i in batch.sample_index.tolist()}))
        if step + 1 in eval_at and step + 1 < config.steps:
            eval_start = time.perf_counter()
            result = evaluate(model, main_eval, device, max_tokens=config.eval_batch_tokens)
            curve.append((step + 1, result[main_eval.loss_metric]))
            eval_s += time.perf_counter() - eval_start
        if log is not None and (step + 1) % max(1, config.steps // 4) == 0:
            log(f"    step {step + 1}/{config.steps} loss {np.mean(losses[-10:]):.4f}")
    train_s = time.perf_counter() - start - eval_s
    metrics = evaluate_all(model, prepared.task.eval_sets, device, max_tokens=config.eval_batch_tokens)
    curve.append((config.steps, metrics[main_eval.loss_metric]))
    return {
        "metrics": metrics,
        "train_loss": losses,
        "eval_curve": curve,
        "step_tokens": {
            "mean": float(np.mean(step_tokens)), "min": min(step_tokens), "max": max(step_tokens)
        },
        "step_segments": float(np.mean(segments)),
        "step_groups": float(np.mean(step_groups)) if step_groups else None,
        "first_batch": first_batch,
        "train_s": train_s,
        "wall_s": time.perf_counter() - start,
        "tokens_per_s": sum(step_tokens) / train_s,
    }
