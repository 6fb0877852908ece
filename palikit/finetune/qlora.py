"""QLoRA (Dettmers et al. 2023): LoRA adapters trained on a language model whose linear layers are
frozen in 4 bits, by bitsandbytes, on CUDA only. Anything else fails loudly rather than training
unquantised weights."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..options import DTYPES
from ..paligemma import LLM_LINEAR, PaliGemma
from .config import ConfigError, QuantSettings


def require_bitsandbytes(device: torch.device):
    if device.type != "cuda":
        raise ConfigError(f"quantize (QLoRA) needs a CUDA GPU and this run is on {device}; remove the "
                          "`quantize` section to train LoRA on unquantised weights")
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError("quantize (QLoRA) needs bitsandbytes: pip install bitsandbytes") from e
    return bitsandbytes


def quantize_4bit(model: PaliGemma, q: QuantSettings, device: torch.device) -> int:
    """Swap the language model's linear layers for bitsandbytes 4-bit ones and check that every one
    really is quantised. Raises rather than training unquantised weights."""
    bnb = require_bitsandbytes(device)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(LLM_LINEAR, n)]
    for name in names:
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=DTYPES[q.compute_dtype], compress_statistics=q.double_quant,
                                quant_type=q.quant_type, device="cpu")
        new.weight = bnb.nn.Params4bit(old.weight.data.cpu(), requires_grad=False,
                                       compress_statistics=q.double_quant, quant_type=q.quant_type)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new.to(device))  # quantised by the move to CUDA
    failed = [n for n in names if getattr(model.get_submodule(n).weight, "quant_state", None) is None]
    if failed or not names:
        raise RuntimeError(f"bitsandbytes left {len(failed)} of {len(names)} layers unquantised "
                           f"({failed[:3]})")
    return len(names)
