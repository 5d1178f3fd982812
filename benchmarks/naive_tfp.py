"""The naive TFP algorithm, run the way the paper's script runs it: the baseline to beat.

Written here from a description of the paper's script (docs/design.md, 'The naive baseline'), not its code:

1. the full N x N distance matrix with ``torch.cdist`` (float32, the matrix-product shortcut);
   cosine as ``1 - E_n @ E_n.T``; the diagonal set to 0 (``i != j`` in the definition);
2. the threshold with ``torch.quantile`` over the flattened matrix's positive entries (each pair
   counted twice, as ``(i, j)`` and ``(j, i)``); ``torch.quantile`` refuses inputs of more than 2^24
   elements, so this step fails a little past N ~ 4096 (about 2 * 0.98 * N^2 / 2 positive entries);
3. the walk as a Python loop: per step, the row of ``last`` with visited nodes masked, an argsort,
   then candidate by candidate a window check with one ``.item()`` (a device sync) each.

Memory is O(N^2). The rule is docs/design.md's 'The rule', with the cap and the ``c_0`` fallback (the
paper's script re-appends node 0 when nothing is valid; that bug is not reproduced, so that the
path is a permutation and comparable with the other implementations).
"""

from __future__ import annotations

import torch


def naive_distance_matrix(embeddings: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """(N, N) float32 distance matrix on the device of ``embeddings``, diagonal 0."""
    e = embeddings.float()
    if metric == "l2":
        dist = torch.cdist(e, e)
    elif metric == "cosine":
        en = torch.nn.functional.normalize(e, dim=1)
        dist = (1.0 - en @ en.T).clamp_(min=0)
    else:
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    dist.fill_diagonal_(0)
    return dist


def naive_threshold(dist: torch.Tensor, quantile: float) -> float:
    """``torch.quantile`` over the flattened positive entries (raises beyond 2^24 of them)."""
    flat = dist.flatten()
    return float(torch.quantile(flat[flat > 0], quantile))


def naive_tfp_order(
    embeddings: torch.Tensor,
    *,
    metric: str = "l2",
    quantile: float = 0.02,
    threshold: float | None = None,
    window: int = 4,
    max_rejections: int | None = 10000,
    start: int = 0,
) -> torch.Tensor:
    """TFP path by the naive algorithm. Returns (N,) int64 on the CPU.

    ``embeddings``: (N, D) floating, CPU or CUDA. Other arguments as in ``tfp_kernels.tfp_order``
    (``max_rejections`` defaults to the paper's 10000 here).
    """
    n = embeddings.shape[0]
    dist = naive_distance_matrix(embeddings, metric)
    t = naive_threshold(dist, quantile) if threshold is None else float(threshold)
    visited = torch.zeros(n, dtype=torch.bool, device=dist.device)
    visited[start] = True
    path = [start]
    while len(path) < n:
        row = dist[path[-1]].clone()
        row[visited] = torch.inf
        order = torch.argsort(row, stable=True)
        remaining = n - len(path)
        recent = torch.tensor(path[-window:], device=dist.device)
        chosen = None
        for k in range(remaining):
            cand = int(order[k].item())
            if max_rejections is not None and k == max_rejections:
                chosen = cand
                break
            if bool((dist[cand, recent] >= t).all().item()):
                chosen = cand
                break
        if chosen is None:
            chosen = int(order[0].item())
        path.append(chosen)
        visited[chosen] = True
    return torch.tensor(path, dtype=torch.long)
