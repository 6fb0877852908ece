"""Weight quantisation, its one home in palikit: the settings and the bitsandbytes 4-bit swap that
QLoRA trains on (CUDA only; anything else fails loudly rather than training unquantised weights).
palikit.finetune uses it; it imports nothing of palikit.finetune.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .api import DTYPES
from .paligemma import PaliGemma


class QuantizeError(ValueError):
    """Quantisation that cannot run here (no CUDA GPU, no bitsandbytes); the message says what to do."""


@dataclass
class QuantSettings:
    """QLoRA: the language model's linear layers in 4 bits (bitsandbytes, CUDA only)."""

    bits: int = 4  # only 4 is supported
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # the 4-bit matmuls run in it
    double_quant: bool = True  # quantise the quantisation constants too (saves ~0.4 bit/param)


def require_bitsandbytes(device: torch.device):
    if device.type != "cuda":
        raise QuantizeError(f"quantize (QLoRA) needs a CUDA GPU and this run is on {device}; remove the "
                            "`quantize` section to train LoRA on unquantised weights")
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizeError("quantize (QLoRA) needs bitsandbytes: pip install bitsandbytes") from e
    return bitsandbytes


def quantize_4bit(model: PaliGemma, q: QuantSettings, device: torch.device, modules: str) -> int:
    """Swap the linear layers named by `modules` (a regex matched in full; QLoRA: the language
    model's) for bitsandbytes 4-bit ones and check that every one really is quantised. Raises
    rather than training unquantised weights."""
    bnb = require_bitsandbytes(device)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(modules, n)]
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
