"""Every figure of the cost report, computed from a run's output Parquet alone.

Throughput is measured over the engine's own calls: from the first call's start to the last
call's end (`started_at`, `finished_at`), so Ray start-up, model load and the warm-up batch
(`resources.warmup`) stay out while waits on the CPU stage between calls stay in. Costs are
wall-clock GPU time over that span: every GPU the run held is billed for all of it. A GPU actor
that Ray restarted (after a device fault, or on another node after one was lost) comes back as a
new `worker`, in its predecessor's place: GPUs held = the most workers active at once.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, no punctuation or articles, single spaces (the SQuAD convention)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words overlap F1 of the normalized texts (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def succeeded(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table.column("error")))


def _values(table: pa.Table, column: str) -> np.ndarray:
    return np.asarray(table.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)


def _quantiles(values: np.ndarray, qs=(50, 95)) -> dict:
    return {f"p{q}": float(np.percentile(values, q)) for q in qs} if len(values) else {f"p{q}": None for q in qs}


def gpus_held(ok: pa.Table) -> int:
    """The most GPU actors working at once, each from its first call's start to its last call's end."""
    spans = ok.group_by("worker").aggregate([("started_at", "min"), ("finished_at", "max")])
    events = sorted([(t, 1) for t in spans.column("started_at_min").to_pylist()]
                    + [(t, -1) for t in spans.column("finished_at_max").to_pylist()])  # at a tie, ends first
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def run_metrics(table: pa.Table, gpu_hour_usd: float) -> dict:
    """Throughput, cost, tokens, latency and memory of one run (its successful rows)."""
    ok = succeeded(table)
    metrics = {"rows": len(table), "errors": len(table) - len(ok), "succeeded": len(ok)}
    if not len(ok):
        return metrics
    span_s = float(pc.max(ok.column("finished_at")).as_py() - pc.min(ok.column("started_at")).as_py())
    gpus = gpus_held(ok)
    engine_ms = _engine_ms(ok)
    gpu_s_per_sample = gpus * span_s / len(ok)
    peak = pc.max(ok.column("peak_gpu_memory_mb")).as_py()
    devices = Counter(ok.column("device").to_pylist())
    metrics.update(
        device=devices.most_common(1)[0][0], gpus=gpus, span_s=span_s,
        samples_per_s=len(ok) / span_s,
        generated_tokens_per_s=float(_values(ok, "n_generated_tokens").sum()) / span_s,
        prompt_tokens_per_s=float(_values(ok, "n_prompt_tokens").sum()) / span_s,
        gpu_s_per_sample=gpu_s_per_sample,
        usd_per_million_samples=gpu_s_per_sample * 1e6 / 3600 * gpu_hour_usd,
        engine_s_per_sample=float(engine_ms.mean()) / 1e3,
        visual_tokens_mean=float(_values(ok, "n_visual_tokens").mean()),
        kept_tokens_mean=float(_values(ok, "n_visual_tokens_kept").mean()),
        kept_tokens_quantiles=_quantiles(_values(ok, "n_visual_tokens_kept"), (10, 50, 90)),
        equiv_tokens_mean=float(_values(ok, "equiv_visual_tokens").mean()),
        prefill_ms=_quantiles(_values(ok, "prefill_ms")), decode_ms=_quantiles(_values(ok, "decode_ms")),
        peak_gpu_memory_mb=peak,
    )
    return metrics


def _texts_by_id(table: pa.Table) -> dict:
    ok = succeeded(table)
    return dict(zip(ok.column("id").to_pylist(), zip(ok.column("task").to_pylist(), ok.column("output").to_pylist())))


def compare(table: pa.Table, references: dict) -> dict:
    """Answers against references ({id: text}): exact match on vqa rows, token F1 on captions.

    Rows that failed, and ids without a reference, are left out; `n` counts the rest.
    """
    exact, f1 = [], []
    for row_id, (task, text) in _texts_by_id(table).items():
        if references.get(row_id) is None:
            continue
        if task == "vqa":
            exact.append(normalize_answer(text) == normalize_answer(references[row_id]))
        else:
            f1.append(token_f1(text, references[row_id]))
    return {"n": len(exact) + len(f1),
            "exact_match": float(np.mean(exact)) if exact else None, "n_vqa": len(exact),
            "token_f1": float(np.mean(f1)) if f1 else None, "n_caption": len(f1)}


def dense_answers(table: pa.Table) -> dict:
    """A run's answers as references, {id: text}: what the other runs' agreement is measured against."""
    return {row_id: text for row_id, (_, text) in _texts_by_id(table).items()}


def engine_ms_per_sample(table: pa.Table) -> np.ndarray:
    """Each successful sample's share of GPU time (vision + prefill + decode), for the latency CDF."""
    return _engine_ms(succeeded(table))


def _engine_ms(ok: pa.Table) -> np.ndarray:
    return _values(ok, "vision_ms") + _values(ok, "prefill_ms") + _values(ok, "decode_ms")
