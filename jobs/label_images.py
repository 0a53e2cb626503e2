"""Label images: captions (--task caption) or answers to questions (--task vqa, per-row
`prompt` or --prompt). Parquet rows (id, image[, prompt]) in, labels + per-sample stats out.

    python jobs/label_images.py                                     # sample photos, embedded model, offline
    python jobs/label_images.py --task vqa --input data/ --output labels/ --method sparsevlm --budget 64

A rerun onto the same --output skips ids already written. See the README ("Jobs").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, when not pip-installed

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("image", __doc__, base={"generation": {"task": "caption"}}))
