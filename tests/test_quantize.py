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
from PIL import Image
from torch import nn

import palikit
from palikit.cli import main
from palikit.config import PRESETS
from palikit.paligemma import PaliGemma
from palikit import kernels
from palikit.quantize import Int4Linear, Int8Embedding, Int8Linear, QuantizeError, lay_out, quantize_weights
from palikit.synthetic import iter_examples


@pytest.fixture(scope="module")
def held_out():
    """Teacher-forced examples of every task on scenes no training used (seed 999)."""
    rows = [(image, ex) for image, ex, _ in iter_examples(12, seed=999, size=96)]
    return [r[0] for r in rows], [r[1]["prefix"] for r in rows], [r[1]["suffix"] for r in rows]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to the rounding of a result in `dtype` (bfloat16: 8 significant bits, relative to the
    largest entry; float32: its sums' rounding, far below 2^-16)."""
    bound = 2**-7 if dtype == torch.bfloat16 else 2**-16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=float(want.abs().max()) * bound)


def _linear(n_out=96, n_in=128, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 10, n_out)[:, None])  # rows of very different scales
    return layer


@pytest.fixture(params=[True, False], ids=["native-bf16", "float32-prompts"])
def cpu_kind(request, monkeypatch):
    """Both CPU kinds on any machine: with native bfloat16 a prompt's products stay in the model's
    dtype; without (AVX2), a bfloat16 prompt's run in float32 (kernels.compute_dtype)."""
    monkeypatch.setattr(kernels, "native_16bit", lambda dtype: request.param)
    return request.param


# The routes of each product: the kernel for a decode step's few rows, the dense GEMM on the
# dequantised weight for a prompt's (kernels.PROMPT_ROWS or more).
ROWS = pytest.mark.parametrize("rows", [5, kernels.PROMPT_ROWS], ids=["few-rows", "prompt"])


@ROWS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_int8_linear_is_its_dequantised_weight(rows, dtype, cpu_kind):
    """Every route against x @ (q * scale).T: the int8 kernel takes the rows in bfloat16 (its float32
    path is scalar), the dense GEMM in the compute dtype (kernels.compute_dtype); the result is in
    the model's dtype. Also with the scratch shared by another layer in between, and under autograd."""
    layer, x = _linear(), torch.randn(rows, 128)
    with torch.inference_mode():  # a scratch made in inference mode is written outside it too
        Int8Linear(_linear(), False, dtype)(x.to(dtype))
    q = Int8Linear(layer, False, dtype)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (96, 128)
    assert q.scales.dtype == torch.bfloat16, "the kernel's activations are bfloat16 for a float32 model"
    dequant = q.weight.float() * q.scales.float()[:, None]
    inputs = x.to(dtype)
    rows_in = inputs.bfloat16() if rows < kernels.PROMPT_ROWS else inputs.to(kernels.compute_dtype(dtype, x.device))
    want = rows_in.float() @ dequant.T + layer.bias
    result_dtype = torch.bfloat16 if rows < kernels.PROMPT_ROWS or dtype == torch.bfloat16 else torch.float32
    _close(q(inputs), want, result_dtype)
    step = layer.weight.abs().amax(1, keepdim=True) / 127  # one scale per output row
    rounded = (step - q.scales.float()[:, None]).abs() * 127  # bfloat16's rounding of the scale
    assert ((dequant - layer.weight).abs() <= step / 2 + rounded + 1e-6).all()
    other = Int8Linear(_linear(n_out=64, seed=1), False, dtype)  # another layer fills the scratch in between
    other_want = rows_in.float() @ (other.weight.float() * other.scales.float()[:, None]).T + other.bias
    _close(other(inputs), other_want, result_dtype)
    _close(q(inputs), want, result_dtype)
    with torch.enable_grad():  # autograd could keep the weight: a copy of its own, not the scratch
        _close(q(inputs), want, result_dtype)


@torch.no_grad()
def test_w8a8_linear_multiplies_int8_rows(monkeypatch):
    """Each row is rounded to int8 with a scale of its own (its largest |value| / 127), a prompt's
    in blocks (here 3 of 16, 16 and 8 rows), a decode step's (one row, five) at once; int32 sums."""
    monkeypatch.setattr(kernels, "INT8_ROWS_BLOCK", 16)
    layer = _linear()
    q = Int8Linear(layer, True, torch.float32)
    dequant = q.weight.float() * q.scales.float()[:, None]
    x = torch.randn(40, 128)
    x[::3, 5] = 60  # an outlier in every third row: a coarse step for the rest of that row
    step = x.abs().amax(-1, keepdim=True) / 127
    want = (x / step).round() * step @ dequant.T + layer.bias
    _close(q(x), want, torch.float32)
    unrounded = x @ dequant.T + layer.bias
    assert (q(x) - unrounded).abs().max() > 3 * float(want.abs().max()) * 2**-7, "the rows are int8"
    _close(q(x[:5]), want[:5], torch.float32)
    _close(q(x[:1]), want[:1], torch.float32)


