"""Fine-tuning speed and memory: palikit's trainer vs transformers + peft, side by side in one run.

    .venv/bin/python benchmarks/bench_finetune.py                         # PaliGemma 2 3B-224, LoRA and full
    .venv/bin/python benchmarks/bench_finetune.py --modes lora --steps 4  # 3B LoRA only (less memory)
    .venv/bin/python benchmarks/bench_finetune.py --preset tiny-paligemma2 --steps 20   # seconds
    .venv/bin/python benchmarks/bench_finetune.py --dtypes bfloat16,float32 --emulate-avx2   # bf16 vs f32

A random-init checkpoint of the preset is written once (bench_inference.make_checkpoint, bf16),
then every (library, mode) pair trains on the same batches in its own subprocess, so peak RSS
is that run's alone. The peak is reset after loading (Linux clear_refs): both libraries map the
safetensors lazily, so the weights are paged in, and counted, during the first step.

Same settings on both sides: bf16 weights, LoRA r=8 alpha=16 on the language model's
q/k/v/o/gate/up/down (adapters in float32, peft's default), full fine-tuning in pure bf16,
global-norm clipping 1.0, no activation checkpointing, batch of identical-length examples (so the
per-example mean (palikit) and token mean (transformers) losses coincide; the first-step losses
are printed as a check). transformers runs eager attention: its SDPA path drops Gemma 2's
attention soft-cap, which palikit applies. palikit is timed through its real trainer, transformers
through a plain loop; both times include reading and preprocessing the batch's images. The first
step is a warm-up, not timed. --dtypes adds palikit runs of the same recipe with float32 weights
(the bf16 recipe should train at their speed on a CPU without native bfloat16, kernels.linear);
--emulate-avx2 runs every column as an AVX2-only CPU (benchmarks/machine.py). Results go to
benchmarks/results/DATE-finetune-CPUKIND.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import make_checkpoint, peak_rss_gb  # noqa: E402 (VmHWM, reset by reset_peak)
from machine import AVX2_ENV, describe, results_file  # noqa: E402

SUFFIX = "a photo of a cat sitting on a red chair next to a window"


def make_data(folder: Path, n: int) -> Path:
    """n random 640x480 images with the same prefix and suffix (equal lengths, no padding)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        rows.append(json.dumps({"image": f"images/{i}.png", "prefix": "caption en", "suffix": SUFFIX}))
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "train.jsonl"


def reset_peak() -> float:
    """Start the peak-RSS count afresh after loading (reading safetensors maps the file, which
    inflates the loading peak alike for both libraries); returns the loading peak."""
    load_peak = peak_rss_gb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return load_peak


