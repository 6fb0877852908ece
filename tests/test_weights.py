"""Checkpoints in and out: HF key layouts, shards, round trips through palikit and transformers,
bfloat16, big_vision npz (f32 and bf16), clear errors for broken checkpoints, peak memory of a load.

Everything is float32 unless a test says otherwise; the models are the tiny random presets.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import palikit
from palikit.processor import collate
from palikit.processor import encode_example, preprocess
from palikit.weights import save_hf_folder

from .conftest import hf_greedy, make_hf_checkpoint, synthetic_image

PROMPTS = ["caption en", "answer en what colour is the star? <loc0012>"]
SUFFIXES = ["a red circle", "blue <seg003>"]
IMAGES = [synthetic_image(10), synthetic_image(11, size=(25, 50))]



def logits_of(pipe, vocab: int | None = None) -> torch.Tensor:
    """Teacher-forced logits (B, L, V) of two image + prefix + suffix rows (right-padded)."""
    n = pipe.config.num_image_tokens
    enc = [encode_example(pipe.tokenizer, n, p, s) for p, s in zip(PROMPTS, SUFFIXES)]
    batch = collate(enc, pipe.tokenizer.pad_id)
    pixels = preprocess(IMAGES, pipe.config.vision.image_size)
    with torch.no_grad():
        hidden = pipe.model(batch["ids"], pixels, batch["input_mask"], batch["mask_ar"])
        out = pipe.model.logits(hidden).float()
    return out[..., :vocab] if vocab else out


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def hf_logits(hf_model, pipe) -> list[torch.Tensor]:
    """transformers float32 logits of the same rows, one row at a time (no padding), prefix via
    token_type_ids; the model runs in its own dtype."""
    n = pipe.config.num_image_tokens
    out = []
    for prompt, suffix, image in zip(PROMPTS, SUFFIXES, IMAGES):
        e = encode_example(pipe.tokenizer, n, prompt, suffix)
        ids = torch.tensor([e.ids])
        pixels = preprocess([image], pipe.config.vision.image_size).to(hf_model.dtype)
        with torch.no_grad():
            out.append(hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                token_type_ids=torch.tensor([e.mask_ar])).logits[0].float())
    return out


def write_state(folder: Path, template: Path, state: dict[str, torch.Tensor]) -> Path:
    """A checkpoint folder: template's config.json + tokenizer.model, `state` as model.safetensors."""
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(template / name, folder / name)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def reference(hf_pair):
    """(palikit config, transformers model, folder, palikit float32 pipeline of that folder, its logits)."""
    config, hf_model, folder = hf_pair
    pipe = palikit.load(folder, dtype="float32")
    return config, hf_model, folder, pipe, logits_of(pipe)


# ---- HF key layouts -------------------------------------------------------------------------

