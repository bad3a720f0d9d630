"""AWQ linears at inference, and loading an AWQ checkpoint into a native InternVL model.

    model = load_awq_model("runs/tiny/awq", device="cuda", dtype=torch.bfloat16)

``WQLinear`` holds one linear in the AutoAWQ GEMM layout (``mpo.quant.pack``: ``qweight`` int32
[in, out/8], ``qzeros`` int32 [in/g, out/8], ``scales`` fp16 [in/g, out], ``bias`` [out]) and
computes ``y = x @ dequant(W) + bias``: through ``mpo.infer.kernels.w4a16_gemm`` for 16-bit CUDA
inputs, else by dequantizing to fp32 (any device, any float dtype, exact fp32 math).

Checkpoint names. ``save_pretrained`` of a transformers-5 InternVL writes converted names: the LLM
under ``language_model.model.*`` (``language_model.model.layers.{i}.self_attn.q_proj.weight``),
the head as ``language_model.lm_head.weight``, then ``vision_tower.*`` and
``multi_modal_projector.*``; ``from_pretrained`` maps them to the module names
(``model.language_model.*``, ``lm_head``, ``model.vision_tower.*``, ...). An AWQ checkpoint uses
the same names with each quantized linear's ``.weight`` replaced by ``.qweight``, ``.qzeros``,
``.scales`` (``.bias`` kept), e.g. ``language_model.model.layers.0.mlp.down_proj.qweight``.
``checkpoint_key_map`` derives the mapping from transformers' own conversion rules (the ones
``save_pretrained`` reverts), so both directions stay in step with the library.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import InternVLConfig, InternVLForConditionalGeneration

from mpo.model.load import read_checkpoint_config, resolve_dtype
from mpo.quant.pack import PACK_FACTOR, dequantize_awq_gemm

__all__ = [
    "QUANTIZED_SUFFIXES",
    "WQLinear",
    "checkpoint_key_map",
    "check_awq_config",
    "load_awq_model",
    "read_safetensors_index",
]

# Tensors of one quantized linear in the checkpoint (bias optional).
QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales")
BITS = 4


class WQLinear(nn.Module):
    """A 4-bit AWQ linear (AutoAWQ GEMM layout): ``y = x @ W_IO + bias``.

    All tensors are buffers (a quantized model is not trained): ``qweight`` int32 [in, out/8],
    ``qzeros`` int32 [in/group_size, out/8], ``scales`` fp16 [in/group_size, out], ``bias``
    [out] or None. ``model.to(dtype)`` would also cast ``scales`` (fp16 -> bf16 rounds them);
    cast the model before replacing its linears, as ``load_awq_model`` does.

    Args:
        in_features, out_features: the linear's shape (in % group_size == 0, out % 8 == 0).
        bias: whether a bias buffer exists.
        group_size: input rows per scale/zero group.
        use_kernel: run the Triton W4A16 kernel for bf16/fp16 CUDA inputs.
        device: where the (uninitialised) buffers are allocated; "meta" allocates nothing.
        bias_dtype: dtype of the bias buffer.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, group_size: int = 128,
                 use_kernel: bool = True, device: torch.device | str | None = None,
                 bias_dtype: torch.dtype = torch.float16):
        super().__init__()
        if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
            raise ValueError(f"in_features={in_features} must be divisible by group_size={group_size}")
        if out_features % PACK_FACTOR:
            raise ValueError(f"out_features={out_features} must be divisible by {PACK_FACTOR} to pack int4")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.use_kernel = group_size, use_kernel
        groups, packed = in_features // group_size, out_features // PACK_FACTOR
        self.register_buffer("qweight", torch.empty(in_features, packed, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(groups, packed, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16, device=device))
        bias_tensor = torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_tensor)

    @classmethod
    def from_awq_weights(cls, weights, *, use_kernel: bool = True) -> WQLinear:
        """Build from ``mpo.quant.pack.AWQLinearWeights`` (tensors are shared, not copied)."""
        module = cls(weights.in_features, weights.out_features, bias=weights.bias is not None,
                     group_size=weights.group_size, use_kernel=use_kernel, device="meta")
        module.qweight, module.qzeros, module.scales = weights.qweight, weights.qzeros, weights.scales
        module.bias = weights.bias
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [in, out] such that ``y = x @ W_IO + bias``."""
        return dequantize_awq_gemm(self.qweight, self.qzeros, self.scales, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (any float dtype) -> y [..., out] in x's dtype."""
        if self.use_kernel and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            from mpo.infer.kernels import w4a16_gemm  # Triton: imported only where it can run

            return w4a16_gemm(x, self.qweight, self.qzeros, self.scales, self.bias, self.group_size)
        # Fallback: fp32 dequantize + fp32 matmul, rounded once to x's dtype (the kernels'
        # reference semantics); it re-dequantizes on every call, so it is for CPU / tests.
        y = x.float() @ self.dequantized_weight()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, use_kernel={self.use_kernel}")


