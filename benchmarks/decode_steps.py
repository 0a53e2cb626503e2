"""Decode steps on the wall against on the device: how long the GPU waits for the host.

    python -m benchmarks.decode_steps --model qwen2_5_vl_7b --workload caption-1024 --num-samples 64 \
        --vision-fp8 --json benchmarks/results/h100_decode_steps.json                     # GPU

For each method, with decode steps queued one ahead (`EngineConfig.decode_ahead`, the CUDA default)
and one at a time: a warm-up `generate`, then a timed one. It records the wall time of each
decode call and CUDA events around each replay of a captured decode graph (its input copy
included): the device's time per step for the model, and its idle time from one replay's end
to the next one's start (sampling, then whatever the host makes it wait for). Steps next to a
prefill pack are left out. Prints a table (medians), writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.workloads import WORKLOADS, load_model, make_samples

from sparsevlm import EngineConfig, SamplingParams, SparsityConfig, VLMEngine


class StepClock:
    """Wraps a runner's decode, prefill and graph replays, recording walls and device events."""

    def __init__(self, runner):
        self.calls: list[tuple[float, bool]] = []  # decode call: wall start, a prefill ran before it
        self.replays: list[tuple[torch.cuda.Event, torch.cuda.Event, bool]] = []  # start, end, after a prefill
        self._prefilled = {"calls": False, "replays": False}
        decode, prefill, replay = runner.decode, runner.prefill, runner.graphs.run

        def timed_decode(batch, *args):
            self.calls.append((time.perf_counter(), self._prefilled["calls"]))
            self._prefilled["calls"] = False
            return decode(batch, *args)

        def timed_prefill(pack):
            self._prefilled.update(calls=True, replays=True)
            return prefill(pack)

        def timed_replay(*args):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = replay(*args)
            end.record()
            self.replays.append((start, end, self._prefilled["replays"]))
            self._prefilled["replays"] = False
            return logits

        runner.decode, runner.prefill, runner.graphs.run = timed_decode, timed_prefill, timed_replay

    def summary(self) -> dict:
        torch.cuda.synchronize()
        walls = [1e3 * (b[0] - a[0]) for a, b in zip(self.calls, self.calls[1:]) if not b[1]]
        graphs = [start.elapsed_time(end) for start, end, _ in self.replays]
        idles = [a[1].elapsed_time(b[0]) for a, b in zip(self.replays, self.replays[1:]) if not b[2]]
        if not walls or not idles:
            raise SystemExit("no two decode steps in a row ran through the decode graphs")
        wall, idle = statistics.median(walls), statistics.median(idles)
        return {"steps_timed": len(walls), "wall_ms_per_step": wall, "graph_ms_per_step": statistics.median(graphs),
                "device_idle_ms_per_step": idle, "idle_share": idle / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_5_vl_7b", choices=["tiny", "qwen2_5_vl_7b"])
    parser.add_argument("--workload", default="caption-1024", choices=sorted(WORKLOADS))
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--methods", default="none,sparsevlm-128")
    parser.add_argument("--vision-fp8", action="store_true", help="EngineConfig.vision_fp8")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_steps times CUDA graphs: it needs a GPU")

    model, processor = load_model(args.model, "cuda")
    workload = WORKLOADS[args.workload]
    samples = make_samples(processor, workload, args.num_samples, args.model)
    params = SamplingParams(max_new_tokens=workload.max_new_tokens, ignore_eos=True)
    rows = []
    for ahead in (True, False):
        engine = VLMEngine(model, processor, engine_config=EngineConfig(vision_fp8=args.vision_fp8,
                                                                        decode_ahead=ahead))
        for method in args.methods.split(","):
            sparsity = SparsityConfig.parse(method)
            engine.generate(samples, params, sparsity=sparsity)  # warm-up: compile, capture graphs
            clock = StepClock(engine.runner)
            started = time.perf_counter()
            results = engine.generate(samples, params, sparsity=sparsity)
            seconds = time.perf_counter() - started
            decode_s = sum(r.stats.decode_ms for r in results) / 1e3
            rows.append({"workload": args.workload, "method": sparsity.label, "decode_ahead": ahead,
                         "batch": len(samples), "seconds": seconds, "decode_s": decode_s, **clock.summary()})
            del engine.runner.decode, engine.runner.prefill, engine.runner.graphs.run  # the classes' own again
        del engine
        gc.collect()
        torch.cuda.empty_cache()

    print(f"{'workload':<14}{'method':<16}{'ahead':>6}{'total s':>9}{'decode s':>9}{'wall ms':>9}{'graph ms':>10}"
          f"{'idle ms':>9}{'idle %':>8}")
    for r in rows:
        print(f"{r['workload']:<14}{r['method']:<16}{'on' if r['decode_ahead'] else 'off':>6}{r['seconds']:>9.3f}"
              f"{r['decode_s']:>9.3f}{r['wall_ms_per_step']:>9.2f}{r['graph_ms_per_step']:>10.2f}"
              f"{r['device_idle_ms_per_step']:>9.2f}{100 * r['idle_share']:>7.1f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "model": args.model,
                                         "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "vision_fp8": args.vision_fp8, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
