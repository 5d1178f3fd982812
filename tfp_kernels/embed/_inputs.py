"""Reading the token containers of the embedders into one flat buffer with per-token sample ids.

The containers are those of :func:`tfp_kernels.assembly.assemble`: a list of N 1-D integer tensors,
``Jagged(values, offsets)``, ``Padded(tokens, lengths)`` or a plain 2-tuple of tensors (``Jagged`` when the
first is 1-D, ``Padded`` when it is 2-D). Nothing here loops over the samples in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..assembly.api import _check_device, _check_integer, _to_device, _uniform_1d_integer
from ..assembly.types import Jagged, Padded, as_token_container


class FlatTokens(NamedTuple):
    """N samples as one flat buffer.

    values: (T,) integer tensor (the caller's dtype), on ``device``.
    segment: (T,) int64, same device: the sample of each token, in ``[0, N)`` (also for unused tokens).
    room: (T,) int64, same device: tokens left in the token's sample from this one on (1 for the last
        token of a sample); ``<= 0`` for tokens that belong to no sample (padding, or outside the offsets).
    num_samples: N.
    all_used: whether every token of ``values`` belongs to a sample (no padding, nothing outside).
    device_offsets: (N + 1,) int64 offsets that live on the device and are not checked yet, else None.
    device_lengths: (B,) int64 lengths of a ``Padded`` that live on the device, not checked yet, else None.
    """

    values: torch.Tensor
    segment: torch.Tensor
    room: torch.Tensor
    num_samples: int
    all_used: bool
    device_offsets: torch.Tensor | None = None
    device_lengths: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.values.device


def _empty_error(who: str) -> ValueError:
    return ValueError(f"tokens is empty: {who} needs at least one sample (N = 0)")


def _segments(lengths: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples of the CPU int64 ``lengths`` (N,) back to back: the (T,) int64 sample of each token, its room
    (tokens left in its sample) and the (N,) lengths, all on ``device`` (no host sync)."""
    n, total = lengths.numel(), int(lengths.sum())
    ends = _to_device(torch.cumsum(lengths, 0), device)
    lengths_dev = _to_device(lengths, device)
    segment = torch.repeat_interleave(
        torch.arange(n, dtype=torch.int64, device=device), lengths_dev, output_size=total
    )
    room = ends.index_select(0, segment).sub_(torch.arange(total, dtype=torch.int64, device=device))
    return segment, room, lengths_dev


def _from_host_lengths(values: torch.Tensor, lengths: torch.Tensor) -> FlatTokens:
    """``values`` (T,) exactly covered by samples of the CPU int64 ``lengths`` (N,), back to back."""
    segment, room, _ = _segments(lengths, values.device)
    return FlatTokens(values, segment, room, lengths.numel(), True)


def read_list(tokens: Sequence[torch.Tensor], who: str) -> FlatTokens:
    n = len(tokens)
    if n == 0:
        raise _empty_error(who)
    if not _uniform_1d_integer(tokens):  # find the first bad sample and say what is wrong with it
        first = _check_integer(tokens[0], "tokens[0]", 1)
        for i, sample in enumerate(tokens):
            _check_integer(sample, f"tokens[{i}]", 1)
            _check_device(sample, f"tokens[{i}]", first.device, "tokens[0]")
    lengths = torch.tensor([sample.numel() for sample in tokens], dtype=torch.int64)
    values = torch.cat(list(tokens)) if n > 1 else tokens[0]  # mixed integer dtypes are promoted
    return _from_host_lengths(values, lengths)


def read_jagged(values, offsets, who: str) -> FlatTokens:
    values = _check_integer(values, "tokens.values", 1)
    offsets = _check_integer(offsets, "tokens.offsets", 1)
    _check_device(offsets, "tokens.offsets", values.device, "tokens.values", cpu_ok=True)
    if offsets.numel() < 2:
        raise _empty_error(who)
    if offsets.device.type == "cpu":
        host = offsets.to(torch.int64)
        lengths = host[1:] - host[:-1]
        start, end = int(host[0]), int(host[-1])
        if start < 0:
            raise ValueError(f"tokens.offsets[0] = {start} is negative")
        if (lengths < 0).any():
            i = int(torch.argmax((lengths < 0).to(torch.uint8)))
            raise ValueError(
                f"tokens.offsets must be non-decreasing: offsets[{i + 1}] = {int(host[i + 1])} < "
                f"offsets[{i}] = {int(host[i])}"
            )
        if end > values.numel():
            raise ValueError(
                f"tokens.offsets[-1] = {end} is past the end of tokens.values ({values.numel()})"
            )
        return _from_host_lengths(values[start:end], lengths)
    return jagged_device_offsets(values, offsets.to(torch.int64))


def jagged_device_offsets(values: torch.Tensor, offsets: torch.Tensor) -> FlatTokens:
    """``Jagged`` whose (N + 1,) int64 ``offsets`` live on the device of ``values``: per-token sample ids by a
    binary search, no host sync (the offsets are checked later by :func:`validate`, in its one host read)."""
    n = offsets.numel() - 1
    position = torch.arange(values.numel(), dtype=torch.int64, device=values.device)
    segment = torch.searchsorted(offsets, position, right=True).sub_(1).clamp_(0, n - 1)
    room = offsets.index_select(0, segment + 1).sub_(position)
    room.mul_((position >= offsets[0]) & (position < offsets[-1]))
    return FlatTokens(values, segment, room, n, False, offsets)


