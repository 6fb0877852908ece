"""Weight quantisation, its one home in palikit.

- Inference, weight-only (`palikit.load(src, quantize="int8" | "int4")`, `--quantize` on the CLI):
  the decoder's linear layers in int8 (one scale per output channel) or int4 (a scale and an
  offset per group of `group_size` inputs, gpt-fast's asymmetric scheme), the tied embedding /
  LM head in int8 in both (it is ~23 % of PaliGemma 2 3B's bytes and read every token), the
  vision tower and projector when asked. The matmuls are PyTorch's own weight-only kernels,
  `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu`: activations stay in the
  model's dtype, the weights are unpacked inside the kernel. Many rows (a prompt) run otherwise, as
  the dense GEMM on the dequantised weight (those kernels are GEMV kernels), and so does one int8 row
  of up to MATERIALIZE_MAX_ROW inputs in a compiled decode step: the reduction inductor generates.
- w8a8 (`quantize="w8a8"`): the int8 weights, the vision tower's and the projector's too, and the
  activations entering them rounded to int8 per token, multiplied int8 by int8 (torch._int_mm: twice
  bfloat16's rate in a prefill on AVX-512 VNNI, and a batch of decode rows reads the weight once).
  Faster prompts and batches for a second rounding, of the activations: an opt-in, checked against
  float32 by the same bounds as the others.
- Training: the settings and the bitsandbytes 4-bit swap that QLoRA trains on (CUDA only; anything
  else fails loudly rather than training unquantised weights). palikit.finetune uses it; it
  imports nothing of palikit.finetune.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import gemma
from .api import DTYPES
from .config import QUANT_SCHEMES
from .paligemma import PaliGemma


class QuantizeError(ValueError):
    """Quantisation that cannot run here (no CUDA GPU, no bitsandbytes, a group size that does not
    divide a layer, a model quantised already); the message says what to do."""


# ---- weight-only inference quantisation ------------------------------------------------------------

_DECODER_LINEAR = r"language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_VISION_LINEAR = r"vision_tower\..*|multi_modal_projector\..*"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' activation dtype: the model's, but bfloat16 for a float32 model. On CPU the
    weight-only kernels are vectorised for 16-bit activations only: with float32 ones a 9216 x 2304
    int8 matrix-vector product takes 7.7 ms against 0.45 ms in bfloat16 (and 4.2 ms dense float32)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


def _int8_per_row(weight: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: weight ~= q * scale[:, None]. In blocks of `rows`,
    so that the float32 temporaries of a 257k-row embedding table stay small. On the meta device (the
    layout of a quantised folder) the shapes only: its arithmetic there cost seconds per model."""
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


# From this many rows on, an int8 product dequantises the weight into a bfloat16 scratch matrix and
# runs the dense GEMM: aten._weight_int8pack_mm is a GEMV kernel, 3x slower than bf16 at a 272-row
# prefill (85 against 29 ms for a 9216 x 2304 matrix); the copy into a reused matrix costs 1.7 ms
# (into a fresh one 13 ms: the page faults of 42 MB). Below it, the int8 kernel wins. Only matrices
# up to DEQUANTIZE_MAX_ENTRIES: the scratch stays at 64 MB, where the 257k-row LM head would keep
# 1.2 GB of bfloat16 alive for a model quantised to save memory.
DEQUANTIZE_FROM_ROWS = 32
DEQUANTIZE_MAX_ENTRIES = 1 << 25

_scratch = threading.local()  # matrices per thread, reused by every layer: threads never share them


def _scratch_matrix(shape: tuple[int, int], dtype: torch.dtype, slot: str = "buffer") -> torch.Tensor:
    """An uninitialised (rows, cols) matrix in this thread's scratch `slot`, grown when too small;
    a new tensor where autograd may keep it for a backward pass."""
    numel = shape[0] * shape[1]
    if torch.is_grad_enabled():
        return torch.empty(shape, dtype=dtype)
    buffer = getattr(_scratch, slot, None)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            buffer = torch.empty(numel, dtype=dtype)
            setattr(_scratch, slot, buffer)
    return buffer[:numel].view(shape)


