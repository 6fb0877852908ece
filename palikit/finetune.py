"""Fine-tune PaliGemma / PaliGemma 2: the whole loop in one file, setup -> train -> save_checkpoint
-> cleanup, in the shape of torchtune's recipes and nanoGPT's train.py.

    palikit train configs/hf_lora.yaml --set lr=1e-4 --set lora.r=16   # one process
    palikit train configs/hf_lora.yaml --resume                         # continue after a kill
    torchrun --standalone --nproc_per_node=4 -m palikit.finetune configs/hf_lora.yaml   # DDP
    torchrun --standalone --nproc_per_node=4 -m palikit.finetune CONFIG --set distributed=fsdp

What happens, in order:
- the model: a checkpoint (anything palikit.load reads) or a preset with random weights;
- what trains: a `trainable` preset (all, llm-only, attention-only, projector+llm), or LoRA
  adapters (peft) on the language model only unless the targets say otherwise; QLoRA quantises
  the language model to 4 bits with bitsandbytes, on CUDA only, and fails loudly elsewhere;
- the data order: one seeded stream of epoch permutations, cut into global batches; step s is a
  pure function of s, so a resumed run sees exactly the examples it would have seen, and under
  torchrun each rank takes a disjoint slice of the same global batch;
- the loss (big_vision): next-token cross-entropy on suffix tokens and <eos> only, averaged per
  example, then over the batch; optional label smoothing;
- AdamW or plain SGD, linear warm-up then cosine/linear/constant, global-norm clipping;
- checkpoints written to a temporary folder and renamed, weights in safetensors (the released HF
  layout for full models, peft's adapter files for LoRA), optimizer state in safetensors + JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import types as types_module
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from .api import DTYPES, Pipeline, load
from .atomic import write_text_atomic
from .config import PaliGemmaConfig
from .data import Example, PaliGemmaDataset, StepSampler, load_examples, make_collate, task_word
from .gemma import RMSNorm
from .paligemma import PaliGemma
from .processor import Tokenizer, train_tokenizer
from .weights import build_on_meta, iter_safetensors, save_hf_folder, weight_files

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A training config that cannot run; the message says which field and why."""


# ---- config ------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0
    # A LORA_TARGETS preset; or a regex matched in full against module names (used as given, so it
    # may reach the vision tower); or a list of module-name endings such as [q_proj, v_proj], which
    # is applied to the language model only (tutorial lists otherwise also hit SigLIP's q/k/v).
    targets: str | list[str] = "llm"


@dataclass
class QuantSettings:
    """QLoRA: the language model's linear layers in 4 bits (bitsandbytes, CUDA only)."""

    bits: int = 4  # only 4 is supported
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # the 4-bit matmuls run in it
    double_quant: bool = True  # quantise the quantisation constants too (saves ~0.4 bit/param)


@dataclass
class TrainConfig:
    # What to train. A source for palikit.load (folder, .npz, hub id), or a dict:
    # {preset: NAME, tokenizer: PATH | "train", overrides: {text: {...}, vision: {...}}} for random
    # init ("train" fits a small SentencePiece model on the training texts), or
    # {source: ..., overrides: {text: {final_logit_softcap: null}}} (soft-cap / window fields only).
    model: str | dict = "google/paligemma2-3b-pt-224"
    # Data: a .jsonl / COCO .json file or a dataset folder (Roboflow or maestro layout), or
    # {path: ..., split: ..., task: detect|segment, codec: NPZ} (COCO), or
    # {synthetic: {n_images: N, seed: S, size: PX}} (palikit.synthetic, written under out_dir/data).
    train_file: str | dict = "data/train/annotations.jsonl"
    eval_file: str | dict | None = None
    out_dir: str = "runs/palikit"
    # Length: exactly one of steps / epochs (epochs are rounded up to whole steps).
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8  # examples per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1  # micro-batches per step on each rank: micro = batch_size / (ranks * grad_accum)
    # Optimizer: AdamW (torch: wd is multiplied by lr; big_vision's decoupled wd is not, so divide
    # its value by lr to compare), or plain SGD as in the big_vision colab. wd skips biases and norms.
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-5
    wd: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0  # SGD only
    warmup: float = 0.05  # < 1: a fraction of the steps; >= 1: a number of steps (linear from ~0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after the warm-up, down to 0
    clip_grad: float | None = 1.0  # global gradient norm; null = no clipping
    label_smoothing: float = 0.0
    # What trains without LoRA: a TRAINABLE preset. With `lora`, only the adapters train.
    trainable: Literal["all", "llm-only", "attention-only", "projector+llm"] = "all"
    lora: LoraSettings | None = None
    quantize: QuantSettings | None = None  # QLoRA (needs lora)
    # Precision: frozen weights are kept in `dtype`, trainable ones in `trainable_dtype` (float32
    # master weights, as the big_vision colab); `autocast` runs matmuls in bfloat16.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trainable_dtype: Literal["float32", "bfloat16"] = "float32"
    autocast: bool = False
    activation_checkpointing: bool = False
    max_text_len: int = 128  # text tokens (bos + prefix + sep + suffix + eos), as big_vision text_len
    seed: int = 0
    # Evaluation, logging, checkpoints (in steps; null = only at the end).
    eval_every: int | None = None
    eval_examples: int = 64  # how many eval examples get a greedy generation (exact match)
    eval_batch_size: int = 8
    eval_max_new_tokens: int = 128
    save_every: int | None = None
    keep_last: int = 2
    log_every: int = 1
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun; fsdp = FSDP2 fully_shard per layer
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 0  # DataLoader workers that read the images
    resume: bool = False  # continue from the newest checkpoint in out_dir
    stop_after: int | None = None  # end this run after this many steps, without saving (time slices)
    smoke: bool = False  # a few steps on a few examples: checks that a config runs, in seconds


