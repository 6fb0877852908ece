"""Fine-tune PaliGemma / PaliGemma 2: the whole loop in one file (Trainer: setup -> train ->
save_checkpoint -> cleanup), in the shape of torchtune's recipes and nanoGPT's train.py, which is
why it is a little over 500 lines; the config, model, checkpoint and rank helpers sit beside it in
palikit.finetune.

    palikit train configs/hf_lora.yaml --set lr=1e-4 --set lora.r=16   # one process
    palikit train configs/hf_lora.yaml --resume                         # continue after a kill
    torchrun --standalone --nproc_per_node=4 -m palikit train configs/hf_lora.yaml   # DDP
    torchrun --standalone --nproc_per_node=4 -m palikit train CONFIG --set distributed=fsdp

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

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch
import torch.distributed
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from .. import dist
from ..api import Pipeline, load
from ..atomic import write_folder_atomic, write_text_atomic
from ..data import (DataSpec, Example, PaliGemmaDataset, Problem, StepSampler, data_errors, load_examples, make_collate,
                    without_broken)
from ..evaluate import eval_example, evaluate, validation_names, validation_values
from ..options import DTYPES
from ..paligemma import PaliGemma
from ..processor import InputError, Tokenizer, suffix_logprobs
from ..weights import CODEC_FILES, build_on_meta, iter_safetensors, save_hf_folder, save_model_files, weight_files
# Called as checkpoint.save_rng(...), dist.barrier(), ...: through the module, so that a test's
# hook on palikit.finetune.checkpoint / palikit.dist reaches every call. `dist` is palikit.dist (its
# barrier and all_sum are no-ops in one process); torch's is spelled torch.distributed here.
from . import checkpoint
from .config import LOGGERS, TRAINABLE, ConfigError, TrainConfig, apply_smoke, load_config
from ..adapters import TRAINED_WITH, adapter_state, load_adapter, trained_with
from .model import apply_lora, build_model, export_adapter, param_table
from .qlora import quantize_4bit, require_bitsandbytes

log = logging.getLogger(__name__)


# ---- loss ----------------------------------------------------------------------------------------


def loss_fn(outputs: torch.Tensor, batch: dict, label_smoothing: float = 0.0, head=None,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on the suffix, as big_vision's PaliGemma trainer
    (big_vision/trainers/proj/paligemma/train.py, `loss_fn`).

    outputs and head as processor.suffix_logprobs (hidden states with the output head, applied only
    at the targets, or logits). Each example's loss is the mean over its targets (suffix and <eos>);
    the result is the mean over examples (reduction="none": the (B,) per-example losses). Label
    smoothing puts 1 - eps on the true token and eps / (V - 1) on every other.
    """
    logp, labels, rows = suffix_logprobs(outputs, batch, head)  # (T, V), (T,), (T,)
    nll = -logp.gather(-1, labels[:, None])[:, 0]  # (T,)
    if label_smoothing:
        V = logp.shape[-1]
        others = -logp.sum(-1) - nll  # sum of -log p over the V - 1 wrong tokens
        nll = (1 - label_smoothing) * nll + label_smoothing / (V - 1) * others
    n_targets = batch["loss_mask"][:, 1:].sum(1)
    per_example = torch.zeros(len(n_targets), device=nll.device).index_add_(0, rows, nll)
    per_example = per_example / n_targets.clamp(min=1)
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


# ---- data ------------------------------------------------------------------------------------------


# Settings that cannot change the weights a step computes; a resumed run warns about every other change.
NOT_TRAINING = {"out_dir", "resume", "resume_from", "stop_after", "smoke", "log_every", "log_to", "save_every",
                "keep_last", "num_workers", "eval_file", "eval_every", "eval_examples", "eval_metric", "keep_best",
                "early_stopping", "eval_batch_size", "eval_max_new_tokens"}


def read_split(spec: DataSpec, workdir: Path, split: str, rank: int, errors: list | None = None) -> list[Example]:
    """Examples of a config data field: a path (with split, task, codec) or synthetic settings.
    errors: a list to record unreadable lines / annotations in (skipped), else they raise."""
    if spec.synthetic is not None:
        from ..synthetic import generate_dataset

        s = dict(spec.synthetic)
        path = workdir / "data" / f"{split}.jsonl"
        if rank == 0 and not path.exists():
            generate_dataset(workdir / "data", s.pop("n_images"), s.pop("seed", 0), split_name=split, **s)
        dist.barrier()
        return load_examples(path)
    return load_examples(spec.path, spec.split or split, spec.task, spec.codec, errors, columns=spec.columns)



