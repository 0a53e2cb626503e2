"""Report configurations by name: "dense", "dense-lowres", "<method>[-<budget>]".

A budget above 1 is a preset (64, 96, 128, 192: the paper's token counts for 576 visual
tokens, scaled by each sample's count); at most 1 it is a keep ratio.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DEFAULT_CONFIGS = ("dense", "sparsevlm-192", "sparsevlm-128", "sparsevlm-64", "fastv-128", "random-128",
                   "dense-lowres")
METHODS = ("sparsevlm", "sparsevlm_v2", "fastv", "random")


def overrides_for(name: str, lowres_max_pixels: int | None = None) -> dict:
    """Job-config overrides ({"section.field": value}) of a configuration name."""
    if name == "dense":
        return {"sparsity.method": "none"}
    if name == "dense-lowres":
        values = {"sparsity.method": "none"}
        return values | ({"media.max_pixels": lowres_max_pixels} if lowres_max_pixels else {})
    method, _, budget = name.partition("-")
    if method not in METHODS:
        raise ValueError(f"unknown configuration {name!r}: use dense, dense-lowres or <method>[-<budget>] "
                         f"with method one of {', '.join(METHODS)}")
    values: dict = {"sparsity.method": method}
    if budget:
        try:
            number = float(budget)
        except ValueError:
            raise ValueError(f"configuration {name!r}: budget {budget!r} is not a number") from None
        if number > 1:
            values["sparsity.preset"] = int(number)
        else:
            values["sparsity.keep_ratio"] = number
    return values


def budget_of(name: str) -> float | None:
    """The preset of a name like sparsevlm-128 (None for dense rows and keep ratios): the plots' x axis."""
    _, _, budget = name.partition("-")
    try:
        number = float(budget)
    except ValueError:
        return None
    return number if number > 1 else None


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
