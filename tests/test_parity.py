"""Parity with transformers' PaliGemmaForConditionalGeneration on random tiny checkpoints (float32).

transformers builds the bidirectional prefix only when given token_type_ids (0 = prefix), so every
reference call passes them; without them it would silently run the prefix causally.
"""

from __future__ import annotations

import pytest
import torch

import palikit
from palikit import generate as gen
from palikit import kernels
from palikit.processor import collate
from palikit.processor import encode_example, preprocess

from .conftest import synthetic_image

PROMPTS = ["caption en", "answer en what colour is the star? <loc0012>"]
SUFFIXES = ["a red circle", "blue <seg003>"]


def hf_inputs(pipe, prompts, suffixes=None):
    """Left-padded HF inputs for prompts (+ optional suffixes) and the palikit encodings."""
    n = pipe.config.num_image_tokens
    enc = [encode_example(pipe.tokenizer, n, p, s) for p, s in zip(prompts, suffixes or [None] * len(prompts))]
    L = max(len(e.ids) for e in enc)
    ids = torch.zeros(len(enc), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    tti = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, L - len(e.ids):] = torch.tensor(e.ids)
        mask[i, L - len(e.ids):] = 1
        tti[i, L - len(e.ids):] = torch.tensor(e.mask_ar)  # suffix tokens are type 1
    return enc, ids, mask, tti


@pytest.fixture(scope="module")
def loaded(hf_pair):
    config, hf_model, folder = hf_pair
    pipe = palikit.load(folder, dtype="float32", sliding_window=True)
    assert pipe.config.text.sliding_window == config.text.sliding_window
    return pipe, hf_model


def test_logits_match_transformers(loaded):
    pipe, hf = loaded
    images = [synthetic_image(0), synthetic_image(1, size=(25, 50))]
    enc, ids, mask, tti = hf_inputs(pipe, PROMPTS, SUFFIXES)
    pixels = preprocess(images, pipe.config.vision.image_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tti, pixel_values=pixels,
                 position_ids=(mask.cumsum(-1)).clamp(min=1)).logits
    # Window shorter than the sequence, so the sliding layers really differ from the global ones.
    assert pipe.config.text.post_norms is False or ids.shape[1] > pipe.config.text.sliding_window
    batch = collate(enc, 0)  # palikit pads on the right: compare the real tokens of each row
    with torch.no_grad():
        ours = pipe.model.logits(pipe.model(batch["ids"], pixels, batch["input_mask"], batch["mask_ar"]))
    for i, e in enumerate(enc):
        n = len(e.ids)
        diff = (ours[i, :n] - ref[i, -n:]).abs().max().item()
        assert diff <= 1e-4, f"row {i}: max abs logit diff {diff}"
    assert ref.std() > 0.5  # the random weights give non-trivial logits


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_greedy_tokens_match_transformers(loaded, compiled, monkeypatch):
    pipe, hf = loaded
    if compiled:  # the decode step under torch.compile (palikit.load(..., compile=True))
        if reason := kernels.compile_pays(pipe.model.device):
            pytest.skip(reason)
        monkeypatch.setattr(pipe, "decode_step", gen.DecodeStep(pipe.model, compile=True))
    images = [synthetic_image(2), synthetic_image(3)]
    enc, ids, mask, tti = hf_inputs(pipe, PROMPTS)
    pixels = preprocess(images, pipe.config.vision.image_size)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, token_type_ids=tti, pixel_values=pixels,
                          max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=1)
    ours = pipe.generate_details(images, PROMPTS, max_new_tokens=10)
    for i, (_, out) in enumerate(ours):
        ref_tokens = ref[i, ids.shape[1]:].tolist()
        ref_tokens = ref_tokens[: ref_tokens.index(1)] if 1 in ref_tokens else ref_tokens
        assert out.tokens == ref_tokens


def test_score_matches_transformers_loglikelihood(loaded):
    pipe, hf = loaded
    images = [synthetic_image(4), synthetic_image(5)]
    enc, ids, mask, tti = hf_inputs(pipe, PROMPTS, SUFFIXES)
    pixels = preprocess(images, pipe.config.vision.image_size)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask, token_type_ids=tti, pixel_values=pixels,
                    position_ids=mask.cumsum(-1).clamp(min=1)).logits
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    expected = (logprobs * tti[:, 1:]).sum(-1)  # targets: suffix tokens and <eos>
    ours = pipe.score(images, PROMPTS, SUFFIXES)
    torch.testing.assert_close(torch.tensor(ours), expected, atol=1e-4, rtol=0)


def test_vision_features_match(loaded):
    pipe, hf = loaded
    pixels = preprocess([synthetic_image(6)], pipe.config.vision.image_size)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=pixels)
        ref = getattr(ref, "pooler_output", ref)
        ours = pipe.model.embed_images(pixels)
    # transformers 5 scales text inside its embedding layer, so image tokens are unscaled in both.
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["bundled", "saved", "fine-tuned"])
def test_transformers_processor_batches_and_collates_palikit_folders(tmp_path, source):
    """Every folder palikit writes (and the bundled one) works with transformers' AutoProcessor
    unchanged: image tokens known, a pad token, left padding, so batched generation answers each
    prompt as palikit does, and the `suffix=` training collate gives labels whose loss is palikit's
    score. A fine-tune from a folder that has transformers' tokenizer files keeps them."""
    import json
    import shutil

    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    from palikit.weights import BUNDLED

    default = palikit.load("default", dtype="float32")
    folder = BUNDLED if source == "bundled" else tmp_path / "model"
    if source != "bundled":
        default.save(folder)
    if source == "fine-tuned":  # a folder with transformers' own tokenizer files, written again
        (folder / "tokenizer_config.json").write_text(json.dumps(
            json.loads((folder / "tokenizer_config.json").read_text()) | {"marker": "kept"}))
        (folder / "chat_template.jinja").write_text("{{ messages }}")
        again = tmp_path / "again"
        palikit.load(folder, dtype="float32").save(again)
        assert json.loads((again / "tokenizer_config.json").read_text())["marker"] == "kept"
        assert (again / "chat_template.jinja").exists()
        shutil.rmtree(folder)
        folder = again
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.image_seq_length == default.config.num_image_tokens
    assert processor.tokenizer.pad_token is not None
    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    images = [synthetic_image(0), synthetic_image(1)]
    prompts = ["caption en", "answer en what colour is the star?"]
    inputs = processor(text=prompts, images=images, padding="longest", return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [t.strip() for t in texts] == default.generate(images, prompts, max_new_tokens=6)
    suffixes = ["a red circle", "blue"]
    batch = processor(text=prompts, images=images, suffix=suffixes, padding="longest", return_tensors="pt")
    with torch.no_grad():
        loss = hf(**batch).loss
    scores = default.score(images, prompts, suffixes)
    n_targets = int((batch["labels"] != -100).sum())
    assert n_targets == sum(len(default.tokenizer.encode(s)) + 1 for s in suffixes)
    torch.testing.assert_close(loss, torch.tensor(-sum(scores) / n_targets), atol=1e-4, rtol=0)
