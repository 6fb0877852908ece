"""PaliGemma tasks: the one home of every task rule.

Token rules (`<loc>`/`<seg>` constants and patterns, a prompt's task word), prompt builders, the
task registry (one TaskSpec per task: its prompt, its output parser, its default budget, and
what the CLI, the HTTP server, `palikit run` and the web demo show of it), box encoding and
parsing, result types, COCO RLE and drawing. Pure functions, no model code; the VQ-VAE that
turns 16 seg codes into a mask lives with the models. Longer than 500 lines because every
surface reads its task rules from here and nowhere else.

Conventions follow big_vision (the PaliGemma README and `big_vision/pp/proj/paligemma/`):

- a box is `<locY1><locX1><locY2><locX2>`, each value v in 0..1023 a bin of the coordinate
  normalised by the image height or width; encode `clip(round(c * 1023), 0, 1023)`, decode
  `c = v / 1023`;
- a detection is 4 loc tokens then ` label`; a segmentation is 4 loc + 16 seg tokens then
  ` label` (whitespace between tokens is tolerated); objects are separated by ` ; `.

Masks serialise as COCO compressed RLE, byte-identical to pycocotools' `mask.encode`.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import re
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, get_args

import numpy as np

from .rle import rle_encode

# ----------------------------------------------------------------------------- token rules

NUM_LOC = 1024  # <loc0000>..<loc1023>
NUM_SEG = 128  # <seg000>..<seg127>, the VQ-VAE codebook size
NUM_SEG_PER_MASK = 16  # a 4x4 latent grid, row-major
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(NUM_LOC)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(NUM_SEG)]
SPECIAL_TOKEN_RE = re.compile(r"<loc(\d{4})>|<seg(\d{3})>")  # well-formed: what the tokenizer knows
# Any digits, so that a checker can name the malformed ones (<loc1024>, <loc12>).
ANY_LOC_RE = re.compile(r"<loc(\d+)>")
ANY_SEG_RE = re.compile(r"<seg(\d+)>")
# One object of a detect/segment target: 4 loc tokens, any seg tokens, the label up to `;` or `<`.
ANY_OBJECT_RE = re.compile(r"((?:<loc\d+>\s*){4})((?:<seg\d+>\s*)*)([^;<]*)")
_TYPED_TOKENS_RE = re.compile(r"^(\s*<image>)+\s*")


def strip_typed_tokens(prefix: str) -> str:
    """The prefix without the leading <image> and <bos> tokens users type (palikit adds them)."""
    return _TYPED_TOKENS_RE.sub("", prefix).removeprefix("<bos>")


def task_word(prefix: str) -> str:
    """A prompt's first word, which names its task ("" for an empty prompt)."""
    words = strip_typed_tokens(prefix).split(maxsplit=1)
    return words[0] if words else ""


# ----------------------------------------------------------------------------- prompts

# COCO-35L transfer languages (big_vision configs/proj/paligemma/transfers/coco35l.py).
LANGUAGES = (
    "ar", "bn", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr",
    "he", "hi", "hr", "hu", "id", "it", "ja", "ko", "mi", "nl", "no", "pl",
    "pt", "ro", "ru", "sv", "sw", "te", "th", "tr", "uk", "vi", "zh",
)  # fmt: skip
CaptionStyle = Literal["cap", "caption", "describe"]


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
    """A list of labels, or one string of them separated by ';' as the prompt writes them ("cat ; dog")."""
    if not isinstance(labels, (str, Sequence)):
        raise TypeError(f"labels must be a string or a list of strings, got {type(labels).__name__}")
    labels = labels.split(";") if isinstance(labels, str) else list(labels)
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


# ----------------------------------------------------------------------------- box encoding

BoxFormat = Literal["xyxy", "xyxy_norm", "coco"]


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


class _Scored:
    logprob: float | None

    @property
    def confidence(self) -> float | None:
        """exp(logprob), the geometric-mean probability of the object's tokens, in [0, 1]: the one
        score palikit shows (CLI, overlay, web demo, JSON, supervision). None when unscored."""
        return None if self.logprob is None else math.exp(self.logprob)