# transformers 5 module names -> each published layout. Applied in order, first match wins.
LAYOUTS = {
    # as released on the hub, transformers < 4.52 (palikit's writer uses it too)
    "legacy": [(r"^model\.vision_tower\.", "vision_tower.vision_model."),
               (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
               (r"^model\.language_model\.", "language_model.model."),
               (r"^lm_head\.", "language_model.lm_head.")],
    # transformers 4.52 - 4.57 module names
    "new-4.5x": [(r"^model\.vision_tower\.", "model.vision_tower.vision_model.")],
    # transformers 5 module names (the model's own state_dict, no vision_model level)
    "new-5": [],
}


def relayout(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for pattern, repl in rules:
            if re.match(pattern, k):
                k = re.sub(pattern, repl, k)
                break
        out[k] = v
    return out


def test_save_pretrained_keys_are_a_known_layout(reference):
    _, hf_model, folder, _, _ = reference
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    # transformers 4.52-4.57 wrote model.* names, transformers 5.x writes language_model.model.* and
    # vision_tower.* (the legacy names minus vision_model): palikit must read whichever it is.
    known = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head.",
             "language_model.model.", "language_model.lm_head.", "vision_tower.", "multi_modal_projector.")
    assert all(k.startswith(known) for k in keys), [k for k in keys if not k.startswith(known)]
    assert any("embed_tokens" in k for k in keys)
    # The model itself uses the new names (what a plain save_file(model.state_dict()) writes).
    assert any(k.startswith("model.language_model.") for k in hf_model.state_dict())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_hf_layout_loads_to_the_same_logits(reference, layout, tmp_path):
    config, hf_model, folder, _, ref = reference
    state = relayout(hf_model.state_dict(), LAYOUTS[layout])
    if layout == "legacy":
        assert "language_model.lm_head.weight" in state
        assert any(k.startswith("vision_tower.vision_model.") for k in state)
        assert any(k.startswith("language_model.model.layers.0.") for k in state)
        if config.version == 1:  # Gemma 1: the legacy name of the pre-MLP norm
            assert "language_model.model.layers.0.post_attention_layernorm.weight" in state
            assert "language_model.model.layers.0.pre_feedforward_layernorm.weight" not in state
    else:
        assert "lm_head.weight" in state and any(k.startswith("model.language_model.") for k in state)
    out = write_state(tmp_path / layout, folder, state)

    pipe = palikit.load(out, dtype="float32")
    assert torch.equal(logits_of(pipe), ref)

    # The rewritten file is a genuine checkpoint: transformers reads it back to the same model.
    from transformers import PaliGemmaForConditionalGeneration

    again = PaliGemmaForConditionalGeneration.from_pretrained(out).eval()
    for k, v in hf_model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


# ---- shards ---------------------------------------------------------------------------------


def test_palikit_sharded_save_loads(reference, tmp_path):
    _, _, folder, pipe, ref = reference
    out = tmp_path / "sharded"
    save_hf_folder(pipe.model, out, max_shard_bytes=64_000)
    shutil.copy(folder / "tokenizer.model", out)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    state = pipe.model.state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    loaded = palikit.load(out, dtype="float32")
    same_state(loaded.model, pipe.model)
    assert torch.equal(logits_of(loaded), ref)

    # Saving again unsharded into the same folder leaves no stale index behind.
    save_hf_folder(pipe.model, out)
    assert not (out / "model.safetensors.index.json").exists()
    for shard in shards:
        (out / shard).unlink()
    assert torch.equal(logits_of(palikit.load(out, dtype="float32")), ref)


def test_transformers_sharded_save_loads(reference, tmp_path):
    _, hf_model, folder, _, ref = reference
    out = tmp_path / "hf_sharded"
    hf_model.save_pretrained(out, max_shard_size="100KB")
    shutil.copy(folder / "tokenizer.model", out)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    assert torch.equal(logits_of(palikit.load(out, dtype="float32")), ref)


def test_index_listing_a_missing_shard_is_a_clear_error(reference, tmp_path):
    _, _, _, pipe, _ = reference
    save_hf_folder(pipe.model, tmp_path, max_shard_bytes=64_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(palikit.CheckpointError, match=re.escape(victim.name)):
        palikit.load(tmp_path, dtype="float32")


# ---- round trips ----------------------------------------------------------------------------


def test_palikit_save_then_palikit_load(reference, tmp_path):
    _, _, _, pipe, ref = reference
    pipe.save(tmp_path / "rt")
    files = sorted(p.name for p in (tmp_path / "rt").iterdir())
    assert files == ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.model",
                     "tokenizer_config.json"]
    from transformers import SiglipImageProcessor  # the preprocessor config in transformers' own form

    processor = SiglipImageProcessor.from_pretrained(tmp_path / "rt")
    size = pipe.config.vision.image_size
    assert processor.resample == 3 and processor.size == {"height": size, "width": size}  # bicubic
    with safe_open(tmp_path / "rt" / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)  # the released layout
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    again = palikit.load(tmp_path / "rt", dtype="float32")
    same_state(again.model, pipe.model)
    assert again.config.to_dict() | {"name": None} == pipe.config.to_dict() | {"name": None}
    assert torch.equal(logits_of(again), ref)


def test_palikit_save_then_transformers_load(reference, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration

    _, _, _, pipe, ref = reference
    pipe.save(tmp_path / "rt")
    hf = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "rt", attn_implementation="eager")
    hf.eval()
    n = pipe.config.num_image_tokens
    for i, row in enumerate(hf_logits(hf, pipe)):
        length = len(encode_example(pipe.tokenizer, n, PROMPTS[i], SUFFIXES[i]).ids)
        diff = (row - ref[i, :length]).abs().max().item()
        assert diff <= 1e-4, f"row {i}: max abs logit diff {diff}"


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def wide(request, tmp_path_factory, tokenizer_file, tiny_configs):
    """A transformers checkpoint 72 wide: sqrt(72) = 8.485 is not a bfloat16 number (sqrt(64) is),
    so rounding the embedding scale to the weight dtype (as big_vision and transformers do) shows."""
    config = dataclasses.replace(tiny_configs[request.param],
                                 text=dataclasses.replace(tiny_configs[request.param].text, hidden_size=72))
    folder = tmp_path_factory.mktemp(f"wide_pg{request.param}")
    make_hf_checkpoint(folder, config, tokenizer_file, seed=10 + request.param)
    from transformers import PaliGemmaForConditionalGeneration

    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16,
                                                           attn_implementation="eager").eval()
    return folder, hf


