"""A seeded synthetic "shapes world" for training and testing a tiny PaliGemma on a CPU.

A scene is a light, lightly textured background with 1-3 flat shapes (circle, square,
triangle, star in red, green, blue, yellow) and, in some images, a black 4-digit number.
The generator records the ground truth (kind, colour, visible mask, tight box, number), and
every example (caption, count, colour, ocr, detect, segment) is an exact function of it, so
exact-match scoring is meaningful.

Sizes are fractions of the image side, so the world looks the same at 64 or 96 px. At the
default 96 px shapes are 17-31 px across and digits about 17-20 px tall.

Determinism: image ``i`` of a dataset is drawn from ``np.random.default_rng([seed, i])``. The
same seed gives the same bytes whatever ``n_images`` is, and ``iter_examples`` yields exactly
what ``generate_dataset`` writes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, get_args

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import tasks
from .atomic import atomic_write

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Saturated and darker than any background, so every shape stands out; yellow differs from
# the light background mainly in the blue channel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (230, 190, 20),
}
# What an example asks about a scene (the "task" field of the data files, for per-question metrics).
SceneQuestion = Literal["caption", "count", "colour", "ocr", "detect", "segment"]
SCENE_QUESTIONS: tuple[SceneQuestion, ...] = get_args(SceneQuestion)

# The prompts of this world's examples, and so all that a model trained on it (the bundled default
# model) knows: English captions, two kinds of question, 4-digit OCR, detect and segment of a kind.
# No `cap` / `describe` styles, no question generation, no other language.
CAPTION_PROMPT = "caption en"
COUNT_PROMPT = "answer en how many {}s?"
COLOUR_PROMPT = "answer en what colour is the {}?"
OCR_PROMPT = "ocr"
DETECT_PROMPT = "detect {}"  # one kind, or two: "detect circle ; star"
SEGMENT_PROMPT = "segment {}"
TRAINED_PROMPTS = (CAPTION_PROMPT, COUNT_PROMPT, COLOUR_PROMPT, OCR_PROMPT, DETECT_PROMPT, SEGMENT_PROMPT)


def trained_prompts_text() -> str:
    """The prompts above as README, the model card and `palikit demo` state them."""
    shown = [f"`{p.format('KIND')}`" for p in TRAINED_PROMPTS]
    return (", ".join(shown) + " (KIND: " + ", ".join(KINDS) + "), in English only; not the `cap` / `describe` "
            "caption styles, question generation or other languages")


Box = tuple[int, int, int, int]  # pixel x1, y1, x2, y2; x2 and y2 are exclusive
# encode_mask(visible_mask[H, W] bool, box_xyxy) -> the 16 seg codes of the mask
MaskEncoder = Callable[[np.ndarray, Box], Sequence[int]]

# Scene geometry, as fractions of the image side.
_SIDE = (0.18, 0.32)  # shape extent: 17-31 px at 96
_STAR_SCALE = 1.15  # a star covers less of its box than the others; enlarge it to compensate
_STAR_INNER = 0.5  # inner/outer radius; thinner points vanish at 64 px
_FONT = (0.26, 0.29)  # font size; digit ink height is about 0.7 of it
_MIN_VISIBLE = 0.6  # each shape keeps at least this fraction of its pixels after occlusion
_MAX_SHAPES = 3
# Kinds drawn uniformly would make "how many X?" = 2 or 3 rare; repeat a kind this often.
_REPEAT_KIND = 0.4
_ATTEMPTS = 100  # placement tries per shape before giving up on it

_T = TypeVar("_T")


@dataclass
class Shape:
    kind: str
    colour: str
    box: Box  # tight on `mask`
    mask: np.ndarray  # [H, W] bool, pixels still visible after occlusion
    centre: tuple[float, float]  # (x, y) the shape was drawn around, before occlusion
    visible: float  # fraction of the drawn shape left visible, >= _MIN_VISIBLE


@dataclass
class Scene:
    image: Image.Image  # RGB, size x size
    shapes: list[Shape]  # drawing order, bottom first; see left_to_right()
    number: str | None = None
    number_box: Box | None = None  # tight on the digits' ink


# ---------------------------------------------------------------------------- rendering


def _pick(rng: np.random.Generator, seq: Sequence[_T]) -> _T:
    # rng.choice would turn strings into np.str_, which then leak into JSON and dataclasses.
    return seq[int(rng.integers(len(seq)))]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[H, W, 3] float: a light near-grey, plain, noisy or striped (low amplitude)."""
    base = rng.uniform(205, 240) + rng.uniform(-8, 8, size=3)
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    style = int(rng.integers(3))
    if style == 1:  # grey pixel noise
        img = img + rng.normal(0, rng.uniform(3, 7), size=(size, size, 1))
    elif style == 2:  # soft stripes at a random angle
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.06, 0.17) * size
        yy, xx = np.mgrid[0:size, 0:size]
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
        img = img + rng.uniform(4, 9) * np.sin(phase)[..., None]
    return img


