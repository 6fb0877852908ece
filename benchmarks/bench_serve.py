"""Load test of `palikit serve` under a mixed workload: continuous batching (palikit.engine) against
a static batcher (the scheme it replaced, kept here as the baseline) and against transformers behind
the same app.

    .venv/bin/python benchmarks/bench_serve.py [--clients 8 32] [--requests 160] [--think-ms 100] [--stream]

Short requests (`ocr`, `answer`: 4 tokens) and long ones (`describe`: 48 tokens, `segment`: 20)
arrive mixed, from N concurrent clients with exponential think times (Poisson arrivals while the
server keeps up), on eight 640x480 JPEGs that several prompts share. The static batcher runs the
oldest request with every queued one to the longest answer, so a short request that arrives behind
a long one waits for it; the engine lets it join and leave between steps.

The model is a random-init PaliGemma 2, tiny-paligemma2 scaled up (BENCH_MODEL below), written once with
palikit's writer; transformers loads the same folder with from_pretrained. For transformers the app serves
`TransformersPipe`, an adapter whose generate_details left-pads palikit's prompt ids and pixels and calls
PaliGemmaForConditionalGeneration.generate. The static servers are palikit's app (routes, guard, image
reading, parsing) with its engine adapter swapped for this script's `StaticBatcher`, so all three go
through the same HTTP stack.
Each server runs in its own subprocess. Prints a markdown table: requests/s, tokens/s, and per class
(short, long) p50 / p99 latency and time to first token (streamed: the first content event; not
streamed: the whole answer, which is when a client sees it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image

from palikit.api import Pipeline
from palikit.serve.app import server_threads

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# tiny-paligemma2 scaled up: 112 px / patch 14 = 64 image tokens, a 4-layer 512-wide Gemma 2.
BENCH_MODEL = {"vision": dict(image_size=112, patch_size=14, hidden_size=256, intermediate_size=1024,
                              num_layers=4, num_heads=4),
               "text": dict(hidden_size=512, intermediate_size=2048, num_layers=4, num_heads=8, num_kv_heads=4,
                            head_dim=64, query_pre_attn_scalar=64, max_position_embeddings=1024)}
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


def make_adapters(folder: Path, n: int) -> list[str]:
    """n random LoRA adapters for the checkpoint in `folder`, made by transformers + peft (ranks 8
    and 16 alternately, every linear layer of the language model), in folder/adapters/a0, a1, ..."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration

    names = []
    for i in range(n):
        out = folder / "adapters" / f"a{i}"
        names.append(out.name)
        if (out / "adapter_config.json").exists():
            continue
        model = PaliGemmaForConditionalGeneration.from_pretrained(folder)
        r = 8 if i % 2 == 0 else 16
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=(
            r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")))
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_" in key:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        model.save_pretrained(out)
    return names


class StaticBatcher:
    """The static batcher palikit's server had before its engine, as this benchmark's baseline; it
    stands in for palikit.serve.batcher.Batcher (same constructor, submit, depth, gauges, start,
    close). One model thread takes the oldest job and every queued one with the same sampling (up
    to max_batch), runs them with one pipe.generate_details to the longest answer and answers each;
    streaming and seeded jobs run alone (pipe.stream). A full queue answers 503."""

    def __init__(self, pipe, metrics, max_batch: int, max_queue: int, batch_wait_s: float = 0.02, **_engine):
        self.pipe, self.metrics = pipe, metrics
        self.max_batch, self.max_queue, self.batch_wait_s = max_batch, max_queue, batch_wait_s
        self.waiting: deque = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="bench-static-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    @property
    def depth(self) -> int:
        return len(self.waiting)

    max_len = None  # no rows of fixed length: any request fits

    def check(self, n_prompt_tokens: int, max_new_tokens: int) -> None:
        pass

    def gauges(self) -> list:
        return []

    @staticmethod
    def key(job) -> tuple:
        """Jobs batch only with equal sampling; a streamed or seeded job alone."""
        if job.stream or job.sampling.get("seed") is not None:
            return ("alone", id(job))
        return (job.adapter or "", *sorted(job.sampling.items()))

    def submit(self, job) -> None:
        from fastapi import HTTPException

        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise HTTPException(503, "server busy; retry shortly", headers={"Retry-After": "1"})
            self.waiting.append(job)
            self.cond.notify()

    def _next(self) -> list | None:
        """The oldest job and up to max_batch - 1 like it, waiting up to batch_wait_s for more."""
        with self.cond:
            while not self.closed and not self.waiting:
                self.cond.wait()
            if self.closed:
                return None
            key, deadline = self.key(self.waiting[0]), time.monotonic() + self.batch_wait_s
            while True:
                batch = [j for j in self.waiting if self.key(j) == key][: self.max_batch]
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or key[0] == "alone" or self.closed:
                    break
                self.cond.wait(left)
            for j in batch:
                self.waiting.remove(j)
            return [j for j in batch if not j.cancelled]

    def _loop(self) -> None:
        from palikit.generate import Generated
        from palikit.serve.batcher import answer, send_delta

        while (jobs := self._next()) is not None:
            if not jobs:
                continue
            start, tokens = time.perf_counter(), 0
            try:
                if jobs[0].stream:
                    job, made = jobs[0], []
                    stream = self.pipe.stream(job.images, job.prompt, max_new_tokens=job.max_new_tokens, **job.sampling)
                    with contextlib.closing(stream):  # closing it stops the generation
                        for token in stream:
                            made.append(token)
                            if send_delta(self.pipe, job, made) or job.cancelled:
                                break
                    send_delta(self.pipe, job, made, final=True)
                    results = [(self.pipe.tokenizer.decode(made), Generated(made, [0.0] * len(made)))]
                else:
                    adapter = {"adapter": jobs[0].adapter} if jobs[0].adapter else {}
                    results = self.pipe.generate_details([j.images for j in jobs], [j.prompt for j in jobs],
                                                         max_new_tokens=max(j.max_new_tokens for j in jobs),
                                                         batch_size=len(jobs), **jobs[0].sampling, **adapter)
                for job, (_, g) in zip(jobs, results):
                    # The batch ran to its longest answer: each job keeps the tokens it asked for.
                    g = Generated(g.tokens[: job.max_new_tokens], g.logprobs[: job.max_new_tokens])
                    result = answer(self.pipe, job, self.pipe.tokenizer.decode(g.tokens), g)
                    tokens += result["completion_tokens"]
                    job.deliver("done", result)
            except Exception as e:  # never kill the thread: answer the batch with the error
                logging.getLogger(__name__).exception("generation failed")
                for job in jobs:
                    job.deliver("error", e)
                continue
            self.metrics.batch(len(jobs), tokens, time.perf_counter() - start)


class TransformersPipe(Pipeline):
    """transformers' PaliGemmaForConditionalGeneration behind what palikit's server and
    StaticBatcher use of a Pipeline: generation is transformers', the rest (prompt ids, image
    preparation, output parsing) palikit's, so both libraries are served by the same create_app.

    Prompt ids and pixels come from palikit's processor (tests/test_parity.py shows transformers gives
    the same logits and greedy tokens from them); rows are left-padded, token_type_ids 0 on the prefix.
    """

    def __init__(self, folder: str | Path, dtype: str = "float32"):  # no palikit model, so not Pipeline's
        import torch
        from transformers import PaliGemmaForConditionalGeneration

        from palikit.config import PaliGemmaConfig
        from palikit.options import Options
        from palikit.processor import Tokenizer

        model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype))
        self.options = Options(dtype=dtype, device=DEVICE)
        self.model = model.eval().to(DEVICE)
        self.config = PaliGemmaConfig.from_file(Path(folder) / "config.json")
        self.tokenizer = Tokenizer(Path(folder) / "tokenizer.model", image_token_id=self.config.image_token_id)
        self.num_image_tokens = self.config.num_image_tokens
        self.image_size = self.config.vision.image_size
        self.codec_path, self._codecs = None, {}

    def stream(self, image, prompt: str, max_new_tokens: int = 32, **sampling):
        """transformers generates in one go; its tokens are then yielded one by one."""
        (_, g), = self.generate_details([image], [prompt], max_new_tokens=max_new_tokens, batch_size=1, **sampling)
        yield from g.tokens[:max_new_tokens]

    def load_peft_adapters(self, folders: dict[str, Path]) -> None:
        """The adapters as peft holds them, one active at a time (set_adapter per request: how
        recursia-lab/anchor serves PaliGemma 2 adapters)."""
        from types import SimpleNamespace

        from peft import PeftModel

        names = list(folders)
        self.model = PeftModel.from_pretrained(self.model, str(folders[names[0]]), adapter_name=names[0]).eval()
        for name in names[1:]:
            self.model.load_adapter(str(folders[name]), adapter_name=name)
        self.adapters = SimpleNamespace(adapters=dict.fromkeys(names))  # what the app's routes look up

    def generate_details(self, images, prompts, max_new_tokens: int = 32, batch_size: int = 8,
                         do_sample: bool = False, seed: int | None = None, adapter: str | None = None, **sampling):
        import torch

        if adapter is not None:
            self.model.set_adapter(adapter)

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
        pixels = preprocess([im for ims in per_example for im in ims], self.image_size).to(DEVICE, self.model.dtype)
        ids, mask = ids.to(DEVICE), mask.to(DEVICE)
        if seed is not None:
            torch.manual_seed(seed)
        eos = self.tokenizer.eos_id
        base = self.model.disable_adapter() if adapter is None and hasattr(self.model, "disable_adapter") else None
        with torch.inference_mode(), base or contextlib.nullcontext():
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


