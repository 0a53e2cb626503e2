"""`ray job submit --working-dir . -- python jobs/caption_videos.py ...` against a local
`ray start --head` cluster: what users run, end to end (CPU, embedded model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.run import SAMPLE_DATA

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_ray_job_submit_caption_videos(tmp_path):
    bin_dir = Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    # the job's `python` must be this environment's: the head node's PATH decides
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "disabled"}  # a throwaway local cluster: no token to hand around
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run([ray, "start", "--head", "--num-cpus", "2", "--disable-usage-stats",
                              "--dashboard-host", "127.0.0.1", "--dashboard-port", "8265"],
                             env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        out = tmp_path / "captions"
        result = subprocess.run(
            [ray, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", str(REPO), "--",
             "python", "jobs/caption_videos.py", "--output", str(out), "--max-new-tokens", "4", "--num-frames", "4"],
            env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
        assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
        assert "succeeded" in result.stdout
        table = pads.dataset(str(out), format="parquet").to_table()
        expected = pq.read_table(SAMPLE_DATA["video"]).column("id").to_pylist()
        assert sorted(table.column("id").to_pylist()) == sorted(expected)
        assert table.column("error").null_count == len(table)
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