def test_bfloat16_load(wide):
    """bfloat16 weights are the float32 ones rounded; the norms keep float32 statistics and the
    embedding scale is rounded to bfloat16, exactly as transformers computes them; and the logits are
    as close to the exact result (float32 arithmetic on the same rounded weights) as transformers'
    bfloat16 logits are. Catches an RMSNorm computed in bfloat16 and an unrounded sqrt(D) scale."""
    folder, hf = wide
    pipe32 = palikit.load(folder, dtype="float32")
    pipe = palikit.load(folder, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in pipe.model.state_dict().values())
    for k, v in pipe32.model.state_dict().items():  # every weight is the float32 one rounded to bf16
        assert torch.equal(pipe.model.state_dict()[k], v.to(torch.bfloat16)), k

    ids = torch.tensor([encode_example(pipe.tokenizer, 0, PROMPTS[1], SUFFIXES[1]).ids])
    table = pipe.model.language_model.embed_tokens.weight
    embedded = pipe.model.language_model.embed(ids)
    assert torch.equal(embedded, hf.model.language_model.embed_tokens(ids))
    unrounded = torch.nn.functional.embedding(ids, table) * 72**0.5
    assert not torch.equal(embedded, unrounded)  # the rounding shows
    x = embedded * 3.0
    for ours, theirs in [(pipe.model.language_model.layers[0].input_layernorm,
                          hf.model.language_model.layers[0].input_layernorm),
                         (pipe.model.language_model.norm, hf.model.language_model.norm)]:
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x))

    exact = palikit.load(folder, dtype="float32")
    with torch.no_grad():
        for p in exact.model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    ref, ours, theirs = logits_of(exact), logits_of(pipe), hf_logits(hf, pipe)
    n = pipe.config.num_image_tokens
    errors = {"palikit": [], "transformers": []}
    for i, (p, s) in enumerate(zip(PROMPTS, SUFFIXES)):
        length = len(encode_example(pipe.tokenizer, n, p, s).ids)
        errors["palikit"].append(ours[i, :length] - ref[i, :length])
        errors["transformers"].append(theirs[i] - ref[i, :length])
    rms = {k: float(torch.cat(v).pow(2).mean().sqrt()) for k, v in errors.items()}
    assert 0 < rms["palikit"] <= 1.2 * rms["transformers"], rms

    (text, out), = pipe.generate_details([IMAGES[0]], [PROMPTS[0]], max_new_tokens=6)
    assert isinstance(text, str) and 1 <= len(out.tokens) <= 6 and len(out.logprobs) == len(out.tokens)
    assert text == pipe.tokenizer.decode(out.tokens)


# ---- big_vision npz -------------------------------------------------------------------------