TRAINABLE = {  # `trainable` preset -> regex over parameter names
    "all": r".*",
    "llm-only": r"language_model\..*",
    "attention-only": r"language_model\.layers\.\d+\.self_attn\..*",  # the big_vision colab
    "projector+llm": r"(multi_modal_projector|language_model)\..*",
}
_LLM_LINEAR = r"language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LORA_TARGETS = {  # preset -> regex over module names (peft matches it in full)
    "llm": _LLM_LINEAR,
    "llm-attention": r"language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    "llm+projector": rf"{_LLM_LINEAR}|multi_modal_projector\.linear",
    "all-linear": rf"{_LLM_LINEAR}|multi_modal_projector\.linear"
                  r"|vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])",
}


def load_config(config: str | Path | dict | TrainConfig, overrides: list[str] | tuple = ()) -> TrainConfig:
    """A YAML file (or dict) + `key=value` overrides (dotted keys for nested fields, values parsed
    as YAML: `lora.r=16`, `eval_file=null`) -> a validated TrainConfig."""
    if isinstance(config, TrainConfig):
        raw = dataclasses.asdict(config)
    elif isinstance(config, dict):
        raw = dict(config)
    else:
        text = Path(config).read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{config}: expected a YAML mapping of fields")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        *parents, leaf = key.strip().split(".")
        node = raw
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = yaml.safe_load(value)
    cfg = _from_dict(TrainConfig, raw, "")
    validate(cfg)
    return cfg


# transformers TrainingArguments names -> ours, for the error message.
_ALIASES = {"learning_rate": "lr", "weight_decay": "wd", "num_train_epochs": "epochs", "max_steps": "steps",
            "output_dir": "out_dir", "gradient_accumulation_steps": "grad_accum", "warmup_steps": "warmup",
            "max_grad_norm": "clip_grad", "lr_scheduler_type": "schedule", "bf16": "autocast"}


def _from_dict(cls, raw: dict, where: str):
    """Build a config dataclass from a dict: unknown keys get a suggestion, values are checked
    against the field types (and "3e-4", which YAML reads as a string, becomes a float)."""
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in hints]
    if unknown:
        def hint(k):
            close = [_ALIASES[k]] if k in _ALIASES else difflib.get_close_matches(k, hints, 1)
            return f" (did you mean {close[0]}?)" if close else ""
        msgs = [f"{where}{k}{hint(k)}" for k in unknown]
        raise ConfigError(f"unknown config field(s): {', '.join(msgs)}")
    return cls(**{k: _coerce(v, hints[k], where + k) for k, v in raw.items()})