@dataclass
class Detection(_Scored):
    label: str
    box: tuple[float, float, float, float]  # pixels x1, y1, x2, y2
    logprob: float | None = None  # mean log-prob of the object's tokens (label included)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "box": [float(v) for v in self.box], "confidence": self.confidence,
                "logprob": self.logprob}


@dataclass
class Segmentation(_Scored):
    label: str
    box: tuple[float, float, float, float]  # pixels x1, y1, x2, y2
    mask: np.ndarray | None = None  # bool [H, W] of the whole image, filled in by the VQ-VAE
    logprob: float | None = None  # mean log-prob of the object's tokens (label included)
    codes: list[int] = field(default_factory=list)  # the 16 seg codes, row-major 4x4

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "box": [float(v) for v in self.box],
            "confidence": self.confidence,
            "logprob": self.logprob,
            "codes": [int(c) for c in self.codes],
            "mask": None if self.mask is None else rle_encode(self.mask),
        }


class Results(list):
    """The objects found in one image: a list of Detection / Segmentation that also converts."""

    def to_arrays(self, classes: Sequence[str] | None = None) -> dict[str, np.ndarray | None]:
        return detections_to_arrays(self, classes)

    def to_supervision(self, classes: Sequence[str] | None = None):
        return to_supervision(self, classes)


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
    per piece. Each object's logprob is then the mean log-prob of the pieces overlapping its
    tokens and label; without them it is None.

    Never raises on any text; ValueError only for a non-positive size or pieces/logprobs
    that do not match the text.
    """
    found, skipped = _parse(text, width, height, pieces, logprobs, with_masks=False)
    return ParsedObjects([Detection(label, box, lp) for label, box, _, lp in found], skipped)


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
        [Segmentation(label, box, None, lp, codes) for label, box, codes, lp in found], skipped
    )


def detections_to_arrays(results: Sequence[Detection | Segmentation],
                         classes: Sequence[str] | None = None) -> dict[str, np.ndarray | None]:
    """Arrays named as `supervision.Detections` fields: xyxy, confidence, class_id, class_name, mask.

    confidence as Detection.confidence; objects without a score get 1.0. class_id: the index of
    the label in `classes` (the prompt's labels, say), labels not in it numbered after them in
    order of appearance; without `classes`, in order of appearance. mask is None unless some result
    has one; results without a mask then get an all-False one.
    """
    masks = [getattr(r, "mask", None) for r in results]
    mask = None
    if any(m is not None for m in masks):
        shape = next(m.shape for m in masks if m is not None)
        mask = np.stack([np.zeros(shape, bool) if m is None else np.asarray(m, bool) for m in masks])
    ids = {c: i for i, c in enumerate(dict.fromkeys(classes or ()))}
    for r in results:
        ids.setdefault(r.label, len(ids))
    return {
        "xyxy": np.array([r.box for r in results], dtype=np.float32).reshape(-1, 4),
        "confidence": np.array([1.0 if r.confidence is None else r.confidence for r in results], np.float32),
        "class_id": np.array([ids[r.label] for r in results], dtype=int),
        "class_name": np.array([r.label for r in results], dtype=str),
        "mask": mask,
    }


def to_supervision(results: Sequence[Detection | Segmentation], classes: Sequence[str] | None = None):
    """`supervision.Detections` of the results, as supervision's own model connectors build them
    (class_id, confidence, mask, data["class_name"]), so its annotators take them as they are."""
    try:
        import supervision as sv
    except ImportError:
        raise ImportError("to_supervision needs supervision: pip install 'palikit[supervision]'") from None
    a = detections_to_arrays(results, classes)
    return sv.Detections(xyxy=a["xyxy"], mask=a["mask"], confidence=a["confidence"], class_id=a["class_id"],
                         data={"class_name": a["class_name"]})


# ----------------------------------------------------------------------------- the task registry


@dataclass(frozen=True)
class FieldText:
    """How a prompt field is shown: a short title (web demo, CLI metavar), help, an example."""

    title: str
    help: str = ""
    example: str = ""


@dataclass(frozen=True)
class TaskArg:
    """One field of a task's prompt, read off its prompt builder's signature."""

    name: str
    required: bool
    default: Any  # None when required
    choices: tuple[str, ...] | None  # a Literal annotation's values
    many: bool  # a list of strings (labels); a single str is one
    text: FieldText


@dataclass(frozen=True)
class TaskSpec:
    """One task, as every surface offers it.

    verb: the Pipeline method, the CLI verb, the route /v1/<verb>, `palikit run`'s "task" field and
    the web demo's choice. name: what parse_task reports for its prompts (big_vision's word:
    "answer" for the ask verb). words: the first words of its prompts. prompt: the builder; its
    keyword arguments are the task's fields (defaults and Literal choices come from its
    signature). parse: (text, width, height, pieces=, logprobs=) -> ParsedObjects, or None for a
    text answer. masks: its objects carry seg codes that the mask codec decodes. eval_metrics:
    what `palikit eval` and the trainer's validation score its examples with (metrics.METRICS).
    """

    verb: str
    name: str
    words: tuple[str, ...]
    prompt: Callable[..., str]
    max_new_tokens: int
    help: str
    title: str  # the web demo's menu entry
    fields: Mapping[str, FieldText] = field(default_factory=dict)
    parse: Callable[..., ParsedObjects] | None = None
    masks: bool = False
    aliases: Mapping[str, str] = field(default_factory=dict)  # `palikit run` job keys -> field
    eval_metrics: tuple[str, ...] = ("exact_match",)
    per_label: int = 0  # budget added per label after the first (each label may have several objects)

    def budget(self, prompt: str) -> int:
        """The default max_new_tokens of one of this task's prompts: max_new_tokens, plus per_label
        for each label after the first, at most MAX_DEFAULT_BUDGET."""
        labels = prompt.split(maxsplit=1)[1].count(" ; ") + 1 if self.per_label and " " in prompt else 1
        return min(MAX_DEFAULT_BUDGET, self.max_new_tokens + self.per_label * (labels - 1))

    def budget_help(self) -> str:
        more = f", +{self.per_label} per label after the first, at most {MAX_DEFAULT_BUDGET}" if self.per_label else ""
        return f"the answer's budget in tokens (default {self.max_new_tokens}{more})"

    @functools.cached_property  # frozen dataclass: the cache goes to __dict__, not through __setattr__
    def args(self) -> tuple[TaskArg, ...]:
        hints = typing.get_type_hints(self.prompt)
        out = []
        for name, param in inspect.signature(self.prompt).parameters.items():
            hint = hints.get(name, str)
            required = param.default is inspect.Parameter.empty
            choices = get_args(hint) if typing.get_origin(hint) is Literal else None
            many = hint != str and choices is None  # str | Sequence[str]: labels
            text = self.fields.get(name) or FieldText(name.replace("_", " ").capitalize())
            out.append(TaskArg(name, required, None if required else param.default, choices, many, text))
        return tuple(out)

    def build(self, **values) -> str:
        """The prompt from the task's fields; ValueError/TypeError name a bad or missing one."""
        names = {a.name for a in self.args}
        if unknown := sorted(set(values) - names):
            raise TypeError(f"task {self.verb!r} has no field {unknown[0]!r}; its fields: "
                            f"{', '.join(sorted(names)) or '(none)'}")
        if missing := [a.name for a in self.args if a.required and a.name not in values]:
            raise TypeError(f"task {self.verb!r} needs the field {missing[0]!r}")
        return self.prompt(**values)

    def describe(self) -> dict[str, Any]:
        """What the web demo needs, as JSON: its menu entry, its one text field, its budget."""
        args = self.args
        shown = next((a for a in args if a.required), args[0] if args else None)
        arg = None
        if shown is not None:
            arg = {"name": shown.name, "title": shown.text.title, "example": shown.text.example,
                   "required": shown.required, "many": shown.many}
        return {"verb": self.verb, "title": self.title, "help": self.help, "arg": arg,
                "max_new_tokens": self.max_new_tokens, "objects": self.parse is not None}


