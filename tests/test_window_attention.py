"""The vision tower's fused path: the window kernel against per-segment SDPA, and the engine's
tower (window kernel, patch embedding as one GEMM) against transformers' own tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.window_attention import MAX_WINDOW, window_attention, window_attention_reference
from sparsevlm import EngineConfig, VLMEngine
from sparsevlm.adapters.qwen_vl import PatchEmbedAsLinear
from sparsevlm.attention import AttentionBackend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs the Triton interpreter (conftest)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def segments_case(lengths, heads, head_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    make = lambda: torch.randn(total, heads, head_dim, generator=generator).to(DEVICE, dtype)  # noqa: E731
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return make(), make(), make(), cu


@pytest.mark.parametrize("head_dim", [16, 80, 128])
@pytest.mark.parametrize("lengths", [[1], [64, 17, 0, 63, 5], [16] * 6 + [9, 64]])
def test_window_kernel_equals_per_segment_sdpa(head_dim, lengths):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q, k, v, cu = segments_case(lengths, 3, head_dim, dtype, seed=head_dim + len(lengths))
    scale = head_dim ** -0.5
    got = window_attention(q, k, v, cu, scale).float()
    want = window_attention_reference(q.float(), k.float(), v.float(), cu, scale)
    assert (got - want).abs().max().item() <= TOLERANCE[dtype]


def test_window_kernel_reads_strided_heads():
    """transformers hands q/k/v as views of one (T, 3, H, D) projection: not contiguous per tensor."""
    generator = torch.Generator().manual_seed(4)
    qkv = torch.randn(40, 3, 2, 16, generator=generator).to(DEVICE)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 16, 31, 40], dtype=torch.int32, device=DEVICE)
    got = window_attention(q, k, v, cu, 0.25).float()
    want = window_attention_reference(q.float(), k.float(), v.float(), cu, 0.25)
    assert (got - want).abs().max().item() <= TOLERANCE[q.dtype]


def test_backend_routes_vision_attention(monkeypatch):
    """Windows to the kernel, equal-length segments to one batched SDPA, the rest to varlen."""
    backend = AttentionBackend("sdpa", torch.device(DEVICE))
    backend.fused_vision = True  # as on CUDA: on CPU the kernel runs in the interpreter
    varlen_calls = []
    original = AttentionBackend.varlen
    monkeypatch.setattr(AttentionBackend, "varlen", lambda self, *a, **kw: varlen_calls.append(a[5]) or
                        original(self, *a, **kw))
    dtype = torch.float32
    for lengths in ([MAX_WINDOW, 3], [MAX_WINDOW + 1, 3], [70, 70, 70]):
        q, k, v, cu = segments_case(lengths, 2, 16, dtype, seed=1)
        got = backend.vision(q, k, v, cu, max(lengths), 0.25).float()
        want = window_attention_reference(q.float(), k.float(), v.float(), cu, 0.25)
        assert (got - want).abs().max().item() <= (2e-5 if DEVICE == "cpu" else 2e-3)  # cuDNN: TF32-class sums
    assert varlen_calls == [MAX_WINDOW + 1]  # unequal and longer than a tile: the only varlen call


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_fused_tower_equals_transformers_tower(family, tiny_checkpoints, monkeypatch):
    """CPU fp32: the engine's tower with the window kernel (interpreted) and the GEMM patch
    embedding gives transformers' own features (its SDPA window loop) within 1e-5."""
    import kernels.window_attention as kernel_module
    from helpers import mixed_samples

    kernel_calls = []
    kernel = kernel_module.window_attention
    monkeypatch.setattr(kernel_module, "window_attention", lambda *a: kernel_calls.append(1) or kernel(*a))

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the reference Conv3d, on CUDA
    engine = VLMEngine.from_pretrained(tiny_checkpoints[family], dtype=torch.float32, device=DEVICE,
                                       engine_config=EngineConfig(compile_vision=False, cuda_graphs=False))
    adapter = engine.adapter
    backend = AttentionBackend("sdpa", torch.device(DEVICE))
    backend.fused_vision = True
    adapter.fuse_vision()
    samples = [s for s in mixed_samples(engine.processor, seed=2) if "image_grid_thw" in s]
    prepared = [engine.prepare(s, i) for i, s in enumerate(samples)]
    with torch.inference_mode():
        ours = adapter.encode_visual(prepared, backend).by_token_id[engine.model.config.image_token_id]
        output = engine.model.model.get_image_features(
            pixel_values=torch.cat([s["pixel_values"] for s in samples]).to(DEVICE),
            image_grid_thw=torch.cat([s["image_grid_thw"] for s in samples]).to(DEVICE))
    want = torch.cat(list(getattr(output, "pooler_output", output)))
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    vision = engine.model.config.vision_config  # windowed blocks fit the tile; whole images here do not
    windowed = vision.depth - len(getattr(vision, "fullatt_block_indexes", range(vision.depth)))
    assert len(kernel_calls) == windowed
    assert any(isinstance(module, PatchEmbedAsLinear) for *_, module in adapter._tower_swaps.values())
    assert type(adapter.visual.patch_embed).__name__ != "PatchEmbedAsLinear"  # swapped back after the call


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_tower_call_reads_nothing_back_to_the_host(family, tiny_checkpoints, monkeypatch):
    """Inside the engine's tower call no tensor is read back (`.tolist()`, `.item()`: on CUDA each
    waits for the GPU to drain): rotary positions, segments, windows and Qwen3-VL's interpolation
    come computed from the host's grid, once per pack shape. (Same-size images, so whole-image
    attention takes the batched path it takes on CUDA; the window kernel runs interpreted.)"""
    from helpers import chat, random_image

    engine = VLMEngine.from_pretrained(tiny_checkpoints[family], dtype=torch.float32, device=DEVICE,
                                       engine_config=EngineConfig(compile_vision=False, cuda_graphs=False))
    adapter, processor = engine.adapter, engine.processor
    backend = AttentionBackend("sdpa", torch.device(DEVICE))
    backend.fused_vision = True
    adapter.fuse_vision()
    rng = np.random.default_rng(3)
    samples = [processor(text=[chat(processor, "image", text="What is it?")], images=[random_image(rng, 140, 196)])
               for _ in range(3)]
    prepared = [engine.prepare(s, i) for i, s in enumerate(samples)]

    def refuse(name):
        def read_back(tensor, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() inside the tower call")
        return read_back

    run_tower = adapter.run_tower

    def run_without_read_backs(call):
        with monkeypatch.context() as inside:
            for name in ("tolist", "item"):
                inside.setattr(torch.Tensor, name, refuse(name))
            return run_tower(call)

    monkeypatch.setattr(adapter, "run_tower", run_without_read_backs)
    with torch.inference_mode():
        first = adapter.encode_visual(prepared, backend).by_token_id[engine.model.config.image_token_id]
        again = adapter.encode_visual(prepared, backend).by_token_id[engine.model.config.image_token_id]
    assert torch.equal(first, again) and len(adapter._tower_metadata) == 1  # the second pack from the cache


def test_linear_patch_embedding_equals_the_conv(tiny_checkpoints):
    engine = VLMEngine.from_pretrained(tiny_checkpoints["qwen3_vl"], dtype=torch.float32, device="cpu")
    conv = engine.adapter.visual.patch_embed  # Qwen3-VL's has a bias: the GEMM carries it
    assert conv.proj.bias is not None
    patches = torch.randn(37, conv.proj.weight[0].numel(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(PatchEmbedAsLinear(conv)(patches), conv(patches), atol=1e-5, rtol=1e-5)
