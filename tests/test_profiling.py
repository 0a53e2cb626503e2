"""The profile scripts' trace arithmetic: device idle gaps, the host functions during them, kernel kinds."""

from __future__ import annotations

import random

from benchmarks.decode_steps import kernel_kind
from benchmarks.profile_engine import device_gaps, host_during


def naive_idle(busy: list[tuple[float, float]], min_us: float) -> float:
    """Idle µs between the first start and the last end, by marking every µs (integer times)."""
    first, last = min(s for s, _ in busy), max(e for _, e in busy)
    covered = [any(s <= t < e for s, e in busy) for t in range(int(first), int(last))]
    runs, length = [], 0
    for is_busy in covered + [True]:
        if is_busy:
            if length:
                runs.append(length)
            length = 0
        else:
            length += 1
    return sum(r for r in runs if r > min_us)


def test_device_gaps_equal_a_per_microsecond_count_over_overlapping_kernels():
    rng = random.Random(3)
    for _ in range(20):
        busy = []
        for _ in range(rng.randint(1, 30)):
            start = rng.randint(0, 2000)
            busy.append((start, start + rng.randint(1, 150)))
        trace = {"traceEvents": [{"cat": rng.choice(["kernel", "gpu_memcpy"]), "ts": s, "dur": e - s} for s, e in busy]
                 + [{"cat": "cpu_op", "ts": 0, "dur": 5000}]}  # host events never count as device work
        gaps = device_gaps(trace, min_us=50)
        assert all(end - start > 50 for start, end in gaps)
        assert sum(end - start for start, end in gaps) == naive_idle(busy, 50)


def test_host_during_counts_only_our_functions_and_only_inside_gaps():
    trace = {"traceEvents": [
        {"cat": "kernel", "ts": 0, "dur": 100}, {"cat": "kernel", "ts": 300, "dur": 100},
        {"cat": "kernel", "ts": 600, "dur": 10},
        {"cat": "python_function", "name": "/repo/sparsevlm/engine.py(10): step", "ts": 50, "dur": 500},
        {"cat": "python_function", "name": "/usr/lib/python3/threading.py(5): wait", "ts": 100, "dur": 200},
        {"cat": "python_function", "name": "/repo/kernels/x.py(1): launch", "ts": 420, "dur": 20}]}
    gaps = device_gaps(trace)
    assert gaps == [(100, 300), (400, 600)]
    during = host_during(trace, gaps, ("sparsevlm/", "kernels/"))
    assert during == {"/repo/sparsevlm/engine.py(10): step": 200 + 150, "/repo/kernels/x.py(1): launch": 20}


def test_kernel_kinds():
    assert kernel_kind("_decode_attention_kernel") == "attention"
    assert kernel_kind("nvjet_sm90_tst_144x64_64x8_2x1_v_bz_TNN") == "gemm"
    assert kernel_kind("void cublasLt::splitKreduce_kernel<32, 16, int>") == "gemm"
    assert kernel_kind("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "fused (inductor)"
    assert kernel_kind("Memcpy HtoD (Pinned -> Device)") == "copy"
    assert kernel_kind("void at::native::index_elementwise_kernel<128, 4>") == "other"
