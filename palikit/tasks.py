"""PaliGemma tasks: prompts, <loc>/<seg> token encoding and parsing, result types, drawing.

Pure functions, no model code; the VQ-VAE that turns 16 seg codes into a mask lives with the
models. Conventions follow big_vision (spec §5.1–5.3):

- a box is `<locY1><locX1><locY2><locX2>`, each value v in 0..1023 a bin of the coordinate
  normalised by the image height or width; encode `clip(round(c * 1023), 0, 1023)`, decode
  `c = v / 1023`;
- a detection is 4 loc tokens then ` label`; a segmentation is 4 loc + 16 seg tokens then
  ` label` (whitespace between tokens is tolerated); objects are separated by ` ; `.

Masks serialise as COCO compressed RLE, byte-identical to pycocotools' `mask.encode`.
"""

from __future__ import annotations

import math
import operator
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, get_args

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- prompts

# COCO-35L transfer languages (big_vision configs/proj/paligemma/transfers/coco35l.py).
LANGUAGES = (
    "ar", "bn", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr",
    "he", "hi", "hr", "hu", "id", "it", "ja", "ko", "mi", "nl", "no", "pl",
    "pt", "ro", "ru", "sv", "sw", "te", "th", "tr", "uk", "vi", "zh",
)  # fmt: skip
CaptionStyle = Literal["cap", "caption", "describe"]
Task = Literal["caption", "answer", "question", "ocr", "detect", "segment"]
# First word of a prompt -> task. `cap` (alt-text) and `describe` (long) are caption variants.
_TASK_OF_PREFIX: dict[str, Task] = {
    "cap": "caption",
    "caption": "caption",
    "describe": "caption",
    "answer": "answer",
    "question": "question",
    "ocr": "ocr",
    "detect": "detect",
    "segment": "segment",
}


