"""Activation-aware weight quantization (AWQ): per-layer scale search, clip search and folding.

For each group of linears that read the same input (e.g. q/k/v after ``input_layernorm``) AWQ
searches a per-input-channel scale ``s`` so that ``Q(W * s) / s`` keeps the output of the group's
parent module close to full precision; salient channels (large activations) get ``s > 1`` and so
more of the 4-bit grid. ``s`` is folded into the model without changing its fp function: the op
that produces the input is divided by ``s`` (a norm's weight, or the rows of a preceding linear),
the linears' columns multiplied by ``s``. A clip search then shrinks each weight group's range
where that lowers the output error. The layer is left holding the scaled and clipped fp weights;
``mpo.quant.quantizer.quantize_weight`` / ``mpo.quant.pack`` turn them into the checkpoint later.

Model-agnostic over Qwen2/Llama-style decoder layers (``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``).

Usage, one decoder layer at a time (inputs of layer i+1 = outputs of the AWQ-scaled fp layer i)::

    report = quantize_decoder_layer(layer, hidden_BTD, lambda x: layer(x, position_embeddings=pe))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mpo.quant.quantizer import pseudo_quantize

__all__ = [
    "weight_channel_mean",
    "candidate_scales",
    "search_scale",
    "search_clip",
    "apply_scale",
    "apply_clip",
    "quantize_decoder_layer",
]

# Floor on scales: a dead input channel (mean |x| = 0) would otherwise get s = 0.
_MIN_SCALE = 1e-4
# Keeps the per-chunk clip-search output [groups, tokens, out_chunk] around 128 MiB of fp32.
_CLIP_CHUNK_ELEMENTS = 1 << 25


def _first_tensor(out: Any) -> torch.Tensor:
    """Modules such as HF attention return ``(output, weights)``; keep the output."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_linears(linears: list[nn.Linear], in_features: int, group_size: int) -> None:
    if not linears:
        raise ValueError("linears must be a non-empty list of nn.Linear")
    for i, linear in enumerate(linears):
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linears[{i}] must be an nn.Linear, got {type(linear).__name__}")
        if linear.in_features != in_features:
            raise ValueError(
                f"linears[{i}].in_features={linear.in_features} does not match the input's last "
                f"dimension {in_features}; all linears of a group must read the same input"
            )
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size != 0:
        raise ValueError(
            f"group_size={group_size!r} must be a positive divisor of in_features={in_features}"
        )


def weight_channel_mean(linears: list[nn.Linear], group_size: int = 128) -> torch.Tensor:
    """w̄: mean over all rows of the linears of |W| normalised by its group's max |W|.

    Args:
        linears: linears sharing one input of ``I`` features.
        group_size: quantization group size along the input dimension.

    Returns:
        float32 [I], values in [0, 1].
    """
    in_features = linears[0].in_features if linears else 0
    _check_linears(linears, in_features, group_size)
    weight_RI = torch.cat([linear.weight.detach().float() for linear in linears], dim=0)
    w_RGK = weight_RI.abs().reshape(weight_RI.shape[0], -1, group_size)
    # 1e-6 keeps an all-zero group at 0 instead of NaN.
    normalised = w_RGK / (w_RGK.amax(dim=-1, keepdim=True) + 1e-6)
    return normalised.reshape_as(weight_RI).mean(dim=0)


