"""Per-sequence summed log-probs without materialising full-vocabulary fp32 logits.

A 4B InternVL policy has a 151,936-token vocabulary: the full fp32 logits of one 2,500-token
sequence take 1.5 GB, and autograd keeps them (plus the log-softmax output) until backward.
`sequence_logps` instead applies the LM head itself, only at labelled positions, `chunk_size`
tokens at a time, and checkpoints each chunk so backward recomputes that chunk's logits instead
of keeping them: logits memory is bounded by chunk_size × V whatever the sequence length.

The caller passes the LLM's final hidden states (after the final norm, before the LM head),
already aligned so that `hidden[:, t]` predicts `labels[:, t]`; for a causal LM that is
`shift_for_next_token(hidden, input_labels)`.

`naive_sequence_logps` is the plain twin on full logits, kept as the reference for tests and
for callers that already have logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["naive_sequence_logps", "sequence_logps", "shift_for_next_token"]


def shift_for_next_token(
    hidden_BTD: torch.Tensor, labels_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a causal LM's outputs with its targets: position t predicts token t + 1.

    Drops the last hidden state (it predicts past the end) and the first label (nothing predicts
    it). Works for logits [B, T, V] in place of hidden states too.

    Args:
        hidden_BTD: hidden states (or logits) [B, T, D] at the input positions.
        labels_BT: token ids at the input positions, ignore_index where no loss is wanted, [B, T].

    Returns:
        (hidden [B, T-1, D], labels [B, T-1]): views, no copy.
    """
    if hidden_BTD.dim() != 3 or labels_BT.dim() != 2:
        raise ValueError(
            f"expected hidden [B, T, D] and labels [B, T], got shapes {tuple(hidden_BTD.shape)} "
            f"and {tuple(labels_BT.shape)}"
        )
    if hidden_BTD.shape[:2] != labels_BT.shape:
        raise ValueError(
            f"hidden [B, T] = {tuple(hidden_BTD.shape[:2])} does not match labels "
            f"{tuple(labels_BT.shape)}; pass the unshifted outputs and labels of one batch"
        )
    if labels_BT.shape[1] < 1:
        raise ValueError("sequence length T must be >= 1 to shift for next-token prediction")
    return hidden_BTD[:, :-1], labels_BT[:, 1:]


def _chunk_token_logps(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    bias_V: torch.Tensor | None,
) -> torch.Tensor:
    """log softmax(h·Wᵀ + b)[target] for one chunk of tokens, [n] in at least fp32.

    The matmul runs in the input dtype (tensor cores for bf16); the [n, V] chunk is upcast before
    the logsumexp, where bf16 would lose most of the precision.
    """
    logits = weight_VD(hidden_ND) if isinstance(weight_VD, torch.nn.Module) else hidden_ND @ weight_VD.t()
    if bias_V is not None:
        logits = logits + bias_V
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target_logits = logits.gather(1, targets_N.unsqueeze(1)).squeeze(1)
    return target_logits - torch.logsumexp(logits, dim=1)


def _check_sequence_inputs(
    hidden_BTD: torch.Tensor,
    lm_head_weight_VD: torch.Tensor,
    labels_BT: torch.Tensor,
    chunk_size: int,
    lm_head_bias: torch.Tensor | None,
) -> None:
    if hidden_BTD.dim() != 3:
        raise ValueError(f"hidden_BTD must be [B, T, D], got shape {tuple(hidden_BTD.shape)}")
    if lm_head_weight_VD.dim() != 2:
        raise ValueError(
            f"lm_head_weight_VD must be [V, D] (nn.Linear.weight layout), got shape "
            f"{tuple(lm_head_weight_VD.shape)}"
        )
    if labels_BT.dim() != 2 or hidden_BTD.shape[:2] != labels_BT.shape:
        raise ValueError(
            f"labels_BT must be [B, T] matching hidden_BTD {tuple(hidden_BTD.shape)}, got shape "
            f"{tuple(labels_BT.shape)} (did you shift only one of them?)"
        )
    if labels_BT.is_floating_point() or labels_BT.is_complex() or labels_BT.dtype == torch.bool:
        raise ValueError(f"labels_BT must hold integer token ids, got dtype {labels_BT.dtype}")
    if hidden_BTD.shape[2] != lm_head_weight_VD.shape[1]:
        raise ValueError(
            f"hidden size {hidden_BTD.shape[2]} does not match lm_head_weight_VD's D = "
            f"{lm_head_weight_VD.shape[1]} (expected weight [V, D])"
        )
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (lm_head_weight_VD.shape[0],):
        raise ValueError(
            f"lm_head_bias must be [V] = [{lm_head_weight_VD.shape[0]}], got shape "
            f"{tuple(lm_head_bias.shape)}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 (tokens per chunk), got {chunk_size!r}")
    device_type = hidden_BTD.device.type
    if hidden_BTD.dtype != lm_head_weight_VD.dtype and not torch.is_autocast_enabled(device_type):
        raise ValueError(
            f"hidden_BTD is {hidden_BTD.dtype} but lm_head_weight_VD is {lm_head_weight_VD.dtype}; "
            "cast one of them or run under torch.autocast"
        )


