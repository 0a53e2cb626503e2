"""Run each configuration of a report through the labeling pipeline, on the same inputs."""

from __future__ import annotations

import time
from pathlib import Path

from schemas import JobConfig

from ..run import run_job
from .configs import FP8_SUFFIX, overrides_for, quarter_resolution_pixels
from .report import Run


def run_configurations(names: list[str], kind: str, common: dict, config_file: str | None, base: dict,
                       folder: Path, lowres_max_pixels: int | None) -> list[Run]:
    """One pipeline run per configuration into folder/<name>; `common` overrides apply to all of them.

    dense-lowres without `lowres_max_pixels` is sized from the dense run, which must come first.
    """
    runs = []
    for i, name in enumerate(names, 1):
        output = folder / name
        if output.exists() and any(output.iterdir()):
            raise ValueError(f"{output} already holds a run; choose another --output or report on it with "
                             "--from-runs")
        if name.removesuffix(FP8_SUFFIX) == "dense-lowres" and not lowres_max_pixels:
            dense = next((run for run in runs if run.name == "dense"), None)
            if dense is None:
                raise ValueError("dense-lowres needs --lowres-max-pixels or a dense run before it")
            lowres_max_pixels = quarter_resolution_pixels(dense.table)
        changes = overrides_for(name, lowres_max_pixels)
        config = JobConfig.load(config_file, {**common, **changes, "output.uri": str(output),
                                              "resources.warmup": True}, base=base)
        started = time.perf_counter()
        print(f"[{i}/{len(names)}] {name}: running ({', '.join(f'{k}={v}' for k, v in changes.items())})",
              flush=True)
        run_job(config, kind)
        print(f"[{i}/{len(names)}] {name}: done in {time.perf_counter() - started:.1f}s", flush=True)
        run = Run.read(name, str(output), changes)
        run.path = str(output.relative_to(folder.parent))  # the report folder moves as a whole
        runs.append(run)
    return runs
