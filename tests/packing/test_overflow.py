"""Token totals past int64: ``pack_lengths`` refuses lengths whose packed total overflows int64 (the pack offsets
wrapped to negative values) and packs totals up to ``2**63 - 1`` exactly."""

import numpy as np
import pytest
import torch

from tfp_kernels import pack_lengths
from tfp_kernels.packing import STRATEGIES

INT64_MAX = 2**63 - 1


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize(
    "lengths, max_len, overlong",
    [
        ([2**62, 2**62, 2**62], 2**62, "error"),  # (was: pack_offsets [0, 2**62, -2**63, -2**62])
        ([2**62, 2**62], 2**62, "error"),  # exactly 2**63
        ([INT64_MAX, 1], INT64_MAX, "error"),
        ([2**62, 5, 2**62, 2**62], 2**61, "split"),
        ([3] + [2**59] * 16, 2**60, "error"),
    ],
)
def test_totals_past_int64_are_refused(strategy, lengths, max_len, overlong):
    assert sum(lengths) > INT64_MAX
    for as_input in (list, np.array, torch.tensor):
        with pytest.raises(ValueError, match=r"tokens in all, more than int64 can count"):
            pack_lengths(as_input(lengths), max_len, strategy=strategy, overlong=overlong)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_totals_up_to_int64_max_are_packed(strategy):
    packing = pack_lengths([2**62, 2**62 - 1], INT64_MAX, strategy=strategy)
    assert packing.pack_offsets.tolist() == [0, INT64_MAX]
    packing = pack_lengths([2**62 - 7, 7, 2**62 - 1], 2**62, strategy=strategy)
    assert bool((packing.pack_offsets.diff() > 0).all()) and int(packing.pack_offsets[-1]) == INT64_MAX
    assert sorted(packing.sample_index.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_huge_lengths_cut_or_dropped_to_a_small_total(strategy):
    """``truncate`` and ``drop`` leave a total that fits: not refused."""
    lengths = torch.tensor([2**62, 3, 2**62, 2**62, 4])
    truncated = pack_lengths(lengths, 10, strategy=strategy, overlong="truncate")
    assert int(truncated.pack_offsets[-1]) == 37 and truncated.num_truncated == 3
    dropped = pack_lengths(lengths, 10, strategy=strategy, overlong="drop")
    assert int(dropped.pack_offsets[-1]) == 7 and dropped.dropped_index.tolist() == [0, 2, 3]


def test_check_counts_the_high_bits_of_every_length():
    """Totals just below and above 2**63 - 1 from many lengths with both 32-bit halves set (a wrapped int64
    sum, or a float64 one, would misplace the boundary)."""
    g = np.random.default_rng(0)
    lengths = g.integers(2**40, 2**41, size=999, dtype=np.int64)
    lengths = lengths * (2**62 // int(lengths.sum()))  # total < 2**62, every entry with high and low bits
    top_up = INT64_MAX - int(lengths.sum())
    fits = np.append(lengths, [top_up // 2, top_up - top_up // 2])
    assert int(sum(int(v) for v in fits)) == INT64_MAX
    assert int(pack_lengths(fits, 2**62).pack_offsets[-1]) == INT64_MAX
    over = fits.copy()
    over[-1] += 1
    with pytest.raises(ValueError, match=r"9223372036854775808 tokens in all"):
        pack_lengths(over, 2**62)
