"""Figures and plots of a packing: fill, intra-pack similarity, same-topic pairs; the PNGs of ``tfp-pack``.

Plots are drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas; pyplot and the global backend are
left alone) and saved without time stamps or software version (``metadata={"Software": None}``), so the
same numbers give the same PNG bytes.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

import torch

from .packing import Packing


def _pack_of_samples(packing: Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (pack, sample) pairs of a packing: ``(pack, sample)`` (K,) int64 each, on the CPU."""
    pack = packing.pack_id.cpu()
    sample = packing.sample_index.cpu()
    n = int(sample.max()) + 1 if sample.numel() else 1
    key = torch.unique(pack * n + sample)
    return key // n, key % n


def intra_pack_similarity(packing: Packing, embeddings: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the distinct samples sharing each pack.

    For the ``k`` samples of a pack with unit embeddings ``x_i``: ``sum_{i<j} x_i . x_j / (k (k - 1) / 2)``,
    computed as ``(|sum x|^2 - sum |x|^2) / 2`` per pack in float64 (O(N D), no pairs listed; the sums
    per pack by ``torch.segment_reduce``, the samples being sorted by pack).

    Args:
        packing: a :class:`~tfp_kernels.Packing` whose ``sample_index`` indexes rows of ``embeddings``.
        embeddings: (N, D) floating, any device; rows are L2-normalised here (zero rows stay zero).

    Returns:
        (P,) float64 on the CPU; NaN for packs with fewer than two distinct samples.

    Examples::

        >>> import torch
        >>> from tfp_kernels import pack_lengths
        >>> emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> intra_pack_similarity(pack_lengths([2, 2, 2, 4], 4), emb)   # packs: {0, 1} | {2} | {3}
        tensor([1., nan, nan], dtype=torch.float64)
    """
    return _pack_similarity(packing, _unit_rows(embeddings))


class _UnitRows(NamedTuple):
    """Embeddings as :func:`intra_pack_similarity` reads them (made once for many packings): ``x`` (N, D) float64
    CPU rows L2-normalised (zero rows stay zero), ``sq`` (N,) their squared norms."""

    x: torch.Tensor
    sq: torch.Tensor


def _unit_rows(embeddings: torch.Tensor) -> _UnitRows:
    x = torch.nn.functional.normalize(embeddings.detach().to("cpu", torch.float64), dim=1)
    return _UnitRows(x, x.square().sum(1))


def _pack_similarity(packing: Packing, rows: _UnitRows) -> torch.Tensor:
    """:func:`intra_pack_similarity` of ``packing`` from the rows of :func:`_unit_rows`."""
    pack, sample = _pack_of_samples(packing)  # sorted by pack
    per_pack = torch.bincount(pack, minlength=packing.num_packs)
    sums = torch.segment_reduce(rows.x[sample], "sum", lengths=per_pack, axis=0)
    sq = torch.segment_reduce(rows.sq[sample], "sum", lengths=per_pack)
    k = per_pack.double()
    pairs = k * (k - 1) / 2
    sim = (sums.square().sum(1) - sq) / 2 / pairs
    return torch.where(pairs > 0, sim, torch.full_like(sim, float("nan")))


def same_label_pair_fraction(packing: Packing, labels: torch.Tensor) -> float:
    """Fraction of the within-pack pairs of distinct samples whose ``labels`` (e.g. topics) agree.

    Args:
        labels: (N,) integer tensor, one label per sample.

    Returns:
        a float in [0, 1], or NaN when no pack holds two samples.
    """
    pack, sample = _pack_of_samples(packing)
    lab = labels.cpu().long()[sample]
    nl = int(lab.max()) + 1 if lab.numel() else 1
    per = torch.bincount(pack * nl + lab, minlength=packing.num_packs * nl).double()
    same = (per * (per - 1) / 2).sum()
    k = torch.bincount(pack, minlength=packing.num_packs).double()
    total = (k * (k - 1) / 2).sum()
    return float(same / total) if total > 0 else float("nan")


def _nanmean(x: torch.Tensor) -> float | None:
    x = x[~torch.isnan(x)]
    return round(float(x.mean()), 6) if x.numel() else None


def packing_summary(
    packing: Packing,
    embeddings: torch.Tensor | None = None,
    topics: torch.Tensor | None = None,
    *,
    threshold: float | None = None,
    metric: str = "l2",
) -> dict:
    """Counts and quality figures of a packing, as JSON-ready Python numbers (floats rounded to 6 digits):
    packs, pieces, tokens, fill ratio, over-long counts, mean intra-pack similarity (over packs with
    two or more samples), the near-duplicate pair fraction when ``threshold`` is given too, and the
    same-topic pair fraction when ``topics`` is given.

    Args:
        packing: a :class:`~tfp_kernels.Packing` whose ``sample_index`` indexes rows of ``embeddings``.
        embeddings: (N, D) floating, any device, or None (no similarity figures).
        topics: (N,) integer labels, or None.
        threshold, metric: the TFP threshold ``t`` and its metric: with ``embeddings``, adds
            ``near_duplicate_pair_fraction`` (:func:`near_duplicate_pair_fraction`; None when no pack holds
            two samples) and ``near_duplicate_packs``, the packs that hold a pair closer than ``t``.
    """
    out = {
        "packs": packing.num_packs,
        "pieces": packing.num_pieces,
        "tokens": packing.num_tokens,
        "fill_ratio": round(packing.fill_ratio, 6),
        "split": packing.num_split,
        "truncated": packing.num_truncated,
        "dropped": packing.num_dropped,
    }
    if embeddings is not None:
        out["mean_intra_pack_similarity"] = _nanmean(intra_pack_similarity(packing, embeddings))
        if threshold is not None:
            near = near_duplicate_pairs(packing, embeddings, threshold, metric)
            out["near_duplicate_pair_fraction"] = round(near.close / near.pairs, 6) if near.pairs else None
            out["near_duplicate_packs"] = near.packs
    if topics is not None:
        frac = same_label_pair_fraction(packing, topics)
        out["same_topic_pair_fraction"] = None if math.isnan(frac) else round(frac, 6)
    return out


def write_json(obj, path: str) -> None:
    """``obj`` as indented JSON (key order kept) with a final newline."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------- plots

_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=100, metadata={"Software": None})


