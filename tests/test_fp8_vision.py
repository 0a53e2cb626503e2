"""FP8 vision GEMMs (sparsevlm/fp8.py): the linear against a naive per-row reference, the
tower of every family against its full-precision self, and the swap confined to the engine's calls.

CPU runs the same product in fp32 (Fp8Linear.multiply); on CUDA the same code runs on FP8
tensor cores. Tolerances: against the dequantised product the FP8 linear is exact up to fp32
summation order (1e-5 relative); against the unquantised linear, e4m3's 3 mantissa bits give
~3.5% relative error on random data (bounded here by 6%)."""

from __future__ import annotations

import pytest
import torch

from sparsevlm import EngineConfig, SamplingParams, VLMEngine
from sparsevlm.attention import AttentionBackend
from sparsevlm.fp8 import E4M3, Fp8Linear, Fp8SwiGLU, NormFeed, check_fp8_device, fp8_replacements

QUANTISATION_ERROR = 0.06  # relative (Frobenius) error of an e4m3 product against full precision
TOWER_ERROR = 0.12  # the same through a whole tower (errors compound over its blocks: 5-8% on the tiny ones)


def naive_dequantised(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to e4m3's range by its own absolute maximum, rounded to e4m3, scaled back."""
    rows = []
    for row in x.double():
        peak = row.abs().max()
        scale = peak / 448 if peak > 0 else torch.tensor(1.0, dtype=torch.float64)
        rows.append((row / scale).to(E4M3).double() * scale)
    return torch.stack(rows)


@pytest.mark.parametrize("in_features,out_features,bias", [(37, 50, True), (64, 48, False), (120, 3420 // 20, True)])
def test_fp8_linear_equals_the_dequantised_product(in_features, out_features, bias):
    generator = torch.Generator().manual_seed(in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(2, 9, in_features, generator=generator) * 3
    got = Fp8Linear.from_linear(linear)(x)
    want = naive_dequantised(x.reshape(-1, in_features)) @ naive_dequantised(linear.weight.detach()).T
    if bias:
        want = want + linear.bias.detach().double()
    assert got.shape == (2, 9, out_features)
    torch.testing.assert_close(got.reshape(-1, out_features).double(), want, rtol=1e-5, atol=1e-5)


def test_fp8_linear_is_close_to_the_linear_and_really_quantises():
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(1280, 3420)  # Qwen2.5-VL's MLP width: padded to 3424 inside, sliced back
    x = torch.randn(64, 1280, generator=generator)
    got, want = Fp8Linear.from_linear(linear)(x), linear(x)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < QUANTISATION_ERROR


def test_zero_rows_stay_zero():
    linear = torch.nn.Linear(40, 24, bias=False)
    out = Fp8Linear.from_linear(linear)(torch.zeros(3, 40))
    assert torch.isfinite(out).all() and not out.any()


def test_every_linear_is_replaced_once_but_not_inside_multihead_attention():
    shared = torch.nn.Linear(8, 8)
    roots = [torch.nn.Sequential(shared, torch.nn.GELU(), torch.nn.Linear(8, 4)),
             torch.nn.Sequential(shared, torch.nn.MultiheadAttention(8, 2))]
    replaced = fp8_replacements(roots)
    assert [(type(parent).__name__, name) for parent, name, _ in replaced] == [("Sequential", "0"), ("Sequential", "2")]


class SwiGLU(torch.nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(hidden, width), torch.nn.Linear(hidden, width)
        self.down_proj = torch.nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("width,passes_padding", [(50, True), (64, False)])
def test_a_swiglu_mlp_hands_its_padding_on_and_gives_the_same_output(width, passes_padding):
    """Gate and up of an MLP whose width is not a multiple of 16 return it zero-padded and down
    takes it so: the output equals that of FP8 copies that slice and re-pad, bit for bit."""
    torch.manual_seed(width)
    mlp, x = SwiGLU(24, width), torch.randn(3, 7, 24) * 2
    copies = {name: module for _, name, module in fp8_replacements([mlp])}
    assert {name: m.pad_output for name, m in copies.items()} == {
        "gate_proj": passes_padding, "up_proj": passes_padding, "down_proj": False}
    if passes_padding:
        padded = copies["gate_proj"](x)
        assert padded.shape[-1] == 64 and not padded[..., width:].any()
    plain = {name: Fp8Linear.from_linear(getattr(mlp, name)) for name in copies}
    run = lambda m: m["down_proj"](torch.nn.functional.silu(m["gate_proj"](x)) * m["up_proj"](x))  # noqa: E731
    assert torch.equal(run(copies), run(plain))
    with pytest.raises(ValueError, match="features"):
        copies["down_proj"](torch.randn(2, width + 1))


class Qwen2_5Block(torch.nn.Module):
    """A Qwen2.5-VL vision block's FP8-relevant shape: RMSNorm -> linear, RMSNorm -> SiLU SwiGLU."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP, Qwen2_5_VLRMSNorm
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

        config = Qwen2_5_VLVisionConfig(hidden_size=hidden, intermediate_size=width, hidden_act="silu")
        self.norm1, self.norm2 = Qwen2_5_VLRMSNorm(hidden), Qwen2_5_VLRMSNorm(hidden)
        self.qkv, self.mlp = torch.nn.Linear(hidden, 3 * hidden), Qwen2_5_VLMLP(config, bias=True)
        for norm in (self.norm1, self.norm2):
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.qkv(self.norm1(x)), self.mlp(self.norm2(x))], dim=-1)


def assert_same_fp8_result(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """Equal within `tolerance`, but for the rare value that an fp32 difference in summation order
    (a merged GEMM, a fused norm) tipped across an e4m3 rounding boundary, one step (~6%) off,
    which then moves what it feeds: at most 2% of the outputs, 1% in relative Frobenius norm.
    A norm fused where its output is also read elsewhere would be off everywhere."""
    got, want = got.float(), want.float()
    close = torch.isclose(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())
    assert close.float().mean().item() >= 0.98
    assert ((got - want).norm() / want.norm()).item() < 0.01


def _run_replaced(module: torch.nn.Module, replacements, x: torch.Tensor) -> torch.Tensor:
    originals = [(parent, name, getattr(parent, name)) for parent, name, _ in replacements]
    for parent, name, copy in replacements:
        setattr(parent, name, copy)
    try:
        return module(x)
    finally:
        for parent, name, original in originals:
            setattr(parent, name, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_and_swiglu_give_the_unfused_fp8_result(dtype, monkeypatch):
    """The norm computed inside the quantisation and gate/up as one GEMM with one SwiGLU kernel:
    the same numbers as the model's norm and MLP around separate FP8 linears (fp32 up to summation
    order, 1e-5; bf16 within one bf16 rounding of the MLP's intermediate, 2%)."""
    torch.manual_seed(11)
    block = Qwen2_5Block(24, 50).to(dtype)
    x = (torch.randn(2, 9, 24) * 2).to(dtype)
    fused = fp8_replacements([block], [NormFeed(block, "norm1", block, "qkv"), NormFeed(block, "norm2", block, "mlp")])
    assert [type(copy).__name__ for _, _, copy in fused] == ["Identity", "Fp8Linear", "Identity", "Fp8SwiGLU"]
    assert "RMSNorm fused" in repr(fused[1][2]) and "RMSNorm fused" in repr(fused[3][2])
    monkeypatch.setattr("sparsevlm.fp8.is_silu_swiglu", lambda mlp: False)  # the plain path: a linear at a time
    plain = fp8_replacements([block])
    assert all(type(copy).__name__ == "Fp8Linear" for _, _, copy in plain) and len(plain) == 4
    got, want = _run_replaced(block, fused, x), _run_replaced(block, plain, x)
    assert_same_fp8_result(got, want, 1e-5 if dtype == torch.float32 else 2e-2)
    error = ((got.float() - block(x).float()).norm() / block(x).float().norm()).item()
    assert 0 < error < QUANTISATION_ERROR  # and really quantised


def test_fp8_swiglu_checks_what_it_is_given():
    with pytest.raises(ValueError, match="SiLU"):
        Fp8SwiGLU(SwiGLU(8, 16))  # its activation is not an attribute it can check
    with pytest.raises(ValueError, match="RMSNorm or affine LayerNorm"):
        Fp8Linear.from_linear(torch.nn.Linear(8, 4), input_norm=torch.nn.LayerNorm(8, elementwise_affine=False))
    block = Qwen2_5Block(16, 32)
    fused = Fp8Linear.from_linear(block.qkv, input_norm=block.norm1)
    with pytest.raises(ValueError, match="takes 16 features, not 32"):
        fused(torch.randn(3, 32))


def test_a_layer_norm_fuses_and_a_norm_the_kernel_does_not_know_is_left_to_the_compiler():
    torch.manual_seed(2)
    block = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(8), "fc": torch.nn.Linear(8, 8),
                                 "group_norm": torch.nn.GroupNorm(2, 8), "fc2": torch.nn.Linear(8, 8)})
    torch.nn.init.normal_(block["norm"].bias)
    replaced = fp8_replacements([block], [NormFeed(block, "norm", block, "fc"),
                                          NormFeed(block, "group_norm", block, "fc2")])
    assert [(name, type(copy).__name__) for _, name, copy in replaced] == [
        ("norm", "Identity"), ("fc", "Fp8Linear"), ("fc2", "Fp8Linear")]
    fused, plain = replaced[1][2], replaced[2][2]
    assert fused.norm_kind == "layer" and "LayerNorm fused" in repr(fused) and plain.norm_kind == "none"
    x = torch.randn(5, 8) * 3 + 1
    torch.testing.assert_close(fused(x), Fp8Linear.from_linear(block["fc"])(block["norm"](x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_onevision"])
def test_every_tower_fuses_its_norms_and_equals_the_unfused_fp8_tower(family, tiny_checkpoints, monkeypatch):
    """Each adapter names the norms whose output one linear (or MLP) alone reads, from transformers'
    block code; if that code read them elsewhere too, the fused tower would part from the plain
    FP8 one everywhere (fp32 on CPU: the same arithmetic, in other kernels)."""
    from helpers import mixed_samples

    dense = VLMEngine.from_pretrained(tiny_checkpoints[family], dtype=torch.float32, device="cpu")
    fused = VLMEngine(dense.model, dense.processor, engine_config=EngineConfig(vision_fp8=True))
    feeds = dense.adapter.fp8_norm_feeds()
    kinds = [type(module).__name__ for *_, module in fused.adapter._tower_swaps.values()]
    assert feeds and kinds.count("Identity") == len(feeds)  # every named norm is fused away
    assert kinds.count("Fp8SwiGLU") == (len(dense.model.model.visual.blocks) if family == "qwen2_5_vl" else 0)
    monkeypatch.setattr(type(dense.adapter), "fp8_norm_feeds", lambda self: [])
    monkeypatch.setattr("sparsevlm.fp8.is_silu_swiglu", lambda mlp: False)
    plain = VLMEngine(dense.model, dense.processor, engine_config=EngineConfig(vision_fp8=True))
    assert {type(module).__name__ for *_, module in plain.adapter._tower_swaps.values()} == {"Fp8Linear"}
    samples = mixed_samples(dense.processor, seed=5)
    want, got = _visual_rows(plain, samples), _visual_rows(fused, samples)
    assert_same_fp8_result(got, want, 1e-4)


def test_an_older_gpu_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="compute capability >= 8.9.*A100 has 8.0"):
        check_fp8_device(torch.device("cuda", 0))
    check_fp8_device(torch.device("cpu"))  # torch's reference kernels: allowed


def _visual_rows(engine, samples) -> torch.Tensor:
    prepared = [engine.prepare(s, i) for i, s in enumerate(samples)]
    with torch.inference_mode():
        features = engine.adapter.encode_visual(prepared, AttentionBackend("sdpa", torch.device("cpu")))
    return torch.cat([features.by_token_id[key] for key in sorted(features.by_token_id)])


def test_fp8_tower_is_close_to_the_full_precision_tower(any_engine):
    """Every family: all the tower's and projector's linears run in FP8 inside the engine's calls,
    the features stay within e4m3's error, and the model keeps its own modules."""
    from helpers import mixed_samples

    adapter = any_engine.adapter
    modules = [m for root in adapter.tower_roots() for m in root.modules()]
    inside_mha = {id(c) for m in modules if isinstance(m, torch.nn.MultiheadAttention) for c in m.children()}
    linears = {id(m) for m in modules if isinstance(m, torch.nn.Linear) and id(m) not in inside_mha}
    fp8 = VLMEngine(any_engine.model, any_engine.processor, engine_config=EngineConfig(vision_fp8=True))
    replaced = [id(m) for parent, name, _ in fp8.adapter._tower_swaps.values()
                for m in getattr(parent, name).modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(replaced) == sorted(linears) and linears  # each linear once, by itself or inside a fused MLP
    samples = mixed_samples(any_engine.processor, seed=3)  # text-only ones add no rows
    want, got = _visual_rows(any_engine, samples), _visual_rows(fp8, samples)
    assert got.shape == want.shape
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < TOWER_ERROR
    assert linears == {id(m) for root in adapter.tower_roots() for m in root.modules()
                       if isinstance(m, torch.nn.Linear) and id(m) not in inside_mha}  # swapped back after the calls


def test_fp8_engine_answers_and_leaves_text_only_samples_exact(tiny_checkpoints):
    from helpers import mixed_samples

    dense = VLMEngine.from_pretrained(tiny_checkpoints["qwen2_5_vl"], dtype=torch.float32, device="cpu")
    fp8 = VLMEngine(dense.model, dense.processor, engine_config=EngineConfig(vision_fp8=True))
    samples = mixed_samples(dense.processor, seed=4)
    params = SamplingParams(max_new_tokens=5)
    want, got = dense.generate(samples, params), fp8.generate(samples, params)
    assert all(r.stats.n_generated_tokens == 5 or r.stats.finish_reason == "stop" for r in got)
    text_only = [i for i, s in enumerate(samples) if "image_grid_thw" not in s and "video_grid_thw" not in s]
    assert text_only and all(got[i].token_ids == want[i].token_ids for i in text_only)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava", "llava_onevision"])
def test_compiled_fp8_tower_on_cuda_is_close_to_bf16(family, tiny_checkpoints):
    """On FP8 tensor cores, inside the compiled (and fused) tower, padded widths included."""
    from helpers import mixed_samples

    bf16 = VLMEngine.from_pretrained(tiny_checkpoints[family], dtype=torch.bfloat16, device="cuda",
                                     engine_config=EngineConfig(max_cache_tokens=4096, cuda_graphs=False))
    fp8 = VLMEngine(bf16.model, bf16.processor,
                    engine_config=EngineConfig(max_cache_tokens=4096, cuda_graphs=False, vision_fp8=True))
    samples = mixed_samples(bf16.processor, seed=7)

    def rows(engine):
        prepared = [engine.prepare(s, i) for i, s in enumerate(samples)]
        with torch.inference_mode():
            features = engine.adapter.encode_visual(prepared, engine.runner.backend)
        return torch.cat([features.by_token_id[key] for key in sorted(features.by_token_id)]).float()

    want, got = rows(bf16), rows(fp8)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < TOWER_ERROR
    assert [r.stats.n_generated_tokens for r in fp8.generate(samples, SamplingParams(max_new_tokens=3,
                                                                                       ignore_eos=True))] == [3] * 8


def test_the_throughput_benchmark_runs_both_precisions_on_the_same_samples(tmp_path, monkeypatch):
    """`benchmarks.throughput --vision-fp8 both`: the model's precision, then FP8 rows (ending in
    @fp8) on the same workload, each compared with its own precision's dense row."""
    from helpers import throughput_report

    report = throughput_report(tmp_path, monkeypatch, "--vision-fp8", "both")
    assert report["decode_ahead"] is False  # as it took effect: one step at a time on the CPU
    rows = report["rows"]
    assert [(r["system"], r["vision_fp8"]) for r in rows] == [
        ("engine_none", False), ("engine_sparsevlm-128", False),
        ("engine_none@fp8", True), ("engine_sparsevlm-128@fp8", True)]
    dense, fp8_dense = rows[0]["samples_per_s"], rows[2]["samples_per_s"]
    assert rows[1]["speedup_vs_engine_dense"] == pytest.approx(rows[1]["samples_per_s"] / dense)
    assert rows[3]["speedup_vs_engine_dense"] == pytest.approx(rows[3]["samples_per_s"] / fp8_dense)
    assert all(r["n_visual_tokens"] == rows[0]["n_visual_tokens"] for r in rows)
