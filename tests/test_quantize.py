"""int8 / int4 / w8a8 (palikit.quantize): each layer against its dequantised weights (w8a8: and
its quantised rows), the quantisation error within its step, the bundled model's log-probs and
answers within stated bounds of float32, and the errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import palikit
from palikit.cli import main
from palikit import quantize
from palikit.config import PRESETS
from palikit.paligemma import PaliGemma
from palikit.quantize import (DEQUANTIZE_FROM_ROWS, INT4_DEQUANTIZE_FROM_ROWS, Int4Linear, Int8Embedding, Int8Linear,
                              QuantizeError, int4_packing, quantize_weights)
from palikit.synthetic import iter_examples


@pytest.fixture(scope="module")
def held_out():
    """Teacher-forced examples of every task on scenes no training used (seed 999)."""
    rows = [(image, ex) for image, ex, _ in iter_examples(12, seed=999, size=96)]
    return [r[0] for r in rows], [r[1]["prefix"] for r in rows], [r[1]["suffix"] for r in rows]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to bfloat16's rounding of the result (8 bits of mantissa, relative to its largest)."""
    torch.testing.assert_close(got.float(), want, rtol=0, atol=float(want.abs().max()) * 2**-7)


def _linear(n_out=96, n_in=128, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 10, n_out)[:, None])  # rows of very different scales
    return layer


@pytest.mark.parametrize("rows", [5, DEQUANTIZE_FROM_ROWS], ids=["int8-kernel", "dequantised"])
@torch.no_grad()
def test_int8_linear_is_its_dequantised_weight(rows):
    """Both paths: the int8 kernel for a few rows, the dense GEMM on the dequantised weight (in a
    scratch matrix every layer reuses) for many."""
    layer, x = _linear(), torch.randn(rows, 128)
    with torch.inference_mode():  # a scratch made in inference mode is written outside it too
        Int8Linear(_linear())(x)
    q = Int8Linear(layer)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (96, 128)
    assert q.scales.dtype == torch.bfloat16, "a float32 model's activations run in bfloat16"
    dequant = q.weight.float() * q.scales.float()[:, None]
    bf16 = x.bfloat16().float()
    _close(q(x), bf16 @ dequant.T + layer.bias)
    step = layer.weight.abs().amax(1, keepdim=True) / 127  # one scale per output row
    rounded = (step - q.scales.float()[:, None]).abs() * 127  # bfloat16's rounding of the scale
    assert ((dequant - layer.weight).abs() <= step / 2 + rounded + 1e-6).all()
    _close(q(x[:1]), bf16[:1] @ dequant.T + layer.bias)  # the one-row (decode) shape too
    other = Int8Linear(_linear(n_out=64, seed=1))  # another layer fills the scratch in between
    _close(other(x), bf16 @ (other.weight.float() * other.scales.float()[:, None]).T + other.bias)
    _close(q(x), bf16 @ dequant.T + layer.bias)
    with torch.enable_grad():  # autograd could keep the weight: a copy of its own, not the scratch
        _close(q(x), bf16 @ dequant.T + layer.bias)


@torch.no_grad()
def test_w8a8_linear_multiplies_int8_rows(monkeypatch):
    """Each row is rounded to int8 with a scale of its own (its largest |value| / 127), a prompt's
    in blocks (here 3 of 14, 14 and 12 rows), a decode step's (one row, five) at once."""
    monkeypatch.setattr(quantize, "INT8_ROWS_BLOCK", 16)
    layer = _linear()
    q = Int8Linear(layer, int8_rows=True)
    dequant = q.weight.float() * q.scales.float()[:, None]
    x = torch.randn(40, 128)
    x[::3, 5] = 60  # an outlier in every third row: a coarse step for the rest of that row
    bf16 = x.bfloat16().float()
    step = bf16.abs().amax(-1, keepdim=True) / 127
    want = (bf16 / step).round() * step @ dequant.T + layer.bias
    _close(q(x), want)
    unrounded = bf16 @ dequant.T + layer.bias
    assert (q(x).float() - unrounded).abs().max() > 3 * float(want.abs().max()) * 2**-7, "the rows are int8"
    _close(q(x[:5]), want[:5])
    _close(q(x[:1]), want[:1])


