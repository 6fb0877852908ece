"""`python -m palikit VERB ...`: the `palikit` command, for launchers that start modules, e.g.
`torchrun --nproc_per_node 2 -m palikit run --input jobs.jsonl --output out.jsonl`."""

import sys

from palikit.cli import main

if __name__ == "__main__":
    sys.exit(main())