def read_padded(tokens, lengths, who: str) -> FlatTokens:
    tokens = _check_integer(tokens, "tokens.tokens", 2)
    lengths = _check_integer(lengths, "tokens.lengths", 1)
    _check_device(lengths, "tokens.lengths", tokens.device, "tokens.tokens", cpu_ok=True)
    batch, width = tokens.shape
    if batch == 0:
        raise _empty_error(who)
    if lengths.numel() != batch:
        raise ValueError(f"tokens.lengths has {lengths.numel()} entries but tokens.tokens has {batch} rows")
    device = tokens.device
    if lengths.device.type == "cpu":  # gather the samples' tokens: no work on the padding, no host sync
        host = lengths.to(torch.int64)
        _check_padded_lengths(host, width)
        segment, room, lengths_dev = _segments(host, device)
        column = lengths_dev.index_select(0, segment).sub_(room)
        values = tokens.reshape(-1).index_select(0, segment * width + column)
        return FlatTokens(values, segment, room, batch, True)
    return padded_device_lengths(tokens, lengths.to(torch.int64))


def padded_device_lengths(tokens: torch.Tensor, lengths: torch.Tensor) -> FlatTokens:
    """``Padded`` whose (B,) int64 ``lengths`` live on the device of the (B, L) ``tokens``: every position is
    kept (room <= 0 on the padding), no host sync (the lengths are checked later by :func:`validate`)."""
    batch, width = tokens.shape
    column = torch.arange(width, dtype=torch.int64, device=tokens.device)
    room = (lengths.unsqueeze(1) - column.unsqueeze(0)).reshape(-1)
    segment = torch.arange(batch, dtype=torch.int64, device=tokens.device).repeat_interleave(width)
    return FlatTokens(tokens.reshape(-1), segment, room, batch, False, None, lengths)


def _check_padded_lengths(host: torch.Tensor, width: int) -> None:
    bad = (host < 0) | (host > width)
    if bad.any():
        i = int(torch.argmax(bad.to(torch.uint8)))
        raise ValueError(f"tokens.lengths[{i}] = {int(host[i])} is outside [0, {width}] (the padded width)")


def read_tokens(tokens, who: str) -> FlatTokens:
    """Any supported container -> :class:`FlatTokens`; ``who`` names the caller in the errors."""
    tokens = as_token_container(tokens)
    if isinstance(tokens, Jagged):
        return read_jagged(tokens.values, tokens.offsets, who)
    if isinstance(tokens, Padded):
        return read_padded(tokens.tokens, tokens.lengths, who)
    return read_list(tokens, who)


def validate(flat: FlatTokens, *, ids: bool = True) -> None:
    """The checks that need the data, in one host read: offsets that live on the device (non-decreasing,
    inside the values), lengths that live on the device (inside ``[0, L]``) and, with ``ids``, no negative
    id among the tokens of the samples (padding may hold anything)."""
    values, offsets, lengths = flat.values, flat.device_offsets, flat.device_lengths
    parts: dict[str, torch.Tensor] = {}
    if offsets is not None:
        parts["offsets"] = torch.stack(
            [torch.diff(offsets).min(), offsets[0], values.numel() - offsets[-1]]
        ).min()
    width = values.numel() // lengths.numel() if lengths is not None else 0
    if lengths is not None:
        parts["lengths"] = torch.minimum(lengths.min(), width - lengths.max())
    if ids and values.numel() > 0 and values.dtype != torch.uint8:
        parts["ids"] = values.min() if flat.all_used else torch.where(flat.room > 0, values, 0).min()
    if not parts:
        return
    found = dict(zip(parts, torch.stack([p.to(torch.int64) for p in parts.values()]).tolist()))
    if found.get("offsets", 0) < 0:  # redo the host checks, which name the bad offset
        read_jagged(torch.zeros(values.numel(), dtype=torch.uint8), offsets.cpu(), "")
        raise AssertionError("unreachable: bad device offsets passed the host checks")
    if found.get("lengths", 0) < 0:
        _check_padded_lengths(lengths.cpu(), width)
    if found.get("ids", 0) < 0:
        bad = int(torch.nonzero((values < 0) & (flat.room > 0))[0, 0])
        raise ValueError(
            f"token ids must be non-negative: sample {int(flat.segment[bad])} holds the id "
            f"{int(values[bad])} "
            f"(flat position {bad})"
        )


def check_texts(texts, who: str) -> list[str]:
    """``texts`` as a list of str, or a clear error (a single str, a non-str item, no texts)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"{who}: texts must be a sequence of str, got a single {type(texts).__name__}; wrap it in a list"
        )
    try:
        texts = list(texts)
    except TypeError as err:
        raise TypeError(f"{who}: texts must be a sequence of str, got {type(texts).__name__}") from err
    if not texts:
        raise ValueError(f"texts is empty: {who} needs at least one text (N = 0)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{who}: texts[{i}] must be a str, got {type(text).__name__}")
    return texts


def texts_to_bytes(texts: list[str], device) -> Jagged:
    """UTF-8 bytes of ``texts`` as ``Jagged(values (T,) uint8 on device, offsets (N + 1,) int64 CPU)``."""
    encoded = [text.encode("utf-8") for text in texts]
    lengths = torch.tensor([len(b) for b in encoded], dtype=torch.int64)
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    joined = b"".join(encoded)
    values = (
        torch.frombuffer(bytearray(joined), dtype=torch.uint8)
        if joined
        else torch.empty(0, dtype=torch.uint8)
    )
    return Jagged(_to_device(values, torch.device(device)), offsets)
