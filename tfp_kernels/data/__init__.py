"""The bundled default dataset (see README.md in this folder)."""

from __future__ import annotations

import os

import torch

DEFAULT_DATASET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_embeddings.pt")


def load_default() -> dict:
    """The bundled synthetic dataset.

    Returns:
        dict with ``embeddings`` (2000, 64) float16, ``lengths`` (2000,) int64 token counts and
        ``topic`` (2000,) int64 generating topic of each sample; all on the CPU.
    """
    return torch.load(DEFAULT_DATASET, weights_only=True)