@pytest.mark.parametrize("scheme", ["int8", "w8a8"])
@torch.no_grad()
def test_compiled_one_row_is_a_reduction_up_to_its_width_limit(scheme, monkeypatch):
    """Under torch.compile one row of up to MATERIALIZE_MAX_ROW inputs is multiplied as inductor's
    reduction over a materialised row, a wider one by the int8 kernels (3B's down projection ran
    twice as fast so); both give the layer's product. Run eagerly here, with is_compiling faked."""
    materialised = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(quantize.gemma, "MATERIALIZE_FROM_ENTRIES", 0)
    monkeypatch.setattr(quantize.gemma, "materialize", lambda row: materialised.append(row.shape) or row.clone())
    monkeypatch.setattr(quantize, "MATERIALIZE_MAX_ROW", 128)
    for n_in, reduced in [(128, True), (256, False)]:
        layer, x = _linear(n_in=n_in), torch.randn(1, n_in)
        q = Int8Linear(layer, int8_rows=scheme == "w8a8")
        dequant = q.weight.float() * q.scales.float()[:, None]
        row = x.bfloat16().float()
        if scheme == "w8a8":
            step = row.abs().amax(-1, keepdim=True) / 127
            row = (row / step).round() * step
        materialised.clear()
        _close(q(x), row @ dequant.T + layer.bias)
        assert materialised == ([(n_in,)] if reduced else [])


