"""Where rows and counts enter the ordering: the rows scaled by a power of two, ``window`` and ``max_rejections``
checked and capped.

Every public ordering function (:func:`~tfp_kernels.tfp_order`, :func:`~tfp_kernels.tfp_order_reference`,
:func:`~tfp_kernels.estimate_threshold`, :func:`~tfp_kernels.check_path`, the sharded
:func:`~tfp_kernels.distributed.tfp_order_sharded`, :func:`~tfp_kernels.order.policy.count_forced_steps`) calls
these right after its argument checks, before any product or allocation; the engines below them only ever see
scaled rows and capped counts (``pack_gpu`` and ``order_dataset`` go through :func:`~tfp_kernels.tfp_order`).
A new entry point must do the same: ``prepare_rows``, then every distance it is given (a threshold, a
tolerance) through :meth:`ScaledRows.to_rows_units` and every distance it returns through
:meth:`ScaledRows.to_user_units`.

**Why scale.** The fast paths multiply float32 (or float16 / bfloat16) copies of the rows and bound the
rounding error of those products relative to the squared row norms. That bound does not hold where the
products leave the normal range: rows around 1e-40 are float32 subnormals (the band lists then saw numbers
with a few significant bits and picked wrong nodes), squared norms above ~3e38 overflow float32 (rows around
1e19), float64 rows at 1e-300 have squared distances that underflow to 0 even in float64 (threshold 0, the
identity order) and float64 rows at 1e40 overflow the float32 copies. :func:`prepare_rows` multiplies the rows
by ``2**k``, the power of two that puts their largest absolute entry in ``[0.5, 1)``, whenever that entry lies
outside ``[2**-SAFE_EXPONENT, 2**SAFE_EXPONENT]``; inside it (every ordinary embedding) the rows are used as
given, without a copy.

**Why it is exact.** A product by a power of two only changes the exponent of each entry, so it is exact (no
rounding at all) unless a result leaves the range of the dtype. Scaling up (``k > 0``) happens only when the
largest entry is below ``2**-SAFE_EXPONENT`` and stops at ``[0.5, 1)``, so nothing overflows; it is done in
steps of at most ``2**(maxexp - 1)``, each exact (subnormal inputs included: they have no more significant bits
than the normal numbers they become). Scaling down (``k < 0``) is one product by ``2**k`` (representable in
the dtype, subnormal at worst); entries that become subnormal lose low bits, once, by the rounding of the
exact value ``E * 2**k``. Hence, for rows ``E`` and ``E * 2**j`` whose entries are all representable (exact),
the exponents are ``k`` and ``k - j`` and the scaled rows are *the same tensor* bit for bit: every distance,
threshold and path computed from them is identical. The distances the walk compares (l2) are those of the
given rows times ``2**k`` exactly in exact arithmetic, and the float64 differences the reference and the
walk's certificates use (``sqrt(sum((a - b)**2))``) scale exactly too as long as they stay normal, which is
what the scaling ensures; so a given threshold ``t`` is compared as ``t * 2**k``
(:meth:`ScaledRows.to_rows_units`, also exact) and a threshold computed on the scaled rows is returned as
``t_scaled * 2**-k`` (:meth:`ScaledRows.to_user_units`; exact unless it is itself subnormal in float64).
The cosine distance does not depend on the scale of the rows (its exponent is 0), but its rows are scaled
the same way, so that the normalisation of float64 rows at 1e-300 does not divide by an underflowed norm.
Subnormal inputs therefore give the path of the exact reference on the same (exactly scaled) rows. The
rows' exact-duplicate groups are kept (an exact scaling maps equal rows to equal rows and distinct rows to
distinct ones).

What is not covered: rows whose magnitudes differ among themselves by hundreds of binary orders (e.g. one
row at 1 and another at 1e-300 in float64) keep that range; for ``metric="cosine"`` such a row is refused
(its norm would underflow), for l2 its distances are those of the scaled float64 rows. Denormal flushing
(``torch.set_flush_denormal(True)``) breaks the exactness of subnormal inputs, as any arithmetic on them.

**Counts.** ``window >= N - 1`` gives the path of ``window = N - 1`` (the window never holds more than the
``N - 1`` nodes before the last step), and ``max_rejections >= N - 1`` never fires (a step has at most
``N - 1`` candidates, and the cap fires only with more than ``max_rejections``): both are capped there, so a
huge value neither allocates a (window x N) table nor reaches the C++ walk as an out-of-range integer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _checks

#: Rows whose largest absolute entry lies in ``[2**-SAFE_EXPONENT, 2**SAFE_EXPONENT]`` are used as given: their
#: float32 products neither overflow (squared norms <= D * 2**40) nor lose the error bound to subnormals.
SAFE_EXPONENT = 20
#: A threshold scaled beyond this (rows scaled, metric l2) is clamped to it: the scaled rows' entries are below 1,
#: so every distance is below ``2 sqrt(D) < 2**40`` and any larger threshold gives the same path (nothing valid).
THRESHOLD_CAP = 2.0**40
#: Cosine rows whose largest entry is below this after the scaling would have an underflowing float64 norm.
_COSINE_ROW_FLOOR = 2.0**-480


@dataclass(frozen=True)
class ScaledRows:
    """Rows as the ordering engines see them: ``rows = embeddings * 2**exponent``, detached.

    Attributes:
        rows: (N, D) same dtype and device as the embeddings (the embeddings themselves when ``exponent`` is 0,
            detached from autograd).
        exponent: the power of two ``k`` the rows were multiplied by.
        metric: ``"l2"`` (distances scale by ``2**k``) or ``"cosine"`` (distances do not scale).
    """

    rows: torch.Tensor
    exponent: int
    metric: str

    @property
    def distance_exponent(self) -> int:
        """The distances of :attr:`rows` are those of the embeddings times ``2**distance_exponent``."""
        return self.exponent if self.metric == "l2" else 0

    def to_rows_units(self, distance: float | None) -> float | None:
        """A distance (a threshold, a tolerance) of the embeddings in the units of :attr:`rows` (None stays None).

        Exact (a power of two) unless it leaves the float64 range: above :data:`THRESHOLD_CAP` it is clamped
        there (larger than every distance of the scaled rows either way), and a positive value that would
        underflow to 0 becomes the smallest positive float (below every positive distance either way, unlike 0).
        """
        e = self.distance_exponent
        if distance is None or e == 0 or distance == 0:
            return distance
        try:
            scaled = math.ldexp(distance, e)
        except OverflowError:
            scaled = math.inf
        if scaled > THRESHOLD_CAP:
            return THRESHOLD_CAP
        return scaled if scaled > 0 else math.ulp(0.0)

    def to_user_units(self, distance: float) -> float:
        """A distance of :attr:`rows` in the units of the embeddings (exact unless subnormal; inf past float64)."""
        e = self.distance_exponent
        if e == 0 or distance == 0:
            return distance
        try:
            return math.ldexp(distance, -e)
        except OverflowError:
            return math.inf


def largest_magnitude(embeddings: torch.Tensor) -> float:
    """The largest absolute entry of ``embeddings`` (any shape, floating, any device; 0.0 when empty), exactly."""
    if embeddings.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(embeddings.detach())
    return float(torch.maximum(-lo, hi))  # (one host sync)


def scale_exponent(largest: float) -> int:
    """The ``k`` of :func:`prepare_rows` for rows whose largest absolute entry is ``largest``: 0 when it is 0 or
    lies in ``[2**-SAFE_EXPONENT, 2**SAFE_EXPONENT]``, else the ``k`` with ``largest * 2**k`` in ``[0.5, 1)``."""
    if largest == 0.0 or 2.0**-SAFE_EXPONENT <= largest <= 2.0**SAFE_EXPONENT:
        return 0
    return -math.frexp(largest)[1]


def scale_rows(rows: torch.Tensor, exponent: int) -> torch.Tensor:
    """``rows * 2**exponent`` as a new tensor of the same dtype (``rows`` itself when ``exponent`` is 0).

    ``exponent > 0`` must not overflow (true for :func:`scale_exponent`'s): steps of at most
    ``2**(maxexp - 1)`` of the dtype, each exact. ``exponent < 0``: one product by ``2**exponent``, which must be
    representable in the dtype (the largest entry is below ``2**maxexp``, so ``exponent >= -maxexp``).
    """
    if exponent == 0:
        return rows
    if exponent < 0:
        return rows * math.ldexp(1.0, exponent)
    step_limit = math.frexp(torch.finfo(rows.dtype).max)[1] - 1  # 2**step_limit: the largest normal power of two
    while exponent > 0:
        step = min(exponent, step_limit)
        rows = rows * math.ldexp(1.0, step)
        exponent -= step
    return rows


def prepare_rows(embeddings: torch.Tensor, metric: str, *, largest: float | None = None) -> ScaledRows:
    """Checked embeddings as the ordering engines take them: detached and scaled by a power of two.

    Args:
        embeddings: (N, D) checked embeddings (:func:`~tfp_kernels.order._checks.check_embeddings`), floating,
            any device; ``requires_grad`` allowed (the order needs no gradient: the rows are detached).
        metric: ``"l2"`` or ``"cosine"`` (checked).
        largest: the largest absolute entry to scale by (the sharded path passes the maximum over every
            rank's rows, so that all ranks scale alike); None: that of ``embeddings``.

    Returns:
        :class:`ScaledRows`; see the module docstring for the exponent and why the scaling is exact.

    Raises:
        ValueError: ``metric="cosine"`` and a row so much smaller than the largest that its float64 norm would
            underflow (the rows span more than ~480 binary orders of magnitude).
    """
    rows = embeddings.detach()
    exponent = scale_exponent(largest_magnitude(rows) if largest is None else largest)
    rows = scale_rows(rows, exponent)
    if metric == "cosine" and rows.dtype == torch.float64 and rows.shape[0] and rows.shape[1]:
        lo, hi = torch.aminmax(rows, dim=1)
        row_largest = torch.maximum(-lo, hi)
        tiny = row_largest < _COSINE_ROW_FLOOR * float(row_largest.max())
        if bool(tiny.any()):
            first = int(torch.nonzero(tiny)[0])
            raise ValueError(
                f"embeddings row {first} is more than 2**480 times smaller than the largest row ({int(tiny.sum())} "
                "such row(s)); its float64 norm would underflow and its cosine distance is undefined in float64: "
                "normalise the rows before ordering them"
            )
    return ScaledRows(rows, exponent, metric)


def check_window(window, n: int) -> int:
    """``window`` checked (an int >= 1, numpy ints accepted, bool refused) and capped at ``max(1, n - 1)``.

    ``n``: the number of rows N. A window of N - 1 or more gives the same path as N - 1.
    """
    return min(_checks.check_window(window), max(1, n - 1))


def check_max_rejections(max_rejections, n: int) -> int | None:
    """``max_rejections`` checked (None, or an int >= 0; numpy ints accepted, bool refused) and capped at
    ``max(0, n - 1)``: a cap of N - 1 or more never fires, the same path as without a cap (the policy checks
    still see a cap: ``policy="spread"`` refuses any)."""
    max_rejections = _checks.check_max_rejections(max_rejections)
    return None if max_rejections is None else min(max_rejections, max(0, n - 1))
