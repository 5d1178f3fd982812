"""SFT record formats: what is trained on, what is a label, and what is embedded.

- ``alpaca``: fields ``instruction``, ``output``, optional ``input``; labels: the response (``output``);
  embedded by default: ``instruction`` (the paper).
- ``chat``: field ``messages``, a list of ``{role, content}``; labels: every assistant message; embedded:
  the first user message.
- ``prompt_completion``: fields ``prompt``, ``completion`` (strings, or lists of messages as in TRL);
  labels: the completion; embedded: the prompt (its first user message for a list).
- ``text``: field ``text``; labels: every token; embedded: ``text``.

A record becomes a list of *segments* ``(text, is_label)`` that the tokenizer encodes one by one and
concatenates (see :mod:`tfp_kernels.text.tokenize`); prompt tokens get the label -100. The text laid
out for training:

- ``alpaca``: ``"### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n"`` (prompt)
  then ``{output}`` (label); the ``Input`` block only when ``input`` is non-empty.
- ``chat`` (and list-valued prompt/completion), without a tokenizer chat template: one line per message,
  ``"{role}: {content}\\n"``; for assistant messages ``"{role}: "`` is prompt and ``"{content}\\n"`` label.
  With a transformers tokenizer that has a chat template, the template renders the conversation instead
  (:func:`chat_template_segments`).
- ``prompt_completion``: ``{prompt}`` (prompt) then ``{completion}`` (label).
- ``text``: ``{text}`` (label).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .readers import InputError

FORMATS = ("alpaca", "chat", "prompt_completion", "text")

#: Fields each format needs in every record.
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}

Segment = tuple[str, bool]


def detect_format(records: Sequence[dict], *, sample: int = 16) -> str:
    """The format of ``records``, from the keys of the first ``sample`` records.

    Rules, first match wins: ``messages`` -> chat; ``instruction`` + ``output`` -> alpaca; ``prompt`` +
    ``completion`` -> prompt_completion; ``text`` -> text.

    Raises:
        InputError: no rule matches (the message lists the keys found).
    """
    head = records[:sample]
    keys = set(head[0]) if head else set()
    for record in head[1:]:
        keys &= set(record)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    found = sorted(set().union(*(set(r) for r in head)))
    raise InputError(
        f"cannot detect the record format from the keys {found}; expected 'instruction'+'output' (alpaca), "
        f"'messages' (chat), 'prompt'+'completion' or 'text'; pass --format"
    )


def check_fields(records: Sequence[dict], fmt: str) -> None:
    """Raise :class:`InputError` naming the first record that lacks a field ``fmt`` needs (or holds null)."""
    if fmt not in REQUIRED_FIELDS:
        raise InputError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    required = REQUIRED_FIELDS[fmt]
    for i, record in enumerate(records):
        for field in required:
            if field not in record:
                raise InputError(
                    f"record {i} has no field '{field}' needed by --format {fmt} (its fields: {sorted(record)})"
                )
            if record[field] is None:
                raise InputError(f"record {i}: field '{field}' is null; --format {fmt} needs a value there")


def _as_text(value, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise InputError(f"{where} must be a string, got {type(value).__name__}")


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where} must be a list of {{role, content}} messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"{where}[{j}] must be a {{role, content}} message, got {str(m)[:80]!r}")
        out.append(
            {
                "role": _as_text(m["role"], f"{where}[{j}].role"),
                "content": _as_text(m["content"], f"{where}[{j}].content"),
            }
        )
    return out


def conversation(record: dict, fmt: str, index: int = 0) -> tuple[list[dict], int] | None:
    """``(messages, first_trained)`` when the record is a conversation (chat, or prompt/completion given
    as message lists), else None. Assistant messages at index ``>= first_trained`` are labels."""
    if fmt == "chat":
        return _messages(record["messages"], f"record {index}: messages"), 0
    if fmt == "prompt_completion" and isinstance(record["prompt"], (list, tuple)):
        prompt = _messages(record["prompt"], f"record {index}: prompt")
        completion = record["completion"]
        if isinstance(completion, (list, tuple)):
            completion = _messages(completion, f"record {index}: completion")
        else:
            completion = [
                {"role": "assistant", "content": _as_text(completion, f"record {index}: completion")}
            ]
        return prompt + completion, len(prompt)
    return None


def plain_chat_segments(messages: Sequence[dict], first_trained: int = 0) -> list[Segment]:
    """Segments of a conversation without a chat template: ``"{role}: {content}\\n"`` per message."""
    segments: list[Segment] = []
    for j, m in enumerate(messages):
        if m["role"] == "assistant" and j >= first_trained:
            segments.append((f"{m['role']}: ", False))
            segments.append((m["content"] + "\n", True))
        else:
            segments.append((f"{m['role']}: {m['content']}\n", False))
    return segments


def segments(record: dict, fmt: str, index: int = 0) -> list[Segment]:
    """The record as ``(text, is_label)`` segments, template-free (see the module docstring)."""
    where = f"record {index}"
    if fmt == "alpaca":
        instruction = _as_text(record["instruction"], f"{where}: instruction")
        inp = _as_text(record.get("input"), f"{where}: input")
        prompt = f"### Instruction:\n{instruction}\n\n"
        if inp:
            prompt += f"### Input:\n{inp}\n\n"
        prompt += "### Response:\n"
        return [(prompt, False), (_as_text(record["output"], f"{where}: output"), True)]
    if fmt == "text":
        return [(_as_text(record["text"], f"{where}: text"), True)]
    conv = conversation(record, fmt, index)
    if conv is not None:
        return plain_chat_segments(*conv)
    if fmt == "prompt_completion":
        return [
            (_as_text(record["prompt"], f"{where}: prompt"), False),
            (_as_text(record["completion"], f"{where}: completion"), True),
        ]
    raise InputError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")


def _first_user(messages: Sequence[dict]) -> str:
    for m in messages:
        if m["role"] == "user":
            return m["content"]
    return messages[0]["content"] if messages else ""


def default_embed_field(fmt: str) -> str:
    """Name of the default embedding source of ``fmt`` (for messages and reports)."""
    return {
        "alpaca": "instruction",
        "chat": "messages (first user message)",
        "prompt_completion": "prompt",
        "text": "text",
    }[fmt]


def embed_text(record: dict, fmt: str, field: str | None = None, index: int = 0) -> str:
    """The text embedded for ``record``: ``record[field]`` when ``field`` is given (message lists: the
    contents joined by newlines; other non-strings as JSON), else the format's default (module docstring).

    Raises:
        InputError: ``field`` is not in the record (the message lists the record's fields).
    """
    if field is not None:
        if field not in record:
            raise InputError(
                f"record {index} has no field '{field}' (--embed-field); its fields: {sorted(record)}"
            )
        value = record[field]
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in value):
            return "\n".join(_as_text(m["content"], f"record {index}: {field}") for m in value)
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    if fmt == "alpaca":
        return _as_text(record["instruction"], f"record {index}: instruction")
    if fmt == "text":
        return _as_text(record["text"], f"record {index}: text")
    conv = conversation(record, fmt, index)
    if conv is not None:
        return _first_user(conv[0])
    return _as_text(record["prompt"], f"record {index}: prompt")
