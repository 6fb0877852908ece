"""The mutants of tools/mutants.py still fit the code: each patch in tests/mutants applies (with the
tool's fuzz) and names tests that are collected. A rewritten piece of code then fails here in
seconds, not as a STALE verdict at the end of `make mutants`."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("palikit_mutants", ROOT / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["palikit_mutants"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("patch") is None, reason="GNU patch applies the mutants")
def test_every_mutant_applies_and_names_collected_tests():
    tool = load_tool()
    mutants = tool.load()
    assert 30 <= len(mutants) <= 60, "30-60 semantic mutants of the invariants"
    assert all(m.kills and m.why for m in mutants), "each names the tests that kill it and why"
    stale = [m.name for m in mutants if not tool.apply(m, ROOT, dry_run=True)]
    assert not stale, f"mutants whose lines were rewritten (make their patches again): {stale}"
    wanted = sorted({t for m in mutants for t in m.kills})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *wanted],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
