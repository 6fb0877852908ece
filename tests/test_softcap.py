"""PaliGemma 2's final logit soft-cap (30), placed as each reference places it, against an independent
formula on a tiny PaliGemma 2 whose logits are large enough (final norm scale 4, logits ~15) for the
cap to move a log-likelihood by more than 1e-2:

- "config" (transformers, the default for HF folders): every logit capped;
- "big_vision" (the default for .npz): teacher-forced logits (scores, the loss) and the prefill's
  uncapped, decode steps capped, as big_vision's compute_logits vs its cached decode steps;
- "off": never capped;

and fine-tuning: uncapped by default, as big_vision trains, with the saved config.json saying so.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import palikit
from palikit.api import Pipeline
from palikit.config import PaliGemmaConfig
from palikit.finetune import Trainer, load_config, loss_fn
from palikit.paligemma import PaliGemma
from palikit.processor import Tokenizer, collate, encode_example, preprocess
from palikit.synthetic import generate_dataset

from .conftest import randomize, synthetic_image
from .test_generate import teacher_forced

CAP = 30.0
IMAGES = [synthetic_image(1)]
PROMPT, SUFFIX = "caption en", "a red circle"


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tokenizer_file):
    """A tiny PaliGemma 2 (cap 30) with final-norm scale 4: logits of ~15, where tanh bends."""
    folder = tmp_path_factory.mktemp("sharp_pg2")
    torch.manual_seed(0)
    config = PaliGemmaConfig.from_name("tiny-paligemma2")
    assert config.text.final_logit_softcap == CAP
    model = PaliGemma(config).eval()
    randomize(model, 11)
    with torch.no_grad():
        model.language_model.norm.weight.fill_(3.0)  # (1 + w) = 4
    Pipeline(model, Tokenizer(tokenizer_file, image_token_id=config.image_token_id)).save(folder)
    return folder


def raw_logits(pipe, hidden: torch.Tensor) -> torch.Tensor:
    """The final RMSNorm, then @ embedding^T, in float32: the uncapped head, computed here, not by palikit."""
    lm = pipe.model.language_model
    with torch.no_grad():
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + lm.config.rms_norm_eps) * (1 + lm.norm.weight.float())
        return h @ lm.embed_tokens.weight.float().T


def capped(logits: torch.Tensor) -> torch.Tensor:
    return CAP * torch.tanh(logits / CAP)


def suffix_loglik(pipe, cap: bool) -> float:
    enc = encode_example(pipe.tokenizer, pipe.config.num_image_tokens, PROMPT, SUFFIX)
    batch = collate([enc], pipe.tokenizer.pad_id)
    with torch.no_grad():
        hidden = pipe.model(batch["ids"], preprocess(IMAGES, pipe.config.vision.image_size),
                            batch["input_mask"], batch["mask_ar"])[0]
    logits = raw_logits(pipe, hidden[:-1])
    logp = (capped(logits) if cap else logits).log_softmax(-1)
    picked = logp.gather(-1, batch["ids"][0, 1:, None])[:, 0]
    return float(picked[torch.tensor(enc.loss_mask[1:], dtype=torch.bool)].sum())


@pytest.mark.parametrize("mode, score_capped, prefill_capped, decode_capped", [
    ("config", True, True, True),
    ("big_vision", False, False, True),
    ("off", False, False, False),
])
def test_each_mode_against_the_formula(sharp_model_dir, mode, score_capped, prefill_capped, decode_capped):
    pipe = palikit.load(sharp_model_dir, dtype="float32", logit_softcap=mode)
    assert pipe.options.logit_softcap == mode
    hidden = teacher_forced(pipe, IMAGES, PROMPT, [])[1]
    assert raw_logits(pipe, hidden).abs().max() > 10  # large enough for the cap to matter
    assert abs(suffix_loglik(pipe, True) - suffix_loglik(pipe, False)) > 1e-2

    (score,) = pipe.score(IMAGES, [PROMPT], [SUFFIX])
    assert score == pytest.approx(suffix_loglik(pipe, score_capped), abs=1e-4)

    (_, g), = pipe.generate_details([IMAGES[0]], [PROMPT], max_new_tokens=5, do_sample=False)
    assert len(g.tokens) >= 2
    ids, hidden = teacher_forced(pipe, IMAGES, PROMPT, g.tokens)
    n = len(g.tokens)
    logits = raw_logits(pipe, hidden[-n - 1:-1])  # the positions that predicted each generated token
    for i, (token, logprob) in enumerate(zip(g.tokens, g.logprobs)):
        cap = prefill_capped if i == 0 else decode_capped
        want = (capped(logits[i]) if cap else logits[i]).log_softmax(-1)[token]
        assert logprob == pytest.approx(float(want), abs=2e-4), (mode, i)


def test_defaults_follow_the_source(sharp_model_dir, tokenizer_file, tmp_path):
    """An HF folder loads as transformers runs it; a big_vision .npz as big_vision runs it."""
    from transformers import PaliGemmaForConditionalGeneration

    from .test_weights import to_big_vision

    assert palikit.load(sharp_model_dir, dtype="float32").options.logit_softcap == "config"
    hf = PaliGemmaForConditionalGeneration.from_pretrained(sharp_model_dir)
    config = palikit.load(sharp_model_dir, dtype="float32").config
    np.savez(tmp_path / "sharp.npz", **to_big_vision(hf.state_dict(), config, config.image_token_id))
    npz = palikit.load(tmp_path / "sharp.npz", tokenizer=tokenizer_file, dtype="float32")
    assert npz.options.logit_softcap == "big_vision"
    with pytest.raises(palikit.InputError, match="logit_softcap must be one of"):
        palikit.load(sharp_model_dir, logit_softcap="sometimes")


def test_the_loss_with_and_without_the_cap(sharp_model_dir):
    """loss_fn through the model's head: per-example mean NLL of the suffix and <eos>, capped in
    "config" mode, uncapped in "off", each equal to the formula on a fixed batch."""
    losses = {}
    for mode in ("config", "off"):
        pipe = palikit.load(sharp_model_dir, dtype="float32", logit_softcap=mode)
        encs = [encode_example(pipe.tokenizer, pipe.config.num_image_tokens, PROMPT, s) for s in (SUFFIX, "two")]
        batch = collate(encs, pipe.tokenizer.pad_id)
        pixels = preprocess(IMAGES * 2, pipe.config.vision.image_size)
        with torch.no_grad():
            hidden = pipe.model(batch["ids"], pixels, batch["input_mask"], batch["mask_ar"])
            got = loss_fn(hidden, batch, head=pipe.model.logits, reduction="none")
        want = []
        for row, enc in enumerate(encs):
            logits = raw_logits(pipe, hidden[row, : len(enc.ids) - 1])
            logp = (capped(logits) if mode == "config" else logits).log_softmax(-1)
            nll = -logp.gather(-1, batch["ids"][row, 1 : len(enc.ids), None])[:, 0]
            want.append(float(nll[torch.tensor(enc.loss_mask[1:], dtype=torch.bool)].mean()))
        assert got.tolist() == pytest.approx(want, abs=1e-4), mode
        losses[mode] = got
    assert (losses["config"] - losses["off"]).abs().max() > 1e-2


@pytest.mark.parametrize("setting, saved_cap", [("off", None), ("keep", CAP)])
def test_a_fine_tune_saves_what_it_trained_with(sharp_model_dir, tmp_path, setting, saved_cap):
    """Trained uncapped (the default, as big_vision trains), the saved config.json says
    final_logit_softcapping: null, and transformers then computes the same logits as palikit; with
    `keep`, the cap stays. Catches a fine-tune whose saved model runs with a cap it never trained with."""
    from transformers import PaliGemmaForConditionalGeneration

    train_file = generate_dataset(tmp_path / "data", 2, seed=0, size=64)
    cfg = {"model": str(sharp_model_dir), "train_file": str(train_file), "out_dir": str(tmp_path / "run"),
           "steps": 2, "batch_size": 2, "lr": 1e-3, "warmup": 0, "max_text_len": 64, "seed": 0,
           "final_logit_softcap": setting}
    trainer = Trainer(load_config(cfg))
    try:
        assert ("teacher" in trainer.core.capped) == (setting == "keep")  # what the loss used
        trainer.train()
    finally:
        trainer.cleanup()
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "config.json").read_text())["text_config"]["final_logit_softcapping"]
    assert saved == saved_cap
    ours = palikit.load(final, dtype="float32")
    assert ours.config.text.final_logit_softcap == saved_cap
    enc = encode_example(ours.tokenizer, ours.config.num_image_tokens, PROMPT, SUFFIX)
    ids = torch.tensor([enc.ids])
    pixels = preprocess(IMAGES, ours.config.vision.image_size)
    hf = PaliGemmaForConditionalGeneration.from_pretrained(final, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels, token_type_ids=torch.tensor([enc.mask_ar])).logits[0]
        mine = ours.model.logits(ours.model(ids, pixels, torch.ones_like(ids), torch.tensor([enc.mask_ar]))[0])
    assert (theirs[:, : mine.shape[-1]] - mine).abs().max() < 1e-3
    assert (capped(mine) - mine).abs().max() > 0.05  # large enough that a cap on one side would show


def test_cli_logit_softcap_flag(sharp_model_dir, tmp_path, capsys):
    from palikit.cli import main

    synthetic_image(1).save(tmp_path / "img.png")
    for mode in ("config", "big_vision", "off"):
        assert main(["generate", "--model", str(sharp_model_dir), "--dtype", "float32", "--image",
                     str(tmp_path / "img.png"), "--prompt", PROMPT, "--max-new-tokens", "4", "--json",
                     "--logit-softcap", mode]) == 0
        printed = json.loads(capsys.readouterr().out)
        pipe = palikit.load(sharp_model_dir, dtype="float32", logit_softcap=mode)
        (_, g), = pipe.generate_details(str(tmp_path / "img.png"), PROMPT, max_new_tokens=4)
        assert printed["logprob"] == pytest.approx(sum(g.logprobs)) and math.isfinite(printed["logprob"])
    assert main(["generate", "--model", str(sharp_model_dir), "--image", "x", "--prompt", PROMPT,
                 "--logit-softcap", "half"]) == 2
