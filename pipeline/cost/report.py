"""Assemble the cost report of finished runs: figures (metrics), plots, gallery -> blocks + JSON."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads

from . import metrics, plots
from .gallery import first_frame, load_media, panel
from .render import Code, Figure, Heading, Table, Text

logger = logging.getLogger(__name__)


@dataclass
class Run:
    name: str
    path: str
    table: pa.Table
    overrides: dict = field(default_factory=dict)  # what the configuration changed; {} for --from-runs

    @classmethod
    def read(cls, name: str, path: str, overrides: dict | None = None) -> "Run":
        try:
            table = pads.dataset(path, format="parquet").to_table()
        except (OSError, pa.ArrowInvalid) as error:
            raise ValueError(f"run {name!r}: cannot read Parquet from {path}: {error}") from None
        missing = [c for c in ("started_at", "finished_at", "worker", "device") if c not in table.column_names]
        if missing or not len(table):
            raise ValueError(f"run {name!r} at {path}: " + (f"no {', '.join(missing)} columns (written by an "
                             "older version of the jobs: run it again)" if missing else "no rows"))
        return cls(name, path, table, overrides or {})


@dataclass
class Context:
    command: str
    dataset: str
    kind: str
    model_path: str
    gpu_hour_usd: float
    baseline: str
    media: dict  # the job's media section (frame sampling for the gallery)
    references: dict | None = None  # {id: reference answer} when the dataset has them
    gallery_source: tuple[str, str, str] | None = None  # input uri, id column, media column
    gallery_size: int = 3


def compute(runs: list[Run], context: Context) -> dict:
    """report.json: every figure of every run, the baseline's answers as the agreement reference."""
    by_name = {run.name: run for run in runs}
    if context.baseline not in by_name:
        raise ValueError(f"baseline {context.baseline!r} is not among the runs ({', '.join(by_name)})")
    dense = metrics.dense_answers(by_name[context.baseline].table)
    entries = []
    for run in runs:
        entry = {"name": run.name, "path": run.path, "overrides": run.overrides,
                 "method": _single(run.table, "method"), **metrics.run_metrics(run.table, context.gpu_hour_usd)}
        entry["agreement_with_baseline"] = None if run.name == context.baseline else metrics.compare(run.table, dense)
        entry["accuracy"] = metrics.compare(run.table, context.references) if context.references else None
        entries.append(entry)
    base = next(e for e in entries if e["name"] == context.baseline)
    for entry in entries:
        entry["speedup_vs_baseline"] = (entry["samples_per_s"] / base["samples_per_s"]
                                        if entry.get("samples_per_s") and base.get("samples_per_s") else None)
    return {"command": context.command, "dataset": context.dataset, "kind": context.kind,
            "model": _single(runs[0].table, "model"), "device": base.get("device"),
            "gpu_hour_usd": context.gpu_hour_usd, "baseline": context.baseline, "runs": entries}


def _single(table: pa.Table, column: str):
    values = [v for v in table.column(column).unique().to_pylist() if v is not None]
    return values[0] if len(values) == 1 else ", ".join(map(str, values)) or None


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"


def _pair(quantiles: dict | None, keys=("p50", "p95"), digits: int = 1) -> str:
    return " / ".join(_num(quantiles.get(k) if quantiles else None, digits) for k in keys)


def _agreement(result: dict | None) -> str:
    if not result or not result["n"]:
        return "—"
    parts = []
    if result["exact_match"] is not None:
        parts.append(f"EM {result['exact_match']:.2f}")
    if result["token_f1"] is not None:
        parts.append(f"F1 {result['token_f1']:.2f}")
    return f"{', '.join(parts)} (n={result['n']})"


