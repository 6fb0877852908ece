"""Draw detections and segmentations on their image: tinted masks, outlined boxes, labels."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .processor import load_image
from .tasks import Detection, Segmentation

# matplotlib's tab10: distinct hues that stay readable on photos.
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def _colour(label: str) -> tuple[int, int, int]:
    # crc32, not hash(): str hashes are salted per process, and colours should not change.
    return _PALETTE[zlib.crc32(label.encode()) % len(_PALETTE)]


def draw(
    image,
    results: Sequence[Detection | Segmentation],
    *,
    mask_alpha: float = 0.45,
    line_width: int | None = None,
) -> Image.Image:
    """An RGB copy of `image` (a path, bytes, array or PIL image, as everywhere in palikit; EXIF
    rotation applied, as the boxes are) with masks tinted, boxes outlined and `label confidence`."""
    out = load_image(image).convert("RGB")  # always a copy
    overlay = Image.new("RGBA", out.size, (0, 0, 0, 0))
    for r in results:
        mask = getattr(r, "mask", None)
        if mask is None:
            continue
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (out.height, out.width):
            raise ValueError(f"mask shape {list(mask.shape)} does not match image {out.height}x{out.width}")
        alpha = Image.fromarray(mask.astype(np.uint8) * round(255 * mask_alpha))
        overlay.paste((*_colour(r.label), 255), mask=alpha)
    out = Image.alpha_composite(out.convert("RGBA"), overlay).convert("RGB")

    pen = ImageDraw.Draw(out)
    width = line_width or max(2, round(max(out.size) / 300))
    for r in results:
        colour = _colour(r.label)
        x1, y1, x2, y2 = r.box
        pen.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        caption = r.label if r.confidence is None else f"{r.label} {r.confidence:.2f}".strip()
        if not caption:
            continue
        left, top, right, bottom = pen.textbbox((x1, y1), caption)
        lift = bottom - top + 2 if y1 >= bottom - top + 2 else 0  # above the box when it fits
        pen.rectangle((left, top - lift, right + 2, bottom - lift), fill=colour)
        pen.text((x1 + 1, y1 - lift), caption, fill=(255, 255, 255))
    return out
