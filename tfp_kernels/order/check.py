"""Path validator: re-verifies a TFP path step by step, blockwise (the oracle at large N)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks, inputs
from .distance import gemm_distances, prepare
from .policy import check_policy, near_duplicate_groups

# Elements of the (steps x N) blocks the validator works on at once: 64 MB of float64 on the CPU; on a GPU 512 MB,
# since each block reads all N rows once (at N = 10^6, D = 768: 6 GB of float64 per block, so that 500 sampled
# steps in blocks of one step read 3 TB, ~15 min on an H100, and in blocks of 13 steps 0.2 TB).
_BLOCK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}
#: check_path's default ``atol``: this times the largest norm of the (prepared) rows.
DEFAULT_ATOL_FACTOR = 1e-6


@dataclass(frozen=True)
class PathCheck:
    """Outcome of :func:`check_path`; truthy when the path passed.

    Attributes:
        ok: True when the path is a permutation and every checked step follows the TFP rule.
        num_steps_checked: steps verified (steps 1..N-1, or the requested subset).
        num_tolerated: checked steps that differ from the pick in the validator's own arithmetic but
            are explained by distances within the tolerance (floating-point ties).
        first_bad_step: index into ``path`` of the first violation, or None.
        expected: the node the rule picks at ``first_bad_step`` (in the validator's arithmetic), or None.
        got: ``path[first_bad_step]``, or None.
        message: a readable explanation ("ok" when the path passed).
    """

    ok: bool
    num_steps_checked: int
    num_tolerated: int = 0
    first_bad_step: int | None = None
    expected: int | None = None
    got: int | None = None
    message: str = "ok"

    def __bool__(self) -> bool:
        return self.ok

    def raise_if_failed(self) -> None:
        """Raise ``AssertionError`` with :attr:`message` when the path failed."""
        if not self.ok:
            raise AssertionError(self.message)


def _check_permutation(path: torch.Tensor, n: int) -> PathCheck | None:
    if path.numel() != n:
        return PathCheck(False, 0, message=f"path has {path.numel()} entries but embeddings has N = {n} rows")
    out_of_range = (path < 0) | (path >= n)
    if bool(out_of_range.any()):
        s = int(torch.nonzero(out_of_range)[0])
        return PathCheck(False, 0, first_bad_step=s, got=int(path[s]),
                         message=f"path[{s}] = {int(path[s])} is outside [0, N) = [0, {n})")
    counts = torch.bincount(path, minlength=n)
    if bool((counts != 1).any()):
        dup = torch.nonzero(counts > 1).flatten()
        missing = torch.nonzero(counts == 0).flatten()
        node = int(dup[0])
        steps = torch.nonzero(path == node).flatten()
        return PathCheck(
            False, 0, first_bad_step=int(steps[1]), got=node,
            message=(f"path is not a permutation of 0..N-1: node {node} appears at steps "
                     f"{steps.tolist()[:4]}; {dup.numel()} node(s) repeated, {missing.numel()} missing "
                     f"(first missing: {int(missing[0])})"),
        )
    return None


def _explained_by_tolerance(
    d: torch.Tensor, wmin: torch.Tensor, cand: torch.Tensor, chosen: int, t: float,
    max_rejections: int | None, atol: float, rtol: float,
) -> bool:
    """Whether ``chosen`` is what the rule picks for *some* perturbation of the distances within
    ``atol + rtol * |value|`` (so a floating-point tie explains the difference)."""
    n_u = int(cand.sum())
    capped = max_rejections is not None and n_u > max_rejections
    tol_t = atol + rtol * abs(t)
    clearly_valid = cand & (wmin >= t + tol_t)
    dc = float(d[chosen])
    tol_c = atol + rtol * abs(dc)
    others = cand.clone()
    others[chosen] = False
    surely_before = others & (d < dc - tol_c)
    maybe_before = others & (d <= dc + tol_c)
    lo = int(surely_before.sum())
    no_valid_surely_before = not bool((clearly_valid & surely_before).any())
    # (a) chosen is the first valid candidate (and, with the cap, could stand before position M).
    if bool(wmin[chosen] >= t - tol_t) and no_valid_surely_before and (not capped or lo < max_rejections):
        return True
    # (b) no candidate is valid and chosen could be c_0.
    if not capped and not bool(clearly_valid.any()) and lo == 0:
        return True
    # (c) the cap fires and chosen could be c_M, with M candidates ahead of it that may all be invalid.
    if capped and lo <= max_rejections <= int(maybe_before.sum()) and no_valid_surely_before:
        ambiguous_invalid = maybe_before & ~surely_before & ~clearly_valid
        if int(ambiguous_invalid.sum()) >= max_rejections - lo:
            return True
    return False


class _SpreadState:
    """What the ``"spread"`` policy's urgent groups are at each step of a path: the groups of two or more
    near-duplicates (:func:`~tfp_kernels.order.policy.near_duplicate_groups`) and the path positions of their
    members."""

    def __init__(self, group_of: torch.Tensor, counts: torch.Tensor, pos: torch.Tensor):
        self.members = torch.nonzero(counts[group_of] >= 2).flatten()  # (M,) increasing
        _, self.group = torch.unique(group_of[self.members], return_inverse=True)  # (M,) in 0..G-1
        self.num_groups = int(self.group.max()) + 1 if self.members.numel() else 0
        self.member_pos = pos[self.members]

    def urgent(self, s: torch.Tensor, n: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """At the steps ``s`` (B,): ``(m, lowest)`` (B, G) int64, the unvisited members of each group (0 where the
        group is not urgent) and its lowest unvisited member (``n`` where none)."""
        b = s.numel()
        unvisited = self.member_pos[None, :] >= s[:, None]  # (B, M)
        m = torch.zeros(b, self.num_groups, dtype=torch.int64, device=s.device)
        m.index_add_(1, self.group, unvisited.long())
        lowest = torch.full((b, self.num_groups), n, dtype=torch.int64, device=s.device)
        member_or_n = torch.where(unvisited, self.members[None, :], n)
        lowest.scatter_reduce_(1, self.group[None, :].expand(b, -1), member_or_n, reduce="amin")
        urgent = (m >= 2) & (m * (window + 1) >= (n - s)[:, None])
        return torch.where(urgent, m, 0), lowest


def _spread_picks(
    state: _SpreadState | None, s: torch.Tensor, n: int, window: int, valid: torch.Tensor, d_last: torch.Tensor,
    wmin: torch.Tensor, cand: torch.Tensor, paper_pick: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``"spread"`` policy's picks at the steps ``s`` (B,) from the validator's (B, N) tables; also the urgent
    groups' ``(m, lowest)`` (:meth:`_SpreadState.urgent`) for the tolerance check."""
    has_valid = valid.any(dim=1)
    farthest = torch.where(cand, wmin, -torch.inf).argmax(dim=1)  # (the first of equal maxima: the lowest node)
    pick = torch.where(has_valid, paper_pick, farthest)
    if state is None or state.num_groups == 0:
        empty = torch.zeros(s.numel(), 0, dtype=torch.int64, device=s.device)
        return pick, empty, empty
    m, lowest = state.urgent(s, n, window)
    member = lowest.clamp(max=n - 1)
    ok = (m > 0) & valid.gather(1, member)
    best_m = torch.where(ok, m, -1).max(dim=1, keepdim=True).values
    ok &= m == best_m
    d = torch.where(ok, d_last.gather(1, member), torch.inf)
    ok &= d == d.min(dim=1, keepdim=True).values
    urgent_pick = torch.where(ok, lowest, n).min(dim=1).values
    return torch.where(ok.any(dim=1), urgent_pick, pick), m, lowest


def _spread_explained_by_tolerance(
    d: torch.Tensor, wmin: torch.Tensor, cand: torch.Tensor, chosen: int, t: float, m: torch.Tensor,
    lowest: torch.Tensor, atol: float, rtol: float,
) -> bool:
    """Whether ``chosen`` is what the ``"spread"`` policy takes for *some* perturbation of the distances within
    ``atol + rtol * |value|`` (``m``, ``lowest``: (G,) the step's urgent groups, as :meth:`_SpreadState.urgent`)."""
    tol_t = atol + rtol * abs(t)
    clearly_valid = cand & (wmin >= t + tol_t)
    dc = float(d[chosen])
    tol_c = atol + rtol * abs(dc)
    urgent = m > 0
    member = lowest.clamp(max=d.numel() - 1)
    surely = urgent & clearly_valid[member]
    if bool((urgent & (lowest == chosen)).any()) and bool(wmin[chosen] >= t - tol_t):
        mc = int(m[lowest == chosen].max())  # a valid urgent group's member: could it come first?
        if not bool((surely & ((m > mc) | ((m == mc) & (d[member] < dc - tol_c)))).any()):
            return True
    if bool(surely.any()):
        return False
    if bool(wmin[chosen] >= t - tol_t):  # the rule's first valid node
        return not bool((clearly_valid & (d < dc - tol_c)).any())
    if bool(clearly_valid.any()):
        return False
    far = float(torch.where(cand, wmin, -torch.inf).max())  # a forced step: the farthest from the window
    return float(wmin[chosen]) >= far - (atol + rtol * abs(far))


def check_path(
    embeddings: torch.Tensor,
    path: torch.Tensor,
    *,
    threshold: float,
    metric: str = "l2",
    window: int = 4,
    max_rejections: int | None = None,
    atol: float | None = None,
    rtol: float = 1e-6,
    steps: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    policy: str = "paper",
) -> PathCheck:
    """Verify that ``path`` is the TFP order of ``embeddings`` (docs/design.md, 'The rule'), step by step.

    Checks that ``path`` is a permutation of ``0..N-1``, then, for every step ``s >= 1`` (or the
    given ``steps``), recomputes which node the rule takes after ``path[:s]`` and compares it with
    ``path[s]``. A difference is accepted when a perturbation of the distances within
    ``atol + rtol * |value|`` explains it (ties in floating point); such steps are counted in
    :attr:`PathCheck.num_tolerated`. With ``atol = rtol = 0`` every step must match the validator's
    own arithmetic exactly, including the lower-index-first tie-break. The default ``atol`` is relative to the
    rows (``1e-6`` times the largest row norm; for ``"cosine"`` ``1e-6``), so that the check means the same at
    every scale of the embeddings: a wrong path of rows scaled by 1e-7 is refused as it is at scale 1.

    The rows are scaled by a power of two into a safe range first, with ``threshold`` and ``atol``
    (exact; :mod:`~tfp_kernels.order.inputs`); ``window`` and ``max_rejections`` of ``N - 1`` or more are
    checked as ``N - 1`` (the same rule).

    Distances go through a matrix product (``|a|^2 + |b|^2 - 2 a.b``) in ``dtype`` (float64 by
    default), over blocks of steps: memory O(N * block), time O(N^2 * D) for a full check (O(N * D)
    per sampled step). Usable on the CPU up to ~10^5 nodes; pass ``steps`` to check a sample.

    Args:
        embeddings: (N, D), floating dtype, CPU or CUDA, finite.
        path: (N,) integer tensor, the order to verify (moved to the device of ``embeddings``).
        threshold: the threshold ``t`` the path was built with (>= 0).
        metric, window, max_rejections: as in :func:`~tfp_kernels.tfp_order`.
        atol, rtol: tolerance on distances for accepting floating-point ties: ``atol`` in the distance units of
            the embeddings, None (default) for ``1e-6`` times the largest row norm (l2; the largest distance is
            at most twice that) or ``1e-6`` (cosine); ``rtol`` relative to each distance compared.
        steps: optional 1-D integer tensor of step indices in [1, N) to check (default: all).
        dtype: compute dtype of the distances (float64 or float32).
        policy: the rule the path was built with: ``"paper"`` (default) or ``"spread"`` (no cap; each step is
            checked against that policy's pick: an urgent exact-duplicate group's member, the rule's first valid
            node, or at a step with no valid node the node farthest from the window, see
            :func:`~tfp_kernels.tfp_order_reference`).

    Returns:
        A :class:`PathCheck` (truthy when the path passed) naming the first violating step.

    Examples::

        >>> import torch
        >>> from tfp_kernels import check_path
        >>> emb = torch.tensor([[0.0], [0.1], [1.0], [1.1], [5.0]])
        >>> bool(check_path(emb, torch.tensor([0, 2, 4, 1, 3]), threshold=0.5, window=2))
        True
        >>> check_path(emb, torch.tensor([0, 1, 2, 3, 4]), threshold=0.5, window=2).first_bad_step
        1
    """
    metric = _checks.check_metric(metric)
    embeddings = _checks.check_embeddings(embeddings, metric=metric)
    threshold = _checks.check_threshold(threshold)
    if threshold is None:
        raise ValueError("threshold is required: pass the t the path was built with")
    n = embeddings.shape[0]
    window = inputs.check_window(window, n)
    max_rejections = inputs.check_max_rejections(max_rejections, n)
    policy = check_policy(policy, max_rejections)
    atol = None if atol is None else _checks.check_tolerance(atol, "atol")
    rtol = _checks.check_tolerance(rtol, "rtol")
    scaled = inputs.prepare_rows(embeddings, metric)  # detached, scaled by 2**k; threshold and atol scaled alike
    embeddings, user_threshold = scaled.rows, threshold
    threshold, atol = scaled.to_rows_units(threshold), scaled.to_rows_units(atol)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not isinstance(path, torch.Tensor):
        path = torch.as_tensor(path)
    if path.dim() != 1:
        raise ValueError(f"path must be 1-D with shape (N,), got shape {tuple(path.shape)}")
    if path.dtype.is_floating_point or path.dtype.is_complex or path.dtype == torch.bool:
        raise TypeError(f"path must have an integer dtype, got {path.dtype}")
    device = embeddings.device
    path = path.to(device=device, dtype=torch.long)
    bad = _check_permutation(path, n)
    if bad is not None:
        return bad
    steps = _checked_steps(steps, n, device)
    if steps.numel() == 0:
        return PathCheck(True, 0)

    x = prepare(embeddings, metric, dtype)
    sq_norms = x.square().sum(dim=1)
    if atol is None:  # relative to the rows: the gemm distances' cancellation error scales with the norms
        atol = DEFAULT_ATOL_FACTOR * float(sq_norms.max().sqrt())
    pos = torch.empty(n, dtype=torch.long, device=device)
    pos[path] = torch.arange(n, device=device)
    block = max(1, _BLOCK_ELEMENTS.get(device.type, _BLOCK_ELEMENTS["cpu"]) // (n * (window + 1)))
    spread = None
    if policy == "spread":
        found = near_duplicate_groups(embeddings, threshold=threshold, metric=metric)  # (None with t = 0)
        spread = None if found is None else _SpreadState(*found, pos)
        block = max(1, block // 2)  # (room for the urgent groups' (steps x members) tables)
    tolerated = 0
    for b in range(0, steps.numel(), block):
        s = steps[b : b + block]  # (B,)
        d_last, wmin, cand = _window_distances(x, sq_norms, path, pos, s, window, metric)
        valid = cand & (wmin >= threshold)
        pick = _rule_picks(d_last, cand, valid, s, n, max_rejections)
        if policy == "spread":
            pick, urgent_m, urgent_lowest = _spread_picks(spread, s, n, window, valid, d_last, wmin, cand, pick)
        got = path[s]
        mismatch = torch.nonzero(pick != got).flatten().tolist()
        for i in mismatch:
            if policy == "spread":
                explained = _spread_explained_by_tolerance(
                    d_last[i], wmin[i], cand[i], int(got[i]), threshold, urgent_m[i], urgent_lowest[i], atol, rtol)
            else:
                explained = _explained_by_tolerance(
                    d_last[i], wmin[i], cand[i], int(got[i]), threshold, max_rejections, atol, rtol)
            if (atol > 0 or rtol > 0) and explained:
                tolerated += 1
                continue
            rule = (f"threshold {user_threshold:.6g}, window {window}, max_rejections {max_rejections}, "
                    f"policy {policy!r}")
            return _failed_step(b + i + 1, tolerated, int(s[i]), int(pick[i]), int(got[i]), path, d_last[i], wmin[i],
                                rule, scaled.to_user_units)
    return PathCheck(True, int(steps.numel()), tolerated)


def _checked_steps(steps, n: int, device: torch.device) -> torch.Tensor:
    """``check_path``'s ``steps`` (None: all of ``1..N-1``) as a sorted unique int64 tensor on ``device``."""
    if steps is None:
        return torch.arange(1, n, device=device)
    steps = torch.as_tensor(steps, device=device)
    if steps.dim() != 1 or steps.dtype.is_floating_point or steps.dtype == torch.bool:
        raise ValueError("steps must be a 1-D integer tensor of step indices")
    steps = torch.unique(steps.long())  # sorted
    if steps.numel() and (int(steps[0]) < 1 or int(steps[-1]) >= n):
        raise ValueError(f"steps must lie in [1, N) = [1, {n}), got range [{int(steps[0])}, {int(steps[-1])}]")
    return steps


def _window_distances(x, sq_norms, path, pos, s, window: int, metric: str):
    """For the steps ``s`` (B,): ``d_last`` (B, N) distances to the last path node, ``wmin`` (B, N) the minimum
    distance to the window's nodes, ``cand`` (B, N) the nodes not yet on the path (gemm distances of ``x``)."""
    device = x.device
    # back[:, o] = position of the o-th most recent path node before step s (o = 0 is last)
    back = s[:, None] - 1 - torch.arange(window, device=device)[None, :]  # (B, window)
    in_path = back >= 0
    needed, inverse = torch.unique(back.clamp(min=0), return_inverse=True)
    dist = gemm_distances(x, sq_norms, path[needed], metric)  # (R, N)
    d_last = dist[inverse[:, 0]]  # (B, N)
    wmin = d_last.clone()
    for o in range(1, window):
        rows_o = dist[inverse[:, o]]
        wmin = torch.where(in_path[:, o : o + 1], torch.minimum(wmin, rows_o), wmin)
    return d_last, wmin, pos[None, :] >= s[:, None]


def _rule_picks(d_last, cand, valid, s, n: int, max_rejections: int | None) -> torch.Tensor:
    """(B,) the paper's rule's node at the steps ``s``: the nearest valid candidate, ``c_0`` where none is valid,
    or with the cap ``c_M`` where ``M`` candidates precede the first valid one."""
    inf = torch.tensor(torch.inf, dtype=d_last.dtype, device=d_last.device)
    first_valid = torch.where(valid, d_last, inf).argmin(dim=1)
    has_valid = valid.any(dim=1)
    d_cand = torch.where(cand, d_last, inf)
    pick = torch.where(has_valid, first_valid, d_cand.argmin(dim=1))
    if max_rejections is not None:
        node_ids = torch.arange(n, device=d_last.device)
        capped = (n - s) > max_rejections
        dv = d_last.gather(1, first_valid[:, None])
        ahead = cand & ((d_last < dv) | ((d_last == dv) & (node_ids[None, :] < first_valid[:, None])))
        use_cm = capped & (~has_valid | (ahead.sum(dim=1) >= max_rejections))
        if bool(use_cm.any()):
            rows_cm = torch.nonzero(use_cm).flatten()
            order = torch.sort(d_cand[rows_cm], dim=1, stable=True).indices
            pick[rows_cm] = order[:, max_rejections]
    return pick


def _failed_step(checked: int, tolerated: int, step: int, expected: int, chosen: int, path, d_last, wmin, rule: str,
                 user) -> PathCheck:
    """The :class:`PathCheck` of a step whose node is not the rule's (``user``: distances to the user's units)."""
    return PathCheck(
        False, checked, tolerated, step, expected, chosen,
        message=(
            f"step {step}: path takes node {chosen} after node {int(path[step - 1])}, but the TFP rule ({rule}) "
            f"takes node {expected}: D[last, {chosen}] = {user(float(d_last[chosen])):.6g}, "
            f"D[last, {expected}] = {user(float(d_last[expected])):.6g}; min distance to the window: "
            f"{user(float(wmin[chosen])):.6g} for {chosen}, {user(float(wmin[expected])):.6g} for {expected}"
        ),
    )