def to_big_vision(hf_state: dict[str, torch.Tensor], config, vocab: int) -> dict[str, np.ndarray]:
    """The inverse of big_vision -> HF (transformers' convert_paligemma_weights_to_hf.py and
    convert_paligemma2_weights_to_hf.py), from transformers' own parameter names.

    Written independently of palikit.weights: per-layer tensors are stacked on a leading axis,
    kernels are (in, out), attention kernels are split into heads, the vocab keeps `vocab` rows.
    """
    sd = {k: v.detach().float().numpy() for k, v in hf_state.items()}
    C, D = config.vision.hidden_size, config.text.hidden_size
    nh, hd = config.vision.num_heads, config.vision.hidden_size // config.vision.num_heads
    H, K, h = config.text.num_heads, config.text.num_kv_heads, config.text.head_dim
    Lv, L = config.vision.num_layers, config.text.num_layers
    vit, llm = "model.vision_tower.encoder.layers.{}.", "model.language_model.layers.{}."

    def stack(fmt, n, name, fn=lambda a: a):
        return np.stack([fn(sd[fmt.format(i) + name]) for i in range(n)])

    enc, att = "img/Transformer/encoderblock/", "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    patch = sd["model.vision_tower.embeddings.patch_embedding.weight"]  # (C, 3, p, p) OIHW
    out = {
        "img/embedding/kernel": patch.transpose(2, 3, 1, 0),
        "img/embedding/bias": sd["model.vision_tower.embeddings.patch_embedding.bias"],
        "img/pos_embedding": sd["model.vision_tower.embeddings.position_embedding.weight"][None],
        enc + "LayerNorm_0/scale": stack(vit, Lv, "layer_norm1.weight"),
        enc + "LayerNorm_0/bias": stack(vit, Lv, "layer_norm1.bias"),
        enc + "LayerNorm_1/scale": stack(vit, Lv, "layer_norm2.weight"),
        enc + "LayerNorm_1/bias": stack(vit, Lv, "layer_norm2.bias"),
        att + "out/kernel": stack(vit, Lv, "self_attn.out_proj.weight", lambda w: w.T.reshape(nh, hd, C)),
        att + "out/bias": stack(vit, Lv, "self_attn.out_proj.bias"),
        enc + "MlpBlock_0/Dense_0/kernel": stack(vit, Lv, "mlp.fc1.weight", lambda w: w.T),
        enc + "MlpBlock_0/Dense_0/bias": stack(vit, Lv, "mlp.fc1.bias"),
        enc + "MlpBlock_0/Dense_1/kernel": stack(vit, Lv, "mlp.fc2.weight", lambda w: w.T),
        enc + "MlpBlock_0/Dense_1/bias": stack(vit, Lv, "mlp.fc2.bias"),
        "img/Transformer/encoder_norm/scale": sd["model.vision_tower.post_layernorm.weight"],
        "img/Transformer/encoder_norm/bias": sd["model.vision_tower.post_layernorm.bias"],
        "img/head/kernel": sd["model.multi_modal_projector.linear.weight"].T,
        "img/head/bias": sd["model.multi_modal_projector.linear.bias"],
        "llm/embedder/input_embedding": sd["model.language_model.embed_tokens.weight"][:vocab],
        "llm/final_norm/scale": sd["model.language_model.norm.weight"],
        "llm/layers/attn/q_einsum/w": stack(llm, L, "self_attn.q_proj.weight",
                                            lambda w: w.reshape(H, h, D).transpose(0, 2, 1)),
        "llm/layers/attn/kv_einsum/w": np.stack([
            np.stack([sd[llm.format(i) + f"self_attn.{p}_proj.weight"].reshape(K, h, D).transpose(0, 2, 1)
                      for p in "kv"]) for i in range(L)]),
        "llm/layers/attn/attn_vec_einsum/w": stack(llm, L, "self_attn.o_proj.weight",
                                                   lambda w: w.T.reshape(H, h, D)),
        "llm/layers/mlp/gating_einsum": np.stack([
            np.stack([sd[llm.format(i) + f"mlp.{p}_proj.weight"].T for p in ("gate", "up")])
            for i in range(L)]),
        "llm/layers/mlp/linear": stack(llm, L, "mlp.down_proj.weight", lambda w: w.T),
        "llm/layers/pre_attention_norm/scale": stack(llm, L, "input_layernorm.weight"),
    }
    for p in ("query", "key", "value"):
        q = p[0]
        out[att + f"{p}/kernel"] = stack(vit, Lv, f"self_attn.{q}_proj.weight",
                                         lambda w: w.T.reshape(C, nh, hd))
        out[att + f"{p}/bias"] = stack(vit, Lv, f"self_attn.{q}_proj.bias", lambda b: b.reshape(nh, hd))
    if config.version == 1:  # Gemma 1 in HF: post_attention_layernorm *is* the pre-MLP norm
        out["llm/layers/pre_ffw_norm/scale"] = stack(llm, L, "post_attention_layernorm.weight")
    else:
        out["llm/layers/pre_ffw_norm/scale"] = stack(llm, L, "pre_feedforward_layernorm.weight")
        out["llm/layers/post_attention_norm/scale"] = stack(llm, L, "post_attention_layernorm.weight")
        out["llm/layers/post_ffw_norm/scale"] = stack(llm, L, "post_feedforward_layernorm.weight")
    # Shapes as big_vision stores them: stacked layers, per-head einsum kernels.
    assert out["llm/layers/attn/q_einsum/w"].shape == (L, H, D, h)
    assert out["llm/layers/attn/kv_einsum/w"].shape == (L, 2, K, D, h)
    assert out["llm/layers/mlp/gating_einsum"].shape == (L, 2, D, config.text.intermediate_size)
    assert out[att + "query/kernel"].shape == (Lv, C, nh, hd)
    assert out["img/embedding/kernel"].shape[2:] == (3, C)
    return {"params/" + k: np.ascontiguousarray(v) for k, v in out.items()}


