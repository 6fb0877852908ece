"""Training configs: the TrainConfig, LoraSettings and QuantSettings dataclasses (DataSpec is
palikit.data's), the presets of what trains (TRAINABLE, LORA_TARGETS), and the engine that
builds them from YAML + `key=value` overrides, checking every value against its field's type, with
one-line errors (ConfigError).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import tempfile
import types as types_module
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ..data import DataSpec
from ..paligemma import LLM_LINEAR, VISION_LINEAR


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
    """QLoRA (palikit.finetune.qlora): the language model's linear layers in 4 bits (bitsandbytes, CUDA)."""

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
    # Data (a DataSpec): a .jsonl / COCO .json file or a dataset folder (Roboflow or maestro layout),
    # or {path: ..., split: ..., task: detect|segment, codec: NPZ} (COCO), or
    # {synthetic: {n_images: N, seed: S, size: PX}} (palikit.synthetic, written under out_dir/data).
    train_file: DataSpec = field(default_factory=lambda: DataSpec("data/train/annotations.jsonl"))
    eval_file: DataSpec | None = None
    # Train even when the data has errors `palikit data check` reports (missing images, loc tokens
    # out of range); by default the run refuses to start, before the model loads.
    allow_data_errors: bool = False
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
    # PaliGemma 2's final logit soft-cap in training. "off": the loss, validation and the saved model
    # (config.json final_logit_softcapping: null) go without it, as big_vision trains (its loss takes
    # uncapped pre-logits, trainers/proj/paligemma/train.py) and as its transfer configs and colab run
    # (final_logits_softcap=0.0). "keep": every logit capped, as transformers' forward trains.
    final_logit_softcap: Literal["off", "keep"] = "off"
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
    eval_examples: int = 64  # how many eval examples get a greedy generation, scored by the task metric
    # The metric of those generations (a palikit.metrics name, e.g. cider, vqa_accuracy, anls); null:
    # each example's task word picks it, as `palikit eval` does (TaskSpec.eval_metrics).
    eval_metric: str | None = None
    # A logged validation number (cider/caption, accuracy/answer, acc50/detect, exact_match,
    # eval_loss, ...): the checkpoint of its best evaluation is kept as out_dir/best (lowest for a
    # loss, highest otherwise). early_stopping: stop after this many evaluations without a new best.
    keep_best: str | None = None
    early_stopping: int | None = None
    eval_batch_size: int = 8
    eval_max_new_tokens: int = 128
    save_every: int | None = None
    keep_last: int = 2
    log_every: int = 1
    # Where the logged numbers go besides out_dir/metrics.jsonl: tensorboard (out_dir/tensorboard),
    # wandb (project $WANDB_PROJECT or "palikit"; WANDB_MODE=offline works without network),
    # mlflow ($MLFLOW_TRACKING_URI, default out_dir/mlflow.db). A resumed run logs to the same run.
    log_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun; fsdp = FSDP2 fully_shard per layer
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 0  # DataLoader workers that read the images
    resume: bool = False  # continue from the newest checkpoint in out_dir
    resume_from: str | None = None  # with resume: this checkpoint folder (e.g. out_dir/step-000100) instead
    stop_after: int | None = None  # end this run after this many steps, without saving (time slices)
    smoke: bool = False  # a few steps on a few examples: checks that a config runs, in seconds


LOGGERS = ("tensorboard", "wandb", "mlflow")  # TrainConfig.log_to; recipe.MetricLog writes to them

