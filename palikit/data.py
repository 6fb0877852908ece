"""Fine-tuning data: JSONL `image/prefix/suffix` files, the folder layouts they ship in, COCO
converted to detect/segment examples, a dataset checker, the resumable data order, and the torch
Dataset + collate.

Layouts accepted (those of big_vision, Roboflow and maestro), all with image paths relative to the annotation file:
- a `.jsonl` file, one `{"image": ..., "prefix": ..., "suffix": ...}` per line (big_vision
  `bv:jsonl`, maestro, Roboflow); `image` may also be a list of paths (several images, one prompt);
- a Roboflow "paligemma" export: one folder with `_annotations.{train,valid,test}.jsonl`;
- a maestro dataset: `{train,valid,test}/annotations.jsonl`, each beside its images;
- a folder with `{train,valid,test}.jsonl` (what palikit.synthetic writes);
- COCO detection/instances JSON (`_annotations.coco.json` in Roboflow's COCO export, or any file
  with images/annotations/categories), converted by `read_coco` to `detect` or `segment` examples.

Sequences follow processor.encode_example: [<image> x N] <bos> prefix "\\n" suffix <eos>. The
text part is capped at `max_text_len` tokens (big_vision's `text_len`; image tokens come on top).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from itertools import count
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import tasks
from .processor import Encoded, InputError, Tokenizer, collate, encode_example, load_image, preprocess
from .video import NUM_FRAMES, STRIDE, read_video

log = logging.getLogger(__name__)

SPLITS = {"train": ("train",), "valid": ("valid", "validation", "val"), "test": ("test",)}


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file (and line)."""


@dataclass
class Example:
    images: list  # paths (or PIL images) of the images of this prompt, usually one; or the one clip
    prefix: str
    suffix: str
    where: str = ""  # "file.jsonl:12", for messages
    video: dict | None = None  # images[0] is a clip: its frames and stride (palikit.video.read_video)

    @property
    def n_images(self) -> int:
        """The images the prompt holds: a clip's frames, or its images."""
        return self.video["frames"] if self.video else len(self.images)


@dataclass
class DataSpec:
    """Where a training config's examples come from (TrainConfig.train_file / eval_file): a path
    (in YAML a plain string means {path: ...}), or palikit.synthetic's settings in its place."""

    path: str | None = None  # a .jsonl / COCO .json file or a dataset folder (any layout above)
    split: str | None = None  # the split of a folder; default: the one being read (train / valid)
    task: str = "detect"  # what a COCO file converts to: detect or segment
    codec: str | None = None  # COCO -> segment: the mask codec's npz
    synthetic: dict | None = None  # {n_images: N, seed: S, size: PX}: generated under out_dir/data
    # A Hugging Face `datasets` source (see read_hf_dataset): example field -> column, or a format
    # string over the columns: {image: img, prefix: "answer en {question}", suffix: answer}.
    columns: dict | None = None

    def __str__(self) -> str:
        return self.path if self.path is not None else f"synthetic {self.synthetic}"


# ---- finding and reading annotation files --------------------------------------------------


