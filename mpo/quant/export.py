"""AWQ export: quantize a native InternVL checkpoint's LLM to 4 bits, layer by layer, and write it.

    python -m mpo.export_awq model=runs/4b/final data=/data/MMPR output_dir=runs/4b/awq

Pipeline (``export_awq``):

1. Load the checkpoint on the CPU in ``dtype`` (bf16 by default; fp16 is refused because Qwen
   activations overflow it). Only what is being worked on goes to ``device``.
2. Calibration (``mpo.quant.calibrate``): conversations -> hidden states entering decoder layer 0.
3. For each decoder layer, moved to ``device`` alone: outputs in full precision and with plain
   round-to-nearest (RTN), then ``mpo.quant.search.quantize_decoder_layer`` (scale search with
   the output MSE of each group's parent module, fold into the preceding norm / linear, clip
   search except q/k), then each linear is packed (``AWQLinearWeights.from_linear``: 4 bits,
   group 128, zero point, fp16 scales) and its weight replaced by the dequantized one, so the
   layer now computes exactly what the checkpoint will. The next layer is calibrated on this
   quantized layer's output (``feed_quantized_output``, default): each layer's search then sees
   the inputs it will get at inference, errors of earlier layers included (AutoAWQ feeds the
   full-precision output instead; set it false to do the same).
4. Write the AutoAWQ GEMM checkpoint (``write_awq_checkpoint``) and ``awq_report.json``: per layer
   the chosen α and MSEs of each scale group, clip statistics, the layer-output MSE of RTN and
   AWQ against full precision, time; the calibration set; phase timings; peak GPU memory.
5. Optionally (``quality.enabled``): perplexity of held-out chosen responses, unquantized vs RTN
   vs AWQ (``mpo.quant.quality``).

Peak GPU memory is one decoder layer plus the calibration activations (a few fp32 copies of
[tokens, hidden] and one of [tokens, intermediate]); ``calibration.max_total_tokens`` bounds it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING
from torch import nn
from tqdm.auto import tqdm

from mpo.data.template import ChatTemplate
from mpo.model.load import load_model, load_processor, read_checkpoint_config, resolve_dtype
from mpo.model.tokenizer import INTERNVL25_SYSTEM_PROMPT
from mpo.quant.awq_linear import checkpoint_key_map
from mpo.quant.calibrate import CalibrationSet, LayerInputs, calibration_inputs, generated_samples, mmpr_samples
from mpo.quant.pack import AWQLinearWeights
from mpo.quant.quantizer import pseudo_quantize
from mpo.quant.search import quantize_decoder_layer

__all__ = ["CalibrationConfig", "QuantConfig", "QualityConfig", "ExportConfig", "DECODER_LINEARS",
           "NOT_CONVERTED", "quantize_layer", "quantize_layers", "check_output_dir", "write_awq_checkpoint",
           "export_awq"]

# The linears of a Qwen2/Llama decoder layer that are quantized (paths inside the layer).
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# Modules left 16-bit, by name fragment (readers match these as substrings of module names).
NOT_CONVERTED = ("vision_tower", "multi_modal_projector", "lm_head")
REPORT_NAME = "awq_report.json"
# Source files not copied: weights and config are rewritten, an old report is stale.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_NOT_COPIED_NAMES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", REPORT_NAME)


@dataclass
class CalibrationConfig:
    num_samples: int = 128  # conversations used for calibration
    max_response_tokens: int = 512  # response tokens kept per conversation (prompt kept whole)
    block_size: int = 2048  # tokens per calibration row (the stream is cut into rows)
    max_total_tokens: int = 131072  # cap on calibration tokens: bounds the GPU memory of a layer
    max_dynamic_patch: int = 1  # tiles per image (one 448 tile = 256 image tokens)
    use_images: bool = True  # False: MMPR conversations without their images
    system_prompt: str = "default"  # "default" = InternVL2.5's; "" = none; else the text
    samples_per_prompt: int = 16  # text-only generation: samples per prompt (one batch)
    temperature: float = 1.0  # text-only generation temperature


@dataclass
class QuantConfig:
    group_size: int = 128  # input channels per scale/zero group
    n_grid: int = 20  # α grid {0, 1/n, ..., (n-1)/n} and clip grid 1 - i/n
    max_shrink: float = 0.5  # clip at most this fraction of a group's range (i < n·max_shrink)
    clip: bool = True  # run the clip search (skipped for q/k)
    clip_sample_tokens: int = 512  # tokens the clip search uses
    feed_quantized_output: bool = True  # next layer calibrates on this layer's quantized output


@dataclass
class QualityConfig:
    enabled: bool = False  # measure held-out perplexity: unquantized vs RTN vs AWQ
    num_samples: int = 32  # held-out conversations (never used for calibration)


@dataclass
class ExportConfig:
    model: str = MISSING  # native InternVL checkpoint directory (trainer export or converted)
    output_dir: str = MISSING  # where the AWQ checkpoint is written
    data: str | None = None  # MMPR directory; None = text-only, on the model's own generations
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "bfloat16"  # compute dtype while quantizing: bfloat16 | float32
    save_dtype: str = "float16"  # dtype of unquantized tensors on disk (AWQ readers expect fp16)
    seed: int = 0
    overwrite: bool = False  # replace an existing non-empty output_dir
    progress: bool = True  # progress bar per layer
    max_shard_gb: float = 5.0  # safetensors shard size
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self):
        c, q = self.calibration, self.quant
        checks = [
            (self.dtype in ("bfloat16", "bf16", "float32", "fp32"),
             f"dtype={self.dtype!r}: use bfloat16 or float32 (fp16 overflows on Qwen activations)"),
            (self.save_dtype in ("float16", "fp16", "bfloat16", "bf16"),
             f"save_dtype={self.save_dtype!r}: use float16 (what AWQ readers expect) or bfloat16"),
            (c.num_samples >= 1, f"calibration.num_samples={c.num_samples} must be >= 1"),
            (c.max_response_tokens >= 1, f"calibration.max_response_tokens={c.max_response_tokens} must be >= 1"),
            (c.block_size >= 1, f"calibration.block_size={c.block_size} must be >= 1"),
            (c.max_total_tokens >= 1, f"calibration.max_total_tokens={c.max_total_tokens} must be >= 1"),
            (c.max_dynamic_patch >= 1, f"calibration.max_dynamic_patch={c.max_dynamic_patch} must be >= 1"),
            (c.samples_per_prompt >= 1, f"calibration.samples_per_prompt={c.samples_per_prompt} must be >= 1"),
            (c.temperature >= 0, f"calibration.temperature={c.temperature} must be >= 0"),
            (q.group_size >= 1, f"quant.group_size={q.group_size} must be >= 1"),
            (q.n_grid >= 1, f"quant.n_grid={q.n_grid} must be >= 1"),
            (0 <= q.max_shrink < 1, f"quant.max_shrink={q.max_shrink} must be in [0, 1)"),
            (q.clip_sample_tokens >= 1, f"quant.clip_sample_tokens={q.clip_sample_tokens} must be >= 1"),
            (self.quality.num_samples >= 1, f"quality.num_samples={self.quality.num_samples} must be >= 1"),
            (self.max_shard_gb > 0, f"max_shard_gb={self.max_shard_gb} must be > 0"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ValueError("invalid export config: " + "; ".join(problems))


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())


@torch.no_grad()
def _rtn_output(linears: dict[str, nn.Linear], forward: Callable, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The layer's output with every linear plain round-to-nearest quantized; weights restored."""
    originals = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    try:
        for linear in linears.values():
            linear.weight.copy_(pseudo_quantize(linear.weight.float(), group_size).to(linear.weight.dtype))
        return forward(x)
    finally:
        for name, linear in linears.items():
            linear.weight.copy_(originals[name])


