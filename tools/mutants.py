"""Break palikit on purpose and check that the tests guarding each invariant fail.

A test that passes whatever the code does guards nothing. Each mutant is one deliberate bug in an
invariant (resume, masks, soft-caps, exactness, loss scaling, data order, engine isolation, ...),
stored as a patch in tests/mutants/NAME.patch: a unified diff of the source, after a header that
names the tests that must fail on it:

    # kills: tests/test_engine.py::test_greedy_equals_alone_whatever_the_arrival
    # why: a moved row must carry its cache
    --- a/palikit/engine.py
    +++ b/palikit/engine.py
    @@ ...

The patch is applied with GNU patch and fuzz, so a mutant survives code that moved or whose
neighbouring lines changed; only a rewrite of the mutated lines themselves makes it STALE. The
tool copies the tree, runs the named tests on the unmutated copy first (they must pass, or a
failure would prove nothing), then applies each mutant to a fresh copy, runs its tests there (the
copy's palikit first on the path, also in the subprocesses the tests start) and reports:

    killed     every named test failed: the tests see the bug
    SURVIVED   a named test passed (or was skipped) on broken code: it cannot fail on this
    STALE      the patch no longer applies (the mutated lines were rewritten: make the patch again)
    ERROR      pytest could not run the tests (collection error, missing test id)
    HUNG       the tests ran past the time limit instead of failing

    .venv/bin/python tools/mutants.py                    # every mutant (make mutants)
    .venv/bin/python tools/mutants.py --budget 900       # as many as 15 minutes allow (CI)
    .venv/bin/python tools/mutants.py resume masks       # those whose name contains a word
    .venv/bin/python tools/mutants.py --list
    .venv/bin/python tools/mutants.py new NAME --file palikit/x.py --old TEXT --new TEXT --kills TEST ...

With a budget, the mutants run in an order that rotates with the number of commits, so successive
CI runs cover them all. Exit status 1 when the baseline fails or a mutant that ran is not killed.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "tests" / "mutants"
TIME_LIMIT_S = 600  # per pytest run; a mutant that makes a test hang must not stall CI
COPIED = ("palikit", "tests", "configs", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    patch: Path
    kills: tuple[str, ...]
    why: str


def load() -> list[Mutant]:
    out = []
    for path in sorted(MUTANTS.glob("*.patch")):
        header = {}
        for line in path.read_text().splitlines():
            if not line.startswith("# "):
                break
            key, _, value = line[2:].partition(":")
            header[key.strip()] = value.strip()
        out.append(Mutant(path.stem, path, tuple(header.get("kills", "").split()), header.get("why", "")))
    return out


def copy_tree(dest: Path) -> Path:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy(src, dest / name)
    return dest


def apply(mutant: Mutant, tree: Path, dry_run: bool = False) -> bool:
    """Whether the patch applies to `tree` (GNU patch, fuzz 2: up to two context lines may differ)."""
    cmd = ["patch", "-p1", "--fuzz=2", "--batch", "--forward", "--no-backup-if-mismatch", "-r", "-",
           "-i", str(mutant.patch)] + (["--dry-run"] if dry_run else [])
    return subprocess.run(cmd, cwd=tree, capture_output=True, text=True).returncode == 0


def run_tests(tree: Path, tests: list[str]) -> tuple[str, dict[str, str]]:
    """('ran' | 'error' | 'hung', {test id: outcome}) of the tests run in `tree`."""
    report = tree / "report.xml"
    env = {**os.environ, "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        code = proc.wait(TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "hung", {}
    if code not in (0, 1) or not report.exists():
        return "error", {}
    import xml.etree.ElementTree as ET

    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        path = case.get("classname", "").replace(".", "/") + ".py"
        node = f"{path}::{case.get('name')}"
        failed = any(child.tag in ("failure", "error") for child in case)
        outcomes[node] = "failed" if failed else "skipped" if any(c.tag == "skipped" for c in case) else "passed"
    return "ran", outcomes


def verdict(mutant: Mutant, work: Path) -> str:
    tree = copy_tree(work / mutant.name)
    if not apply(mutant, tree):
        return "STALE"
    status, outcomes = run_tests(tree, list(mutant.kills))
    if status == "hung":
        return "HUNG"
    if status == "error":
        return "ERROR"
    return "killed" if all(outcomes.get(t) == "failed" for t in mutant.kills) else "SURVIVED"


def rotation() -> int:
    try:
        return int(subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip() or 0)
    except (OSError, ValueError):
        return 0


def new(args) -> None:
    """Write tests/mutants/NAME.patch from --old / --new texts of --file."""
    path = ROOT / args.file
    source = path.read_text()
    if source.count(args.old) != 1:
        sys.exit(f"{args.file}: the text occurs {source.count(args.old)} times, not once")
    mutated = source.replace(args.old, args.new)
    diff = difflib.unified_diff(source.splitlines(True), mutated.splitlines(True), f"a/{args.file}", f"b/{args.file}")
    MUTANTS.mkdir(parents=True, exist_ok=True)
    target = MUTANTS / f"{args.name}.patch"
    target.write_text(f"# kills: {' '.join(args.kills)}\n# why: {args.why}\n" + "".join(diff))
    print(target)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "new":
        ap = argparse.ArgumentParser(prog="mutants.py new")
        ap.add_argument("name")
        ap.add_argument("--file", required=True)
        ap.add_argument("--old", required=True)
        ap.add_argument("--new", required=True)
        ap.add_argument("--kills", nargs="+", required=True)
        ap.add_argument("--why", default="")
        new(ap.parse_args(sys.argv[2:]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("words", nargs="*", help="only mutants whose name contains one of these")
    ap.add_argument("--budget", type=float, help="seconds: start no mutant after this (rotating order)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    mutants = [m for m in load() if not args.words or any(w in m.name for w in args.words)]
    if args.list:
        for m in mutants:
            print(f"{m.name:60} {m.why}")
        return 0
    if args.budget is not None and mutants:
        k = rotation() % len(mutants)
        mutants = mutants[k:] + mutants[:k]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="palikit-mutants-") as tmp:
        work = Path(tmp)
        tests = sorted({t for m in mutants for t in m.kills})
        status, outcomes = run_tests(copy_tree(work / "baseline"), tests) if tests else ("ran", {})
        failing = [t for t in tests if outcomes.get(t) != "passed"]
        if status != "ran" or failing:
            print(f"baseline: {status}; tests that do not pass on the unmutated code: {failing[:10]}")
            return 1
        print(f"baseline: {len(tests)} tests pass ({time.monotonic() - start:.0f} s)", flush=True)
        results = {}
        for m in mutants:
            if args.budget is not None and time.monotonic() - start > args.budget:
                break
            t = time.monotonic()
            results[m.name] = verdict(m, work)
            print(f"{results[m.name]:9} {m.name} ({time.monotonic() - t:.0f} s)", flush=True)
    bad = [n for n, v in results.items() if v != "killed"]
    print(f"{len(results) - len(bad)} of {len(results)} mutants killed ({len(mutants) - len(results)} not run within "
          f"the budget) in {time.monotonic() - start:.0f} s" + (f"; not killed: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