def plot_pack_lengths(pack_lengths: torch.Tensor, max_len: int, path: str, title: str) -> None:
    """Histogram of the tokens per pack, with ``max_len`` marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    values = pack_lengths.cpu().double().numpy()
    ax.hist(values, bins=50, range=(0, max_len), color=_COLOURS[0])
    ax.axvline(max_len, color="black", linestyle="--", linewidth=1, label=f"max_len = {max_len}")
    ax.set_xlabel("tokens in the pack")
    ax.set_ylabel("packs")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def plot_fill_ratio(fill: dict[str, dict[str, float]], path: str, title: str) -> None:
    """Grouped bars: fill ratio per strategy (x) for each order (``fill[order][strategy]``)."""
    from matplotlib.figure import Figure

    orders = list(fill)
    strategies = list(next(iter(fill.values())))
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(orders))
    for j, order in enumerate(orders):
        xs = [i + (j - (len(orders) - 1) / 2) * width for i in range(len(strategies))]
        ys = [fill[order][s] for s in strategies]
        bars = ax.bar(xs, ys, width=width, color=_COLOURS[j % len(_COLOURS)], label=f"{order} order")
        for bar, y in zip(bars, ys):
            ax.annotate(
                f"{y:.3f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=7
            )
    ax.set_xticks(range(len(strategies)), strategies)
    low = min(min(v.values()) for v in fill.values())
    ax.set_ylim(max(0.0, low - 0.1), 1.06)
    ax.set_ylabel("fill ratio (tokens / (packs x max_len))")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", ncol=len(orders), fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_similarity(
    per_pack: dict[str, torch.Tensor],
    path: str,
    title: str,
    near_duplicates: dict[str, float | None] | None = None,
) -> list[str]:
    """Overlaid histograms of the per-pack mean pairwise similarity, one per packing, means marked.

    Args:
        per_pack: packing name -> (P,) float64 per-pack similarity (:func:`intra_pack_similarity`, NaN for
            packs of one sample: left out).
        path: the PNG to write.
        title: the plot's title.
        near_duplicates: packing name -> its :func:`near_duplicate_pair_fraction` (None: no pairs), shown in
            the legend as the share of same-pack pairs closer than t; None: not shown.

    Returns:
        the legend's labels, one per packing, in the order of ``per_pack``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    values = {k: v[~torch.isnan(v)].numpy() for k, v in per_pack.items()}
    nonempty = [v for v in values.values() if v.size]
    lo = min(float(v.min()) for v in nonempty) if nonempty else 0.0
    hi = max(float(v.max()) for v in nonempty) if nonempty else 1.0
    if hi <= lo:
        hi = lo + 1e-6
    labels = []
    for j, (name, v) in enumerate(values.items()):
        colour = _COLOURS[j % len(_COLOURS)]
        mean = float(v.mean()) if v.size else float("nan")
        label = f"{name}: mean {mean:.3f}"
        if near_duplicates is not None:
            near = near_duplicates.get(name)
            label += ", pairs closer than t: " + ("no pairs" if near is None else f"{100 * near:.1f}%")
        labels.append(label)
        ax.hist(v, bins=40, range=(lo, hi), histtype="step", linewidth=1.6, color=colour, label=label)
        if v.size:
            ax.axvline(mean, color=colour, linestyle="--", linewidth=1)
    ax.set_xlabel("mean pairwise cosine similarity of the samples in a pack")
    ax.set_ylabel("packs")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return labels