@torch.no_grad()
def quantize_layer(layer: nn.Module, x_BTD: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
                   quant: QuantConfig) -> tuple[dict[str, AWQLinearWeights], torch.Tensor, dict[str, Any]]:
    """AWQ one decoder layer in place; return its packed linears, its next input, its report.

    On return the layer's linears hold the dequantized 4-bit weights (the layer computes what the
    checkpoint computes, up to the model dtype) and its norms hold the folded scales.

    Args:
        layer: Qwen2/Llama decoder layer, on the device of ``x_BTD``.
        x_BTD: calibration hidden states entering the layer [rows, block, D].
        forward: runs the layer once on its argument, e.g. ``lambda h: layer(h, **kwargs)``.
        quant: search and quantization settings.

    Returns:
        ``(weights, next_x_BTD, report)``: weights keyed by path in the layer
        (``"self_attn.q_proj"``); next_x is the quantized (or fp, see ``feed_quantized_output``)
        output; report holds ``search`` (``quantize_decoder_layer``'s report) and
        ``output_mse`` ``{"rtn", "awq", "fp_power"}`` (MSE against the fp output, and mean
        square of the fp output for scale).
    """
    linears = {path: layer.get_submodule(path) for path in DECODER_LINEARS}
    y_fp = _first_tensor(forward(x_BTD))
    y_rtn = _first_tensor(_rtn_output(linears, forward, x_BTD, quant.group_size))
    mse_rtn = _mse(y_rtn, y_fp)
    del y_rtn
    search = quantize_decoder_layer(layer, x_BTD, forward, group_size=quant.group_size, n_grid=quant.n_grid,
                                    max_shrink=quant.max_shrink, n_sample_tokens=quant.clip_sample_tokens,
                                    clip=quant.clip)
    weights = {}
    for path, linear in linears.items():
        packed = AWQLinearWeights.from_linear(linear, group_size=quant.group_size)
        linear.weight.copy_(packed.dequantize().t().to(linear.weight.dtype))
        weights[path] = packed
    y_q = _first_tensor(forward(x_BTD))
    report = {"search": search,
              "output_mse": {"rtn": mse_rtn, "awq": _mse(y_q, y_fp), "fp_power": float(y_fp.float().pow(2).mean())}}
    return weights, (y_q if quant.feed_quantized_output else y_fp), report


