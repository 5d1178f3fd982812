"""The bundled default dataset of ``tfp-pack`` (see README.md in this folder)."""

from __future__ import annotations

import os

#: 4,000 synthetic alpaca records (instruction/input/output/topic), gzip JSON Lines, CC0.
DEFAULT_SFT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_default.jsonl.gz")


def load_default() -> list[dict]:
    """The bundled synthetic SFT dataset: a list of 4,000 dicts with ``instruction``, ``input``, ``output``
    (strings) and ``topic`` (one of 8 topic names), in file order."""
    from ..text.readers import read_records

    return read_records(DEFAULT_SFT)