def sequence_logps(
    hidden_BTD: torch.Tensor,
    lm_head_weight_VD: torch.Tensor,
    labels_BT: torch.Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    lm_head_bias: torch.Tensor | None = None,
    min_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log π(label_t | ·) over the labelled positions of each sequence, chunked.

    logps[b] = Σ_{t: labels[b,t] ≠ ignore} log softmax(hidden[b,t]·Wᵀ + bias)[labels[b,t]]

    Only labelled positions are gathered (N of them, flattened to [N, D]); they are processed
    `chunk_size` tokens at a time: logits in the input dtype, upcast to fp32 per chunk, logsumexp
    and target gather, then per-sequence sums with index_add in fp32. When gradients are needed,
    each chunk runs under non-reentrant activation checkpointing, so nothing of size [chunk, V]
    is kept between forward and backward and backward recomputes one chunk at a time: logits
    memory is O(chunk_size × V), never O(N × V).

    Args:
        hidden_BTD: final hidden states [B, T, D] (bf16/fp16/fp32/fp64), already aligned so that
            hidden[:, t] predicts labels[:, t]: the caller shifts (see `shift_for_next_token`).
        lm_head_weight_VD: LM head weight [V, D] (`nn.Linear.weight`), same dtype as hidden
            unless under autocast; or the LM head module itself (an nn.Linear, bias included),
            called once per chunk, which is what a ZeRO-3-partitioned model needs.
        labels_BT: target ids [B, T], in [0, V) or `ignore_index`.
        chunk_size: tokens per chunk. Peak extra memory is about four fp32 [chunk_size, V]
            buffers (logits copy, logsumexp temporaries, their gradients in backward), measured
            on an H100 with bf16 inputs: 88 MiB at chunk 128 and 536 MiB at chunk 1024 for
            V = 32768 and 8,192 tokens (the full-logits path: 3 GiB). With a 152k vocabulary
            the default 1024 costs ~2.3 GiB; 256 brings it to ~0.6 GiB.
        ignore_index: label value that marks positions without loss (prompt, padding).
        lm_head_bias: optional bias [V].
        min_chunks: run at least this many chunks (extra ones are empty). Under ZeRO-3 every rank
            must call a partitioned head module equally often; the caller passes the max over ranks.

    Returns:
        (logps_B, num_tokens_B): summed log-probs in nats, fp32 ([B]; fp64 for fp64 inputs), 0
        for a row without labelled tokens; and labelled-token counts, int64 [B]. Always part of
        the autograd graph when the inputs require grad, even if no position is labelled.

    Cost: one host sync (boolean-mask gather, needed to know N) plus one for the label range
    check.
    """
    if isinstance(lm_head_weight_VD, torch.nn.Module):
        # A head module (nn.Linear) is called per chunk instead of reading its weight, so that
        # wrappers that gather parameters on call (DeepSpeed ZeRO-3) see every use of it.
        head = lm_head_weight_VD
        if not hasattr(head, "out_features") or not hasattr(head, "in_features"):
            raise ValueError("an lm_head module must be nn.Linear-like (in_features, out_features)")
        if hidden_BTD.dim() != 3 or hidden_BTD.shape[-1] != head.in_features:
            raise ValueError(f"hidden_BTD must be [B, T, {head.in_features}], got {tuple(hidden_BTD.shape)}")
        weight_like = torch.empty(head.out_features, head.in_features, dtype=hidden_BTD.dtype, device="meta")
        _check_sequence_inputs(hidden_BTD.to("meta"), weight_like, labels_BT.to("meta"), chunk_size, None)
        vocab_size = head.out_features
        params = list(head.parameters())
    else:
        _check_sequence_inputs(hidden_BTD, lm_head_weight_VD, labels_BT, chunk_size, lm_head_bias)
        vocab_size = lm_head_weight_VD.shape[0]
        params = [lm_head_weight_VD, lm_head_bias]
    batch_size, seq_len, _ = hidden_BTD.shape
    device = hidden_BTD.device

    mask_BT = labels_BT != ignore_index
    num_tokens_B = mask_BT.sum(dim=1)
    # Boolean indexing gathers straight from a strided (e.g. shifted) view: no [B, T, D] copy.
    hidden_ND = hidden_BTD[mask_BT]
    targets_N = labels_BT[mask_BT].long()
    rows_N = torch.arange(batch_size, device=device).unsqueeze(1).expand(batch_size, seq_len)[mask_BT]
    num_labelled = targets_N.numel()
    if num_labelled and bool(((targets_N < 0) | (targets_N >= vocab_size)).any()):
        raise ValueError(
            f"labels_BT holds ids outside [0, {vocab_size}) other than ignore_index="
            f"{ignore_index}; check the tokenizer/vocab size and the padding/ignore value"
        )

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden_BTD, *params)
    )
    pieces = []
    # max(..., 1): an all-ignored batch still runs one empty chunk so the result stays connected
    # to the graph (backward then gives zero gradients instead of failing).
    for start in range(0, max(num_labelled, 1, min_chunks * chunk_size), chunk_size):
        stop = start + chunk_size
        args = (hidden_ND[start:stop], lm_head_weight_VD, targets_N[start:stop], lm_head_bias)
        if needs_grad:
            pieces.append(
                checkpoint(_chunk_token_logps, *args, use_reentrant=False, preserve_rng_state=False)
            )
        else:
            pieces.append(_chunk_token_logps(*args))
    token_logps_N = torch.cat(pieces)
    logps_B = torch.zeros(batch_size, dtype=token_logps_N.dtype, device=device)
    logps_B = logps_B.index_add(0, rows_N, token_logps_N)
    return logps_B, num_tokens_B


def naive_sequence_logps(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference twin of `sequence_logps` on full logits: log_softmax in fp32, gather, mask, sum.

    Memory: materialises [B, T, V] fp32 log-probs (and keeps them for backward).

    Args:
        logits_BTV: logits [B, T, V], aligned so logits[:, t] predicts labels[:, t].
        labels_BT: target ids [B, T], in [0, V) or `ignore_index`.
        ignore_index: label value for positions without loss.

    Returns:
        (logps_B, num_tokens_B): summed log-probs in nats, at least fp32, [B]; int64 counts [B].
    """
    if logits_BTV.dim() != 3 or labels_BT.dim() != 2 or logits_BTV.shape[:2] != labels_BT.shape:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T] with matching B, T; got "
            f"{tuple(logits_BTV.shape)} and {tuple(labels_BT.shape)}"
        )
    if labels_BT.is_floating_point() or labels_BT.dtype == torch.bool:
        raise ValueError(f"labels_BT must hold integer token ids, got dtype {labels_BT.dtype}")
    mask_BT = labels_BT != ignore_index
    logprobs_BTV = torch.log_softmax(
        logits_BTV.to(torch.promote_types(logits_BTV.dtype, torch.float32)), dim=-1
    )
    safe_labels_BT = torch.where(mask_BT, labels_BT, torch.zeros_like(labels_BT)).long()
    token_logps_BT = logprobs_BTV.gather(2, safe_labels_BT.unsqueeze(2)).squeeze(2)
    token_logps_BT = torch.where(mask_BT, token_logps_BT, torch.zeros_like(token_logps_BT))
    return token_logps_BT.sum(dim=1), mask_BT.sum(dim=1)
