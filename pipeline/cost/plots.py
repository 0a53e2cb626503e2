"""The report's figures as PNG bytes (matplotlib, headless)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def throughput_and_cost(points: list[dict]) -> bytes:
    """points: {name, equiv_tokens, samples_per_s, usd_per_million}; x = layer-averaged visual tokens."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, key, label in ((left, "samples_per_s", "samples / s"),
                             (right, "usd_per_million", "$ per 1M samples")):
        for point in points:
            axis.scatter(point["equiv_tokens"], point[key], s=30)
            axis.annotate(point["name"], (point["equiv_tokens"], point[key]), fontsize=8,
                          xytext=(4, 3), textcoords="offset points")
        axis.set_xlabel("visual tokens per sample (layer-averaged)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    left.set_title("throughput vs visual-token budget")
    right.set_title("cost vs visual-token budget")
    return _png(figure)


def latency_cdf(series: dict[str, np.ndarray]) -> bytes:
    """series: {config name: per-sample GPU ms}."""
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for name, values in series.items():
        if len(values):
            ordered = np.sort(values)
            axis.step(ordered, np.arange(1, len(ordered) + 1) / len(ordered), where="post", label=name)
    axis.set_xlabel("GPU time per sample, ms (vision + prefill + decode share)")
    axis.set_ylabel("fraction of samples")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _png(figure)


def gallery(panels: list[list[dict]]) -> bytes:
    """panels[row][col]: {title, image (H, W, 3) uint8 as the model saw it, kept (h, w) bool per token cell}.

    Pruned cells are darkened; kept cells keep their pixels.
    """
    rows, cols = len(panels), max(len(row) for row in panels)
    figure, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            image, kept = panel["image"], panel["kept"]
            cell_h, cell_w = image.shape[0] // kept.shape[0], image.shape[1] // kept.shape[1]
            mask = np.kron(kept, np.ones((cell_h, cell_w), dtype=bool))[..., None]
            shown = np.where(mask, image, (image * 0.2).astype(np.uint8))
            axes[r, c].imshow(shown)
            axes[r, c].set_title(panel["title"], fontsize=7)
    return _png(figure)