def as_bf16_void(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """bfloat16 the way big_vision stores it in an npz: raw 2-byte voids ('|V2')."""
    return {k: torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy().view("V2")
            for k, v in arrays.items()}


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_big_vision_npz(reference, tokenizer_file, tmp_path, precision):
    config, hf_model, folder, pipe, ref = reference
    vocab = config.image_token_id  # big_vision's table stops before <image> (no HF padding rows)
    arrays = to_big_vision(hf_model.state_dict(), config, vocab)
    if precision == "bf16":
        arrays = as_bf16_void(arrays)
        assert arrays["params/llm/final_norm/scale"].dtype == np.dtype("V2")
    path = tmp_path / f"tiny.{precision}.npz"
    np.savez(path, **arrays)

    # Capped as transformers caps, to compare with its logits (an .npz defaults to big_vision's
    # placement of the cap: tests/test_softcap.py).
    got = palikit.load(path, tokenizer=tokenizer_file, dtype="float32", logit_softcap="config")
    assert got.config.text.vocab_size == vocab
    assert got.config.version == config.version and got.config.text.post_norms == config.text.post_norms
    assert got.config.num_image_tokens == config.num_image_tokens
    assert got.tokenizer.image_token_id == config.image_token_id
    want = {k: v[:vocab] if k == "language_model.embed_tokens.weight" else v
            for k, v in pipe.model.state_dict().items()}
    if precision == "bf16":
        want = {k: v.to(torch.bfloat16).float() for k, v in want.items()}
    assert got.model.state_dict().keys() == want.keys()
    for k, v in got.model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, want[k]), k

    logits = logits_of(got)
    assert logits.shape[-1] == vocab
    if precision == "f32":
        diff = (logits - ref[..., :vocab]).abs().max().item()
    else:  # same as the HF model rounded to bf16, run in float32
        rounded = palikit.load(folder, dtype="float32")
        with torch.no_grad():
            for p in rounded.model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        diff = (logits - logits_of(rounded, vocab)).abs().max().item()
    assert diff <= 1e-4, diff
    if precision == "f32":  # generation through the cache, against transformers' generate
        if config.version == 2:  # transformers applies its window
            got.config.text.sliding_window = hf_model.config.text_config.sliding_window
        enc = encode_example(got.tokenizer, config.num_image_tokens, PROMPTS[0])
        ids = torch.tensor([enc.ids])
        pixels = preprocess(IMAGES[:1], config.vision.image_size)
        ref_tokens, ref_logits = hf_greedy(hf_model, ids, pixels, max_new_tokens=8)
        assert ref_tokens and max(ref_tokens) < vocab  # no padding-row token, which the npz model lacks
        # The npz model has no padding rows: its softmax runs over the first `vocab` logits.
        ref_logprobs = [float(step[0, :vocab].log_softmax(-1)[t]) for step, t in zip(ref_logits, ref_tokens)]
        (_, g), = got.generate_details(IMAGES[:1], PROMPTS[:1], max_new_tokens=8)
        assert g.tokens == ref_tokens
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(ref_logprobs), atol=1e-4, rtol=0)

    # bf16 straight from the bf16 npz keeps the stored values.
    if precision == "bf16":
        bf = palikit.load(path, tokenizer=tokenizer_file, dtype="bfloat16")
        for k, v in bf.model.state_dict().items():
            assert v.dtype == torch.bfloat16 and torch.equal(v.float(), want[k]), k