def quantize_layers(model: nn.Module, inputs: LayerInputs, quant: QuantConfig, device: str | torch.device,
                    progress: bool = True) -> tuple[dict[str, AWQLinearWeights], list[dict[str, Any]]]:
    """Stream the LLM's decoder layers through ``device`` one at a time and AWQ each.

    Each layer is moved to ``device``, quantized (``quantize_layer``), and moved back to where
    it was; packed weights are kept on the CPU.

    Returns:
        ``(weights, layer_reports)``: weights keyed by module name
        (``"model.language_model.layers.3.mlp.down_proj"``), one report per layer.
    """
    layers = model.model.language_model.layers
    prefix = "model.language_model.layers"
    hidden_BTD = inputs.hidden_BTD
    weights: dict[str, AWQLinearWeights] = {}
    reports = []
    bar = tqdm(range(len(layers)), desc="AWQ decoder layers", unit="layer", disable=not progress)
    for index in bar:
        start = time.perf_counter()
        layer = layers[index]
        home = next(layer.parameters()).device
        layer.to(device)

        def forward(h: torch.Tensor, layer: nn.Module = layer) -> torch.Tensor:
            return _first_tensor(layer(h, **inputs.kwargs))

        layer_weights, hidden_BTD, report = quantize_layer(layer, hidden_BTD, forward, quant)
        layer.to(home)
        for path, packed in layer_weights.items():
            weights[f"{prefix}.{index}.{path}"] = packed.to("cpu")
        mse = report["output_mse"]
        report = {"layer": index, **report, "time_s": time.perf_counter() - start}
        reports.append(report)
        bar.set_postfix(awq_over_rtn=f"{mse['awq'] / max(mse['rtn'], 1e-30):.3f}")
    return weights, reports


