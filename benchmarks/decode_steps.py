"""Decode steps on the wall against on the device: how long the GPU waits for the host.

    python -m benchmarks.decode_steps --model qwen2_5_vl_7b --workload caption-1024 --num-samples 64 \
        --vision-fp8 --json benchmarks/results/h100_decode_steps.json                     # GPU

For each method, with decode steps queued one ahead (`EngineConfig.decode_ahead`, the CUDA default)
and one at a time: a warm-up `generate`, then a timed one. It records the wall time of each
decode call and CUDA events around each replay of a captured decode graph (its input copy
included): the device's time per step for the model, and its idle time from one replay's end
to the next one's start (sampling, then whatever the host makes it wait for). Steps next to a
prefill pack are left out. Prints a table (medians), writes JSON.

`--kernels` also profiles the dense decode graph alone (torch.profiler, CUDA kernels only): the
bucket of `--num-samples` rows replayed over a synthetic cache of each sample's prompt plus half
its answer, every row's layers in their own slots as the pool lays them out. It prints each
kernel's time per step, the kernels by kind, and the bytes the step must read (weights, cache)
against the graph's time.
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
from torch.profiler import ProfilerActivity, profile

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


KERNEL_KINDS = (  # (kind, name fragments), first match wins
    ("attention", ("decode_attention",)),
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90_", "splitk")),
    ("fused (inductor)", ("triton_",)),
    ("copy", ("memcpy", "copy")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, fragments in KERNEL_KINDS if any(f in lowered for f in fragments)), "other")


def synthetic_block(runner, batch: int, kv_length: int) -> torch.Tensor:
    """A pinned decode input block: `batch` rows, each layer of each row `kv_length` cached tokens in
    its own slots (wrapping round the pool if it is smaller), the new K/V to the spare slot."""
    layout, pool = runner.decode_inputs, runner.pool
    layers = layout.num_layers
    bucket = runner.graphs.bucket(batch)
    block = torch.tensor(layout.padding(pool.spare_slot), dtype=torch.long)[:, None].repeat(1, bucket)
    usable = pool.capacity - kv_length
    if usable < 1:
        raise SystemExit(f"the KV pool ({pool.capacity} slots) cannot hold one row of {kv_length} cached tokens")
    for row in range(batch):
        block[1, row] = kv_length - 1
        for layer in range(layers):
            block[2 + layers + layer, row] = ((row * layers + layer) * kv_length) % usable
            block[2 + 2 * layers + layer, row] = kv_length
    return block.pin_memory()


@torch.inference_mode()  # the graphs' input blocks are inference tensors
def kernel_profile(runner, batch: int, kv_length: int, steps: int = 20) -> dict:
    block = synthetic_block(runner, batch, kv_length)
    for _ in range(3):
        runner.graphs.run(block, batch)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        runner.graphs.run(block, batch)
    end.record()
    torch.cuda.synchronize()
    graph_ms = start.elapsed_time(end) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.graphs.run(block, batch)
        torch.cuda.synchronize()
    kernels = [{"name": e.key, "kind": kernel_kind(e.key), "calls_per_step": e.count / steps,
                "ms_per_step": e.device_time_total / 1e3 / steps}
               for e in prof.key_averages() if e.device_time_total > 0 and not e.key.startswith("cuda")]
    kernels.sort(key=lambda k: -k["ms_per_step"])
    adapter = runner.adapter
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for layer in adapter.layers
                       for m in layer.modules() if isinstance(m, torch.nn.Linear))
    weight_bytes += adapter.lm_head.weight.numel() * adapter.lm_head.weight.element_size()
    cache_bytes = batch * kv_length * runner.decode_inputs.num_layers * runner.pool.bytes_per_slot(
        adapter.num_kv_heads, adapter.head_dim, runner.dtype)
    kinds: dict[str, float] = {}
    for k in kernels:
        kinds[k["kind"]] = kinds.get(k["kind"], 0.0) + k["ms_per_step"]
    return {"batch": batch, "bucket": runner.graphs.bucket(batch), "kv_length": kv_length,
            "graph_ms_per_step": graph_ms, "kernel_ms_per_step": sum(kinds.values()),
            "kernel_launches_per_step": sum(k["calls_per_step"] for k in kernels),
            "weight_gb": weight_bytes / 1e9, "cache_gb": cache_bytes / 1e9, "ms_by_kind": kinds, "kernels": kernels}


def print_kernel_profile(p: dict) -> None:
    print(f"\ndense decode graph, {p['batch']} rows (bucket {p['bucket']}), {p['kv_length']} cached tokens each: "
          f"{p['graph_ms_per_step']:.2f} ms/step replayed, {p['kernel_ms_per_step']:.2f} ms in "
          f"{p['kernel_launches_per_step']:.0f} kernels")
    gemm_ms, attention_ms = p["ms_by_kind"].get("gemm", 0.0), p["ms_by_kind"].get("attention", 0.0)
    print(f"reads: weights {p['weight_gb']:.2f} GB ({p['weight_gb'] / max(gemm_ms, 1e-9):.2f} TB/s in the GEMMs), "
          f"cache {p['cache_gb']:.2f} GB ({p['cache_gb'] / max(attention_ms, 1e-9):.2f} TB/s in attention)")
    for kind, ms in sorted(p["ms_by_kind"].items(), key=lambda item: -item[1]):
        print(f"  {kind:<20}{ms:>8.3f} ms")
    print(f"{'kernel':<90}{'calls':>7}{'ms/step':>9}{'us/call':>9}")
    for k in p["kernels"][:25]:
        print(f"{k['name'][:88]:<90}{k['calls_per_step']:>7.0f}{k['ms_per_step']:>9.3f}"
              f"{1e3 * k['ms_per_step'] / k['calls_per_step']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_5_vl_7b", choices=["tiny", "qwen2_5_vl_7b"])
    parser.add_argument("--workload", default="caption-1024", choices=sorted(WORKLOADS))
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--methods", default="none,sparsevlm-128")
    parser.add_argument("--vision-fp8", action="store_true", help="EngineConfig.vision_fp8")
    parser.add_argument("--no-fuse-qkv", action="store_true", help="q, k and v as three GEMMs "
                        "(EngineConfig.fuse_qkv off)")
    parser.add_argument("--kernels", action="store_true", help="also profile the dense decode graph's kernels")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_steps times CUDA graphs: it needs a GPU")

    model, processor = load_model(args.model, "cuda")
    workload = WORKLOADS[args.workload]
    samples = make_samples(processor, workload, args.num_samples, args.model)
    params = SamplingParams(max_new_tokens=workload.max_new_tokens, ignore_eos=True)
    rows, kernels = [], None
    for ahead in (True, False):
        engine = VLMEngine(model, processor, engine_config=EngineConfig(vision_fp8=args.vision_fp8,
                                                                        decode_ahead=ahead,
                                                                        fuse_qkv=not args.no_fuse_qkv))
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
            if args.kernels and kernels is None and sparsity.method == "none":
                answer = statistics.median(r.stats.n_generated_tokens for r in results)
                prompt = statistics.median(r.stats.n_prompt_tokens for r in results)
                kernels = kernel_profile(engine.runner, len(samples), int(prompt + answer // 2))
        del engine
        gc.collect()
        torch.cuda.empty_cache()

    print(f"{'workload':<14}{'method':<16}{'ahead':>6}{'total s':>9}{'decode s':>9}{'wall ms':>9}{'graph ms':>10}"
          f"{'idle ms':>9}{'idle %':>8}")
    for r in rows:
        print(f"{r['workload']:<14}{r['method']:<16}{'on' if r['decode_ahead'] else 'off':>6}{r['seconds']:>9.3f}"
              f"{r['decode_s']:>9.3f}{r['wall_ms_per_step']:>9.2f}{r['graph_ms_per_step']:>10.2f}"
              f"{r['device_idle_ms_per_step']:>9.2f}{100 * r['idle_share']:>7.1f}%")
    if kernels:
        print_kernel_profile(kernels)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "model": args.model,
                                         "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "vision_fp8": args.vision_fp8, "fuse_qkv": not args.no_fuse_qkv,
                                         "rows": rows,
                                         "kernel_profile": kernels}, indent=2))


if __name__ == "__main__":
    main()