def _check_choice(what: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of: {', '.join(choices)}")


def _check_text(what: str, text: str, *, is_label: bool = False) -> str:
    """Return `text` stripped, rejecting what would break the prompt or suffix grammar."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    if "\n" in text or "\r" in text:
        # "\n" ends the prefix; the processor appends it, so a user-typed one doubles it.
        raise ValueError(f"{what} {text!r} contains a newline, which separates the prompt from the answer")
    if is_label and ";" in text:
        raise ValueError(f"{what} {text!r} contains ';', which separates objects; pass a list of labels")
    if not text.strip():
        raise ValueError(f"{what} must not be empty")
    return text.strip()


def _check_labels(labels: str | Sequence[str]) -> list[str]:
    labels = [labels] if isinstance(labels, str) else list(labels)
    if not labels:
        raise ValueError("need at least one label")
    return [_check_text("label", label, is_label=True) for label in labels]


def caption_prompt(lang: str = "en", style: CaptionStyle = "caption") -> str:
    """`caption en`: short COCO-like caption; `cap` gives alt-text style, `describe` a long one."""
    _check_choice("caption style", style, get_args(CaptionStyle))
    _check_choice("language", lang, LANGUAGES)
    return f"{style} {lang}"


def ask_prompt(question: str, lang: str = "en") -> str:
    """Visual question answering: `answer en {question}`."""
    _check_choice("language", lang, LANGUAGES)
    return f"answer {lang} {_check_text('question', question)}"


def question_prompt(answer: str, lang: str = "en") -> str:
    """Question generation: `question en {answer}`."""
    _check_choice("language", lang, LANGUAGES)
    return f"question {lang} {_check_text('answer', answer)}"


def ocr_prompt() -> str:
    return "ocr"


def detect_prompt(labels: str | Sequence[str]) -> str:
    """`detect cat ; dog`. A str is one label."""
    return "detect " + " ; ".join(_check_labels(labels))


def segment_prompt(labels: str | Sequence[str]) -> str:
    """`segment cat` (or `segment cat ; dog` for several). A str is one label."""
    return "segment " + " ; ".join(_check_labels(labels))


def parse_task(prompt: str) -> Task:
    """The task a prompt asks for, from its first word.

    Transfer checkpoints trained on free-form prefixes (DocVQA questions, refcoco expressions)
    raise here too; callers that serve them should catch the ValueError.
    """
    words = prompt.split(maxsplit=1)
    prefix = words[0] if words else ""
    if prefix not in _TASK_OF_PREFIX:
        raise ValueError(
            f"unknown task prefix {prefix!r} in prompt {prompt!r}; "
            f"expected one of: {', '.join(_TASK_OF_PREFIX)}"
        )
    return _TASK_OF_PREFIX[prefix]


# ----------------------------------------------------------------------------- box encoding

BoxFormat = Literal["xyxy", "xyxy_norm", "coco"]
NUM_LOC = 1024  # <loc0000>..<loc1023>
NUM_SEG = 128  # <seg000>..<seg127>, the VQ-VAE codebook size
NUM_SEG_PER_MASK = 16  # a 4x4 latent grid, row-major


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got width={width!r}, height={height!r}")


def boxes_to_loc(
    boxes: Sequence[Sequence[float]] | np.ndarray, width: float, height: float, fmt: BoxFormat = "xyxy"
) -> list[str]:
    """One `<locY1><locX1><locY2><locX2>` string per box.

    fmt: "xyxy" pixel corners, "xyxy_norm" corners in 0..1, "coco" pixel x, y, w, h.
    Boxes reaching past the image are clamped to its edge.
    """
    _check_choice("box format", fmt, get_args(BoxFormat))
    _check_size(width, height)
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return []
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {list(b.shape)}")
    if not np.isfinite(b).all():
        raise ValueError("boxes contain NaN or infinity")
    if fmt == "coco":
        b = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
    if fmt != "xyxy_norm":
        b = b / [width, height, width, height]
    inverted = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if inverted.any():
        i = int(np.argmax(inverted))
        raise ValueError(f"box {i} {list(np.asarray(boxes)[i])} has x2 < x1 or y2 < y1 (format {fmt!r})")
    # Nearest of 1024 bins over [0, 1]; clipping keeps edge boxes on real tokens (no <loc1024>).
    bins = np.clip(np.rint(b * (NUM_LOC - 1)), 0, NUM_LOC - 1).astype(int)
    return [f"<loc{y1:04d}><loc{x1:04d}><loc{y2:04d}><loc{x2:04d}>" for x1, y1, x2, y2 in bins]


def detection_suffix(
    boxes: Sequence[Sequence[float]] | np.ndarray,
    labels: Sequence[str],
    width: float,
    height: float,
    fmt: BoxFormat = "xyxy",
) -> str:
    """Training target for a `detect ...` prompt: `<loc>x4 cat ; <loc>x4 dog`."""
    locs = boxes_to_loc(boxes, width, height, fmt)
    labels = [labels] if isinstance(labels, str) else list(labels)
    if len(labels) != len(locs):
        raise ValueError(f"got {len(locs)} boxes but {len(labels)} labels")
    labels = [_check_text("label", label, is_label=True) for label in labels]
    return " ; ".join(f"{loc} {label}" for loc, label in zip(locs, labels))


_BOX_TOKENS_RE = re.compile(r"(?:<loc[0-9]{4}>){4}")


def _code_values(tokens: str) -> list[int]:
    """The numbers in a run of <locNNNN>/<segNNN> tokens."""
    return [int(v) for v in re.findall(r"[0-9]+", tokens)]


def segmentation_suffix(box_tokens: str, seg_codes: Sequence[int], label: str = "") -> str:
    """Training target for `segment ...`: 4 loc + 16 seg tokens, then ` label`.

    box_tokens comes from boxes_to_loc, seg_codes from the VQ-VAE encoder. An empty label
    gives the bare tokens, as in refcoco-seg where the prompt is the referring expression.
    """
    if not _BOX_TOKENS_RE.fullmatch(box_tokens) or max(_code_values(box_tokens)) >= NUM_LOC:
        raise ValueError(f"box_tokens must be 4 <locNNNN> tokens (0..1023), got {box_tokens!r}")
    codes = [operator.index(c) for c in seg_codes]
    if len(codes) != NUM_SEG_PER_MASK or not all(0 <= c < NUM_SEG for c in codes):
        raise ValueError(f"seg_codes must be {NUM_SEG_PER_MASK} ints in 0..{NUM_SEG - 1}, got {codes}")
    suffix = box_tokens + "".join(f"<seg{c:03d}>" for c in codes)
    return f"{suffix} {_check_text('label', label, is_label=True)}" if label else suffix


# ----------------------------------------------------------------------------- results


@dataclass
class Detection:
    label: str
    box: tuple[float, float, float, float]  # pixels x1, y1, x2, y2
    score: float | None = None  # mean log-prob of the object's tokens

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "box": [float(v) for v in self.box], "score": self.score}


@dataclass
class Segmentation:
    label: str
    box: tuple[float, float, float, float]  # pixels x1, y1, x2, y2
    mask: np.ndarray | None = None  # bool [H, W] of the whole image, filled in by the VQ-VAE
    score: float | None = None  # mean log-prob of the object's tokens
    codes: list[int] = field(default_factory=list)  # the 16 seg codes, row-major 4x4

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "box": [float(v) for v in self.box],
            "score": self.score,
            "codes": [int(c) for c in self.codes],
            "mask": None if self.mask is None else rle_encode(self.mask),
        }


T = TypeVar("T", Detection, Segmentation)


@dataclass
class ParsedObjects(Generic[T]):
    """Objects read from model output; iterate it like a list."""

    objects: list[T]
    skipped: int = 0  # objects present in the text but unreadable (truncated, garbage, bad box)

    def __iter__(self) -> Iterator[T]:
        return iter(self.objects)

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, i: int) -> T:
        return self.objects[i]

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects], "skipped": self.skipped}


# ----------------------------------------------------------------------------- parsing

_CODE = r"<loc[0-9]{4}>|<seg[0-9]{3}>"
_RUN_RE = re.compile(rf"(?:{_CODE})(?:\s*(?:{_CODE}))*")  # one object's tokens
# A label ends at the object separator or where the next (possibly truncated) token starts.
_LABEL_END_RE = re.compile(r";|<loc|<seg")


def _count_junk(text: str) -> int:
    """Unreadable objects in token-free text: its non-blank `;`-separated parts."""
    return sum(1 for part in text.split(";") if part.strip())


def _span_scorer(
    text: str, pieces: Sequence[str] | None, logprobs: Sequence[float] | None
) -> Callable[[int, int], float | None]:
    """A function (start, end) -> mean log-prob of the pieces overlapping text[start:end]."""
    if pieces is None and logprobs is None:
        return lambda start, end: None
    if pieces is None or logprobs is None or len(pieces) != len(logprobs):
        raise ValueError("pieces and logprobs must be given together, one log-prob per piece")
    if "".join(pieces) != text:
        raise ValueError("pieces must concatenate to exactly the parsed text")
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    lp = np.asarray(logprobs, dtype=np.float64)

    def score(start: int, end: int) -> float | None:
        hit = (starts < end) & (ends > start) & (lengths > 0)  # empty pieces cover nothing
        return float(lp[hit].mean()) if hit.any() else None

    return score


def _parse(
    text: str,
    width: float,
    height: float,
    pieces: Sequence[str] | None,
    logprobs: Sequence[float] | None,
    with_masks: bool,
) -> tuple[list[tuple[str, tuple[float, float, float, float], list[int], float | None]], int]:
    """(label, pixel box, seg codes, score) of each readable object, and how many were not."""
    _check_size(width, height)
    score = _span_scorer(text, pieces, logprobs)
    runs = list(_RUN_RE.finditer(text))
    next_starts = [r.start() for r in runs[1:]] + [len(text)]
    skipped = _count_junk(text[: runs[0].start()] if runs else text)
    found = []
    for run, end in zip(runs, next_starts):
        stop = _LABEL_END_RE.search(text, run.end(), end)
        label_end = stop.start() if stop else end
        skipped += _count_junk(text[label_end:end])
        raw_label = text[run.end() : label_end]

        kinds = "".join(re.findall(r"<(l|s)", run.group()))  # "l" per loc, "s" per seg token
        values = _code_values(run.group())
        # Segmentation needs exactly 4 loc + 16 seg; detection reads the box of either form.
        shape_ok = re.fullmatch(r"l{4}s{16}" if with_masks else r"l{4}(?:s{16})?", kinds)
        in_range = all(v < (NUM_LOC if k == "l" else NUM_SEG) for k, v in zip(kinds, values))
        if not (shape_ok and in_range and values[2] > values[0] and values[3] > values[1]):
            skipped += 1
            continue
        y1, x1, y2, x2 = (v / (NUM_LOC - 1) for v in values[:4])
        box = (x1 * width, y1 * height, x2 * width, y2 * height)
        # The object's span: its tokens and its label, not the separators around them.
        span_end = run.end() + len(raw_label.rstrip())
        found.append((raw_label.strip(), box, values[4:], score(run.start(), span_end)))
    return found, skipped


def parse_detections(
    text: str,
    width: float,
    height: float,
    pieces: Sequence[str] | None = None,
    logprobs: Sequence[float] | None = None,
) -> ParsedObjects[Detection]:
    """Read `<loc>x4 label ; ...` model output into pixel boxes.

    Labels are kept whole (punctuation, digits, any script) and stripped; an object with no
    label gets "". Objects that are truncated, have other than 4 loc tokens, out-of-range
    values or an empty box (y2 <= y1 or x2 <= x1) are counted in `skipped`. Segmentation
    output (4 loc + 16 seg) also parses, as its boxes.

    pieces: the decoded tokens of `text` (they must concatenate to it), logprobs: one log-prob
    per piece. Each object's score is then the mean log-prob of the pieces overlapping its
    tokens and label; without them scores are None.

    Never raises on any text; ValueError only for a non-positive size or pieces/logprobs
    that do not match the text.
    """
    found, skipped = _parse(text, width, height, pieces, logprobs, with_masks=False)
    return ParsedObjects([Detection(label, box, score) for label, box, _, score in found], skipped)


def parse_segmentations(
    text: str,
    width: float,
    height: float,
    pieces: Sequence[str] | None = None,
    logprobs: Sequence[float] | None = None,
) -> ParsedObjects[Segmentation]:
    """Read `<loc>x4 <seg>x16 label ; ...`; as parse_detections, but objects without exactly
    16 seg tokens are skipped. Masks are left None: decode `codes` with the VQ-VAE."""
    found, skipped = _parse(text, width, height, pieces, logprobs, with_masks=True)
    return ParsedObjects(
        [Segmentation(label, box, None, score, codes) for label, box, codes, score in found], skipped
    )


def detections_to_arrays(results: Sequence[Detection | Segmentation]) -> dict[str, np.ndarray | None]:
    """Arrays named as `supervision.Detections` fields (xyxy, confidence, class_name, mask).

    confidence is exp(score), the geometric-mean token probability, so that 0..1 thresholds
    work; objects without a score get 1.0. mask is None unless some result has one; results
    without a mask then get an all-False one.
    """
    masks = [getattr(r, "mask", None) for r in results]
    mask = None
    if any(m is not None for m in masks):
        shape = next(m.shape for m in masks if m is not None)
        mask = np.stack([np.zeros(shape, bool) if m is None else np.asarray(m, bool) for m in masks])
    return {
        "xyxy": np.array([r.box for r in results], dtype=np.float32).reshape(-1, 4),
        "confidence": np.array([_confidence(r.score) for r in results], dtype=np.float32),
        "class_name": np.array([r.label for r in results], dtype=str),
        "mask": mask,
    }


def _confidence(score: float | None) -> float:
    return 1.0 if score is None else math.exp(score)


# ----------------------------------------------------------------------------- COCO RLE


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


# ----------------------------------------------------------------------------- drawing

# matplotlib's tab10: distinct hues that stay readable on photos.
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def _colour(label: str) -> tuple[int, int, int]:
    # crc32, not hash(): str hashes are salted per process, and colours should not change.
    return _PALETTE[zlib.crc32(label.encode()) % len(_PALETTE)]


def draw(
    image: Image.Image,
    results: Sequence[Detection | Segmentation],
    *,
    mask_alpha: float = 0.45,
    line_width: int | None = None,
) -> Image.Image:
    """An RGB copy of `image` with masks tinted, boxes outlined and `label confidence` written."""
    out = image.convert("RGB")  # always a copy
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
        caption = r.label if r.score is None else f"{r.label} {_confidence(r.score):.2f}".strip()
        if not caption:
            continue
        left, top, right, bottom = pen.textbbox((x1, y1), caption)
        lift = bottom - top + 2 if y1 >= bottom - top + 2 else 0  # above the box when it fits
        pen.rectangle((left, top - lift, right + 2, bottom - lift), fill=colour)
        pen.text((x1 + 1, y1 - lift), caption, fill=(255, 255, 255))
    return out
