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
    report = json.loads((REPO / "benchmarks" / "results" / "h100_throughput.json").read_text())
    readme = (REPO / "README.md").read_text()
    for row in report["rows"]:
        assert f"| {row['samples_per_s']:.2f} |" in readme
    assert {r["workload"] for r in report["rows"]} == {"vqa-256", "vqa-1024", "caption-1024", "video-16f"}
    assert "sparsevlm-128 vs HF, `vqa-1024` >= 6x" in readme
