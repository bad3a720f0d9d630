"""Pieces of the fast decode step: the static KV cache, the torch twins of the decode kernels
against hand-written math, the Triton kernels against their twins (Triton interpreter), and
projection fusion.

Triton decides at import whether kernels are compiled or interpreted (TRITON_INTERPRET), and
transformers imports Triton natively, so the kernel checks run in one child pytest of this file
with TRITON_INTERPRET=1 unless this process already interprets them (this module imports nothing
heavy at the top, so the child starts fast).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mpo.infer.kv_cache import PrefixKV, StaticKVCache

CHILD_FLAG = "MPO_DECODE_OPS_CHILD"


def _rotary_tables(rows: int, head_dim: int, positions: torch.Tensor):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions[:, None].float() * inv_freq[None]
    emb = torch.cat([angles, angles], dim=-1)  # Hugging Face layout
    return emb.cos(), emb.sin()


def _case(rows=3, heads=8, kv_heads=2, head_dim=32, capacity=200, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    positions = torch.tensor([5, 0, capacity - 1, 77, 130][:rows]).clamp(max=capacity - 1)
    cos, sin = _rotary_tables(rows, head_dim, positions)
    return dict(
        q=torch.randn(rows, heads * head_dim, generator=gen).to(dtype),
        k=torch.randn(rows, kv_heads * head_dim, generator=gen).to(dtype),
        v=torch.randn(rows, kv_heads * head_dim, generator=gen).to(dtype),
        cos=cos.to(dtype), sin=sin.to(dtype), positions=positions,
        cache_k=torch.randn(rows, kv_heads, capacity, head_dim, generator=gen).to(dtype),
        cache_v=torch.randn(rows, kv_heads, capacity, head_dim, generator=gen).to(dtype),
    )


def test_cache_loads_prefix_into_rows_and_writes_at_positions():
    cache = StaticKVCache(num_layers=2, num_kv_heads=2, head_dim=4, num_rows=3, capacity=8, dtype=torch.float32,
                          device="cpu")
    assert cache.num_bytes == 2 * 2 * 3 * 2 * 8 * 4 * 4
    keys = torch.arange(2 * 2 * 5 * 4, dtype=torch.float32).view(2, 2, 5, 4)
    prefix = PrefixKV(keys, -keys, torch.zeros(7))
    cache.load_prefix(torch.tensor([0, 2]), prefix)
    assert torch.equal(cache.keys[:, 0, :, :5], keys) and torch.equal(cache.keys[:, 2, :, :5], keys)
    assert torch.equal(cache.values[:, 2, :, :5], -keys)
    assert cache.keys[:, 1].abs().sum() == 0 and cache.keys[:, :, :, 5:].abs().sum() == 0
    new_k = torch.full((3, 2, 4), 9.0)
    cache.write(1, torch.tensor([5, 0, 7]), new_k, -new_k)
    assert (cache.keys[1, 0, :, 5] == 9).all() and (cache.keys[1, 1, :, 0] == 9).all()
    assert (cache.values[1, 2, :, 7] == -9).all()
    assert torch.equal(cache.keys[0, 0, :, :5], keys[0])  # other layers untouched
    with pytest.raises(ValueError, match="does not fit"):
        cache.load_prefix(torch.tensor([0]), PrefixKV(torch.zeros(2, 2, 9, 4), torch.zeros(2, 2, 9, 4), torch.zeros(7)))
    with pytest.raises(ValueError, match=">= 1"):
        StaticKVCache(num_layers=1, num_kv_heads=1, head_dim=4, num_rows=0, capacity=8, dtype=torch.float32,
                      device="cpu")


def test_rope_store_ref_matches_hugging_face_rotary():
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from mpo.infer.decode_ops import rope_store_ref

    case = _case()
    rows, kv_heads, _, head_dim = case["cache_k"].shape
    cache_k, cache_v = case["cache_k"].clone(), case["cache_v"].clone()
    q_rot = rope_store_ref(case["q"], case["k"], case["v"], case["cos"], case["sin"], case["positions"],
                           cache_k, cache_v)
    q = case["q"].view(rows, -1, 1, head_dim)
    k = case["k"].view(rows, kv_heads, 1, head_dim)
    want_q, want_k = apply_rotary_pos_emb(q, k, case["cos"][:, None], case["sin"][:, None])
    assert torch.allclose(q_rot, want_q[:, :, 0], atol=1e-6)
    for r, pos in enumerate(case["positions"].tolist()):
        assert torch.allclose(cache_k[r, :, pos], want_k[r, :, 0], atol=1e-6)
        assert torch.equal(cache_v[r, :, pos], case["v"].view(rows, kv_heads, head_dim)[r])
        untouched = [p for p in range(cache_k.shape[2]) if p != pos]
        assert torch.equal(cache_k[r, :, untouched], case["cache_k"][r, :, untouched])


def test_decode_attention_ref_matches_explicit_softmax():
    from mpo.infer.decode_ops import decode_attention_ref

    case = _case()
    rows, kv_heads, _, head_dim = case["cache_k"].shape
    q = case["q"].view(rows, -1, head_dim)
    lengths = case["positions"] + 1
    got = decode_attention_ref(q, case["cache_k"], case["cache_v"], lengths, head_dim ** -0.5)
    group = q.shape[1] // kv_heads
    for r in range(rows):
        n = int(lengths[r])
        for h in range(q.shape[1]):
            keys, values = case["cache_k"][r, h // group, :n], case["cache_v"][r, h // group, :n]
            weights = torch.softmax(keys @ q[r, h] / math.sqrt(head_dim), dim=0)
            assert torch.allclose(got[r, h], weights @ values, atol=1e-5)


def _kernel_checks() -> None:
    from mpo.infer import decode_ops

    assert decode_ops.KERNELS_INTERPRETED
    for dtype, atol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        case = _case(rows=4, capacity=140, dtype=dtype)
        ref_k, ref_v = case["cache_k"].clone(), case["cache_v"].clone()
        args = (case["q"], case["k"], case["v"], case["cos"], case["sin"], case["positions"])
        q_rot = decode_ops.rope_store(*args, case["cache_k"], case["cache_v"])
        q_ref = decode_ops.rope_store_ref(*args, ref_k, ref_v)
        assert torch.allclose(q_rot.float(), q_ref.float(), atol=atol)
        assert torch.allclose(case["cache_k"].float(), ref_k.float(), atol=atol)
        assert torch.equal(case["cache_v"], ref_v)
        lengths = case["positions"] + 1
        want = decode_ops.decode_attention_ref(q_rot.float(), ref_k.float(), ref_v.float(), lengths, 32 ** -0.5)
        # one chunk, chunks that split rows mid-way, and more chunks than a short row has keys
        for splits in (1, 3):
            got = decode_ops.decode_attention(q_rot, case["cache_k"], case["cache_v"], lengths, 32 ** -0.5, splits)
            assert got.dtype == dtype
            assert torch.allclose(got.float(), want, atol=atol), (dtype, splits, (got.float() - want).abs().max())
    # no grouping (H = KV) and a group larger than 16 (padded query block)
    for heads, kv_heads in ((4, 4), (32, 1)):
        case = _case(rows=2, heads=heads, kv_heads=kv_heads, capacity=70)
        q = case["q"].view(2, heads, 32)
        lengths = case["positions"] + 1
        got = decode_ops.decode_attention(q, case["cache_k"], case["cache_v"], lengths, 0.2, 2)
        assert torch.allclose(got, decode_ops.decode_attention_ref(q, case["cache_k"], case["cache_v"], lengths, 0.2),
                              atol=1e-5)
    with pytest.raises(ValueError, match="group"):
        decode_ops.decode_attention(torch.zeros(1, 6, 32), torch.zeros(1, 4, 8, 32), torch.zeros(1, 4, 8, 32),
                                    torch.ones(1, dtype=torch.long), 1.0)


def test_triton_kernels_match_torch_twins_in_interpreter():
    from mpo.infer import decode_ops

    if decode_ops.KERNELS_INTERPRETED:
        _kernel_checks()
        return
    if os.environ.get(CHILD_FLAG):
        raise RuntimeError("child process could not import the decode kernels in interpreter mode")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", **{CHILD_FLAG: "1"})
    tests_dir = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tests_dir.parent),
         f"{Path(__file__).resolve()}::test_triton_kernels_match_torch_twins_in_interpreter"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "1 passed" in proc.stdout


def test_fuse_dense_linears_keeps_originals_as_views():
    from mpo.infer.decoder import fuse_linears

    torch.manual_seed(0)
    q, k, v = nn.Linear(16, 32), nn.Linear(16, 8), nn.Linear(16, 8)
    x = torch.randn(3, 16)
    before = [m(x) for m in (q, k, v)]
    fused = fuse_linears([q, k, v])
    assert fused.out_features == 48
    assert torch.allclose(fused(x), torch.cat(before, dim=-1), atol=1e-6)
    for m, want in zip((q, k, v), before):
        assert torch.allclose(m(x), want, atol=1e-6)
        assert m.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    assert fuse_linears([q]) is None
    assert fuse_linears([nn.Linear(16, 4), nn.Linear(8, 4)]) is None  # input sizes differ
    assert fuse_linears([nn.Linear(16, 4), nn.Linear(16, 4, bias=False)]) is None
    assert fuse_linears([nn.Linear(16, 4), nn.Identity()]) is None


def test_fuse_awq_linears_concatenates_packed_outputs():
    from mpo.infer.decoder import fuse_linears
    from mpo.quant.awq_linear import WQLinear
    from mpo.quant.pack import AWQLinearWeights

    torch.manual_seed(1)
    dense = [nn.Linear(128, 64), nn.Linear(128, 16), nn.Linear(128, 16)]
    quantized = [WQLinear.from_awq_weights(AWQLinearWeights.from_linear(m)) for m in dense]
    x = torch.randn(2, 128)
    fused = fuse_linears(quantized)
    assert isinstance(fused, WQLinear) and fused.out_features == 96
    assert torch.allclose(fused(x), torch.cat([m(x) for m in quantized], dim=-1), atol=1e-5)
    assert fuse_linears([quantized[0], dense[1]]) is None  # mixed kinds stay separate


def test_kmajor_linear_matches_awq_linears_and_decode_linear_picks_by_device():
    from mpo.infer.decode_linears import KMajorLinear, decode_linear
    from mpo.quant.awq_linear import WQLinear
    from mpo.quant.pack import AWQLinearWeights

    torch.manual_seed(2)
    dense = [nn.Linear(256, 64), nn.Linear(256, 16), nn.Linear(256, 16)]
    quantized = [WQLinear.from_awq_weights(AWQLinearWeights.from_linear(m)) for m in dense]
    x = torch.randn(3, 256)
    want = torch.cat([m(x) for m in quantized], dim=-1)
    assert KMajorLinear.supports(quantized)
    repacked = KMajorLinear.from_awq(quantized)  # CPU: the fp32 twin runs
    assert repacked.out_features == 96 and repacked.in_features == 256
    torch.testing.assert_close(repacked(x), want, atol=1e-5, rtol=1e-5)
    single = KMajorLinear.from_awq(quantized[:1])
    torch.testing.assert_close(single(x), quantized[0](x), atol=1e-5, rtol=1e-5)
    # On CPU, decode keeps the checkpoint layout (fused WQLinear; a single linear runs as it is).
    assert isinstance(decode_linear(quantized), WQLinear)
    assert decode_linear(quantized[:1]) is None
    assert not KMajorLinear.supports(dense)
    g64 = [WQLinear.from_awq_weights(AWQLinearWeights.from_linear(nn.Linear(192, 16), group_size=64))]
    assert not KMajorLinear.supports(g64)  # K = 192 is not a multiple of the 128-row repack block