DEVICE_VARIABLE = "PALIKIT_BENCH_DEVICE"
DEVICE = os.environ.get(DEVICE_VARIABLE, "cpu")

def run_server(library: str, checkpoint: str, scheduler: str, max_batch: int, threads: int) -> None:
    """Subprocess: serve on a free loopback port, print the URL, stop when stdin closes."""
    import torch

    import palikit
    from palikit.serve import app as serve_app
    from palikit.serve import background, create_app

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    adapters = {name: Path(checkpoint) / "adapters" / name for name in adapter_names(scheduler)}
    if library == "palikit":
        pipe = palikit.load(checkpoint, dtype="float32", device=DEVICE, batch_invariant=scheduler == "invariant")
    else:
        pipe = TransformersPipe(checkpoint)
        if adapters:
            pipe.load_peft_adapters(adapters)
    if scheduler in ("static", "peft-switch"):  # this process serves one app: its engine adapter becomes the static batcher
        serve_app.Batcher = StaticBatcher
    if scheduler == "peft-switch":
        max_batch = 1  # one request at a time, each after its set_adapter
    app = create_app(pipe, model_name=library, max_batch=max_batch, max_queue=4096, request_timeout_s=3600,
                     check_prompts=False, max_adapters=max(1, len(adapters)),
                     adapters=tuple(f"{n}={d}" for n, d in adapters.items()) if library == "palikit" else ())
    with background(app) as url:
        print(url, flush=True)
        sys.stdin.read()


