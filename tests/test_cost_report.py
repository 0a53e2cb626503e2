"""The cost report: its pieces on hand-made rows, then the whole report on the embedded default,
with every number recomputed here from the runs' Parquet."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cost import metrics
from pipeline.cost.configs import DEFAULT_CONFIGS, overrides_for, quarter_resolution_pixels
from schemas.rows import empty_row, output_schema


def test_configuration_names():
    assert overrides_for("dense") == {"sparsity.method": "none"}
    assert overrides_for("sparsevlm-128") == {"sparsity.method": "sparsevlm", "sparsity.preset": 128}
    assert overrides_for("fastv-0.25") == {"sparsity.method": "fastv", "sparsity.keep_ratio": 0.25}
    assert overrides_for("sparsevlm_v2") == {"sparsity.method": "sparsevlm_v2"}
    assert overrides_for("dense-lowres", 1000) == {"sparsity.method": "none", "media.max_pixels": 1000}
    assert overrides_for("sparsevlm-128@fp8") == {"sparsity.method": "sparsevlm", "sparsity.preset": 128,
                                                  "model.vision_fp8": True}
    assert overrides_for("dense-lowres@fp8", 1000) == {"sparsity.method": "none", "media.max_pixels": 1000,
                                                       "model.vision_fp8": True}
    for bad in ("sparse-128", "fastv-many", "lowres", "dense@fp16"):
        with pytest.raises(ValueError, match="configuration"):
            overrides_for(bad)
    assert DEFAULT_CONFIGS[0] == "dense" and "dense-lowres" in DEFAULT_CONFIGS


def test_lowres_is_sized_from_the_dense_run():
    rows = [empty_row("a", n_visual_tokens=1024, frames_sampled=0), empty_row("b", n_visual_tokens=1024,
                                                                               frames_sampled=0),
            empty_row("v", n_visual_tokens=2048, frames_sampled=16), empty_row("x", error="decode: bad")]
    table = pa.Table.from_pylist(rows, schema=output_schema())
    assert quarter_resolution_pixels(table) == 256 * 28 * 28  # video: 8 frame pairs of 256 tokens


def test_answers_are_compared_normalized():
    assert metrics.normalize_answer("  The Red, CUBE! ") == "red cube"
    assert metrics.token_f1("a red cube on the left", "the red cube") == pytest.approx(2 * 1.0 * (2 / 4) / 1.5)
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("blue", "red") == 0.0
    rows = [empty_row("q1", task="vqa", output="Red."), empty_row("q2", task="vqa", output="blue"),
            empty_row("c1", task="caption", output="a cat on a mat"), empty_row("bad", task="vqa", error="x: y"),
            empty_row("q3", task="vqa", output="green")]
    table = pa.Table.from_pylist(rows, schema=output_schema())
    result = metrics.compare(table, {"q1": "red", "q2": "red", "c1": "a cat", "bad": "red", "q3": None})
    assert result == {"n": 3, "exact_match": 0.5, "n_vqa": 2, "token_f1": 0.5, "n_caption": 1}  # "cat on mat" vs "cat"


def test_throughput_is_taken_over_the_engine_calls():
    common = {"n_visual_tokens": 100, "n_visual_tokens_kept": 10, "equiv_visual_tokens": 20.0,
              "n_generated_tokens": 4, "n_prompt_tokens": 120, "vision_ms": 1.0, "prefill_ms": 2.0,
              "decode_ms": 3.0, "device": "cpu"}
    rows = [empty_row(i, worker=w, started_at=s, finished_at=f, **common)
            for i, w, s, f in [("a", "w1", 100.0, 102.0), ("b", "w1", 102.0, 104.0), ("c", "w2", 101.0, 103.0)]]
    rows.append(empty_row("d", error="decode: bad", worker="w2", started_at=90.0, finished_at=200.0))
    result = metrics.run_metrics(pa.Table.from_pylist(rows, schema=output_schema()), gpu_hour_usd=3.6)
    assert result["succeeded"] == 3 and result["errors"] == 1 and result["gpus"] == 2
    assert result["span_s"] == 4.0 and result["samples_per_s"] == 0.75
    assert result["gpu_s_per_sample"] == pytest.approx(8 / 3)
    assert result["usd_per_million_samples"] == pytest.approx(8 / 3 * 1e6 / 3600 * 3.6)
    assert result["generated_tokens_per_s"] == 3.0 and result["engine_s_per_sample"] == pytest.approx(0.006)
    assert result["peak_gpu_memory_mb"] is None


def test_a_restarted_gpu_actor_is_not_billed_twice():
    """w1 died (device fault, lost node) and came back as w3 in its place: two GPUs, not three."""
    common = {"n_visual_tokens": 100, "n_visual_tokens_kept": 10, "equiv_visual_tokens": 20.0,
              "n_generated_tokens": 4, "n_prompt_tokens": 120, "device": "cpu"}
    spans = [("a", "w1", 100.0, 102.0), ("b", "w2", 100.0, 110.0), ("c", "w3", 105.0, 110.0)]
    rows = [empty_row(i, worker=w, started_at=s, finished_at=f, **common) for i, w, s, f in spans]
    result = metrics.run_metrics(pa.Table.from_pylist(rows, schema=output_schema()), gpu_hour_usd=1.0)
    assert result["gpus"] == 2 and result["gpu_s_per_sample"] == pytest.approx(2 * 10 / 3)
    rows.append(empty_row("d", worker="w4", started_at=101.0, finished_at=106.0, **common))  # a third at once
    assert metrics.run_metrics(pa.Table.from_pylist(rows, schema=output_schema()), gpu_hour_usd=1.0)["gpus"] == 3


# --- the whole report, recomputed -------------------------------------------------------------


def _normalized(text: str) -> str:  # written apart from metrics.normalize_answer, on purpose
    words = re.sub(r"[^\w\s]", "", text.lower()).split()
    return " ".join(w for w in words if w not in {"a", "an", "the"})


# The configurations the assertions below compare. Each is a whole job (~25 s on 2 CPU cores); the
# other defaults (sparsevlm-128, fastv-128, random-128) are the same job with other sparsity settings,
# which the engine's tests cover, and their labels are checked above.
REPORTED = ("dense", "sparsevlm-192", "sparsevlm-64", "dense-lowres")


def test_the_report_runs_every_default_configuration_unless_told():
    from jobs.cost_report import parse_args

    assert parse_args([]).configs.split(",") == list(DEFAULT_CONFIGS)
    assert set(REPORTED) <= set(DEFAULT_CONFIGS)


@pytest.fixture(scope="module")
def built_report(tmp_path_factory):
    import ray

    from jobs.cost_report import main

    folder = tmp_path_factory.mktemp("report")
    assert main(["--output", str(folder), "--gpu-hour-usd", "4.0", "--configs", ",".join(REPORTED)]) == 0
    ray.shutdown()
    return folder


@pytest.mark.slow
def test_report_builds_from_the_embedded_default(built_report):  # how long it takes is for benchmarks
    folder = built_report
    markdown = (folder / "report.md").read_text()
    page = (folder / "report.html").read_text()
    report = json.loads((folder / "report.json").read_text())
    assert [run["name"] for run in report["runs"]] == list(REPORTED)
    assert "python jobs/cost_report.py --output" in markdown and "python jobs/cost_report.py" in page
    for name in REPORTED:
        assert f"`{name}`" in markdown and f"<code>{name}</code>" in page
    for figure in ("throughput_cost.png", "latency_cdf.png", "gallery.png"):
        assert (folder / figure).stat().st_size > 1000 and f"]({figure})" in markdown
    assert page.count("data:image/png;base64,") == 3 and "src='http" not in page  # self-contained


@pytest.mark.slow
def test_report_numbers_match_the_parquet_they_came_from(built_report):
    folder = built_report
    report = json.loads((folder / "report.json").read_text())
    tables = {run["name"]: pq.read_table(folder / run["path"]).to_pylist() for run in report["runs"]}
    dense = {r["id"]: r["output"] for r in tables["dense"] if r["error"] is None}
    for run in report["runs"]:
        rows = tables[run["name"]]
        ok = [r for r in rows if r["error"] is None]
        assert run["rows"] == len(rows) == 4 and run["succeeded"] == len(ok)
        span = max(r["finished_at"] for r in ok) - min(r["started_at"] for r in ok)
        gpus = len({r["worker"] for r in ok})
        assert run["samples_per_s"] == pytest.approx(len(ok) / span, rel=1e-9)
        assert run["usd_per_million_samples"] == pytest.approx(gpus * span / len(ok) / 3600 * 1e6 * 4.0, rel=1e-9)
        assert run["generated_tokens_per_s"] == pytest.approx(sum(r["n_generated_tokens"] for r in ok) / span)
        assert run["kept_tokens_mean"] == pytest.approx(sum(r["n_visual_tokens_kept"] for r in ok) / len(ok))
        assert run["equiv_tokens_mean"] == pytest.approx(sum(r["equiv_visual_tokens"] for r in ok) / len(ok),
                                                         rel=1e-6)
        if run["name"] != "dense":
            same = [_normalized(r["output"]) == _normalized(dense[r["id"]]) for r in ok if r["id"] in dense]
            assert run["agreement_with_baseline"]["n"] == len(same)
            assert run["agreement_with_baseline"]["exact_match"] == pytest.approx(sum(same) / len(same))
    runs = {run["name"]: run for run in report["runs"]}
    assert runs["sparsevlm-64"]["kept_tokens_mean"] < runs["sparsevlm-192"]["kept_tokens_mean"]
    assert runs["sparsevlm-192"]["kept_tokens_mean"] < runs["dense"]["kept_tokens_mean"]
    assert runs["dense-lowres"]["visual_tokens_mean"] < runs["dense"]["visual_tokens_mean"]
    assert runs["dense"]["speedup_vs_baseline"] == 1.0


def test_runs_without_timing_columns_are_refused_clearly(tmp_path):
    from pipeline.cost.report import Run

    old = pa.Table.from_pylist([{"id": "a", "output": "x", "error": None}])
    pq.write_table(old, tmp_path / "part-0.parquet")
    with pytest.raises(ValueError, match="older version"):
        Run.read("old", str(tmp_path))
    with pytest.raises(ValueError, match="cannot read Parquet"):
        Run.read("missing", str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_from_runs_gives_the_same_figures(built_report, tmp_path):
    from jobs.cost_report import main

    folder = built_report
    original = json.loads((folder / "report.json").read_text())
    runs = [str(folder / run["path"]) for run in original["runs"]]
    assert main(["--from-runs", *runs, "--output", str(tmp_path), "--gpu-hour-usd", "4.0"]) == 0
    again = json.loads((tmp_path / "report.json").read_text())
    for before, after in zip(original["runs"], again["runs"]):
        assert before["name"] == after["name"]
        for key in ("samples_per_s", "usd_per_million_samples", "kept_tokens_mean", "agreement_with_baseline"):
            assert before[key] == after[key], key
    assert not (tmp_path / "gallery.png").exists()  # finished runs of unknown inputs: no gallery without --input


@pytest.mark.parametrize("label", ["none", "sparsevlm-128", "fastv-r0.25", "random-64+seed=3", "sparsevlm_v2-96",
                                   "sparsevlm-2:300,6:r0.5,15:20+recycle=off", "sparsevlm-192+rank_adaptive=on"])
def test_any_label_a_run_wrote_is_a_configuration(label):
    from schemas import JobConfig

    config = JobConfig.load(overrides=overrides_for(label))
    assert config.sparsity.label == label