TRAINABLE = {  # `trainable` preset -> regex over parameter names
    "all": r".*",
    "llm-only": r"language_model\..*",
    "attention-only": r"language_model\.layers\.\d+\.self_attn\..*",  # the big_vision colab
    "projector+llm": r"(multi_modal_projector|language_model)\..*",
}
LORA_TARGETS = {  # preset -> regex over module names (peft matches it in full)
    "llm": LLM_LINEAR,
    "llm-attention": r"language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    "llm+projector": rf"{LLM_LINEAR}|multi_modal_projector\.linear",
    "all-linear": rf"{LLM_LINEAR}|{VISION_LINEAR}",
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
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:  # one line with the file and line, not the parser's traceback
            mark = getattr(e, "problem_mark", None)
            where = f"{config}:{mark.line + 1}" if mark is not None else str(config)
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
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
        if t is DataSpec and isinstance(value, str):  # a data field given as its path alone
            return DataSpec(path=value)
    if float in origins and isinstance(value, (int, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            return value if int in origins and isinstance(value, int) else float(value)
    if tuple in origins and isinstance(value, list):
        return tuple(value)
    if isinstance(value, origins) and not (isinstance(value, bool) and bool not in origins):
        return value
    names = {type(None): "null", DataSpec: "a path or a {path, split, task, codec} / {synthetic} mapping"}
    want = " or ".join(names.get(t) or getattr(t, "__name__", str(t)) for t in origins)
    raise ConfigError(f"{name} must be {want}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    if (cfg.steps is None) == (cfg.epochs is None):
        raise ConfigError("set exactly one of steps and epochs")
    for key, value in [("steps", cfg.steps), ("epochs", cfg.epochs), ("batch_size", cfg.batch_size),
                       ("grad_accum", cfg.grad_accum)]:
        if value is not None and not value > 0:  # `or 1` here once let steps=0 through to a TypeError
            raise ConfigError(f"{key}={value} must be positive")
    for key in ("train_file", "eval_file"):
        spec = getattr(cfg, key)
        if spec is not None and (spec.path is None) == (spec.synthetic is None):
            raise ConfigError(f"{key}: set exactly one of path and synthetic")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"batch_size={cfg.batch_size} is not a multiple of grad_accum={cfg.grad_accum}")
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"label_smoothing={cfg.label_smoothing} must be in [0, 1)")
    for key, ok, rule in [("warmup", cfg.warmup >= 0, ">= 0"), ("lr", cfg.lr > 0, "> 0"),
                          ("keep_last", cfg.keep_last >= 1, ">= 1"), ("max_text_len", cfg.max_text_len >= 4, ">= 4"),
                          ("stop_after", cfg.stop_after != 0, "> 0")]:
        if not ok:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be {rule}")
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise ConfigError(f"out_dir={cfg.out_dir} is a file, not a folder")
    if cfg.eval_metric is not None:
        from ..metrics import metric

        try:
            metric(cfg.eval_metric)
        except ValueError as e:
            raise ConfigError(f"eval_metric: {e}") from None
    if bad := [name for name in cfg.log_to if name not in LOGGERS]:
        raise ConfigError(f"log_to: {bad[0]!r} is not one of {', '.join(LOGGERS)}")
    if (cfg.keep_best or cfg.early_stopping) and cfg.eval_file is None:
        raise ConfigError("keep_best and early_stopping need an eval_file to evaluate on")
    if cfg.early_stopping is not None and (cfg.keep_best is None or cfg.early_stopping < 1 or not cfg.eval_every):
        raise ConfigError("early_stopping=N (N >= 1 evaluations) needs keep_best and eval_every")
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
    if cfg.quantize is not None and cfg.lora is None:
        raise ConfigError("quantize (QLoRA) trains LoRA adapters on a 4-bit model: add a `lora` section")
    mixed = cfg.lora is None and cfg.trainable != "all" and cfg.dtype != cfg.trainable_dtype
    if mixed and not cfg.autocast:
        raise ConfigError(f"dtype={cfg.dtype} (frozen) with trainable_dtype={cfg.trainable_dtype} mixes "
                          "weight dtypes in one layer: set autocast: true")
    if cfg.autocast and cfg.dtype == "float16":
        raise ConfigError("autocast runs in bfloat16; float16 weights with it are not supported")


def smoke_dir(out_dir: str) -> Path:
    """Where a smoke run of `out_dir` writes: a temporary folder of its own, so that it never mixes
    with (or blocks) the real run's checkpoints."""
    return Path(tempfile.gettempdir()) / "palikit-smoke" / re.sub(r"[^\w.-]+", "_", str(Path(out_dir).resolve()))


def apply_smoke(cfg: TrainConfig, world: int) -> TrainConfig:
    """big_vision's `runlocal`: the same recipe, a few steps on a few examples, into smoke_dir."""
    return dataclasses.replace(cfg, out_dir=str(smoke_dir(cfg.out_dir)), resume=False, resume_from=None, steps=2, epochs=None,
                               batch_size=world * cfg.grad_accum,
                               eval_every=None, save_every=None, eval_examples=2, eval_batch_size=2,
                               eval_max_new_tokens=4, keep_last=1, warmup=0.0)
