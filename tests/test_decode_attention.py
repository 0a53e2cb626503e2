"""Triton decode attention against its plain-torch reference (interpreter on CPU, real kernel on GPU)."""

from __future__ import annotations

import pytest
import torch

from kernels.decode_attention import decode_attention, decode_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs the Triton interpreter (conftest)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def ragged_case(num_q_heads, num_kv_heads, head_dim, lengths, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, 5, (len(lengths),), generator=generator).tolist()  # unused slots between samples
    starts, offset = [], 3
    for length, gap in zip(lengths, gaps):
        starts.append(offset)
        offset += length + gap
    make = lambda *shape: torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)  # noqa: E731
    q = make(len(lengths), num_q_heads, head_dim)
    k, v = make(offset + 2, num_kv_heads, head_dim), make(offset + 2, num_kv_heads, head_dim)
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return q, k, v, as_int(starts), as_int(lengths)


def check(dtype, device, num_q_heads, num_kv_heads, head_dim, lengths, seed=0):
    q, k, v, starts, lengths_t = ragged_case(num_q_heads, num_kv_heads, head_dim, lengths, dtype, device, seed)
    scale = head_dim ** -0.5
    got = decode_attention(q, k, v, starts, lengths_t, scale).float()
    want = decode_attention_reference(q.float(), k.float(), v.float(), starts, lengths_t, scale)
    err = (got - want).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max abs error {err:.3g} > {TOLERANCE[dtype]} for {dtype}, lengths {lengths}"


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (4, 2), (7, 1), (28, 4)])
@pytest.mark.parametrize("lengths", [[1], [5, 0, 70], [17, 64, 65, 3, 129]])
def test_matches_reference_small_heads(num_q_heads, num_kv_heads, lengths):
    check(torch.float32, DEVICE, num_q_heads, num_kv_heads, 16, lengths, seed=len(lengths) + num_q_heads)


def test_empty_sample_gives_zeros():
    q, k, v, starts, _ = ragged_case(4, 2, 16, [3, 4], torch.float32, DEVICE, 0)
    out = decode_attention(q, k, v, starts, torch.tensor([0, 4], dtype=torch.int32, device=DEVICE), 0.25)
    assert torch.all(out[0] == 0)


def test_launcher_rejects_bad_shapes():
    q, k, v, starts, lengths = ragged_case(6, 4, 16, [3], torch.float32, "cpu", 0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attention(q, k, v, starts, lengths, 0.25)
    q, k, v, starts, lengths = ragged_case(4, 2, 24, [3], torch.float32, "cpu", 0)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q, k, v, starts, lengths, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lengths", [[1, 1300, 7, 0], [2048] * 16, list(range(1, 200, 7))])
def test_matches_reference_gpu(dtype, lengths):
    check(dtype, "cuda", 28, 4, 128, lengths, seed=len(lengths))
