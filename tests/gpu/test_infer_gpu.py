"""GPU tests of the fast generation engine: decode kernels on InternVL2.5-4B's attention shape,
CUDA-graph replay against eager steps, fp32 greedy against `transformers`, bf16 and AWQ decode
against a teacher-forced forward, prefix sharing with row refill, stops inside a graph burst.

If the Triton kernels were imported in interpreter mode in this process (a CPU kernel test module
collected earlier set TRITON_INTERPRET=1), each test runs in a child pytest of this file without it.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_image

from mpo.infer.engine import Engine, Request, SamplingParams
from mpo.infer.fast import FastGenerator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CHILD_FLAG = "MPO_INFER_GPU_CHILD"


def _kernels_interpreted() -> bool:
    from mpo.infer import decode_ops
    from mpo.infer.kernels import KERNELS_INTERPRETED

    return KERNELS_INTERPRETED or decode_ops.KERNELS_INTERPRETED


def native_kernels(test):
    """Run `test` here when the kernels compile natively, else in a child pytest without
    TRITON_INTERPRET (asserting it passed there)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if not _kernels_interpreted():
            return test(*args, **kwargs)
        if os.environ.get(CHILD_FLAG):
            raise RuntimeError("child process still imports the kernels in interpreter mode")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env[CHILD_FLAG] = "1"
        root = Path(__file__).resolve().parents[2]
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root),
             f"{Path(__file__).resolve()}::{test.__name__}"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    return wrapper


@pytest.fixture(scope="module")
def requests_(tmp_path_factory):
    image = write_image(tmp_path_factory.mktemp("gpu_images") / "img.png", size=(64, 48), color=(200, 30, 30))
    return [
        Request("What is the capital of France?"),
        Request("Describe the picture.", images=[str(image)], max_dynamic_patch=1),
        Request("Count to ten.", assistant_prefix="Sure: one, two"),
    ]


def _quantize_decoder_linears(model) -> None:
    """RTN int4 (group 128) AWQ linears in place of every decoder linear."""
    from mpo.quant.awq_linear import WQLinear
    from mpo.quant.pack import AWQLinearWeights

    for layer in model.model.language_model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, WQLinear.from_awq_weights(AWQLinearWeights.from_linear(getattr(parent, name))))


def _teacher_forced_logprobs(engine: Engine, request: Request, token_ids: list[int]) -> torch.Tensor:
    prompt = engine.encode(request)
    ids = torch.tensor([prompt.input_ids + token_ids], device="cuda")
    kwargs = {} if prompt.pixel_values is None else {"pixel_values": prompt.pixel_values.to("cuda", engine.dtype)}
    with torch.no_grad():
        logits = engine.model(input_ids=ids, **kwargs).logits[0].float()
    start = len(prompt.input_ids) - 1
    return torch.log_softmax(logits[start:start + len(token_ids)], dim=-1)


def _assert_consistent_with_forward(engine: Engine, requests_, outputs, tol: float = 0.1) -> None:
    """Each greedy token is (up to 16-bit noise) the forward's argmax, with the forward's log-prob."""
    for request, samples in zip(requests_, outputs):
        g = samples[0]
        ref = _teacher_forced_logprobs(engine, request, g.token_ids)
        chosen = ref[torch.arange(len(g.token_ids)), g.token_ids]
        assert torch.all(chosen >= ref.max(-1).values - tol), (chosen, ref.max(-1).values)
        assert torch.allclose(torch.tensor(g.logprobs, device="cuda"), chosen, atol=tol)


