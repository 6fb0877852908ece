"""Atomic file writes: write to a temporary name in the same folder, then rename over the target,
so a crash never leaves a half-written file behind a valid name."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """write(tmp_path), then os.replace(tmp_path, path)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def read_records(path: str | Path, repair: bool = True) -> list[dict]:
    """The JSON records of an append-only .jsonl file (`palikit run` outputs, eval predictions).
    A torn last line left by a crash (not a JSON object) ends the records; with `repair` it is cut
    off, and a complete last record that only lacks its newline is terminated, so that appending
    goes on cleanly."""
    path = Path(path)
    if not path.exists():
        return []
    records, good_bytes, unterminated = [], 0, False
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                break
            if not isinstance(rec, dict):
                break
            records.append(rec)
            good_bytes += len(raw)
            unterminated = not raw.endswith(b"\n")
    if repair and good_bytes < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    if repair and unterminated:
        with open(path, "ab") as f:
            f.write(b"\n")
    return records


# ---- one file per rank under torchrun (`palikit run`, `palikit eval`), merged by rank 0


def rank_file(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}{out.suffix}")


def rank_files(out: Path) -> list[Path]:
    """The rank files beside `out` now, whatever the number of ranks that wrote them."""
    return sorted(out.parent.glob(f"{out.stem}.rank*{out.suffix}"))


def merge_rank_files(out: Path, key: str) -> list[dict]:
    """The records of `out` and of every rank file beside it, one per `key` (a record without an
    error over one with, else the last), in the order of their `key`; when there are rank files or
    records of one key, they are written into `out` (atomically) and the rank files removed."""
    parts = rank_files(out)
    records, n = {}, 0
    for path in [out, *parts]:
        for r in read_records(path, repair=False):
            n += 1
            if "error" not in r or "error" in records.get(r[key], r):
                records[r[key]] = r
    ordered = [records[k] for k in sorted(records)]
    if parts or n > len(ordered):
        write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
        for path in parts:
            path.unlink()
    return ordered


def write_folder_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp_folder) beside `path`, then rename it to `path` (replacing what was there): a write
    that fails leaves neither its temporary folder nor a changed `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path
