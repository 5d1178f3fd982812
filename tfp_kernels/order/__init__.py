"""Ordering layer: the TFP threshold, the TFP path (reference and public API) and its validator."""

from .api import OrderStats, tfp_order
from .options import EngineSettings
from .check import PathCheck, check_path
from .reference import tfp_order_reference
from .threshold import ThresholdEstimate, estimate_threshold, threshold_estimate

__all__ = [
    "EngineSettings",
    "OrderStats",
    "PathCheck",
    "ThresholdEstimate",
    "check_path",
    "estimate_threshold",
    "tfp_order",
    "tfp_order_reference",
    "threshold_estimate",
]
