"""`python -m palikit.finetune CONFIG [--set k=v ...] [--resume] [--smoke]`: what torchrun starts on
every rank. The same command as `palikit train` (palikit.cli parses it, logs at INFO and prints the
result on rank 0 only), so the two cannot drift apart."""

import sys

from palikit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