def candidate_scales(x_mean_I: torch.Tensor, w_mean_I: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ scales for one ratio: s = x̄^α / w̄^(1-α), floored at 1e-4, then s /= sqrt(max·min).

    The denominator gets +1e-4 so an all-zero weight column does not divide by zero. The final
    normalisation centres s geometrically around 1 so neither side of the fold drifts in range.

    Args:
        x_mean_I: float [I], mean |activation| per input channel.
        w_mean_I: float [I], ``weight_channel_mean``.
        alpha: ratio in [0, 1].

    Returns:
        float32 [I], strictly positive.
    """
    x_mean_I = x_mean_I.float()
    w_mean_I = w_mean_I.float()
    scales_I = (x_mean_I.pow(alpha) / (w_mean_I.pow(1.0 - alpha) + 1e-4)).clamp(min=_MIN_SCALE)
    return scales_I / (scales_I.max() * scales_I.min()).sqrt()


def _output_mse(parent_forward: Callable, x: torch.Tensor, y_ref: torch.Tensor) -> float:
    y = _first_tensor(parent_forward(x)).float()
    return float((y - y_ref).pow(2).mean())


def search_scale(
    x_NI: torch.Tensor,
    linears: list[nn.Linear],
    parent_forward: Callable[[torch.Tensor], torch.Tensor],
    group_size: int = 128,
    n_grid: int = 20,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Grid-search the AWQ ratio α for one group of linears sharing the input ``x``.

    For α in {0, 1/n_grid, ..., (n_grid-1)/n_grid} the linears get W' = Q(W·s)/s
    (pseudo-quantized, ``s = candidate_scales(x̄, w̄, α)``) and ``parent_forward(x)`` is compared
    with its fp output by MSE. Plain round-to-nearest (s = 1) is measured too and kept if no α
    beats it. Statistics and weight math run in fp32; the parent runs in its own dtype. The
    linears' weights are restored before returning, even on error.

    Args:
        x_NI: input of the linears, [N, I] or [..., I] (whatever ``parent_forward`` takes).
        linears: the linears reading ``x`` (their ``in_features`` must equal I).
        parent_forward: maps ``x`` to the output whose error is minimised (it must run the
            linears); a tuple output is reduced to its first element.
        group_size: quantization group size along I.
        n_grid: number of α values.

    Returns:
        ``(scales_I, report)``: float32 [I] on ``x``'s device, all ones when RTN won; report has
        ``alpha`` (float, or None when RTN won), ``mse_before`` (RTN output MSE), ``mse_after``
        (MSE at the chosen scales), ``mse_fp`` (mean square of the fp output, the yardstick for
        the two MSEs) and ``mse_by_alpha`` (list over the grid).
    """
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive integer, got {n_grid!r}")
    if not isinstance(x_NI, torch.Tensor) or x_NI.dim() < 2:
        raise ValueError("x_NI must be a tensor [N, I] (or [..., I]) of calibration inputs")
    in_features = x_NI.shape[-1]
    _check_linears(linears, in_features, group_size)
    x_flat = x_NI.detach().reshape(-1, in_features).float()
    if not bool(torch.isfinite(x_flat).all()):
        raise ValueError(
            "calibration inputs contain inf/NaN; run calibration in bf16 or fp32 (fp16 overflows "
            "on Qwen activations)"
        )
    x_mean_I = x_flat.abs().mean(dim=0)
    w_mean_I = weight_channel_mean(linears, group_size).to(x_mean_I.device)
    originals = [linear.weight.detach().clone() for linear in linears]

    def mse_with(scales_I: torch.Tensor | None) -> float:
        for linear, w_orig in zip(linears, originals):
            w32 = w_orig.float()
            if scales_I is None:
                w_new = pseudo_quantize(w32, group_size)
            else:
                s = scales_I.to(w32.device)
                w_new = pseudo_quantize(w32 * s, group_size) / s
            linear.weight.data.copy_(w_new.to(linear.weight.dtype))
        return _output_mse(parent_forward, x_NI, y_fp)

    with torch.no_grad():
        y_fp = _first_tensor(parent_forward(x_NI)).float()
        if not bool(torch.isfinite(y_fp).all()):
            raise ValueError("parent_forward produced inf/NaN on the calibration inputs")
        try:
            mse_rtn = mse_with(None)
            best_alpha, best_mse = None, mse_rtn
            best_scales_I = torch.ones_like(x_mean_I)
            mse_by_alpha = []
            for i in range(n_grid):
                alpha = i / n_grid
                scales_I = candidate_scales(x_mean_I, w_mean_I, alpha)
                mse = mse_with(scales_I)
                mse_by_alpha.append(mse)
                if mse < best_mse:
                    best_alpha, best_mse, best_scales_I = alpha, mse, scales_I
        finally:
            for linear, w_orig in zip(linears, originals):
                linear.weight.data.copy_(w_orig)
    report = {
        "alpha": best_alpha,
        "mse_before": mse_rtn,
        "mse_after": best_mse,
        "mse_fp": float(y_fp.pow(2).mean()),
        "mse_by_alpha": mse_by_alpha,
    }
    return best_scales_I, report


def search_clip(
    x_NI: torch.Tensor,
    linear: nn.Linear,
    group_size: int = 128,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
) -> torch.Tensor:
    """Per (output row, group) clip threshold minimising that group's output error.

    As in AutoAWQ, candidates are symmetric: W is clamped to [-m·r, m·r] with m the group's max
    |W| and r = 1 - i/n_grid for i < max_shrink·n_grid (r = 1 is no clip). The error of a
    (row, group) is the MSE over sampled tokens of that group's contribution to the row's
    output, Σ_k x[t, k]·W[o, k] over the group's k, pseudo-quantized vs fp. Groups are
    independent, so each keeps its own best r.

    Args:
        x_NI: input of the linear, [N, I] or [..., I].
        linear: the linear to clip (not modified).
        group_size: quantization group size along I.
        n_grid: grid resolution of r.
        max_shrink: largest fraction of the range that may be cut, in [0, 1).
        n_sample_tokens: tokens used, taken at an even stride over the N inputs.

    Returns:
        ``max_val_OG`` float32 [out, I / group_size]: clip thresholds (weight units).
    """
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive integer, got {n_grid!r}")
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink!r}")
    if not isinstance(n_sample_tokens, int) or n_sample_tokens < 1:
        raise ValueError(f"n_sample_tokens must be a positive integer, got {n_sample_tokens!r}")
    in_features = x_NI.shape[-1]
    _check_linears([linear], in_features, group_size)
    x_TI = x_NI.detach().reshape(-1, in_features)
    stride = max(1, x_TI.shape[0] // n_sample_tokens)
    x_TI = x_TI[::stride][:n_sample_tokens].float()
    num_tokens, num_groups = x_TI.shape[0], in_features // group_size
    w_OGK = linear.weight.detach().float().reshape(linear.out_features, num_groups, group_size)
    x_GTK = x_TI.reshape(num_tokens, num_groups, group_size).transpose(0, 1)
    num_steps = max(1, int(max_shrink * n_grid + 1e-9))
    chunk = max(1, _CLIP_CHUNK_ELEMENTS // max(1, num_groups * num_tokens))
    best_max_chunks = []
    with torch.no_grad():
        for start in range(0, linear.out_features, chunk):
            w_cGK = w_OGK[start : start + chunk]
            org_max_cG = w_cGK.abs().amax(dim=-1)
            # Per-group partial outputs [G, T, c]: batched over groups, one matmul each.
            y_fp_GTc = torch.bmm(x_GTK, w_cGK.permute(1, 2, 0))
            best_err_cG = torch.full_like(org_max_cG, float("inf"))
            best_max_cG = org_max_cG.clone()
            for i in range(num_steps):
                max_cG = org_max_cG * (1.0 - i / n_grid)
                bound = max_cG[..., None]
                w_clip = torch.clamp(w_cGK, -bound, bound)
                w_q = pseudo_quantize(w_clip.reshape(w_cGK.shape[0], -1), group_size)
                y_GTc = torch.bmm(x_GTK, w_q.reshape_as(w_cGK).permute(1, 2, 0))
                err_cG = (y_GTc - y_fp_GTc).pow(2).mean(dim=1).t()
                better = err_cG < best_err_cG
                best_err_cG = torch.where(better, err_cG, best_err_cG)
                best_max_cG = torch.where(better, max_cG, best_max_cG)
            best_max_chunks.append(best_max_cG)
    return torch.cat(best_max_chunks, dim=0)


def apply_clip(linear: nn.Linear, max_val_OG: torch.Tensor) -> None:
    """Clamp each (row, group) of ``linear.weight`` to [-max_val, max_val], in place."""
    out_features, in_features = linear.weight.shape
    if max_val_OG.dim() != 2 or max_val_OG.shape[0] != out_features:
        raise ValueError(
            f"max_val_OG must be [out={out_features}, in/group], got {tuple(max_val_OG.shape)}"
        )
    num_groups = max_val_OG.shape[1]
    if num_groups == 0 or in_features % num_groups != 0:
        raise ValueError(f"max_val_OG has {num_groups} groups, not a divisor of in={in_features}")
    with torch.no_grad():
        w_OGK = linear.weight.float().reshape(out_features, num_groups, -1)
        bound = max_val_OG.to(w_OGK.device).float()[..., None]
        clipped = torch.clamp(w_OGK, -bound, bound).reshape(out_features, in_features)
        linear.weight.copy_(clipped.to(linear.weight.dtype))


def apply_scale(prev_op: nn.Module, linears: list[nn.Linear], scales_I: torch.Tensor) -> None:
    """Fold AWQ scales in place: ``prev_op`` output ÷ s, the linears' input columns × s.

    ``prev_op`` is either an ``nn.Linear`` (its output rows and bias are divided) or a norm that
    computes ``weight * x̂ (+ bias)`` (RMSNorm as in Qwen2/Llama, ``nn.LayerNorm``; its weight and
    bias are divided). Gemma-style ``(1 + weight)`` norms are not foldable this way. The fp
    function of the model is unchanged up to rounding. Math in fp32.

    Args:
        prev_op: module producing the linears' input.
        linears: linears reading that input (``in_features`` = I).
        scales_I: positive float [I].
    """
    if scales_I.dim() != 1:
        raise ValueError(f"scales_I must be 1-D [I], got shape {tuple(scales_I.shape)}")
    if not bool(torch.isfinite(scales_I).all()) or not bool((scales_I > 0).all()):
        raise ValueError("scales_I must be finite and strictly positive")
    num_channels = scales_I.shape[0]
    for i, linear in enumerate(linears):
        if not isinstance(linear, nn.Linear) or linear.in_features != num_channels:
            raise ValueError(f"linears[{i}] must be an nn.Linear with in_features={num_channels}")
    weight = getattr(prev_op, "weight", None)
    if isinstance(prev_op, nn.Linear):
        if prev_op.out_features != num_channels:
            raise ValueError(
                f"prev_op linear has out_features={prev_op.out_features}, "
                f"scales have {num_channels}"
            )
        row_shape = (num_channels, 1)
    elif isinstance(weight, torch.Tensor) and tuple(weight.shape) == (num_channels,):
        row_shape = (num_channels,)
    else:
        raise ValueError(
            f"prev_op {type(prev_op).__name__} must be an nn.Linear or a norm with a weight of "
            f"shape ({num_channels},)"
        )
    with torch.no_grad():
        s = scales_I.float()
        weight.copy_((weight.float() / s.to(weight.device).view(row_shape)).to(weight.dtype))
        bias = getattr(prev_op, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_((bias.float() / s.to(bias.device)).to(bias.dtype))
        for linear in linears:
            w = linear.weight
            w.copy_((w.float() * s.to(w.device)).to(w.dtype))


# Linear submodules of a Qwen2/Llama-style decoder layer, by short name.
_PROJ_PATHS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
# Linears whose input starts a scale group (k/v share q's input, up shares gate's).
_CAPTURED = ("q", "o", "gate", "down")


def _get_submodule(layer: nn.Module, path: str) -> nn.Module:
    try:
        return layer.get_submodule(path)
    except AttributeError as err:
        raise ValueError(
            f"decoder layer {type(layer).__name__} has no submodule '{path}'; expected a "
            "Qwen2/Llama-style layer (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, "
            "input_layernorm, post_attention_layernorm)"
        ) from err


def _capture_inputs(layer: nn.Module, x_BTD: torch.Tensor, layer_forward: Callable) -> dict:
    """Run the layer once; record the fp32 inputs of the group-leading linears (by short name)
    and the attention block's call arguments (under ``"attn_call"``)."""
    captured: dict[str, Any] = {}

    def record(name: str, value: Any) -> None:
        if name in captured:
            raise ValueError(
                "layer_forward ran the layer more than once; run it once over the whole "
                "calibration batch"
            )
        captured[name] = value

    def input_hook(name: str) -> Callable:
        return lambda module, args: record(name, args[0].detach().float())

    def attn_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        record("attn_call", (args, dict(kwargs)))

    handles = [
        _get_submodule(layer, _PROJ_PATHS[name]).register_forward_pre_hook(input_hook(name))
        for name in _CAPTURED
    ]
    attn = _get_submodule(layer, "self_attn")
    handles.append(attn.register_forward_pre_hook(attn_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            layer_forward(x_BTD)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(_CAPTURED + ("attn_call",)) - set(captured))
    if missing:
        raise ValueError(f"layer_forward did not run the layer's modules: missing {missing}")
    return captured


def _attention_replay(attn: nn.Module, call: tuple) -> Callable[[torch.Tensor], torch.Tensor]:
    """Re-run the attention block on new hidden states with the captured mask/positions."""
    args, kwargs = call
    dtype = next(attn.parameters()).dtype

    def forward(x: torch.Tensor) -> torch.Tensor:
        new_kwargs = dict(kwargs)
        # A KV cache would grow with every replay; the search needs none.
        for key in ("past_key_values", "past_key_value"):
            if key in new_kwargs:
                new_kwargs[key] = None
        if "hidden_states" in new_kwargs:
            new_kwargs["hidden_states"] = x.to(dtype)
            return _first_tensor(attn(*args, **new_kwargs))
        return _first_tensor(attn(x.to(dtype), *args[1:], **new_kwargs))

    return forward


def _cast_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    dtype = next(module.parameters()).dtype
    return lambda x: _first_tensor(module(x.to(dtype)))


def _clip_stats(linear: nn.Linear, max_val_OG: torch.Tensor) -> dict[str, float]:
    w_OGK = linear.weight.detach().float().reshape(linear.out_features, max_val_OG.shape[1], -1)
    ratio_OG = max_val_OG / w_OGK.abs().amax(-1).clamp(min=1e-12)
    return {
        "mean_ratio": float(ratio_OG.mean()),
        "clipped_fraction": float((ratio_OG < 1).float().mean()),
    }


def quantize_decoder_layer(
    layer: nn.Module,
    x_BTD: torch.Tensor,
    layer_forward: Callable[[torch.Tensor], Any],
    group_size: int = 128,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
    clip: bool = True,
) -> dict[str, Any]:
    """Run AWQ on one decoder layer in place: search and fold scales, then search and apply clips.

    Groups, in order (captured inputs are divided by each fold's s, which is exact in fp):
    ``input_layernorm -> q,k,v`` (parent: the attention block, replayed with the captured
    mask/position kwargs); ``v_proj -> o_proj`` (parent: o_proj; only when
    v_proj.out_features == o_proj.in_features, i.e. no grouped-query attention);
    ``post_attention_layernorm -> gate,up`` (parent: the MLP); ``up_proj -> down_proj`` (parent:
    down_proj). Then clip search on every linear except q_proj/k_proj.

    The layer keeps fp weights (scaled and clipped); quantize them with ``quantize_weight`` at
    export. The next layer's calibration input should be this layer's output after the call.

    Args:
        layer: Qwen2/Llama-style decoder layer.
        x_BTD: calibration hidden states entering the layer, [B, T, D].
        layer_forward: runs ``layer`` once on its argument with whatever extra arguments it
            needs, e.g. ``lambda x: layer(x, position_embeddings=pe, attention_mask=mask)``.
        group_size: quantization group size.
        n_grid: α grid size for the scale search and r grid for the clip search.
        max_shrink: largest clip fraction.
        n_sample_tokens: tokens used by the clip search.
        clip: run the clip search (False leaves the layer's fp function unchanged).

    Returns:
        ``{"scale": {group_name: search_scale report}, "clip": {linear_name: {"mean_ratio",
        "clipped_fraction"}}, "skipped": [reasons]}``.
    """
    proj = {name: _get_submodule(layer, path) for name, path in _PROJ_PATHS.items()}
    attn, mlp = _get_submodule(layer, "self_attn"), _get_submodule(layer, "mlp")
    norm_attn = _get_submodule(layer, "input_layernorm")
    norm_mlp = _get_submodule(layer, "post_attention_layernorm")
    inputs = _capture_inputs(layer, x_BTD, layer_forward)
    report: dict[str, Any] = {"scale": {}, "clip": {}, "skipped": []}

    # (name, op to divide, linears to multiply, parent forward, key of the captured input)
    groups = [("input_layernorm->q,k,v", norm_attn, ["q", "k", "v"],
               _attention_replay(attn, inputs["attn_call"]), "q")]
    if proj["v"].out_features == proj["o"].in_features:
        groups.append(("v_proj->o_proj", proj["v"], ["o"], _cast_forward(proj["o"]), "o"))
    else:
        report["skipped"].append(
            f"v_proj->o_proj: v_proj.out_features={proj['v'].out_features} != "
            f"o_proj.in_features={proj['o'].in_features} (grouped-query attention)"
        )
    groups.append(("post_attention_layernorm->gate,up", norm_mlp, ["gate", "up"],
                   _cast_forward(mlp), "gate"))
    groups.append(("up_proj->down_proj", proj["up"], ["down"], _cast_forward(proj["down"]), "down"))

    for name, prev_op, linear_names, parent_forward, input_key in groups:
        linears = [proj[n] for n in linear_names]
        x = inputs[input_key]
        scales_I, report["scale"][name] = search_scale(
            x, linears, parent_forward, group_size, n_grid
        )
        apply_scale(prev_op, linears, scales_I)
        # After the fold the linears see x / s; later searches (and the clip) must use that.
        x.div_(scales_I.to(x.device))

    if clip:
        input_keys = {"v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}
        for name, key in input_keys.items():
            max_val_OG = search_clip(
                inputs[key], proj[name], group_size, n_grid, max_shrink, n_sample_tokens
            )
            report["clip"][f"{name}_proj"] = _clip_stats(proj[name], max_val_OG)
            apply_clip(proj[name], max_val_OG)
    return report