def run_palikit(ckpt: str, data: str, mode: str, args, dtype: str = "bfloat16") -> dict:
    from palikit.finetune import Trainer, load_config

    out = tempfile.mkdtemp(prefix="bench-palikit-")
    cfg = {"model": ckpt, "train_file": data, "out_dir": out, "steps": args.steps + 1,
           "final_logit_softcap": "keep",  # transformers' Trainer caps every logit: compare like with like
           "stop_after": args.steps, "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": 1e-4,
           "warmup": 0, "schedule": "constant", "clip_grad": 1.0, "dtype": dtype, "max_text_len": 64,
           "seed": 0}
    if mode == "lora":
        cfg["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "llm"}
    else:
        cfg["trainable_dtype"] = dtype
    t0 = time.perf_counter()
    trainer = Trainer(load_config(cfg))
    load_peak = reset_peak()
    trainer.train()  # steps + 1 planned, stopped after `steps`: no checkpoint is written
    trainer.cleanup()
    wall = time.perf_counter() - t0
    rows = [json.loads(r) for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    step_s = [args.batch_size / r["examples_per_s"] for r in rows[1:]]
    median = float(np.median(step_s))
    return {"step_s": median, "examples_per_s": args.batch_size / median, "train_peak_gb": peak_rss_gb(),
            "load_peak_gb": load_peak, "first_loss": rows[0]["loss"], "wall_s": wall}


def run_transformers(ckpt: str, data: str, mode: str, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration

    from palikit.data import read_jsonl
    from palikit.finetune import LORA_TARGETS  # the same modules as palikit's `targets: llm`
    from palikit.processor import Tokenizer, collate, encode_example, preprocess

    t0 = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16,
                                                              attn_implementation="eager").train()
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=rf".*{LORA_TARGETS['llm']}"))
    else:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD)(params, lr=1e-4)
    config = model.config
    tok = Tokenizer(Path(ckpt) / "tokenizer.model", image_token_id=config.image_token_id)
    examples = read_jsonl(data)
    n_img = config.vision_config.num_image_tokens

    def batch(step: int) -> dict:
        exs = [examples[(step * args.batch_size + i) % len(examples)] for i in range(args.batch_size)]
        b = collate([encode_example(tok, n_img, e.prefix, e.suffix) for e in exs], tok.pad_id)
        pixels = preprocess([e.images[0] for e in exs], config.vision_config.image_size)
        return {"input_ids": b["ids"], "attention_mask": b["input_mask"], "token_type_ids": b["mask_ar"],
                "labels": b["ids"].masked_fill(b["loss_mask"] == 0, -100),
                "pixel_values": pixels.to(torch.bfloat16)}

    load_peak = reset_peak()
    times, losses = [], []
    for step in range(args.steps):
        t = time.perf_counter()  # the batch is built inside the timing, as palikit's loader is
        loss = model(**batch(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    step_s = float(np.median(times[1:]))
    return {"step_s": step_s, "examples_per_s": args.batch_size / step_s, "train_peak_gb": peak_rss_gb(),
            "load_peak_gb": load_peak, "first_loss": losses[0], "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paligemma2-3b-pt-224")
    ap.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run; the first is not timed")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                    help="sgd keeps full fine-tuning of 3B near 17 GB (bf16 weights + grads); "
                         "adamw adds 12 GB")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    ap.add_argument("--checkpoint", help="reuse a checkpoint folder instead of writing a new one")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--dtypes", default="bfloat16", help="palikit's runs: comma-separated weight dtypes "
                                                          "(transformers runs bfloat16)")
    ap.add_argument("--emulate-avx2", action="store_true", help="run every column as an AVX2-only CPU")
    ap.add_argument("--out", help="the results as JSON (default: benchmarks/results/DATE-finetune-CPUKIND.json)")
    args = ap.parse_args()
    if args.emulate_avx2:  # before torch loads, here and in the workers
        os.environ.update(AVX2_ENV)

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        lib, mode, dtype = args.worker.split(":")
        result = (run_palikit(args.checkpoint, args.data, mode, args, dtype) if lib == "palikit"
                  else run_transformers(args.checkpoint, args.data, mode, args))
        print(json.dumps(result))
        return

    tmp = Path(tempfile.mkdtemp(prefix="palikit-bench-ft-"))
    folder = args.checkpoint
    try:
        if folder is None:
            folder = str(tmp / "ckpt")
            t = time.perf_counter()
            make_checkpoint(Path(folder), args.preset, "bfloat16", ["caption en", SUFFIX] * 50)
            print(f"wrote random {args.preset} (bfloat16) in {time.perf_counter() - t:.0f} s", flush=True)
        data = make_data(tmp / "data", max(8, args.batch_size * args.steps))
        results: dict = {}
        runs = [f"palikit:{{mode}}:{dtype}" for dtype in args.dtypes.split(",")] + ["transformers:{mode}:bfloat16"]
        for mode in args.modes.split(","):
            for run in (r.format(mode=mode) for r in runs):
                lib = run.split(":")[0]
                cmd = [sys.executable, __file__, "--worker", run, "--checkpoint", folder,
                       "--data", str(data), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                       "--optimizer", args.optimizer, "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode:
                    print(f"{run} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
                    continue
                results[run] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{run}: {results[run]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    machine = describe()
    print(f"\n{args.preset}, batch {args.batch_size}, {args.optimizer}, {args.steps - 1} timed steps; {machine}\n")
    print("| run | examples/s | vs transformers+peft (bf16) | peak RSS while training (GB) | first-step loss |")
    print("|---|---|---|---|---|")
    for run, r in results.items():
        base = results.get(f"transformers:{run.split(':')[1]}:bfloat16")
        ratio = f"{r['examples_per_s'] / base['examples_per_s']:.2f}x" if base else ""
        print(f"| {run} | {r['examples_per_s']:.4g} | {ratio} | {r['train_peak_gb']:.3g} | {r['first_loss']:.4g} |")
    out = Path(args.out) if args.out else results_file("finetune", machine)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "preset": args.preset, "batch_size": args.batch_size,
                               "optimizer": args.optimizer, "steps": args.steps, "runs": results}, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