TASKS: dict[str, TaskSpec] = {}  # verb -> spec, in registration order
# A default budget stays within the engine's default room for an answer (Engine: the image tokens
# + 512), so that no default is refused; a free-form prompt gets FREE_PROMPT_BUDGET.
MAX_DEFAULT_BUDGET, FREE_PROMPT_BUDGET = 448, 128


def default_budget(prompt: str) -> int:
    """max_new_tokens for a prompt given none: its task's budget (TaskSpec.budget), or FREE_PROMPT_BUDGET."""
    words = prompt.split(maxsplit=1)
    spec = spec_of_word(words[0]) if words else None
    return FREE_PROMPT_BUDGET if spec is None else spec.budget(prompt)


def register(spec: TaskSpec) -> TaskSpec:
    """Add a task; its verb and prompt words must be new."""
    taken = {w for s in TASKS.values() for w in s.words}
    if spec.verb in TASKS or taken & set(spec.words):
        raise ValueError(f"task {spec.verb!r} or one of its words {spec.words} is registered already")
    TASKS[spec.verb] = spec
    return spec


def task_spec(verb: str) -> TaskSpec:
    if verb not in TASKS:
        raise ValueError(f"unknown task {verb!r}; use one of {', '.join(TASKS)}")
    return TASKS[verb]


