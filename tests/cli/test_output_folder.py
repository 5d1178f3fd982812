"""What tfp-pack does with an existing --output, with real folders: it never deletes or overwrites a file it
did not write. Each case runs the real command (``main``) on a tiny input and compares the folder's files
and their bytes before and after."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tfp_kernels import cli
from tfp_kernels.cli import MANIFEST, OutputFolder, main

WRITTEN = {"ordered.parquet", "packed.parquet", "report.json", "timings.json", MANIFEST}
PLOTS = {"pack_lengths.png", "fill_ratio.png", "intra_pack_similarity.png", "fill_vs_similarity.png"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def data(tmp_path):
    """A tiny text dataset (12 records) outside the folders the tests write to."""
    folder = tmp_path / "input"
    folder.mkdir()
    path = folder / "small.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"record {i}: " + "word " * (i % 5 + 1)}) + "\n" for i in range(12))
    )
    return str(path)


def _pack(data, out, *extra):
    return main([data, "--output", str(out), "--no-progress", "--no-plots", "--max-len", "64", *extra])


def _tree(folder) -> dict:
    """Every entry under ``folder`` (not following symlinks): relative path -> bytes, link target or 'dir'."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                out[rel] = "dir"
            else:
                with open(full, "rb") as f:
                    out[rel] = f.read()
    return out