def _coerce(value, hint, name: str):
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(map(str, typing.get_args(hint)))
            raise ConfigError(f"{name}={value!r}; expected one of {choices}")
        return value
    types = typing.get_args(hint) if isinstance(hint, types_module.UnionType) else (hint,)
    origins = tuple(typing.get_origin(t) or t for t in types)
    if value is None and type(None) in origins:
        return None
    for t in origins:
        if dataclasses.is_dataclass(t) and isinstance(value, (dict, t)):
            return value if isinstance(value, t) else _from_dict(t, value, name + ".")
    if float in origins and isinstance(value, (int, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            return value if int in origins and isinstance(value, int) else float(value)
    if tuple in origins and isinstance(value, list):
        return tuple(value)
    if isinstance(value, origins) and not (isinstance(value, bool) and bool not in origins):
        return value
    want = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in origins)
    raise ConfigError(f"{name} must be {want}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    if (cfg.steps is None) == (cfg.epochs is None):
        raise ConfigError("set exactly one of steps and epochs")
    if (cfg.steps or 1) < 1 or (cfg.epochs or 1) <= 0 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError("steps, epochs, batch_size and grad_accum must be positive")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"batch_size={cfg.batch_size} is not a multiple of grad_accum={cfg.grad_accum}")
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"label_smoothing={cfg.label_smoothing} must be in [0, 1)")
    if cfg.warmup < 0 or cfg.lr <= 0 or cfg.keep_last < 1 or cfg.max_text_len < 4 or cfg.stop_after == 0:
        raise ConfigError("warmup must be >= 0, lr > 0, keep_last >= 1, max_text_len >= 4, stop_after > 0")
    if cfg.lora is not None:
        if cfg.lora.r < 1:
            raise ConfigError(f"lora.r={cfg.lora.r} must be >= 1")
        if isinstance(cfg.lora.targets, str) and cfg.lora.targets not in LORA_TARGETS:
            try:
                re.compile(cfg.lora.targets)
            except re.error as e:
                raise ConfigError(f"lora.targets {cfg.lora.targets!r} is neither a preset "
                                  f"({', '.join(LORA_TARGETS)}) nor a regex: {e}") from e
        if cfg.trainable != "all":
            raise ConfigError("with lora, only the adapters train: leave `trainable` out")
    if cfg.quantize is not None:
        q = cfg.quantize
        if cfg.lora is None:
            raise ConfigError("quantize (QLoRA) trains LoRA adapters on a 4-bit model: add a `lora` section")
        if q.bits != 4:
            raise ConfigError(f"quantize.bits={q.bits}: only 4-bit (QLoRA) is supported")
    mixed = cfg.lora is None and cfg.trainable != "all" and cfg.dtype != cfg.trainable_dtype
    if mixed and not cfg.autocast:
        raise ConfigError(f"dtype={cfg.dtype} (frozen) with trainable_dtype={cfg.trainable_dtype} mixes "
                          "weight dtypes in one layer: set autocast: true")
    if cfg.autocast and cfg.dtype == "float16":
        raise ConfigError("autocast runs in bfloat16; float16 weights with it are not supported")


def apply_smoke(cfg: TrainConfig, world: int) -> TrainConfig:
    """big_vision's `runlocal`: the same recipe, a few steps on a few examples."""
    return dataclasses.replace(cfg, steps=2, epochs=None, batch_size=world * cfg.grad_accum,
                               eval_every=None, save_every=None, eval_examples=2, eval_batch_size=2,
                               eval_max_new_tokens=4, keep_last=1, warmup=0.0)


# ---- loss ----------------------------------------------------------------------------------------