def checkpoint_key_map(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """Module-space state-dict keys -> the names ``save_pretrained`` would write for them.

    Uses transformers' conversion rules for the model (reverted, as ``save_pretrained`` does).
    Renamings act on prefixes, so keys that are not in the model's own state dict (``.qweight``)
    map the same way as their module's ``.weight``. Raises ValueError if the rules are not a
    one-to-one renaming (a model whose checkpoint fuses or splits tensors).
    """
    from transformers.core_model_loading import revert_weight_conversion

    keys = list(keys)
    # Tag each key with its index; renamings move tensors without touching them.
    renamed = revert_weight_conversion(model, {k: torch.tensor(i) for i, k in enumerate(keys)})
    if len(renamed) != len(keys):
        raise ValueError(f"{type(model).__name__}: checkpoint conversion is not a one-to-one renaming")
    mapping = {keys[int(tag)]: name for name, tag in renamed.items()}
    if len(mapping) != len(keys):
        raise ValueError(f"{type(model).__name__}: checkpoint conversion is not a one-to-one renaming")
    return mapping


def check_awq_config(quant: dict | None, where: str) -> int:
    """Validate a ``quantization_config`` this loader reads; return its group size."""
    if not isinstance(quant, dict) or quant.get("quant_method") != "awq":
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise ValueError(f"{where}: quantization_config.quant_method is {method!r}; expected 'awq'")
    problems = []
    if quant.get("bits", BITS) != BITS:
        problems.append(f"bits={quant.get('bits')} (only 4 is supported)")
    if str(quant.get("version", "gemm")).lower() != "gemm":
        problems.append(f"version={quant.get('version')!r} (only the GEMM layout is supported)")
    if not quant.get("zero_point", True):
        problems.append("zero_point=false (only asymmetric AWQ with zero points is supported)")
    group_size = quant.get("group_size", 128)
    if not isinstance(group_size, int) or group_size <= 0:
        problems.append(f"group_size={group_size!r} (must be a positive integer)")
    if problems:
        raise ValueError(f"{where}: unsupported AWQ checkpoint: " + "; ".join(problems))
    return group_size


def read_safetensors_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a checkpoint directory (single file or sharded)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as fh:
        return {name: single for name in fh.keys()}


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters registered inside are moved to the meta device; buffers are left where they
    are computed, so non-persistent ones (rotary ``inv_freq``) keep their real values."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            module._parameters[name] = meta

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _quantized_linears(model: nn.Module, disk_names: set[str], to_disk: dict[str, str]) -> list[str]:
    """Module names of the linears whose checkpoint holds ``.qweight`` instead of ``.weight``."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            disk_weight = to_disk[f"{name}.weight"]
            if disk_weight[: -len("weight")] + "qweight" in disk_names:
                names.append(name)
    return names


def load_awq_model(model_dir: str | Path, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype | None = None, *,
                   use_kernel: bool = True) -> InternVLForConditionalGeneration:
    """Build ``InternVLForConditionalGeneration`` from an AWQ checkpoint written by ``mpo.export_awq``.

    The skeleton is built with parameters on the meta device (no random init, no memory), the
    linears that the checkpoint stores as ``qweight/qzeros/scales`` become ``WQLinear``s, and
    every tensor is read from the safetensors and moved to ``device``: unquantized tensors cast to
    ``dtype``, ``qweight``/``qzeros`` int32 and ``scales`` fp16 as stored.

    Args:
        model_dir: AWQ checkpoint directory (config.json with an awq quantization_config).
        device: where the model lives.
        dtype: dtype of everything unquantized (default bf16 on CUDA, fp32 elsewhere).
        use_kernel: let ``WQLinear`` call the Triton kernel on CUDA.

    Returns:
        the model in eval mode.
    """
    model_dir = Path(model_dir)
    device = torch.device(device)
    config_dict = read_checkpoint_config(model_dir)
    group_size = check_awq_config(config_dict.get("quantization_config"), str(model_dir))
    dtype = resolve_dtype(dtype) if dtype is not None else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = InternVLConfig.from_pretrained(str(model_dir))
    with _parameters_on_meta(), _default_dtype(dtype):
        model = InternVLForConditionalGeneration(config)

    files = read_safetensors_index(model_dir)
    to_disk = checkpoint_key_map(model, model.state_dict().keys())
    quantized = _quantized_linears(model, set(files), to_disk)
    if not quantized:
        raise ValueError(f"{model_dir}: no tensor ends in .qweight; is this an AWQ checkpoint?")
    for name in quantized:
        linear = model.get_submodule(name)
        _replace_module(model, name, WQLinear(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            group_size=group_size, use_kernel=use_kernel, device="meta", bias_dtype=dtype))

    to_disk_final = checkpoint_key_map(model, model.state_dict().keys())
    from_disk = {disk: key for key, disk in to_disk_final.items()}
    quantized_keys = {f"{name}.{suffix}" for name in quantized for suffix in QUANTIZED_SUFFIXES}
    state, unexpected = {}, []
    by_file: dict[Path, list[str]] = {}
    for disk_name, path in files.items():
        by_file.setdefault(path, []).append(disk_name)
    for path, disk_names in sorted(by_file.items()):
        with safe_open(str(path), framework="pt") as fh:
            for disk_name in sorted(disk_names):
                key = from_disk.get(disk_name)
                if key is None:
                    unexpected.append(disk_name)
                    continue
                state[key] = _checked_tensor(fh.get_tensor(disk_name), key, disk_name, quantized_keys, dtype)
    if unexpected:
        raise ValueError(f"{model_dir}: tensors that match no module of the model: {unexpected[:5]}")
    expected = model.state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{model_dir}: {to_disk_final[key]} has shape {tuple(tensor.shape)}, the "
                             f"model (config.json) expects {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks tensors for {missing[:5]} ({len(missing)} in all)")
    return model.to(device).eval()


def _checked_tensor(tensor: torch.Tensor, key: str, disk_name: str, quantized_keys: set[str],
                    dtype: torch.dtype) -> torch.Tensor:
    """Quantized tensors keep their stored dtype (checked); other floats are cast to ``dtype``."""
    if key in quantized_keys:
        want = torch.float16 if key.endswith(".scales") else torch.int32
        if tensor.dtype != want:
            raise ValueError(f"{disk_name} has dtype {tensor.dtype}; the AWQ GEMM layout stores {want}")
        return tensor
    return tensor.to(dtype) if tensor.is_floating_point() else tensor
