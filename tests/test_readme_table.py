"""The README's performance table is the committed throughput JSON, rendered: never edited by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_table_matches_the_committed_json():
    result = subprocess.run([sys.executable, "-m", "benchmarks.readme_table", "--check"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_row_and_target_of_the_json_is_in_the_readme():
    from benchmarks.readme_table import SOURCE

    report = json.loads(SOURCE.read_text())
    readme = (REPO / "README.md").read_text()
    for row in report["rows"]:
        assert f"| {row['samples_per_s']:.2f} |" in readme
    assert {r["workload"] for r in report["rows"]} == {"vqa-1024", "caption-1024", "video-16f"}
    assert {r["system"] for r in report["rows"]} >= {"vllm_dense", "engine_none", "engine_sparsevlm-128"}
    assert "sparsevlm-128 vs vLLM dense, `vqa-1024` >= 2.2x" in readme
    assert "sparsevlm-128 vs our dense, `video-16f` >= 2.5x" in readme


def test_the_fp8_table_has_every_row_of_its_runs_and_judges_the_fp8_rows_too():
    from benchmarks.readme_table import FP8_BEGIN, FP8_END, FP8_SOURCES

    reports = [json.loads(source.read_text()) for source in FP8_SOURCES]
    readme = (REPO / "README.md").read_text()
    table = readme.split(FP8_BEGIN, 1)[1].split(FP8_END, 1)[0]
    rows = [row for report in reports for row in report["rows"]]
    for row in rows:
        assert f"| {row['samples_per_s']:.2f} |" in table
    assert {r.get("vision_fp8") for r in rows if r["system"].startswith("engine")} == {False, True}
    fp8_row = next(r for r in rows if r["system"] == "engine_sparsevlm-128@fp8" and r["workload"] == "vqa-1024"
                   and r.get("speedup_vs_vllm_dense") is not None)
    assert f"| sparsevlm-128@fp8 vs vLLM dense, `vqa-1024` >= 2.2x | {fp8_row['speedup_vs_vllm_dense']:.2f}x |" in table
    assert table.count("one run") == len(reports)  # each call under its own command


def test_a_run_without_hf_rows_leaves_its_column_and_bars_empty():
    from benchmarks.readme_table import render

    row = dict(workload="vqa-1024", system="engine_none", method="none", samples_per_s=25.0, speedup_vs_hf_best=None,
               speedup_vs_engine_dense=1.0, n_visual_tokens_kept_mean=1024, equiv_visual_tokens_mean=1024,
               n_visual_tokens=1024, vision_s=1.0, prefill_s=1.0, sparse_s=0.0, decode_s=1.0, peak_memory_gb=20.0)
    table = render({"device": "H200", "torch": "2.11", "transformers": "5.17", "command": "python -m x",
                    "rows": [row]})
    assert "| `vqa-1024` | none | 25.00 | 1.00x | 1024 / 1024 of 1024 |" in table
    assert "vs HF" not in table


def test_vllm_rows_get_their_column_and_issue_16s_bars():
    from benchmarks.readme_table import render

    engine = dict(n_visual_tokens_kept_mean=100, equiv_visual_tokens_mean=128, n_visual_tokens=1024, vision_s=1.0,
                  prefill_s=1.0, sparse_s=0.1, decode_s=1.0, peak_memory_gb=20.0, speedup_vs_hf_best=2.0)
    report = {"device": "H200", "torch": "2.11", "transformers": "5.17", "command": "python -m benchmarks.throughput",
              "rows": [{"workload": "vqa-1024", "system": "hf_generate", "batch_size": 16, "samples_per_s": 12.5,
                        "peak_memory_gb": 30.0},
                       {"workload": "vqa-1024", "system": "engine_none", "method": "none", "samples_per_s": 25.0,
                        "speedup_vs_engine_dense": 1.0, "speedup_vs_vllm_dense": 1.25, **engine},
                       {"workload": "vqa-1024", "system": "engine_sparsevlm-128", "method": "sparsevlm-128",
                        "samples_per_s": 40.0, "speedup_vs_engine_dense": 1.6, "speedup_vs_vllm_dense": 2.0, **engine},
                       {"workload": "vqa-1024", "system": "vllm_dense", "samples_per_s": 20.0, "batch_size": 128},
                       {"workload": "video-16f", "system": "vllm_evs0.75", "samples_per_s": 7.0, "batch_size": 64}]}
    table = render(report)
    header = next(line for line in table.splitlines() if line.startswith("| workload"))
    assert "vs vLLM dense" in header
    widths = {line.count("|") for line in table.splitlines() if line.startswith("| `")}
    assert widths == {header.count("|")}  # every row has the header's columns
    assert "| `vqa-1024` | vLLM offline dense | 20.00 |" in table and "vLLM + EVS 0.75" in table
    assert "| sparsevlm-128 vs vLLM dense, `vqa-1024` >= 2.2x | 2.00x | missed |" in table
    assert "| our dense vs vLLM dense, `vqa-1024` >= 1.2x | 1.25x | met |" in table
