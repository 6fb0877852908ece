"""Export to ONNX in transformers.js's layout for PaliGemma (its LlavaForConditionalGeneration path):
three graphs, `onnx/embed_tokens.onnx` (input_ids -> inputs_embeds, the sqrt(D) scaling inside),
`onnx/vision_encoder.onnx` (pixel_values -> image_features: SigLIP + projector, unscaled, as
PaliGemma feeds them) and `onnx/decoder_model_merged.onnx` (inputs_embeds, attention_mask,
past_key_values.{i}.key / .value -> logits, present.{i}.key / .value), beside the model's config,
tokenizer and processor files (palikit.weights.save_model_files).

The decoder computes its mask from what a transformers.js-style caller passes: new tokens on an
empty cache attend to each other fully (PaliGemma's prefix-LM block: image + prefix), otherwise
causally within the chunk and to every cached key; attention_mask (2-D, 0 / 1) marks padding, and
RoPE positions are its running count (cumsum - 1), so a left-padded batch is exact. Gemma 2's
soft-caps (attention and final) are written out, and its sliding window applies on the local layers
to tokens after the first call, as transformers applies it (palikit's `sliding_window` option).

`OnnxPipeline` (palikit.export.load) runs an exported folder with onnxruntime: greedy decoding with
a KV cache, the same calls a transformers.js client makes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import write_folder_atomic
from .gemma import apply_rope, rope_cos_sin
from .processor import InputError

GRAPHS = ("embed_tokens", "vision_encoder", "decoder_model_merged")
OPSET = 18


class _Embed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.lm = model.language_model

    def forward(self, input_ids):
        return self.lm.embed(input_ids)


class _Vision(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.multi_modal_projector(self.model.vision_tower(pixel_values))


class _Decoder(nn.Module):
    """Gemma's layers over new embeddings and a KV cache given as inputs (see the module doc)."""

    def __init__(self, model):
        super().__init__()
        self.lm, self.config = model.language_model, model.config.text
        self.capped = "decode" in model.capped or "prefill" in model.capped

    def forward(self, inputs_embeds, attention_mask, past: list[torch.Tensor]):
        c = self.config
        B, T, _ = inputs_embeds.shape
        P = past[0].shape[2]
        S = P + T
        valid = attention_mask.bool()  # (B, S)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, P:]  # (B, T)
        q_slot = torch.arange(T, device=inputs_embeds.device)[:, None] + P  # (T, 1)
        k_slot = torch.arange(S, device=inputs_embeds.device)[None, :]  # (1, S)
        first_call = torch.zeros((), dtype=torch.long, device=inputs_embeds.device) + P == 0
        allowed = ((k_slot <= q_slot) | first_call)[None] & valid[:, None, :]  # (B, T, S)
        masks = {"global": allowed}
        if c.sliding_window is not None:
            k_pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, S)
            near = (positions[:, :, None] - k_pos[:, None, :]) < c.sliding_window
            masks["sliding"] = allowed & (near | first_call)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, inputs_embeds.dtype)
        x, present = inputs_embeds, []
        for i, layer in enumerate(self.lm.layers):
            mask = masks["sliding"] if layer.local_if_windowed and "sliding" in masks else masks["global"]
            h, k, v = self._attention(layer.self_attn, layer.input_layernorm(x), cos, sin, mask,
                                      past[2 * i], past[2 * i + 1])
            present += [k, v]
            if layer.post_norms:
                h = layer.post_attention_layernorm(h)
            x = x + h
            h = layer.mlp(layer.pre_feedforward_layernorm(x))
            if layer.post_norms:
                h = layer.post_feedforward_layernorm(h)
            x = x + h
        return self.lm.logits(x, self.capped), *present

    def _attention(self, attn, x, cos, sin, mask, past_k, past_v):
        c = self.config
        B, T, _ = x.shape
        H, K, Dh = c.num_heads, c.num_kv_heads, c.head_dim
        q = apply_rope(attn.q_proj(x).view(B, T, H, Dh).transpose(1, 2), cos, sin)
        k = apply_rope(attn.k_proj(x).view(B, T, K, Dh).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(B, T, K, Dh).transpose(1, 2)
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        S = k.shape[2]
        scores = q.reshape(B, K, H // K * T, Dh) @ k.transpose(-1, -2) * attn.scale
        if c.attn_logit_softcap is not None:
            scores = c.attn_logit_softcap * torch.tanh(scores / c.attn_logit_softcap)
        scores = scores.view(B, K, H // K, T, S).masked_fill(~mask[:, None, None], torch.finfo(scores.dtype).min)
        probs = scores.float().softmax(-1).to(v.dtype).view(B, K, H // K * T, S)
        out = (probs @ v).view(B, H, T, Dh).transpose(1, 2).reshape(B, T, H * Dh)
        return attn.o_proj(out), k, v


QUANTIZED = {"q8": "_quantized"}  # --quantize -> transformers.js's file suffix


def export(pipe, out: str | Path, force: bool = False, quantize: str | None = None) -> Path:
    """Write `pipe`'s model (float32) as transformers.js's three ONNX graphs and its files into
    `out`; refused when `out` exists (force: replaced) or the model is quantised. quantize="q8":
    also onnxruntime's dynamic int8 copies of the graphs (`*_quantized.onnx`, transformers.js's q8).
    Nothing half-written stays: the folder is written beside and renamed at the end."""
    from .quantize import scheme_of
    from .weights import save_model_files

    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"--out {out} exists; --force replaces it")
    if scheme_of(pipe.model) is not None:
        raise InputError("the model is quantised (int8 / int4 / w8a8): export the float checkpoint instead "
                         "(its graphs are float32; onnxruntime quantises them itself)")
    model = pipe.model.float().eval()
    c, text = model.config, model.config.text

    def write(folder: Path) -> None:
        graphs = folder / "onnx"
        graphs.mkdir(parents=True)
        # Optimum's names: transformers.js makes the empty cache from the decoder's input shapes,
        # "batch_size" its batch and every other name 0 (resolveCacheShape, transformers.js 4.x)
        B, T = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
        P = torch.export.Dim("past_sequence_length", min=0)
        ids = torch.zeros(2, 3, dtype=torch.long)
        _onnx(_Embed(model), (ids,), graphs / "embed_tokens.onnx", ["input_ids"], ["inputs_embeds"],
              {"input_ids": {0: B, 1: T}})
        pixels = torch.zeros(2, 3, c.vision.image_size, c.vision.image_size)
        _onnx(_Vision(model), (pixels,), graphs / "vision_encoder.onnx", ["pixel_values"], ["image_features"],
              {"pixel_values": {0: torch.export.Dim("num_images")}})
        past = [torch.zeros(2, text.num_kv_heads, 2, text.head_dim) for _ in range(2 * text.num_layers)]
        names = [f"past_key_values.{i}.{kv}" for i in range(text.num_layers) for kv in ("key", "value")]
        presents = [n.replace("past_key_values", "present") for n in names]
        _onnx(_Decoder(model), (torch.zeros(2, 3, text.hidden_size), torch.ones(2, 5, dtype=torch.long), past),
              graphs / "decoder_model_merged.onnx", ["inputs_embeds", "attention_mask", *names],
              ["logits", *presents],
              {"inputs_embeds": {0: B, 1: T}, "attention_mask": {0: B, 1: torch.export.Dim("total_sequence_length")},
               "past": [{0: B, 2: P} for _ in names]})
        save_model_files(folder, c, pipe.tokenizer.path, pipe.codec_path)
        _tokenizer_json(folder)
        config = c.to_hf_config()  # what transformers.js reads beyond transformers' fields:
        config["text_config"]["head_dim"] = text.head_dim
        config["image_token_index"] = c.image_token_id
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if quantize is not None:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            for g in GRAPHS:  # weights to int8 per tensor, activations quantised at run time
                quantize_dynamic(graphs / f"{g}.onnx", graphs / f"{g}{QUANTIZED[quantize]}.onnx",
                                 weight_type=QuantType.QInt8)
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": pipe.tokenizer.bos_id, "eos_token_id": pipe.tokenizer.eos_id,
             "pad_token_id": pipe.tokenizer.pad_id}, indent=2) + "\n")

    return write_folder_atomic(out, write)


