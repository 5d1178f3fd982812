"""Each distinct text embedded once, and the facts about a list of texts that make an ordering go wrong.

SFT sets repeat their prompts: 3,000 Alpaca-style records may hold only 825 distinct instructions. An
embedder is a deterministic function of its text, so :func:`embed_unique` embeds each distinct text once
and gathers the rows back: the same (N, D) result as embedding every text, with the model run on the
distinct texts only, and identical texts given bit-identical rows (a transformers model batched with
padding can round two copies of a text differently).

:func:`embed_text_stats` counts what a TFP ordering cannot separate: identical texts are at distance 0,
closer than any threshold, and empty texts are identical to each other. :func:`embed_text_warning` turns
the counts into the one-line warning of ``tfp-pack``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._inputs import check_texts

#: Share of the texts above which :func:`embed_text_warning` warns (empty texts; one text shared).
WARN_FRACTION = 0.01


class UniqueTexts(NamedTuple):
    """N texts as their distinct values and, per text, the row of its value.

    texts: the U distinct texts, in the order of their first occurrence.
    inverse: (N,) torch.int64, on the CPU: ``texts[inverse[i]]`` is text i.
    """

    texts: list[str]
    inverse: torch.Tensor

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """(U, D) rows of the distinct texts -> (N, D) rows of all texts (same dtype and device)."""
        return rows.index_select(0, self.inverse.to(rows.device))


def unique_texts(texts: Sequence[str]) -> UniqueTexts:
    """The distinct values of N texts (first-occurrence order) and the index of each text among them.

    Args:
        texts: N str (N >= 1).

    Returns:
        :class:`UniqueTexts` ``(texts: U distinct str, inverse: (N,) int64 CPU)``.

    Examples::

        >>> from tfp_kernels.embed import unique_texts
        >>> u = unique_texts(["a", "b", "a", ""])
        >>> u.texts, u.inverse.tolist()
        (['a', 'b', ''], [0, 1, 0, 2])
    """
    texts = check_texts(texts, "unique_texts")
    row_of: dict[str, int] = {}
    inverse = [row_of.setdefault(text, len(row_of)) for text in texts]
    return UniqueTexts(list(row_of), torch.tensor(inverse, dtype=torch.int64))


def embed_unique(texts: Sequence[str], embedder, **kwargs) -> torch.Tensor:
    """Embed N texts with each distinct text embedded once; the rows are gathered back in input order.

    Args:
        texts: N str (N >= 1).
        embedder: an object with ``embed_texts(texts, **kwargs)`` (:class:`~tfp_kernels.embed.HashedEmbedder`,
            :class:`~tfp_kernels.embed.TransformersEmbedder`, a :func:`~tfp_kernels.embed.load_embedder`
            result) or a callable ``f(texts, **kwargs) -> (U, D)``; it is called once, with the U distinct
            texts in the order of their first occurrence.
        **kwargs: passed to the embedder (e.g. ``device="cuda"`` for ``HashedEmbedder.embed_texts``).

    Returns:
        (N, D) tensor, the embedder's dtype and device: row i is the embedder's row of ``texts[i]``, so the
        result equals embedding every text wherever the embedder gives a text the same row in any batch.

    Raises:
        TypeError: ``texts`` is not a sequence of str; ``embedder`` has no ``embed_texts`` and is not
            callable; the embedder returned something other than a 2-D tensor.
        ValueError: no texts; the embedder returned another number of rows than the texts it was given.

    Examples::

        >>> from tfp_kernels.embed import HashedEmbedder, embed_unique
        >>> embedder = HashedEmbedder(dim=16)
        >>> texts = ["same", "other", "same"]
        >>> rows = embed_unique(texts, embedder)
        >>> rows.shape, bool((rows[0] == rows[2]).all()), bool((rows == embedder.embed_texts(texts)).all())
        (torch.Size([3, 16]), True, True)
    """
    distinct = unique_texts(texts)
    embed = getattr(embedder, "embed_texts", None)
    if embed is None:
        if not callable(embedder):
            raise TypeError(
                f"embedder must have embed_texts(texts) or be callable, got {type(embedder).__name__}"
            )
        embed = embedder
    rows = embed(distinct.texts, **kwargs)
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        got = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise TypeError(f"the embedder must return a 2-D tensor (one row per text), got {got}")
    if rows.shape[0] != len(distinct.texts):
        raise ValueError(
            f"the embedder returned {rows.shape[0]} rows for {len(distinct.texts)} texts "
            "(one row per text expected)"
        )
    return distinct.gather(rows)


def embed_text_stats(texts: Sequence[str]) -> dict:
    """Counts over the texts to embed that tell whether TFP can separate the records.

    Args:
        texts: N str (N >= 1).

    Returns:
        A dict: ``num_texts`` (N), ``num_distinct`` (distinct texts), ``num_empty`` (texts that are empty or
        only whitespace: they all embed alike), ``most_common_count`` (records that share the most frequent
        text) and ``most_common_text`` (that text; the first to reach the count).

    Examples::

        >>> from tfp_kernels.embed import embed_text_stats
        >>> stats = embed_text_stats(["Sum.", "", "Sum.", " ", "Sum."])
        >>> stats["num_texts"], stats["num_distinct"], stats["num_empty"]
        (5, 3, 2)
        >>> stats["most_common_count"], stats["most_common_text"]
        (3, 'Sum.')
    """
    texts = check_texts(texts, "embed_text_stats")
    counts = Counter(texts)
    text, count = counts.most_common(1)[0]  # ties: the first text seen (Counter keeps insertion order)
    return {
        "num_texts": len(texts),
        "num_distinct": len(counts),
        "num_empty": sum(c for t, c in counts.items() if not t.strip()),
        "most_common_count": count,
        "most_common_text": text,
    }


CLI_HINT = "embed more of each record (--embed-field a,b or --embed-template)"


def embed_text_warning(
    stats: dict, *, source: str | None = None, fraction: float = WARN_FRACTION, hint: str = CLI_HINT
) -> str | None:
    """The one-line warning for :func:`embed_text_stats` ``stats``, or None when there is nothing to say.

    It warns when more than ``fraction`` of the texts are empty, or when one text is shared by more than
    ``fraction`` of the records (and by at least 2): such records are at distance 0 from each other, closer
    than any threshold, so the ordering cannot keep them apart.

    Args:
        stats: the dict of :func:`embed_text_stats`.
        source: what was embedded (``"instruction"``), named in the warning.
        fraction: the share above which it warns (default 1%).
        hint: what to do, ending the line (default: the ``tfp-pack`` options).

    Examples::

        >>> from tfp_kernels.embed import embed_text_stats, embed_text_warning
        >>> embed_text_warning(embed_text_stats(["a", "b", "c"])) is None
        True
        >>> warning = embed_text_warning(embed_text_stats(["Sum.", "", "Sum."]), source="instruction")
        >>> warning.startswith("warning: 1 of 3 embedded texts (instruction) are empty (33.3%); 2 of 3")
        True
        >>> "records (66.7%) embed the same text (instruction) 'Sum.' (2 distinct texts)" in warning
        True
    """
    n = stats["num_texts"]
    what = f" ({source})" if source else ""
    parts = []
    if stats["num_empty"] > fraction * n:
        share = 100 * stats["num_empty"] / n
        parts.append(f"{stats['num_empty']} of {n} embedded texts{what} are empty ({share:.1f}%)")
    count, text = stats["most_common_count"], stats["most_common_text"]
    if count >= 2 and count > fraction * n and text.strip():
        shown = text if len(text) <= 60 else text[:57] + "..."
        parts.append(f"{count} of {n} records ({100 * count / n:.1f}%) embed the same text{what} {shown!r}")
    if not parts:
        return None
    return (
        "warning: "
        + "; ".join(parts)
        + f" ({stats['num_distinct']} distinct texts): identical texts are closer than any threshold and TFP "
        f"cannot keep them apart; {hint}"
    )
