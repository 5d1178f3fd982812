"""The engine's options (tfp_kernels/order/options.py): checked once, frozen, passed in (no module globals)."""

import dataclasses

import pytest
import torch

from tfp_kernels import has_extension, tfp_order
from tfp_kernels.order import EngineSettings
from tfp_kernels.order.options import DEFAULT_SETTINGS, OrderOptions, check_settings


def test_settings_are_checked_and_frozen():
    assert check_settings(None) is DEFAULT_SETTINGS
    with pytest.raises(TypeError, match="settings must be a tfp_kernels.order.EngineSettings"):
        check_settings({"auto_k_base": 8})
    with pytest.raises(ValueError, match="band_schedule must be one of"):
        EngineSettings(band_schedule="columns")
    for name, bad in (("auto_k_base", 0), ("min_rebuild_nodes", -1), ("long_list_room", 2.5),
                      ("close_set_budget", float("nan")), ("close_set_budget", float("inf")), ("auto_k_max", True)):
        with pytest.raises(ValueError, match=f"EngineSettings.{name} must be"):
            EngineSettings(**{name: bad})
    assert EngineSettings(close_set_budget=0.5).close_set_budget == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_SETTINGS.auto_k_base = 8


def test_order_options_are_checked():
    OrderOptions(metric="l2", threshold=1.0, window=4)
    for field, bad, what in (("k", 0, "k must be"), ("long_lists", "yes", "long_lists must be"),
                             ("fallback", "gpu", "fallback must be"), ("rebuild", "always", "rebuild must be"),
                             ("band_backend", "cuda", "band backend must be")):
        with pytest.raises(ValueError, match=what):
            OrderOptions(metric="l2", threshold=1.0, window=4, **{field: bad})
    with pytest.raises(TypeError, match="settings must be an EngineSettings"):
        OrderOptions(metric="l2", threshold=1.0, window=4, settings={})


@pytest.mark.skipif(not has_extension(), reason="the fast engine needs tfp_kernels._C")
def test_settings_apply_to_one_call_only():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(400, 12, generator=g)
    _, base = tfp_order(emb, return_stats=True)
    path, raised = tfp_order(emb, return_stats=True,
                             settings=EngineSettings(auto_k_min_rows=1, auto_k_base=8, auto_k_max=8))
    _, again = tfp_order(emb, return_stats=True)
    assert base.k == again.k == 64 and raised.k == 8  # (nothing left behind by the call with other settings)
    assert torch.equal(path, tfp_order(emb))  # and the same path
    with pytest.raises(TypeError, match="settings must be"):
        tfp_order(emb, settings="fast")
