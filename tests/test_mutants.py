"""tools/mutants.py's entries still name code that exists: each mutant's text occurs exactly once in
its file, and each test it names is collected. A moved piece of code then fails here in seconds,
not as a STALE verdict at the end of `make mutants`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_mutants():
    spec = importlib.util.spec_from_file_location("palikit_mutants", ROOT / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["palikit_mutants"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.MUTANTS


def test_every_mutant_applies_and_names_collected_tests():
    mutants = load_mutants()
    stale = [m.name for m in mutants if m.apply((ROOT / m.path).read_text()) is None]
    assert not stale, f"mutants whose code moved (update tools/mutants.py): {stale}"
    assert len({m.name for m in mutants}) == len(mutants), "two mutants share a name"
    wanted = sorted({t for m in mutants for t in m.tests})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *wanted],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
