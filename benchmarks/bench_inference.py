"""palikit vs transformers, side by side in one run, on a random-init full-size PaliGemma 2.

    .venv/bin/python benchmarks/bench_inference.py [--preset paligemma2-3b-pt-224] [--dtype bfloat16]
        [--columns palikit palikit-compile palikit-int8 palikit-int4 palikit-w8a8 palikit-int8-compile
                   palikit-int4-compile palikit-w8a8-compile palikit-int8-folder palikit-int4-folder
                   palikit-w8a8-folder transformers transformers-eager transformers-sdpa
                   transformers-torchao-int8] [--checkpoint FOLDER] [--device cuda] [--rounds N]

Writes one checkpoint (palikit's writer, the released HF layout), or takes --checkpoint (e.g.
palikit/assets/default, the bundled model: the per-token overhead row), then loads and runs it in a
fresh subprocess per column, so load time and peak RSS are not polluted by the others. Columns:
palikit in --dtype, with its decode step compiled ("-compile": palikit.load(compile=True)), palikit
with int8 / int4 / w8a8 weights (palikit.quantize: the decoder and LM head; w8a8 also the vision
tower, and int8 activations) quantised at load or read from a `palikit quantize` folder;
transformers in --dtype with its default attention, eager or SDPA, and with torchao's int8
weight-only decoder (needs `pip install torchao`; a column that fails is left out). Rows: load
time, peak RSS, time to first token (vision + prefill), decode tokens/s (batch 1),
batch-8 captions/s, and decode as a fraction of its bandwidth floor: the bytes of the decoder's
weights (the ones every decode step reads) against the read bandwidth this machine measures on a
512 MB tensor. Random weights rarely emit <eos>, and every column is forced to produce exactly
--new-tokens tokens. Ratios are to transformers' default column, else its eager or SDPA one.

--device cuda runs every column on the GPU (the quantised ones are CPU-only and drop out): the
compiled column then replays CUDA graphs, the floor is the GPU memory's read bandwidth (the same
sum, on the GPU), and a row gives each column's peak GPU memory. Use --new-tokens 128 or more
there: a 3B decode step takes a few milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import AVX2_ENV, describe, results_file  # noqa: E402


def make_checkpoint(folder: Path, preset: str, dtype: str, tokenizer_texts: list[str]) -> None:
    import torch

    from palikit.config import PaliGemmaConfig
    from palikit.paligemma import PaliGemma
    from palikit.processor import train_tokenizer
    from palikit.weights import save_hf_folder

    config = PaliGemmaConfig.from_name(preset)
    with torch.device("meta"):
        model = PaliGemma(config)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.state_dict().items():  # materialise tensor by tensor, straight in bf16
        t = torch.empty(p.shape, dtype=getattr(torch, dtype))
        state[name] = t.normal_(0, 0.02, generator=g) if "norm" not in name else t.zero_()
    model.load_state_dict(state, assign=True)
    save_hf_folder(model, folder, max_shard_bytes=2 * 2**30)
    # A real-sized vocabulary is not needed for speed: a small tokenizer maps the prompt to ids.
    train_tokenizer(tokenizer_texts, folder / "tokenizer.model", vocab_size=400)


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(n)]


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
    from the parent through fork and exec, so every worker reported at least the peak of the parent
    that wrote the checkpoint (a run showed 0.816 GB for all four columns on the bundled model)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so that a timer stops when the work has run."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def read_bandwidth_gb_s(device: str = "cpu", repeats: int = 5) -> float:
    """Best of `repeats` sums over a 512 MB float32 tensor: what a weight read can stream here."""
    import torch

    x = torch.ones(2**27, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        x.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def peak_memory(device: str) -> dict:
    """Peak RSS, and on a GPU the peak of torch's GPU allocations."""
    import torch

    gpu = {"peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9} if device.startswith("cuda") else {}
    return {"peak_rss_gb": peak_rss_gb(), **gpu}


def tensor_bytes(t) -> int:
    """Bytes of a tensor, or of the plain tensors inside a tensor subclass (torchao's Int8Tensor)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def decoder_bytes(module) -> int:
    """Bytes of the decoder's weights and buffers (the embedding table is the LM head too)."""
    return sum(tensor_bytes(t) for t in module.state_dict().values())


NO_BATCH8 = "PALIKIT_BENCH_NO_BATCH8"
BATCH8 = os.environ.get(NO_BATCH8) != "1"


def run_palikit(folder: str, dtype: str, new_tokens: int, device: str, quantize: str | None = None,
                compile: bool = False) -> dict:
    import torch

    import palikit

    t0 = time.perf_counter()
    pipe = palikit.load(folder, dtype=dtype, device=device, quantize=quantize, compile=compile)
    synchronize(device)
    load_s = time.perf_counter() - t0
    pipe.tokenizer.eos_id = -1  # no early stop: every column makes `tokens` tokens
    imgs = images(8)

    def run(batch: int, tokens: int) -> float:
        t = time.perf_counter()
        pipe.generate(imgs[:batch], ["caption en"] * batch, max_new_tokens=tokens)
        synchronize(device)
        return time.perf_counter() - t

    def decode_rate(tokens: int) -> float:
        """Tokens/s after the first, from the times the tokens come out of one generation (a
        difference of two whole runs would carry their prompts' jitter)."""
        times = []
        for _ in pipe.stream(imgs[0], "caption en", max_new_tokens=tokens):
            synchronize(device)
            times.append(time.perf_counter())
        return (len(times) - 1) / (times[-1] - times[0])

    with torch.inference_mode():
        run(1, 2)  # warm-up (and, compiled, the compilation for both batch sizes)
        if BATCH8:
            run(8, 2)
        ttft = min(run(1, 1) for _ in range(2))
        decode = decode_rate(new_tokens)
        batch8 = run(8, new_tokens) if BATCH8 else float("nan")
    return {"load_s": load_s, **peak_memory(device), "ttft_s": ttft, "decode_tok_s": decode,
            "batch8_captions_s": 8 / batch8, "decoder_gb": decoder_bytes(pipe.model.language_model) / 1e9}


def run_transformers(folder: str, dtype: str, new_tokens: int, device: str, attention: str | None = None,
                     torchao_int8: bool = False) -> dict:
    """transformers' PaliGemmaForConditionalGeneration: its default attention, or attn_implementation
    `attention`; torchao_int8: the decoder's Linear layers in torchao's int8 weight-only layout
    (pip install torchao; the way transformers' TorchAoConfig quantises)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, PaliGemmaForConditionalGeneration, SiglipImageProcessor

    import palikit
    from palikit.processor import encode_example

    t0 = time.perf_counter()
    options = {"attn_implementation": attention} if attention else {}
    model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype), **options)
    model = model.eval().to(device)
    if torchao_int8:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model.model.language_model, Int8WeightOnlyConfig())
    synchronize(device)
    load_s = time.perf_counter() - t0
    S = model.config.vision_config.image_size
    proc = SiglipImageProcessor(size={"height": S, "width": S}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    tok = palikit.Tokenizer(Path(folder) / "tokenizer.model", image_token_id=model.config.image_token_id)
    ids = encode_example(tok, model.config.vision_config.num_image_tokens, "caption en").ids
    imgs = images(8)

    def run(batch: int, tokens: int, times: list | None = None) -> float:
        t = time.perf_counter()
        pixels = proc(imgs[:batch], return_tensors="pt")["pixel_values"].to(device, model.dtype)
        input_ids = torch.tensor([ids] * batch, device=device)

        class Stamp(LogitsProcessor):  # called once per new token, after its step
            def __call__(self, input_ids, scores):
                synchronize(device)
                times.append(time.perf_counter())
                return scores

        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       token_type_ids=torch.zeros_like(input_ids), pixel_values=pixels,
                       max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([Stamp()] if times is not None else []))
        synchronize(device)
        return time.perf_counter() - t

    with torch.inference_mode():
        run(1, 2)
        if BATCH8:
            run(8, 2)
        ttft = min(run(1, 1) for _ in range(2))
        times = []
        run(1, new_tokens, times)  # decode: as palikit's, from the times the tokens come out
        batch8 = run(8, new_tokens) if BATCH8 else float("nan")
    return {"load_s": load_s, **peak_memory(device), "ttft_s": ttft,
            "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "batch8_captions_s": 8 / batch8,
            "decoder_gb": decoder_bytes(model.model.language_model) / 1e9}


COLUMNS = {"palikit": lambda f, d, n, dev: run_palikit(f, d, n, dev),
           "palikit-float32": lambda f, d, n, dev: run_palikit(f, "float32", n, dev),
           "palikit-compile": lambda f, d, n, dev: run_palikit(f, d, n, dev, compile=True),
           "palikit-int8": lambda f, d, n, dev: run_palikit(f, d, n, dev, "int8"),
           "palikit-int4": lambda f, d, n, dev: run_palikit(f, d, n, dev, "int4"),
           "palikit-w8a8": lambda f, d, n, dev: run_palikit(f, d, n, dev, "w8a8"),
           "palikit-int8-compile": lambda f, d, n, dev: run_palikit(f, d, n, dev, "int8", compile=True),
           "palikit-w8a8-compile": lambda f, d, n, dev: run_palikit(f, d, n, dev, "w8a8", compile=True),
           "palikit-int4-compile": lambda f, d, n, dev: run_palikit(f, d, n, dev, "int4", compile=True),
           # `palikit quantize` folders (written before the columns run): no quantising at load
           "palikit-int8-folder": lambda f, d, n, dev: run_palikit(f"{f}-int8", d, n, dev),
           "palikit-int4-folder": lambda f, d, n, dev: run_palikit(f"{f}-int4", d, n, dev),
           "palikit-w8a8-folder": lambda f, d, n, dev: run_palikit(f"{f}-w8a8", d, n, dev),
           "transformers": run_transformers,  # its default attention
           "transformers-eager": lambda f, d, n, dev: run_transformers(f, d, n, dev, "eager"),
           "transformers-sdpa": lambda f, d, n, dev: run_transformers(f, d, n, dev, "sdpa"),
           "transformers-torchao-int8": lambda f, d, n, dev: run_transformers(f, d, n, dev, torchao_int8=True)}
DEFAULT_COLUMNS = ["palikit", "palikit-compile", "palikit-int8-folder", "palikit-int8-compile", "palikit-w8a8-folder",
                   "palikit-w8a8-compile", "palikit-int4-folder", "palikit-int4-compile", "transformers-eager",
                   "transformers-sdpa", "transformers-torchao-int8"]

ROWS = [("load_s", "load time (s)", False), ("peak_rss_gb", "peak RSS (GB)", False),
        ("peak_gpu_gb", "peak GPU memory (GB)", False),
        ("ttft_s", "time to first token (s)", False), ("decode_tok_s", "decode tokens/s, batch 1", True),
        ("batch8_captions_s", "batch-8 captions/s", True)]


def best_of(a: dict, b: dict) -> dict:
    """Each metric's better value of two runs of one column (ROWS says which way is better)."""
    better = {key: max if higher_is_better else min for key, _, higher_is_better in ROWS}
    return {key: better[key](value, b[key]) if key in better else value for key, value in a.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paligemma2-3b-pt-224")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--checkpoint", help="reuse a checkpoint folder instead of writing a new one")
    ap.add_argument("--columns", nargs="+", choices=list(COLUMNS), default=DEFAULT_COLUMNS)
    ap.add_argument("--worker", choices=list(COLUMNS), help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the columns this many times, in turn, and keep each metric's best: this shared "
                         "machine's speed drifts by 10-15 %% within minutes, and interleaving spreads it over all")
    ap.add_argument("--out", help="the results as JSON (default: benchmarks/results/DATE-inference-CPUKIND.json)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: every column on the GPU (see above)")
    ap.add_argument("--emulate-avx2", action="store_true", help="run every column as an AVX2-only CPU "
                    "(benchmarks/machine.py): both CPU kinds measured on one AVX-512 machine")
    ap.add_argument("--no-batch8", action="store_true", help="skip the batch-8 captions (the slowest part)")
    args = ap.parse_args()
    if args.no_batch8:
        os.environ[NO_BATCH8] = "1"  # the workers' too
    if args.emulate_avx2:  # before torch loads, here and in the workers
        os.environ.update(AVX2_ENV)

    if args.worker:
        print(json.dumps(COLUMNS[args.worker](args.checkpoint, args.dtype, args.new_tokens, args.device)))
        return
    from palikit.api import check_device
    from palikit.processor import InputError

    try:  # before a checkpoint is written or quantised
        check_device(args.device)
    except InputError as e:
        ap.error(str(e))

    tmp = None
    folder = args.checkpoint
    if folder is None:
        tmp = tempfile.mkdtemp(prefix="palikit-bench-")
        folder = tmp
        t = time.perf_counter()
        make_checkpoint(Path(folder), args.preset, args.dtype, ["caption en", "a photo of a cat"] * 50)
        print(f"wrote random {args.preset} ({args.dtype}) to {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    folder_schemes = [column.split("-")[1] for column in args.columns if column.endswith("-folder")]
    try:
        for scheme in folder_schemes:
            subprocess.run([sys.executable, "-m", "palikit.cli", "quantize", folder, "--to", scheme, "--out",
                            f"{folder}-{scheme}", "--dtype", args.dtype], check=True, cwd=ROOT)
        results = {}
        bandwidth = read_bandwidth_gb_s(args.device)
        machine = describe()
        print(f"{machine}\nread bandwidth ({args.device}): {bandwidth:.1f} GB/s (best of 5 sums over 512 MB)",
              flush=True)
        for lib in [lib for _ in range(args.rounds) for lib in args.columns]:
            cmd = [sys.executable, __file__, "--worker", lib, "--checkpoint", folder, "--dtype", args.dtype,
                   "--new-tokens", str(args.new_tokens), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:  # e.g. torchao not installed: the other columns still run
                print(f"{lib}: failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            run = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{lib}: {run}", flush=True)
            results[lib] = best_of(results[lib], run) if lib in results else run
    finally:
        for scheme in folder_schemes:
            shutil.rmtree(f"{folder}-{scheme}", ignore_errors=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    base_name = next((c for c in ("transformers", "transformers-eager", "transformers-sdpa") if c in results), None)
    print(f"\n{args.checkpoint or args.preset}, {args.dtype}, {args.device}, {args.new_tokens} new tokens, best of "
          f"{args.rounds} round(s); ratios to {base_name} (x: higher is better)\n")
    base = results.get(base_name)
    print("| metric | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for key, label, higher_is_better in ROWS:
        if not all(key in r for r in results.values()):  # peak GPU memory: only with --device cuda
            continue
        cells = []
        for r in results.values():
            ratio = "" if base is None else f" ({(r[key] / base[key] if higher_is_better else base[key] / r[key]):.2f}x)"
            cells.append(f"{r[key]:.3g}{ratio}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    floors = [f"{r['decode_tok_s'] / (bandwidth / r['decoder_gb']):.0%} of {bandwidth / r['decoder_gb']:.2g}"
              for r in results.values()]
    print("| decode vs bandwidth floor (tok/s) | " + " | ".join(floors) + " |")
    out = Path(args.out) if args.out else results_file("inference", machine)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "preset": args.checkpoint or args.preset, "dtype": args.dtype,
                               "device": args.device, "new_tokens": args.new_tokens, "rounds": args.rounds,
                               "read_bandwidth_gb_s": bandwidth, "columns": results}, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
