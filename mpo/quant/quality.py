"""Quality of a quantized model: perplexity of chosen responses, unquantized vs RTN vs AWQ.

    ppl = exp( Σ_samples Σ_{t in response} -log p(y_t | prompt, y_<t) / Σ_samples |response| )

The prompt (images included, through the vision tower) is context only; the response tokens
(answer + ``<|im_end|>``) are scored. RTN is the same unquantized model with every decoder linear
plain round-to-nearest quantized (4 bits, same group size, no scale or clip search); AWQ is the
exported checkpoint loaded with ``load_awq_model``, i.e. exactly what inference runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpo.data.template import IGNORE_INDEX
from mpo.model.load import free_memory, load_model, resolve_dtype
from mpo.quant.awq_linear import load_awq_model
from mpo.quant.calibrate import CalibrationSample, sample_embeddings
from mpo.quant.quantizer import pseudo_quantize
from mpo.train.logps import sequence_logps, shift_for_next_token

__all__ = ["response_nll", "perplexity", "rtn_quantize_", "compare_perplexity"]


@torch.no_grad()
def response_nll(model: nn.Module, samples: list[CalibrationSample],
                 device: str | torch.device) -> tuple[float, int]:
    """Summed negative log-likelihood (nats, fp32 accumulation) of the samples' responses and the
    number of response tokens scored. The whole model must be on ``device``."""
    if not samples:
        raise ValueError("no samples to score; quality needs held-out conversations")
    total, count = 0.0, 0
    for sample in samples:
        if not sample.response_ids:
            raise ValueError("a sample has an empty response; nothing to score")
        embeds_1TD = sample_embeddings(model, sample, device)[None]
        hidden_1TD = model.model.language_model(inputs_embeds=embeds_1TD, use_cache=False).last_hidden_state
        labels = [IGNORE_INDEX] * len(sample.prompt_ids) + list(sample.response_ids)
        labels_1T = torch.tensor([labels], device=hidden_1TD.device)
        hidden_1TD, labels_1T = shift_for_next_token(hidden_1TD, labels_1T)
        logps, num_tokens = sequence_logps(hidden_1TD, model.lm_head, labels_1T, chunk_size=256)
        total -= float(logps.sum())
        count += int(num_tokens.sum())
    return total, count


def perplexity(model: nn.Module, samples: list[CalibrationSample], device: str | torch.device) -> float:
    """exp(mean NLL per response token) over ``samples``."""
    nll, count = response_nll(model, samples, device)
    return math.exp(nll / count)


@torch.no_grad()
def rtn_quantize_(model: nn.Module, group_size: int = 128) -> int:
    """Round-to-nearest 4-bit quantize (and dequantize) every linear of the LLM's decoder layers
    in place; return how many linears were quantized."""
    count = 0
    for module in model.model.language_model.layers.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            weight.copy_(pseudo_quantize(weight.float(), group_size).to(weight.dtype))
            count += 1
    return count


def compare_perplexity(source: str | Path, awq_dir: str | Path, samples: list[CalibrationSample], *,
                       device: str | torch.device, dtype: str | torch.dtype = "bfloat16",
                       group_size: int = 128) -> dict[str, Any]:
    """Held-out response perplexity of the unquantized checkpoint, its RTN twin and the AWQ export.

    One model is on ``device`` at a time. Returns ``{"dtype", "num_samples", "num_tokens",
    "perplexity": {"unquantized", "rtn", "awq"}, "awq_minus_unquantized", "rtn_minus_unquantized"}``.
    """
    device = torch.device(device)
    dtype = resolve_dtype(dtype)
    model = load_model(source, dtype=dtype, device=device).eval()
    nll, count = response_nll(model, samples, device)
    ppl = {"unquantized": math.exp(nll / count)}
    rtn_quantize_(model, group_size)
    ppl["rtn"] = perplexity(model, samples, device)
    del model
    free_memory()
    model = load_awq_model(awq_dir, device=device, dtype=dtype)
    ppl["awq"] = perplexity(model, samples, device)
    del model
    free_memory()
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "num_samples": len(samples),
        "num_tokens": count,
        "perplexity": ppl,
        "awq_minus_unquantized": ppl["awq"] - ppl["unquantized"],
        "rtn_minus_unquantized": ppl["rtn"] - ppl["unquantized"],
    }
