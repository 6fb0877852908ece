"""Export to ONNX in transformers.js's layout for PaliGemma (its LlavaForConditionalGeneration path):
three graphs, `onnx/embed_tokens.onnx` (input_ids -> inputs_embeds, the sqrt(D) scaling inside),
`onnx/vision_encoder.onnx` (pixel_values -> image_features: SigLIP + projector, unscaled, as
PaliGemma feeds them) and `onnx/decoder_model_merged.onnx` (inputs_embeds, attention_mask,
past_key_values.{i}.key / .value -> logits, present.{i}.key / .value), beside the model's config,
tokenizer and processor files (palikit.weights.save_model_files).

The decoder runs palikit's own layers and computes its mask (gemma.attention_masks) from what a
transformers.js-style caller passes: new tokens on an empty cache attend to each other fully
(PaliGemma's prefix-LM block: image + prefix), otherwise causally within the chunk and to every
cached key; attention_mask (2-D, 0 / 1) marks padding, and RoPE positions are its running count
(cumsum - 1), so a left-padded batch is exact. Gemma 2's soft-caps (attention and final) are part
of those layers, and its sliding window applies on the local layers to tokens after the first call,
as transformers applies it (palikit's `sliding_window` option).

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
from .gemma import KVCache, attention_masks, rope_cos_sin
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


class _GrowingCache(KVCache):
    """KVCache's interface over a cache given as graph inputs: a write appends the new keys and
    values after the past ones, so each layer's whole cache comes out as the graph's present.*."""

    def write(self, layer: int, start, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer] = torch.cat([self.k[layer], k], 2)
        self.v[layer] = torch.cat([self.v[layer], v], 2)


class _Decoder(nn.Module):
    """Gemma's own layers over new embeddings and a KV cache given as inputs (see the module doc)."""

    def __init__(self, model):
        super().__init__()
        self.lm, self.config = model.language_model, model.config.text
        self.capped = "decode" in model.capped or "prefill" in model.capped

    def forward(self, inputs_embeds, attention_mask, past: list[torch.Tensor]):
        B, T, _ = inputs_embeds.shape
        P = past[0].shape[2]
        first_call = torch.zeros((), dtype=torch.long, device=inputs_embeds.device) + P == 0
        # Block numbers as gemma.attention_masks takes them: a first call is one block (the prompt);
        # after it every cached key is block 0 and each new token a block of its own, in order.
        slots = torch.arange(P + T, device=inputs_embeds.device)
        k_block = torch.where(first_call, 0, (slots - P + 1).clamp(min=0)).expand(B, -1)
        k_pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # RoPE positions count real tokens only
        masks = attention_masks(k_block[:, P:], k_pos[:, P:], k_block, k_pos, attention_mask.bool(), self.config)
        cos, sin = rope_cos_sin(k_pos[:, P:], self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        cache, x = _GrowingCache(list(past[0::2]), list(past[1::2])), inputs_embeds
        for layer in self.lm.layers:  # the layers, not Gemma.forward: its FlexAttention kernel does not export
            x = layer(x, cos, sin, masks, cache, P)
        return self.lm.logits(x, self.capped), *[t for kv in zip(cache.k, cache.v) for t in kv]


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