class NearDuplicatePairs(NamedTuple):
    """What :func:`near_duplicate_pairs` counts: ``close`` pairs of ``pairs`` (the within-pack pairs of
    distinct samples), and the ``packs`` holding at least one close pair."""

    close: int
    pairs: int
    packs: int


def near_duplicate_pair_fraction(packing: Packing, embeddings: torch.Tensor, threshold: float,
                                 metric: str = "l2") -> float:
    """Fraction of the within-pack pairs of distinct samples that lie closer than ``threshold``: the
    near-duplicates that TFP is meant to keep apart, put into one pack anyway.

    Exact float64 distances (the TFP reference's), of the pairs within each pack only (no N x N matrix):
    ``sum_p k_p (k_p - 1) / 2`` pairs for packs of ``k_p`` distinct samples, in blocks.

    Args:
        packing: a :class:`~tfp_kernels.Packing` whose ``sample_index`` indexes rows of ``embeddings``.
        embeddings: (N, D) floating, any device (the distances are computed there).
        threshold: the TFP threshold ``t`` (e.g. ``OrderStats.threshold``), in units of ``metric``.
        metric: ``"l2"`` or ``"cosine"`` (``1 - cos``), as the order used.

    Returns:
        a float in [0, 1], or NaN when no pack holds two samples.

    Examples::

        >>> import torch
        >>> from tfp_kernels import pack_lengths
        >>> emb = torch.tensor([[0.0], [0.1], [5.0], [9.0]])
        >>> near_duplicate_pair_fraction(pack_lengths([2, 2, 2, 2], 6), emb, 0.5)  # packs {0, 1, 2} | {3}
        0.3333333333333333
    """
    counts = near_duplicate_pairs(packing, embeddings, threshold, metric)
    return counts.close / counts.pairs if counts.pairs else float("nan")