@native_kernels
def test_decode_kernels_on_4b_attention_shape():
    from mpo.infer import decode_ops

    torch.manual_seed(0)
    rows, heads, kv_heads, head_dim, capacity = 3, 16, 2, 128, 1024
    dev, dt = "cuda", torch.bfloat16
    positions = torch.tensor([0, 499, capacity - 1], device=dev)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device=dev).float() / head_dim))
    angles = positions[:, None].float() * inv_freq
    cos = torch.cat([angles, angles], -1).cos().to(dt)
    sin = torch.cat([angles, angles], -1).sin().to(dt)
    q = torch.randn(rows, heads * head_dim, device=dev, dtype=dt)
    k = torch.randn(rows, kv_heads * head_dim, device=dev, dtype=dt)
    v = torch.randn(rows, kv_heads * head_dim, device=dev, dtype=dt)
    cache_k = torch.randn(rows, kv_heads, capacity, head_dim, device=dev, dtype=dt)
    cache_v = torch.randn_like(cache_k)
    ref_k, ref_v = cache_k.clone(), cache_v.clone()
    q_rot = decode_ops.rope_store(q, k, v, cos, sin, positions, cache_k, cache_v)
    q_ref = decode_ops.rope_store_ref(q, k, v, cos, sin, positions, ref_k, ref_v)
    assert torch.allclose(q_rot.float(), q_ref.float(), atol=1e-2)
    assert torch.allclose(cache_k.float(), ref_k.float(), atol=1e-2) and torch.equal(cache_v, ref_v)
    lengths = positions + 1
    want = decode_ops.decode_attention_ref(q_rot.float(), cache_k.float(), cache_v.float(), lengths, head_dim ** -0.5)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for splits in (1, decode_ops.default_num_splits(rows, kv_heads, capacity, sms), 16):
        got = decode_ops.decode_attention(q_rot, cache_k, cache_v, lengths, head_dim ** -0.5, splits)
        assert got.dtype == dt and got.shape == (rows, heads, head_dim)
        assert torch.allclose(got.float(), want, atol=2e-2), (splits, (got.float() - want).abs().max())


@native_kernels
def test_fp32_greedy_equals_transformers_under_cuda_graphs(tiny_model_dir, requests_):
    fast = Engine.load(tiny_model_dir, device="cuda", dtype="fp32")
    hf = Engine(fast.model, fast.processor, device=torch.device("cuda"), backend="hf")
    assert fast.generator.use_graphs and not fast.generator.use_fused  # fused kernels are 16-bit only
    params = SamplingParams(max_new_tokens=16)
    got, want = fast.generate(requests_, params), hf.generate(requests_, params)
    for a, b in zip(got, want):
        assert a[0].token_ids == b[0].token_ids and a[0].text == b[0].text
    assert fast.stats.num_graph_captures == 1


@native_kernels
def test_stop_inside_a_graph_burst_matches_transformers(tiny_model_dir, requests_):
    fast = Engine.load(tiny_model_dir, device="cuda", dtype="fp32")
    hf = Engine(fast.model, fast.processor, device=torch.device("cuda"), backend="hf")
    first = hf.generate(requests_[:1], SamplingParams(max_new_tokens=5))[0][0].token_ids
    prompt = fast.encode(requests_[0])
    with torch.no_grad():  # make <|im_end|> the argmax at the 5th new token of the first request
        hidden = fast.model.model(input_ids=torch.tensor([prompt.input_ids + first[:4]], device="cuda"))
        h = hidden.last_hidden_state[0, -1]
        fast.model.lm_head.weight[fast.stop_id] = h / h.norm() ** 2 * 50.0
    params = SamplingParams(max_new_tokens=20, num_samples=2)
    got, want = fast.generate(requests_, params), hf.generate(requests_, params)
    for a, b in zip(got, want):
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        assert [g.finished for g in a] == [g.finished for g in b]
    assert got[0][0].finished and got[0][0].token_ids[-1] == fast.stop_id and len(got[0][0].token_ids) <= 5


@native_kernels
def test_graph_replay_equals_eager_steps_bf16(tiny_model_dir, requests_):
    engine = Engine.load(tiny_model_dir, device="cuda")  # bf16
    assert engine.generator.use_fused and engine.generator.use_graphs
    eager = FastGenerator(engine.model, stop_id=engine.stop_id, cuda_graphs=False)
    prompts = [engine.encode(r) for r in requests_]
    for params in (SamplingParams(max_new_tokens=12),
                   SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, num_samples=3, seed=1)):
        a, b = engine.generator.generate(prompts, params), eager.generate(prompts, params)
        for x, y in zip(a, b):
            assert [g.token_ids for g in x] == [g.token_ids for g in y]
            for g, h in zip(x, y):
                # same kernels; cuBLAS may still pick another algorithm under capture
                assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(h.logprobs), atol=1e-3)


@native_kernels
def test_fused_bf16_decode_agrees_with_teacher_forced_forward(tiny_model_dir, requests_):
    engine = Engine.load(tiny_model_dir, device="cuda")
    outputs = engine.generate(requests_, SamplingParams(max_new_tokens=12))
    _assert_consistent_with_forward(engine, requests_, outputs)


