"""What trains: the model and tokenizer a config names (a checkpoint, or a preset with random
weights), random init, LoRA adapters (peft) and the table of trainable parameters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..api import load
from ..atomic import atomic_write, write_text_atomic
from ..options import DTYPES
from ..config import PaliGemmaConfig
from ..gemma import RMSNorm
from ..paligemma import PaliGemma
from ..processor import Tokenizer, train_tokenizer
from ..tasks import NUM_LOC, NUM_SEG
from ..adapters import _PEFT_PREFIX, ADAPTER_CONFIG, ADAPTER_WEIGHTS, _adapter_module
from ..weights import build_on_meta, palikit_to_transformers_module
from .. import dist
from .config import LORA_TARGETS, ConfigError, LoraSettings


def build_model(spec: str | dict, dtype: str, device, seed: int, texts, workdir: Path, rank: int = 0,
                softcap: bool = False) -> tuple[PaliGemma, Tokenizer, Path | None]:
    """The model, tokenizer and mask codec (None for a preset) named by the config's `model` field
    (see TrainConfig). softcap: train with PaliGemma 2's final logit soft-cap on every logit, as
    transformers does; without it the cap leaves the model, its saved config.json included."""
    if isinstance(spec, str):
        spec = {"source": spec}
    unknown = set(spec) - {"source", "preset", "tokenizer", "overrides"}
    if unknown or ("source" in spec) == ("preset" in spec):
        raise ConfigError("model must be a checkpoint source or {source|preset, tokenizer, overrides}; "
                          f"got {spec}")
    overrides = dict(spec.get("overrides") or {})
    text = dict(overrides.pop("text", None) or {}) | ({} if softcap else {"final_logit_softcap": None})
    if "source" in spec:
        runtime = {"final_logit_softcap", "attn_logit_softcap", "sliding_window"}
        if bad := sorted(set(text) - runtime):
            raise ConfigError(f"model.overrides.text.{bad[0]}: on a checkpoint only {sorted(runtime)} can change")
        if overrides:
            raise ConfigError(f"model.overrides: on a checkpoint only `text` fields can change, "
                              f"got {list(overrides)}")
        pipe = load(spec["source"], dtype=dtype, device=str(device), tokenizer=spec.get("tokenizer"),
                    logit_softcap="config", overrides=text)
        return pipe.model, pipe.tokenizer, pipe.codec_path
    config = PaliGemmaConfig.from_name(spec["preset"], text=text, **overrides)
    tok = spec.get("tokenizer")
    if tok is None:
        raise ConfigError("a preset model needs model.tokenizer: a tokenizer.model path, or 'train'")
    if tok == "train":  # a small SentencePiece model fitted on the training texts, once per run
        tok = workdir / "tokenizer.model"
        if rank == 0 and not tok.exists():
            train_tokenizer(texts, tok, vocab_size=max(config.image_token_id - NUM_LOC - NUM_SEG, 260))
        dist.barrier()
    tokenizer = Tokenizer(tok, image_token_id=config.image_token_id)
    if tokenizer.seg_offset + NUM_SEG > config.image_token_id or config.image_token_id >= config.text.vocab_size:
        raise ConfigError(f"tokenizer {tok} does not fit preset {spec['preset']}'s vocabulary")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])  # build straight into dtype: no float32 copy of a large model
    try:
        model = build_on_meta(config).to_empty(device=device)
    finally:
        torch.set_default_dtype(prev)
    init_weights(model, seed)
    return model, tokenizer, None


@torch.no_grad()
def init_weights(model: PaliGemma, seed: int, std: float = 0.02) -> None:
    """Random init for training from scratch: N(0, std) matrices, zero biases, unit norms."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.zero_()  # Gemma stores scale - 1


def apply_lora(model: PaliGemma, lora: LoraSettings, base_source: str | None):
    """Wrap with peft LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    targets = lora.targets
    if isinstance(targets, list):  # tutorial-style names: restrict them to the language model
        targets = rf"language_model\..*\.({'|'.join(re.escape(t) for t in targets)})"
    else:
        targets = LORA_TARGETS.get(targets, targets)
    hit = [n for n, m in model.named_modules() if re.fullmatch(targets, n)]
    if not hit:
        raise ConfigError(f"lora.targets {lora.targets!r} matches no module")
    bad = [n for n in hit if not isinstance(model.get_submodule(n), nn.Linear) and "Linear4bit" not in
           type(model.get_submodule(n)).__name__]
    if bad:
        raise ConfigError(f"lora.targets must name linear layers; {bad[0]} is not one")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_source  # written to adapter_config.json
    return peft_model



def export_adapter(folder: Path) -> None:
    """Rename the adapters peft saved from palikit's model to transformers' module names
    (language_model.layers.0.self_attn.q_proj -> model.language_model.layers.0.self_attn.q_proj), and
    list them as target_modules, so that PeftModel.from_pretrained(PaliGemmaForConditionalGeneration
    .from_pretrained(base), folder) applies them; load_adapter reads them back into palikit."""
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    renamed = {}
    for key, tensor in tensors.items():
        name, rest = _adapter_module(key)
        renamed[_PEFT_PREFIX + palikit_to_transformers_module(name) + rest] = tensor
    atomic_write(folder / ADAPTER_WEIGHTS, lambda p: save_file(renamed, p, metadata={"format": "pt"}))
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config["target_modules"] = sorted({_adapter_module(k)[0] for k in renamed})
    write_text_atomic(folder / ADAPTER_CONFIG, json.dumps(config, indent=2))


def param_table(model: nn.Module) -> str:
    """Parameters and trainable parameters per top-level module, LoRA adapters counted in the module
    they sit in (all-linear puts some in the vision tower), and all adapters again on a row of their
    own, outside the total."""
    rows: dict[str, list[int]] = {}
    adapters = [0, 0]
    for name, p in model.named_parameters():
        name = name.removeprefix("base_model.model.")
        counts = [rows.setdefault(name.split(".")[0], [0, 0])] + ([adapters] if ".lora_" in name else [])
        for row in counts:
            row[0] += p.numel()
            row[1] += p.numel() if p.requires_grad else 0
    total = [sum(r[i] for r in rows.values()) for i in (0, 1)]
    lines = [f"{'module':<24}{'parameters':>15}{'trainable':>15}{'%':>8}"]
    shown = list(rows.items()) + [("total", total)] + ([("(lora adapters)", adapters)] if adapters[0] else [])
    for key, (n, t) in shown:
        lines.append(f"{key:<24}{n:>15,}{t:>15,}{100 * t / max(n, 1):>7.2f}%")
    return "\n".join(lines)
