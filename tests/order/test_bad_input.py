"""Bad input to the ordering functions: each raises an error naming the argument and the problem."""

import numpy as np
import pytest
import torch

from tfp_kernels import check_path, estimate_threshold, tfp_order, tfp_order_reference

ORDER_FUNCTIONS = [tfp_order, tfp_order_reference]


def nan_at(row):
    emb = torch.randn(6, 3)
    emb[row, 1] = float("nan")
    return emb


@pytest.mark.parametrize("fn", ORDER_FUNCTIONS + [estimate_threshold])
@pytest.mark.parametrize(
    "emb, exc, match",
    [
        (torch.empty(0, 4), ValueError, r"embeddings is empty"),
        (torch.empty(3, 0), ValueError, r"no columns"),
        (torch.randn(5), ValueError, r"must be 2-D"),
        (torch.randn(2, 3, 4), ValueError, r"must be 2-D"),
        (torch.arange(12).reshape(4, 3), TypeError, r"floating dtype"),
        (torch.ones(4, 3, dtype=torch.bool), TypeError, r"floating dtype"),
        (nan_at(4), ValueError, r"NaN or inf.*first bad row: 4"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, r"NaN or inf.*first bad row: 0"),
        ([[1.0, 2.0]], TypeError, r"must be a torch.Tensor"),
    ],
)
def test_bad_embeddings(fn, emb, exc, match):
    with pytest.raises(exc, match=match):
        fn(emb)


@pytest.mark.parametrize("fn", ORDER_FUNCTIONS + [estimate_threshold])
def test_zero_row_with_cosine(fn):
    emb = torch.randn(5, 3)
    emb[2] = 0
    with pytest.raises(ValueError, match=r"all-zero row.*row 2.*cosine"):
        fn(emb, metric="cosine")


@pytest.mark.parametrize("fn", ORDER_FUNCTIONS)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantile": 0.0}, r"quantile must be a number strictly between 0 and 1"),
        ({"quantile": 1.0}, r"quantile must be"),
        ({"quantile": -0.5}, r"quantile must be"),
        ({"quantile": float("nan")}, r"quantile must be"),
        ({"window": 0}, r"window must be an integer >= 1"),
        ({"window": 2.5}, r"window must be an integer"),
        ({"start": 10}, r"start must be an integer in \[0, N\) = \[0, 10\)"),
        ({"start": -1}, r"start must be"),
        ({"max_rejections": -1}, r"max_rejections must be None"),
        ({"threshold": -1.0}, r"threshold must be a finite number >= 0"),
        ({"threshold": float("nan")}, r"threshold must be"),
        ({"metric": "dot"}, r"metric must be one of \('l2', 'cosine'\)"),
    ],
)
def test_bad_options(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(torch.randn(10, 4), **kwargs)


def test_estimate_threshold_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 rows"):
        estimate_threshold(torch.randn(1, 4))
    with pytest.raises(ValueError, match="sample_pairs must be a positive integer"):
        estimate_threshold(torch.randn(4, 4), sample_pairs=0)


def test_numpy_input_is_accepted():
    emb = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    assert torch.equal(tfp_order(emb, threshold=1.0), tfp_order(torch.from_numpy(emb), threshold=1.0))


def test_check_path_bad_arguments():
    emb = torch.randn(5, 3)
    with pytest.raises(ValueError, match="threshold is required"):
        check_path(emb, torch.arange(5), threshold=None)
    with pytest.raises(ValueError, match="path must be 1-D"):
        check_path(emb, torch.arange(5)[None], threshold=1.0)
    with pytest.raises(TypeError, match="path must have an integer dtype"):
        check_path(emb, torch.arange(5.0), threshold=1.0)
    with pytest.raises(ValueError, match="atol must be"):
        check_path(emb, torch.arange(5), threshold=1.0, atol=-1)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_long_lists(value):
    from tfp_kernels import tfp_order

    with pytest.raises(ValueError, match="long_lists must be 'auto', True or False"):
        tfp_order(torch.randn(10, 4), long_lists=value)