@native_kernels
def test_awq_model_decodes_with_w4a16_kernels(tiny_model_dir, requests_):
    engine = Engine.load(tiny_model_dir, device="cuda")
    _quantize_decoder_linears(engine.model)
    engine.generator = FastGenerator(engine.model, stop_id=engine.stop_id)  # fused, graphs, W4A16
    fused = engine.generator.pieces.fused[0]
    assert engine.generator.use_fused  # decode reads the K-major repack, prefill the checkpoint layout
    assert all(type(m).__name__ == "KMajorLinear" for m in (fused.qkv, fused.o, fused.gate_up, fused.down))
    outputs = engine.generate(requests_, SamplingParams(max_new_tokens=12))
    _assert_consistent_with_forward(engine, requests_, outputs)
    eager = FastGenerator(engine.model, stop_id=engine.stop_id, cuda_graphs=False)
    again = eager.generate([engine.encode(r) for r in requests_], SamplingParams(max_new_tokens=12))
    assert [s[0].token_ids for s in outputs] == [s[0].token_ids for s in again]


@native_kernels
def test_awq_model_decodes_in_fp32_under_cuda_graphs(tiny_model_dir, requests_):
    """fp32 activations take WQLinear's dequantize fallback on every call, also inside graph capture
    (it once built a host tensor there and failed); greedy tokens equal transformers' generate."""
    fast = Engine.load(tiny_model_dir, device="cuda", dtype="fp32")
    _quantize_decoder_linears(fast.model)
    fast.generator = FastGenerator(fast.model, stop_id=fast.stop_id)
    assert fast.generator.use_graphs and not fast.generator.use_fused
    hf = Engine(fast.model, fast.processor, device=torch.device("cuda"), backend="hf")
    params = SamplingParams(max_new_tokens=12)
    got, want = fast.generate(requests_, params), hf.generate(requests_, params)
    assert [s[0].token_ids for s in got] == [s[0].token_ids for s in want]
    assert fast.stats.num_graph_captures == 1


@native_kernels
def test_prefix_sharing_refill_and_graph_reuse(tiny_model_dir, requests_):
    engine = Engine(*_load_parts(tiny_model_dir), device=torch.device("cuda"), max_batch_rows=4)
    params = SamplingParams(max_new_tokens=10, temperature=0.8, num_samples=4, seed=7)
    first = engine.generate(requests_, params)
    second = engine.generate(requests_, params)
    assert [[g.token_ids for g in s] for s in first] == [[g.token_ids for g in s] for s in second]
    assert engine.stats.num_prefills == 6  # one per prompt per call, though 4 samples share 4 rows
    assert engine.stats.num_graph_captures == 1  # same rows, capacity and sampling: graph reused
    assert all(1 <= len(g.token_ids) <= 10 for s in first for g in s)


def _load_parts(model_dir):
    from mpo.model.load import load_model, load_processor

    return load_model(model_dir, dtype=torch.bfloat16, device="cuda"), load_processor(model_dir)


@native_kernels
def test_batched_prefill_equals_one_prompt_at_a_time(tiny_model_dir, requests_):
    """CUDA twin of the batched prefill (the GPU default): K/V and logits of each right-padded prompt equal its
    own prefill (fp32: tight; bf16: 16-bit noise), and fp32 greedy generation gives the same tokens."""
    from mpo.infer.decoder import prefill, prefill_many

    for dtype, tol in (("fp32", 1e-4), ("bf16", 5e-2)):
        engine = Engine.load(tiny_model_dir, device="cuda", dtype=dtype)
        prompts = [engine.encode(r) for r in requests_]
        pieces = engine.generator.pieces
        batched = prefill_many(pieces, [p.input_ids for p in prompts], [p.pixel_values for p in prompts])
        for prompt, got in zip(prompts, batched):
            pixels = None if prompt.pixel_values is None else prompt.pixel_values.cuda()
            want = prefill(pieces, torch.tensor(prompt.input_ids, device="cuda"), pixels)
            assert got.length == want.length
            for a, b in ((got.keys, want.keys), (got.values, want.values), (got.logits, want.logits)):
                torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    engine = Engine.load(tiny_model_dir, device="cuda", dtype="fp32")
    assert engine.generator.prefill_prompts == 32
    one = FastGenerator(engine.model, stop_id=engine.stop_id, prefill_prompts=1)
    prompts = [engine.encode(r) for r in requests_]
    params = SamplingParams(max_new_tokens=16)
    got, want = engine.generator.generate(prompts, params), one.generate(prompts, params)
    assert [s[0].token_ids for s in got] == [s[0].token_ids for s in want]
    assert engine.stats.num_prefill_batches == 1 and one.stats.num_prefill_batches == len(prompts)
