"""COCO compressed RLE of boolean masks, byte-identical to pycocotools' `mask.encode` / `decode`
(the format of `segmentation` in COCO annotations and of palikit's mask outputs)."""

from __future__ import annotations

from typing import Any

import numpy as np


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE `{"size": [H, W], "counts": str}` of a [H, W] mask, as pycocotools.

    Runs are counted down the columns (Fortran order), starting with a (possibly empty) run
    of zeros. Each count is stored as 5-bit chunks, least significant first, one char each
    (48 + chunk, +32 when another chunk follows; bit 4 of the last chunk is the sign). From
    the fourth count on, the difference to the count two before is stored instead.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {list(m.shape)}")
    flat = m.astype(bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count  # pycocotools starts deltas at i > 2
        more = True
        while more:
            chunk = x & 0x1F
            x >>= 5  # arithmetic shift: negative deltas end in all-ones
            more = x != (-1 if chunk & 0x10 else 0)
            chars.append(chr(48 + chunk + (0x20 if more else 0)))
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": "".join(chars)}


def _rle_counts_from_string(s: str) -> list[int]:
    counts: list[int] = []
    x = shift = 0
    for ch in s:
        chunk = ord(ch) - 48
        if not 0 <= chunk < 64:
            raise ValueError(f"invalid character {ch!r} in RLE counts")
        x |= (chunk & 0x1F) << shift
        shift += 5
        if chunk & 0x20:
            continue
        if chunk & 0x10:
            x -= 1 << shift  # sign-extend
        counts.append(x + counts[-2] if len(counts) > 2 else x)
        x = shift = 0
    if shift:
        raise ValueError("RLE counts string ends in the middle of a number")
    return counts


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Bool [H, W] mask from COCO RLE; counts may be a str, bytes (pycocotools) or a list."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = _rle_counts_from_string(counts)
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(f"RLE counts {counts[:8]}... do not cover a {h}x{w} mask")
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(values, counts).reshape((h, w), order="F")
