"""Caption videos: Parquet rows (id, video[, prompt]) in, captions + per-sample stats out.

    python jobs/caption_videos.py                                   # sample videos, embedded model, offline
    ray job submit --working-dir . -- python jobs/caption_videos.py \\
        --input s3://bucket/videos/ --output s3://bucket/captions/ --model Qwen/Qwen2.5-VL-7B-Instruct

A rerun onto the same --output skips ids already written. See the README ("Jobs").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, when not pip-installed

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("video", __doc__, base={"generation": {"task": "caption"}}))