# ---- logging -------------------------------------------------------------------------------------


class MetricLog:
    """metrics.jsonl (one JSON object per line) always, and each logger of TrainConfig.log_to."""

    def __init__(self, out_dir: Path, resume_step: int, log_to=("tensorboard",), config: dict | None = None):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():  # drop rows a killed run wrote after its last checkpoint
            rows = [r for r in self.path.read_text().splitlines() if json.loads(r)["step"] <= resume_step]
            write_text_atomic(self.path, "".join(r + "\n" for r in rows))
        self.file = self.path.open("a")
        self.sinks = [sink for name in log_to if (sink := _SINKS[name](out_dir, resume_step, config or {}))]

    def write(self, step: int, **values) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink.write(step, values)

    def close(self) -> None:
        self.file.close()
        for sink in self.sinks:
            sink.close()


class _TensorBoard:
    def __init__(self, out_dir: Path, resume_step: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (train extra)

        self.writer = SummaryWriter(out_dir / "tensorboard", purge_step=resume_step + 1)

    def write(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """One W&B run per out_dir: its id is kept in out_dir/wandb_run_id, so a resumed run goes on."""

    def __init__(self, out_dir: Path, resume_step: int, config: dict):
        import wandb

        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        write_text_atomic(id_file, run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "palikit"), name=out_dir.name, id=run_id,
                              dir=str(out_dir), config=config, resume="allow")

    def write(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """One MLflow run per out_dir (id in out_dir/mlflow_run_id); the store is $MLFLOW_TRACKING_URI,
    or the SQLite file out_dir/mlflow.db (MLflow 3 no longer takes new runs in a ./mlruns folder)."""

    def __init__(self, out_dir: Path, resume_step: int, config: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}")
        id_file = out_dir / "mlflow_run_id"
        run = mlflow.start_run(run_id=id_file.read_text().strip() if id_file.exists() else None,
                               run_name=out_dir.name)
        if not id_file.exists():
            write_text_atomic(id_file, run.info.run_id + "\n")
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def write(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _optional(sink):
    """A logger whose package is missing: one warning, then the run goes on without it."""
    def make(out_dir: Path, resume_step: int, config: dict):
        try:
            return sink(out_dir, resume_step, config)
        except ImportError as e:
            log.warning("log_to %s: %s is not installed; not logging there", sink.__name__.strip("_").lower(),
                        e.name)
            return None
    return make


_SINKS = {name: _optional(sink) for name, sink in zip(LOGGERS, (_TensorBoard, _WandB, _MLflow))}


# ---- the recipe ----------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.setup()

    def setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world, self.device = dist.init_distributed(cfg.device)
        if cfg.smoke:
            self.cfg = cfg = apply_smoke(cfg, self.world)
            if self.rank == 0:
                shutil.rmtree(cfg.out_dir, ignore_errors=True)  # the last smoke run's
                log.info("smoke run: writing to %s", cfg.out_dir)
        if cfg.quantize is not None:  # before any work: never train unquantised by accident
            require_bitsandbytes(self.device)
        self.out = Path(cfg.out_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        ckpt = checkpoint.latest_checkpoint(self.out)
        if cfg.resume and cfg.resume_from is not None:
            ckpt = Path(cfg.resume_from)
            if not (ckpt / "state.json").is_file():
                raise ConfigError(f"--resume {ckpt}: not a checkpoint folder (no state.json); the checkpoints "
                                  f"of {self.out} are {', '.join(p.name for p in sorted(self.out.glob('step-*'))) or 'none'}")
        if ckpt and not cfg.resume:
            raise ConfigError(f"{self.out} holds checkpoints of an earlier run ({ckpt.name}): resume it "
                              "(--resume) or choose another out_dir")

        # Data first: a preset model may fit its tokenizer on the training texts.
        skip, splits = cfg.allow_data_errors, {"train_file": "train", "eval_file": "valid"}
        unreadable: dict[str, list] = {key: [] for key in splits}  # lines / annotations, skipped if allowed
        examples = {key: read_split(getattr(cfg, key), self.out, split, self.rank, unreadable[key] if skip else None)
                    if getattr(cfg, key) else [] for key, split in splits.items()}
        if cfg.smoke:
            examples = {"train_file": examples["train_file"][:8], "eval_file": examples["eval_file"][:4]}
        self.skipped = {}
        for key, found in examples.items():
            what = f"{key} {getattr(cfg, key)}"
            if not skip:
                if problem := data_errors(found, what):
                    raise ConfigError(problem)
                continue
            examples[key], broken = without_broken(found)  # allow_data_errors: train on the rest
            broken = [f"{e.where}: {e.message}" if isinstance(e, Problem) else ": ".join(e)
                      for e in unreadable[key] + broken if not isinstance(e, Problem) or e.error]
            if broken:
                log.warning("%s: skipped %d broken example(s) (allow_data_errors), e.g. %s", what, len(broken),
                            broken[0])
                self.skipped[key] = len(broken)
        train_examples, eval_examples = examples["train_file"], examples["eval_file"]
        if cfg.keep_best:  # checked now, not at the first evaluation an hour in
            generates = cfg.eval_examples and not (self.world > 1 and cfg.distributed == "fsdp")
            names = {"eval_loss"} | (validation_names([eval_example(ex) for ex in eval_examples], cfg.eval_metric)
                                     if generates else set())
            if cfg.keep_best not in names:
                raise ConfigError(f"keep_best={cfg.keep_best!r} is not a validation value of this run; it can "
                                  f"log {', '.join(sorted(names))}")
        if not train_examples:
            broken = self.skipped.get("train_file")
            raise ConfigError(f"no training examples in {cfg.train_file}"
                              + (f": all {broken} were broken (allow_data_errors skipped them)" if broken else ""))

        # The model: identical on every rank (same seed), frozen parts in cfg.dtype.
        torch.manual_seed(cfg.seed)
        texts = [t for ex in train_examples for t in (ex.prefix, ex.suffix)]
        core, self.tokenizer, self.codec_path = build_model(cfg.model, cfg.dtype, self.device, cfg.seed, texts,
                                                            self.out, self.rank, cfg.final_logit_softcap == "keep")
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

            # FSDP2 shards a group of mixed dtypes (LoRA's float32 adapters in bfloat16 layers, as
            # configs/hf_lora.yaml trains): each parameter keeps its own dtype (torch's fully_shard).
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
        self.stopped_early = False
        if cfg.resume and ckpt is not None:
            self.load_checkpoint(ckpt)
        else:
            torch.manual_seed(cfg.seed + self.rank)  # dropout differs per rank
        self.sampler = StepSampler(len(self.train_set), cfg.batch_size, cfg.grad_accum, self.rank, self.world,
                                   cfg.seed, self.step)
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_sampler=self.sampler, collate_fn=self.collate, num_workers=cfg.num_workers,
            generator=torch.Generator())  # its own generator: iterating must not consume the global RNG
        self.metrics = (MetricLog(self.out, self.step, cfg.log_to, dataclasses.asdict(cfg))
                        if self.rank == 0 else None)
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
            write_folder_atomic(base, lambda p: Pipeline(core, self.tokenizer, self.codec_path).save(p))
        dist.barrier()
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
            loss_total, tokens_total = dist.all_sum(float(loss_sum), tokens)
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
                if cfg.keep_best and self.keep_if_best(last) and not done:
                    break  # early stopping; the best checkpoint is out_dir/best
            if (cfg.save_every and self.step % cfg.save_every == 0) or done:
                self.save_checkpoint()
        bar.close()
        if self.step == self.total_steps or self.stopped_early:
            self.save_checkpoint()
            self.publish_step("final")  # the last step's model, as users load it
        return {"step": self.step, "out_dir": str(self.out), "skipped_examples": self.skipped, **last}

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
        out = {"eval_loss": dist.all_sum(total)[0] / len(self.eval_set)}
        sharded = self.world > 1 and cfg.distributed == "fsdp"
        if self.rank == 0 and not sharded and cfg.eval_examples:
            examples = self.eval_set.examples[:cfg.eval_examples]
            longest = max(sum(e.loss_mask) for e in self.eval_set.encoded[:len(examples)])
            pipe = Pipeline(self.core, self.tokenizer, self.codec_path)
            with self.autocast:  # the task metrics of `palikit eval`, per task word
                rep = evaluate(pipe, [eval_example(ex) for ex in examples], name="valid",
                               metric=cfg.eval_metric, by_task=True, batch_size=cfg.eval_batch_size,
                               max_new_tokens=min(longest, cfg.eval_max_new_tokens))
            out |= validation_values(rep)
        dist.barrier()
        module.train()
        if self.metrics:
            self.metrics.write(self.step, **out)
            log.info("step %d: %s", self.step, " ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    def keep_if_best(self, values: dict) -> bool:
        """Keep this step as out_dir/best when cfg.keep_best improved (every rank takes part: the
        checkpoint save is collective); -> whether early stopping ends the run here."""
        key = self.cfg.keep_best
        # Generation metrics exist on rank 0 only (eval_loss on all): rank 0's value for every rank.
        missing, value = dist.all_sum(*((float(key not in values), float(values.get(key, 0.0)))
                                        if self.rank == 0 else (0.0, 0.0)))
        if missing:  # raised on every rank, so that none waits in a collective
            raise ConfigError(f"keep_best={key!r} is not a validation value; this run logs "
                              f"{', '.join(sorted(values))}")
        best_file = self.out / "best" / "best.json"
        best = json.loads(best_file.read_text()) if best_file.exists() else None
        lower = key.endswith("loss")
        if best is None or (value < best["value"] if lower else value > best["value"]):
            self.save_checkpoint()
            self.publish_step("best", {"best.json": json.dumps({key: value, "value": value,
                                                                 "step": self.step}) + "\n"})
            log.info("step %d: new best %s %.4f (out_dir/best)", self.step, key, value)
            return False
        patience = self.cfg.early_stopping
        self.stopped_early = bool(patience) and self.step - best["step"] >= patience * self.cfg.eval_every
        if self.stopped_early and self.rank == 0:
            log.info("step %d: no better %s than %.4f (step %d) for %d evaluations: stopping early",
                     self.step, key, best["value"], best["step"], patience)
        return self.stopped_early

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
        dist.barrier()
        checkpoint.save_rng(tmp / f"rng-rank{self.rank}.safetensors")
        # Full (unsharded) state on rank 0; collective under FSDP, so every rank takes part.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.lora)
        model_state = get_model_state_dict(self.loss_module, options=options)
        optim_state = get_optimizer_state_dict(self.loss_module, self.optimizer, options=options)
        dist.barrier()  # every rank's RNG file is in tmp before rank 0 renames it (DDP: no collective above)
        if self.rank == 0:
            state = {k.removeprefix("model."): v for k, v in model_state.items()}
            if self.lora:
                # save_embedding_layers=False: LoRA here never targets embeddings, and peft's "auto"
                # asks the Hub whether a base named like a Hub id has a config (no network here).
                self.loss_module.model.save_pretrained(tmp / "adapter", state_dict=state, save_embedding_layers=False)
                export_adapter(tmp / "adapter")  # transformers' module names, for transformers + peft
                # What the adapters were trained with, for merge (peft's own files have no room for it).
                write_text_atomic(tmp / "adapter" / TRAINED_WITH, json.dumps(
                    {"final_logit_softcap": self.core.config.text.final_logit_softcap}) + "\n")
            else:
                model = build_on_meta(self.core.config)
                model.load_state_dict(state, assign=True)
                save_hf_folder(model, tmp / "model")
                save_model_files(tmp / "model", self.core.config, self.tokenizer.path, self.codec_path)
            checkpoint.save_optimizer(optim_state, tmp)
            epoch, position = divmod(self.step * self.cfg.batch_size, len(self.train_set))
            write_text_atomic(tmp / "state.json", json.dumps({
                "step": self.step, "epoch": epoch, "position": position, "world_size": self.world,
                "lora": self.lora, "config": dataclasses.asdict(self.cfg)}, indent=2))
            final = self.out / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(self.out.glob("step-*"))[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        self.saved_step = self.step

    def load_checkpoint(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        if state["lora"] != self.lora:
            raise ConfigError(f"{ckpt} was {'' if state['lora'] else 'not '}trained with LoRA; "
                              "this config differs")
        if self.lora:  # peft's file names -> our module's (adapter name back in)
            weights = {"model." + re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k): v
                       for k, v in adapter_state(ckpt / "adapter").items()}
        else:
            files = weight_files(ckpt / "model")
            weights = {"model." + k: v for k, v in iter_safetensors(files, self.core.config.version)}
        trainable = {n for n, p in self.loss_module.named_parameters() if p.requires_grad}
        if missing := trainable - set(weights):
            raise ConfigError(f"{ckpt} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
        set_model_state_dict(self.loss_module, weights, options=StateDictOptions(full_state_dict=True,
                                                                                   strict=False))
        set_optimizer_state_dict(self.loss_module, self.optimizer, checkpoint.load_optimizer(ckpt),
                                 options=StateDictOptions(full_state_dict=True))
        self.step = state["step"]
        before, now = state["config"], json.loads(json.dumps(dataclasses.asdict(self.cfg)))  # tuples as saved
        changed = [k for k in now if k not in NOT_TRAINING and before.get(k) != now[k]]
        if changed and self.rank == 0:
            log.warning("resuming %s with changed %s: the run will not match an uninterrupted one", ckpt,
                        ", ".join(f"{k} ({before.get(k)!r} -> {now[k]!r})" for k in changed))
        rng = ckpt / f"rng-rank{self.rank}.safetensors"
        if state["world_size"] == self.world and rng.exists():
            checkpoint.load_rng(rng)
        else:
            log.warning("%s was written by %d ranks, this run has %d: random streams (dropout) restart",
                        ckpt, state["world_size"], self.world)
            torch.manual_seed(self.cfg.seed + self.rank + self.step)
        if self.rank == 0:
            for tmp in self.out.glob(".step-*.tmp"):  # left by a kill during a save
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("resumed from %s: step %d, epoch %d, position %d", ckpt, self.step, state["epoch"],
                     state["position"])

    def publish_step(self, name: str, extra: dict[str, str] | None = None) -> None:
        """out_dir/NAME: this step's saved model (or adapter), as hard links, with the tokenizer,
        preprocessor config and mask codec (a folder palikit.load, or merge for an adapter, reads
        whole) and the `extra` files. Every rank waits for rank 0 to write it."""
        if self.rank == 0:
            src = self.out / f"step-{self.step:06d}" / ("adapter" if self.lora else "model")

            def link(folder: Path) -> None:
                shutil.copytree(src, folder, copy_function=checkpoint.link_or_copy)
                save_model_files(folder, self.core.config, self.tokenizer.path, self.codec_path)
                for file, text in (extra or {}).items():
                    write_text_atomic(folder / file, text)

            write_folder_atomic(self.out / name, link)
        dist.barrier()

    def cleanup(self, finished: bool = True) -> None:
        """Close the logs and leave the process group. After a finished run every rank first waits for
        the others and drops the modules and optimizer that hold gloo's async work: a rank whose
        interpreter exits with such work alive can abort ("terminate called without an active
        exception", pytorch/pytorch#190489 and #179291; here 1 FSDP run in about 10 under load). After
        a failure it leaves at once, as torchtitan does: a barrier would wait for ranks that are stuck."""
        if self.metrics:
            self.metrics.close()
        if torch.distributed.is_initialized():
            if finished:
                torch.distributed.barrier()
                self.wrapped = self.loss_module = self.optimizer = self.params = self.core = None
                gc.collect()
            torch.distributed.destroy_process_group()



# ---- entry points --------------------------------------------------------------------------------


def train(config: str | Path | dict | TrainConfig, overrides: list[str] | tuple = (), resume: bool | str = False,
          smoke: bool = False) -> dict:
    """Run a training config (YAML path, dict or TrainConfig) with `key=value` overrides; resume: True
    for out_dir's newest checkpoint, or a checkpoint folder.

    Under torchrun every rank calls this; rank 0 writes checkpoints and logs. Returns the last
    step's metrics and the output folder.
    """
    cfg = load_config(config, overrides)
    cfg = dataclasses.replace(cfg, resume=cfg.resume or bool(resume), smoke=cfg.smoke or smoke,
                              resume_from=str(resume) if isinstance(resume, (str, Path)) else cfg.resume_from)
    trainer = Trainer(cfg)
    try:
        result = trainer.train()
    except BaseException:
        trainer.cleanup(finished=False)
        raise
    trainer.cleanup()
    return result


def merge(base_source: str | Path, adapter_dir: str | Path, out_dir: str | Path,
          dtype: str = "float32", force: bool = False) -> Path:
    """Merge LoRA adapters into their base model and save a full checkpoint (palikit/HF layout).

    The merge runs in `dtype` (float32 by default: merging into bfloat16 weights rounds twice).
    An existing out_dir is replaced only with force; it is checked before anything loads.
    """
    out = Path(out_dir)
    if out.exists() and not (force and out.is_dir()):
        raise InputError(f"--out {out} exists; " + ("it is a file" if out.is_file() else "--force replaces it"))

    pipe = load(base_source, dtype=dtype, overrides=trained_with(adapter_dir))  # trained without the cap: saved so
    model = load_adapter(pipe.model, adapter_dir).merge_and_unload()
    tok = Path(adapter_dir) / "tokenizer.model"
    tokenizer = Tokenizer(tok, image_token_id=model.config.image_token_id) if tok.exists() else pipe.tokenizer
    codec = next((Path(adapter_dir) / n for n in CODEC_FILES if (Path(adapter_dir) / n).exists()), pipe.codec_path)
    write_folder_atomic(Path(out_dir), lambda p: Pipeline(model, tokenizer, codec).save(p))
    return Path(out_dir)