def _shape_mask(kind: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """[H, W] bool of one shape, drawn aliased so the mask is exactly the painted pixels."""
    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    r = side / 2
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif kind == "triangle":  # apex up, as wide as it is tall
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=1)
    elif kind == "star":  # five points, one pointing up
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * _STAR_INNER)
        draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=1)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return np.array(canvas, dtype=bool)


def _tight_box(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _render_number(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """A random 4-digit string and its [H, W] float ink alpha at a random spot."""
    number = f"{int(rng.integers(10000)):04d}"
    font = ImageFont.load_default(size=round(size * rng.uniform(*_FONT)))
    left, top, right, bottom = font.getbbox(number)
    margin = max(1, size // 32)
    x = int(rng.integers(margin, max(margin, size - (right - left) - margin) + 1))
    y = int(rng.integers(margin, max(margin, size - (bottom - top) - margin) + 1))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).text((x - left, y - top), number, font=font, fill=255)
    return number, np.asarray(canvas, dtype=np.float32) / 255


def _visible_masks(full: list[np.ndarray]) -> list[np.ndarray]:
    """Later shapes are drawn on top: subtract everything above each shape."""
    visible, above = [], np.zeros_like(full[0])
    for mask in reversed(full):
        visible.append(mask & ~above)
        above |= mask
    return visible[::-1]


def _touches(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two masks overlap or are 4-neighbours somewhere."""
    grown = b.copy()
    grown[1:] |= b[:-1]
    grown[:-1] |= b[1:]
    grown[:, 1:] |= b[:, :-1]
    grown[:, :-1] |= b[:, 1:]
    return bool((a & grown).any())


def _layout_ok(full: list[np.ndarray], colours: list[str], min_gap: int) -> bool:
    """Checks a layout whose last shape is new."""
    # Same-coloured shapes that touch merge into one blob: no image could tell them apart.
    if any(c == colours[-1] and _touches(m, full[-1]) for m, c in zip(full[:-1], colours[:-1])):
        return False
    visible = _visible_masks(full)
    if any(v.sum() < _MIN_VISIBLE * f.sum() for v, f in zip(visible, full)):
        return False
    # Captions and detections list shapes by their left edge: keep those edges apart so the
    # order is visible in the image, not decided by a pixel.
    x1 = sorted(_tight_box(v)[0] for v in visible)
    return all(b - a >= min_gap for a, b in zip(x1, x1[1:]))


def make_scene(rng: np.random.Generator, size: int = 96, number_prob: float = 0.5) -> Scene:
    """Draw one scene: background, 1-3 shapes, and with probability `number_prob` a number."""
    img = _background(rng, size)
    blocked = np.zeros((size, size), dtype=bool)  # where shapes may not go: around the number
    number, ink, number_box = None, None, None
    if rng.random() < number_prob:
        number, ink = _render_number(rng, size)
        number_box = _tight_box(ink > 0.25)
        pad = max(2, size // 32)
        x1, y1, x2, y2 = number_box
        blocked[max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad] = True

    kinds: list[str] = []
    colours: list[str] = []
    full: list[np.ndarray] = []
    centres: list[tuple[float, float]] = []
    min_gap = max(2, size // 24)
    for _ in range(int(rng.integers(1, _MAX_SHAPES + 1))):
        repeat = bool(kinds) and rng.random() < _REPEAT_KIND
        kind = _pick(rng, kinds) if repeat else _pick(rng, KINDS)
        colour = _pick(rng, list(COLOURS))
        for _attempt in range(_ATTEMPTS):
            side = rng.uniform(*_SIDE) * size * (_STAR_SCALE if kind == "star" else 1.0)
            cx, cy = rng.uniform(side / 2, size - side / 2, size=2)
            mask = _shape_mask(kind, cx, cy, side, size)
            if not (mask & blocked).any() and _layout_ok([*full, mask], [*colours, colour], min_gap):
                kinds.append(kind)
                colours.append(colour)
                full.append(mask)
                centres.append((float(cx), float(cy)))
                break
    if not full:
        raise RuntimeError(f"could not place any shape at size={size}; is the image too small?")

    shapes = []
    for kind, colour, mask, vis, centre in zip(kinds, colours, full, _visible_masks(full), centres):
        rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, size=3), 0, 255)
        img[mask] = rgb  # painted in drawing order, so later shapes cover earlier ones
        shapes.append(Shape(kind, colour, _tight_box(vis), vis, centre, float(vis.sum() / mask.sum())))
    if ink is not None:
        text_rgb = rng.uniform(0, 40)  # near-black
        img = img * (1 - ink[..., None]) + text_rgb * ink[..., None]
    image = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8))
    return Scene(image, shapes, number, number_box)


# ---------------------------------------------------------------------------- examples


def left_to_right(shapes: Sequence[Shape]) -> list[Shape]:
    """The canonical order of captions and detections: by box x1, then y1."""
    return sorted(shapes, key=lambda s: (s.box[0], s.box[1]))


def caption(shapes: Sequence[Shape]) -> str:
    """'a red circle', 'a red circle and a blue star', 'a red circle, a blue star and a green square'."""
    phrases = [f"a {s.colour} {s.kind}" for s in left_to_right(shapes)]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _box_locs(box: Box, width: int, height: int) -> str:
    return tasks.boxes_to_loc([box], width, height)[0]


def _example(prefix: str, suffix: str, task: SceneQuestion) -> dict[str, str]:
    return {"prefix": prefix, "suffix": suffix, "task": task}


def scene_examples(
    scene: Scene, rng: np.random.Generator, encode_mask: MaskEncoder | None = None
) -> list[dict[str, str]]:
    """The prefix/suffix examples asked about one scene; `rng` picks which questions.

    Always a caption and a detection; a count of a present kind and, half the time, of an
    absent one (answer "0"); a colour question when some kind occurs exactly once; ocr when
    there is a number; half the time a two-kind detection; a segmentation when
    `encode_mask` is given.
    """
    width, height = scene.image.size
    shapes = left_to_right(scene.shapes)
    present = [k for k in KINDS if any(s.kind == k for s in shapes)]
    absent = [k for k in KINDS if k not in present]

    def count(kind: str) -> int:
        return sum(s.kind == kind for s in shapes)

    def instances(kinds: Sequence[str]) -> list[Shape]:
        return [s for s in shapes if s.kind in kinds]  # stays left to right

    examples = [_example(CAPTION_PROMPT, caption(shapes), "caption")]

    count_kinds = [_pick(rng, present)]
    if absent and rng.random() < 0.5:
        count_kinds.append(_pick(rng, absent))
    for kind in count_kinds:
        examples.append(_example(COUNT_PROMPT.format(kind), str(count(kind)), "count"))

    singles = [k for k in present if count(k) == 1]
    if singles:
        kind = _pick(rng, singles)
        colour = instances([kind])[0].colour
        examples.append(_example(COLOUR_PROMPT.format(kind), colour, "colour"))

    if scene.number is not None:
        examples.append(_example(OCR_PROMPT, scene.number, "ocr"))

    # Only present kinds are asked alone, so a detection suffix is never empty; the second
    # kind of a pair may be absent, which teaches the model to skip it.
    queries = [[_pick(rng, present)]]
    if rng.random() < 0.5:
        pair = [queries[0][0], _pick(rng, [k for k in KINDS if k != queries[0][0]])]
        queries.append(pair if rng.random() < 0.5 else pair[::-1])
    for kinds in queries:
        suffix = " ; ".join(f"{_box_locs(s.box, width, height)} {s.kind}" for s in instances(kinds))
        examples.append(_example(DETECT_PROMPT.format(" ; ".join(kinds)), suffix, "detect"))

    if encode_mask is not None:
        kind = _pick(rng, present)
        objects = []
        for s in instances([kind]):
            codes = [int(c) for c in encode_mask(s.mask, s.box)]
            objects.append(tasks.segmentation_suffix(_box_locs(s.box, width, height), codes, kind))
        examples.append(_example(SEGMENT_PROMPT.format(kind), " ; ".join(objects), "segment"))
    return examples


# ---------------------------------------------------------------------------- datasets


def _scene_and_examples(
    seed: int, index: int, size: int, encode_mask: MaskEncoder | None, number_prob: float
) -> tuple[Scene, list[dict[str, str]]]:
    # One generator per image: image i does not depend on how many images come before it.
    rng = np.random.default_rng([seed, index])
    scene = make_scene(rng, size, number_prob)
    return scene, scene_examples(scene, rng, encode_mask)


def iter_examples(
    n_images: int,
    seed: int,
    size: int = 96,
    encode_mask: MaskEncoder | None = None,
    number_prob: float = 0.5,
) -> Iterator[tuple[Image.Image, dict[str, str], Scene]]:
    """(image, example, scene) for every example of `generate_dataset`, without touching disk."""
    for i in range(n_images):
        scene, examples = _scene_and_examples(seed, i, size, encode_mask, number_prob)
        for example in examples:
            yield scene.image, example, scene


def generate_dataset(
    out_dir: str | os.PathLike,
    n_images: int,
    seed: int,
    size: int = 96,
    encode_mask: MaskEncoder | None = None,
    split_name: str = "train",
    number_prob: float = 0.5,
    workers: int = 1,
) -> Path:
    """Write `out_dir/images/{split}_{i:06d}.png` and `out_dir/{split}.jsonl`; return the JSONL.

    Each JSONL line is {"image", "prefix", "suffix", "task"} with the image path relative to
    the JSONL. Image names carry the split so several splits can share `out_dir`. Every
    file is written to a temporary name and renamed, and the JSONL comes last, so a JSONL
    that exists always points at complete images. `workers` > 1 draws images in forked
    processes; the files are the same bytes whatever the number of workers.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    job = (out_dir, seed, size, encode_mask, split_name, number_prob)
    step = max(1, min(200, -(-n_images // (4 * workers))))  # about 4 chunks per worker
    chunks = [range(i, min(i + step, n_images)) for i in range(0, n_images, step)]
    if workers > 1 and len(chunks) > 1:
        import multiprocessing

        _FORKED_JOB[:] = [job]  # the encoder may be a closure over a model: fork shares it, pickle could not
        with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
            lines = [line for part in pool.map(_write_images, chunks) for line in part]
    else:
        lines = [line for chunk in chunks for line in _write_images(chunk, job)]
    jsonl = out_dir / f"{split_name}.jsonl"
    text = "".join(line + "\n" for line in lines)
    atomic_write(jsonl, lambda p: p.write_text(text, encoding="utf-8"))
    return jsonl


_FORKED_JOB: list = []


def _one_thread() -> None:
    if "torch" in sys.modules:  # an encoder that runs torch: one thread per worker process
        sys.modules["torch"].set_num_threads(1)


def _write_images(indices: range, job: tuple | None = None) -> list[str]:
    """Draw and write images `indices` of a dataset; return their JSONL lines."""
    out_dir, seed, size, encode_mask, split_name, number_prob = job or _FORKED_JOB[0]
    lines = []
    for i in indices:
        scene, examples = _scene_and_examples(seed, i, size, encode_mask, number_prob)
        rel = f"images/{split_name}_{i:06d}.png"
        atomic_write(out_dir / rel, lambda p, im=scene.image: im.save(p, format="PNG"))
        lines.extend(json.dumps({"image": rel, **ex}) for ex in examples)
    return lines


def shape_masks(n: int, seed: int, mask_size: int = 64, size: int = 96) -> np.ndarray:
    """[n, mask_size, mask_size] float32 in [0, 1]: visible shape masks cropped to their box
    and resized bilinearly, the input a segmentation mask codec is trained on."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, mask_size, mask_size), dtype=np.float32)
    i = 0
    while i < n:
        for s in make_scene(rng, size, number_prob=0.0).shapes[: n - i]:
            x1, y1, x2, y2 = s.box
            crop = Image.fromarray(s.mask[y1:y2, x1:x2].astype(np.float32))
            out[i] = np.asarray(crop.resize((mask_size, mask_size), Image.Resampling.BILINEAR))
            i += 1
    return np.clip(out, 0.0, 1.0)


# ---------------------------------------------------------------------------- clips

# The encoder each container is written with (all in PyAV's wheels); .gif: an animated GIF.
CLIP_CODECS = {".mp4": "mpeg4", ".mov": "mpeg4", ".mkv": "mpeg4", ".webm": "libvpx", ".gif": "gif"}


def make_clip(path: str | Path, seed: int = 0, frames: int = 40, size: int = 96, fps: int = 10) -> Scene:
    """Write a clip of a scene whose shapes slide right 2 pixels a frame (wrapping around), with
    PyAV (the video extra), the container chosen by the suffix -> the scene of its first frame.
    Frame k has k painted as a row of white pixels along its top edge, so a test can read which
    frame it got."""
    import av

    path = Path(path)
    scene = make_scene(np.random.default_rng(seed), size, number_prob=0.0)
    first = np.array(scene.image)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(CLIP_CODECS[path.suffix.lower()], rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "rgb8" if path.suffix.lower() == ".gif" else "yuv420p"
        for k in range(frames):
            pixels = np.roll(first, 2 * k, axis=1)
            pixels[:4] = 0
            pixels[:4, :min(k, size)] = 255  # the frame's number, readable after lossy coding
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return scene