def prompt_words() -> tuple[str, ...]:
    """The first words of every registered task's prompts; others are free-form prefixes."""
    return tuple(w for spec in TASKS.values() for w in spec.words)


def spec_of_word(word: str) -> TaskSpec | None:
    """The task whose prompts start with `word`, if any."""
    return next((spec for spec in TASKS.values() if word in spec.words), None)


def spec_of_prompt(prompt: str) -> TaskSpec:
    """The task a prompt asks for, from its first word.

    Transfer checkpoints trained on free-form prefixes (DocVQA questions, refcoco expressions)
    raise here too; callers that serve them should catch the ValueError.
    """
    words = prompt.split(maxsplit=1)
    prefix = words[0] if words else ""
    if (spec := spec_of_word(prefix)) is not None:
        return spec
    raise ValueError(f"unknown task prefix {prefix!r} in prompt {prompt!r}; "
                     f"expected one of: {', '.join(prompt_words())}")


def parse_task(prompt: str) -> str:
    """The name of the task a prompt asks for (`caption`, `answer`, ..., `segment`)."""
    return spec_of_prompt(prompt).name


_LANG = FieldText("Language", "language code, e.g. en, fr, de", "en")
_LABELS = FieldText("Labels (separate with ;)", 'object names, e.g. ["cat", "dog"]', "cat ; dog")
register(TaskSpec(
    "caption", "caption", ("cap", "caption", "describe"), caption_prompt, 64, "caption an image",
    "caption", {"lang": _LANG, "style": FieldText("Style", "cap: alt text, caption: short, describe: long")},
    eval_metrics=("cider",)))
register(TaskSpec(
    "ask", "answer", ("answer",), ask_prompt, 32, "answer a question about an image", "ask a question",
    {"question": FieldText("Question", "", "what is in the image?"), "lang": _LANG},
    eval_metrics=("vqa_accuracy",)))
register(TaskSpec(
    "question", "question", ("question",), question_prompt, 32, "ask a question whose answer is given",
    "write a question", {"answer": FieldText("Answer", "", "two"), "lang": _LANG}))
register(TaskSpec("ocr", "ocr", ("ocr",), ocr_prompt, 128, "read the text in an image", "read text (OCR)",
                  eval_metrics=("ocr",)))
register(TaskSpec(
    "detect", "detect", ("detect",), detect_prompt, 128, "find objects: boxes", "detect objects",
    {"labels": _LABELS}, parse=parse_detections, eval_metrics=("referring_detection", "detection_map"),
    per_label=64))
register(TaskSpec(
    "segment", "segment", ("segment",), segment_prompt, 128, "find objects: boxes and masks",
    "segment objects", {"labels": FieldText(_LABELS.title, _LABELS.help, "cat")},
    parse=parse_segmentations, masks=True, aliases={"label": "labels"}, eval_metrics=("segmentation_miou",),
    per_label=128))