def find_annotations(path: str | Path, split: str = "train") -> Path:
    """The annotation file of `split` in a file or folder of any supported layout."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DatasetError(f"dataset not found: {path}")
    names = SPLITS.get(split, (split,))
    candidates = [path / f"_annotations.{n}.jsonl" for n in names]  # Roboflow paligemma export
    candidates += [path / n / "annotations.jsonl" for n in names]  # maestro
    candidates += [path / n / "_annotations.coco.json" for n in names]  # Roboflow COCO export
    candidates += [path / f"{n}.jsonl" for n in names]  # palikit.synthetic, big_vision-style files
    candidates += [path / "annotations.jsonl", path / "_annotations.coco.json"]  # a split folder
    for c in candidates:
        if c.is_file():
            return c
    raise DatasetError(f"{path}: no {split} annotations found; looked for "
                       + ", ".join(str(c.relative_to(path)) for c in candidates))


def read_jsonl(path: str | Path, errors: list[tuple[str, str]] | None = None) -> list[Example]:
    """Examples of a JSONL file. A bad line raises DatasetError, or, when `errors` is a list, is
    recorded there as (where, message) and skipped."""
    path = Path(path)
    out = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                clip = None
                if "video" in row:  # a clip in place of the image(s): 16 frames at a stride of 9 by default
                    if "image" in row:
                        raise ValueError("a line has an 'image' or a 'video', not both")
                    clip = {k: row.get(k, d) for k, d in (("frames", NUM_FRAMES), ("stride", STRIDE))}
                    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in clip.values()):
                        raise ValueError(f"'frames' and 'stride' must be whole numbers >= 1, got {clip}")
                    row = {**row, "image": row["video"]}
                missing = [k for k in ("image", "prefix", "suffix") if k not in row]
                if missing:
                    raise ValueError(f"missing key(s) {', '.join(missing)} (have: {', '.join(row)})")
                images = row["image"] if isinstance(row["image"], list) else [row["image"]]
                if not images or not all(isinstance(i, str) for i in images):
                    raise ValueError("'image' must be a path or a list of paths")
                if not isinstance(row["prefix"], str) or not isinstance(row["suffix"], str):
                    raise ValueError("'prefix' and 'suffix' must be strings (serialise JSON answers)")
            except ValueError as e:
                if errors is None:
                    raise DatasetError(f"{where}: {e}") from e
                errors.append((where, str(e)))
                continue
            out.append(Example([path.parent / i for i in images], row["prefix"], row["suffix"], where, clip))
    return out


def read_coco(path: str | Path, task: str = "detect", codec=None, image_dir: str | Path | None = None,
              classes: str = "all", errors: list | None = None) -> list[Example]:
    """COCO detection/instances JSON -> examples.

    detect: one example per image, prefix `detect c1 ; c2 ; ...` (classes="all": every category,
    as Roboflow's export; "present": those in the image), suffix `<loc>x4 label ; ...` in
    annotation order (empty when nothing is there).
    segment: one example per (image, category present), prefix `segment label`, suffix
    `<loc>x4<seg>x16 label ; ...`; `codec` is a palikit MaskCodec (or the path of its npz).
    Crowd annotations are skipped. Images are found in `image_dir` (default: the JSON's folder).
    An annotation with a negative box, a box entirely outside its image, an unknown category or
    image id, or (segment) no segmentation raises DatasetError, or, when `errors` is a list, is
    recorded there as a Problem and skipped; an empty box is skipped and a
    box reaching past the image clipped to it, each recorded there as a warning.
    """
    from . import tasks  # lazily: only COCO conversion needs the box and mask encoders

    if task not in ("detect", "segment"):
        raise ValueError(f"COCO converts to 'detect' or 'segment', not {task!r}")
    if classes not in ("all", "present"):
        raise ValueError(f"classes must be 'all' or 'present', not {classes!r}")
    path = Path(path)
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
        images, anns, cats = coco["images"], coco["annotations"], coco["categories"]
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: not a COCO detection file ({e})") from e
    if task == "segment":
        if codec is None:
            raise DatasetError("COCO -> segment needs the mask codec (codec=MaskCodec or its npz path)")
        if not hasattr(codec, "encode_mask_in_box"):
            from .maskcodec import MaskCodec

            codec = MaskCodec.from_npz(codec)
    folder = Path(image_dir) if image_dir else path.parent
    used = {a["category_id"] for a in anns}
    # Roboflow adds the dataset name as a category id 0 that is only a supercategory; drop such.
    supers = {c.get("supercategory") for c in cats}
    names = {c["id"]: c["name"] for c in cats if c["id"] in used or c["name"] not in supers}
    sizes = {im["id"]: (im.get("width"), im.get("height")) for im in images}

    def problem(where: str, kind: str, message: str, error: bool = True) -> None:
        if errors is None and error:
            raise DatasetError(f"{where}: {message}")
        if errors is not None:
            errors.append(Problem(where, kind, message, error))

    by_image: dict[int, list[dict]] = {}
    for a in anns:
        where = f"{path}:annotation {a.get('id')}"
        x, y, w, h = a.get("bbox") or (0, 0, 0, 0)
        W, H = sizes.get(a.get("image_id"), (None, None))
        if a.get("iscrowd", 0):
            continue
        if a.get("image_id") not in sizes:
            problem(where, "unknown-image", f"image_id {a.get('image_id')!r} is not among the file's images")
        elif task == "segment" and not a.get("segmentation"):
            problem(where, "no-segmentation", "has no 'segmentation' to make a segment example of (a detection-only "
                    "export? use --task detect)")
        elif a["category_id"] not in names:
            problem(where, "unknown-category", f"category_id {a['category_id']} is not among the file's "
                    f"categories ({', '.join(map(str, sorted(names)))})")
        elif w < 0 or h < 0:
            problem(where, "box-size", f"bbox {a.get('bbox')} has a negative width or height")
        elif w == 0 or h == 0:
            problem(where, "box-size", f"bbox {a.get('bbox')} is empty; skipped", error=False)
        elif W and H and (x >= W or y >= H or x + w <= 0 or y + h <= 0):
            problem(where, "box-outside", f"bbox {a['bbox']} lies entirely outside the {W}x{H} image")
        else:
            if W and H and (x < 0 or y < 0 or x + w > W or y + h > H):
                problem(where, "box-outside", f"bbox {a['bbox']} reaches past the {W}x{H} image; it is "
                        "clipped to the edge", error=False)
            by_image.setdefault(a["image_id"], []).append(a)
    out = []
    for im in images:
        objs = by_image.get(im["id"], [])
        W, H, file = im["width"], im["height"], folder / im["file_name"]
        where = f"{path}:image {im['id']}"
        try:
            if task == "detect":
                shown = sorted(names) if classes == "all" else sorted({a["category_id"] for a in objs})
                if not shown:
                    continue
                labels = [names[a["category_id"]] for a in objs]
                suffix = tasks.detection_suffix([a["bbox"] for a in objs], labels, W, H, fmt="coco")
                out.append(Example([file], tasks.detect_prompt([names[c] for c in shown]), suffix, where))
                continue
            for cat in sorted({a["category_id"] for a in objs}):
                parts = []
                for a in (a for a in objs if a["category_id"] == cat):
                    x, y, w, h = a["bbox"]
                    mask = _coco_mask(a["segmentation"], H, W)
                    codes = codec.encode_mask_in_box(mask, (x, y, x + w, y + h))
                    box = tasks.boxes_to_loc([a["bbox"]], W, H, fmt="coco")[0]
                    parts.append(tasks.segmentation_suffix(box, [int(c) for c in codes], names[cat]))
                out.append(Example([file], tasks.segment_prompt(names[cat]), " ; ".join(parts), where))
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{where}: {e}") from e
    return out


def _coco_mask(seg, H: int, W: int) -> np.ndarray:
    """COCO segmentation (polygons, or RLE with str/list counts) -> bool (H, W)."""
    from .rle import rle_decode

    if isinstance(seg, dict):
        return rle_decode(seg)
    canvas = Image.new("1", (W, H), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in seg:
        draw.polygon(list(zip(poly[0::2], poly[1::2])), fill=1)
    return np.array(canvas, dtype=bool)


def load_examples(path: str | Path, split: str = "train", task: str = "detect", codec=None,
                  errors: list | None = None, columns: dict | None = None) -> list[Example]:
    """Examples of any supported layout; COCO files are converted to `task` (detect/segment)."""
    if hf_dataset_kind(path) is not None:
        return read_hf_dataset(path, split, columns)
    return read_annotations(find_annotations(path, split), task, codec, errors)


# ---- Hugging Face `datasets` sources, read locally -------------------------------------------

_FIELDS = ("image", "prefix", "suffix")


def hf_dataset_kind(path: str | Path) -> str | None:
    """What `datasets` reads `path` as: "disk" (a save_to_disk folder), "parquet" / "arrow" (a file,
    or a folder of them, also under data/), "imagefolder" (images with a metadata.jsonl / .csv);
    None for palikit's own layouts."""
    path = Path(path)
    if path.is_file():
        return {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix)
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return "disk"
    for kind in ("parquet", "arrow"):
        if any(path.glob(f"*.{kind}")) or any(path.glob(f"data/*.{kind}")):
            return kind
    if any(path.glob("metadata.jsonl")) or any(path.glob("metadata.csv")) or any(path.glob("*/metadata.jsonl")):
        return "imagefolder"
    return None


def read_hf_dataset(path: str | Path, split: str = "train", columns: dict | None = None) -> list[Example]:
    """Examples of a Hugging Face `datasets` source on disk (never the hub): `columns` maps image /
    prefix / suffix to a column each (default: those names), or to a format string over the
    columns. Images come as the dataset's PIL images or paths (relative to the source)."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{path} is a Hugging Face datasets source: pip install 'palikit[datasets]'") from None
    path, kind = Path(path), hf_dataset_kind(path)
    names = SPLITS.get(split, (split,))
    try:
        if kind == "disk":
            data = datasets.load_from_disk(str(path))
        elif kind == "imagefolder":
            data = datasets.load_dataset("imagefolder", data_dir=str(path))
        else:
            files = [path] if path.is_file() else sorted([*path.glob(f"*.{kind}"), *path.glob(f"data/*.{kind}")])
            by_split = {n: [str(f) for f in files if f.name.startswith(n)] for n in names}
            chosen = next((f for f in by_split.values() if f), [str(f) for f in files])
            data = datasets.load_dataset(kind, data_files={split: chosen})
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not readable as a datasets {kind} source ({e})") from None
    if isinstance(data, datasets.DatasetDict):
        found = next((n for n in names if n in data), None)
        if found is None:
            raise DatasetError(f"{path}: no {split} split; it has {', '.join(data)}")
        data = data[found]
    mapping = {f: (columns or {}).get(f, f) for f in _FIELDS}
    if unknown := sorted(set(columns or {}) - set(_FIELDS)):
        raise DatasetError(f"columns: {unknown[0]!r} is not one of {', '.join(_FIELDS)}")
    missing = sorted({m for m in mapping.values() if "{" not in m and m not in data.column_names}
                     | {c for m in mapping.values() if "{" in m
                        for c in re.findall(r"{(\w+)", m) if c not in data.column_names})
    if missing:
        raise DatasetError(f"{path}: no column {missing[0]!r}; the columns are {', '.join(data.column_names)} "
                           "(map them with columns: {image: ..., prefix: ..., suffix: ...})")

    def field(row: dict, name: str):
        m = mapping[name]
        return m.format(**row) if "{" in m else row[m]

    out = []
    for i, row in enumerate(data):
        images = field(row, "image")
        images = images if isinstance(images, list) else [images]
        images = [path / im if isinstance(im, str) and not Path(im).is_absolute() else im for im in images]
        out.append(Example(images, str(field(row, "prefix")), str(field(row, "suffix")), f"{path}[{split}][{i}]"))
    return out


# The one place a file format is chosen (load_examples, check_dataset): annotation file suffix ->
# reader(file, task, codec, errors, image_dir). Bad lines / annotations go to `errors` when it is a
# list; COCO converts to `task` (detect / segment, the latter with the mask codec).
READERS = {
    ".jsonl": lambda file, task, codec, errors, image_dir: read_jsonl(file, errors),
    ".json": lambda file, task, codec, errors, image_dir: read_coco(file, task, codec, image_dir, errors=errors),
}


def read_annotations(file: Path, task: str = "detect", codec=None, errors: list | None = None,
                     image_dir: str | Path | None = None) -> list[Example]:
    """Examples of one annotation file, read by the READERS entry of its suffix (image_dir: where a
    COCO file's images are, when not beside it)."""
    reader = READERS.get(file.suffix)
    if reader is None:
        raise DatasetError(f"{file}: expected a .jsonl or COCO .json file")
    return reader(file, task, codec, errors, image_dir)


# ---- checking ------------------------------------------------------------------------------


@dataclass
class Problem:
    where: str
    kind: str  # bad-line, missing-image, loc-range, seg-range, loc-count, box-order, ...
    message: str
    error: bool = True  # False: a warning (the example still trains)


@dataclass
class DatasetReport:
    path: str
    examples: int = 0
    problems: list[Problem] = field(default_factory=list)
    tasks: Counter = field(default_factory=Counter)
    text_tokens: list[int] = field(default_factory=list)  # per example, when a tokenizer was given
    lengths_checked: bool = False  # a tokenizer was given (or found beside --model)

    @property
    def ok(self) -> bool:
        return not any(p.error for p in self.problems)

    def to_dict(self) -> dict:
        lengths = sorted(self.text_tokens)
        return {"path": self.path, "examples": self.examples, "ok": self.ok, "tasks": dict(self.tasks),
                "counts": dict(Counter(p.kind for p in self.problems)),
                "text_tokens": {"max": lengths[-1], "p95": lengths[int(0.95 * (len(lengths) - 1))]}
                if lengths else None, "lengths_checked": self.lengths_checked,
                "problems": [vars(p) for p in self.problems]}

    def format(self, limit: int = 20) -> str:
        d = self.to_dict()
        lines = [f"{self.path}: {self.examples} examples, tasks {dict(self.tasks)}"]
        if d["text_tokens"]:
            n = d["text_tokens"]
            lines.append(f"text tokens per example: max {n['max']}, p95 {n['p95']}")
        elif not self.lengths_checked:
            lines.append("lengths: not checked (pass --tokenizer or --model)")
        for kind, n in sorted(d["counts"].items()):
            lines.append(f"{n:6d} x {kind}")
        for p in self.problems[:limit]:
            lines.append(f"{'error' if p.error else 'warning'}: {p.where}: {p.message}")
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def check_dataset(path: str | Path, config=None, tokenizer=None, max_text_len: int | None = None,
                  split: str = "train", open_images: bool = False, task: str = "detect",
                  codec=None, image_dir: str | Path | None = None, columns: dict | None = None) -> DatasetReport:
    """Report what would go wrong when training on a dataset (`palikit data check`).

    Errors: unreadable lines, missing images, loc tokens outside <loc0000>..<loc1023>, seg tokens
    outside <seg000>..<seg127>, sequences longer than the model accepts. Warnings: prompts whose
    first word is no known task (fine for free-form transfers), a typed <image>/<bos> or newline in
    a prompt, loc tokens not in groups of 4, inverted boxes, detected labels absent from the
    prompt, text longer than `max_text_len` (it would be truncated).

    config: a PaliGemmaConfig or a preset name (for the image-token count and the length limit).
    tokenizer: a Tokenizer or a tokenizer.model path; without one, lengths are not checked. task,
    codec: what a COCO file converts to, as in load_examples. columns: a Hugging Face dataset's
    columns, as in read_hf_dataset.
    """
    from .config import PaliGemmaConfig

    if isinstance(config, str):
        config = PaliGemmaConfig.from_name(config)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer(tokenizer, image_token_id=config.image_token_id if config else None)
    errors: list = []  # (where, message) of bad JSONL lines, Problems of COCO annotations
    if hf_dataset_kind(path) is not None:
        report, examples = DatasetReport(str(path)), read_hf_dataset(path, split, columns)
    else:
        file = find_annotations(path, split)
        report = DatasetReport(str(file))
        examples = read_annotations(file, task, codec, errors, image_dir)
    report.problems += [e if isinstance(e, Problem) else Problem(e[0], "bad-line", e[1]) for e in errors]
    report.lengths_checked = tokenizer is not None
    report.examples = len(examples)
    n_image = config.num_image_tokens if config else 0
    limit = config.text.max_position_embeddings if config else None
    for ex in examples:
        report.problems += _check_example(ex, open_images)
        word = tasks.task_word(ex.prefix)
        report.tasks[word if word in tasks.prompt_words() else "other"] += 1
        if tokenizer is None:
            continue
        try:
            enc = encode_example(tokenizer, 0, ex.prefix, ex.suffix)
        except InputError as e:
            report.problems.append(Problem(ex.where, "prompt-format", str(e)))
            continue
        n_text = len(enc.ids)
        report.text_tokens.append(n_text)
        n_total = n_image * ex.n_images + kept_text(n_text, max_text_len)  # what training feeds the model
        if max_text_len and n_text > max_text_len:
            report.problems.append(Problem(ex.where, "too-long", f"{n_text} text tokens > max_text_len "
                                           f"{max_text_len}: the end would be cut off", error=False))
        if limit and n_total > limit:
            report.problems.append(Problem(ex.where, "too-long",
                                           f"{n_total} tokens (image + text) > the model's limit {limit}"))
    return report


def data_errors(examples: Sequence[Example], what: str) -> str | None:
    """What `palikit train` refuses to start on, before any model loads: the errors of
    `palikit data check` (missing images, loc / seg tokens out of range) in one line, or None."""
    errors = [p for ex in examples for p in _check_example(ex, open_images=False) if p.error]
    if not errors:
        return None
    first = errors[0]
    return (f"{what}: {len(errors)} data error(s), e.g. {first.where}: {first.kind}: {first.message}; "
            "`palikit data check` lists them all (allow_data_errors: true skips those examples)")


def without_broken(examples: Sequence[Example]) -> tuple[list[Example], list[Problem]]:
    """The examples `palikit data check` finds no error in, and the errors of the others."""
    kept, broken = [], []
    for ex in examples:
        errors = [p for p in _check_example(ex, open_images=False) if p.error]
        broken += errors[:1]
        if not errors:
            kept.append(ex)
    return kept, broken


def _check_example(ex: Example, open_images: bool) -> list[Problem]:
    out = []
    for image in ex.images:
        if not isinstance(image, (str, Path)):  # a datasets source's decoded image
            continue
        if not Path(image).is_file():
            out.append(Problem(ex.where, "missing-image", f"{'video' if ex.video else 'image'} not found: {image}"))
        elif open_images and not ex.video:
            try:
                with Image.open(image) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for broken files
                out.append(Problem(ex.where, "unreadable-image", f"{image}: {e}"))
    task, known = tasks.task_word(ex.prefix), tasks.prompt_words()
    if task not in known:
        out.append(Problem(ex.where, "unknown-task", f"prompt {ex.prefix!r} starts with no known task "
                           f"({' '.join(known)})", error=False))
    if "<image>" in ex.prefix or "<bos>" in ex.prefix or "\n" in ex.prefix:
        out.append(Problem(ex.where, "prompt-format", f"prompt {ex.prefix!r} contains <image>, <bos> or a "
                           "newline; palikit adds those itself", error=False))
    spec = tasks.spec_of_word(task)
    if not ex.suffix.strip() and (spec is None or spec.parse is None):  # detect / segment: a negative
        out.append(Problem(ex.where, "empty-suffix", "the suffix (the answer to learn) is empty"))
    for text, what in ((ex.prefix, "prompt"), (ex.suffix, "suffix")):
        if bad := MALFORMED_TOKEN_RE.findall(text):
            out.append(Problem(ex.where, "token-format", f"{what} has malformed tokens: {', '.join(bad[:4])} "
                               "(<locDDDD>, <segDDD>)"))
        bad = [m[0] for m in tasks.ANY_LOC_RE.finditer(text) if len(m[1]) != 4 or int(m[1]) >= tasks.NUM_LOC]
        bad += [m[0] for m in tasks.ANY_SEG_RE.finditer(text) if len(m[1]) != 3 or int(m[1]) >= tasks.NUM_SEG]
        if bad:
            kind = "loc-range" if bad[0].startswith("<loc") else "seg-range"
            out.append(Problem(ex.where, kind, f"{what} has tokens outside <loc0000>..<loc1023> / "
                               f"<seg000>..<seg127>: {', '.join(bad[:4])}"))
    n_loc = len(tasks.ANY_LOC_RE.findall(ex.suffix))
    if n_loc % 4:
        out.append(Problem(ex.where, "loc-count", f"{n_loc} loc tokens in the suffix, not groups of 4"))
    if spec is not None and spec.parse is not None and n_loc:
        asked = {w.strip() for w in ex.prefix.split(maxsplit=1)[-1].split(";")}
        for m in tasks.ANY_OBJECT_RE.finditer(ex.suffix):
            y1, x1, y2, x2 = (int(v) for v in tasks.ANY_LOC_RE.findall(m[1]))
            label = m[3].strip()
            if y2 < y1 or x2 < x1:
                out.append(Problem(ex.where, "box-order", f"box {m[1].strip()} has y2 < y1 or x2 < x1",
                                   error=False))
            if label and label not in asked:
                out.append(Problem(ex.where, "label-not-in-prompt", f"label {label!r} is not among the "
                                   f"prompt's classes {sorted(asked)}", error=False))
    return out


# ---- data order ----------------------------------------------------------------------------


# What looks like a loc / seg token but is none: <loc-010>, <loc12a>, <seg 1>.
MALFORMED_TOKEN_RE = re.compile(r"<(?:loc|seg)(?!\d+>)[-+\s\d][^<>]{0,10}>")


class StepSampler:
    """This rank's micro-batches (lists of example indices) for steps start, start + 1, ...

    The order is one stream: epoch e is a permutation of the examples seeded by (seed, e), and step
    s takes stream positions [s * G, (s + 1) * G), G the global batch (an epoch may end inside a
    batch). A run's data position is therefore its step (epoch = s*G // n, position = s*G % n),
    and the global batch does not depend on the number of ranks: rank r takes the r-th contiguous
    slice of it and cuts that into grad_accum micro-batches.
    """

    def __init__(self, n: int, global_batch: int, grad_accum: int, rank: int, world: int, seed: int,
                 start_step: int = 0):
        if global_batch % (world * grad_accum):
            raise ValueError(f"batch_size={global_batch} is not divisible by ranks x grad_accum = "
                             f"{world} x {grad_accum}")
        self.n, self.G, self.accum, self.seed = n, global_batch, grad_accum, seed
        self.rank, self.world = rank, world
        self.start_step = start_step
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def global_batch(self, step: int) -> list[int]:
        positions = range(step * self.G, (step + 1) * self.G)
        return [int(self._order(p // self.n)[p % self.n]) for p in positions]

    def __iter__(self):
        per_rank = self.G // self.world
        micro = per_rank // self.accum
        for step in count(self.start_step):
            mine = self.global_batch(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
            for a in range(self.accum):
                yield mine[a * micro:(a + 1) * micro]


# ---- torch dataset and collate -------------------------------------------------------------


@dataclass
class Item:
    encoded: Encoded
    images: list  # PIL images


def kept_text(n_text: int, max_text_len: int | None) -> int:
    """The text tokens of an example that training keeps: big_vision truncates the text to text_len
    (the image tokens come on top). `data check` measures lengths with this too."""
    return n_text if max_text_len is None else min(n_text, max_text_len)


class PaliGemmaDataset(torch.utils.data.Dataset):
    """Examples encoded once up front (so truncation is known before training); images are read
    in __getitem__ (in DataLoader workers when there are any)."""

    def __init__(self, examples: Sequence[Example], tokenizer: Tokenizer, num_image_tokens: int,
                 max_text_len: int | None = None):
        self.examples = list(examples)
        self.encoded, self.truncated = [], 0
        for ex in self.examples:
            try:
                enc = encode_example(tokenizer, num_image_tokens * ex.n_images, ex.prefix, ex.suffix)
            except InputError as e:
                raise DatasetError(f"{ex.where}: {e}") from e
            n_image = num_image_tokens * ex.n_images
            keep = n_image + kept_text(len(enc.ids) - n_image, max_text_len)
            if len(enc.ids) > keep:
                self.truncated += 1
                enc = Encoded(enc.ids[:keep], enc.mask_ar[:keep], enc.loss_mask[:keep])
            self.encoded.append(enc)
        if self.truncated:
            log.warning("%d of %d examples are longer than max_text_len=%s text tokens and were truncated",
                        self.truncated, len(self.examples), max_text_len)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Item:
        ex = self.examples[i]
        if ex.video:  # big_vision's training sampling: a random first frame where the clip is long enough,
            # seeded by the example, so that a resumed run (and every DataLoader worker) reads the same frames
            return Item(self.encoded[i], read_video(ex.images[0], **ex.video, offset="random", seed=i).frames)
        return Item(self.encoded[i], [load_image(im) for im in ex.images])


def collate_items(items: Sequence[Item], pad_id: int, image_size: int, resample: str = "bicubic") -> dict:
    """Items -> api.collate's ids/input_mask/mask_ar/loss_mask (B, L) + pixels (I, 3, S, S)."""
    batch = collate([it.encoded for it in items], pad_id)
    batch["pixels"] = preprocess([im for it in items for im in it.images], image_size, resample)
    return batch


def make_collate(tokenizer: Tokenizer, config) -> functools.partial:
    """A picklable collate function for DataLoader (workers included)."""
    return functools.partial(collate_items, pad_id=tokenizer.pad_id, image_size=config.vision.image_size,
                             resample=config.resample)