def _int4_kernel_weight(q: Int4Linear) -> torch.Tensor:
    """The (out, in) weight the int4 kernel multiplies by: its product with the identity."""
    eye = torch.eye(q.in_features, dtype=q.scales_and_zeros.dtype)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.weight, q.group_size, q.scales_and_zeros).float().T


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("rows", [5, INT4_DEQUANTIZE_FROM_ROWS], ids=["int4-kernel", "dequantised"])
@torch.no_grad()
def test_int4_linear_is_its_dequantised_weight(rows, group_size, monkeypatch):
    """Both paths: the int4 kernel for a few rows; for a prompt's many, the weight unpacked from the
    kernel's layout into a scratch matrix every layer reuses (96 outputs: on AVX-512 one block of 64
    rows and 32 rows in pairs) and the dense GEMM."""
    layer, x = _linear(), torch.randn(rows, 128)
    q = Int4Linear(layer, group_size)
    dequant = _int4_kernel_weight(q)
    with torch.inference_mode():
        _close(q.dequantized(), dequant)
    unpacked = []
    monkeypatch.setattr(Int4Linear, "dequantized", lambda self, f=Int4Linear.dequantized: unpacked.append(1) or f(self))
    _close(q(x), x.bfloat16().float() @ dequant.T + layer.bias)
    assert len(unpacked) == (rows >= INT4_DEQUANTIZE_FROM_ROWS and q.block_rows is not None)
    other = Int4Linear(_linear(n_out=64, seed=1), group_size)  # another layer fills the scratch in between
    _close(other(x), x.bfloat16().float() @ _int4_kernel_weight(other).T + other.bias)
    _close(q(x), x.bfloat16().float() @ dequant.T + layer.bias)
    w = layer.weight.detach().reshape(96, -1, group_size)
    step = (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15  # per group: 16 levels
    # half a step, plus bfloat16's rounding of the scale and offset (relative 2^-8 of |w|)
    assert ((dequant.reshape(w.shape) - w).abs() <= step / 2 + w.abs().amax(-1, keepdim=True) / 64).all()
    assert not ((dequant.reshape(w.shape) - w).abs() <= step / 8).all(), "it is 4-bit, not exact"


def test_int4_weight_unpacks_from_the_avx2_layout():
    """The AVX2 kernel packs blocks of 32 rows: ATEN_CPU_CAPABILITY=avx2 makes this CPU run it
    (112 outputs: three blocks and 16 rows in pairs)."""
    code = ("import torch; from palikit.quantize import Int4Linear, int4_packing\n"
            "torch.manual_seed(0); q = Int4Linear(torch.nn.Linear(128, 112), 32)\n"
            "eye = torch.eye(128, dtype=torch.bfloat16)\n"
            "want = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.weight, 32, q.scales_and_zeros).float().T\n"
            "with torch.inference_mode(): got = q.dequantized().float()\n"
            "print(int4_packing(), q.block_rows, float((got - want).abs().max() / want.abs().max()))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    capability, block_rows, error = out.stdout.split()
    assert (capability, block_rows) == ("AVX2", "32")
    assert float(error) <= 2**-7


@torch.no_grad()
def test_int8_embedding_looks_up_and_projects_the_same_table(monkeypatch):
    """Many rows too, without dequantising a table over DEQUANTIZE_MAX_ENTRIES into the scratch
    (a 257k-row LM head would keep 1.2 GB of it)."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 64)
    q = Int8Embedding(emb)
    table = q.weight.float() * q.scales.float()[:, None]
    ids = torch.tensor([[3, 7, 49]])
    assert q(ids).dtype == torch.float32
    _close(q(ids), table[ids])
    hidden = torch.randn(2, 3, 64)
    _close(q.project(hidden), hidden.bfloat16().float() @ table.T)
    monkeypatch.setattr(quantize, "DEQUANTIZE_MAX_ENTRIES", table.numel() - 1)
    monkeypatch.setattr(quantize._scratch, "buffer", None, raising=False)
    many = torch.randn(DEQUANTIZE_FROM_ROWS, 64)
    _close(q.project(many), many.bfloat16().float() @ table.T)
    assert quantize._scratch.buffer is None


@pytest.mark.parametrize("scheme, bound", [("int8", 0.5), ("int4", 2.0), ("w8a8", 1.5)])
def test_bundled_model_stays_close_to_float32(held_out, scheme, bound):
    """Max |delta log-prob| of each teacher-forced suffix (summed over its tokens) against float32:
    measured 0.026 (int8), 0.82 (int4) and 0.74 (w8a8) on these 58 suffixes, mean 0.001, 0.024
    and 0.018; greedy answers agree on at least 90 % (measured: all)."""
    images, prefixes, suffixes = held_out
    base = palikit.load("default", dtype="float32")
    quant = palikit.load("default", dtype="float32", quantize=scheme)
    decoder = [m for n, m in quant.model.named_modules() if n.startswith("language_model.layers")]
    assert sum(isinstance(m, (Int8Linear, Int4Linear)) for m in decoder) == 7 * quant.config.text.num_layers
    assert isinstance(quant.model.language_model.embed_tokens, Int8Embedding)
    vision = [isinstance(m, Int8Linear) for m in quant.model.vision_tower.modules()]
    assert sum(vision) == (6 * quant.config.vision.num_layers if scheme == "w8a8" else 0)
    int8 = [m for m in quant.model.modules() if isinstance(m, (Int8Linear, Int8Embedding))]
    assert all(m.int8_rows == (scheme == "w8a8") for m in int8), "w8a8: every int8 layer takes int8 rows"
    delta = np.abs(np.array(quant.score(images, prefixes, suffixes)) - base.score(images, prefixes, suffixes))
    assert 0 < delta.max() < bound, delta.max()
    a = base.generate(images[:24], prefixes[:24], max_new_tokens=40)
    b = quant.generate(images[:24], prefixes[:24], max_new_tokens=40)
    assert np.mean([x == y for x, y in zip(a, b)]) >= 0.9


@torch.no_grad()
def test_w8a8_prompts_run_their_feed_forward_in_row_blocks(held_out):
    """A w8a8 model's layers run a prompt's rows through their feed-forward halves (norms, MLP,
    residual) in blocks (gemma.in_row_blocks), each row on its own: scores equal to the bit with
    blocks of 37 rows (uneven, across examples) and with one block for all."""
    images, prefixes, suffixes = (part[:4] for part in held_out)
    pipe = palikit.load("default", dtype="float32", quantize="w8a8")
    layers = [*pipe.model.language_model.layers, *pipe.model.vision_tower.encoder.layers]
    assert {layer.feed_forward_block_rows for layer in layers} == {quantize.INT8_ROWS_BLOCK}
    rows = []
    for layer in layers:
        layer.mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
        layer.feed_forward_block_rows = 10**6
    whole = pipe.score(images, prefixes, suffixes)
    assert len(rows) == len(layers) and min(rows) > 4 * 37
    rows.clear()
    for layer in layers:
        layer.feed_forward_block_rows = 37
    assert pipe.score(images, prefixes, suffixes) == whole
    assert len(rows) > 4 * len(layers) and max(rows) <= 37


def test_vision_tower_too_when_asked():
    pipe = palikit.load("default", dtype="float32")
    n = quantize_weights(pipe.model, "int8", vision=True)
    assert isinstance(pipe.model.multi_modal_projector.linear, Int8Linear)
    assert n == 7 * pipe.config.text.num_layers + 6 * pipe.config.vision.num_layers + 1


def test_errors(tmp_path, capsys):
    pipe = palikit.load("default", dtype="float32")
    with pytest.raises(QuantizeError, match="one of int8, int4"):
        quantize_weights(pipe.model, "int2")
    with pytest.raises(QuantizeError, match="the int4 kernel takes 32, 64, 128 or 256"):
        quantize_weights(pipe.model, "int4", group_size=48)
    tiny = PaliGemma(PRESETS["tiny-paligemma2"])  # a 64-wide decoder
    with pytest.raises(QuantizeError, match="group_size=128 does not divide the 64 inputs of language_model"):
        quantize_weights(tiny, "int4", group_size=128)
    quantize_weights(pipe.model, "int8")
    with pytest.raises(QuantizeError, match="quantised already"):
        quantize_weights(pipe.model, "int4")
    with pytest.raises(palikit.processor.InputError, match="saved by `palikit quantize`"):
        pipe.save(tmp_path / "q")
    assert main(["caption", "x.png", "--quantize", "int2"]) == 2
    assert "invalid choice: 'int2'" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_quantized_folder_loads_without_quantising_again(tmp_path, held_out, scheme):
    """`palikit quantize` writes the quantised tensors and the scheme; palikit.load reads them into
    the quantised layout directly, and computes exactly what quantising at load does."""
    out = tmp_path / scheme
    assert main(["quantize", "default", "--to", scheme, "--out", str(out), "--dtype", "float32"]) == 0
    assert json.loads((out / "config.json").read_text())["palikit_quantization"]["scheme"] == scheme
    from palikit.weights import BUNDLED

    float32_bytes = (BUNDLED / "model.safetensors").stat().st_size  # int8 / int4: the vision tower stays float32
    assert (out / "model.safetensors").stat().st_size < 0.5 * float32_bytes
    images, prefixes, suffixes = (x[:20] for x in held_out)
    loaded, at_load = palikit.load(out, dtype="float32"), palikit.load("default", dtype="float32", quantize=scheme)
    packed = [t for t in loaded.model.state_dict().values() if not t.is_floating_point()]
    assert packed and all(t.data_ptr() % 64 == 0 for t in packed), "aligned for the kernels' vector loads"
    assert loaded.score(images, prefixes, suffixes) == at_load.score(images, prefixes, suffixes)
    assert loaded.generate(images, prefixes) == at_load.generate(images, prefixes)
    assert loaded.codec_path is not None and loaded.segment(images[0], "circle") is not None
    with pytest.raises(QuantizeError, match=f"holds {scheme} weights already"):
        palikit.load(out, quantize="int8")
    with pytest.raises(palikit.processor.InputError, match="saved by `palikit quantize`"):
        loaded.save(tmp_path / "again")
    if scheme == "int4":  # the int4 kernel's layout depends on the CPU's vector width: another is refused
        config = json.loads((out / "config.json").read_text())
        assert config["palikit_quantization"]["packed_for"] == int4_packing()
        config["palikit_quantization"]["packed_for"] = "AVX2" if int4_packing() != "AVX2" else "AVX512"
        (out / "config.json").write_text(json.dumps(config))
        with pytest.raises(QuantizeError, match="packed for AVX.* CPUs and this one runs"):
            palikit.load(out, dtype="float32")