def loss_fn(outputs: torch.Tensor, batch: dict, label_smoothing: float = 0.0, head=None,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on the suffix (big_vision, spec §2.3).

    outputs: hidden states (B, L, D) with `head` (e.g. model.logits), which is then applied only
    at the target positions (V is 257k: full logits of a batch would be gigabytes), or logits
    (B, L, V). Position t predicts token t+1, where loss_mask[:, 1:] is 1 (suffix and <eos>).
    Each example's loss is the mean over its targets; the result is the mean over examples
    (reduction="none": the (B,) per-example losses). Label smoothing puts 1 - eps on the true
    token and eps / (V - 1) on every other.
    """
    targets = batch["loss_mask"][:, 1:].bool()  # (B, L-1)
    x = outputs[:, :-1][targets]  # (T, D) or (T, V), T = targets in the batch
    logits = (head(x) if head is not None else x).float()
    labels = batch["ids"][:, 1:][targets]
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, labels[:, None])[:, 0]  # (T,)
    if label_smoothing:
        V = logits.shape[-1]
        others = -logp.sum(-1) - nll  # sum of -log p over the V - 1 wrong tokens
        nll = (1 - label_smoothing) * nll + label_smoothing / (V - 1) * others
    rows = targets.nonzero()[:, 0]
    per_example = torch.zeros(targets.shape[0], device=nll.device).index_add_(0, rows, nll)
    per_example = per_example / targets.sum(1).clamp(min=1)
    return per_example if reduction == "none" else per_example.mean()


class LossModule(nn.Module):
    """What DDP / FSDP wrap: a batch -> per-example losses (B,), so the output head runs inside
    the wrapped forward (FSDP gathers the tied embedding there)."""

    def __init__(self, model: nn.Module, label_smoothing: float):
        super().__init__()
        self.model = model  # PaliGemma, or the peft model around it
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.model(batch["ids"], batch["pixels"], batch["input_mask"], batch["mask_ar"])
        return loss_fn(hidden, batch, self.label_smoothing, head=self.model.logits, reduction="none")


# ---- model ---------------------------------------------------------------------------------------


def build_model(spec: str | dict, dtype: torch.dtype, device, seed: int, texts, workdir: Path,
                rank: int = 0) -> tuple[PaliGemma, Tokenizer]:
    """The model and tokenizer named by the config's `model` field (see TrainConfig)."""
    if isinstance(spec, str):
        spec = {"source": spec}
    unknown = set(spec) - {"source", "preset", "tokenizer", "overrides"}
    if unknown or ("source" in spec) == ("preset" in spec):
        raise ConfigError("model must be a checkpoint source or {source|preset, tokenizer, overrides}; "
                          f"got {spec}")
    overrides = dict(spec.get("overrides") or {})
    if "source" in spec:
        pipe = load(spec["source"], dtype=dtype, device=str(device), tokenizer=spec.get("tokenizer"))
        runtime = {"final_logit_softcap", "attn_logit_softcap", "sliding_window"}
        for key, value in (overrides.pop("text", None) or {}).items():
            if key not in runtime:
                raise ConfigError(f"model.overrides.text.{key}: on a checkpoint only {sorted(runtime)} "
                                  "can change")
            setattr(pipe.model.config.text, key, value)  # every layer shares this config object
        if overrides:
            raise ConfigError(f"model.overrides: on a checkpoint only `text` fields can change, "
                              f"got {list(overrides)}")
        return pipe.model, pipe.tokenizer
    config = PaliGemmaConfig.from_name(spec["preset"], **overrides)
    tok = spec.get("tokenizer")
    if tok is None:
        raise ConfigError("a preset model needs model.tokenizer: a tokenizer.model path, or 'train'")
    if tok == "train":  # a small SentencePiece model fitted on the training texts, once per run
        tok = workdir / "tokenizer.model"
        if rank == 0 and not tok.exists():
            train_tokenizer(texts, tok, vocab_size=max(config.image_token_id - 1024 - 128, 260))
        barrier()
    tokenizer = Tokenizer(tok, image_token_id=config.image_token_id)
    if tokenizer.seg_offset + 128 > config.image_token_id or config.image_token_id >= config.text.vocab_size:
        raise ConfigError(f"tokenizer {tok} does not fit preset {spec['preset']}'s vocabulary")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight into dtype: no float32 copy of a large model
    try:
        model = build_on_meta(config).to_empty(device=device)
    finally:
        torch.set_default_dtype(prev)
    init_weights(model, seed)
    return model, tokenizer


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
    """Swap the language model's linear layers for bitsandbytes 4-bit ones (QLoRA) and check that
    every one really is quantised. Raises rather than training unquantised weights."""
    bnb = require_bitsandbytes(device)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(_LLM_LINEAR, n)]
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


def param_table(model: nn.Module) -> str:
    """Parameters and trainable parameters per top-level module, LoRA adapters apart."""
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        name = name.removeprefix("base_model.model.")
        key = "lora adapters" if ".lora_" in name else name.split(".")[0]
        row = rows.setdefault(key, [0, 0])
        row[0] += p.numel()
        row[1] += p.numel() if p.requires_grad else 0
    total = [sum(r[i] for r in rows.values()) for i in (0, 1)]
    lines = [f"{'module':<24}{'parameters':>15}{'trainable':>15}{'%':>8}"]
    for key, (n, t) in list(rows.items()) + [("total", total)]:
        lines.append(f"{key:<24}{n:>15,}{t:>15,}{100 * t / max(n, 1):>7.2f}%")
    return "\n".join(lines)


# ---- data ------------------------------------------------------------------------------------------


def read_split(spec, workdir: Path, split: str, rank: int) -> list[Example]:
    """Examples of a config data field: a path, {path, split, task, codec} or {synthetic: {...}}."""
    if isinstance(spec, dict) and "synthetic" in spec:
        from .synthetic import generate_dataset

        s = dict(spec["synthetic"])
        path = workdir / "data" / f"{split}.jsonl"
        if rank == 0 and not path.exists():
            generate_dataset(workdir / "data", s.pop("n_images"), s.pop("seed", 0), split_name=split, **s)
        barrier()
        return load_examples(path)
    if isinstance(spec, dict):
        return load_examples(spec["path"], spec.get("split", split), spec.get("task", "detect"),
                             spec.get("codec"))
    return load_examples(spec, split)


