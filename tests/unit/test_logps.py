"""Chunked sequence log-probs against the full-logits twin: values, gradients, memory bound."""

from __future__ import annotations

import math

import pytest
import torch

from mpo.train import logps as logps_module
from mpo.train.logps import naive_sequence_logps, sequence_logps, shift_for_next_token

IGNORE = -100


def make_inputs(batch, seq_len, dim, vocab, *, dtype=torch.float32, seed=0, empty_row=None, bias=False):
    """Random hidden/weight/labels; about a third of the positions are ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / math.sqrt(dim)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    labels[torch.rand(batch, seq_len, generator=gen) < 0.35] = IGNORE
    if empty_row is not None:
        labels[empty_row] = IGNORE
    lm_bias = torch.randn(vocab, generator=gen).to(dtype).requires_grad_() if bias else None
    return hidden, weight, labels, lm_bias


def naive_from_hidden(hidden, weight, labels, lm_bias=None):
    logits = hidden @ weight.t()
    if lm_bias is not None:
        logits = logits + lm_bias
    return naive_sequence_logps(logits, labels, IGNORE)


def grads(output, *tensors):
    present = [x for x in tensors if x is not None]
    return torch.autograd.grad(output, present)


# --------------------------------------------------------------------------------------------
# values and gradients
# --------------------------------------------------------------------------------------------


def test_naive_hand_worked():
    # V = 2, logits [0, ln 3] -> log softmax = [ln(1/4), ln(3/4)]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)], [5.0, 5.0]]])
    labels = torch.tensor([[1, 0, IGNORE]])
    logps, counts = naive_sequence_logps(logits, labels)
    assert logps.item() == pytest.approx(math.log(0.75) + math.log(0.25), rel=1e-6)
    assert counts.tolist() == [2]


def test_chunked_hand_worked():
    # D = 1, W = [[0], [1]] so logits = [0, h]; h = ln 3 -> p(token 1) = 3/4
    hidden = torch.tensor([[[math.log(3.0)], [math.log(3.0)]], [[0.0], [0.0]]])
    weight = torch.tensor([[0.0], [1.0]])
    labels = torch.tensor([[1, 0], [IGNORE, 1]])
    logps, counts = sequence_logps(hidden, weight, labels, chunk_size=1)
    assert logps.tolist() == pytest.approx([math.log(0.75) + math.log(0.25), math.log(0.5)], rel=1e-6)
    assert counts.tolist() == [2, 1]


@pytest.mark.parametrize(
    "shape",
    [(1, 5, 4, 11), (2, 9, 8, 37), (3, 7, 6, 64)],
    ids=lambda s: "B{}T{}D{}V{}".format(*s),
)
@pytest.mark.parametrize("chunk", ["one", "smaller", "equal", "larger", "default"])
def test_chunked_matches_naive_fp32(shape, chunk):
    batch, seq_len, dim, vocab = shape
    hidden, weight, labels, lm_bias = make_inputs(
        batch, seq_len, dim, vocab, empty_row=0 if batch > 1 else None, bias=batch == 3
    )
    num_labelled = int((labels != IGNORE).sum())
    chunk_size = {
        "one": 1,
        "smaller": max(1, num_labelled // 3),
        "equal": num_labelled,
        "larger": num_labelled + 5,
        "default": 1024,
    }[chunk]
    logps, counts = sequence_logps(hidden, weight, labels, chunk_size=chunk_size, lm_head_bias=lm_bias)
    ref_logps, ref_counts = naive_from_hidden(hidden, weight, labels, lm_bias)

    assert logps.dtype == torch.float32 and logps.shape == (batch,)
    assert counts.dtype == torch.int64 and counts.tolist() == ref_counts.tolist()
    torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-5)
    if batch > 1:
        assert logps[0].item() == 0.0 and counts[0].item() == 0

    # weighted sum so each row's gradient differs
    weights = torch.linspace(0.5, 1.5, batch)
    got = grads((logps * weights).sum(), hidden, weight, lm_bias)
    want = grads((ref_logps * weights).sum(), hidden, weight, lm_bias)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # ignored positions get exactly no gradient
    assert torch.all(got[0][labels == IGNORE] == 0)


def test_gradcheck_fp64():
    hidden, weight, labels, lm_bias = make_inputs(2, 4, 3, 7, dtype=torch.float64, bias=True, seed=1)
    assert sequence_logps(hidden, weight, labels, chunk_size=2)[0].dtype == torch.float64

    def fn(h, w, b):
        return sequence_logps(h, w, labels, chunk_size=2, lm_head_bias=b)[0]

    assert torch.autograd.gradcheck(fn, (hidden, weight, lm_bias))


def test_bf16_matches_naive():
    hidden, weight, labels, _ = make_inputs(2, 24, 16, 96, dtype=torch.bfloat16, seed=2)
    logps, _ = sequence_logps(hidden, weight, labels, chunk_size=5)
    assert logps.dtype == torch.float32

    # Same bf16 logits, full-vocab path: only the matmul blocking may differ.
    same_logps, _ = naive_from_hidden(hidden, weight, labels)
    torch.testing.assert_close(logps, same_logps, rtol=1e-5, atol=1e-3)
    got = grads(logps.sum(), hidden, weight)
    want = grads(same_logps.sum(), hidden, weight)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)

    # The weight gradient is summed chunk by chunk in bf16 (one rounding per chunk), hence the
    # bf16-level tolerance above. Against fp32 math on the same (bf16-representable) values: bf16
    # logits round to ~2^-8 relative, so sums over ~15 tokens agree to about a hundredth of a nat.
    hidden32 = hidden.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    fp32_logps, _ = naive_from_hidden(hidden32, weight32, labels)
    torch.testing.assert_close(logps, fp32_logps, rtol=0, atol=0.05)
    got32 = grads(fp32_logps.sum(), hidden32, weight32)
    for g, w in zip(got, got32):
        torch.testing.assert_close(g.float(), w, rtol=0.05, atol=0.05)


def test_ignore_only_batch_gives_zeros_and_zero_gradients():
    hidden, weight, labels, _ = make_inputs(2, 5, 4, 9)
    labels.fill_(IGNORE)
    logps, counts = sequence_logps(hidden, weight, labels, chunk_size=3)
    assert logps.tolist() == [0.0, 0.0]
    assert counts.tolist() == [0, 0]
    # still part of the graph, so a training step on such a batch does not crash
    assert logps.requires_grad
    g_hidden, g_weight = grads(logps.sum(), hidden, weight)
    assert torch.all(g_hidden == 0) and torch.all(g_weight == 0)


def test_no_grad_path_matches():
    hidden, weight, labels, _ = make_inputs(2, 6, 4, 13)
    with_grad, _ = sequence_logps(hidden, weight, labels, chunk_size=4)
    with torch.no_grad():
        no_grad, _ = sequence_logps(hidden, weight, labels, chunk_size=4)
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, with_grad.detach())


def test_shift_for_next_token_matches_hand_shift():
    hidden, weight, labels, _ = make_inputs(2, 7, 4, 10, seed=4)
    shifted_hidden, shifted_labels = shift_for_next_token(hidden, labels)
    assert shifted_hidden.shape == (2, 6, 4) and shifted_labels.shape == (2, 6)
    assert torch.equal(shifted_labels, labels[:, 1:])
    assert torch.equal(shifted_hidden, hidden[:, :-1])
    # non-contiguous views go straight in
    logps, _ = sequence_logps(shifted_hidden, weight, shifted_labels, chunk_size=3)
    logits = hidden @ weight.t()
    ref, _ = naive_sequence_logps(*shift_for_next_token(logits, labels))
    torch.testing.assert_close(logps, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# memory bound
# --------------------------------------------------------------------------------------------


def saved_bytes_held(fn, *live_inputs):
    """Bytes of distinct storages autograd keeps from forward to backward, inputs excluded.

    An outer saved-tensors hook sees every tensor the graph saves (including what non-reentrant
    checkpointing stores to recompute from). Storages of the live inputs (hidden, weight) are
    not counted: they exist anyway.
    """
    live = {x.untyped_storage().data_ptr() for x in live_inputs}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in live:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return sum(storages.values()), out


def test_logits_are_not_kept_between_forward_and_backward():
    batch, seq_len, dim, vocab, chunk_size = 2, 16, 8, 4096, 4
    hidden, weight, labels, _ = make_inputs(batch, seq_len, dim, vocab, seed=5)
    labels[labels == IGNORE] = 1  # every position labelled: N = B·T = 32
    num_tokens = batch * seq_len
    full_logits_bytes = num_tokens * vocab * 4  # fp32 [N, V]
    chunk_logits_bytes = chunk_size * vocab * 4

    # Controls: the measurement does catch logits when they are kept.
    naive_bytes, _ = saved_bytes_held(
        lambda: naive_from_hidden(hidden, weight, labels)[0], hidden, weight
    )
    assert naive_bytes >= full_logits_bytes

    def unchecked_chunks():
        # the same chunk math without checkpointing: every chunk's logits stay alive
        mask = labels != IGNORE
        h, tgt = hidden[mask], labels[mask]
        return torch.cat(
            [
                logps_module._chunk_token_logps(h[s : s + chunk_size], weight, tgt[s : s + chunk_size], None)
                for s in range(0, num_tokens, chunk_size)
            ]
        )

    unchecked_bytes, _ = saved_bytes_held(unchecked_chunks, hidden, weight)
    assert unchecked_bytes >= full_logits_bytes  # no single chunk is big, but together they are

    held, (logps, _) = saved_bytes_held(
        lambda: sequence_logps(hidden, weight, labels, chunk_size=chunk_size), hidden, weight
    )
    # What is kept: the gathered [N, D] hidden states and O(N) indices; not one logit.
    assert held < chunk_logits_bytes
    assert held <= num_tokens * dim * 4 + 8 * 8 * num_tokens
    logps.sum().backward()  # and backward still works from what was kept


def test_backward_recomputes_one_chunk_at_a_time(monkeypatch):
    calls = []
    original = logps_module._chunk_token_logps

    def counting(hidden_ND, *rest):
        calls.append(hidden_ND.shape[0])
        return original(hidden_ND, *rest)

    monkeypatch.setattr(logps_module, "_chunk_token_logps", counting)
    hidden, weight, labels, _ = make_inputs(2, 10, 4, 50, seed=6)
    num_labelled = int((labels != IGNORE).sum())
    logps, _ = sequence_logps(hidden, weight, labels, chunk_size=3)
    num_chunks = math.ceil(num_labelled / 3)
    assert len(calls) == num_chunks and max(calls) <= 3
    logps.sum().backward()
    # each chunk's logits are rebuilt during backward, chunk by chunk
    assert len(calls) == 2 * num_chunks and max(calls) <= 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_is_bounded_by_chunk():
    device = torch.device("cuda")
    batch, seq_len, dim, vocab, chunk_size = 2, 4096, 256, 32768, 128
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, seq_len, dim, device=device, dtype=torch.bfloat16, generator=gen)
    hidden.requires_grad_()
    weight = torch.randn(vocab, dim, device=device, dtype=torch.bfloat16, generator=gen) / 16
    weight.requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq_len), device=device, generator=gen)
    num_tokens = batch * seq_len
    full_logits_bytes = num_tokens * vocab * 4  # 1 GiB of fp32 logits
    chunk_logits_bytes = chunk_size * vocab * 4  # 16 MiB

    def peak_extra_bytes(fn):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        out.sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out.detach()

    # first cuBLAS calls allocate their workspace through the caching allocator: warm up
    peak_extra_bytes(lambda: (hidden[0, :chunk_size] @ weight.t()).float())

    naive_peak, ref = peak_extra_bytes(lambda: naive_sequence_logps(hidden @ weight.t(), labels)[0])
    assert naive_peak >= full_logits_bytes  # control: the measurement sees full logits

    peak, logps = peak_extra_bytes(lambda: sequence_logps(hidden, weight, labels, chunk_size=chunk_size)[0])
    # gradients of hidden and weight (bf16) are unavoidable; logits cost a few chunks' worth
    # (bf16 logits, fp32 copy, logsumexp temporaries and their gradients), never N × V
    grad_bytes = hidden.numel() * 2 + weight.numel() * 2
    assert peak < grad_bytes + 6 * chunk_logits_bytes
    assert peak < full_logits_bytes / 8
    torch.testing.assert_close(logps, ref, rtol=1e-3, atol=0.5)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    hidden, weight, labels, _ = make_inputs(2, 5, 4, 9)
    with pytest.raises(ValueError, match="labels_BT"):
        sequence_logps(hidden, weight, labels[:, :4])
    with pytest.raises(ValueError, match="labels_BT"):
        sequence_logps(hidden, weight, labels[:1])
    with pytest.raises(ValueError, match="hidden size"):
        sequence_logps(hidden, weight[:, :3], labels)
    with pytest.raises(ValueError, match="hidden_BTD"):
        sequence_logps(hidden[0], weight, labels)
    with pytest.raises(ValueError, match="lm_head_weight_VD"):
        sequence_logps(hidden, weight[0], labels)
    with pytest.raises(ValueError, match="lm_head_bias"):
        sequence_logps(hidden, weight, labels, lm_head_bias=torch.zeros(8))
    with pytest.raises(ValueError, match="integer"):
        sequence_logps(hidden, weight, labels.float())
    for bad_chunk in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            sequence_logps(hidden, weight, labels, chunk_size=bad_chunk)
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        sequence_logps(hidden.detach().bfloat16(), weight, labels)
    too_big = labels.clone()
    too_big[0, 0] = 9  # V = 9: ids must be < 9
    with pytest.raises(ValueError, match="outside"):
        sequence_logps(hidden, weight, too_big)
    wrong_pad = labels.clone()
    wrong_pad[1, 1] = -1  # e.g. -1 used for padding while ignore_index is -100
    with pytest.raises(ValueError, match="outside"):
        sequence_logps(hidden, weight, wrong_pad)


def test_naive_and_shift_bad_inputs_raise():
    logits = torch.zeros(2, 5, 7)
    with pytest.raises(ValueError):
        naive_sequence_logps(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        naive_sequence_logps(logits[0], torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        naive_sequence_logps(logits, torch.zeros(2, 5))
    with pytest.raises(ValueError):
        shift_for_next_token(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        shift_for_next_token(logits[:, :0], torch.zeros(2, 0, dtype=torch.long))


def test_head_module_path_and_min_chunks_match_weight_path():
    """Passing the LM head module (what ZeRO-3 needs) equals passing its weight; padding chunks is free."""
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 40, bias=True)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.randint(0, 40, (2, 6))
    labels[1, :4] = -100
    by_weight, n1 = sequence_logps(hidden, head.weight, labels, chunk_size=3, lm_head_bias=head.bias)
    by_module, n2 = sequence_logps(hidden, head, labels, chunk_size=3, min_chunks=5)
    torch.testing.assert_close(by_module, by_weight)
    assert torch.equal(n1, n2)
    (g_w,) = torch.autograd.grad(by_weight.sum(), hidden)
    (g_m,) = torch.autograd.grad(by_module.sum(), hidden)
    torch.testing.assert_close(g_m, g_w)
    calls = []
    head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        sequence_logps(hidden, head, labels, chunk_size=3, min_chunks=5)
    assert len(calls) == 5  # 6 labelled tokens = 2 chunks, padded to the agreed 5
    with pytest.raises(ValueError):
        sequence_logps(hidden, torch.nn.Linear(7, 40), labels)
