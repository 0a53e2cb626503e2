"""Where a job's model comes from: a path / hub id, or the embedded offline default."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = "embedded:tiny-qwen2_5_vl"


def resolve_model(path: str | None) -> str:
    """A loadable path: the given one, or the embedded offline model, built once per machine."""
    if path and path != EMBEDDED_MODEL:
        return path
    from sparsevlm.tiny import build_tiny_checkpoint

    target = REPO / ".cache" / "tiny-qwen2_5_vl"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))  # same filesystem: the rename below is atomic
        build_tiny_checkpoint(staging / "model", "qwen2_5_vl")
        try:
            (staging / "model").rename(target)  # concurrent actors never see half a model
        except OSError:
            pass  # another actor finished first
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
