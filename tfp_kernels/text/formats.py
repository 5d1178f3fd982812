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

The embedded text (:func:`texts_to_embed`, the CLI's ``--embed-field`` / ``--embed-template``):

- by default the part of the record that says what the sample is about, not its answer: the TFP paper
  embeds the instruction, so samples are ordered by task; the other formats follow suit (above);
- ``fields``: one or several field names (``"instruction,input"`` or a list); several are joined by
  newlines, empty ones left out; a list of messages counts as its contents joined by newlines;
- ``template``: a ``str.format`` string over the fields, ``"{instruction}\\n{input}"``; on conversation
  records a name that is not a field is a role: ``{user}`` the first user message, ``{user_all}`` every
  user message joined by newlines (``{system}``, ``{assistant}``, any role of the data); a role with no
  message in a record gives "";
- a null field gives "" (it is not missing); a missing field is an error that names the record's index
  and the field.
"""

from __future__ import annotations

import argparse
import json
import re
import string
from collections.abc import Sequence
from typing import NamedTuple

from ..embed.unique import CLI_HINT, UniqueTexts, embed_text_stats, embed_text_warning, unique_texts
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
    """Raise :class:`InputError` naming the first record that lacks a field ``fmt`` needs, or has it null."""
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
                raise InputError(f"record {i}: field '{field}' is null; --format {fmt} needs it")


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


# ------------------------------------------------------------------------------------------ embedded text

#: Roles that a template or field list may name on conversation records even where no message of the data
#: has them (they render as empty text); any role found in the data's messages may be named too.
STANDARD_ROLES = ("system", "user", "assistant", "tool", "developer")

#: ``{<role>_all}``: every message of the role, joined by newlines (``{<role>}``: the first one).
ALL_SUFFIX = "_all"


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


def parse_embed_fields(fields) -> tuple[str, ...] | None:
    """The field names of ``--embed-field`` / ``embed_field=``, flattened in order.

    Args:
        fields: None, a str (several names separated by commas: ``"instruction,input"``) or a sequence of
            such str (``["instruction", "input"]``, what a repeated ``--embed-field`` gives). Spaces around
            a name are dropped.

    Returns:
        The names as a tuple (each once), or None for None.

    Raises:
        TypeError: not a str or a sequence of str.
        ValueError: an empty name (``"a,,b"``, ``""``), a name given twice.
    """
    if fields is None:
        return None
    items = [fields] if isinstance(fields, str) else fields
    if isinstance(items, (bytes, dict)) or not hasattr(items, "__iter__"):
        raise TypeError(f"embed fields must be a str or a list of str, got {type(fields).__name__}")
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"embed fields must be str, got {type(item).__name__} {item!r}")
        for name in item.split(","):
            name = name.strip()
            if not name:
                raise ValueError(f"embed fields {item!r}: empty field name")
            if name in names:
                raise ValueError(f"embed fields: {name!r} is named twice")
            names.append(name)
    if not names:
        raise ValueError("embed fields: no field name given")
    return tuple(names)


def template_fields(template: str) -> tuple[str, ...]:
    """The field names an embed template uses (``str.format`` syntax), each once, in order of first use.

    A template is a Python format string over the record's fields: ``"{instruction}\\n{input}"``; ``{{`` and
    ``}}`` are literal braces; format specs and conversions apply to the field's text
    (``"{instruction:.200}"`` keeps its first 200 characters).

    Raises:
        TypeError: ``template`` is not a str.
        ValueError: a syntax error (an unmatched brace), a positional field (``{}``, ``{0}``), attribute
            or index access (``{a.b}``, ``{a[0]}``), a field inside a format spec, or no field at all.
    """
    if not isinstance(template, str):
        raise TypeError(f"embed template must be a str, got {type(template).__name__}")
    shown = json.dumps(template, ensure_ascii=False)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"embed template {shown}: {err}") from None
    names: list[str] = []
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(
                f"embed template {shown}: fields must be named, e.g. {{instruction}}, not {{{name}}}"
            )
        if "." in name or "[" in name:
            raise ValueError(
                f"embed template {shown}: {{{name}}}: only plain field names, no attribute or index access"
            )
        if spec and "{" in spec:
            raise ValueError(f"embed template {shown}: {{{name}:{spec}}}: no fields inside a format spec")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f'embed template {shown} names no field; e.g. "{{instruction}}\\n{{input}}"')
    try:
        template.format_map(dict.fromkeys(names, ""))
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise ValueError(f"embed template {shown}: {err}") from None
    return tuple(names)


def unescape_template(text: str) -> str:
    r"""A template typed on the command line: ``\n``, ``\t`` and ``\\`` become a newline, a tab and one
    backslash; any other backslash is kept."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def embed_template_argument(text: str) -> str:
    """``argparse`` type of ``--embed-template``: :func:`unescape_template`, then :func:`template_fields`."""
    template = unescape_template(text)
    try:
        template_fields(template)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return template


