"""Plain-Python reference of packed-batch assembly: the test oracle.

Loops over Python lists, no torch. The fast paths (:func:`tfp_kernels.assembly.assemble` with the C++ /
CUDA op ``torch.ops.tfp_kernels.assemble`` or :func:`tfp_kernels.assembly.assemble_pieces_torch`) must
agree with it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

IGNORE_INDEX = -100


def assemble_reference(
    tokens: Sequence[Sequence[int]],
    packing: dict,
    *,
    attention: str = "pack",
    labels: Sequence[Sequence[int]] | None = None,
    pad_to: int | None = None,
    pad_id: int = 0,
) -> dict:
    """The packed batch of ``tokens`` laid out by ``packing``, as Python lists.

    Args:
        tokens: N samples, each a list of token ids.
        packing: the fields of a :class:`~tfp_kernels.packing.Packing` as lists (``pack_id``,
            ``sample_index``, ``offset``, ``length``, ``pack_offsets``; e.g. from
            :func:`tfp_kernels.packing.reference.pack_lengths_reference`) and ``max_len``.
        attention: ``"pack"``: one attention segment per pack, position ids counting from 0 over the whole
            pack; ``"sample"``: one segment per piece (a sample, or the part of a split sample inside one
            pack), position ids restarting at 0 at every piece.
        labels: N label lists of the samples' lengths, or None for the token ids themselves.
        pad_to: when given, also the ``[P, pad_to]`` padded view.
        pad_id: token id of the padding in the padded view.

    Returns:
        A dict of lists: ``input_ids``, ``labels``, ``position_ids`` (T each); ``cu_seqlens`` (S + 1);
        ints ``max_seqlen``, ``num_tokens``; with ``pad_to``, also ``padded_input_ids``,
        ``padded_labels``, ``padded_position_ids``, ``padded_attention_mask`` (P lists of ``pad_to``).

    Layout: the pieces in pack order, each the token slice ``[offset, offset + length)`` of its sample.
    The label of every segment's first token is ``IGNORE_INDEX`` (-100): in the flat ``[1, T]`` layout the
    token before it belongs to another segment (transformers' ``DataCollatorWithFlattening`` does the same
    per sample). In the padded view, padding has ``pad_id``, label -100, attention mask 0 and position ids
    that continue the last segment of the row.
    """
    if attention not in ("pack", "sample"):
        raise ValueError(f"attention must be 'pack' or 'sample', got {attention!r}")
    labels = tokens if labels is None else labels
    out = {"input_ids": [], "labels": [], "position_ids": [], "cu_seqlens": [0]}
    pack_starts = packing["pack_offsets"]
    for piece, (pack, sample, offset, length) in enumerate(
        zip(packing["pack_id"], packing["sample_index"], packing["offset"], packing["length"])
    ):
        if offset < 0 or offset + length > len(tokens[sample]):
            raise ValueError(f"piece {piece} reads tokens[{sample}][{offset}:{offset + length}] out of range")
        start = len(out["input_ids"])
        for t in range(length):
            position = t if attention == "sample" else start + t - pack_starts[pack]
            out["input_ids"].append(tokens[sample][offset + t])
            out["position_ids"].append(position)
            out["labels"].append(IGNORE_INDEX if position == 0 else labels[sample][offset + t])
        if attention == "sample":
            out["cu_seqlens"].append(start + length)
    if attention == "pack":
        out["cu_seqlens"] = list(pack_starts)
    segment_lengths = [b - a for a, b in zip(out["cu_seqlens"][:-1], out["cu_seqlens"][1:])]
    out["max_seqlen"] = max(segment_lengths, default=0)
    out["num_tokens"] = len(out["input_ids"])
    if pad_to is not None:
        _add_padded(out, packing, attention, pad_to, pad_id)
    return out


def _add_padded(out: dict, packing: dict, attention: str, pad_to: int, pad_id: int) -> None:
    pack_starts = packing["pack_offsets"]
    rows = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
    for pack in range(len(pack_starts) - 1):
        begin, end = pack_starts[pack], pack_starts[pack + 1]
        if end - begin > pad_to:
            raise ValueError(f"pack {pack} holds {end - begin} tokens, more than pad_to={pad_to}")
        positions = out["position_ids"][begin:end]
        last_segment_start = (end - begin) - 1 - positions[-1] if attention == "sample" and positions else 0
        pad = pad_to - (end - begin)
        rows["input_ids"].append(out["input_ids"][begin:end] + [pad_id] * pad)
        rows["labels"].append(out["labels"][begin:end] + [IGNORE_INDEX] * pad)
        rows["position_ids"].append(positions + [c - last_segment_start for c in range(end - begin, pad_to)])
        rows["attention_mask"].append([1] * (end - begin) + [0] * pad)
    for key, value in rows.items():
        out[f"padded_{key}"] = value