def _foreign_folder(path):
    """The folder of the issue: another tool's report.json, the user's thesis.tex and a subfolder."""
    (path / "src").mkdir(parents=True)
    (path / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (path / "report.json").write_text("{}\n")
    (path / "thesis.tex").write_text("x\n")
    return path


def _manifest(out) -> dict:
    return json.loads((out / MANIFEST).read_text())


def test_new_folder_and_missing_parents_honour_the_umask(data, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    old = os.umask(0o027)
    try:
        assert _pack(data, out) == 0
    finally:
        os.umask(old)
    assert set(os.listdir(out)) == WRITTEN
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o750  # not mkdtemp's 0700
    assert stat.S_IMODE(os.stat(out / "report.json").st_mode) == 0o640
    manifest = _manifest(out)
    assert manifest["written_by"] == "tfp-pack" and manifest["complete"] is True
    assert set(manifest["files"]) == WRITTEN - {MANIFEST}
    assert sorted(json.loads((out / "report.json").read_text())["outputs"]) == sorted(WRITTEN)


def test_empty_folder_is_filled_in_place(data, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    os.chmod(out, 0o751)
    inode = os.stat(out).st_ino
    assert _pack(data, out) == 0
    assert set(os.listdir(out)) == WRITTEN
    assert os.stat(out).st_ino == inode and stat.S_IMODE(os.stat(out).st_mode) == 0o751  # the user's folder


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_folder_with_a_report_json_is_refused_and_untouched(data, tmp_path, capsys, overwrite):
    out = _foreign_folder(tmp_path / "d")
    before = _tree(out)
    assert _pack(data, out, *(["--overwrite"] if overwrite else [])) == 2
    err = capsys.readouterr().err
    assert "tfp-pack did not write it" in err and "thesis.tex" in err and len(err.strip().splitlines()) == 1
    assert _tree(out) == before  # nothing deleted, nothing added (no temporary folder either)
    assert sorted(os.listdir(tmp_path)) == ["d", "input"]


def test_output_dot_in_a_folder_holding_the_input_is_refused(data, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "small.jsonl").write_bytes(Path(data).read_bytes())
    (work / "notes.txt").write_text("mine\n")
    (work / "report.json").write_text('{"tool": "other"}\n')
    before = _tree(work)
    monkeypatch.chdir(work)
    assert main(["small.jsonl", "--output", ".", "--no-progress", "--no-plots", "--overwrite"]) == 2
    assert "--output .: the folder is not empty" in capsys.readouterr().err
    assert _tree(work) == before


def test_output_dot_in_an_empty_folder(data, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main([data, "--output", ".", "--no-progress", "--no-plots"]) == 0
    assert set(os.listdir(work)) == WRITTEN
    assert main([data, "--output", ".", "--no-progress", "--no-plots"]) == 2  # now a previous output
    assert main([data, "--output", ".", "--no-progress", "--no-plots", "--overwrite"]) == 0
    assert set(os.listdir(work)) == WRITTEN


def test_a_file_in_the_way_is_refused(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file, not a folder\n")
    assert _pack(data, out, "--overwrite") == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert out.read_text() == "a file, not a folder\n" and sorted(os.listdir(tmp_path)) == ["input", "out"]


def test_symlink_to_a_folder_is_followed_and_kept(data, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    assert _pack(data, link) == 0
    assert os.path.islink(link) and set(os.listdir(target)) == WRITTEN
    assert _pack(data, link, "--overwrite") == 0
    assert os.path.islink(link) and set(os.listdir(target)) == WRITTEN


def test_symlink_to_a_foreign_folder_and_a_broken_symlink_are_refused(data, tmp_path, capsys):
    target = _foreign_folder(tmp_path / "target")
    before = _tree(target)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    assert _pack(data, link, "--overwrite") == 2
    assert _tree(target) == before and os.path.islink(link)
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    assert _pack(data, broken) == 2
    assert "does not exist" in capsys.readouterr().err.splitlines()[-1]
    assert os.path.islink(broken) and not (tmp_path / "nowhere").exists()


def test_previous_output_needs_overwrite(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _pack(data, out, "--seed", "1") == 0
    before = _tree(out)
    assert _pack(data, out, "--seed", "2") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert _tree(out) == before
    assert _pack(data, out, "--seed", "2", "--overwrite") == 0
    assert json.loads((out / "report.json").read_text())["args"]["seed"] == 2
    assert set(os.listdir(out)) == WRITTEN


def test_overwrite_keeps_the_users_files_and_removes_only_stale_outputs(data, tmp_path):
    out = tmp_path / "out"
    assert main([data, "--output", str(out), "--no-progress", "--max-len", "64"]) == 0  # with plots
    assert set(os.listdir(out)) == WRITTEN | PLOTS
    (out / "my_notes.txt").write_text("keep me\n")
    (out / "sub").mkdir()
    (out / "sub" / "x.bin").write_bytes(b"\x00\x01")
    outside = tmp_path / "precious.txt"
    outside.write_text("precious\n")
    (out / "link_to_precious").symlink_to(outside)
    assert _pack(data, out, "--overwrite") == 0  # no plots this time: the old plots go, the user's files stay
    assert set(os.listdir(out)) == WRITTEN | {"my_notes.txt", "sub", "link_to_precious"}
    assert (out / "my_notes.txt").read_text() == "keep me\n" and (
        out / "sub" / "x.bin"
    ).read_bytes() == b"\x00\x01"
    assert os.readlink(out / "link_to_precious") == str(outside) and outside.read_text() == "precious\n"
    assert set(_manifest(out)["files"]) == WRITTEN - {MANIFEST}


def test_unlisted_file_with_an_output_name_is_refused(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _pack(data, out) == 0  # --no-plots: pack_lengths.png is not one of its files
    (out / "pack_lengths.png").write_bytes(b"the user's own plot")
    before = _tree(out)
    assert main([data, "--output", str(out), "--no-progress", "--overwrite"]) == 2
    assert "pack_lengths.png there is not listed" in capsys.readouterr().err
    assert _tree(out) == before


def test_symlink_named_like_an_output_is_refused(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _pack(data, out) == 0
    mine = tmp_path / "my_report.json"
    mine.write_text('{"mine": true}\n')
    os.remove(out / "report.json")
    (out / "report.json").symlink_to(mine)
    before = _tree(out)
    assert _pack(data, out, "--overwrite") == 2
    assert "report.json there is a symlink" in capsys.readouterr().err
    assert _tree(out) == before and mine.read_text() == '{"mine": true}\n'


@pytest.mark.parametrize(
    "manifest",
    [
        "not json",
        json.dumps({"written_by": "another-tool", "files": ["report.json"]}),
        json.dumps({"written_by": "tfp-pack", "files": ["../thesis.tex"]}),
    ],
)
def test_a_manifest_tfp_pack_did_not_write_is_not_a_marker(data, tmp_path, manifest):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(manifest)
    (out / "report.json").write_text("{}\n")
    before = _tree(out)
    assert _pack(data, out, "--overwrite") == 2
    assert _tree(out) == before


def test_default_folder_is_replaced_on_a_rerun(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [data, "--no-progress", "--no-plots", "--max-len", "64"]
    assert main(argv) == 0
    (tmp_path / "tfp_pack_output" / "keep.txt").write_text("mine\n")
    assert main(argv) == 0  # no --overwrite needed in the default folder
    assert "replacing the earlier tfp-pack output in tfp_pack_output" in capsys.readouterr().out
    assert set(os.listdir("tfp_pack_output")) == WRITTEN | {"keep.txt"}
    assert (tmp_path / "tfp_pack_output" / "keep.txt").read_text() == "mine\n"


def test_default_folder_of_another_tool_is_refused(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _foreign_folder(tmp_path / "tfp_pack_output")
    before = _tree(tmp_path / "tfp_pack_output")
    assert main([data, "--no-progress", "--no-plots"]) == 2
    assert "tfp-pack did not write it" in capsys.readouterr().err
    assert _tree(tmp_path / "tfp_pack_output") == before


def test_an_error_leaves_a_previous_output_as_it_was(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _pack(data, out) == 0
    before = _tree(out)
    assert _pack(data, out, "--overwrite", "--overlong", "error", "--max-len", "5") == 2
    assert "longer than --max-len 5" in capsys.readouterr().err
    assert _tree(out) == before  # the same files, and no temporary folder left inside


def test_an_interrupted_commit_is_marked_incomplete_and_still_replaceable(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _pack(data, out) == 0
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        if os.path.dirname(str(dst)) == str(out):
            calls.append(dst)
            if len(calls) == 3:  # the manifest (incomplete), one file, then the failure
                raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(cli.os, "replace", failing_replace)
    assert _pack(data, out, "--overwrite") == 2
    monkeypatch.setattr(cli.os, "replace", real_replace)
    assert _manifest(out)["complete"] is False  # a reader can tell the folder is not a finished output
    assert [e for e in os.listdir(out) if e.startswith(".")] == []  # the temporary folder was removed
    assert _pack(data, out, "--overwrite") == 0
    assert _manifest(out)["complete"] is True and set(os.listdir(out)) == WRITTEN


def test_report_copy_checks_come_first(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _pack(data, out, "--report", str(tmp_path / "missing" / "r.json")) == 2
    assert "its folder" in capsys.readouterr().err and not out.exists()
    mine = tmp_path / "r.json"
    mine.write_text("mine\n")
    assert _pack(data, out, "--report", str(mine)) == 2
    assert "pass --overwrite" in capsys.readouterr().err and mine.read_text() == "mine\n" and not out.exists()
    assert _pack(data, out, "--report", str(mine), "--overwrite") == 0
    assert mine.read_bytes() == (out / "report.json").read_bytes()
    assert _pack(data, out, "--overwrite", "--report", str(out / "report.json")) == 2
    assert "one of the files tfp-pack writes" in capsys.readouterr().err
    before = Path(data).read_bytes()
    assert _pack(data, out, "--overwrite", "--report", data) == 2
    assert "is the input file" in capsys.readouterr().err and Path(data).read_bytes() == before


def test_input_that_the_run_would_replace_is_refused(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _pack(data, out) == 0
    before = _tree(out)
    assert main([str(out / "ordered.parquet"), "--output", str(out), "--overwrite", "--no-progress"]) == 2
    assert "the input is the file --output would replace" in capsys.readouterr().err
    assert _tree(out) == before


def test_output_folder_checks_need_no_run(tmp_path):
    # the class on its own: the cases the command refuses before reading anything
    (tmp_path / "empty").mkdir()
    folder = OutputFolder(str(tmp_path / "empty"))
    folder.start()
    assert folder.exists and not folder.replaces and os.path.dirname(folder.tmp) == str(tmp_path / "empty")
    folder.abort()
    assert os.listdir(tmp_path / "empty") == []
    folder = OutputFolder(str(tmp_path / "new" / "deeper" / "out"))
    assert not (tmp_path / "new").exists()  # nothing made before start()
    folder.start()
    assert not folder.exists and os.path.isdir(tmp_path / "new" / "deeper")
    folder.abort()
    assert not (tmp_path / "new").exists()  # the parents it made are gone again


def _wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_the_run_removes_the_temporary_folder(data, tmp_path, monkeypatch, capsys, sig, code):
    # in this process: the signal arrives while the records are read, after the temporary folder was made
    from tfp_kernels.text import readers

    work = tmp_path / "work"
    work.mkdir()
    read = readers.read_records

    def read_then_signal(*args, **kwargs):
        read(*args, **kwargs)
        assert any(e.startswith(".out.tmp-") for e in os.listdir(work))
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("the signal was not handled")

    monkeypatch.setattr(readers, "read_records", read_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    # Ctrl-C reaches Python as KeyboardInterrupt only where SIGINT is not ignored: a test run started in the
    # background by a non-interactive shell inherits SIGINT ignored, so give this process Python's own handler
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main([data, "--output", str(work / "out"), "--no-progress"]) == code
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert signal.getsignal(signal.SIGTERM) is previous  # main puts the handler back
    assert os.listdir(work) == [] and "no unfinished output left behind" in capsys.readouterr().err


def test_sigterm_to_the_process_exits_143_and_leaves_nothing(tmp_path):
    # the input is a named pipe nobody writes to: the run waits in open() with its temporary folder made
    fifo = tmp_path / "blocked.jsonl"
    os.mkfifo(fifo)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfp_kernels", str(fifo), "--output", str(work / "out"), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert _wait_for(lambda: any(e.startswith(".out.tmp-") for e in os.listdir(work))), "no temp folder"
        time.sleep(0.2)  # inside open(), not between the mkdtemp and the try
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert os.listdir(work) == [] and "no unfinished output left behind" in err and "Traceback" not in err