# Request classes: short answers (ocr, a question) and long ones (a description, a segmentation:
# 4 <loc> + 16 <seg> tokens). Random weights seldom emit <eos>, so max_tokens is what a request costs.
CLASSES = {"ocr": ("ocr", 4, "short"), "answer": ("answer en what is in the picture?", 4, "short"),
           "describe": ("describe en", 48, "long"), "segment": ("segment cat", 20, "long")}


def workload(n: int, seed: int) -> list[tuple[str, str]]:
    """n (class, image data URL) pairs: short and long requests alike, eight images shared by all
    (the image cache sees the same photo under several prompts)."""
    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    names = list(CLASSES)
    return [(names[rng.integers(len(names))], urls[rng.integers(len(urls))]) for _ in range(n)]


async def load_test(url: str, requests: list[tuple[str, str]], clients: int, think_s: float, stream: bool,
                    seed: int, adapters: list[str] = ()) -> dict:
    """`clients` clients, each waiting an exponential think time (mean think_s) before its next
    request: Poisson arrivals while the clients keep up. Each request's latency, time to its first
    token (streamed: the first content event; otherwise the whole response) and tokens."""
    import httpx

    rng = np.random.default_rng(seed)
    done: list[dict] = []

    async def one(c, i: int) -> dict:
        name, image = requests[i]
        prompt, max_tokens, _ = CLASSES[name]
        body = {"max_tokens": max_tokens, "temperature": 0, "stream": stream,
                **({"model": adapters[i % len(adapters)]} if adapters else {}),
                "stream_options": {"include_usage": True} if stream else None,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                          {"type": "text", "text": prompt}]}]}
        t = time.perf_counter()
        first = None
        if not stream:
            r = await c.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            tokens = r.json()["usage"]["completion_tokens"]
        else:
            tokens = 0
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if first is None and any(ch["delta"].get("content") for ch in event.get("choices", [])):
                        first = time.perf_counter() - t
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
        latency = time.perf_counter() - t
        return {"class": name, "latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}

    async def client(c, todo, gaps):
        for i in todo:
            await asyncio.sleep(next(gaps))
            done.append(await one(c, i))

    def gaps():
        while True:
            yield float(rng.exponential(think_s)) if think_s > 0 else 0.0

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as c:
        warm_up = iter(range(min(len(requests), 2 * clients)))
        await asyncio.gather(*[client(c, warm_up, gaps()) for _ in range(clients)])
        done.clear()
        todo = iter(range(len(requests)))
        start = time.perf_counter()
        await asyncio.gather(*[client(c, todo, gaps()) for _ in range(clients)])
        wall = time.perf_counter() - start
    out = {"req_s": len(done) / wall, "tok_s": sum(d["tokens"] for d in done) / wall, "wall_s": wall}
    for kind in ("short", "long"):
        rows = [d for d in done if CLASSES[d["class"]][2] == kind]
        lat, ttft = [d["latency"] for d in rows], [d["ttft"] for d in rows]
        out[kind] = {"n": len(rows), "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
                     "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
                     "tokens": float(np.mean([d["tokens"] for d in rows]))}
    return out


# palikit-invariant: the engine in its batch-invariant mode (Options.batch_invariant), to price it.
# With --adapters N: palikit-adapters serves N LoRA adapters in its continuous batches, each request
# on one of them in turn; peft-switch is transformers + peft, one request at a time after its
# set_adapter (recursia-lab/anchor's way); the other servers answer the same requests on the base.
SERVERS = {"palikit-continuous": ("palikit", "continuous"), "palikit-invariant": ("palikit", "invariant"),
           "palikit-static": ("palikit", "static"), "transformers-static": ("transformers", "static"),
           "palikit-adapters": ("palikit", "adapters"), "peft-switch": ("transformers", "peft-switch")}
ADAPTERS_VARIABLE = "PALIKIT_BENCH_ADAPTERS"  # how many adapters the servers that serve adapters load


def adapter_names(scheduler: str) -> list[str]:
    if scheduler not in ("adapters", "peft-switch"):
        return []
    return [f"a{i}" for i in range(int(os.environ.get(ADAPTERS_VARIABLE, "0")))]


def resident_mb(pid: int) -> float:
    """A process's resident set (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--requests", type=int, default=160, help="requests per measurement")
    ap.add_argument("--think-ms", type=float, default=100, help="mean of each client's exponential think time")
    ap.add_argument("--max-batch", type=int, default=16, help="rows of the engine; the static batchers' max_batch")
    ap.add_argument("--stream", action="store_true", help="stream every answer (SSE): time to first token "
                    "measured at the first content event (the static batcher runs streamed requests alone)")
    ap.add_argument("--servers", nargs="+", choices=list(SERVERS), default=list(SERVERS))
    ap.add_argument("--checkpoint", help="reuse a checkpoint folder written by an earlier run")
    ap.add_argument("--threads", type=int, default=server_threads(),
                    help="torch threads per server; default: as `palikit serve`, all cores but one (0: torch's own)")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--device", default="cpu", help="where the servers run their model (cpu, cuda)")
    ap.add_argument("--adapters", type=int, default=0, help="LoRA adapters for palikit-adapters and peft-switch "
                    "(requests spread over them in turn)")
    ap.add_argument("--serve", nargs=4, metavar=("LIBRARY", "CHECKPOINT", "SCHEDULER", "MAX_BATCH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ[DEVICE_VARIABLE] = args.device  # the server subprocesses' too
    if args.serve:
        return run_server(*args.serve[:3], int(args.serve[3]), args.threads)

    folder = args.checkpoint
    if folder is None:
        folder = tempfile.mkdtemp(prefix="palikit-bench-serve-")
        make_checkpoint(Path(folder))
        print(f"wrote the random benchmark model to {folder}", flush=True)
    requests = workload(args.requests, seed=0)
    os.environ[ADAPTERS_VARIABLE] = str(args.adapters)  # the server subprocesses read it
    if args.adapters:
        make_adapters(Path(folder), args.adapters)
    rows = []
    for server in args.servers:
        library, scheduler = SERVERS[server]
        proc = subprocess.Popen([sys.executable, __file__, "--serve", library, folder, scheduler, str(args.max_batch),
                                 "--threads", str(args.threads)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            url = proc.stdout.readline().strip()
            if not url.startswith("http"):
                raise RuntimeError(f"{server} did not start")
            for clients in args.clients:
                result = asyncio.run(load_test(url, requests, clients, args.think_ms / 1000, args.stream, seed=1,
                                               adapters=adapter_names(scheduler)))
                rows.append({"server": server, "clients": clients, "rss_mb": resident_mb(proc.pid), **result})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.stdin.close()
            proc.wait(timeout=60)

    print(f"\n{args.requests} requests per row ({', '.join(f'{k}: {v[1]} tokens' for k, v in CLASSES.items())}), "
          f"mean think time {args.think_ms:g} ms, max_batch {args.max_batch}, "
          f"{'streamed' if args.stream else 'not streamed'}, torch threads per server: {args.threads or 'default'}\n")
    print("| server | clients | requests/s | tokens/s | short p50 / p99 (s) | short TTFT p50 / p99 (s) "
          "| long p50 / p99 (s) | long TTFT p50 / p99 (s) | resident MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sh, lo = r["short"], r["long"]
        print(f"| {r['server']} | {r['clients']} | {r['req_s']:.2f} | {r['tok_s']:.0f} "
              f"| {sh['p50_s']:.2f} / {sh['p99_s']:.2f} | {sh['ttft_p50_s']:.2f} / {sh['ttft_p99_s']:.2f} "
              f"| {lo['p50_s']:.2f} / {lo['p99_s']:.2f} | {lo['ttft_p50_s']:.2f} / {lo['ttft_p99_s']:.2f} "
              f"| {r['rss_mb']:.0f} |")
    by = {(r["server"], r["clients"]): r for r in rows}
    weights_mb = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20
    for clients in args.clients:
        mine, base, peft = (by.get((s, clients)) for s in ("palikit-adapters", "palikit-continuous", "peft-switch"))
        if mine and base:
            print(f"\n{args.adapters} adapters vs the base alone at {clients} clients: {mine['req_s'] / base['req_s']:.2f}x "
                  f"requests/s, resident {mine['rss_mb'] / base['rss_mb']:.2f}x ({args.adapters} merged copies: "
                  f"+{(args.adapters - 1) * weights_mb:.0f} MiB of weights over one)")
        if mine and peft:
            print(f"palikit's adapters vs peft set_adapter per request at {clients} clients: "
                  f"{mine['req_s'] / peft['req_s']:.2f}x requests/s, p99 short {mine['short']['p99_s'] / peft['short']['p99_s']:.2f}x, "
                  f"long {mine['long']['p99_s'] / peft['long']['p99_s']:.2f}x")
    base = {r["clients"]: r for r in rows if r["server"] == "palikit-static"}
    for r in rows:
        if r["server"] == "palikit-continuous" and r["clients"] in base:
            b = base[r["clients"]]
            print(f"\ncontinuous vs static at {r['clients']} clients: {r['req_s'] / b['req_s']:.2f}x requests/s, "
                  f"short-request p99 latency {r['short']['p99_s'] / b['short']['p99_s']:.2f}x")
    plain = {r["clients"]: r for r in rows if r["server"] == "palikit-continuous"}
    for r in rows:
        if r["server"] == "palikit-invariant" and r["clients"] in plain:
            p = plain[r["clients"]]
            print(f"\nbatch-invariant vs continuous at {r['clients']} clients: {r['req_s'] / p['req_s']:.2f}x "
                  f"requests/s, short p99 {r['short']['p99_s'] / p['short']['p99_s']:.2f}x, "
                  f"long p99 {r['long']['p99_s'] / p['long']['p99_s']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
