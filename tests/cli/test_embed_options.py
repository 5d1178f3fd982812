"""tfp-pack's embedded text: --embed-field (several fields, repeated or comma-separated), --embed-template,
the warning on empty or shared texts, and errors that name the record and the field."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from tfp_kernels import tfp_order
from tfp_kernels.cli import _parser, main
from tfp_kernels.embed import HashedEmbedder


def _alpaca(n: int = 40) -> list[dict]:
    """Alpaca records where most inputs are empty and 10 records share one instruction."""
    records = []
    for i in range(n):
        instruction = (
            "Summarize the following text." if i < 10 else f"Task {i}: explain topic {i % 5} in words."
        )
        records.append(
            {
                "instruction": instruction,
                "input": f"Passage {i} about topic {i % 5}." if i < 10 else "",
                "output": f"Answer {i}.",
            }
        )
    return records


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _run(argv, tmp_path, name="out"):
    out = tmp_path / name
    rc = main([*argv, "--output", str(out), "--no-progress", "--no-plots"])
    return rc, out


def _order(out) -> list[int]:
    return pq.read_table(out / "ordered.parquet").column("original_index").to_pylist()


def _expected_order(texts) -> list[int]:
    embedder = HashedEmbedder()
    # tfp-pack's default policy
    return tfp_order(torch.cat([embedder.embed_texts([t]) for t in texts]), policy="spread").tolist()


def test_argument_parsing():
    parse = _parser().parse_args
    assert parse([]).embed_field is None and parse([]).embed_template is None
    args = parse(["--embed-field", "instruction,input", "--embed-field", "topic"])
    assert args.embed_field == ["instruction", "input", "topic"]
    assert parse(["--embed-template", r"{instruction}\n{input}"]).embed_template == "{instruction}\n{input}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--embed-field", "a", "--embed-template", "{a}"], "not allowed with argument"),
        (["--embed-template", "no fields"], "names no field"),
        (["--embed-template", "{0}"], "fields must be named"),
        (["--embed-field", "a,,b"], "empty field name"),
    ],
)
def test_bad_arguments_fail_before_reading(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["missing.jsonl", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_several_fields_and_the_empty_text_warning(tmp_path, capsys):
    records = _alpaca()
    path = _write(tmp_path / "a.jsonl", records)
    rc, out = _run([path, "--embed-field", "input"], tmp_path, "input")
    assert rc == 0
    printed = capsys.readouterr().out
    warning = [line for line in printed.splitlines() if "warning:" in line and "found no sample" not in line]
    assert len(warning) == 1 and "30 of 40 embedded texts (input) are empty (75.0%)" in warning[0]
    # 30 identical (empty) texts: no window can keep them apart, the walk says so too
    forced = [line for line in printed.splitlines() if "warning:" in line and "found no sample" in line]
    assert len(forced) == 1 and "embed more of each record" in forced[0]
    assert json.loads((out / "report.json").read_text())["input"]["embed_field"] == "input"
    assert _order(out) == _expected_order([r["input"] for r in records])

    for name, argv in (
        ("comma", ["--embed-field", "instruction,input"]),
        ("repeated", ["--embed-field", "instruction", "--embed-field", "input"]),
    ):
        rc, out = _run([path, *argv], tmp_path, name)
        assert rc == 0
        report = json.loads((out / "report.json").read_text())
        assert report["input"]["embed_field"] == "instruction,input"
        texts = [r["instruction"] + (f"\n{r['input']}" if r["input"] else "") for r in records]
        assert _order(out) == _expected_order(texts)
        assert "warning:" not in capsys.readouterr().out  # 40 distinct texts, none empty


def test_default_instruction_warns_on_a_shared_text(tmp_path, capsys):
    path = _write(tmp_path / "a.jsonl", _alpaca())
    rc, out = _run([path], tmp_path)
    assert rc == 0
    printed = capsys.readouterr().out
    assert (
        "warning: 10 of 40 records (25.0%) embed the same text (instruction) 'Summarize the following text.'"
        in (printed)
    )
    assert _order(out) == _expected_order([r["instruction"] for r in _alpaca()])


def test_template(tmp_path):
    records = _alpaca()
    path = _write(tmp_path / "a.jsonl", records)
    rc, out = _run([path, "--embed-template", r"{instruction}\n{input}"], tmp_path)
    assert rc == 0
    assert json.loads((out / "report.json").read_text())["input"]["embed_field"] == (
        'template "{instruction}\\n{input}"'
    )
    assert _order(out) == _expected_order([f"{r['instruction']}\n{r['input']}" for r in records])


def test_chat_template_over_roles(tmp_path):
    records = [
        {
            "messages": [
                {"role": "system", "content": f"System {i % 2}."},
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
        }
        for i in range(24)
    ]
    path = _write(tmp_path / "c.jsonl", records)
    rc, out = _run([path, "--embed-template", "{system} {user} {assistant}"], tmp_path)
    assert rc == 0
    assert _order(out) == _expected_order([f"System {i % 2}. Question {i}? Answer {i}." for i in range(24)])


def test_missing_and_null_fields(tmp_path, capsys):
    records = _alpaca(12)
    del records[7]["input"]
    records[3]["input"] = None
    path = _write(tmp_path / "a.jsonl", records)
    rc, out = _run([path, "--embed-template", "{instruction} {input}"], tmp_path)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert err == (
        f"tfp-pack: error: {path}: record 7 has no field 'input' (named by the embed template); "
        "its fields: ['instruction', 'output']"
    )  # record 3's null input is not missing: it is embedded as ""
    records[7]["input"] = None
    _write(tmp_path / "a.jsonl", records)
    rc, out = _run([path, "--embed-field", "instruction,input"], tmp_path)
    assert rc == 0
    records[3]["output"] = None  # a null field the format needs is reported as null
    _write(tmp_path / "a.jsonl", records)
    rc, out = _run([path], tmp_path, "null")
    assert rc == 2
    assert "record 3: field 'output' is null; --format alpaca needs it" in capsys.readouterr().err