def near_duplicate_pairs(packing: Packing, embeddings: torch.Tensor, threshold: float,
                         metric: str = "l2") -> NearDuplicatePairs:
    """The within-pack pairs of distinct samples closer than ``threshold``, and the packs holding one.

    Arguments and distances as :func:`near_duplicate_pair_fraction` (which is ``close / pairs``).

    Returns:
        :class:`NearDuplicatePairs` ``(close, pairs, packs)`` of Python ints.

    Examples::

        >>> import torch
        >>> from tfp_kernels import pack_lengths
        >>> emb = torch.tensor([[0.0], [0.1], [5.0], [9.0], [9.2]])
        >>> near_duplicate_pairs(pack_lengths([2, 2, 2, 2, 2], 6), emb, 0.5)  # packs {0, 1, 2} | {3, 4}
        NearDuplicatePairs(close=2, pairs=4, packs=2)
    """
    from .order import _checks
    from .order.policy import exact_pair_distances

    metric = _checks.check_metric(metric)
    threshold = _checks.check_threshold(threshold)
    if threshold is None:
        raise ValueError("threshold is required: pass the t the order was built with")
    embeddings = _checks.check_embeddings(embeddings.detach(), metric=metric)
    pack, sample = _pack_of_samples(packing)  # sorted by pack, then sample
    if sample.numel() and int(sample.max()) >= embeddings.shape[0]:
        raise ValueError(f"the packing holds sample {int(sample.max())} but embeddings has {embeddings.shape[0]} rows")
    segment_end = torch.cumsum(torch.bincount(pack, minlength=packing.num_packs), 0)[pack]
    later = segment_end - torch.arange(sample.numel()) - 1  # the pairs (a, b > a) of each sample in its pack
    total = int(later.sum())
    if total == 0:
        return NearDuplicatePairs(0, 0, 0)
    close = 0
    close_pack = torch.zeros(packing.num_packs, dtype=torch.bool)
    chunk = max(1, (1 << 22) // max(1, int(later.max())))  # samples per round: at most ~4M pairs
    for a0 in range(0, sample.numel(), chunk):
        counts = later[a0 : a0 + chunk]
        first = torch.repeat_interleave(torch.arange(a0, a0 + counts.numel()), counts)
        starts = torch.cumsum(counts, 0) - counts
        second = first + 1 + torch.arange(first.numel()) - torch.repeat_interleave(starts, counts)
        d = exact_pair_distances(embeddings, sample[first].to(embeddings.device),
                                 sample[second].to(embeddings.device), metric)
        is_close = (d < threshold).cpu()
        close += int(is_close.sum())
        close_pack[pack[first[is_close]]] = True
    return NearDuplicatePairs(close, total, int(close_pack.sum()))


# ------------------------------------------------------------------------ fill against intra-pack similarity

# Strategies of the trade-off plot: a name, or (name, window) for the strategies with a window.
TRADE_OFF_STRATEGIES = (
    "next_fit",
    ("fill_in_order", 16),
    ("fill_in_order", 128),
    ("fill_in_order", 1024),
    ("window_best_fit", 32),
    ("window_best_fit", 128),
    ("window_best_fit", 1024),
    "bfd",
)


def fill_similarity_points(
    lengths: torch.Tensor,
    embeddings: torch.Tensor,
    max_len: int,
    orders: dict[str, torch.Tensor],
    strategies=TRADE_OFF_STRATEGIES,
    *,
    overlong: str = "split",
    use_embeddings: bool = True,
    min_distance: float | None = None,
    metric: str = "l2",
) -> list[dict]:
    """Fill ratio and mean intra-pack similarity of every (order, strategy) pair (the points of
    :func:`plot_fill_vs_similarity`).

    For each order, the samples are packed in that order (``pack_lengths(lengths[order], ...)``); the
    similarity is :func:`intra_pack_similarity` of the packs, averaged over the packs of two or more
    samples.
    ``"fill_in_order"`` gets the embeddings (its similarity-aware top-up) and ``min_distance``/``metric``,
    unless ``use_embeddings=False`` (its length-only top-up).

    Args:
        lengths: (N,) integer tensor, the token count of each sample (in sample order), any device.
        embeddings: (N, D) floating tensor, one row per sample, any device.
        max_len: capacity of a pack in tokens.
        orders: name -> (N,) int64 permutation of the samples, e.g. ``{"tfp": path, "random": perm}``.
        strategies: strategy names, or ``(name, window)`` pairs for ``"window_best_fit"`` and
            ``"fill_in_order"`` (a bare name uses the default window).
        overlong: passed to :func:`~tfp_kernels.packing.pack_lengths`.
        use_embeddings, min_distance, metric: what ``"fill_in_order"`` gets (see above).

    Returns:
        One dict per (order, strategy), orders outer: ``order``, ``strategy``, ``window`` (None for a
        bare name), ``packs``, ``fill_ratio`` and ``mean_intra_pack_similarity`` (None when no pack holds
        two samples), floats rounded to 6 digits.

    Examples::

        >>> import torch
        >>> emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> points = fill_similarity_points(
        ...     torch.tensor([2, 2, 2, 4]), emb, 4, {"given": torch.arange(4)}, ["next_fit"])
        >>> points[0]["packs"], points[0]["fill_ratio"], points[0]["mean_intra_pack_similarity"]
        (3, 0.833333, 1.0)
    """
    import dataclasses

    from .packing import pack_lengths

    lengths = torch.as_tensor(lengths).cpu()
    rows = _unit_rows(embeddings)
    points = []
    for order_name, order in orders.items():
        order = torch.as_tensor(order, dtype=torch.int64).cpu()
        n = lengths.numel()
        if order.shape != lengths.shape or not torch.equal(order.sort().values, torch.arange(n)):
            raise ValueError(f"orders[{order_name!r}] must be a permutation of the {n} samples")
        for spec in strategies:
            name, window = (spec, None) if isinstance(spec, str) else spec
            options = {} if window is None else {"window": window}
            if name == "fill_in_order" and use_embeddings:
                options.update(embeddings=embeddings[order.to(embeddings.device)], metric=metric)
                if min_distance is not None:
                    options["min_distance"] = min_distance
            packing = pack_lengths(lengths[order], max_len, strategy=name, overlong=overlong, **options)
            packing = dataclasses.replace(packing, sample_index=order[packing.sample_index])
            points.append(
                {
                    "order": order_name,
                    "strategy": name,
                    "window": window,
                    "packs": packing.num_packs,
                    "fill_ratio": round(packing.fill_ratio, 6),
                    "mean_intra_pack_similarity": _nanmean(_pack_similarity(packing, rows)),
                }
            )
    return points


_MARKERS = ("o", "s", "^", "D", "v")


def plot_fill_vs_similarity(points: list[dict], path: str, title: str) -> None:
    """Scatter of mean intra-pack similarity (y) against fill ratio (x), one point per (order, strategy,
    window) of :func:`fill_similarity_points`: a colour per strategy, a marker per order, the windows of
    a strategy joined by a line and labelled ``W=...``, next fit's similarity in each order as a dotted
    level. Up and right is better: full packs of related samples.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    strategies = list(dict.fromkeys(p["strategy"] for p in points))
    orders = list(dict.fromkeys(p["order"] for p in points))
    colour = {s: _COLOURS[i] if i < len(_COLOURS) else f"C{i}" for i, s in enumerate(strategies)}
    marker = {o: _MARKERS[i % len(_MARKERS)] for i, o in enumerate(orders)}
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for order in orders:
        for strategy in strategies:
            group = [
                p
                for p in points
                if p["order"] == order
                and p["strategy"] == strategy
                and p["mean_intra_pack_similarity"] is not None
            ]
            if not group:
                continue
            group.sort(key=lambda p: (p["window"] is not None, p["window"] or 0))
            xs = [p["fill_ratio"] for p in group]
            ys = [p["mean_intra_pack_similarity"] for p in group]
            line = "-" if len(group) > 1 else ""
            ax.plot(xs, ys, color=colour[strategy], marker=marker[order], linestyle=line)
            if strategy == "next_fit":  # the similarity to keep: a dotted level across the plot
                ax.axhline(ys[0], color=colour[strategy], linestyle=":", linewidth=0.8)
            for p in group:
                if p["window"] is not None:
                    ax.annotate(
                        f"W={p['window']}",
                        (p["fill_ratio"], p["mean_intra_pack_similarity"]),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=colour[strategy],
                    )
    handles = [Line2D([], [], color=colour[s], linewidth=2, label=s) for s in strategies]
    handles += [
        Line2D([], [], color="grey", marker=marker[o], linestyle="", label=f"{o} order") for o in orders
    ]
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_xlabel("fill ratio (tokens / (packs x max_len))")
    ax.set_ylabel("mean intra-pack similarity (cosine)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, linewidth=0.3)
    fig.tight_layout()
    _save(fig, path)