# ---- distributed ---------------------------------------------------------------------------------


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when started by torchrun."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is available")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            # gloo beside nccl: all_sum reduces small CPU tensors (losses, counts), which nccl cannot.
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, torch.device("cuda" if cuda else "cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(*values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---- logging -------------------------------------------------------------------------------------


class MetricLog:
    """metrics.jsonl (one JSON object per line) always; TensorBoard as well when installed."""

    def __init__(self, out_dir: Path, resume_step: int):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():  # drop rows a killed run wrote after its last checkpoint
            rows = [r for r in self.path.read_text().splitlines() if json.loads(r)["step"] <= resume_step]
            write_text_atomic(self.path, "".join(r + "\n" for r in rows))
        self.file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(out_dir / "tensorboard", purge_step=resume_step + 1)
        except ImportError:
            self.tb = None

    def write(self, step: int, **values) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()


# ---- the recipe ----------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.setup()

    def setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world, self.device = init_distributed(cfg.device)
        if cfg.smoke:
            self.cfg = cfg = apply_smoke(cfg, self.world)
        if cfg.quantize is not None:
            require_bitsandbytes(self.device)  # before any work: never train unquantised by accident
        self.out = Path(cfg.out_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        ckpt = latest_checkpoint(self.out)
        if ckpt and not cfg.resume:
            raise ConfigError(f"{self.out} holds checkpoints of an earlier run ({ckpt.name}): resume it "
                              "(--resume) or choose another out_dir")

        # Data first: a preset model may fit its tokenizer on the training texts.
        train_examples = read_split(cfg.train_file, self.out, "train", self.rank)
        eval_examples = read_split(cfg.eval_file, self.out, "valid", self.rank) if cfg.eval_file else []
        if cfg.smoke:
            train_examples, eval_examples = train_examples[:8], eval_examples[:4]
        if not train_examples:
            raise ConfigError(f"no training examples in {cfg.train_file}")

        # The model: identical on every rank (same seed), frozen parts in cfg.dtype.
        torch.manual_seed(cfg.seed)
        texts = [t for ex in train_examples for t in (ex.prefix, ex.suffix)]
        core, self.tokenizer = build_model(cfg.model, DTYPES[cfg.dtype], self.device, cfg.seed, texts,
                                           self.out, self.rank)
        self.core = core
        core.requires_grad_(False)
        if cfg.lora is not None:
            self.base_source = self._save_base(core)
            if cfg.quantize is not None:
                n = quantize_4bit(core, cfg.quantize, self.device)
                log.info("QLoRA: %d linear layers of the language model quantised to 4 bits", n)
            model = apply_lora(core, cfg.lora, self.base_source)  # adapters trainable, float32
        else:
            model = core
            pattern = TRAINABLE[cfg.trainable]
            for name, p in core.named_parameters():
                if re.fullmatch(pattern, name):
                    p.requires_grad_(True)
                    p.data = p.data.to(DTYPES[cfg.trainable_dtype])
        self.lora = cfg.lora is not None
        core.vision_tower.gradient_checkpointing = cfg.activation_checkpointing
        core.language_model.gradient_checkpointing = cfg.activation_checkpointing
        if self.rank == 0:
            resolved = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
            log.info("config:\n%s", resolved)
            log.info("parameters:\n%s", param_table(model))
            write_text_atomic(self.out / "config.yaml", resolved)

        # Wrapping: DDP or FSDP2 under torchrun. The loss runs inside the wrapped forward.
        self.loss_module = LossModule(model, cfg.label_smoothing)
        self.wrapped: nn.Module = self.loss_module
        if self.world > 1 and cfg.distributed == "ddp":
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        elif self.world > 1:
            from torch.distributed.fsdp import fully_shard

            if len({p.dtype for p in model.parameters()}) > 1:
                raise ConfigError("FSDP shards layers of one weight dtype: use dtype = trainable_dtype")
            for layer in [*core.vision_tower.encoder.layers, *core.language_model.layers]:
                fully_shard(layer)
            fully_shard(self.loss_module)

        # Optimizer: weight decay on matrices only (not on biases and norm scales).
        params = [p for p in self.loss_module.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.wd},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        self.params = params

        # Data loading: the step sampler decides the order; workers only read images.
        n_image = core.config.num_image_tokens
        self.train_set = PaliGemmaDataset(train_examples, self.tokenizer, n_image, cfg.max_text_len)
        self.eval_set = PaliGemmaDataset(eval_examples, self.tokenizer, n_image, cfg.max_text_len)
        self.collate = make_collate(self.tokenizer, core.config)
        self.total_steps = cfg.steps or math.ceil(cfg.epochs * len(self.train_set) / cfg.batch_size)
        self.warmup_steps = round(cfg.warmup * self.total_steps) if cfg.warmup < 1 else int(cfg.warmup)
        self.step = 0
        if cfg.resume and ckpt is not None:
            self.load_checkpoint(ckpt)
        else:
            torch.manual_seed(cfg.seed + self.rank)  # dropout differs per rank
        self.sampler = StepSampler(len(self.train_set), cfg.batch_size, cfg.grad_accum, self.rank, self.world,
                                   cfg.seed, self.step)
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_sampler=self.sampler, collate_fn=self.collate, num_workers=cfg.num_workers,
            generator=torch.Generator())  # its own generator: iterating must not consume the global RNG
        self.metrics = MetricLog(self.out, self.step) if self.rank == 0 else None
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast)
        self.saved_step = self.step if ckpt is not None and cfg.resume else -1

    def _save_base(self, core: PaliGemma) -> str:
        """Where LoRA's base weights come from; a random-init base is written once to out_dir/base."""
        spec = self.cfg.model
        if isinstance(spec, str):
            return spec
        if "source" in spec:
            return spec["source"]
        base = self.out / "base"
        if self.rank == 0 and not (base / "config.json").exists():
            _save_folder(base, lambda p: Pipeline(core, self.tokenizer).save(p))
        barrier()
        return str(base.resolve())

    def lr_at(self, step: int) -> float:
        """Linear warm-up from lr/warmup to lr, then decay to 0 over the remaining steps."""
        if step < self.warmup_steps:
            return self.cfg.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
        return self.cfg.lr * decay[self.cfg.schedule]

    def train(self) -> dict:
        cfg = self.cfg
        end = min(self.total_steps, self.step + (cfg.stop_after or self.total_steps))
        batches = iter(self.loader)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0, desc="train",
                   dynamic_ncols=True)
        self.wrapped.train()
        last: dict = {}
        while self.step < end:
            t0 = time.perf_counter()
            lr = self.lr_at(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum, tokens = torch.zeros((), dtype=torch.float64), 0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
                with self._grad_sync(micro == cfg.grad_accum - 1), self.autocast:
                    per_example = self.wrapped(batch)
                    # Sum of per-example means / global batch; DDP and FSDP average over ranks.
                    loss = per_example.sum() * (self.world / cfg.batch_size)
                loss.backward()
                loss_sum += per_example.detach().double().sum().cpu()
                tokens += int(batch["input_mask"].sum())
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad or float("inf"))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            loss_total, tokens_total = all_sum(float(loss_sum), tokens)
            last = {"loss": loss_total / cfg.batch_size, "lr": lr,
                    "grad_norm": float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm),
                    "examples_per_s": cfg.batch_size / (time.perf_counter() - t0),
                    "tokens_per_s": tokens_total / (time.perf_counter() - t0),
                    "epoch": self.step * cfg.batch_size / len(self.train_set)}
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
            if self.metrics and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                self.metrics.write(self.step, **last)
            done = self.step == self.total_steps
            if self.eval_set.examples and ((cfg.eval_every and self.step % cfg.eval_every == 0) or done):
                last |= self.evaluate()
            if (cfg.save_every and self.step % cfg.save_every == 0) or done:
                self.save_checkpoint()
        bar.close()
        if self.step == self.total_steps:
            self.save_final()
        return {"step": self.step, "out_dir": str(self.out), **last}

    def _grad_sync(self, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if isinstance(self.wrapped, nn.parallel.DistributedDataParallel) and not sync:
            return self.wrapped.no_sync()
        if hasattr(self.wrapped, "set_requires_gradient_sync"):  # FSDP2
            self.wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Eval loss over the eval set (sharded over ranks) and exact match of greedy generations."""
        cfg = self.cfg
        module = self.loss_module  # not the DDP wrapper: no collectives in an eval forward
        module.eval()
        mine = list(range(self.rank, len(self.eval_set), self.world))
        n_batches = math.ceil(math.ceil(len(self.eval_set) / self.world) / cfg.eval_batch_size)
        total = 0.0
        for b in range(n_batches):  # the same number of forwards on every rank (FSDP gathers in them)
            chunk = mine[b * cfg.eval_batch_size:(b + 1) * cfg.eval_batch_size]
            batch = self.collate([self.eval_set[i] for i in chunk or [0]])
            with self.autocast:
                per_example = module({k: v.to(self.device) for k, v in batch.items()})
            total += float(per_example.sum()) if chunk else 0.0
        out = {"eval_loss": all_sum(total)[0] / len(self.eval_set)}
        sharded = self.world > 1 and cfg.distributed == "fsdp"
        if self.rank == 0 and not sharded and cfg.eval_examples:
            examples = self.eval_set.examples[:cfg.eval_examples]
            longest = max(sum(e.loss_mask) for e in self.eval_set.encoded[:len(examples)])
            pipe = Pipeline(self.core, self.tokenizer)
            with self.autocast:
                texts = pipe.generate([list(ex.images) for ex in examples], [ex.prefix for ex in examples],
                                      max_new_tokens=min(longest, cfg.eval_max_new_tokens),
                                      batch_size=cfg.eval_batch_size)
            hits = [t.strip() == ex.suffix.strip() for t, ex in zip(texts, examples)]
            out["exact_match"] = sum(hits) / len(examples)
            by_task = {}  # by the prompt's first word (caption, answer, ocr, detect, ...)
            for hit, ex in zip(hits, examples):
                by_task.setdefault(task_word(ex.prefix) or "-", []).append(hit)
            if len(by_task) > 1:
                out |= {f"exact_match/{task}": sum(h) / len(h) for task, h in sorted(by_task.items())}
        barrier()
        module.train()
        if self.metrics:
            self.metrics.write(self.step, **out)
            log.info("step %d: %s", self.step, " ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    # ---- checkpoints ----

    def save_checkpoint(self) -> None:
        """out_dir/step-NNNNNN/: model/ (full, HF layout) or adapter/ (peft), optimizer.safetensors +
        optimizer.json, rng-rankR.safetensors, state.json. Written to a temporary folder first and
        renamed, so a kill leaves either the old checkpoints or the complete new one."""
        if self.saved_step == self.step:
            return
        name = f"step-{self.step:06d}"
        tmp = self.out / f".{name}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        _save_rng(tmp / f"rng-rank{self.rank}.safetensors")
        # Full (unsharded) state on rank 0; collective under FSDP, so every rank takes part.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.lora)
        model_state = get_model_state_dict(self.loss_module, options=options)
        optim_state = get_optimizer_state_dict(self.loss_module, self.optimizer, options=options)
        barrier()  # every rank's RNG file is in tmp before rank 0 renames it (DDP has no collective above)
        if self.rank == 0:
            state = {k.removeprefix("model."): v for k, v in model_state.items()}
            if self.lora:
                self.loss_module.model.save_pretrained(tmp / "adapter", state_dict=state)
            else:
                model = build_on_meta(self.core.config)
                model.load_state_dict(state, assign=True)
                save_hf_folder(model, tmp / "model")
                shutil.copy(self.tokenizer.path, tmp / "model" / "tokenizer.model")
            _save_optimizer(optim_state, tmp)
            epoch, position = divmod(self.step * self.cfg.batch_size, len(self.train_set))
            write_text_atomic(tmp / "state.json", json.dumps({
                "step": self.step, "epoch": epoch, "position": position, "world_size": self.world,
                "lora": self.lora, "config": dataclasses.asdict(self.cfg)}, indent=2))
            final = self.out / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(self.out.glob("step-*"))[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        self.saved_step = self.step

    def load_checkpoint(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        if state["lora"] != self.lora:
            raise ConfigError(f"{ckpt} was {'' if state['lora'] else 'not '}trained with LoRA; "
                              "this config differs")
        if self.lora:  # peft's file names -> our module's (adapter name back in)
            tensors = load_file(ckpt / "adapter" / "adapter_model.safetensors")
            weights = {"model." + re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k): v
                       for k, v in tensors.items()}
        else:
            files = weight_files(ckpt / "model")
            weights = {"model." + k: v for k, v in iter_safetensors(files, self.core.config.version)}
        trainable = {n for n, p in self.loss_module.named_parameters() if p.requires_grad}
        if missing := trainable - set(weights):
            raise ConfigError(f"{ckpt} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
        set_model_state_dict(self.loss_module, weights, options=StateDictOptions(full_state_dict=True,
                                                                                   strict=False))
        set_optimizer_state_dict(self.loss_module, self.optimizer, _load_optimizer(ckpt),
                                 options=StateDictOptions(full_state_dict=True))
        self.step = state["step"]
        before, now = state["config"], dataclasses.asdict(self.cfg)
        order = ("train_file", "batch_size", "seed", "steps", "epochs", "lr", "schedule", "warmup")
        changed = [k for k in order if before.get(k) != now[k]]
        if changed and self.rank == 0:
            log.warning("resuming %s with changed %s: the run will not match an uninterrupted one", ckpt,
                        ", ".join(f"{k} ({before.get(k)!r} -> {now[k]!r})" for k in changed))
        rng = ckpt / f"rng-rank{self.rank}.safetensors"
        if state["world_size"] == self.world and rng.exists():
            _load_rng(rng)
        else:
            log.warning("%s was written by %d ranks, this run has %d: random streams (dropout) restart",
                        ckpt, state["world_size"], self.world)
            torch.manual_seed(self.cfg.seed + self.rank + self.step)
        if self.rank == 0:
            for tmp in self.out.glob(".step-*.tmp"):  # left by a kill during a save
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("resumed from %s: step %d, epoch %d, position %d", ckpt, self.step, state["epoch"],
                     state["position"])

    def save_final(self) -> None:
        """out_dir/final: the model (or adapter) of the last step plus tokenizer, as hard links."""
        if self.rank == 0:
            src = self.out / f"step-{self.step:06d}" / ("adapter" if self.lora else "model")

            def link(folder: Path) -> None:
                shutil.copytree(src, folder, copy_function=_link_or_copy)
                shutil.copy(self.tokenizer.path, folder / "tokenizer.model")

            _save_folder(self.out / "final", link)
        barrier()

    def cleanup(self) -> None:
        if self.metrics:
            self.metrics.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted(p for p in out_dir.glob("step-*") if re.fullmatch(r"step-\d+", p.name)
                   and (p / "state.json").exists())
    return steps[-1] if steps else None


def _save_folder(path: Path, write) -> None:
    """write(tmp_folder), then rename it to `path` (replacing what was there)."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of the weights on disk
    except OSError:  # file systems without hard links
        shutil.copy2(src, dst)


def _save_optimizer(state: dict, folder: Path) -> None:
    """Optimizer state as safetensors (tensors, keyed `param/name`) + JSON (everything else)."""
    tensors, rest = {}, {}
    for param, values in state["state"].items():
        for k, v in values.items():
            if torch.is_tensor(v):
                tensors[f"{param}/{k}"] = v.detach().cpu().contiguous()
            else:
                rest.setdefault(param, {})[k] = v
    save_file(tensors, folder / "optimizer.safetensors")
    meta = {"param_groups": state["param_groups"], "state": rest}
    write_text_atomic(folder / "optimizer.json", json.dumps(meta))


def _load_optimizer(folder: Path) -> dict:
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict = {k: dict(v) for k, v in meta["state"].items()}
    for key, tensor in load_file(folder / "optimizer.safetensors").items():
        param, _, name = key.rpartition("/")
        state.setdefault(param, {})[name] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


def _save_rng(path: Path) -> None:
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"python": json.dumps(random.getstate()), "numpy": json.dumps(list(np_state[2:]))}
    save_file(tensors, path, metadata=meta)


