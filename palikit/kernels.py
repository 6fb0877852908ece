"""Which kernel multiplies: the one home of routing by CPU kind and number of rows.

The model files call `Linear` (an nn.Linear whose products go through `linear`) and know nothing
of CPUs; palikit.quantize's layers call `int8_linear` / `int4_linear`. Each kind of product has
at most two routes, chosen by its number of rows (a prompt's many, or a decode step's few) and by
whether the CPU computes in 16 bits natively; every route below measured >= 10 % end to end on the
CPU kind it serves (benchmarks/results/, docs/performance.md).

- 16-bit dense products. A CPU without native bfloat16 (AVX2, many ARM cores) converts every
  element in its 16-bit GEMM: there a prompt's rows (PROMPT_ROWS or more) run in float32, on the
  weight upcast into a reused scratch matrix (`linear`; attention's own products: `matmul`); the
  weights stay 16-bit in memory. A decode step's few rows stay 16-bit there (its GEMV reads half the
  bytes). On a CPU with native bfloat16 a one-row step runs ATen's own GEMV rather than oneDNN's
  (`one_row_products`).
- int8 weights: few rows through aten._weight_int8pack_mm (in a compiled decode step on an AVX-512
  CPU, one row as inductor's own reduction over it); a prompt's rows through the dense GEMM on the
  weight dequantised into the scratch (the int8 kernel is a GEMV kernel). w8a8 rounds the rows to
  int8 too and multiplies with torch._int_mm (exact int32 sums).
- int4 weights: few rows through aten._weight_int4pack_mm_for_cpu; a prompt's through the dense
  GEMM on the weight unpacked from that kernel's layout into the scratch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

# A product of this many rows or more is a prompt's (or a training batch's); fewer, a decode step's.
# Past the crossover of the two routes on every CPU kind measured (docs/performance.md).
PROMPT_ROWS = 32
_16BIT = (torch.bfloat16, torch.float16)
# The vector kernels PyTorch runs here: "AVX512", "AVX2", "DEFAULT" (ARM: "SVE256", ...).
# ATEN_CPU_CAPABILITY=avx2 (PyTorch's own switch) makes an AVX-512 CPU run as an AVX2 one.
CAPABILITY = torch.backends.cpu.get_cpu_capability()


@functools.cache
def native_16bit(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` (bfloat16 / float16) natively: AVX-512 BF16 / FP16 or AMX."""
    if CAPABILITY != "AVX512":
        return False  # AVX2, ARM and the rest: their 16-bit GEMMs convert to float32 element by element
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.cpu._is_amx_fp16_supported()


# What is used where: measured on an AVX-512 CPU with native bfloat16 and on the same machine run as
# an AVX2 one (benchmarks/bench_inference.py --emulate-avx2; docs/performance.md).
def compile_pays(device: torch.device) -> str | None:
    """Why a compiled decode step is not used on this device (None: it is)."""
    if device.type != "cpu" or CAPABILITY == "AVX512":
        return None
    return (f"--compile is ignored on this CPU ({CAPABILITY} kernels): torch.compile's code for it crashed on "
            "PaliGemma 2 3B's decode step (torch 2.13), and its products run the same kernels either way")


@functools.cache
def int8_products_exact() -> bool:
    """Whether torch._int_mm multiplies full-range int8 exactly here. Without VNNI, oneDNN's int8 GEMM
    sums pairs of products in saturating 16 bits (vpmaddubsw), and w8a8's products come out wrong:
    by up to 7e4 on random int8 rows with AVX2 kernels (docs/performance.md)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 256), dtype=torch.int8, generator=generator)
    b = torch.randint(-127, 128, (256, 32), dtype=torch.int8, generator=generator)
    return torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())


def flex_attention_runs(device: torch.device) -> str | None:
    """Why FlexAttention is not used on this device (None: it is). It is compiled code, and on a CPU
    without AVX-512 torch.compile's code for it failed (an index out of bounds, torch 2.13)."""
    if device.type != "cpu" or CAPABILITY == "AVX512":
        return None
    return (f"--attention flex is ignored on this CPU ({CAPABILITY} kernels): torch.compile's code for "
            "FlexAttention failed there (torch 2.13); eager attention computes the same")