def summary_table(report: dict) -> Table:
    header = ["configuration", "samples/s", f"vs {report['baseline']}", "gen. tokens/s", "GPU-s / sample",
              "$ / 1M samples", "visual tokens in", "kept p10 / p50 / p90", "layer-avg kept",
              "prefill ms p50 / p95", "decode ms p50 / p95", "peak GPU MB", "agreement", "accuracy", "errors"]
    rows = []
    for e in report["runs"]:
        if not e["succeeded"]:
            rows.append([e["name"], *["n/a"] * 13, f"{e['errors']} of {e['rows']}"])
            continue
        rows.append([
            f"`{e['name']}`", _num(e["samples_per_s"]),
            "n/a" if e["speedup_vs_baseline"] is None else f"{e['speedup_vs_baseline']:.2f}x",
            _num(e["generated_tokens_per_s"], 1), _num(e["gpu_s_per_sample"], 4), _num(e["usd_per_million_samples"]),
            _num(e["visual_tokens_mean"], 1), _pair(e["kept_tokens_quantiles"], ("p10", "p50", "p90"), 0),
            _num(e["equiv_tokens_mean"], 1), _pair(e["prefill_ms"]), _pair(e["decode_ms"]),
            _num(e["peak_gpu_memory_mb"], 0), _agreement(e["agreement_with_baseline"]), _agreement(e["accuracy"]),
            f"{e['errors']} of {e['rows']}"])
    return Table(header, rows)


def blocks(report: dict, runs: list[Run], context: Context) -> list:
    ok = [e for e in report["runs"] if e["succeeded"]]
    out = [
        Heading(f"Cost report: {report['dataset']}", 1),
        Text(f"Model `{report['model']}` on `{report['device']}`; {report['kind']} inputs; "
             f"cost at **${report['gpu_hour_usd']:.2f} per GPU-hour** (`--gpu-hour-usd`). Reproduce with:"),
        Code(report["command"]),
        Heading("Summary"),
        summary_table(report),
        Text("How to read it. Throughput runs from the first engine call's start to the last one's end, so Ray "
             "start-up, model loading and, for runs made with `--warmup` (the report's own are), each GPU "
             "actor's first batch's compilation are left out, while time the GPUs waited for the CPU stage is "
             "in. GPU-s / sample bills every GPU actor for that whole span; $ / 1M samples = GPU-s / sample "
             "x 1e6 / 3600 x $/GPU-hour. Visual tokens: "
             "per sample, before pruning, after the last pruning layer (merged tokens included) and averaged "
             "over all decoder layers (what compute follows). Prefill / decode ms are each sample's share of "
             f"its engine call. Agreement compares answers with `{report['baseline']}`, id by id: exact match "
             "(normalized) for short answers, token-overlap F1 for captions. Accuracy: against the dataset's "
             "reference answers, where it has them."),
    ]
    if ok:
        points = [{"name": e["name"], "equiv_tokens": e["equiv_tokens_mean"], "samples_per_s": e["samples_per_s"],
                   "usd_per_million": e["usd_per_million_samples"]} for e in ok]
        out += [Heading("Throughput and cost vs visual-token budget"),
                Figure("throughput_cost.png", "samples/s and $ per 1M samples against layer-averaged visual tokens",
                       plots.throughput_and_cost(points)),
                Heading("GPU time per sample"),
                Figure("latency_cdf.png", "CDF of each sample's GPU time (vision + prefill + decode share)",
                       plots.latency_cdf({run.name: metrics.engine_ms_per_sample(run.table) for run in runs}))]
    gallery = _gallery(runs, context)
    if gallery is not None:
        out += [Heading("What each configuration kept"),
                Figure("gallery.png", "kept visual tokens (bright) over the image the model saw; pruned ones dimmed",
                       gallery)]
    return out


def _gallery(runs: list[Run], context: Context) -> bytes | None:
    pruned = [run for run in runs if run.table.column("kept_visual_positions").null_count < len(run.table)
              and _single(run.table, "method") != "none"]
    if not context.gallery_source or not pruned or context.gallery_size < 1:
        return None
    kept = {run.name: _kept_positions(run.table) for run in pruned}
    ids = list(kept[pruned[0].name])[:context.gallery_size]
    media = load_media(*context.gallery_source, ids)
    rows = []
    for row_id in ids:
        try:
            frame = first_frame(media[row_id], context.kind, context.media)
        except Exception as error:  # a gallery image is decoration: say so and go on
            logger.warning("gallery: cannot show %r (%s)", row_id, error)
            continue
        row = [panel(frame, kept[run.name][row_id], context.model_path, context.kind,
                     run.overrides.get("media.max_pixels"), f"{row_id}\n{run.name}")
               for run in pruned if kept[run.name].get(row_id) is not None]
        if row:
            rows.append(row)
    return plots.gallery(rows) if rows else None


def _kept_positions(table: pa.Table) -> dict:
    ok = metrics.succeeded(table)
    return dict(zip(ok.column("id").to_pylist(), ok.column("kept_visual_positions").to_pylist()))
