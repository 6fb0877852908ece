"""The exported graphs (palikit export, run by onnxruntime on the CPU as transformers.js calls them)
against palikit's PyTorch model and transformers, on the bundled model, in one run.

    .venv/bin/python benchmarks/bench_export.py [--runs 3] [--new-tokens 32] [--out results.json]

Each runtime runs in a subprocess of its own (its peak resident memory is its own): a warm-up, then
`--runs` rounds of one greedy generation of `--new-tokens` tokens with no <eos> stop (the <eos>
logit masked where the runtime lets us, else the first <eos> ends the round and the rate counts the
tokens made); the best round's time to first token and decode tokens/s are kept. File sizes are the
exported graphs'. A 3B export needs ONNX external data (graphs over 2 GB), which palikit does not
write yet, so only the bundled model is measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNTIMES = ("palikit-float32", "palikit-bfloat16", "palikit-int8", "onnx-fp32", "onnx-q8", "transformers-float32")
PROMPT = "caption en"


def measure(runtime: str, folder: str, runs: int, new_tokens: int) -> dict:
    """Subprocess: (best time to first token, best decode tokens/s, tokens, peak RSS) of `runtime`."""
    import numpy as np
    import torch

    import palikit
    from palikit.synthetic import make_scene

    torch.set_num_threads(torch.get_num_threads())
    image = make_scene(np.random.default_rng(0)).image
    if runtime.startswith("palikit"):
        dtype = "bfloat16" if runtime == "palikit-bfloat16" else "float32"
        pipe = palikit.load("default", dtype=dtype, quantize="int8" if runtime == "palikit-int8" else None)

        def generate():
            times = []
            for _ in pipe.stream(image, PROMPT, max_new_tokens=new_tokens):
                times.append(time.perf_counter())
            return times
    elif runtime.startswith("onnx"):
        from palikit.export import load

        onnx = load(folder, quantize="q8" if runtime == "onnx-q8" else None)
        text = onnx.config.text

        def generate():
            times = []
            embeds = onnx.prompt_embeddings([image], PROMPT)
            past = [np.zeros((1, text.num_kv_heads, 0, text.head_dim), np.float32) for _ in range(2 * text.num_layers)]
            mask = np.ones((1, embeds.shape[1]), np.int64)
            for _ in range(new_tokens):
                logits, past = onnx.logits_and_cache(embeds, mask, past)
                token = int(logits[0, -1].argmax())
                times.append(time.perf_counter())
                embeds = onnx.sessions["embed_tokens"].run(None, {"input_ids": np.array([[token]], np.int64)})[0]
                mask = np.ones((1, mask.shape[1] + 1), np.int64)
            return times
    else:
        from transformers import AutoProcessor, PaliGemmaForConditionalGeneration
        from transformers.generation.streamers import BaseStreamer

        model = PaliGemmaForConditionalGeneration.from_pretrained(palikit.weights.resolve_source("default")).eval()
        processor = AutoProcessor.from_pretrained(palikit.weights.resolve_source("default"))
        inputs = processor(images=image, text=PROMPT, return_tensors="pt")

        class Clock(BaseStreamer):
            def __init__(self):
                self.times, self.prompt_seen = [], False

            def put(self, value):
                if self.prompt_seen:
                    self.times.append(time.perf_counter())
                self.prompt_seen = True

            def end(self):
                pass

        def generate():
            clock = Clock()
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               streamer=clock)
            return clock.times

    generate()  # warm-up
    best_ttft, best_rate, tokens = float("inf"), 0.0, 0
    for _ in range(runs):
        start = time.perf_counter()
        times = generate()
        best_ttft = min(best_ttft, times[0] - start)
        if len(times) > 1:
            best_rate = max(best_rate, (len(times) - 1) / (times[-1] - times[0]))
        tokens = len(times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"runtime": runtime, "ttft_ms": best_ttft * 1e3, "decode_tok_s": best_rate, "tokens": tokens,
            "peak_rss_mb": peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--measure", nargs=2, metavar=("RUNTIME", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.runs, args.new_tokens)))
        return

    import palikit
    from palikit.export import export

    folder = Path(tempfile.mkdtemp(prefix="palikit-bench-export-")) / "default"
    export(palikit.load("default", dtype="float32"), folder, quantize="q8")
    sizes = {p.name: p.stat().st_size for p in (folder / "onnx").iterdir()}
    rows = []
    for runtime in args.runtimes:
        out = subprocess.run([sys.executable, __file__, "--measure", runtime, str(folder), "--runs", str(args.runs),
                              "--new-tokens", str(args.new_tokens)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nbundled model, '{PROMPT}', {args.new_tokens} new tokens, best of {args.runs} rounds\n")
    print("| runtime | time to first token (ms) | decode tokens/s | peak RSS (MiB) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    print("\n| graph | MiB |\n|---|---|")
    for name, size in sorted(sizes.items()):
        print(f"| {name} | {size / 2**20:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "sizes": sizes}, indent=2))


if __name__ == "__main__":
    main()
