"""Draw detections and segmentations on their image: tinted masks, outlined boxes, labels."""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .processor import load_image
from .tasks import Detection, Segmentation

# The colour rule, which the web demo (serve/static/app.js) computes the same way: a label's crc32
# picks one of HUES (crc32, not hash(): str hashes are salted per process, and a label should keep its
# colour), and an object's index among its label's objects picks a lightness of that hue.
HUES = 12  # 30 degrees apart: two labels get hues that can be told apart, or the same one
SATURATION = 0.75
SHADES = (0.45, 0.3, 0.6, 0.38, 0.52)  # lightness of a label's 1st, 2nd... object, then again


def _hsl(hue: float, s: float, lightness: float) -> tuple[int, int, int]:
    # Written out, not colorsys, so that app.js can repeat it operation for operation.
    c = (1 - abs(2 * lightness - 1)) * s
    x = c * (1 - abs((hue / 60) % 2 - 1))
    m = lightness - c / 2
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(hue // 60) % 6]
    return tuple(math.floor((v + m) * 255 + 0.5) for v in (r, g, b))


def colours(labels: Sequence[str]) -> list[tuple[int, int, int]]:
    """The colour of each object of a result, by its label: objects with one label get shades of one
    hue, different labels different hues (bar a 1 in 12 chance that two labels hash to one)."""
    seen: Counter[str] = Counter()
    out = []
    for label in labels:
        hue = zlib.crc32(label.encode()) % HUES * (360 / HUES)
        out.append(_hsl(hue, SATURATION, SHADES[seen[label] % len(SHADES)]))
        seen[label] += 1
    return out


def _ink(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Text colour on a `colour` background: black on the light shades, white on the dark."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _label_at(box, w: int, h: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a box's w x h label: above the box, else below it, else (a box as tall as the
    image) inside its top edge, so that the label leaves the object's middle visible; always inside the
    image, as the web demo places it."""
    x1, y1, _, y2 = box
    width, height = image_size
    x = max(0, min(round(x1), width - w))
    if y1 >= h:
        return x, round(y1) - h
    if y2 + 1 + h <= height:
        return x, round(y2) + 1
    return x, max(0, min(round(y1), height - h))


def draw(
    image,
    results: Sequence[Detection | Segmentation],
    *,
    mask_alpha: float = 0.45,
    line_width: int | None = None,
) -> Image.Image:
    """An RGB copy of `image` (a path, bytes, array or PIL image, as everywhere in palikit; EXIF
    rotation applied, as the boxes are) with masks tinted, boxes outlined and `label confidence`.
    Each object has its own colour: shades of one hue for objects with the same label."""
    out = load_image(image).convert("RGB")  # always a copy
    width = line_width or max(2, round(max(out.size) / 300))
    palette = colours([r.label for r in results])
    overlay = Image.new("RGBA", out.size, (0, 0, 0, 0))
    # White diagonal stripes over each mask, as in the web demo: a tint alone vanishes over a shape of
    # its own colour.
    stripes = np.add(*np.indices((out.height, out.width))) % (5 * width) < width
    for r, colour in zip(results, palette):
        mask = getattr(r, "mask", None)
        if mask is None:
            continue
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (out.height, out.width):
            raise ValueError(f"mask shape {list(mask.shape)} does not match image {out.height}x{out.width}")
        alpha = round(255 * mask_alpha)
        overlay.paste((*colour, 255), mask=Image.fromarray(mask.astype(np.uint8) * alpha))
        overlay.paste((255, 255, 255, 255), mask=Image.fromarray((mask & stripes).astype(np.uint8) * alpha))
    out = Image.alpha_composite(out.convert("RGBA"), overlay).convert("RGB")

    pen = ImageDraw.Draw(out)
    for r, colour in zip(results, palette):
        pen.rectangle(r.box, outline=colour, width=width)
        caption = r.label if r.confidence is None else f"{r.label} {r.confidence:.2f}".strip()
        if not caption:
            continue
        left, top, right, bottom = pen.textbbox((0, 0), caption)
        w, h = right - left + 2, bottom - top + 2
        x, y = _label_at(r.box, w, h, out.size)
        pen.rectangle((x, y, x + w - 1, y + h - 1), fill=colour)
        pen.text((x + 1 - left, y + 1 - top), caption, fill=_ink(colour))
    return out
