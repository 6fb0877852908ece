"""FlexAttention (palikit.load(attention="flex")) against the eager path, float32, on tiny random
PaliGemma 1 and 2 models: teacher-forced hidden states of a padded batch (prefix-LM blocks, Gemma
2's sliding window of 6 shorter than the sequences), generation (the prefill runs through it, also
in the engine's layer-by-layer prefill), and gradients. The PaliGemma 2 fixture's attention scores
reach far past the soft-cap of 50, so a kernel that dropped or misplaced the cap would differ."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from palikit import generate as gen
from palikit import kernels
from palikit.api import Pipeline
from palikit.config import PaliGemmaConfig
from palikit.engine import Engine
from palikit.paligemma import PaliGemma
from palikit.processor import Tokenizer, collate, encode_example, preprocess

from .conftest import randomize, synthetic_image

pytestmark = pytest.mark.slow  # FlexAttention compiles

IMAGES = [synthetic_image(30), synthetic_image(31, size=(50, 20)), synthetic_image(32)]
PROMPTS = ["caption en", "answer en what colour is the big star on the left?", "detect circle ; square"]
SUFFIXES = ["a red circle", "blue", "<loc0001><loc0002><loc0100><loc0200> circle"]


@pytest.fixture(scope="module", params=["tiny-paligemma", "tiny-paligemma2"], ids=["pg1", "pg2"])
def pipe(request, tokenizer_file):
    config = PaliGemmaConfig.from_name(request.param)
    if config.text.post_norms:
        config.text.sliding_window = 6
    torch.manual_seed(0)
    model = PaliGemma(config).eval()
    randomize(model, 7)
    with torch.no_grad():  # scores of up to ~200: the soft-cap of 50 bends them hard
        for layer in model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return Pipeline(model, Tokenizer(tokenizer_file, image_token_id=config.image_token_id))


def with_kernel(pipe, kernel: str, config: PaliGemmaConfig | None = None) -> Pipeline:
    """The pipeline's weights in a model built with another attention kernel (or config)."""
    model = PaliGemma(config or pipe.config, attention=kernel).eval().to(pipe.model.device)
    model.load_state_dict(pipe.model.state_dict())
    return Pipeline(model, pipe.tokenizer)


def forward(pipe, kernel: str, config: PaliGemmaConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced hidden states (B, L, D) of the three examples, right-padded, and input_mask."""
    model = with_kernel(pipe, kernel, config).model
    enc = [encode_example(pipe.tokenizer, pipe.config.num_image_tokens, p, s) for p, s in zip(PROMPTS, SUFFIXES)]
    batch = collate(enc, pipe.tokenizer.pad_id)
    hidden = model(batch["ids"], preprocess(IMAGES, pipe.config.vision.image_size).to(model.device),
                   batch["input_mask"].to(model.device), batch["mask_ar"].to(model.device))
    return hidden, batch["input_mask"].bool().to(model.device), model


FLEX_RUNS = pytest.mark.skipif(kernels.flex_attention_runs(torch.device("cpu")) is not None,
                               reason="FlexAttention's compiled code fails on this CPU kind (palikit uses eager)")


@FLEX_RUNS
def test_teacher_forced_equals_eager(pipe):
    with torch.no_grad():
        eager, real, _ = forward(pipe, "eager")
        flex, _, _ = forward(pipe, "flex")
    torch.testing.assert_close(flex[real], eager[real], atol=1e-4, rtol=1e-4)
    text = pipe.config.text
    if text.attn_logit_softcap:  # the fixture is strong enough for the cap to matter
        uncapped_config = dataclasses.replace(pipe.config, text=dataclasses.replace(text, attn_logit_softcap=None))
        with torch.no_grad():
            uncapped, _, _ = forward(pipe, "eager", uncapped_config)
        assert (uncapped[real] - eager[real]).abs().max() > 0.1


def gradients(pipe, kernel: str) -> dict:
    hidden, real, model = forward(pipe, kernel)
    hidden[real].pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.language_model.named_parameters()
            if p.grad is not None and "self_attn" in n}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on a CPU (torch 2.13)")
def test_gradients_equal_eager_on_a_gpu(pipe):
    """Fine-tuning through FlexAttention: the gradients of a loss on the real tokens."""
    pipe.model.cuda()
    try:
        eager, flex = gradients(pipe, "eager"), gradients(pipe, "flex")
    finally:
        pipe.model.cpu()
    assert eager and eager.keys() == flex.keys()
    for name, g in eager.items():
        torch.testing.assert_close(flex[name], g, atol=1e-4, rtol=1e-3, msg=name)


def test_training_on_a_cpu_runs_eager(pipe):
    """With gradients on a CPU, where FlexAttention has no backward, "flex" trains as eager does."""
    eager, flex = gradients(pipe, "eager"), gradients(pipe, "flex")
    assert eager and all(torch.equal(flex[n], g) for n, g in eager.items())


@FLEX_RUNS
def test_generation_equals_eager(pipe, no_eos):
    """Greedy tokens and log-probs, the prefill through FlexAttention, alone and in a batch, and in
    the engine, whose prefill runs a layer per step."""
    images = [IMAGES[0], [IMAGES[1], IMAGES[2]], IMAGES[2]]
    want = pipe.generate_details(images, PROMPTS, max_new_tokens=6)
    flex = with_kernel(pipe, "flex")
    flex.model.logits = pipe.model.logits  # no_eos's head
    got = flex.generate_details(images, PROMPTS, max_new_tokens=6)
    engine = Engine(flex, max_rows=2, prefill_tokens=1)
    requests = [engine.submit(ims if isinstance(ims, list) else [ims], p, gen.SamplingConfig(max_new_tokens=6))
                for ims, p in zip(images, PROMPTS)]
    engine.run_until_idle()
    for (_, g), (_, w), r in zip(got, want, requests):
        assert g.tokens == w.tokens == r.result().tokens
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(r.result().logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=0)


def test_load_and_cli_choose_the_kernel(tiny_model_dir, monkeypatch):
    """attention= reaches the model ("auto" is eager, on a GPU too); --attention reaches palikit.load;
    an unknown kernel is one clear error."""
    import palikit
    from palikit import cli

    assert palikit.load(tiny_model_dir, dtype="float32").model.language_model.attention == "eager"
    pipe = palikit.load(tiny_model_dir, dtype="float32", attention="flex")
    runs = kernels.flex_attention_runs(torch.device("cpu")) is None  # else eager, with a warning
    assert pipe.model.language_model.attention == ("flex" if runs else "eager")
    with pytest.raises(palikit.InputError, match="attention must be one of"):
        palikit.load(tiny_model_dir, attention="sdpa")
    seen = []
    monkeypatch.setattr(palikit, "load", lambda source, options: seen.append(options.attention) or pipe)
    cli.main(["generate", "--model", str(tiny_model_dir), "--image", "x.png", "--prompt", "caption en",
              "--attention", "flex"])
    assert seen == ["flex"]
