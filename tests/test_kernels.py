"""palikit.kernels' dense routes against the exact product, on both CPU kinds whatever this machine
is (the kind is monkeypatched): a prompt's 16-bit product in float32 on a CPU without native
bfloat16, under autograd too (the gradient of its input, a frozen weight's float32 copy made again
in the backward pass, a trainable weight's gradient), and the one-row GEMV switch that must leave
oneDNN as it found it. (Both routes round once, to bfloat16, at the end: what an autocast region
would change is their speed, which benchmarks/bench_finetune.py measures.)"""

from __future__ import annotations

import pytest
import torch

from palikit import kernels


@pytest.fixture(params=[True, False], ids=["native-bf16", "avx2"])
def native(request, monkeypatch):
    monkeypatch.setattr(kernels, "native_16bit", lambda dtype: request.param)
    return request.param


def bf16_bound(want: torch.Tensor) -> float:
    """bfloat16 has 8 significant bits: a result rounded to it is within 2^-8 of its largest entry."""
    return float(want.detach().abs().max()) * 2**-8


@pytest.mark.parametrize("rows", [1, 8, kernels.PROMPT_ROWS, 100])
def test_linear_is_the_product_in_either_route(native, rows):
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, 64).bfloat16(), torch.randn(48, 64).bfloat16(), torch.randn(48).bfloat16()
    want = x.float() @ w.float().T + b.float()  # exact in float32: 64 products of 8-bit mantissas
    got = kernels.linear(x, w, b)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2 * bf16_bound(want))
    assert kernels.compute_dtype(torch.bfloat16, x.device) == (torch.bfloat16 if native else torch.float32)


def test_the_float32_route_under_autograd(native):
    """Training on a CPU without native bfloat16: the input's gradient and a trainable weight's equal
    autograd's own float32 product's, rounded to bfloat16; a frozen weight gets none."""
    torch.manual_seed(1)
    x = torch.randn(kernels.PROMPT_ROWS, 64).bfloat16().requires_grad_()
    frozen = torch.randn(48, 64).bfloat16()
    trainable = torch.randn(32, 48).bfloat16().requires_grad_()
    y = kernels.linear(kernels.linear(x, frozen), trainable)
    y.float().pow(2).sum().backward()
    xr = x.detach().float().requires_grad_()
    tr = trainable.detach().float().requires_grad_()
    h = (xr @ frozen.float().T).bfloat16().float()
    yr = h @ tr.T
    yr.bfloat16().float().pow(2).sum().backward()
    torch.testing.assert_close(y.float(), yr.bfloat16().float(), rtol=0, atol=2 * bf16_bound(yr))
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=0, atol=4 * bf16_bound(xr.grad))
    torch.testing.assert_close(trainable.grad.float(), tr.grad, rtol=0, atol=4 * bf16_bound(tr.grad))
    assert frozen.grad is None


@pytest.mark.parametrize("rows, quantized, off", [(1, False, True), (2, False, False), (1, True, False)])
def test_one_row_products_switch_onednn_off_and_back(monkeypatch, rows, quantized, off):
    monkeypatch.setattr(kernels, "native_16bit", lambda dtype: True)
    before = torch.backends.mkldnn.enabled
    with kernels.one_row_products(rows, torch.bfloat16, torch.device("cpu"), quantized):
        assert torch.backends.mkldnn.enabled == (before and not off)
    assert torch.backends.mkldnn.enabled == before
    with pytest.raises(RuntimeError), kernels.one_row_products(1, torch.bfloat16, torch.device("cpu")):
        raise RuntimeError("a failing step")
    assert torch.backends.mkldnn.enabled == before


def test_compile_is_not_used_where_it_does_not_pay(monkeypatch, caplog):
    """compile=True on a CPU where palikit does not compile (kernels.compile_pays) says so in one
    line and decodes eagerly; the pipeline's options say what it does."""
    import palikit

    monkeypatch.setattr(kernels, "CAPABILITY", "AVX2")
    pipe = palikit.load("default", dtype="float32", compile=True)
    assert not pipe.options.compile and pipe.decode_step.compiled is None
    assert "--compile is ignored on this CPU (AVX2 kernels)" in caplog.text
    monkeypatch.setattr(kernels, "CAPABILITY", "AVX512")
    assert palikit.load("default", dtype="float32", compile=True).decode_step.compiled is not None


@pytest.mark.parametrize("rows", [8, kernels.PROMPT_ROWS])
def test_the_route_follows_the_cpu(native, rows, monkeypatch):
    """Which product runs: a prompt's rows of a bfloat16 weight in float32 exactly where the CPU has
    no native bfloat16, a decode step's in bfloat16 everywhere (its GEMV reads half the bytes)."""
    seen = []
    linear = kernels.F.linear
    monkeypatch.setattr(kernels.F, "linear", lambda x, w, b=None: seen.append((x.dtype, w.dtype)) or linear(x, w, b))
    kernels.linear(torch.randn(rows, 64).bfloat16(), torch.randn(48, 64).bfloat16())
    f32 = rows >= kernels.PROMPT_ROWS and not native
    assert seen == [(torch.float32, torch.float32) if f32 else (torch.bfloat16, torch.bfloat16)]


@torch.inference_mode()
def test_a_large_weight_keeps_no_scratch(monkeypatch):
    """The float32 route of a weight over SCRATCH_MAX_ENTRIES (the LM head of a prompt's scores)
    upcasts into a matrix of its own, freed after the product, not into the kept scratch."""
    monkeypatch.setattr(kernels, "native_16bit", lambda dtype: False)
    monkeypatch.setattr(kernels._scratch, "buffer", None, raising=False)
    x, w = torch.randn(kernels.PROMPT_ROWS, 64).bfloat16(), torch.randn(48, 64).bfloat16()
    monkeypatch.setattr(kernels, "SCRATCH_MAX_ENTRIES", w.numel() - 1)
    want = x.float() @ w.float().T
    torch.testing.assert_close(kernels.linear(x, w).float(), want, rtol=0, atol=2 * bf16_bound(want))
    assert kernels._scratch.buffer is None
    monkeypatch.setattr(kernels, "SCRATCH_MAX_ENTRIES", w.numel())
    kernels.linear(x, w)
    assert kernels._scratch.buffer.numel() == w.numel()
