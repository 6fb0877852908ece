"""Run-time options: how a checkpoint is loaded and run, not what the model is (that is config.py).

One frozen dataclass, `Options`, is passed to `palikit.load` and held by the Pipeline; another,
`ServerSettings`, says how `palikit serve` runs. Each field carries its help text and choices; the
CLI's flags (`add_flags`), `serve()`'s parameters and the server's /v1/models entry are made from
these fields, so no list of options is written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Weight quantisation at load (palikit.quantize): int8 / int4 weight-only; w8a8 the int8 weights with
# their input activations in int8 too (dynamic, per token), multiplied int8 x int8.
QUANT_SCHEMES = ("int8", "int4", "w8a8")
ATTENTION_KERNELS = ("auto", "eager", "flex")
# Which logits get PaliGemma 2's final soft-cap, where the references differ:
# "config": every logit, as transformers' Gemma2 / PaliGemma forward does;
# "big_vision": decode steps only; teacher-forced logits (loss, scores) and the prefill's are
#   uncapped, as big_vision's `compute_logits` returns pre-logits through the uncapped head
#   (big_vision/models/proj/paligemma/gemma_bv.py, models/ppp/gemma.py);
# "off": none.
LOGIT_SOFTCAP_MODES = ("config", "big_vision", "off")


def option(default, help: str, choices=None, parse=str, flag: bool = True):
    return field(default=default, metadata={"help": help, "choices": choices, "parse": parse, "flag": flag})


def dtype_of(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class Options:
    dtype: str = option("bfloat16", "the weights' dtype (on a CPU without native bfloat16, a prompt's products "
                         "run in float32 on them)", ("float32", "bfloat16", "float16"))
    device: str = option("auto", "cpu, cuda, cuda:1, mps, ...; auto: a GPU when there is one (the CPU for "
                          "quantised weights)")
    quantize: str | None = option(None, "int8 / int4: weight-only decoder weights and an int8 embedding / LM "
                                   "head; w8a8: int8 weights and int8 activations; on CPUs where they decode "
                                   "faster than bfloat16 (refused elsewhere, saying why)", QUANT_SCHEMES)
    group_size: int = option(32, "int4: inputs per scale (32, 64, 128 or 256)", parse=int)
    compile: bool = option(False, "compile the decode step with torch.compile (CUDA graphs on a GPU): faster "
                            "decoding after a first call that compiles it; ignored, with a warning, on a CPU "
                            "where it does not pay", parse=bool)
    attention: str = option("auto", "the attention kernel of prompts and training: flex (FlexAttention, "
                             "compiled; opt-in until it has run on a GPU here), eager, or auto (eager)",
                            ATTENTION_KERNELS)
    cuda_graphs: bool = option(False, "with compile on a GPU: replay the decode step as CUDA graphs (opt-in "
                                "until benchmarks/gpu_check.sh has passed on a GPU)", parse=bool)
    logit_softcap: str | None = option(None, "which logits get PaliGemma 2's final soft-cap: config (every "
                                        "logit, as transformers; the default for model folders), big_vision "
                                        "(decode steps only; the default for .npz) or off", LOGIT_SOFTCAP_MODES)
    sliding_window: bool = option(False, "apply Gemma 2's local attention window as transformers does (off, "
                                   "as big_vision: it matters past 4096 tokens only)", parse=bool)
    tokenizer: str | None = option(None, "tokenizer.model, where it is not beside the weights (a .npz)")
    batch_invariant: bool | None = option(None, "answers bit-identical whatever shares their batch (each "
                                          "prompt prefilled alone, every decode step of a fixed shape); "
                                          "default: on for eval and run (their batches are full anyway), off "
                                          "for serve and the Python API (a lone request computes a whole "
                                          "batch's rows)", parse=bool)
    adapter: str | None = option(None, "a LoRA fine-tune (peft's adapter folder) merged into the model as it "
                                  "loads; an adapter folder given as the model names its base itself")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        dtype_of(self.dtype)
        if self.quantize == "int4" and self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size={self.group_size}: the int4 kernel takes 32, 64, 128 or 256")

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_of(self.dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ServerSettings:
    """How a server runs; `palikit serve`'s flags are made from these fields (options.add_flags)."""

    host: str = option("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    port: int = option(8000, "port to listen on (0: any free one)", parse=int)
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/* (default: $PALIKIT_API_KEY)")
    max_batch: int = option(8, "most requests decoded together (rows of the KV cache pool)", parse=int)
    max_queue: int = option(64, "queued requests before answering 503", parse=int)
    kv_cache_gb: float | None = option(None, "size the KV cache pool by memory: as many requests as fit, at "
                                       "most --max-batch", parse=float)
    max_len: int | None = option(None, "most tokens (image + prompt + answer) of one request (default: the "
                                 "image tokens + 512)", parse=int)
    image_cache_mb: float = option(256.0, "image encodings kept for later prompts on the same image", parse=float)
    allow_local_paths: str | None = option(None, "let requests name image files under this folder")
    allow_urls: bool = option(False, "let requests give http(s) image URLs to fetch (public addresses only)",
                              parse=bool)
    allow_private_urls: bool = option(False, "with --allow-urls, also loopback, link-local and private "
                                             "addresses (the server's own network)", parse=bool)
    threads: int | None = option(None, "torch CPU threads (default: all cores but one, left to the HTTP loop)",
                                 parse=int)
    request_timeout_s: float = option(300.0, "seconds a request may take before it gets 504", parse=float)
    model_name: str | None = option(None, "the model's name in /v1/models (default: the folder's name)",
                                    flag=False)
    adapters: tuple[str, ...] = option((), "LoRA adapters requests may choose, NAME=DIR each (--adapter NAME=DIR)",
                                       flag=False)
    adapters_dir: str | None = option(None, "serve every adapter folder in this folder, named by its folder")
    max_adapters: int = option(8, "most LoRA adapters loaded at once (POST /v1/adapters past it: 409)", parse=int)
    check_prompts: bool = option(True, "refuse prompts without a known task prefix (400); False serves "
                                 "checkpoints trained on free-form prefixes", parse=bool, flag=False)
    max_body_bytes: int = option(20 * 2**20, "largest request body (413 beyond)", parse=int, flag=False)
    max_image_pixels: int = option(25_000_000, "largest image (413 beyond)", parse=int, flag=False)

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_len", "threads", "max_body_bytes", "max_image_pixels",
                     "max_adapters"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kv_cache_gb", "image_cache_mb", "request_timeout_s"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")


def add_flags(parser: argparse.ArgumentParser, cls=Options, skip: tuple[str, ...] = (), **defaults) -> None:
    """A --flag per field of the options dataclass `cls` (help, choices and type from its metadata)."""
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        m, default = f.metadata, defaults.get(f.name, f.default)
        name = "--" + f.name.replace("_", "-")
        if m["parse"] is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=m["help"])
        else:
            parser.add_argument(name, type=m["parse"], choices=m["choices"], default=default, help=m["help"])


def from_flags(args: argparse.Namespace, cls=Options, **changes):
    """The options dataclass `cls` from the parsed flags of add_flags."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**values | changes)
