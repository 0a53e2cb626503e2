"""Report configurations by name: "dense", "dense-lowres", or a sparsity label (sparsevlm/config.py:
"sparsevlm-128", "fastv-r0.25", "sparsevlm-2:300,6:200+recycle=off"; the older "fastv-0.25" too), each
optionally ending in "@fp8": the same with the vision tower's GEMMs in FP8 (model.vision_fp8).

A preset (64, 96, 128, 192) is the paper's layer-averaged token count for 576 visual tokens,
scaled by each sample's count.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sparsevlm.config import SparsityConfig, parse_label

DEFAULT_CONFIGS = ("dense", "sparsevlm-192", "sparsevlm-128", "sparsevlm-64", "fastv-128", "random-128",
                   "dense-lowres")


FP8_SUFFIX = "@fp8"


def overrides_for(name: str, lowres_max_pixels: int | None = None) -> dict:
    """Job-config overrides ({"section.field": value}) of a configuration name: dense, dense-lowres, or any
    sparsity label (what a run writes in its method column: none, sparsevlm-128, fastv-r0.25, ...), each
    optionally with the FP8 suffix."""
    if name.endswith(FP8_SUFFIX):
        return overrides_for(name.removesuffix(FP8_SUFFIX), lowres_max_pixels) | {"model.vision_fp8": True}
    if name in ("dense", "none"):
        return {"sparsity.method": "none"}
    if name == "dense-lowres":
        values = {"sparsity.method": "none"}
        return values | ({"media.max_pixels": lowres_max_pixels} if lowres_max_pixels else {})
    try:
        fields = parse_label(name)
        SparsityConfig(**fields)  # a budget or option that cannot run fails here, before any run
    except ValueError as error:
        raise ValueError(f"unknown configuration {name!r}: use dense, dense-lowres or a sparsity label ({error})") \
            from None
    return {f"sparsity.{field}": value for field, value in fields.items()}


def quarter_resolution_pixels(dense: pa.Table, factor: int = 28) -> int:
    """max_pixels giving a quarter of a dense run's median visual tokens (half the side).

    One visual token covers factor x factor pixels (patch 14 x merge 2 for Qwen-VL) of an image,
    or of each pair of video frames (temporal patch 2). On 896x896 images: 1024 -> 256 tokens,
    close to what sparsevlm-128 keeps layer-averaged (~230), so the row shows the matched-budget
    alternative to pruning: fewer pixels.
    """
    ok = dense.filter(pc.is_null(dense.column("error")))
    if not len(ok):
        raise ValueError("dense-lowres: the dense run has no successful rows to size it from; "
                         "pass --lowres-max-pixels")
    groups = np.maximum(1, np.ceil(ok.column("frames_sampled").to_numpy(zero_copy_only=False) / 2))
    per_group = ok.column("n_visual_tokens").to_numpy(zero_copy_only=False) / groups
    return max(factor * factor, int(np.median(per_group) * factor * factor / 4))