def _tokenizer_json(folder: Path) -> None:
    """tokenizer.json, the only tokenizer transformers.js reads: transformers' conversion of
    tokenizer.model with tokenizer_config.json's special tokens (skipped, saying so, without
    transformers; onnxruntime runs the graphs either way)."""
    import logging
    import tempfile

    try:
        from transformers import AutoTokenizer
    except ImportError:
        logging.getLogger(__name__).warning("no tokenizer.json (transformers.js needs one): pip install transformers")
        return
    with tempfile.TemporaryDirectory() as tmp:
        AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
        shutil.copyfile(Path(tmp) / "tokenizer.json", folder / "tokenizer.json")


def _onnx(module, args, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    import warnings

    shapes = dynamic
    if isinstance(args[-1], list):  # the decoder: dynamic shapes by argument
        shapes = (dynamic["inputs_embeds"], dynamic["attention_mask"], dynamic["past"])
    else:
        shapes = (next(iter(dynamic.values())),)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=inputs, output_names=outputs,
                          dynamic_shapes=shapes, opset_version=OPSET, external_data=False, verbose=False)


# ---- running an exported folder with onnxruntime --------------------------------------------


class OnnxPipeline:
    """An exported folder run by onnxruntime, called as transformers.js calls it: the prompt's ids
    embedded, the image features copied into the <image> rows, the whole prompt in a first decoder
    call on an empty cache, then one token per call."""

    def __init__(self, folder: str | Path, quantize: str | None = None):
        import onnxruntime as ort

        from .config import PaliGemmaConfig
        from .processor import Tokenizer

        self.folder = folder = Path(folder)
        self.config = PaliGemmaConfig.from_file(folder / "config.json")
        self.tokenizer = Tokenizer(folder / "tokenizer.model", image_token_id=self.config.image_token_id)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        suffix = QUANTIZED[quantize] if quantize else ""
        self.sessions = {g: ort.InferenceSession(str(folder / "onnx" / f"{g}{suffix}.onnx"), options,
                                                 providers=["CPUExecutionProvider"]) for g in GRAPHS}

    def logits_and_cache(self, embeds: np.ndarray, mask: np.ndarray, past: list[np.ndarray]):
        text = self.config.text
        feed = {"inputs_embeds": embeds, "attention_mask": mask}
        feed |= {f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": p for i, p in enumerate(past)}
        out = self.sessions["decoder_model_merged"].run(None, feed)
        assert len(out) == 1 + 2 * text.num_layers
        return out[0], out[1:]

    def prompt_embeddings(self, images: list, prompt: str) -> np.ndarray:
        from .processor import encode_example, preprocess

        ids = encode_example(self.tokenizer, self.config.num_image_tokens * len(images), prompt).ids
        ids = np.array([ids], dtype=np.int64)
        is_image = ids == self.config.image_token_id
        embeds = self.sessions["embed_tokens"].run(None, {"input_ids": np.where(is_image, 0, ids)})[0]
        if images:
            pixels = preprocess(images, self.config.vision.image_size, self.config.resample).numpy()
            features = self.sessions["vision_encoder"].run(None, {"pixel_values": pixels})[0]
            embeds[is_image] = features.reshape(-1, features.shape[-1])
        return embeds

    def generate_details(self, images: list, prompt: str, max_new_tokens: int = 16):
        """Greedy tokens and each one's log-prob, and the first call's logits (1, T, V)."""
        text = self.config.text
        embeds = self.prompt_embeddings(images, prompt)
        past = [np.zeros((1, text.num_kv_heads, 0, text.head_dim), np.float32) for _ in range(2 * text.num_layers)]
        mask = np.ones((1, embeds.shape[1]), np.int64)
        tokens, logprobs, first = [], [], None
        for _ in range(max_new_tokens):
            logits, past = self.logits_and_cache(embeds, mask, past)
            first = logits if first is None else first
            last = torch.from_numpy(logits[0, -1]).log_softmax(-1)
            token = int(last.argmax())
            if token == self.tokenizer.eos_id:
                break
            tokens.append(token)
            logprobs.append(float(last[token]))
            embeds = self.sessions["embed_tokens"].run(None, {"input_ids": np.array([[token]], np.int64)})[0]
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
        return tokens, logprobs, first


def load(folder: str | Path, quantize: str | None = None) -> OnnxPipeline:
    """An exported folder's graphs in onnxruntime (quantize="q8": its *_quantized.onnx)."""
    return OnnxPipeline(folder, quantize)
