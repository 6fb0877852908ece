"""Weight quantisation for inference on the CPU: the layers, the swap, and quantised folders.

- int8 / int4 weight-only (`palikit.load(src, quantize="int8" | "int4")`, `--quantize`): the
  decoder's linear layers in int8 (one scale per output channel) or int4 (a scale and an offset per
  group of `group_size` inputs, gpt-fast's asymmetric scheme), the tied embedding / LM head in int8
  in both (it is ~23 % of PaliGemma 2 3B's bytes and read every token), the vision tower and
  projector when asked. Activations stay in the model's dtype.
- w8a8 (`quantize="w8a8"`): the int8 weights, the vision tower's and the projector's too, and the
  activations entering them rounded to int8 per token, multiplied int8 by int8 with exact int32
  sums: faster prompts and batches for a second rounding, of the activations. An opt-in.

The products are palikit.kernels' (int8_linear, int4_linear), which choose the kernel by rows and
CPU. A quantised folder (`palikit quantize SRC --to SCHEME --out DIR`) stores a layout of palikit's
own that any CPU reads (transformers does not): int8 as it is, int4 as two values per byte (the low 4
bits the even input), packed for this CPU's int4 kernel as it loads. QLoRA's training-time 4-bit
layers are palikit.finetune.qlora's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import kernels
from .atomic import atomic_write, write_text_atomic
from .options import QUANT_SCHEMES
from .paligemma import LLM_LINEAR, VISION_LINEAR, PaliGemma
from .weights import QUANTIZED_KEY, save_model_files


class QuantizeError(ValueError):
    """Quantisation that cannot run here (another device, a group size that does not divide a layer,
    a model quantised already); the message says what to do."""


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The weight-only kernels' activation dtype: the model's, bfloat16 for a float32 model (the
    kernels' float32 path is not vectorised)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _int8_per_row(weight: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: weight ~= q * scale[:, None]. In blocks of `rows`,
    so that the float32 temporaries of a 257k-row embedding table stay small. On the meta device (the
    layout of a quantised folder) the shapes only."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], device=weight.device)
    if weight.is_meta:
        return q, scale
    for start in range(0, weight.shape[0], rows):
        w = weight[start:start + rows].detach().float()
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q[start:start + rows] = (w / s[:, None]).round().clamp(-128, 127)
        scale[start:start + rows] = s
    return q, scale


class Int8Linear(nn.Module):
    """A Linear with int8 weights, one scale per output channel; with `int8_rows` (w8a8) int8
    activations too (kernels.int8_linear)."""

    def __init__(self, linear: nn.Linear, int8_rows: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.int8_rows = int8_rows
        q, scale = _int8_per_row(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale.to(_kernel_dtype(dtype)))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = kernels.int8_linear(rows, self.weight, self.scales, self.int8_rows).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """A Linear with 4-bit weights: per group of `group_size` inputs, w ~= (q - 8) * scale + zero
    with q in 0..15 (gpt-fast's group-wise scheme), packed for this CPU's int4 kernel
    (kernels.int4_linear)."""

    def __init__(self, linear: nn.Linear, group_size: int, dtype: torch.dtype):
        super().__init__()
        n, k = linear.out_features, linear.in_features
        self.in_features, self.out_features, self.group_size = k, n, group_size
        if linear.weight.is_meta:  # the layout of a quantised folder: no values
            self.register_buffer("weight", torch.empty(n, k // 2, dtype=torch.uint8, device="meta"))
            self.register_buffer("scales_and_zeros", torch.empty(k // group_size, n, 2, device="meta",
                                                                 dtype=_kernel_dtype(dtype)))
        else:
            w = linear.weight.detach().float().reshape(n, k // group_size, group_size)
            low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = (high - low).clamp(min=1e-6) / 15
            q = ((w - low) / scale).round().clamp(0, 15).reshape(n, k)
            zero = low + 8 * scale
            self.register_buffer("weight", kernels.int4_pack(q))
            # (k / group, n, 2): scale and zero of each group, as the kernel reads them
            self.register_buffer("scales_and_zeros", torch.stack([scale[..., 0], zero[..., 0]], -1)
                                 .transpose(0, 1).contiguous().to(_kernel_dtype(dtype)))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = kernels.int4_linear(rows, self.weight, self.group_size, self.scales_and_zeros, self.out_features)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def portable(self) -> torch.Tensor:
        """The weight's values, two per byte, the even input in the low 4 bits: the folder layout."""
        values = kernels.int4_values(self.weight, self.out_features, self.in_features).view(torch.uint8)
        return values[:, 0::2] | (values[:, 1::2] << 4)

    def unpack_portable(self) -> None:
        """The weight read from a folder (`portable`), packed for this CPU's kernel."""
        values = torch.stack([self.weight & 15, self.weight >> 4], -1).reshape(self.out_features, -1)
        self.weight = kernels.int4_pack(values)


class Int8Embedding(nn.Module):
    """The tied embedding / LM head in int8, one scale per token row: lookups dequantise their rows
    (into `dtype`, the model's), project() is the output layer."""

    def __init__(self, embedding: nn.Embedding, int8_rows: bool, dtype: torch.dtype):
        super().__init__()
        q, scale = _int8_per_row(embedding.weight)
        self.dtype, self.int8_rows = dtype, int8_rows
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale.to(_kernel_dtype(dtype)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids].to(self.scales.dtype) * self.scales[ids, None]).to(self.dtype)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])
        return kernels.int8_linear(rows, self.weight, self.scales, self.int8_rows).view(*hidden.shape[:-1], -1)


