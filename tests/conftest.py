"""Fixtures made at test time: a SentencePiece tokenizer trained on the fly, random-init tiny
checkpoints written by transformers' save_pretrained and by palikit, synthetic images. No network."""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # a test must never reach for the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The quantised paths are tested on every CPU kind, also where palikit refuses them for their speed
# (tests/test_quantize.py::test_a_scheme_that_does_not_pay_is_refused checks that refusal).
os.environ["PALIKIT_QUANTIZE_ANYWAY"] = "1"

from palikit.config import PaliGemmaConfig  # noqa: E402
from palikit.processor import train_tokenizer  # noqa: E402

CORPUS = [
    "caption en", "answer en what colour is the star?", "answer en how many circles?", "detect circle ; square",
    "segment triangle", "ocr", "a red circle above a blue square", "the cow is standing on the beach",
    "describe fr", "un chat noir est assis sur la table", "café, crème brûlée, naïve façade", "über straße",
    "日本語のテキスト", "question en what is this?", "where is the cat?", "1234 5678 90",
    "Hello this is a test", "a green star and a yellow triangle", "there are three dogs",
] * 20


def pytest_collection_modifyitems(config, items):
    """w8a8's tests skip where its int8 products are not exact (a CPU without VNNI: palikit refuses
    w8a8 there, tests/test_quantize.py::test_w8a8_is_refused_where_int8_products_saturate)."""
    from palikit import kernels

    if kernels.int8_products_exact():
        return
    skip = pytest.mark.skip(reason="int8 products saturate on this CPU: w8a8 is refused here")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "w8a8" in item.name.split("[")[0] or "w8a8" in params.values():
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tiny models' tensors are too small for intra-op threads: on a busy 2-core machine the
    OpenMP barriers spin against other processes and make the tests 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_eos(pipe, monkeypatch):
    """Never let the model pick <eos>, so every row runs for max_new_tokens (`pipe`: the test module's)."""
    original = pipe.model.logits
    eos = pipe.tokenizer.eos_id

    def logits(hidden, *where):
        out = original(hidden, *where)
        out[..., eos] = float("-inf")
        return out

    monkeypatch.setattr(pipe.model, "logits", logits)
    return pipe


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    path = train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)
    from palikit.processor import Tokenizer

    tok = Tokenizer(path)
    assert tok.image_token_id == 1552, "tiny presets assume a 400-piece base vocabulary"
    return path


def randomize(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Larger-than-default random weights so attention and logits are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def hf_config(config: PaliGemmaConfig):
    from transformers import PaliGemmaConfig as HFConfig

    d = config.to_hf_config()
    hf = HFConfig(text_config=d["text_config"], vision_config=d["vision_config"],
                  image_token_index=config.image_token_id, projection_dim=config.text.hidden_size,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if config.text.post_norms:  # palikit's None = "no window"; give HF an explicit one or none at all
        hf.text_config.sliding_window = config.text.sliding_window or 10_000
    return hf


def sharpen(model: torch.nn.Module, scores: float = 3.0, logits: float = 2.0) -> None:
    """Scale the decoder's q and k by `scores` (attention scores x9: up to about 25 instead of 3) and
    the tied embedding by `logits` (logits up to about 10) of a transformers PaliGemma, so that
    Gemma 2's soft-caps (50 on scores, 30 on logits) each move logits by 0.3 or more, thousands of
    times the tests' tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"language_model\.layers\.\d+\.self_attn\.[qk]_proj\.weight$", name):
                p.mul_(scores)
        model.get_input_embeddings().weight.mul_(logits)


def make_hf_checkpoint(folder, config: PaliGemmaConfig, tokenizer_file, seed=0):
    """Random-init transformers model saved with save_pretrained (+ our tokenizer.model)."""
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(hf_config(config)).eval()
    randomize(model, seed)
    sharpen(model)
    model.save_pretrained(folder)
    shutil.copy(tokenizer_file, folder / "tokenizer.model")
    return model


@pytest.fixture(scope="session")
def tiny_configs():
    return {
        1: PaliGemmaConfig.from_name("tiny-paligemma"),
        2: PaliGemmaConfig.from_name("tiny-paligemma2", text={"sliding_window": 6}),
    }


@pytest.fixture(scope="session", params=[1, 2], ids=["pg1", "pg2"])
def hf_pair(request, tmp_path_factory, tokenizer_file, tiny_configs):
    """(palikit config, transformers model, checkpoint folder) for PaliGemma 1 and 2."""
    config = tiny_configs[request.param]
    folder = tmp_path_factory.mktemp(f"hf_pg{request.param}")
    model = make_hf_checkpoint(folder, config, tokenizer_file, seed=request.param)
    model.config._attn_implementation = "eager"  # SDPA drops Gemma 2's attention soft-cap
    model.config.text_config._attn_implementation = "eager"
    return config, model, folder


def box_pixels(box, height: int, width: int) -> np.ndarray:
    """The pixels of a box as a pasted mask fills them: corners truncated, as big_vision's evaluator."""
    x1, y1, x2, y2 = (int(v) for v in box)
    out = np.zeros((height, width), bool)
    out[y1:y2, x1:x2] = True
    return out


def kill_when_it_says(argv: list[str], says: str, timeout: float = 120, **popen) -> None:
    """Start `python *argv`, wait until it prints the line `says` (where a hook in it pauses), and
    kill -9 it right there. Fails if it exits or stays silent for `timeout` seconds instead."""
    proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, **popen)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready and proc.stdout.readline() == says + "\n", f"the child never said {says!r}"
    finally:
        proc.kill()
        proc.wait()


def hf_greedy(hf_model, ids: torch.Tensor, pixels: torch.Tensor, max_new_tokens: int):
    """transformers' greedy continuation of one all-prefix row: (tokens before <eos>, the raw logits
    (1, V) of each step)."""
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                token_type_ids=torch.zeros_like(ids), pixel_values=pixels,
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                                eos_token_id=1, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return (tokens[: tokens.index(1)] if 1 in tokens else tokens), out.logits


def synthetic_image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_file):
    """A palikit-written random tiny PaliGemma 2 folder with tokenizer and a random mask codec whose
    masks are not empty."""
    from palikit.api import Pipeline
    from palikit.maskcodec import MASK_CODEC_PRESETS, MaskCodec
    from palikit.paligemma import PaliGemma
    from palikit.processor import Tokenizer

    folder = tmp_path_factory.mktemp("tiny_palikit")
    torch.manual_seed(0)
    model = PaliGemma(PaliGemmaConfig.from_name("tiny-paligemma2")).eval()
    randomize(model, 7)
    Pipeline(model, Tokenizer(tokenizer_file, image_token_id=1552)).save(folder)
    torch.manual_seed(0)
    codec = MaskCodec(MASK_CODEC_PRESETS["tiny"])
    with torch.no_grad():  # random weights decode to about -0.2 everywhere: every mask would be empty
        codec.decoder[-1].bias += 1.0  # a positive logit everywhere: each mask fills its box
    codec.save_npz(folder / "mask_codec.npz")
    return folder