def _dequantizes(rows: int, entries: int, from_rows: int) -> bool:
    """Whether a product of `rows` rows with a weight of `entries` runs the dense GEMM on the weight
    dequantised into the scratch: a prompt's rows, a weight the scratch may hold, eager mode."""
    return rows >= from_rows and entries <= DEQUANTIZE_MAX_ENTRIES and not torch.compiler.is_compiling()


def _dequantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int8 weight as `dtype` (exact: -128..127 are bfloat16 integers), in this thread's scratch."""
    return _scratch_matrix(weight.shape, dtype).copy_(weight)


# w8a8: rows quantised and multiplied in blocks of at most this many (gemma.in_row_blocks), so that the
# int32 products and their rescaling stay in cache (2176 rows x 9216 at once: 204 ms against 131 in
# blocks of 272, where the int8 GEMM itself takes 126); and each layer's whole feed-forward half (norms,
# MLP, residual) in such blocks: PaliGemma 2 3B's eight-caption prefill 19.8 -> 18.4 s (best of 4).
INT8_ROWS_BLOCK = 512


def _round_rows_to_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows ~= q * row_scales: symmetric, one scale per row, set by its largest |value| (the dynamic
    per-token scheme of LLM.int8(), Dettmers et al. 2022, without its float outlier columns;
    SmoothQuant's W8A8 baseline, Xiao et al. 2023) -> q (integers -127..127, as float32), row_scales."""
    x = rows.float()
    row_scales = x.abs().amax(-1, keepdim=True).clamp_(min=1e-12) / 127
    return (x / row_scales).round_().clamp_(-127, 127), row_scales


def _int8_rows_block(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """rows @ (weight * scales[:, None]).T with the rows in int8 too (_round_rows_to_int8).
    torch._int_mm sums the int8 products exactly in int32, on AVX-512 VNNI at twice bfloat16's rate
    (272 x 2304 x 9216: 15 against 28 ms) and, for the few rows of decode steps, reading the weight
    once (8 rows x 9216 x 2304: 1.8 ms, against 3.4 for _weight_int8pack_mm; one row: 0.77 against 1.13)."""
    q, row_scales = _round_rows_to_int8(rows)
    products = torch._int_mm(q.to(torch.int8), weight.t())
    return products.float().mul_(row_scales).mul_(scales.float()).to(scales.dtype)


# Under torch.compile, a one-row int8 product is inductor's reduction over a materialised float32
# row only for rows of up to this many entries (PaliGemma 2 3B's width, 9 KB). Wider rows crowd the
# weight rows they meet out of Zen 4's 32 KB L1 data cache, and past 4096 inductor sums through its
# cascade helper (torch/_inductor/codegen/cpp.py): per matrix, one row, the reduction read 10B's
# width (3584) at 13-14 GB/s, against 13-18 for aten._weight_int8pack_mm and 18-26 for
# torch._int_mm, and 3B's down projection (9216 inputs) at 10-13 against 19-22 and 25-28; with 2304
# inputs (3B's gate, up, head) it read 18-23 against 14-19 and 17-19. Compiled 3B decode step,
# median of 72: int8 119 ms (151 all reductions, 182 all kernel), w8a8 110 (148, 131).
MATERIALIZE_MAX_ROW = 2304


def int8_matmul(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                int8_rows: bool = False) -> torch.Tensor:
    """rows (M, in) @ (weight * scales[:, None]).T in the scales' dtype (= rows'), the sums taken in
    float32 or int32 on every path; with `int8_rows` (w8a8) each row rounded to int8 first
    (_round_rows_to_int8). One row of at most MATERIALIZE_MAX_ROW under torch.compile: inductor's
    reduction over a materialised row (gemma.MATERIALIZE_FROM_ENTRIES). Otherwise w8a8 runs
    torch._int_mm (_int8_rows_block); int8 from DEQUANTIZE_FROM_ROWS rows the dense GEMM on the
    dequantised weight, below it the int8 kernel."""
    compiling = torch.compiler.is_compiling()
    if (rows.shape[0] == 1 and compiling and weight.numel() >= gemma.MATERIALIZE_FROM_ENTRIES
            and weight.shape[1] <= MATERIALIZE_MAX_ROW):
        row, row_scale = rows.float(), 1
        if int8_rows:  # float32 sums of the integer products are exact up to 2^24
            row, row_scale = _round_rows_to_int8(rows)
        row = gemma.materialize(row[0])  # float32: no conversion per weight row
        sums = (weight.float() * row).sum(-1) * (scales.float() * row_scale)
        return sums.to(scales.dtype).view(1, -1)
    if int8_rows:
        return gemma.in_row_blocks(lambda block: _int8_rows_block(block, weight, scales), rows, INT8_ROWS_BLOCK)
    if _dequantizes(rows.shape[0], weight.numel(), DEQUANTIZE_FROM_ROWS):
        return F.linear(rows, _dequantized(weight, rows.dtype)).mul_(scales)
    return torch.ops.aten._weight_int8pack_mm(rows, weight, scales)


class Int8Linear(nn.Module):
    """A Linear with int8 weights, one scale per output channel (int8_matmul); with `int8_rows`
    (w8a8) int8 activations too."""

    def __init__(self, linear: nn.Linear, int8_rows: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.int8_rows = int8_rows
        q, scale = _int8_per_row(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale.to(_compute_dtype(linear.weight.dtype)))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales.dtype)
        y = int8_matmul(rows, self.weight, self.scales, self.int8_rows).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


# The int4 kernel's weight layout, read back to dequantise a prompt's weights: for each input in
# turn, _convert_weight_to_int4pack_for_cpu (aten/src/ATen/native/cpu/int4mm_kernel.cpp) packs the
# output rows in blocks of 64 (AVX-512) or 32 (AVX2), row j of a block in a byte's low 4 bits and row
# j + 32 (16) in its high ones, and the rows past the last whole block in pairs (2i low, 2i + 1 high).
# Without AVX2 the kernel interleaves otherwise, and prompts run the kernel itself.
INT4_BLOCK_ROWS = {"AVX512": 64, "AVX2": 32}

# From this many rows on, an int4 product dequantises the weight (13 ms for a 9216 x 2304 one) and runs
# the dense GEMM: aten._weight_int4pack_mm_for_cpu is a GEMV kernel, 66 against 44 ms at a 261-row
# prefill, 530 against 230 at eight prompts (2088 rows); at 64 rows still 16 against 22.
INT4_DEQUANTIZE_FROM_ROWS = 128


def _int4_values(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """The (n, k) values q - 8 (-8..7) of a packed int4 weight (INT4_BLOCK_ROWS), in an int8 scratch
    matrix."""
    values = _scratch_matrix((n, k), torch.int8, "int4_values")
    packed = packed.reshape(-1).view(torch.int8)
    whole = n - n % block
    if whole:
        _split_bytes(packed[:whole * k // 2].view(whole // block, k, block // 2).transpose(1, 2),
                     *values[:whole].view(whole // block, 2, block // 2, k).unbind(1))
    if whole < n:
        _split_bytes(packed[whole * k // 2:].view(k, (n - whole) // 2).t(),
                     *values[whole:].view((n - whole) // 2, 2, k).unbind(1))
    return values.sub_(8)


def _split_bytes(bytes_: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
    """low, high = the low and high 4 bits of bytes_; the bytes are moved into `high` first, so that
    the bit operations run along contiguous rows (6.5 against 3.9 ms for a 9216 x 2304 weight)."""
    high.copy_(bytes_)
    torch.bitwise_and(high, 15, out=low)
    high.bitwise_right_shift_(4).bitwise_and_(15)


class Int4Linear(nn.Module):
    """A Linear with 4-bit weights: per group of `group_size` inputs, w ~= (q - 8) * scale + zero
    with q in 0..15 (gpt-fast's group-wise scheme), packed for aten._weight_int4pack_mm_for_cpu; from
    INT4_DEQUANTIZE_FROM_ROWS rows (a prompt) the dense GEMM on the dequantised weight."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        n, k = linear.out_features, linear.in_features
        self.in_features, self.out_features, self.group_size = k, n, group_size
        dtype = _compute_dtype(linear.weight.dtype)
        if linear.weight.is_meta:  # the layout of a quantised folder (load_quantized_folder): no values
            self.register_buffer("weight", torch.empty(n, k // 2, dtype=torch.uint8, device="meta"))
            self.register_buffer("scales_and_zeros", torch.empty(k // group_size, n, 2, dtype=dtype, device="meta"))
        else:
            w = linear.weight.detach().float().reshape(n, k // group_size, group_size)
            low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = (high - low).clamp(min=1e-6) / 15
            q = ((w - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
            zero = low + 8 * scale
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            # (k / group, n, 2): scale and zero of each group, as the kernel reads them
            self.register_buffer("scales_and_zeros", torch.stack([scale[..., 0], zero[..., 0]], -1)
                                 .transpose(0, 1).contiguous().to(dtype))
        self.bias = linear.bias
        self.block_rows = INT4_BLOCK_ROWS.get(int4_packing())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        if self.block_rows and _dequantizes(rows.shape[0], self.in_features * self.out_features,
                                            INT4_DEQUANTIZE_FROM_ROWS):
            y = F.linear(rows, self.dequantized())
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size,
                                                           self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The (out, in) weight, (q - 8) * scale + zero, in the activations' dtype and this thread's
        scratch (rounded to it twice, after the product and after the sum: the kernel rounds never)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        w = _scratch_matrix((n, k), self.scales_and_zeros.dtype)
        w.copy_(_int4_values(self.weight, n, k, self.block_rows))
        scales, zeros = self.scales_and_zeros.permute(2, 1, 0).contiguous()[..., None]  # (n, k / group, 1) each
        w.view(n, k // g, g).mul_(scales).add_(zeros)
        return w


class Int8Embedding(nn.Module):
    """The tied embedding / LM head in int8, one scale per token row: lookups dequantise their rows,
    project() is the output layer (int8_matmul)."""

    def __init__(self, embedding: nn.Embedding, int8_rows: bool = False):
        super().__init__()
        q, scale = _int8_per_row(embedding.weight)
        self.dtype, self.int8_rows = embedding.weight.dtype, int8_rows
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale.to(_compute_dtype(self.dtype)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids].to(self.scales.dtype) * self.scales[ids, None]).to(self.dtype)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1]).to(self.scales.dtype)
        return int8_matmul(rows, self.weight, self.scales, self.int8_rows).view(*hidden.shape[:-1], -1)


def int4_packing() -> str:
    """The int4 kernel's weight layout here: _convert_weight_to_int4pack_for_cpu packs blocks of 64
    rows with AVX-512, 32 with AVX2, pairs without either (aten/src/ATen/native/cpu/int4mm_kernel.cpp),
    so an int4 folder is only read on a CPU of the same kind."""
    return torch.backends.cpu.get_cpu_capability()


def quantize_weights(model: PaliGemma, scheme: str, group_size: int = 32, vision: bool = False) -> int:
    """Swap the decoder's linear layers (and with `vision`, always with w8a8, the vision tower's and
    the projector's: they only ever multiply prompts) for int8 / int4 ones and the embedding for
    Int8Embedding, in place -> layers swapped. On a meta-device model it builds the layout only
    (load_quantized_folder fills it)."""
    int8_rows = scheme == "w8a8"
    vision = vision or int8_rows
    if scheme not in QUANT_SCHEMES:
        raise QuantizeError(f"quantize must be one of {', '.join(QUANT_SCHEMES)}, got {scheme!r}")
    if model.device.type not in ("cpu", "meta"):
        raise QuantizeError(f"int8/int4 weights run on the CPU kernels of PyTorch; this model is on "
                            f"{model.device}: load it with device='cpu', or without quantize")
    if any(isinstance(m, (Int8Linear, Int4Linear, Int8Embedding)) for m in model.modules()):
        raise QuantizeError("this model is quantised already")
    pattern = _DECODER_LINEAR + (f"|{_VISION_LINEAR}" if vision else "")
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
        setattr(model.get_submodule(parent), child,
                Int4Linear(old, group_size) if scheme == "int4" else Int8Linear(old, int8_rows))
    model.language_model.embed_tokens = Int8Embedding(model.language_model.embed_tokens, int8_rows)
    if int8_rows:
        for layer in [*model.language_model.layers, *model.vision_tower.encoder.layers]:
            layer.feed_forward_block_rows = INT8_ROWS_BLOCK
    int4 = {"group_size": group_size, "packed_for": int4_packing()} if scheme == "int4" else {}
    model.config.quantization = {"scheme": scheme, **int4, "vision": vision}
    return len(names)


# A quantised folder (`palikit quantize SRC --to int8 --out DIR`): config.json with this key beside
# the released fields, and the quantised tensors under palikit's names (a layout of palikit's own:
# transformers does not read it).
QUANTIZED_KEY = "palikit_quantization"


def save_quantized_folder(pipe, folder) -> None:
    """A quantised model as a folder palikit.load reads back without quantising again."""
    from safetensors.torch import save_file

    from .api import save_model_files
    from .atomic import atomic_write, write_text_atomic

    config = pipe.config
    if not config.quantization:
        raise QuantizeError("this model is not quantised: load it with quantize='int8' or 'int4' first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in pipe.model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_text_atomic(folder / "config.json",
                      json.dumps(config.to_hf_config() | {QUANTIZED_KEY: config.quantization}, indent=2))
    save_model_files(folder, config, pipe.tokenizer.path, pipe.codec_path)


def load_quantized_folder(model: PaliGemma, quantization: dict, files: list, dtype, device) -> PaliGemma:
    """Fill a meta-device model from a quantised folder's tensors: the quantised layout first, then
    each tensor assigned as it is read (only the float weights that stayed unquantised convert to
    `dtype`), so that no full-precision copy of the decoder is ever made."""
    from .weights import iter_safetensors, load_tensors

    if torch.device(device).type != "cpu":
        raise QuantizeError(f"{quantization['scheme']} weights run on the CPU kernels; load with device='cpu'")
    here = int4_packing()
    if quantization["scheme"] == "int4" and quantization.get("packed_for", here) != here:
        raise QuantizeError(f"these int4 weights are packed for {quantization['packed_for']} CPUs and this one "
                            f"runs {here} kernels, which read another layout: quantise the original weights "
                            f"here (palikit quantize SRC --to int4), or use int8 (one layout everywhere)")
    with torch.device("meta"):  # the layout only: shapes and dtypes, no values
        quantize_weights(model, quantization["scheme"], quantization.get("group_size", 32),
                         quantization.get("vision", False))
    packed = lambda name, t: not t.is_floating_point() or name.endswith(("scales", "scales_and_zeros"))  # noqa: E731
    load_tensors(model, iter_safetensors(files, model.config.version, dtype), dtype, device, files[0].parent,
                 keep_dtype=packed)
    model.language_model.embed_tokens.dtype = dtype  # what its lookups return: the model's dtype
    model.config.quantization = quantization
    return model


# ---- QLoRA -----------------------------------------------------------------------------------------


@dataclass
class QuantSettings:
    """QLoRA: the language model's linear layers in 4 bits (bitsandbytes, CUDA only)."""

    bits: int = 4  # only 4 is supported
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # the 4-bit matmuls run in it
    double_quant: bool = True  # quantise the quantisation constants too (saves ~0.4 bit/param)


def require_bitsandbytes(device: torch.device):
    if device.type != "cuda":
        raise QuantizeError(f"quantize (QLoRA) needs a CUDA GPU and this run is on {device}; remove the "
                            "`quantize` section to train LoRA on unquantised weights")
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizeError("quantize (QLoRA) needs bitsandbytes: pip install bitsandbytes") from e
    return bitsandbytes


def quantize_4bit(model: PaliGemma, q: QuantSettings, device: torch.device, modules: str) -> int:
    """Swap the linear layers named by `modules` (a regex matched in full; QLoRA: the language
    model's) for bitsandbytes 4-bit ones and check that every one really is quantised. Raises
    rather than training unquantised weights."""
    bnb = require_bitsandbytes(device)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(modules, n)]
    for name in names:
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=DTYPES[q.compute_dtype], compress_statistics=q.double_quant,
                                quant_type=q.quant_type, device="cpu")
        new.weight = bnb.nn.Params4bit(old.weight.data.cpu(), requires_grad=False,
                                       compress_statistics=q.double_quant, quant_type=q.quant_type)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new.to(device))  # quantised by the move to CUDA
    failed = [n for n in names if getattr(model.get_submodule(n).weight, "quant_state", None) is None]
    if failed or not names:
        raise RuntimeError(f"bitsandbytes left {len(failed)} of {len(names)} layers unquantised "
                           f"({failed[:3]})")
    return len(names)
