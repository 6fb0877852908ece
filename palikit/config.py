"""Configs of the three parts of PaliGemma, with a named preset for every released checkpoint.

Behaviour differences between PaliGemma 1 and 2 are config fields (soft-caps, sandwich norms,
query scale, sliding window), never sniffed from a model name.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path



@dataclass
class SiglipConfig:
    """SigLIP vision tower without its pooling head (So400m/14 by default)."""

    image_size: int = 224  # square input side in pixels; 224 / 448 / 896 in released models
    patch_size: int = 14  # conv stride = kernel; the patch grid is image_size // patch_size per side
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16  # head_dim = hidden_size // num_heads = 72
    layer_norm_eps: float = 1e-6

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class GemmaConfig:
    """Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder.

    Heads: H query heads share K key/value heads (H // K queries per kv head).
    K == 1 is multi-query attention (Gemma 2B), 1 < K < H grouped-query (Gemma 2).
    """

    vocab_size: int = 257_216  # HF rows; big_vision checkpoints have 257,152 (no padding rows)
    hidden_size: int = 2048
    intermediate_size: int = 16_384
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    # Attention scores are multiplied by query_pre_attn_scalar ** -0.5. Equal to head_dim except
    # for Gemma 2 27B, where it is hidden_size / num_heads = 144.
    query_pre_attn_scalar: float = 256.0
    # Gemma 2 squashes scores with cap * tanh(s / cap) before masking; None disables it.
    attn_logit_softcap: float | None = None
    # Gemma 2 squashes output logits the same way. big_vision's transfer configs set it to 0,
    # HF applies it; greedy decoding is unaffected, log-probs are not.
    final_logit_softcap: float | None = None
    # Gemma 2 "sandwich" norms: an RMSNorm after attention and after the MLP, before the residual.
    post_norms: bool = False
    # Gemma 2 local attention on even layers. big_vision does not implement it (its default,
    # None here); set a window to get transformers' behaviour: a key is visible when it is within
    # the window or when both tokens are in the bidirectional prefix (transformers >= 4.57).
    sliding_window: int | None = None
    max_position_embeddings: int = 8192  # longest sequence (image + text tokens) we accept

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


@dataclass
class PaliGemmaConfig:
    name: str = "custom"
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    text: GemmaConfig = field(default_factory=GemmaConfig)
    image_token_id: int = 257_152  # the "<image>" placeholder; never embedded, replaced by image features
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    # Resampling filter of the square resize, as PIL names it: the checkpoint's preprocessor_config.json
    # (3 = bicubic, as released; 2 = bilinear).
    resample: str = "bicubic"

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_image_tokens

    @property
    def version(self) -> int:
        return 2 if self.text.post_norms else 1

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides) -> PaliGemmaConfig:
        """A preset by name; `vision=`/`text=` dicts and top-level fields override it."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown model preset {name!r}{hint} (see palikit.config.PRESETS)")
        preset = PRESETS[name]
        vision = dataclasses.replace(preset.vision, **overrides.pop("vision", {}))
        text = dataclasses.replace(preset.text, **overrides.pop("text", {}))
        return dataclasses.replace(preset, vision=vision, text=text, **{"name": name, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_config(cls, hf: dict, name: str = "custom", sliding_window: bool = False,
                       resample: str = "bicubic") -> PaliGemmaConfig:
        """Build from a transformers PaliGemma `config.json` (as a dict).

        sliding_window=True applies the file's Gemma 2 window as transformers does; by default it
        is ignored, as in big_vision (see GemmaConfig.sliding_window).
        """
        if hf.get("model_type") != "paligemma":
            raise ValueError(f"config.json has model_type={hf.get('model_type')!r}, expected 'paligemma'")
        v, t = hf.get("vision_config", {}), hf.get("text_config", {})
        gemma2 = t.get("model_type") == "gemma2"
        vision = SiglipConfig(
            image_size=v.get("image_size", 224),
            patch_size=v.get("patch_size", 14),
            hidden_size=v.get("hidden_size", 1152),
            intermediate_size=v.get("intermediate_size", 4304),
            num_layers=v.get("num_hidden_layers", 27),
            num_heads=v.get("num_attention_heads", 16),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        )
        head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
        text = GemmaConfig(
            vocab_size=t.get("vocab_size", 257_216),
            hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            num_layers=t["num_hidden_layers"],
            num_heads=t["num_attention_heads"],
            num_kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
            head_dim=head_dim,
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(t),
            query_pre_attn_scalar=t.get("query_pre_attn_scalar", head_dim) if gemma2 else head_dim,
            attn_logit_softcap=t.get("attn_logit_softcapping") if gemma2 else None,
            final_logit_softcap=t.get("final_logit_softcapping") if gemma2 else None,
            post_norms=gemma2,
            sliding_window=t.get("sliding_window") if gemma2 and sliding_window else None,
            max_position_embeddings=t.get("max_position_embeddings", 8192),
        )
        image_token = hf.get("image_token_id", hf.get("image_token_index", 257_152))
        return cls(
            name=name,
            vision=vision,
            text=text,
            resample=resample,
            image_token_id=image_token,
            pad_token_id=_first(hf.get("pad_token_id", t.get("pad_token_id")), 0),
            eos_token_id=_first(hf.get("eos_token_id", t.get("eos_token_id")), 1),
            bos_token_id=_first(hf.get("bos_token_id", t.get("bos_token_id")), 2),
        )

    def to_hf_config(self) -> dict:
        """A transformers-compatible `config.json` dict (the released layout)."""
        v, t = self.vision, self.text
        text = {
            "model_type": "gemma2" if t.post_norms else "gemma",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": t.max_position_embeddings,
            "num_image_tokens": self.num_image_tokens,
        }
        if t.post_norms:
            text |= {
                "query_pre_attn_scalar": t.query_pre_attn_scalar,
                "attn_logit_softcapping": t.attn_logit_softcap,
                "final_logit_softcapping": t.final_logit_softcap,
                "sliding_window": t.sliding_window or t.max_position_embeddings,
            }
        return {
            "model_type": "paligemma",
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "image_token_index": self.image_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "projection_dim": t.hidden_size,
            "hidden_size": t.hidden_size,
            "text_config": text,
            "vision_config": {
                "model_type": "siglip_vision_model",
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads,
                "layer_norm_eps": v.layer_norm_eps,
                "num_image_tokens": self.num_image_tokens,
                "projection_dim": t.hidden_size,
                "vision_use_head": False,
                "hidden_act": "gelu_pytorch_tanh",
            },
        }

    @classmethod
    def from_file(cls, path: str | Path) -> PaliGemmaConfig:
        """A transformers `config.json` file."""
        return cls.from_hf_config(json.loads(Path(path).read_text()), name=Path(path).parent.name)


def _first(x, default):
    if isinstance(x, list):  # some configs list several eos ids
        return x[0] if x else default
    return default if x is None else x


def _rope_theta(t: dict) -> float:
    rope = t.get("rope_parameters") or {}  # transformers 5 moved rope_theta here
    return float(t.get("rope_theta") or rope.get("rope_theta") or 10_000.0)


# ---- presets ------------------------------------------------------------------------------
# Sizes from big_vision's variant tables (gemma_2b, gemma2_{2b,9b,27b}, So400m/14), cross-checked
# with transformers' conversion scripts (models/paligemma/convert_paligemma*_weights_to_hf.py).

GEMMA_2B = GemmaConfig()
GEMMA2 = {
    "3b": GemmaConfig(hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8, num_kv_heads=4,
                      head_dim=256, query_pre_attn_scalar=256, attn_logit_softcap=50.0,
                      final_logit_softcap=30.0, post_norms=True),
    "10b": GemmaConfig(hidden_size=3584, intermediate_size=14_336, num_layers=42, num_heads=16, num_kv_heads=8,
                       head_dim=256, query_pre_attn_scalar=256, attn_logit_softcap=50.0,
                       final_logit_softcap=30.0, post_norms=True),
    "28b": GemmaConfig(hidden_size=4608, intermediate_size=36_864, num_layers=46, num_heads=32, num_kv_heads=16,
                       head_dim=128, query_pre_attn_scalar=144, attn_logit_softcap=50.0,
                       final_logit_softcap=30.0, post_norms=True),
}


def _presets() -> dict[str, PaliGemmaConfig]:
    out = {}
    for res in (224, 448, 896):
        vision = SiglipConfig(image_size=res)
        for kind in ("pt", "mix"):
            name = f"paligemma-3b-{kind}-{res}"
            out[name] = PaliGemmaConfig(name=name, vision=vision, text=GEMMA_2B)
            for size, text in GEMMA2.items():
                name = f"paligemma2-{size}-{kind}-{res}"
                out[name] = PaliGemmaConfig(name=name, vision=vision, text=text)
    for size in ("3b", "10b"):
        name = f"paligemma2-{size}-ft-docci-448"
        out[name] = PaliGemmaConfig(name=name, vision=SiglipConfig(image_size=448), text=GEMMA2[size])

    # Tiny random-init models for tests: the real code paths at a few kB of weights. The vocab
    # leaves room for a 400-piece SentencePiece model + 1024 loc + 128 seg + <image>, padded to 64.
    tiny_vision = SiglipConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64,
                               num_layers=2, num_heads=4)
    tiny_text = dict(vocab_size=1600, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512)
    out["tiny-paligemma"] = PaliGemmaConfig(name="tiny-paligemma", vision=tiny_vision,
                                            text=GemmaConfig(**tiny_text, num_kv_heads=1), image_token_id=1552)
    out["tiny-paligemma2"] = PaliGemmaConfig(
        name="tiny-paligemma2", vision=tiny_vision, image_token_id=1552,
        text=GemmaConfig(**tiny_text | {"num_layers": 3}, num_kv_heads=2, attn_logit_softcap=50.0,
                         final_logit_softcap=30.0, post_norms=True),
    )
    # The bundled default model (palikit/assets/default): a small PaliGemma 2 trained from scratch
    # on palikit.synthetic's shapes world by tools/make_default_model.py. 96 px input, the size the
    # scenes are drawn at, and 8 px patches: 144 image tokens, digits about 2 patches tall.
    out["palikit-tiny-shapes"] = PaliGemmaConfig(
        name="palikit-tiny-shapes", image_token_id=1552, resample="bilinear",
        vision=SiglipConfig(image_size=96, patch_size=8, hidden_size=128, intermediate_size=256, num_layers=4,
                            num_heads=4),
        text=GemmaConfig(vocab_size=1600, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=64, query_pre_attn_scalar=64, attn_logit_softcap=50.0,
                         final_logit_softcap=None, post_norms=True, max_position_embeddings=4096),
    )
    return out


PRESETS = _presets()
