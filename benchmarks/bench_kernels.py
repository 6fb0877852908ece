"""The routes of palikit.kernels, product by product, on this CPU (or as an AVX2 one): the numbers
behind each route's choice (docs/performance.md).

    .venv/bin/python benchmarks/bench_kernels.py [--emulate-avx2] [--rows 1 8 16 32 64 266]

For PaliGemma 2 3B's matrices (q_proj, gate_proj, down_proj; 2304 wide, the down projection 9216)
and a range of row counts, the best of 5 times of every way to multiply: the dense bfloat16 product
(oneDNN, and ATen's own GEMV with oneDNN off), the float32 product on the weight upcast into a
scratch, the int8 weight-only kernel and the dequantised int8 GEMM (bfloat16 and float32), torch._int_mm
(w8a8), the int4 kernel and its dequantised GEMM. Eight copies of each weight are used in turn, so
that a weight is read from memory as in a decode step, not from the last-level cache. Results go
to benchmarks/results/DATE-kernels-CPUKIND.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import AVX2_ENV, describe, results_file  # noqa: E402

SHAPES = {"q_proj": (2048, 2304), "gate_proj": (9216, 2304), "down_proj": (2304, 9216)}
COPIES = 8


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(COPIES):
            fn(i)
        best = min(best, (time.perf_counter() - t) / COPIES)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 266])
    ap.add_argument("--emulate-avx2", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.emulate_avx2:
        os.environ.update(AVX2_ENV)
    import torch
    import torch.nn.functional as F

    from palikit import kernels

    torch.set_num_threads(os.cpu_count() or 2)
    results = {}
    for name, (n, k) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        w32 = [torch.randn(n, k, generator=g) * 0.02 for _ in range(COPIES)]
        wbf = [w.bfloat16() for w in w32]
        q8 = [(w / (w.abs().amax(1, keepdim=True) / 127)).round().to(torch.int8) for w in w32]
        s8 = [(w.abs().amax(1) / 127).bfloat16() for w in w32]
        q4 = [kernels.int4_pack(((w - w.min()) / (w.max() - w.min()) * 15).round()) for w in w32]
        sz = torch.stack([torch.full((k // 32, n), 0.01), torch.zeros(k // 32, n)], -1).bfloat16()
        del w32
        for rows in args.rows:
            x = torch.randn(rows, k).bfloat16()
            xi = torch.randint(-127, 127, (rows, k), dtype=torch.int8)
            r = {}
            with torch.inference_mode():
                r["bf16 oneDNN"] = best_ms(lambda i=0: F.linear(x, wbf[i]))
                torch.backends.mkldnn.enabled = False
                r["bf16 ATen"] = best_ms(lambda i=0: F.linear(x, wbf[i]))
                torch.backends.mkldnn.enabled = True
                scratch = torch.empty(n, k)
                r["float32 upcast"] = best_ms(lambda i=0: F.linear(x.float(), scratch.copy_(wbf[i])).bfloat16())
                r["int8 kernel"] = best_ms(lambda i=0: torch.ops.aten._weight_int8pack_mm(x, q8[i], s8[i]))
                dense = torch.empty(n, k, dtype=torch.bfloat16)
                r["int8 dequantised bf16"] = best_ms(lambda i=0: F.linear(x, dense.copy_(q8[i])).mul_(s8[i]))
                r["int8 dequantised float32"] = best_ms(
                    lambda i=0: F.linear(x.float(), scratch.copy_(q8[i])).mul_(s8[i].float()).bfloat16())
                r["w8a8 _int_mm"] = best_ms(lambda i=0: torch._int_mm(xi, q8[i].t()))
                r["int4 kernel"] = best_ms(lambda i=0: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4[i], 32, sz))
                if kernels.int4_block_rows() and rows >= kernels.PROMPT_ROWS:  # its route from PROMPT_ROWS on
                    r["int4 dequantised"] = best_ms(lambda i=0: kernels.int4_linear(x, q4[i], 32, sz, n))
            results[f"{name} x {rows}"] = r
            print(f"{name:10} rows {rows:4}: " + ", ".join(f"{a} {b:.2f}" for a, b in r.items()), flush=True)
    machine = describe()
    out = Path(args.out) if args.out else results_file("kernels", machine)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "unit": "ms per product, best of 5 over 8 weight copies",
                               "products": results}, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