def quantize_weights(model: PaliGemma, scheme: str, group_size: int = 32, vision: bool = False,
                     dtype: torch.dtype | None = None) -> int:
    """Swap the decoder's linear layers (and with `vision`, always with w8a8, the vision tower's and
    the projector's: they only ever multiply prompts) for int8 / int4 ones and the embedding for
    Int8Embedding, in place -> layers swapped. On a meta-device model it builds the layout only
    (a quantised folder fills it); `dtype` is then the model's, else its weights'."""
    if scheme not in QUANT_SCHEMES:
        raise QuantizeError(f"quantize must be one of {', '.join(QUANT_SCHEMES)}, got {scheme!r}")
    if model.device.type not in ("cpu", "meta"):
        raise QuantizeError(f"int8/int4 weights run on the CPU kernels of PyTorch; this model is on "
                            f"{model.device}: load it with device='cpu', or without quantize")
    if scheme_of(model) is not None:
        raise QuantizeError("this model is quantised already")
    int8_rows = scheme == "w8a8"
    vision = vision or int8_rows
    dtype = dtype or model.dtype
    pattern = LLM_LINEAR + (f"|{VISION_LINEAR}" if vision else "")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    if scheme == "int4":
        if group_size not in (32, 64, 128, 256):
            raise QuantizeError(f"group_size={group_size}: the int4 kernel takes 32, 64, 128 or 256")
        if bad := [n for n in names if model.get_submodule(n).in_features % group_size]:
            width = model.get_submodule(bad[0]).in_features
            raise QuantizeError(f"group_size={group_size} does not divide the {width} inputs of {bad[0]}")
    for name in names:
        old = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        new = Int4Linear(old, group_size, dtype) if scheme == "int4" else Int8Linear(old, int8_rows, dtype)
        setattr(model.get_submodule(parent), child, new)
    model.language_model.embed_tokens = Int8Embedding(model.language_model.embed_tokens, int8_rows, dtype)
    return len(names)


def scheme_of(model: PaliGemma) -> dict | None:
    """The quantisation of a model, read from its layers (None: not quantised): {"scheme", "vision",
    and for int4 "group_size"}."""
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    if not layers:
        return None
    int4 = isinstance(layers[0], Int4Linear)
    vision = isinstance(model.multi_modal_projector.linear, (Int8Linear, Int4Linear))
    scheme = "int4" if int4 else "w8a8" if layers[0].int8_rows else "int8"
    return {"scheme": scheme, "vision": vision} | ({"group_size": layers[0].group_size} if int4 else {})


# ---- quantised folders --------------------------------------------------------------------------


def save_quantized_folder(pipe, folder) -> None:
    """A quantised model as a folder palikit.load reads back without quantising again, on any CPU."""
    quantization = scheme_of(pipe.model)
    if quantization is None:
        raise QuantizeError("this model is not quantised: load it with quantize='int8', 'int4' or 'w8a8' first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in pipe.model.state_dict().items()}
    for name, module in pipe.model.named_modules():
        if isinstance(module, Int4Linear):
            state[f"{name}.weight"] = module.portable().contiguous()
    atomic_write(folder / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_text_atomic(folder / "config.json",
                      json.dumps(pipe.config.to_hf_config() | {QUANTIZED_KEY: quantization}, indent=2))
    save_model_files(folder, pipe.config, pipe.tokenizer.path, pipe.codec_path)


def lay_out(model: PaliGemma, quantization: dict, dtype: torch.dtype) -> None:
    """A meta-device model in the layout of a quantised folder's tensors (see load_tensors)."""
    if "packed_for" in quantization:
        raise QuantizeError("this folder holds int4 weights in one CPU's kernel layout, written by an older "
                            "palikit: quantise the original weights again (palikit quantize SRC --to int4)")
    quantize_weights(model, quantization["scheme"], quantization.get("group_size", 32),
                     quantization.get("vision", False), dtype)


def is_stored_as_is(name: str, tensor: torch.Tensor) -> bool:
    """A quantised folder's tensors that load as they are: the integer weights and their scales."""
    return not tensor.is_floating_point() or name.endswith(("scales", "scales_and_zeros"))


def pack_loaded(model: PaliGemma) -> None:
    """After a quantised folder's tensors are in: its int4 weights packed for this CPU's kernel."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.unpack_portable()
