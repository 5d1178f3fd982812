"""Generates the bundled default dataset ``default_embeddings.pt`` (synthetic, seeded, CC0).

Run ``python -m tfp_kernels.data.make_default`` to regenerate it; numpy's PCG64 generator makes the
file the same on every machine. See ``README.md`` in this folder for what it models.
"""

from __future__ import annotations

import os

import numpy as np
import torch

NUM_SAMPLES = 2000
DIM = 64
NUM_TOPICS = 16
NEAR_DUPLICATE_FRACTION = 0.05
SEED = 20240817


def make(seed: int = SEED) -> dict:
    rng = np.random.default_rng(seed)
    # topics: well separated centres; sub-topics inside each topic; samples around the sub-topics
    topic_centres = rng.normal(size=(NUM_TOPICS, DIM)) * 3.0
    sub_centres = topic_centres[:, None, :] + rng.normal(size=(NUM_TOPICS, 4, DIM)) * 1.0
    topic = rng.integers(0, NUM_TOPICS, size=NUM_SAMPLES)
    sub = rng.integers(0, 4, size=NUM_SAMPLES)
    emb = sub_centres[topic, sub] + rng.normal(size=(NUM_SAMPLES, DIM)) * 0.6
    # near-duplicates (the kind of pairs TFP keeps apart): copies of other samples with tiny noise
    dup = rng.choice(NUM_SAMPLES, size=int(NEAR_DUPLICATE_FRACTION * NUM_SAMPLES), replace=False)
    src = rng.integers(0, NUM_SAMPLES, size=dup.size)
    emb[dup] = emb[src] + rng.normal(size=(dup.size, DIM)) * 0.01
    topic[dup] = topic[src]
    # SFT-like token lengths: log-normal, median ~300 tokens, long tail, clipped to [16, 2048]
    lengths = np.clip(np.round(rng.lognormal(mean=np.log(300), sigma=0.8, size=NUM_SAMPLES)), 16, 2048)
    return {
        "embeddings": torch.from_numpy(emb.astype(np.float16)),
        "lengths": torch.from_numpy(lengths.astype(np.int64)),
        "topic": torch.from_numpy(topic.astype(np.int64)),
    }


def main() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_embeddings.pt")
    torch.save(make(), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
