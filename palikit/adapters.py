"""LoRA adapters (peft's folders: adapter_config.json, adapter_model.safetensors) read onto
palikit's model: for `palikit merge`, for resuming, and for serving a fine-tune without merging it
(`palikit.load(base, adapter=DIR)`, or the adapter folder itself as the model). Written by
palikit.finetune (under transformers' module names, so transformers + peft read them too) or by
transformers + peft directly. peft comes with the train extra."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .paligemma import PaliGemma
from .processor import InputError
from .weights import CheckpointError, hf_to_palikit, palikit_to_transformers_module

# peft's adapter files: adapter_model.safetensors keys "base_model.model.<module>.lora_A.weight".
_PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _adapter_module(key: str) -> tuple[str, str]:
    """(module name, the rest) of a peft adapter key."""
    name, sep, rest = key.removeprefix(_PEFT_PREFIX).partition(".lora_")
    return name, sep + rest


TRAINED_WITH = "palikit_trained_with.json"  # text config fields the adapters were trained with (no cap)


def is_adapter_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def base_of(folder: str | Path) -> str:
    """The base model an adapter folder names (peft's base_model_name_or_path)."""
    base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise InputError(f"{folder}: the adapter does not name its base model (base_model_name_or_path in "
                         f"{ADAPTER_CONFIG}); pass it: palikit.load(BASE, adapter=...), --model BASE --adapter ...")
    return base


def trained_with(folder: str | Path) -> dict | None:
    """The text config fields to load the base with for these adapters (see TRAINED_WITH)."""
    path = Path(folder) / TRAINED_WITH
    return json.loads(path.read_text()) if path.exists() else None


def adapter_state(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter's tensors under palikit's module names (peft's keys, without the adapter name):
    saved by palikit, or trained with transformers + peft (transformers 5 or older names)."""
    out = {}
    for key, tensor in load_file(folder / ADAPTER_WEIGHTS).items():
        name, rest = _adapter_module(key)
        out[_PEFT_PREFIX + hf_to_palikit(name, 2) + rest] = tensor
    return out


def load_adapter(model: PaliGemma, folder: str | Path):
    """peft LoRA adapters from `folder` on palikit's model -> the PeftModel. The adapters' targets
    are matched as peft matches them, against transformers' names of palikit's linear layers."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import check_target_module_exists

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).exists() or not (folder / ADAPTER_WEIGHTS).exists():
        raise CheckpointError(f"{folder} is not a peft adapter folder (no {ADAPTER_CONFIG} / {ADAPTER_WEIGHTS})")
    config = PeftConfig.from_pretrained(str(folder))
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = [n for n in linear if check_target_module_exists(config, palikit_to_transformers_module(n))]
    if not targets:
        raise CheckpointError(f"{folder}: the adapter's target_modules {config.target_modules!r} match no layer")
    config.target_modules = targets
    peft_model = get_peft_model(model, config)
    state = adapter_state(folder)
    own = peft_model.state_dict()
    for key, tensor in state.items():  # an adapter of another base: one line, not torch's list
        mine = own.get(re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", key))
        if mine is not None and mine.shape != tensor.shape:
            raise CheckpointError(f"{folder} does not fit this base model: {_adapter_module(key)[0]} "
                                  f"{key.rsplit('.', 2)[-2]} is {tuple(tensor.shape)} in the adapter, "
                                  f"{tuple(mine.shape)} here (an adapter trained on another base?)")
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise CheckpointError(f"{folder}: adapter tensors for no layer here, e.g. {result.unexpected_keys[0]}")
    return peft_model




def merged(model: PaliGemma, folder: str | Path) -> PaliGemma:
    """`model` with the adapters of `folder` merged into its weights (W + B A * alpha / r)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise InputError("LoRA adapters need peft: pip install 'palikit[train]'") from None
    return load_adapter(model, folder).merge_and_unload()