def _load_rng(path: Path) -> None:
    from safetensors import safe_open

    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


# ---- entry points --------------------------------------------------------------------------------


def train(config: str | Path | dict | TrainConfig, overrides: list[str] | tuple = (), resume: bool = False,
          smoke: bool = False) -> dict:
    """Run a training config (YAML path, dict or TrainConfig) with `key=value` overrides.

    Under torchrun every rank calls this; rank 0 writes checkpoints and logs. Returns the last
    step's metrics and the output folder.
    """
    cfg = load_config(config, overrides)
    cfg = dataclasses.replace(cfg, resume=cfg.resume or resume, smoke=cfg.smoke or smoke)
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.cleanup()


def merge(base_source: str | Path, adapter_dir: str | Path, out_dir: str | Path,
          dtype: str = "float32") -> Path:
    """Merge LoRA adapters into their base model and save a full checkpoint (palikit/HF layout).

    The merge runs in `dtype` (float32 by default: merging into bfloat16 weights rounds twice).
    """
    from peft import PeftModel

    pipe = load(base_source, dtype=dtype)
    model = PeftModel.from_pretrained(pipe.model, str(adapter_dir)).merge_and_unload()
    tok = Path(adapter_dir) / "tokenizer.model"
    tokenizer = Tokenizer(tok, image_token_id=model.config.image_token_id) if tok.exists() else pipe.tokenizer
    _save_folder(Path(out_dir), lambda p: Pipeline(model, tokenizer).save(p))
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    """`python -m palikit.finetune CONFIG [--set k=v ...] [--resume] [--smoke]` (torchrun-friendly)."""
    ap = argparse.ArgumentParser(prog="palikit.finetune", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="palikit: %(message)s")
    result = train(args.config, args.overrides, resume=args.resume, smoke=args.smoke)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