def quantization_pays(scheme: str, device: torch.device) -> str | None:
    """Why the weight quantisation `scheme` is refused here (None: it decodes faster than bfloat16).
    w8a8 is refused, whatever else, where its int8 products are not exact."""
    if scheme == "w8a8" and device.type == "cpu" and not int8_products_exact():
        return ("w8a8 is not available on this CPU: its int8 matrix products (oneDNN without VNNI) saturate "
                "and give wrong numbers; use int8 or int4 (weights only) or bfloat16")
    if device.type != "cpu" or CAPABILITY == "AVX512" or os.environ.get("PALIKIT_QUANTIZE_ANYWAY") == "1":
        return None
    return (f"{scheme} decodes slower than bfloat16 on this CPU ({CAPABILITY} kernels: PyTorch's int8 / int4 "
            "matrix-vector kernels do not reach its memory bandwidth): load it without --quantize, or set "
            "PALIKIT_QUANTIZE_ANYWAY=1 to trade speed for the smaller memory")


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a prompt's products run in: the weights' own, or float32 on a CPU without native
    arithmetic in that 16-bit dtype."""
    if device.type == "cpu" and dtype in _16BIT and not native_16bit(dtype):
        return torch.float32
    return dtype


# ---- scratch matrices --------------------------------------------------------------------------

_scratch = threading.local()  # per thread, reused by every layer: threads never share them
# A larger matrix gets a matrix of its own, freed after its product: the 257k-row LM head would
# keep gigabytes of scratch alive (in a model quantised or kept in bfloat16 to save memory).
SCRATCH_MAX_ENTRIES = 1 << 25


def scratch_matrix(shape: tuple[int, int], dtype: torch.dtype, slot: str = "buffer") -> torch.Tensor:
    """An uninitialised (rows, cols) matrix in this thread's scratch `slot`, grown when too small;
    a new tensor where autograd may keep it for a backward pass, or past SCRATCH_MAX_ENTRIES."""
    numel = shape[0] * shape[1]
    if torch.is_grad_enabled() or numel > SCRATCH_MAX_ENTRIES:
        return torch.empty(shape, dtype=dtype)
    buffer = getattr(_scratch, slot, None)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            buffer = torch.empty(numel, dtype=dtype)
            setattr(_scratch, slot, buffer)
    return buffer[:numel].view(shape)


# ---- dense products ------------------------------------------------------------------------------


class _Float32Product(torch.autograd.Function):
    """x @ weight.T (+ bias) in float32 for a frozen 16-bit weight: the float32 copy of the weight is
    made again in the backward pass instead of being kept between the two."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        with torch.autocast("cpu", enabled=False):
            y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = (grad.float() @ weight.float()).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a prompt's rows of a 16-bit weight in float32 where the CPU lacks 16-bit arithmetic."""
    if x.numel() < PROMPT_ROWS * weight.shape[1] or compute_dtype(weight.dtype, x.device) == weight.dtype:
        return F.linear(x, weight, bias)
    if weight.requires_grad:  # a trainable 16-bit weight: autograd's own float32 copy
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    if torch.is_grad_enabled():
        return _Float32Product.apply(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        w = scratch_matrix(weight.shape, torch.float32).copy_(weight)
        return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, in float32 for a prompt's rows of 16-bit tensors where the CPU lacks 16-bit arithmetic
    (Gemma 2's attention scores and their weighted sum: a fifth of a 3B prompt's time on AVX2 else)."""
    if a.shape[-2] < PROMPT_ROWS or compute_dtype(a.dtype, a.device) == a.dtype:
        return a @ b
    with torch.autocast(a.device.type, enabled=False):
        return (a.float() @ b.float()).to(a.dtype)


class Linear(nn.Linear):
    """nn.Linear through `linear`. Still an nn.Linear, so peft's LoRA wraps it like any other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


@contextlib.contextmanager
def one_row_products(rows: int, dtype: torch.dtype, device: torch.device, quantized: bool = False):
    """A decode step of one row: its bfloat16 products on a CPU with native bfloat16 run ATen's own
    GEMV, not oneDNN's matmul, which reads a 9216 x 2304 matrix 2.5x slower for one row (and is the
    faster one from two rows on). Not for a quantised model: its large products are the int8 / int4
    kernels (w8a8's torch._int_mm is oneDNN's), and the rest ran faster in oneDNN (docs/performance.md).
    torch.backends.mkldnn.enabled is process-wide: a prompt run by another thread meanwhile would
    run ATen's slower GEMM, with the same result."""
    if rows != 1 or device.type != "cpu" or dtype != torch.bfloat16 or not native_16bit(dtype) or quantized:
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


# ---- int8 ----------------------------------------------------------------------------------------

# w8a8 rows are rounded and multiplied in blocks of at most this many, so that a block's int32
# products and their rescaling stay in cache (docs/performance.md).
INT8_ROWS_BLOCK = 512


def _dequantizes(rows: int, entries: int) -> bool:
    """A prompt's product on the weight dequantised (a weight that fits the scratch: the LM head's
    rows are few, one per prompt, and take the kernel)."""
    return rows >= PROMPT_ROWS and entries <= SCRATCH_MAX_ENTRIES


@torch.library.custom_op("palikit::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """A copy of x that torch.compile cannot see into, so x is computed once into memory."""
    return x.clone()


@materialize.register_fake
def _(x):
    return torch.empty_like(x)


# A compiled one-row int8 product is inductor's reduction over a float32 row of at most this many
# entries (PaliGemma 2 3B's width): a wider row crowds the weight rows out of a core's L1 cache, and
# those (3B's down projection) go to the int8 kernel. Measured on AVX-512 (docs/performance.md);
# AVX2 vectorises the int8-to-float conversion of the loop poorly and keeps the kernel.
REDUCTION_MAX_ROW = 2304


def _reduces(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    return (rows.shape[0] == 1 and weight.shape[1] <= REDUCTION_MAX_ROW and torch.compiler.is_compiling()
            and CAPABILITY == "AVX512")


def round_rows_to_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows ~= q * row_scales: symmetric, one scale per row, set by its largest |value| (the dynamic
    per-token scheme of LLM.int8(), Dettmers et al. 2022, without its float outlier columns;
    SmoothQuant's W8A8 baseline, Xiao et al. 2023) -> q (int8), row_scales (float32, (M, 1))."""
    x = rows.float()
    row_scales = x.abs().amax(-1, keepdim=True).clamp_(min=1e-12) / 127
    return (x / row_scales).round_().clamp_(-127, 127).to(torch.int8), row_scales


def int8_linear(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, int8_rows: bool = False
                ) -> torch.Tensor:
    """rows (M, in) @ (weight * scales[:, None]).T, in the rows' dtype; with `int8_rows` (w8a8) the
    rows rounded to int8 first (round_rows_to_int8). The sums are float32 or int32 on every route."""
    if _reduces(rows, weight):
        row, row_scale = rows.float(), 1
        if int8_rows:  # float32 sums of the integer products are exact up to 2^24
            q, row_scale = round_rows_to_int8(rows)
            row = q.float()
        # materialised: inductor would otherwise inline the row's producers (norms, GELU) into the
        # loop and compute them again for every weight row
        row = materialize(row[0])
        sums = (weight.float() * row).sum(-1) * (scales.float() * row_scale)
        return sums.to(rows.dtype).view(1, -1)
    if int8_rows:
        out = torch.empty(rows.shape[0], weight.shape[0], dtype=rows.dtype, device=rows.device)
        for start in range(0, rows.shape[0], INT8_ROWS_BLOCK):
            q, row_scales = round_rows_to_int8(rows[start:start + INT8_ROWS_BLOCK])
            products = torch._int_mm(q, weight.t())
            out[start:start + INT8_ROWS_BLOCK] = products.float().mul_(row_scales).mul_(scales.float())
        return out
    if _dequantizes(rows.shape[0], weight.numel()):
        dtype = compute_dtype(rows.dtype, rows.device)
        dense = scratch_matrix(weight.shape, dtype).copy_(weight)  # exact: -128..127 are integers in 16 bits
        with torch.autocast(rows.device.type, enabled=False):
            return F.linear(rows.to(dtype), dense).mul_(scales.to(dtype)).to(rows.dtype)
    kernel_dtype = rows.dtype if rows.dtype in _16BIT else torch.bfloat16  # its float32 path is scalar
    return torch.ops.aten._weight_int8pack_mm(rows.to(kernel_dtype), weight, scales.to(kernel_dtype)).to(rows.dtype)


# ---- int4 ----------------------------------------------------------------------------------------

# The int4 kernel's weight layout, read back to dequantise a prompt's weights: for each input in
# turn, _convert_weight_to_int4pack_for_cpu (aten/src/ATen/native/cpu/int4mm_kernel.cpp) packs the
# output rows in blocks of 64 (AVX-512) or 32 (AVX2), row j of a block in a byte's low 4 bits and row
# j + 32 (16) in its high ones, and the rows past the last whole block in pairs (2i low, 2i + 1 high).
# Elsewhere the kernel interleaves otherwise, and prompts run the kernel itself.
INT4_BLOCK_ROWS = {"AVX512": 64, "AVX2": 32}


def int4_block_rows() -> int | None:
    return INT4_BLOCK_ROWS.get(CAPABILITY)


def int4_pack(values: torch.Tensor) -> torch.Tensor:
    """(n, k) values 0..15 -> the int4 kernel's packed weight, for this CPU."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)


def int4_values(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The (n, k) values 0..15 of a weight packed for this CPU's int4 kernel, in an int8 scratch."""
    block = int4_block_rows()
    if block is None:
        raise NotImplementedError(f"the int4 layout of {CAPABILITY} CPUs is unknown")
    values = scratch_matrix((n, k), torch.int8, "int4_values")
    packed = packed.reshape(-1).view(torch.int8)
    whole = n - n % block
    if whole:
        _split_bytes(packed[:whole * k // 2].view(whole // block, k, block // 2).transpose(1, 2),
                     *values[:whole].view(whole // block, 2, block // 2, k).unbind(1))
    if whole < n:
        _split_bytes(packed[whole * k // 2:].view(k, (n - whole) // 2).t(),
                     *values[whole:].view((n - whole) // 2, 2, k).unbind(1))
    return values


def _split_bytes(bytes_: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
    """low, high = the low and high 4 bits of bytes_; the bytes are moved into `high` first, so that
    the bit operations run along contiguous rows."""
    high.copy_(bytes_)
    torch.bitwise_and(high, 15, out=low)
    high.bitwise_right_shift_(4).bitwise_and_(15)


def int4_linear(rows: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor,
                n: int) -> torch.Tensor:
    """rows (M, k) @ W.T, W[o, i] = (q - 8) * scale + zero per group of `group_size` inputs, q the
    packed values (int4_pack); in the rows' dtype."""
    k = rows.shape[1]
    if _dequantizes(rows.shape[0], n * k) and int4_block_rows() is not None:
        dtype = compute_dtype(rows.dtype, rows.device)
        w = scratch_matrix((n, k), dtype).copy_(int4_values(packed, n, k)).sub_(8)
        scales, zeros = scales_and_zeros.permute(2, 1, 0).to(dtype)[..., None]  # (n, k / group, 1) each
        w.view(n, k // group_size, group_size).mul_(scales).add_(zeros)
        with torch.autocast(rows.device.type, enabled=False):
            return F.linear(rows.to(dtype), w).to(rows.dtype)
    kernel_dtype = scales_and_zeros.dtype  # the kernel takes contiguous rows only
    return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(kernel_dtype).contiguous(), packed, group_size,
                                                      scales_and_zeros).to(rows.dtype)