class _Unpickled:
    """Unpickling this object creates a file: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("where", ["extra array", "weight"])
def test_npz_with_object_arrays_is_refused_unread(reference, tokenizer_file, tmp_path, where):
    """An .npz whose arrays hold Python objects is a pickle: refused with one line naming the array,
    whether it is a weight (numpy's own ValueError before) or an unused extra (silently skipped
    before), and nothing is unpickled. Catches a loader that reads object arrays or ignores them."""
    config, hf_model, _, _, _ = reference
    arrays = to_big_vision(hf_model.state_dict(), config, config.image_token_id)
    marker = tmp_path / "unpickled"
    key = "params/extra" if where == "extra array" else "params/llm/final_norm/scale"
    arrays[key] = np.array([_Unpickled(marker)], dtype=object)
    np.savez(tmp_path / "evil.npz", **arrays)  # numpy pickles object arrays when saving
    with pytest.raises(palikit.CheckpointError, match="never unpickles") as info:
        palikit.load(tmp_path / "evil.npz", tokenizer=tokenizer_file)
    assert key in str(info.value) and not marker.exists()


def test_npz_that_is_not_paligemma_is_a_clear_error(tmp_path, tokenizer_file):
    np.savez(tmp_path / "other.npz", **{"params/foo/kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(palikit.CheckpointError, match="not a PaliGemma big_vision checkpoint"):
        palikit.load(tmp_path / "other.npz", tokenizer=tokenizer_file)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(palikit.CheckpointError, match="cannot read"):
        palikit.load(tmp_path / "junk.npz", tokenizer=tokenizer_file)


# ---- errors ---------------------------------------------------------------------------------


@pytest.fixture
def broken(tiny_model_dir, tmp_path):
    """A writable copy of a valid palikit-written tiny PaliGemma 2 folder."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def load_error(folder) -> str:
    with pytest.raises(palikit.CheckpointError) as info:
        palikit.load(folder, dtype="float32")
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_missing_folder(tmp_path):
    msg = load_error(tmp_path / "no_such_model")
    assert "not found" in msg and "no_such_model" in msg


def test_folder_without_weights(broken):
    (broken / "model.safetensors").unlink()
    msg = load_error(broken)
    assert "no *.safetensors weights" in msg and str(broken) in msg
    empty = broken.parent / "empty"
    empty.mkdir()
    assert "config.json" in load_error(empty)


def test_folder_with_only_pickle_weights(broken):
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"\x80\x02 pretend pickle")
    msg = load_error(broken)
    assert "pickle" in msg and "safetensors" in msg and "pytorch_model.bin" in msg


def test_unknown_model_type(broken):
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(cfg | {"model_type": "llava"}))
    with pytest.raises(ValueError) as info:
        palikit.load(broken, dtype="float32")
    assert "model_type" in str(info.value) and "llava" in str(info.value) and "paligemma" in str(info.value)
    (broken / "config.json").write_text("{not json")
    assert "not valid JSON" in load_error(broken)


