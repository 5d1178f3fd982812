"""The fast engine called as the old keyword form: ``fast_tfp_order(emb, metric=..., ..., kernels=...)`` builds the
:class:`~tfp_kernels.order.options.OrderOptions` (and takes the engine's :class:`~tfp_kernels.order.fast.Kernels`)."""

from tfp_kernels.order.fast import fast_tfp_order as run_engine
from tfp_kernels.order.options import OrderOptions


def fast_tfp_order(emb, kernels=None, **options):
    """The fast engine on ``emb`` with an :class:`OrderOptions` of ``options`` (and ``kernels``)."""
    return run_engine(emb, OrderOptions(**options), kernels)