def check_output_dir(source: Path, out: Path, overwrite: bool) -> None:
    """Refuse to write into the source checkpoint, or over a non-empty directory unless asked."""
    if out.resolve() == source.resolve():
        raise ValueError(f"output_dir={out} is the source checkpoint; choose another directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output_dir={out} is not empty; pass overwrite=true to replace it")


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def write_awq_checkpoint(model: nn.Module, weights: dict[str, AWQLinearWeights], source: Path, out: Path, *,
                         group_size: int, save_dtype: torch.dtype = torch.float16,
                         max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write an AutoAWQ GEMM checkpoint: model tensors + packed linears, config, processor files.

    Names are what ``save_pretrained`` writes for this model (``checkpoint_key_map``), with each
    quantized linear's ``.weight`` replaced by ``.qweight`` int32 [in, out/8], ``.qzeros`` int32
    [in/g, out/8], ``.scales`` fp16 [in/g, out] and its bias as fp16 ``.bias``. Every other
    floating tensor is cast to ``save_dtype``; a tensor tied to an earlier one (a tied LM head)
    is written once, as ``save_pretrained`` does. Files of ``source`` other than weights and
    config (tokenizer, processor, chat template, generation config) are copied.

    Args:
        model: the model whose unquantized tensors (norms with folded scales included) are saved.
        weights: packed linears keyed by module name.
        source: the checkpoint quantized (for its config.json and processor files).
        out: output directory (created).
        group_size: group size recorded in ``quantization_config``.
        save_dtype: dtype of unquantized floating tensors.
        max_shard_bytes: safetensors shard size.

    Returns:
        names of the files written.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen_storage = set()
    for key, tensor in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in weights and leaf in ("weight", "bias"):
            continue
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if storage in seen_storage:
            continue
        seen_storage.add(storage)
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(save_dtype)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{key} overflows {save_dtype} (|value| > {torch.finfo(save_dtype).max:.0f}); "
                                 "export with save_dtype=bfloat16")
        tensors[key] = tensor.contiguous()
    for module_name, packed in weights.items():
        tensors.update(packed.state_dict(prefix=f"{module_name}."))
    names = checkpoint_key_map(model, tensors)
    tensors = {names[key]: tensor for key, tensor in tensors.items()}

    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    shards = _shards(tensors, max_shard_bytes)
    written = []
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        written.append("model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
            written.append(fname)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append("model.safetensors.index.json")

    config = json.loads((source / "config.json").read_text())
    dtype_name = str(save_dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    config["torch_dtype"] = dtype_name  # readers built on transformers < 5 look for this key
    config["quantization_config"] = {
        "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": list(NOT_CONVERTED),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    written.append("config.json")
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED_NAMES and not path.name.endswith(_NOT_COPIED_SUFFIXES):
            shutil.copyfile(path, out / path.name)
            written.append(path.name)
    return written


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is visible; use device=cpu")
    return resolved


def _system_prompt(setting: str) -> str | None:
    return INTERNVL25_SYSTEM_PROMPT if setting == "default" else (setting or None)


def _calibration_set(cfg: ExportConfig, model: nn.Module, processor, device: torch.device) -> CalibrationSet:
    c = cfg.calibration
    held_out = cfg.quality.num_samples if cfg.quality.enabled else 0
    system = _system_prompt(c.system_prompt)
    if cfg.data is None:
        return generated_samples(model, processor, num_samples=c.num_samples, num_held_out=held_out,
                                 max_new_tokens=c.max_response_tokens, device=device, system_prompt=system,
                                 samples_per_prompt=c.samples_per_prompt, temperature=c.temperature, seed=cfg.seed)
    template = ChatTemplate(processor.tokenizer, tokens_per_tile=model.config.image_seq_length, system_prompt=system)
    return mmpr_samples(cfg.data, template, num_samples=c.num_samples, num_held_out=held_out,
                        max_response_tokens=c.max_response_tokens, max_dynamic_patch=c.max_dynamic_patch,
                        tile_size=model.config.vision_config.image_size[0], use_images=c.use_images, seed=cfg.seed)


def export_awq(cfg: ExportConfig) -> dict[str, Any]:
    """Quantize ``cfg.model`` to AWQ and write ``cfg.output_dir``; return the report (also written
    to ``output_dir/awq_report.json``)."""
    start = time.perf_counter()
    source, out = Path(cfg.model), Path(cfg.output_dir)
    source_config = read_checkpoint_config(source)
    if "quantization_config" in source_config:
        method = source_config["quantization_config"].get("quant_method")
        raise ValueError(f"{source} is already quantized ({method}); export from the 16-bit checkpoint")
    check_output_dir(source, out, cfg.overwrite)
    if cfg.data is not None and not Path(cfg.data).exists():
        raise ValueError(f"data={cfg.data} does not exist; pass an MMPR directory, or omit data for text-only")
    device = _resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    timings = {}

    model = load_model(source, dtype=cfg.dtype).eval().requires_grad_(False)
    processor = load_processor(source)
    timings["load_s"] = time.perf_counter() - start

    t = time.perf_counter()
    calibration = _calibration_set(cfg, model, processor, device)
    inputs, calib_stats = calibration_inputs(model, calibration.samples, block_size=cfg.calibration.block_size,
                                             max_total_tokens=cfg.calibration.max_total_tokens, device=device)
    timings["calibration_s"] = time.perf_counter() - t

    t = time.perf_counter()
    weights, layer_reports = quantize_layers(model, inputs, cfg.quant, device, progress=cfg.progress)
    del inputs
    timings["quantize_s"] = time.perf_counter() - t

    t = time.perf_counter()
    files = write_awq_checkpoint(model, weights, source, out, group_size=cfg.quant.group_size,
                                 save_dtype=resolve_dtype(cfg.save_dtype),
                                 max_shard_bytes=int(cfg.max_shard_gb * 2**30))
    timings["write_s"] = time.perf_counter() - t
    del model, weights

    report: dict[str, Any] = {
        "source": str(source),
        "config": asdict(cfg),
        "device": str(device),
        "calibration": {"source": calibration.source, "rejects": calibration.rejects, **calib_stats},
        "layers": layer_reports,
        "files": files,
    }
    if cfg.quality.enabled:
        from mpo.quant.quality import compare_perplexity

        t = time.perf_counter()
        report["quality"] = compare_perplexity(source, out, calibration.held_out, device=device, dtype=cfg.dtype,
                                               group_size=cfg.quant.group_size)
        timings["quality_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    report["timings"] = timings
    report["total_time_s"] = timings["total_s"]
    if device.type == "cuda":
        report["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report