@pytest.mark.parametrize("keep", [0.5, 100, 4])
def test_truncated_safetensors(broken, keep):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    msg = load_error(broken)
    assert "cannot read" in msg and "model.safetensors" in msg


def edit_state(folder: Path, fn) -> None:
    state = load_file(folder / "model.safetensors")
    fn(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_wrong_tensor_shape(broken):
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    edit_state(broken, lambda s: s.__setitem__(name, torch.zeros(7, 64)))
    msg = load_error(broken)
    assert "layers.1.mlp.up_proj.weight" in msg and "(7, 64)" in msg and "(128, 64)" in msg


def test_wrong_vocab_size(broken):
    name = "language_model.model.embed_tokens.weight"
    edit_state(broken, lambda s: s.__setitem__(name, s[name][:1000].clone()))
    msg = load_error(broken)
    assert "1000 rows" in msg and "vocab_size=1600" in msg


def test_unexpected_tensor(broken):
    edit_state(broken, lambda s: s.update({"language_model.model.layers.0.extra_gate.weight": torch.zeros(3),
                                           "something_else.bias": torch.zeros(2)}))
    msg = load_error(broken)
    assert "unexpected 2 tensors" in msg
    assert "layers.0.extra_gate.weight" in msg and "something_else.bias" in msg
    assert "missing" not in msg


def test_missing_tensor(broken):
    edit_state(broken, lambda s: s.pop("language_model.model.norm.weight"))
    msg = load_error(broken)
    assert "missing 1 tensors" in msg and "language_model.norm.weight" in msg


# ---- peak memory ----------------------------------------------------------------------------

MEASURE = textwrap.dedent("""
    import json, sys
    import torch, palikit  # noqa: F401  (imports are part of the baseline)
    from pathlib import Path
    from palikit.weights import build_on_meta, load_tensors, open_checkpoint

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    base, anon_base = status("VmRSS:"), status("RssAnon:")
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0); else it is conservative
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    ckpt = open_checkpoint(Path(sys.argv[1]))
    model = load_tensors(build_on_meta(ckpt.config), ckpt.tensors(torch.bfloat16), torch.bfloat16, "cpu", ckpt.path)
    # Touch every weight (a memory-mapped one is resident only once read), allocating nothing big.
    finite = all(bool(torch.isfinite(t.max())) for t in model.state_dict().values())
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    dtypes = sorted({str(t.dtype) for t in model.state_dict().values()})
    peak = status("VmHWM:") - base
    anon = status("RssAnon:") - anon_base  # memory that is not the file's own (mapped) pages
    print(json.dumps({"peak": peak, "anon": anon, "bytes": nbytes, "dtypes": dtypes, "finite": finite}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("saved, shard", [(torch.float32, None), (torch.float32, 250_000_000),
                                          (torch.bfloat16, None)], ids=["f32-single", "f32-sharded", "bf16"])
@pytest.mark.slow
def test_bf16_load_peak_memory(tmp_path, saved, shard):
    """Loading as bfloat16 peaks at the bfloat16 model plus one float32 tensor: a float32 checkpoint
    converts tensor by tensor, a bfloat16 one is memory-mapped and used as it is (no copy). Catches a
    loader that holds the float32 weights (or a whole memory-mapped file) while it converts, or that
    copies a bfloat16 file."""
    from palikit.config import PaliGemmaConfig
    from palikit.paligemma import PaliGemma

    config = PaliGemmaConfig.from_name(
        "tiny-paligemma2",
        text=dict(vocab_size=16_000, hidden_size=1024, intermediate_size=4096, num_layers=6, num_heads=8,
                  num_kv_heads=2, head_dim=128, query_pre_attn_scalar=128),
        vision=dict(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4),
    )
    model = PaliGemma(config).to(saved)
    tensors = model.state_dict().values()
    bf16_bytes = sum(t.numel() * 2 for t in tensors)
    largest = max(t.numel() * 4 for t in tensors)  # in float32
    assert 150e6 < bf16_bytes < 300e6 and largest < bf16_bytes / 3
    save_hf_folder(model, tmp_path, **({"max_shard_bytes": shard} if shard else {}))
    del model, tensors
    assert len(list(tmp_path.glob("*.safetensors"))) == (1 if shard is None else 2)

    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bytes"] == bf16_bytes and result["dtypes"] == ["torch.bfloat16"] and result["finite"]
    bound = bf16_bytes + largest + 16e6  # 16 MB for the interpreter's own allocations
    assert result["peak"] <= bound, (f"peak RSS growth {result['peak'] / 1e6:.0f} MB, over the bf16 "
                                     f"weights ({bf16_bytes / 1e6:.0f} MB) + one float32 tensor "
                                     f"({largest / 1e6:.0f} MB)")
    if saved == torch.bfloat16:  # the weights are the file's pages, not a copy
        assert result["anon"] < 0.1 * bf16_bytes, f"{result['anon'] / 1e6:.0f} MB copied"


# ---- hub ids and the resize filter ----------------------------------------------------------------


def fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder` laid out as huggingface_hub caches a download: refs/main names a snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_id_loads_from_the_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    """A hub id is found in the Hugging Face cache with HF_HUB_OFFLINE=1 (as conftest sets it);
    one that is not cached is one clear error naming both."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-pg2", tiny_model_dir)
    pipe = palikit.load("tiny-org/tiny-pg2", dtype="float32")
    same_state(pipe.model, palikit.load(tiny_model_dir, dtype="float32").model)
    assert pipe.tokenizer.path == snapshot / "tokenizer.model"
    assert pipe.codec_path == snapshot / "mask_codec.npz"
    with pytest.raises(palikit.CheckpointError,
                       match="tiny-org/missing is not in the Hugging Face cache and HF_HUB_OFFLINE=1"):
        palikit.load("tiny-org/missing")


def test_hub_id_downloads_only_when_online(tiny_model_dir, monkeypatch):
    """Online, the cache is asked first and the hub second; a failed download is one clear error."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def snapshot_download(repo_id, allow_patterns, local_files_only=False):
        calls.append((repo_id, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        if repo_id == "org/unreachable":
            raise OSError("connection refused")
        assert {"*.json", "*.safetensors", "tokenizer.model"} <= set(allow_patterns)  # never *.bin
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert palikit.load("org/name", dtype="float32").config.name == tiny_model_dir.name
    assert calls == [("org/name", True), ("org/name", False)]
    with pytest.raises(palikit.CheckpointError, match="cannot fetch org/unreachable.*connection refused"):
        palikit.load("org/unreachable")


@pytest.mark.parametrize("resample, name", [(2, "bilinear"), (0, "nearest"), (None, "bicubic")])
def test_resize_filter_comes_from_the_preprocessor_config(tiny_model_dir, tmp_path, resample, name):
    """preprocessor_config.json's `resample` (PIL numbering; transformers' default 3 = bicubic when
    the file is absent) is the filter generate and score resize with. Catches a loader that ignores
    the file or a path that resizes with another filter."""
    from PIL import Image

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    if resample is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps({"resample": resample}))
    pipe = palikit.load(folder, dtype="float32")
    assert pipe.config.resample == name
    image, side = synthetic_image(3, size=(50, 40)), pipe.config.vision.image_size
    # Inputs already at the model's size are not resized again: each is one filter's result.
    resized = {f: image.resize((side, side), getattr(Image, f.upper()))
               for f in ("bilinear", "nearest", "bicubic")}

    def score(im):
        return pipe.score([im], ["caption en"], ["a red circle"])[0]

    def logprobs(im):
        return pipe.generate_details(im, "caption en", max_new_tokens=3)[0][1].logprobs

    assert score(image) == score(resized[name]) and logprobs(image) == logprobs(resized[name])
    for other in set(resized) - {name}:
        assert score(image) != score(resized[other]) and logprobs(image) != logprobs(resized[other])
