"""Load test of `palikit serve`: N concurrent clients on loopback against the same FastAPI app serving
palikit batched, palikit one request at a time (max_batch=1), and transformers (batched and not).

    .venv/bin/python benchmarks/bench_serve.py [--clients 16] [--requests 128] [--max-tokens 16]

The model is a random-init PaliGemma 2, tiny-paligemma2 scaled up (BENCH_MODEL below), written once with
palikit's writer; transformers loads the same folder with from_pretrained. For transformers the app serves
`TransformersPipe`, an adapter whose generate_details left-pads palikit's prompt ids and pixels and calls
PaliGemmaForConditionalGeneration.generate, so both sides go through the same HTTP stack, queue and batcher.
Each server runs in its own subprocess; the clients post /v1/chat/completions requests that mix three task
prompts and eight 640x480 JPEGs, greedy, max_tokens=--max-tokens (random weights rarely stop early, and the
tokens per request are reported to show equal work). Prints a markdown table: requests/s and p50/p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from palikit.api import Pipeline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# tiny-paligemma2 scaled up: 112 px / patch 14 = 64 image tokens, a 4-layer 512-wide Gemma 2.
BENCH_MODEL = {"vision": dict(image_size=112, patch_size=14, hidden_size=256, intermediate_size=1024,
                              num_layers=4, num_heads=4),
               "text": dict(hidden_size=512, intermediate_size=2048, num_layers=4, num_heads=8, num_kv_heads=4,
                            head_dim=64, query_pre_attn_scalar=64, max_position_embeddings=1024)}
PROMPTS = ["caption en", "answer en what is in the picture?", "detect cat ; dog"]
CORPUS = ["caption en", "answer en what is in the picture?", "detect cat ; dog", "a photo of a cat on a sofa",
          "two dogs playing in the park", "segment the red car", "ocr", "where is the cat?",
          "un chat noir", "1234 5678", "hello world this is a test"] * 40


def make_checkpoint(folder: Path) -> None:
    import torch

    from palikit.api import Pipeline
    from palikit.config import PaliGemmaConfig
    from palikit.paligemma import PaliGemma
    from palikit.processor import Tokenizer, train_tokenizer

    config = PaliGemmaConfig.from_name("tiny-paligemma2", **BENCH_MODEL)
    torch.manual_seed(0)
    model = PaliGemma(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    tok = train_tokenizer(CORPUS, folder / "tokenizer.model", vocab_size=400)  # ids fit the preset's vocab
    Pipeline(model, Tokenizer(tok, image_token_id=config.image_token_id)).save(folder)


class TransformersPipe(Pipeline):
    """transformers' PaliGemmaForConditionalGeneration behind palikit's pipeline surface
    (palikit.api.PipelineProtocol): generation is transformers', the rest (prompt ids, image
    preparation, output parsing) palikit's, so both libraries are served by the same create_app.

    Prompt ids and pixels come from palikit's processor (tests/test_parity.py shows transformers gives
    the same logits and greedy tokens from them); rows are left-padded, token_type_ids 0 on the prefix.
    """

    def __init__(self, folder: str | Path, dtype: str = "float32"):  # no palikit model, so not Pipeline's
        import torch
        from transformers import PaliGemmaForConditionalGeneration

        from palikit.config import PaliGemmaConfig
        from palikit.processor import Tokenizer

        model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype))
        self.model = model.eval()
        self.config = PaliGemmaConfig.from_file(Path(folder) / "config.json")
        self.tokenizer = Tokenizer(Path(folder) / "tokenizer.model", image_token_id=self.config.image_token_id)
        self.num_image_tokens = self.config.num_image_tokens
        self.image_size = self.config.vision.image_size
        self.codec_path, self._codecs = None, {}

    def stream(self, image, prompt: str, max_new_tokens: int = 32, **sampling):
        """transformers generates in one go; its tokens are then yielded one by one."""
        (_, g), = self.generate_details([image], [prompt], max_new_tokens=max_new_tokens, batch_size=1, **sampling)
        yield from g.tokens[:max_new_tokens]

    def generate_details(self, images, prompts, max_new_tokens: int = 32, batch_size: int = 8,
                         do_sample: bool = False, seed: int | None = None, **sampling):
        import torch

        from palikit.generate import Generated
        from palikit.processor import encode_example, preprocess

        per_example = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        enc = [encode_example(self.tokenizer, self.num_image_tokens * len(ims), p).ids
               for ims, p in zip(per_example, prompts)]
        B, L = len(enc), max(len(e) for e in enc)
        ids = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, L - len(e):] = torch.tensor(e)
            mask[i, L - len(e):] = 1
        pixels = preprocess([im for ims in per_example for im in ims], self.image_size).to(self.model.dtype)
        if seed is not None:
            torch.manual_seed(seed)
        eos = self.tokenizer.eos_id
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask,
                                      token_type_ids=torch.zeros_like(ids), pixel_values=pixels,
                                      max_new_tokens=max_new_tokens, do_sample=do_sample,
                                      pad_token_id=self.tokenizer.pad_id, eos_token_id=eos,
                                      output_scores=True, return_dict_in_generate=True,
                                      **(sampling if do_sample else {}))
            logprobs = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        results = []
        for i in range(B):
            tokens = out.sequences[i, L:].tolist()
            n = tokens.index(eos) if eos in tokens else len(tokens)
            g = Generated(tokens[:n], logprobs[i, :n].tolist())
            results.append((self.tokenizer.decode(g.tokens), g))
        return results


def run_server(library: str, checkpoint: str, max_batch: int, threads: int) -> None:
    """Subprocess: serve on a free loopback port, print the URL, stop when stdin closes."""
    import torch

    import palikit
    from palikit.serve import background, create_app

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    pipe = palikit.load(checkpoint, dtype="float32") if library == "palikit" else TransformersPipe(checkpoint)
    app = create_app(pipe, model_name=library, max_batch=max_batch, max_queue=1024, request_timeout_s=3600)
    with background(app) as url:
        print(url, flush=True)
        sys.stdin.read()


def request_bodies(max_tokens: int) -> list[dict]:
    rng = np.random.default_rng(0)
    urls = []
    for _ in range(8):
        buf = io.BytesIO()
        pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    def body(i: int) -> dict:
        content = [{"type": "image_url", "image_url": {"url": urls[i % 8]}},
                   {"type": "text", "text": PROMPTS[i % 3]}]
        return {"model": "x", "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": content}]}

    return [body(i) for i in range(24)]


async def load_test(url: str, bodies: list[dict], clients: int, requests: int) -> dict:
    import httpx

    latencies, tokens = [], []

    async def client(c, todo):
        for i in todo:  # clients share one iterator: each takes the next request as it frees up
            t = time.perf_counter()
            r = await c.post("/v1/chat/completions", json=bodies[i % len(bodies)])
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)
            tokens.append(r.json()["usage"]["completion_tokens"])

    async def batch_stats(c) -> dict[str, float]:
        text = (await c.get("/metrics")).text
        return {k: float(v) for k, v in re.findall(r"^palikit_batch_size_(sum|count) (\S+)$", text, re.M)}

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as c:
        warm_up = iter(range(2 * clients))
        await asyncio.gather(*[client(c, warm_up) for _ in range(clients)])
        latencies.clear()
        tokens.clear()
        before = await batch_stats(c)
        todo = iter(range(requests))
        start = time.perf_counter()
        await asyncio.gather(*[client(c, todo) for _ in range(clients)])
        wall = time.perf_counter() - start
        after = await batch_stats(c)
    return {"req_s": requests / wall, "p50_s": float(np.percentile(latencies, 50)),
            "p99_s": float(np.percentile(latencies, 99)), "tokens_per_req": float(np.mean(tokens)),
            "mean_batch": (after["sum"] - before["sum"]) / (after["count"] - before["count"]), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8, help="the batched servers' max_batch")
    ap.add_argument("--checkpoint", help="reuse a checkpoint folder written by an earlier run")
    ap.add_argument("--only", choices=["palikit", "transformers"], help="benchmark one library only")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per server (0: torch's default); 1 is steadier on a busy machine")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--serve", nargs=3, metavar=("LIBRARY", "CHECKPOINT", "MAX_BATCH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return run_server(args.serve[0], args.serve[1], int(args.serve[2]), args.threads)

    folder = args.checkpoint
    if folder is None:
        folder = tempfile.mkdtemp(prefix="palikit-bench-serve-")
        make_checkpoint(Path(folder))
        print(f"wrote the random benchmark model to {folder}", flush=True)
    bodies = request_bodies(args.max_tokens)
    libraries = [args.only] if args.only else ["palikit", "transformers"]
    rows = []
    for library in libraries:
        for max_batch in (args.max_batch, 1):
            proc = subprocess.Popen([sys.executable, __file__, "--serve", library, folder, str(max_batch),
                                     "--threads", str(args.threads)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            try:
                url = proc.stdout.readline().strip()
                if not url.startswith("http"):
                    raise RuntimeError(f"{library} server did not start")
                result = asyncio.run(load_test(url, bodies, args.clients, args.requests))
            finally:
                proc.stdin.close()
                proc.wait(timeout=60)
            rows.append({"server": library, "max_batch": max_batch, **result})
            print(json.dumps(rows[-1]), flush=True)

    print(f"\n{args.clients} concurrent clients, {args.requests} requests, greedy, "
          f"max_tokens={args.max_tokens}, torch threads per server: {args.threads or 'default'}\n")
    print("| server | max_batch | requests/s | p50 latency (s) | p99 latency (s) | mean batch "
          "| tokens/request |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['max_batch']} | {r['req_s']:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} "
              f"| {r['mean_batch']:.1f} | {r['tokens_per_req']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
