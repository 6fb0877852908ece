"""`python -m palikit.eval ARGS`: what torchrun starts on every rank for a sharded evaluation,
`torchrun --nproc_per_node N -m palikit.eval --benchmark vqav2 --data DIR --out preds.jsonl`. The
same command as `palikit eval` (palikit.cli parses it; rank 0 merges and prints), so the two
cannot drift apart."""

import sys

from palikit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval", *sys.argv[1:]]))