def embed_fields_argument(text: str) -> list[str]:
    """``argparse`` type of ``--embed-field`` (``action="extend"``): the comma-separated names of one use."""
    try:
        return list(parse_embed_fields(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _field_text(value, where: str) -> str:
    """The text of one field's value: a str as it is; None as ""; a list of ``{role, content}`` messages as
    their contents joined by newlines; a number or bool with ``str``; anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(m, dict) and "content" in m for m in value):  # messages
            return "\n".join(_as_text(m["content"], f"{where}[{j}].content") for j, m in enumerate(value))
    if isinstance(value, (int, float, bool)):
        return str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _roles(records: Sequence[dict]) -> set[str]:
    """The roles of every message of ``records`` (fields ``messages``, ``prompt``, ``completion``)."""
    found: set[str] = set()
    for record in records:
        for key in ("messages", "prompt", "completion"):
            value = record.get(key) if isinstance(record, dict) else None
            if isinstance(value, (list, tuple)):
                found.update(
                    m["role"] for m in value if isinstance(m, dict) and isinstance(m.get("role"), str)
                )
    return found


class EmbedSource:
    """What is embedded for each record: the format's default, some fields, or a template.

    Args:
        fmt: the record format (:data:`FORMATS`), or None for records of no known format (then ``fields`` or
            ``template`` is needed).
        fields: field names (see :func:`parse_embed_fields`); several are joined by newlines, empty ones
            left out.
        template: a format string over the fields (see :func:`template_fields`).
        roles: more role names that conversation records may use besides :data:`STANDARD_ROLES`.

    A name is looked up in the record first; on a conversation record (chat, or prompt/completion given as
    message lists) a name that is not a field is a role: ``{user}`` the first user message, ``{user_all}``
    every user message joined by newlines; a role with no message in the record gives "". A field whose
    value is None (null) gives "" (it is not missing). A name that is neither is an error naming the
    record and the field.
    """

    def __init__(self, fmt: str | None, fields=None, template: str | None = None, roles=()):
        if fields is not None and template is not None:
            raise ValueError("give embed fields or an embed template, not both")
        if fmt is not None and fmt not in FORMATS:
            raise InputError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
        self.fmt = fmt
        self.fields = parse_embed_fields(fields)
        self.template = template
        self.names = template_fields(template) if template is not None else self.fields
        if self.names is None and fmt is None:
            raise ValueError("records of no known format need embed fields or an embed template")
        self.roles = set(STANDARD_ROLES) | set(roles)

    def describe(self) -> str:
        """One line for reports: ``instruction``, ``instruction,input`` or ``template "..."``."""
        if self.template is not None:
            return "template " + json.dumps(self.template, ensure_ascii=False)
        if self.fields is not None:
            return ",".join(self.fields)
        return default_embed_field(self.fmt)

    def _role_text(self, messages: list[dict], name: str) -> str | None:
        if name not in self.roles and name.endswith(ALL_SUFFIX):
            role = name[: -len(ALL_SUFFIX)]
            if role in self.roles:
                return "\n".join(m["content"] for m in messages if m["role"] == role)
            return None
        if name in self.roles:
            return next((m["content"] for m in messages if m["role"] == name), "")
        return None

    def _missing(self, record: dict, name: str, index: int, conversation_record: bool) -> InputError:
        what = "the embed template" if self.template is not None else "the embed fields"
        message = f"record {index} has no field '{name}' (named by {what}); its fields: {sorted(record)}"
        if conversation_record:
            roles = sorted(self.roles)
            message += (
                f", its message roles: {roles} ({{<role>}}: the first message, {{<role>{ALL_SUFFIX}}}: all)"
            )
        return InputError(message)

    def text(self, record: dict, index: int = 0) -> str:
        """The embedded text of ``record`` (``index``: its position, for error messages)."""
        if self.names is None:
            return _default_embed_text(record, self.fmt, index)
        values: dict[str, str] = {}
        messages = False  # not looked at yet
        for name in self.names:
            if name in record:
                values[name] = _field_text(record[name], f"record {index}: {name}")
                continue
            if messages is False:
                conv = conversation(record, self.fmt, index) if self.fmt is not None else None
                messages = conv[0] if conv is not None else None
            value = self._role_text(messages, name) if messages is not None else None
            if value is None:
                raise self._missing(record, name, index, messages is not None)
            values[name] = value
        if self.template is not None:
            return self.template.format_map(values)
        if len(values) == 1:
            return next(iter(values.values()))
        return "\n".join(v for v in values.values() if v)


def _default_embed_text(record: dict, fmt: str, index: int) -> str:
    if fmt == "alpaca":
        return _as_text(record["instruction"], f"record {index}: instruction")
    if fmt == "text":
        return _as_text(record["text"], f"record {index}: text")
    conv = conversation(record, fmt, index)
    if conv is not None:
        return _first_user(conv[0])
    return _as_text(record["prompt"], f"record {index}: prompt")


def embed_text(record: dict, fmt: str, field=None, index: int = 0, *, template: str | None = None) -> str:
    """The text embedded for one record: the format's default, ``field`` (one name or several), or
    ``template`` (see :class:`EmbedSource` and the module docstring).

    Raises:
        InputError: a named field is not in the record (the message names the record and its fields).
        ValueError: both ``field`` and ``template``; a bad template.
    """
    return EmbedSource(fmt, field, template, _roles([record])).text(record, index)


def texts_to_embed(
    records: Sequence[dict], fmt: str | None, *, fields=None, template: str | None = None
) -> list[str]:
    """The text embedded for each record, in order (one str per record; "" where there is nothing).

    Args:
        records: N dicts.
        fmt: their format (:data:`FORMATS`), or None when they have none (``fields`` or ``template`` needed).
        fields: None (the format's default: alpaca ``instruction`` as in the TFP paper, chat the first user
            message, prompt/completion the prompt, text ``text``), a field name, ``"a,b"`` or a list of
            names (joined by newlines, empty ones left out).
        template: a format string over the fields (``"{instruction}\\n{input}"``; chat: over the roles,
            ``"{system}\\n{user}"``, ``{user_all}``).

    Raises:
        InputError: a record without a named field (naming the record's index and the field).
        ValueError: both ``fields`` and ``template``; a bad template or field list.

    Examples::

        >>> from tfp_kernels.text.formats import texts_to_embed
        >>> records = [{"instruction": "Sum.", "input": "1 2", "output": "3"},
        ...            {"instruction": "Greet.", "input": None, "output": "Hi"}]
        >>> texts_to_embed(records, "alpaca")
        ['Sum.', 'Greet.']
        >>> texts_to_embed(records, "alpaca", fields="instruction,input")
        ['Sum.\\n1 2', 'Greet.']
        >>> texts_to_embed(records, "alpaca", template="{instruction} [{input}]")
        ['Sum. [1 2]', 'Greet. []']
        >>> chat = [{"messages": [{"role": "user", "content": "Hi?"},
        ...                       {"role": "assistant", "content": "Hello."}]}]
        >>> texts_to_embed(chat, "chat", template="{user} -> {assistant}")
        ['Hi? -> Hello.']
    """
    roles = _roles(records) if fmt in ("chat", "prompt_completion") else set()
    source = EmbedSource(fmt, fields, template, roles)
    return [source.text(record, i) for i, record in enumerate(records)]


def describe_embed_source(fmt: str | None, fields=None, template: str | None = None) -> str:
    """What :func:`texts_to_embed` embeds with these arguments, in one line (for reports)."""
    return EmbedSource(fmt, fields, template).describe()


class EmbedTexts(NamedTuple):
    """The texts to embed for N records, ready for an embedder (:func:`prepare_embed_texts`).

    texts: N str, one per record.
    distinct: their distinct values and the index of each (:class:`~tfp_kernels.embed.UniqueTexts`): embed
        ``distinct.texts`` and ``distinct.gather(rows)`` gives the (N, D) rows.
    stats: :func:`~tfp_kernels.embed.embed_text_stats` of ``texts`` (distinct, empty, most shared).
    source: what is embedded, in one line (:func:`describe_embed_source`).
    warning: the one-line warning about empty or shared texts (:func:`~tfp_kernels.embed.embed_text_warning`),
        or None.
    """

    texts: list[str]
    distinct: UniqueTexts
    stats: dict
    source: str
    warning: str | None


def prepare_embed_texts(
    records: Sequence[dict],
    fmt: str | None,
    *,
    fields=None,
    template: str | None = None,
    hint: str = CLI_HINT,
) -> EmbedTexts:
    """:func:`texts_to_embed` of ``records``, with their distinct values, their counts and a warning.

    Args:
        records, fmt, fields, template: as :func:`texts_to_embed`.
        hint: the advice that ends the warning.

    Examples::

        >>> from tfp_kernels.text.formats import prepare_embed_texts
        >>> records = [{"instruction": "Sum.", "output": str(i)} for i in range(3)]
        >>> prepared = prepare_embed_texts(records, "alpaca")
        >>> prepared.distinct.texts, prepared.distinct.inverse.tolist(), prepared.stats["num_distinct"]
        (['Sum.'], [0, 0, 0], 1)
        >>> prepared.warning.startswith("warning: 3 of 3 records (100.0%) embed the same text (instruction)")
        True
    """
    texts = texts_to_embed(records, fmt, fields=fields, template=template)
    stats = embed_text_stats(texts)
    source = describe_embed_source(fmt, fields, template)
    warning = embed_text_warning(stats, source=source, hint=hint)
    return EmbedTexts(texts, unique_texts(texts), stats, source, warning)


#: Record fields the format's default embedded text reads.
_DEFAULT_EMBED_READS = {
    "alpaca": ("instruction",),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


def embed_reads(fmt: str | None, fields=None, template: str | None = None) -> tuple[str, ...]:
    """The record fields :func:`texts_to_embed` may read with these arguments: the named ones and, for
    conversation formats, the message fields (a name that is no field may be a role); with neither
    ``fields`` nor ``template``, those of the format's default."""
    source = EmbedSource(fmt, fields, template)
    if source.names is None:
        return _DEFAULT_EMBED_READS[fmt]
    extra = _DEFAULT_EMBED_READS[fmt] if fmt in ("chat", "prompt_completion") else ()
    return tuple(dict.fromkeys(source.names + extra))