def _int4_weight(q: Int4Linear) -> torch.Tensor:
    """The (out, in) weight the int4 kernel multiplies by: its float32 product with the identity,
    (q - 8) * scale + zero in float32."""
    eye = torch.eye(q.in_features)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.weight, q.group_size,
                                                      q.scales_and_zeros.float()).T


@ROWS
@pytest.mark.parametrize("group_size", [32, 64])
@torch.no_grad()
def test_int4_linear_is_its_dequantised_weight(rows, group_size, cpu_kind):
    """Both routes against x @ W.T, W the kernel's own weight: the int4 kernel for a few rows, and for a
    prompt's the weight unpacked from the kernel's layout (96 outputs: on AVX-512 one block of 64 rows
    and 32 rows in pairs) into a scratch every layer reuses, and the dense GEMM."""
    layer, x = _linear(), torch.randn(rows, 128)
    q = Int4Linear(layer, group_size, torch.float32)
    weight = _int4_weight(q)
    dtype = torch.bfloat16 if rows < kernels.PROMPT_ROWS else kernels.compute_dtype(torch.float32, x.device)
    want = x.to(dtype).float() @ weight.T + layer.bias
    _close(q(x), want, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    other = Int4Linear(_linear(n_out=64, seed=1), group_size, torch.float32)  # fills the scratch in between
    _close(other(x), x.to(dtype).float() @ _int4_weight(other).T + other.bias,
           torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    _close(q(x), want, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    w = layer.weight.detach().reshape(96, -1, group_size)
    step = (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15  # per group: 16 levels
    # half a step, plus bfloat16's rounding of the scale and offset (relative 2^-8 of |w|)
    assert ((weight.reshape(w.shape) - w).abs() <= step / 2 + w.abs().amax(-1, keepdim=True) / 64).all()
    assert not ((weight.reshape(w.shape) - w).abs() <= step / 8).all(), "it is 4-bit, not exact"


AVX2_UNPACK = """
import torch
from palikit import kernels
torch.manual_seed(0)
values = torch.randint(0, 16, (112, 128))
with torch.inference_mode():
    back = kernels.int4_values(kernels.int4_pack(values), 112, 128)
print(torch.backends.cpu.get_cpu_capability(), kernels.int4_block_rows(), bool((back.long() == values).all()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["avx2", "avx512"])
def test_int4_weight_unpacks_from_the_kernel_layout(capability):
    """The int4 kernel packs blocks of 64 rows with AVX-512 and 32 with AVX2 (112 outputs: blocks and
    16 rows in pairs); ATEN_CPU_CAPABILITY makes an AVX-512 CPU run the AVX2 kernel. On an AVX2-only
    machine the avx512 case cannot run and is skipped."""
    if capability == "avx512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", AVX2_UNPACK], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [capability.upper(), "32" if capability == "avx2" else "64", "True"]


@torch.no_grad()
def test_int8_embedding_looks_up_and_projects_the_same_table(monkeypatch):
    """Many rows too, without dequantising a table over SCRATCH_MAX_ENTRIES into the scratch
    (a 257k-row LM head would keep 1.2 GB of it)."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 64)
    q = Int8Embedding(emb, False, torch.float32)
    table = q.weight.float() * q.scales.float()[:, None]
    ids = torch.tensor([[3, 7, 49]])
    assert q(ids).dtype == torch.float32
    _close(q(ids), table[ids], torch.bfloat16)
    hidden = torch.randn(2, 3, 64)
    _close(q.project(hidden), hidden.bfloat16().float() @ table.T, torch.bfloat16)
    monkeypatch.setattr(kernels, "SCRATCH_MAX_ENTRIES", table.numel() - 1)
    monkeypatch.setattr(kernels._scratch, "buffer", None, raising=False)
    many = torch.randn(kernels.PROMPT_ROWS, 64)
    _close(q.project(many), many.bfloat16().float() @ table.T, torch.bfloat16)
    assert kernels._scratch.buffer is None


@pytest.mark.slow
@pytest.mark.parametrize("scheme, bound", [("int8", 0.5), ("int4", 2.0), ("w8a8", 1.5)])
def test_bundled_model_stays_close_to_float32(held_out, scheme, bound):
    """Max |delta log-prob| of each teacher-forced suffix (summed over its tokens) against float32: a
    quality bound of each scheme (int8 rounds each weight within 1/254 of its row's largest, int4
    within 1/30 of its group's range, w8a8 the activations too), 2x to 20x above what these 58
    suffixes measured (0.026, 0.82, 0.74); greedy answers agree on at least 90 % (measured: all)."""
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
    with pytest.raises(QuantizeError, match="older palikit"):  # int4 folders once held one CPU's layout
        lay_out(PaliGemma(PRESETS["tiny-paligemma2"]), {"scheme": "int4", "packed_for": "AVX512"}, torch.float32)


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



PORTABLE = """
import json, sys, torch, palikit
from palikit.synthetic import iter_examples
rows = [(image, ex) for image, ex, _ in iter_examples(4, seed=999, size=96)]
images, prefixes, suffixes = [r[0] for r in rows], [r[1]["prefix"] for r in rows], [r[1]["suffix"] for r in rows]
loaded = palikit.load(sys.argv[1], dtype="float32").score(images, prefixes, suffixes)
at_load = palikit.load("default", dtype="float32", quantize=sys.argv[2]).score(images, prefixes, suffixes)
print(json.dumps([torch.backends.cpu.get_cpu_capability(), loaded, at_load]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_a_quantized_folder_loads_on_another_kind_of_cpu(tmp_path, scheme):
    """A folder holds a portable layout (int4: two values per byte), packed for the int4 kernel of the
    CPU that loads it: one written here loads as an AVX2 CPU (ATEN_CPU_CAPABILITY=avx2) and scores
    exactly as quantising there does."""
    out = tmp_path / scheme
    assert main(["quantize", "default", "--to", scheme, "--out", str(out), "--dtype", "float32"]) == 0
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    run = subprocess.run([sys.executable, "-c", PORTABLE, str(out), scheme], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    capability, loaded, at_load = json.loads(run.stdout.strip().splitlines()[-1])
    assert capability == "AVX2" and loaded == at_load


def test_w8a8_is_refused_where_int8_products_saturate(monkeypatch):
    """Without VNNI, oneDNN's int8 GEMM saturates (docs/performance.md): w8a8 is refused there
    whatever PALIKIT_QUANTIZE_ANYWAY says; int8 / int4 weights (float products) are not. The check
    itself compares torch._int_mm with exact integer products."""
    from palikit import kernels

    a = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    exact = torch.equal(torch._int_mm(a, a.T.contiguous()).long(), a.long() @ a.long().T)
    assert kernels.int8_products_exact() == exact or exact  # a small case may not saturate
    monkeypatch.setattr(kernels, "int8_products_exact", lambda: False)
    with pytest.raises(QuantizeError, match="w8a8 is not available on this CPU.*saturate"):
        palikit.load("default", quantize="w8a8")
    assert palikit.load("default", dtype="float32", quantize="int8").options.quantize == "int8"


def test_a_scheme_that_does_not_pay_is_refused(monkeypatch, tmp_path):
    """On a CPU where a scheme decodes slower than bfloat16 (AVX2: measured, docs/performance.md)
    palikit refuses it with one line that says why and how to have it anyway; a folder is still
    written for another machine."""
    from palikit import kernels

    monkeypatch.setattr(kernels, "CAPABILITY", "AVX2")
    monkeypatch.delenv("PALIKIT_QUANTIZE_ANYWAY")
    for scheme in ("int8", "int4", "w8a8"):
        why = f"{scheme} decodes slower than bfloat16 on this CPU .*ANYWAY=1"
        if scheme == "w8a8" and not kernels.int8_products_exact():  # a real AVX2 CPU: not even with ANYWAY
            why = "w8a8 is not available on this CPU"
        with pytest.raises(QuantizeError, match=why):
            palikit.load("default", quantize=scheme)
    assert main(["quantize", "default", "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    monkeypatch.delenv("PALIKIT_QUANTIZE_ANYWAY")  # the verb set it for its own process
    with pytest.raises(QuantizeError, match="int8 decodes slower"):
        palikit.load(tmp_path / "q")
    monkeypatch.setenv("PALIKIT_QUANTIZE_ANYWAY", "1")
    assert palikit.load(tmp_path / "q").generate(Image.new("RGB", (96, 96)), "ocr", max_new_tokens=2) is not None
    monkeypatch.setattr(kernels, "CAPABILITY", "AVX512")
    monkeypatch.delenv("PALIKIT_QUANTIZE_ANYWAY")
    assert palikit.load("default", quantize="int8").options.quantize == "int8"
