"""The CUDA paths, on a GPU (`pytest -m gpu`; benchmarks/gpu_check.sh runs them in one device call):
FlexAttention forward and backward against eager, the compiled decode step with CUDA graphs against
eager, the engine with CUDA graphs under random arrivals against each request alone, and QLoRA.
They skip without CUDA. PALIKIT_GPU_TESTS_ON=cpu runs what of them a CPU can (FlexAttention's
forward, compile without graphs, the engine), so that the tests themselves are checked before any
GPU time is spent."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import palikit
from palikit.engine import Engine
from palikit.synthetic import make_scene

from .test_engine import CASES, assert_same, run_with_arrivals
from .test_flex_attention import forward, gradients

DEVICE = os.environ.get("PALIKIT_GPU_TESTS_ON", "cuda")
ON_GPU = DEVICE == "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                                  reason="no CUDA device (benchmarks/gpu_check.sh runs these)")]
gpu_only = pytest.mark.skipif(not ON_GPU, reason="CUDA only")


@pytest.fixture(scope="module")
def pipe():
    """The bundled model in float32 on the device, eager attention."""
    return palikit.load("default", dtype="float32", device=DEVICE, attention="eager")


def test_flex_attention_equals_eager(pipe):
    """The teacher-forced hidden states through FlexAttention (prefix-LM mask, soft-cap) equal eager's,
    and on a GPU the gradients too (fine-tuning through it)."""
    with torch.no_grad():
        eager, real, _ = forward(pipe, "eager")
        flex, _, _ = forward(pipe, "flex")
    torch.testing.assert_close(flex[real], eager[real], atol=1e-4, rtol=1e-4)
    if ON_GPU:
        want, got = gradients(pipe, "eager"), gradients(pipe, "flex")
        assert want and want.keys() == got.keys()
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, atol=1e-4, rtol=1e-3, msg=name)


def compiled(pipe, cuda_graphs: bool):
    options = dataclasses.replace(pipe.options, compile=True, cuda_graphs=cuda_graphs and ON_GPU)
    return palikit.api.Pipeline(pipe.model, pipe.tokenizer, pipe.codec_path, options)


def test_compiled_decode_with_cuda_graphs_equals_eager(pipe):
    """Greedy tokens and log-probs of the compiled step (CUDA graphs on a GPU), one row and a batch
    of three, equal eager's."""
    images = [make_scene(np.random.default_rng(s)).image for s in range(3)]
    prompts = ["caption en", "detect circle ; square", "answer en how many circles?"]
    want = pipe.generate_details(images, prompts, max_new_tokens=12)
    fast = compiled(pipe, cuda_graphs=True)
    for _ in range(2):  # the second run replays what the first recorded
        got = fast.generate_details(images, prompts, max_new_tokens=12)
        for (_, g), (_, w) in zip(got, want):
            assert_same(g, w)
    (_, one), = fast.generate_details([images[0]], [prompts[0]], max_new_tokens=12)
    assert_same(one, want[0][1])


@pytest.mark.parametrize("seed", [0, 1])
def test_engine_with_cuda_graphs_equals_alone(pipe, seed):
    """Requests arriving at random steps through three rows (the row count changes every few steps),
    the compiled step with CUDA graphs: each gets the tokens of running it alone."""
    fast = compiled(pipe, cuda_graphs=True)
    want = [pipe.generate_details([ims], [p], max_new_tokens=n)[0][1] for ims, p, n in CASES]
    got = run_with_arrivals(Engine(fast, max_rows=3), CASES, seed)
    for r, w in zip(got, want):
        assert r.error is None
        assert r.tokens[:len(w.tokens)] == w.tokens


@gpu_only
def test_qlora_trains_4bit_and_merges(tmp_path):
    """QLoRA on the bundled model: the language model's linear layers really 4-bit, the loss falls,
    the adapters merge into a model that loads, and training holds less memory than bf16 LoRA."""
    pytest.importorskip("bitsandbytes")
    from palikit.finetune import merge, train
    from palikit.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "data", 8, seed=3, size=96)
    peaks = {}
    for name, extra in [("qlora", {"quantize": {}}), ("lora", {"dtype": "bfloat16"})]:
        torch.cuda.reset_peak_memory_stats()
        out = tmp_path / name
        result = train({"model": "default", "train_file": str(data), "out_dir": str(out), "steps": 12,
                        "batch_size": 8, "lr": 3e-3, "warmup": 0, "device": "cuda",
                        "lora": {"r": 8, "alpha": 16, "targets": "llm"}, **extra})
        peaks[name] = torch.cuda.max_memory_allocated()
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in logged if "loss" in r]
        assert losses[-1] < losses[0], (name, losses)
        assert result["step"] == 12
    assert peaks["qlora"] < peaks["lora"]
    merged = merge("default", tmp_path / "qlora" / "final", tmp_path / "merged")
    assert palikit.load(merged, dtype="float32").caption(make_scene(np.random.default_rng(0)).image)
