"""Where a job's model comes from: a path / hub id, or one of the embedded offline models.

The default, `embedded:scene-probe`, is the probe VLM trained here on procedural scenes
(jobs/models/scene-probe, committed): it answers questions about the shipped scene samples.
`embedded:tiny-qwen2_5_vl` is a random-weight Qwen2.5-VL of the real architecture, built on
first use; tests use it where only the plumbing matters.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = "embedded:scene-probe"
TINY_MODEL = "embedded:tiny-qwen2_5_vl"
PROBE_PATH = REPO / "jobs" / "models" / "scene-probe"  # what EMBEDDED_MODEL loads
EMBEDDED_NAMES = {EMBEDDED_MODEL: "embedded scene-probe (trained here on procedural scenes)",
                  TINY_MODEL: "embedded tiny-qwen2_5_vl (random weights)"}


def resolve_model(path: str | None) -> str:
    """A loadable path: the given one, or an embedded offline model (the tiny one built once per machine)."""
    if not path or path == EMBEDDED_MODEL:
        return str(PROBE_PATH)
    if path != TINY_MODEL:
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


def check_media_kind(model_type: str, adapter, kind: str) -> None:
    if kind not in adapter.media_kinds:
        raise ValueError(f"{model_type} models take {' and '.join(f'{k}s' for k in adapter.media_kinds)} only; "
                         f"this job labels {kind}s")


def check_model(path: str | None, kind: str) -> str:
    """Fail before anything runs if the model's family has no adapter or does not take `kind`;
    -> its model_type. Reads config.json only (a hub id fetches that one file)."""
    from transformers import AutoConfig

    from sparsevlm.adapters import adapter_class_for

    local = Path(resolve_model(path)) / "config.json"
    if local.exists():  # a family transformers does not know either: still name the supported ones
        adapter_class_for(json.loads(local.read_text()).get("model_type", "(none)"))
    try:
        config = AutoConfig.from_pretrained(resolve_model(path))
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"model {path}: cannot read its config.json ({reason})") from None
    adapter = adapter_class_for(config.model_type)
    check_media_kind(config.model_type, adapter, kind)
    return config.model_type
