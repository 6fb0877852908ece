"""The evaluation benchmarks of the PaliGemma model cards, as data: for each one, how to read the files
it is published in, the prompt, the metric, the split the card reports, and the card's numbers.

Prompts, metrics and splits are those of big_vision's transfer configs, which produced the published
numbers (`add_eval` in `big_vision/configs/proj/paligemma/transfers/<config>.py`); the file layouts are
those big_vision's dataset builders read (`big_vision/datasets/<name>/<name>.py`), as each benchmark's
authors publish them, and the Hugging Face `datasets` parquet exports where a benchmark is on the hub.

Sources:
- big_vision transfer configs: vqav2.py, textvqa.py, okvqa.py, aokvqa_da.py, ocrvqa.py, docvqa.py,
  infovqa.py, stvqa.py, chartqa.py, cococap.py (COCO captions and NoCaps), textcaps.py, refcoco_seg.py,
  tallyqa.py (TallyQA and CountBenchQA), gqa.py; evaluators in big_vision/evaluators/proj/paligemma/
  transfers/ (vqav2.py, vqa.py, chartqa.py, coco_caption.py, segmentation.py, tallyqa.py);
- the benchmarks' releases: VQA v2 (Goyal et al. 2017, visualqa.org), TextVQA and TextCaps
  (textvqa.org), OK-VQA (Marino et al. 2019), A-OKVQA (Schwenk et al. 2022), OCR-VQA (Mishra et al.
  2019), DocVQA and InfographicVQA (Mathew et al. 2021/2022, docvqa.org), ST-VQA (Biten et al. 2019),
  ChartQA (Masry et al. 2022), COCO captions in Karpathy & Fei-Fei's split (dataset_coco.json),
  NoCaps (Agrawal et al. 2019), RefCOCO / RefCOCO+ (Yu et al. 2016) and RefCOCOg (Mao et al. 2016) as
  the refer toolkit ships them, TallyQA (Acharya et al. 2019), CountBench (Paiss et al. 2023, with
  big_vision's CountBenchQA questions), GQA (Hudson & Manning 2019);
- hub exports: lmms-lab/{VQAv2, textvqa, OK-VQA, DocVQA (DocVQA and InfographicVQA configs), ChartQA,
  COCO-Caption, NoCaps, TextCaps, RefCOCO, RefCOCOplus, RefCOCOg}, HuggingFaceM4/A-OKVQA,
  vikhyatk/CountBenchQA;
- the numbers: the PaliGemma 2 model card, table "PaliGemma 2 results by model resolution and size".

How a benchmark is read: a layout's source turns its files into records (dicts: JSON objects or
parquet rows), and the benchmark's `Fields` say where in a record the id, image, prompt fields,
answers and metric extras are. A reader is `_read` configured by one entry of BENCHMARKS.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

log = logging.getLogger(__name__)


class BenchmarkError(ValueError):
    """Benchmark files that cannot be read; one line naming the file and what was expected."""


@dataclass
class EvalExample:
    id: str
    image: str | Path | bytes  # an absolute path, or encoded image bytes (parquet exports, synthetic)
    prefix: str  # the prompt: the benchmark's template filled in
    answers: list[str] = field(default_factory=list)  # ground-truth answers / reference captions
    # {"label": str, "box": [x1, y1, x2, y2] pixels, "mask": bool [H, W] (optional)}
    truth_objects: list[dict] = field(default_factory=list)
    # What a metric needs beyond the answers (VQAv2 "answer_type", TallyQA "issimple", ...);
    # "metric" overrides the benchmark's metric for this example.
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    name: str  # registry key, lower-case
    prompt: str  # the template of big_vision's transfer config, filled by prompt.format(**fields)
    metric: str  # a metric registry name
    # (the path the user gave, split) -> examples in file order
    reader: Callable[[Path, str], Iterator[EvalExample]]
    split: str  # the split the model card reports
    layout: str  # the files the reader expects, one line
    card_name: str  # the row of the model card table


# ---------------------------------------------------------------------------- layouts as data


@dataclass(frozen=True)
class Fields:
    """Where a record's parts are. Each value is a path into the record: "a", "a.b" (nested), "a[].b"
    (b of each element of list a; elements that are not objects are taken whole, so one map reads
    both ["x"] and [{"b": "x"}]), or "_index" / "_key" (position in the file / key of an id-keyed JSON)."""

    id: str
    image: str  # a file name (JSON layouts) or the HF image struct {"bytes", "path"} (parquet)
    prompt: dict[str, str] = field(default_factory=dict)  # template field -> path
    answers: str | None = None  # a list or a single value
    extra: dict[str, str] = field(default_factory=dict)  # EvalExample.extra key -> path
    constants: dict[str, Any] = field(default_factory=dict)  # fixed EvalExample.extra entries
    image_file: str = "{}"  # image value -> file name; may use {split}: "COCO_{split}2014_{:012d}.jpg"
    keep: dict[str, str] = field(default_factory=dict)  # only records whose path equals the value ({split})
    explode: tuple[str, ...] = ()  # parallel lists (top-level keys): one example per element
    group: bool = False  # one example per id, with the answers of all its records (one caption each)
    box: str | None = None  # COCO [x, y, w, h] pixel box of the one true object
    mask: str | None = None  # its COCO segmentation: polygons or RLE
    label: str | None = None  # its label

    def paths(self) -> list[str]:
        return [p for p in (self.id, self.image, *self.prompt.values(), self.answers, *self.extra.values(),
                            *self.keep, *self.explode, self.box, self.mask, self.label) if p]


@dataclass(frozen=True)
class Files:
    """A benchmark as its authors publish it: an annotation file, images in folders beside it."""

    names: tuple[str, ...]  # the annotation file (first found wins), relative to the folder given; {split}
    records: Callable[[Path, str], Iterable[dict]]  # (annotation file, file split) -> records
    fields: Fields
    images: tuple[str, ...] = (".",)  # folders, relative to the annotation file's, that may hold the images
    what: str = "the images"  # what is missing, for "image not found"; {split}
    splits: dict[str, Any] = field(default_factory=dict)  # split -> its name in the files


@dataclass(frozen=True)
class Parquet:
    """A Hugging Face `datasets` parquet export: `{split}-NNNNN-of-NNNNN.parquet` files (in the folder
    given or one level down, e.g. data/), images as {"bytes", "path"} structs."""

    hub: str  # the dataset id on the hub, for messages
    fields: Fields
    splits: dict[str, str] = field(default_factory=dict)  # split -> the export's split name


# ---------------------------------------------------------------------------- record sources


def _shape(data: Any) -> str:
    if isinstance(data, dict):
        return "an object with keys " + ", ".join(list(map(str, data))[:8])
    if isinstance(data, list):
        return f"a list of {len(data)} items"
    return type(data).__name__


def _load_json(file: Path) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"{file}: not a JSON file ({e})") from None


def _json_records(file: Path, split: str, *, key: str | None = None, by_id: bool = False) -> list[dict]:
    """A JSON list of records, the list under `key` of an object, or (by_id) an object id -> record."""
    data = _load_json(file)
    if key is not None:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise BenchmarkError(f"{file}: expected a JSON object with a {key!r} list, found {_shape(data)}")
        data = data[key]
    if by_id:
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise BenchmarkError(f"{file}: expected a JSON object of id -> record, found {_shape(data)}")
        return [{**v, "_key": k, "_index": i} for i, (k, v) in enumerate(data.items())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise BenchmarkError(f"{file}: expected a JSON list of records, found {_shape(data)}")
    return [{**r, "_index": i} for i, r in enumerate(data)]


def _beside(file: Path, name: str) -> Path:
    other = file.parent / name
    if not other.is_file():
        raise BenchmarkError(f"{name} not found: expected it beside {file.name} in {file.parent}")
    return other


def _vqa_records(file: Path, split: str, *, annotations: str) -> Iterator[dict]:
    """VQA's two files (VQAv2, OK-VQA): questions, and annotations joined to them by question_id."""
    questions = _json_records(file, split, key="questions")
    annotation_file = _beside(file, annotations.format(split=split))
    answers = {a["question_id"]: a for a in _json_records(annotation_file, split, key="annotations")}
    for q in questions:
        if q.get("question_id") not in answers:
            raise BenchmarkError(f"{annotation_file}: no annotation for question {q.get('question_id')!r}")
        yield {**answers[q["question_id"]], **q}


def _msrvtt_caption_records(file: Path, split: str) -> Iterator[dict]:
    """MSR-VTT's videodatainfo JSON: videos (video_id, split) and sentences (video_id, caption)."""
    data = _load_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), list) or "sentences" not in data:
        raise BenchmarkError(f"{file}: expected MSR-VTT's videos and sentences, found {_shape(data)}")
    captions: dict[str, list[str]] = {}
    for s in data["sentences"]:
        captions.setdefault(s["video_id"], []).append(s["caption"])
    for v in data["videos"]:
        if v.get("split", split) == split:
            yield {"video_id": v["video_id"], "captions": captions.get(v["video_id"], [])}


def _msvd_qa_records(file: Path, split: str) -> Iterator[dict]:
    """MSVD-QA's questions (video_id N = vidN), named by youtube_mapping.txt's YouTube clip names."""
    clips = {}
    mapping = _beside(file, "youtube_mapping.txt")
    for line in mapping.read_text().splitlines():
        if line.strip():
            clip, vid = line.split()
            clips[vid] = clip
    for r in _json_records(file, split):
        if f"vid{r['video_id']}" not in clips:
            raise BenchmarkError(f"{mapping}: no clip for vid{r['video_id']}")
        yield {**r, "video": clips[f"vid{r['video_id']}"]}


def _activitynet_qa_records(file: Path, split: str) -> Iterator[dict]:
    """ActivityNet-QA's {split}_q.json joined with {split}_a.json by question_id."""
    answers = {a["question_id"]: a for a in _json_records(_beside(file, f"{split}_a.json"), split)}
    for q in _json_records(file, split):
        if q.get("question_id") not in answers:
            raise BenchmarkError(f"{split}_a.json: no answer for question {q.get('question_id')!r}")
        yield {**answers[q["question_id"]], **q}


def _activitynet_caption_records(file: Path, split: str) -> Iterator[dict]:
    """ActivityNet Captions: video -> timestamps and sentences; one record per captioned segment,
    its clip the segment's [start, end] seconds."""
    for i, (name, v) in enumerate(_load_json(file).items()):
        for (start, end), sentence in zip(v["timestamps"], v["sentences"]):
            yield {"id": f"{name}[{start}-{end}]", "video": name, "caption": sentence.strip(),
                   "clip": [float(start), float(end)], "_index": i}


def _coco_caption_records(file: Path, split: str) -> Iterator[dict]:
    """{id, image, captions}: Karpathy's dataset_coco.json (images of `split`, each with its sentences),
    or a COCO-style captions file (COCO captions_val2014.json, NoCaps), captions grouped per image."""
    data = _load_json(file)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise BenchmarkError(f"{file}: expected COCO captions (images + annotations) or Karpathy's "
                             f"dataset_coco.json (images with sentences), found {_shape(data)}")
    if images and "sentences" in images[0]:
        splits = {im["split"] for im in images}
        if split not in splits:
            raise BenchmarkError(f"{file}: Karpathy's split has no {split!r} images "
                                 f"(it has {', '.join(sorted(splits))})")
        for im in images:
            if im["split"] == split:
                yield {"id": im["cocoid"], "image": f"{im['filepath']}/{im['filename']}",
                       "captions": [s["raw"] for s in im["sentences"]]}
        return
    if not isinstance(data.get("annotations"), list):
        raise BenchmarkError(f"{file}: a COCO file without captions ({_shape(data)})")
    captions: dict[Any, list[str]] = {}
    for a in data["annotations"]:
        if "caption" not in a:
            raise BenchmarkError(f"{file}: annotations without a 'caption' (instances, not captions?)")
        captions.setdefault(a["image_id"], []).append(a["caption"])
    for im in images:
        yield {"id": im["id"], "image": im["file_name"], "captions": captions.get(im["id"], [])}


def _ocrvqa_records(file: Path, split: str) -> Iterator[dict]:
    """OCR-VQA's dataset.json: image id -> {imageURL, questions, answers, split}. Its download script
    saves each image as images/<id><extension of the URL>."""
    for r in _json_records(file, split, by_id=True):
        yield {**r, "image": r["_key"] + (Path(urlparse(r.get("imageURL", "")).path).suffix or ".jpg")}


def _stvqa_records(file: Path, split: str) -> list[dict]:
    """ST-VQA's {split}_task_3.json. The card's "val" is big_vision's held-out part of train_task_3.json;
    big_vision imports its image list from a module it does not publish, so it is a file you supply."""
    records = _json_records(file, split, key="data")
    if split != "val":
        return records
    listing = file.parent / "val_ids.txt"
    if not listing.is_file():
        raise BenchmarkError(f"ST-VQA split 'val' needs {listing}: the file_path values of big_vision's "
                             "held-out part of train_task_3.json, one a line (or read split train or test)")
    keep = set(listing.read_text(encoding="utf-8").split())
    return [r for r in records if r["file_path"] in keep]


def _refcoco_records(file: Path, split: str) -> Iterator[dict]:
    """The refer toolkit's refs with its pickle converted to JSON (refs(unc).json, a list of refs), joined
    with instances.json beside it; named as the lmms-lab parquet columns, so one Fields reads both."""
    refs = _json_records(file, split)
    instances = _load_json(_beside(file, "instances.json"))
    if not isinstance(instances, dict) or not {"images", "annotations"} <= set(instances):
        raise BenchmarkError(f"{file.parent / 'instances.json'}: expected COCO instances, "
                             f"found {_shape(instances)}")
    images = {im["id"]: im for im in instances["images"]}
    objects = {a["id"]: a for a in instances["annotations"]}
    for ref in refs:
        if ref.get("split") != split:
            continue
        ann, im = objects[ref["ann_id"]], images[ref["image_id"]]
        yield {"question_id": ref["ref_id"], "file_name": im["file_name"], "width": im["width"],
               "height": im["height"], "answer": [s["sent"] for s in ref["sentences"]],
               "bbox": ann["bbox"], "segmentation": ann["segmentation"]}


def _parquet_files(path: Path, split: str) -> list[Path]:
    """The export's files of `split`: `path` itself, or {split}-*.parquet in it or one folder down."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    files = sorted([*path.glob("*.parquet"), *path.glob("*/*.parquet")])
    if not files:
        return []
    chosen = [f for f in files if f.stem == split or f.stem.startswith(f"{split}-")]
    if not chosen:
        found = sorted({f.stem.split("-")[0] for f in files})
        raise BenchmarkError(f"no parquet files of split {split!r} ({split}-*.parquet) in {path}; "
                             f"its files are of splits: {', '.join(found)}")
    return chosen


def _parquet_records(files: list[Path], fields: Fields) -> Iterator[dict]:
    import pyarrow.parquet as pq  # lazy: only parquet exports need pyarrow

    wanted = {p.split(".")[0].removesuffix("[]") for p in fields.paths()} - {"_index", "_key"}
    index = 0
    for file in files:
        pf = pq.ParquetFile(file)
        names = set(pf.schema_arrow.names)
        if missing := wanted - names:
            raise BenchmarkError(f"{file}: not this benchmark's export: no column "
                                 f"{', '.join(sorted(missing))} (it has {', '.join(sorted(names))})")
        # The image size, where an export has it, saves decoding an image header per mask.
        columns = sorted(wanted | ({"width", "height"} & names if fields.mask else set()))
        for batch in pf.iter_batches(batch_size=64, columns=columns):
            for row in batch.to_pylist():
                row["_index"] = index
                index += 1
                yield row


# ---------------------------------------------------------------------------- records -> examples


def _get(record: Any, path: str) -> Any:
    head, _, rest = path.partition(".")
    if head.endswith("[]"):
        return [_get(x, rest) if rest and isinstance(x, dict) else x for x in record[head[:-2]]]
    value = record[head]
    return _get(value, rest) if rest else value


def _texts(value: Any) -> list[str]:
    values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
    return [str(v).strip() for v in values]


class _Images:
    """Image file names -> absolute paths. The first image decides which of the allowed folders holds
    them (missing there: an error naming the folders); later ones are not checked, since statting every
    image of a 200k-question set up front would cost minutes on a network disk."""

    def __init__(self, base: Path, folders: Iterable[str], what: str):
        self.candidates = [Path(os.path.normpath(base.absolute() / f)) for f in folders]
        self.what = what
        self.root: Path | None = None

    def __call__(self, name: str) -> Path:
        if self.root is None:
            self.root = next((c for c in self.candidates if (c / name).is_file()), None)
            if self.root is None:
                where = " or ".join(str(c) for c in self.candidates)
                raise BenchmarkError(f"image not found: {name}; expected {self.what} under {where}")
        return self.root / name


def _image_size(image: Path | bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:  # reads the header only
        return im.size


def _true_object(record: dict, fields: Fields, image: Path | bytes) -> dict:
    """The box (COCO x, y, w, h -> x1, y1, x2, y2) and mask of a record's object; its label comes later."""
    x, y, w, h = (float(v) for v in _get(record, fields.box))
    obj = {"label": "", "box": [x, y, x + w, y + h]}
    if fields.mask:
        from .data import _coco_mask  # lazy: palikit.data imports torch

        seg = _get(record, fields.mask)
        if isinstance(seg, list) and seg and isinstance(seg[0], (int, float)):
            seg = [seg]  # one polygon stored flat, as lmms-lab's exports do
        if record.get("width") and record.get("height"):
            width, height = int(record["width"]), int(record["height"])
        else:
            width, height = _image_size(image)
        obj["mask"] = _coco_mask(seg, height, width)
    return obj


def _has(record: dict, path: str) -> bool:
    return path.split(".")[0].removesuffix("[]") in record


def _examples(records: Iterable[dict], fields: Fields, prompt: str, split: Any, images: _Images | None,
              where: Path) -> Iterator[EvalExample]:
    keep = {path: str(value).format(split=split) for path, value in fields.keep.items()}
    skipped = 0
    for n, record in enumerate(records):
        if n == 0 and (missing := [p for p in fields.paths() if not _has(record, p)]):
            raise BenchmarkError(f"{where}: not this benchmark's layout: its records have no "
                                 f"{', '.join(missing)} (they have {', '.join(sorted(map(str, record)))})")
        try:
            if any(str(_get(record, path)) != value for path, value in keep.items()):
                continue
            value = _get(record, fields.image)
            if isinstance(value, dict):
                value = value.get("bytes")
            if value is None:  # rows without an image (CountBenchQA's export lacks ~10%), as big_vision skips
                skipped += 1
                continue
            if isinstance(value, bytes):
                image = value
            else:
                image = images(fields.image_file.format(value, split=split))
            parts = [record]
            if fields.explode:
                parts = [{**record, **dict(zip(fields.explode, item))}
                         for item in zip(*(_texts(record[p]) for p in fields.explode))]
            base_id = str(_get(record, fields.id))
            # One object (and one mask array) per record, shared by the examples exploded from it.
            objects = [_true_object(record, fields, image)] if fields.box else []
            for i, part in enumerate(parts):
                truth = [{**obj, "label": str(_get(part, fields.label)).strip()} if fields.label else obj
                         for obj in objects]
                yield EvalExample(
                    id=f"{base_id}-{i}" if fields.explode else base_id,
                    image=image,
                    prefix=prompt.format(**{k: str(_get(part, p)).strip() for k, p in fields.prompt.items()}),
                    answers=_texts(_get(part, fields.answers)) if fields.answers else [],
                    truth_objects=truth,
                    extra={**fields.constants, **{k: _get(part, p) for k, p in fields.extra.items()}},
                )
        except (KeyError, TypeError, IndexError) as e:
            error = f"{where}: record {n} does not fit the layout ({type(e).__name__}: {e})"
            raise BenchmarkError(error) from None
    if skipped:
        log.warning("%s: skipped %d records without an image", where, skipped)


def _grouped(examples: Iterator[EvalExample]) -> Iterator[EvalExample]:
    """One example per id, in order of first appearance, with the answers of all its records."""
    merged: dict[str, EvalExample] = {}
    for ex in examples:
        if ex.id in merged:
            merged[ex.id].answers.extend(ex.answers)
        else:
            merged[ex.id] = ex
    yield from merged.values()


# ---------------------------------------------------------------------------- readers


_PICKLES = (".p", ".pkl", ".pickle")


def _pickle_error(file: Path) -> BenchmarkError:
    return BenchmarkError(f"{file} is a Python pickle, which palikit will not open (unpickling can run any "
                          "code); pass the Hugging Face parquet export (e.g. lmms-lab/RefCOCO, a folder of "
                          "*.parquet) or the refs converted to JSON (refs(unc).json beside instances.json)")


def _read(path: str | Path, split: str, *, name: str, prompt: str, layout: str, files: Files | None = None,
          parquet: Parquet | None = None) -> Iterator[EvalExample]:
    """Examples of the first layout found at `path` (a folder, or the annotation / parquet file itself)."""
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"{name}: {path} does not exist; expected {layout}")
    if path.suffix in _PICKLES:
        raise _pickle_error(path)
    examples = None
    if files and path.suffix != ".parquet":
        file_split = files.splits.get(split, split)
        names = [n.format(split=file_split) for n in files.names]
        file = path if path.is_file() else next((path / n for n in names if (path / n).is_file()), None)
        if file is not None:
            images = _Images(file.parent, [f.format(split=file_split) for f in files.images],
                             files.what.format(split=file_split))
            fields = files.fields
            examples = _examples(files.records(file, file_split), fields, prompt, file_split, images, file)
    if examples is None and parquet and (chosen := _parquet_files(path, parquet.splits.get(split, split))):
        fields = parquet.fields
        examples = _examples(_parquet_records(chosen, fields), fields, prompt, split, None, path)
    if examples is None:
        if path.is_dir() and (pickles := sorted(p for p in path.iterdir() if p.suffix in _PICKLES)):
            raise _pickle_error(pickles[0])
        wanted = [*(n.format(split=files.splits.get(split, split)) for n in files.names)] if files else []
        if parquet:
            wanted.append(f"{parquet.splits.get(split, split)}-*.parquet ({parquet.hub})")
        raise BenchmarkError(f"{name}: expected {' or '.join(wanted)} in {path} (split {split!r}); "
                             f"layout: {layout}")
    yield from _grouped(examples) if fields.group else examples


# The synthetic task of an example -> the metric that scores it, as evaluate_synthetic scores them.
# detect prompts name a kind with one shape or several: COCO mAP; segment questions are referring
# ones (a kind with one shape), scored as big_vision scores RefCOCO.
_SYNTHETIC_METRICS = {"caption": "exact_match", "count": "exact_match", "colour": "exact_match",
                      "ocr": "exact_match", "detect": "detection_map", "segment": "segmentation_miou"}


def read_synthetic(path: str | Path | None = None, split: str = "test", *, n_images: int = 200,
                   seed: int = 12345, size: int = 96) -> Iterator[EvalExample]:
    """The shapes world's eval set: every example of `n_images` scenes of a seed unseen in training,
    each scene's first example followed by one segmentation question on a kind the scene holds once
    (drawn from default_rng(seed); none when every kind repeats). Images are PNG bytes; `path` and
    `split` are ignored."""
    from . import tasks
    from .synthetic import SEGMENT_PROMPT, _tight_box, iter_examples

    rng = np.random.default_rng(seed)
    last_scene, scene_index, k, png = None, -1, 0, b""
    for image, ex, scene in iter_examples(n_images, seed, size):
        new_scene = scene is not last_scene
        if new_scene:
            last_scene, scene_index, k = scene, scene_index + 1, 0
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            png = buf.getvalue()
        task = ex["task"]
        truth = []
        if task == "detect":
            truth = [{"label": d.label, "box": list(d.box)}
                     for d in tasks.parse_detections(ex["suffix"], *image.size).objects]
        yield EvalExample(f"{scene_index}-{k}", png, ex["prefix"], [ex["suffix"]], truth,
                          {"task": task, "metric": _SYNTHETIC_METRICS[task]})
        k += 1
        kinds = [s.kind for s in scene.shapes]
        single = [s for s in scene.shapes if kinds.count(s.kind) == 1]
        if new_scene and single:  # a referring question, as RefCOCO's: the one shape of its kind
            shape = single[rng.integers(len(single))]
            yield EvalExample(f"{scene_index}-{k}", png, SEGMENT_PROMPT.format(shape.kind), [],
                              [{"label": shape.kind, "box": list(_tight_box(shape.mask)), "mask": shape.mask}],
                              {"task": "segment", "metric": _SYNTHETIC_METRICS["segment"]})
            k += 1


# ---------------------------------------------------------------------------- the registry


def _benchmark(name: str, prompt: str, metric: str, split: str, card_name: str, layout: str,
               files: Files | None = None, parquet: Parquet | None = None) -> Benchmark:
    reader = partial(_read, name=name, prompt=prompt, layout=layout, files=files, parquet=parquet)
    return Benchmark(name, prompt, metric, reader, split, layout, card_name)


_ANSWER = "answer en {question}"
_CAPTION = "caption en"
_QUESTION = {"question": "question"}
_DATA = partial(_json_records, key="data")
# big_vision compares lower-cased text for these (`to_lower=True` in their evaluator configs).
_OTHER = {"answer_type": "other"}  # TextVQA through the VQAv2 metric, as transfers/textvqa.py sets it
# A video example's frames, as big_vision's video transfers take them (palikit.video.read_video).
_VIDEO = {"video": {"frames": 16, "stride": 9}}
_VIDEOS = ("videos", "video", ".")

# VQA's questions joined with their annotations (VQAv2, OK-VQA), and the lmms-lab exports of both.
_COCO_VQA = Fields(id="question_id", image="image_id", image_file="COCO_{split}2014_{:012d}.jpg",
                   prompt=_QUESTION, answers="answers[].answer", extra={"question_id": "question_id"})
_COCO_VQA_PARQUET = replace(_COCO_VQA, image="image", image_file="{}")
# The VQAv2 metric reports accuracy per answer type (yes/no, number, other).
_VQAV2 = replace(_COCO_VQA, extra={"question_id": "question_id", "answer_type": "answer_type"})
_COCO_2014 = ("{split}2014", "images/{split}2014", "../{split}2014")
# RefCOCO/+/g: one example per referring sentence (big_vision's *_flat splits), its object the truth.
# The prompt is the bare sentence (transfers/refcoco_seg.py), the answer a segmentation: "task" says so.
_REFCOCO = Fields(id="question_id", image="file_name", prompt={"sentence": "answer"}, explode=("answer",),
                  box="bbox", mask="segmentation", label="answer", constants={"task": "segment"})


def _refcoco(name: str, refs: str, hub: str, card: str) -> Benchmark:
    # big_vision/configs/proj/paligemma/transfers/refcoco_seg.py: the referring sentence alone is the
    # prefix (no "segment"), scored by mIoU of the decoded mask (evaluators/.../segmentation.py).
    return _benchmark(
        name, "{sentence}", "segmentation_miou", "val", card,
        f"{refs} (the refer toolkit's pickle converted to JSON) beside instances.json, COCO images in "
        f"train2014/; or the {hub} parquet export (split val/testA/testB/test)",
        Files((refs, "refs.json"), _refcoco_records, _REFCOCO,
              ("train2014", "images/train2014", "images", "../images/mscoco/images/train2014"),
              "the COCO train2014 images"),
        Parquet(hub, replace(_REFCOCO, image="image")))


# lmms-lab/DocVQA holds DocVQA and InfographicVQA as two configs of one layout: pass the folder of one.
_LMMS_DOCVQA = Parquet("lmms-lab/DocVQA", Fields(id="questionId", image="image", prompt=_QUESTION, answers="answers",
                                                 extra={"question_id": "questionId"}), {"val": "validation"})


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    # transfers/vqav2.py: "answer en {question_text}", minival = the last 10240 of TFDS validation. That
    # slice follows TFDS's shuffled order, which the published JSON cannot reproduce: "minival" reads val2014.
    _benchmark(
        "vqav2", _ANSWER, "vqav2_accuracy", "minival", "VQAv2 (minival)",
        "v2_OpenEnded_mscoco_val2014_questions.json + v2_mscoco_val2014_annotations.json, COCO images in "
        "val2014/ (or images/val2014/, ../val2014/); or the lmms-lab/VQAv2 parquet export (split validation)",
        Files(("v2_OpenEnded_mscoco_{split}2014_questions.json",),
              partial(_vqa_records, annotations="v2_mscoco_{split}2014_annotations.json"),
              _VQAV2, _COCO_2014, "the COCO {split}2014 images", {"minival": "val"}),
        Parquet("lmms-lab/VQAv2", replace(_VQAV2, image="image", image_file="{}"),
                {"minival": "validation", "val": "validation"})),
    # transfers/textvqa.py: scored by the VQAv2 evaluator, with every answer_type set to "other" (_OTHER).
    _benchmark(
        "textvqa", _ANSWER, "vqav2_accuracy", "val", "TextVQA (val)",
        "TextVQA_0.5.1_val.json with images in train_images/ (val images ship there); "
        "or the lmms-lab/textvqa parquet export (split validation)",
        Files(("TextVQA_0.5.1_{split}.json",), _DATA,
              Fields(id="question_id", image="image_id", image_file="{}.jpg", prompt=_QUESTION,
                     answers="answers", extra={"question_id": "question_id"}, constants=_OTHER),
              ("train_images", "test_images", "images"), "the TextVQA images"),
        Parquet("lmms-lab/textvqa",
                Fields(id="question_id", image="image", prompt=_QUESTION, answers="answers",
                       extra={"question_id": "question_id"}, constants=_OTHER),
                {"val": "validation"})),
    # transfers/okvqa.py: the plain VQA evaluator (min(1, matches / 3)), final split val.
    _benchmark(
        "okvqa", _ANSWER, "vqa_accuracy", "val", "OKVQA",
        "OpenEnded_mscoco_val2014_questions.json + mscoco_val2014_annotations.json, COCO images in val2014/ "
        "(or images/val2014/, ../val2014/); or the lmms-lab/OK-VQA parquet export (split val2014)",
        Files(("OpenEnded_mscoco_{split}2014_questions.json",),
              partial(_vqa_records, annotations="mscoco_{split}2014_annotations.json"),
              _COCO_VQA, _COCO_2014, "the COCO {split}2014 images"),
        Parquet("lmms-lab/OK-VQA", _COCO_VQA_PARQUET, {"val": "val2014"})),
    # transfers/aokvqa_da.py: direct answers, the plain VQA evaluator.
    _benchmark(
        "aokvqa_da", _ANSWER, "vqa_accuracy", "val", "AOKVQA-DA (val)",
        "aokvqa_v1p0_val.json with COCO 2017 images in val2017/ (or images/val2017/, ../val2017/); "
        "or the HuggingFaceM4/A-OKVQA parquet export (split validation)",
        Files(("aokvqa_v1p0_{split}.json",), _json_records,
              Fields(id="question_id", image="image_id", image_file="{:012d}.jpg", prompt=_QUESTION,
                     answers="direct_answers", extra={"question_id": "question_id"}),
              ("{split}2017", "images/{split}2017", "../{split}2017"), "the COCO {split}2017 images"),
        Parquet("HuggingFaceM4/A-OKVQA",
                Fields(id="question_id", image="image", prompt=_QUESTION, answers="direct_answers",
                       extra={"question_id": "question_id"}),
                {"val": "validation"})),
    # transfers/ocrvqa.py: one answer per question, compared lower-cased; the final number is on test.
    _benchmark(
        "ocrvqa", _ANSWER, "vqa_accuracy_lowercase", "test", "OCR-VQA",
        "dataset.json (image id -> questions, answers, split 1/2/3 = train/val/test) with the images its "
        "loadDataset.py downloads into images/",
        Files(("dataset.json",), _ocrvqa_records,
              Fields(id="_key", image="image", prompt={"question": "questions"}, answers="answers",
                     explode=("questions", "answers"), keep={"split": "{split}"}),
              ("images", "."), "the OCR-VQA images", {"train": 1, "val": 2, "test": 3})),
    # transfers/docvqa.py: the question alone is the prefix (no "answer en"), lower-cased ANLS.
    _benchmark(
        "docvqa", "{question}", "anls", "val", "DocVQA (val)",
        "val_v1.0_withQT.json or val_v1.0.json (data[] with questionId, question, image, answers), images "
        "at their 'image' path beside it or under val/; or the lmms-lab/DocVQA parquet export "
        "(config DocVQA, split validation)",
        Files(("{split}_v1.0_withQT.json", "{split}_v1.0.json", "{split}/{split}_v1.0_withQT.json",
               "{split}/{split}_v1.0.json"), _DATA,
              Fields(id="questionId", image="image", prompt=_QUESTION, answers="answers",
                     extra={"question_id": "questionId"}),
              (".", "{split}"), "the DocVQA document images"),
        _LMMS_DOCVQA),
    # transfers/infovqa.py: "answer en {question}", answers and predictions lower-cased, ANLS.
    _benchmark(
        "infovqa", _ANSWER, "anls", "val", "InfoVQA (val)",
        "infographicsVQA_val_v1.0_withQT.json (data[] with questionId, question, image_local_name, answers), "
        "images in infographicsvqa_images/ or images/; or the lmms-lab/DocVQA parquet export "
        "(config InfographicVQA, split validation)",
        Files(("infographicsVQA_{split}_v1.0_withQT.json", "infographicsVQA_{split}_v1.0.json"), _DATA,
              Fields(id="questionId", image="image_local_name", prompt=_QUESTION, answers="answers",
                     extra={"question_id": "questionId"}),
              ("infographicsvqa_images", "images", "."), "the InfographicVQA images"),
        _LMMS_DOCVQA),
    # transfers/stvqa.py: lower-cased, ANLS; val is a big_vision-made part of train (see _stvqa_records).
    _benchmark(
        "stvqa", _ANSWER, "anls", "val", "ST-VQA (val)",
        "train_task_3.json (data[] with question_id, file_path, question, answers) with images in "
        "train_images/, and val_ids.txt listing the file_path values of big_vision's held-out val",
        Files(("{split}_task_3.json", "train_task_3.json"), _stvqa_records,
              Fields(id="question_id", image="file_path", prompt=_QUESTION, answers="answers",
                     extra={"question_id": "question_id"}),
              ("train_images", "test_task3_images", "images"), "the ST-VQA images")),
    # transfers/chartqa.py: the question alone is the prefix; human and augmented questions are two
    # evals (and two rows of the card), each on test, relaxed accuracy, predictions lower-cased.
    *(_benchmark(
        name, "{question}", "relaxed_accuracy", "test", card,
        f"test_{subset}.json (a list of imgname, query, label) with the charts in png/, in the folder given "
        f"or its test/; or the lmms-lab/ChartQA parquet export (split test, rows of type {subset}_test)",
        Files((f"{{split}}_{subset}.json", f"{{split}}/{{split}}_{subset}.json"), _json_records,
              Fields(id="_index", image="imgname", prompt={"question": "query"}, answers="label"),
              ("png",), "the ChartQA charts"),
        Parquet("lmms-lab/ChartQA",
                Fields(id="_index", image="image", prompt=_QUESTION, answers="answer",
                       keep={"type": f"{subset}_{{split}}"})))
      for name, subset, card in [("chartqa", "human", "ChartQA (human)"),
                                 ("chartqa_aug", "augmented", "ChartQA (aug)")]),
    # transfers/cococap.py: "caption en", CIDEr on TFDS coco_captions "val", which is Karpathy's val split.
    _benchmark(
        "coco_captions", _CAPTION, "cider", "karpathy_val", "COCOcap",
        "Karpathy's dataset_coco.json (split karpathy_val / karpathy_test) or COCO's captions_val2014.json "
        "(split val2014), COCO images in val2014/ (or images/val2014/); or the lmms-lab/COCO-Caption "
        "parquet export (split val: all of val2014)",
        Files(("captions_{split}.json", "dataset_coco.json"), _coco_caption_records,
              Fields(id="id", image="image", answers="captions"),
              (".", "images", "val2014", "images/val2014", "../val2014"), "the COCO 2014 images",
              {"karpathy_val": "val", "karpathy_test": "test", "karpathy_train": "train"}),
        Parquet("lmms-lab/COCO-Caption", Fields(id="question_id", image="image", answers="answer"),
                {"val2014": "val"})),
    # transfers/cococap.py also scores NoCaps val with the COCO-captions transfer.
    _benchmark(
        "nocaps", _CAPTION, "cider", "val", "NoCaps",
        "nocaps_val_4500_captions.json with the Open Images validation images in validation/ (or images/); "
        "or the lmms-lab/NoCaps parquet export (split validation)",
        Files(("nocaps_{split}_4500_captions.json",), _coco_caption_records,
              Fields(id="id", image="image", answers="captions"),
              ("validation", "images/validation", "images", "."), "the NoCaps (Open Images) images"),
        Parquet("lmms-lab/NoCaps", Fields(id="image_id", image="image", answers="annotations_captions"),
                {"val": "validation"})),
    # transfers/textcaps.py: "caption en", CIDEr on val; the JSON has one record per caption, grouped per
    # image as big_vision's builder groups them.
    _benchmark(
        "textcaps", _CAPTION, "cider", "val", "TextCaps",
        "TextCaps_0.1_val.json (data[] with image_id, caption_str) with images in train_images/; "
        "or the lmms-lab/TextCaps parquet export (split val)",
        Files(("TextCaps_0.1_{split}.json",), _DATA,
              Fields(id="image_id", image="image_id", image_file="{}.jpg", answers="caption_str", group=True),
              ("train_images", "test_images", "images"), "the TextVQA/TextCaps images"),
        Parquet("lmms-lab/TextCaps",
                Fields(id="image_id", image="image", answers="caption_str", group=True))),
    _refcoco("refcoco", "refs(unc).json", "lmms-lab/RefCOCO", "RefCOCO (val)"),
    _refcoco("refcoco+", "refs(unc).json", "lmms-lab/RefCOCOplus", "RefCOCO+ (val)"),
    _refcoco("refcocog", "refs(umd).json", "lmms-lab/RefCOCOg", "RefCOCOg (val)"),
    # transfers/tallyqa.py: "answer en {question}", the TallyQA evaluator, which splits by `issimple`;
    # the card has rows "TallyQA (simple)" and "TallyQA (complex)" only (MODEL_CARD "tallyqa/<subset>").
    _benchmark(
        "tallyqa", _ANSWER, "tallyqa_accuracy", "test", "TallyQA",
        "test.json (a list of image, question, answer, issimple) with the images at their 'image' path "
        "(VG_100K/, VG_100K_2/, train2014/, val2014/) in the folder given or its images/",
        Files(("{split}.json",), _json_records,
              Fields(id="question_id", image="image", prompt=_QUESTION, answers="answer",
                     extra={"issimple": "issimple", "question_id": "question_id"}),
              (".", "images"), "the Visual Genome and COCO images")),
    # transfers/tallyqa.py: CountBenchQA, big_vision's questions on CountBench's hub images.
    _benchmark(
        "countbenchqa", _ANSWER, "countbench_accuracy", "test", "CountBenchQA",
        "the vikhyatk/CountBenchQA parquet export (image, question, number, text; split test)",
        parquet=Parquet("vikhyatk/CountBenchQA",
                        Fields(id="_index", image="image", prompt=_QUESTION, answers="number",
                               extra={"text": "text"}))),
    # transfers/gqa.py: "answer en {question}", one answer compared exactly, final split testdev_balanced.
    _benchmark(
        "gqa", _ANSWER, "exact_match", "testdev_balanced", "GQA",
        "testdev_balanced_questions.json (question id -> imageId, question, answer) with images/",
        Files(("{split}_questions.json",), partial(_json_records, by_id=True),
              Fields(id="_key", image="imageId", image_file="{}.jpg", prompt=_QUESTION, answers="answer",
                     extra={"question_id": "_key"}),
              ("images", "."), "the GQA images")),
    # Video (big_vision transfers msrvtt_cap.py, msrvtt_qa.py, msvd_qa.py, activitynet_qa.py,
    # activitynet_cap.py, vatex_cap.py): 16 frames at a stride of 9 from the first frame (each video
    # example's extra "video": palikit.video.read_video's), "caption en" scored by CIDEr (the
    # coco_caption evaluator), "answer en {question}" by the vqa evaluator's accuracy (one answer:
    # exact match). The files as each set's authors publish them, the videos in a folder beside.
    _benchmark(
        "msrvtt_cap", _CAPTION, "cider", "test", "MSRVTT-Cap",
        "test_videodatainfo.json (split test) or videodatainfo_2017.json (train, validate), videos "
        "videoN.mp4 in TestVideo/, TrainValVideo/ or videos/",
        Files(("{split}_videodatainfo.json", "videodatainfo_2017.json"), _msrvtt_caption_records,
              Fields(id="video_id", image="video_id", image_file="{}.mp4", answers="captions", constants=_VIDEO),
              _VIDEOS + ("TestVideo", "TrainValVideo", "videos/all"), "the MSR-VTT videos",
              {"val": "validate"})),
    _benchmark(
        "msrvtt_qa", _ANSWER, "vqa_accuracy", "test", "MSRVTT-QA",
        "{split}_qa.json (a list of question, answer, video_id, id), videos video{video_id}.mp4 in "
        "video/ or videos/",
        Files(("{split}_qa.json",), _json_records,
              Fields(id="id", image="video_id", image_file="video{}.mp4", prompt=_QUESTION, answers="answer",
                     constants=_VIDEO),
              _VIDEOS + ("TestVideo", "TrainValVideo", "videos/all"), "the MSR-VTT videos")),
    _benchmark(
        "msvd_qa", _ANSWER, "vqa_accuracy", "test", "MSVD-QA",
        "{split}_qa.json (question, answer, video_id, id) and youtube_mapping.txt beside it, clips "
        "<youtube clip>.avi in YouTubeClips/ or video/",
        Files(("{split}_qa.json",), _msvd_qa_records,
              Fields(id="id", image="video", image_file="{}.avi", prompt=_QUESTION, answers="answer", constants=_VIDEO),
              _VIDEOS + ("YouTubeClips",), "the MSVD clips")),
    _benchmark(
        "activitynet_qa", _ANSWER, "vqa_accuracy", "test", "ActivityNet-QA",
        "{split}_q.json (question, question_id, video_name) and {split}_a.json (answer, question_id), "
        "videos v_<video_name>.mp4 in videos/ or all_test/",
        Files(("{split}_q.json",), _activitynet_qa_records,
              Fields(id="question_id", image="video_name", image_file="v_{}.mp4", prompt=_QUESTION,
                     answers="answer", constants=_VIDEO),
              _VIDEOS + ("all_test", "v1-3/test"), "the ActivityNet videos")),
    _benchmark(
        "activitynet_cap", _CAPTION, "cider", "val", "ActivityNet-Cap",
        "val_1.json (v_<id> -> timestamps, sentences; split val) or train.json / val_2.json, videos "
        "v_<id>.mp4 in videos/: one example per captioned segment, its frames from that segment",
        Files(("{split}.json",), _activitynet_caption_records,
              Fields(id="id", image="video", image_file="{}.mp4", answers="caption", constants=_VIDEO,
                     extra={"clip": "clip"}),
              _VIDEOS, "the ActivityNet videos", {"val": "val_1"})),
    _benchmark(
        "vatex_cap", _CAPTION, "cider", "val", "VATEX-Cap",
        "vatex_validation_v1.0.json (split val) or vatex_public_test_english_v1.1.json (split test): a "
        "list of videoID, enCap; videos <videoID>.mp4 in videos/ or val/",
        Files(("vatex_{split}.json",), _json_records,
              Fields(id="videoID", image="videoID", image_file="{}.mp4", answers="enCap", constants=_VIDEO),
              _VIDEOS + ("val", "public_test"), "the VATEX clips",
              {"val": "validation_v1.0", "test": "public_test_english_v1.1", "train": "training_v1.0"})),
    # The shapes world's prompts differ per example (palikit.synthetic.TRAINED_PROMPTS), and so do metrics.
    Benchmark("synthetic", "(per example)", "exact_match", read_synthetic, "test",
              "no files: palikit.synthetic scenes (seed 12345, 200 images of 96 px)", ""),
]}


# The PaliGemma 2 model card, table "PaliGemma 2 results by model resolution and size": the pt
# checkpoints fine-tuned on each task. "name/x" keys are the card's rows for another split or subset.
_CARD_COLUMNS = ("paligemma2-3b-pt-224", "paligemma2-10b-pt-224", "paligemma2-28b-pt-224",
                 "paligemma2-3b-pt-448", "paligemma2-10b-pt-448", "paligemma2-28b-pt-448")
_CARD_ROWS = {  # 224-3B, 224-10B, 224-28B, 448-3B, 448-10B, 448-28B
    "aokvqa_da": (64.2, 68.9, 70.2, 67.9, 70.8, 71.2),
    "coco_captions": (141.3, 143.7, 144.0, 143.4, 145.0, 145.2),
    "chartqa_aug": (74.4, 74.2, 68.9, 89.2, 90.1, 85.1),
    "chartqa": (42.0, 48.4, 46.8, 54.0, 66.4, 61.3),
    "countbenchqa": (81.0, 84.0, 86.4, 82.0, 85.3, 87.4),
    "docvqa": (39.9, 43.9, 44.9, 73.6, 76.6, 76.1),
    "gqa": (66.2, 67.2, 67.3, 68.1, 68.3, 68.3),
    "infovqa": (25.2, 33.6, 36.4, 37.5, 47.8, 46.7),
    "nocaps": (123.1, 126.3, 127.1, 123.5, 126.9, 127.0),
    "ocrvqa": (73.4, 74.7, 75.3, 75.7, 76.3, 76.6),
    "okvqa": (64.2, 68.0, 71.2, 64.1, 68.6, 70.6),
    "refcoco/testA": (75.7, 77.2, 76.8, 78.6, 79.7, 79.3),
    "refcoco/testB": (71.0, 74.2, 73.9, 73.5, 76.2, 74.8),
    "refcoco": (73.4, 75.9, 75.0, 76.3, 78.2, 77.3),
    "refcoco+/testA": (72.7, 74.7, 73.6, 76.1, 77.7, 76.6),
    "refcoco+/testB": (64.2, 68.4, 67.1, 67.0, 71.1, 68.6),
    "refcoco+": (68.6, 72.0, 70.3, 72.1, 74.4, 72.8),
    "refcocog/test": (69.0, 71.9, 70.7, 72.7, 74.8, 73.7),
    "refcocog": (68.3, 71.4, 70.5, 72.3, 74.4, 73.0),
    "stvqa": (61.9, 64.3, 65.1, 80.5, 82.0, 81.8),
    # The card has no overall TallyQA row, only its two subsets.
    "tallyqa/complex": (70.3, 73.4, 74.2, 73.6, 76.7, 76.8),
    "tallyqa/simple": (81.8, 83.2, 83.4, 85.3, 86.2, 85.7),
    "textcaps": (127.5, 137.9, 139.9, 152.1, 157.7, 153.6),
    "textvqa": (59.6, 64.0, 64.7, 75.2, 76.6, 76.2),
    "vqav2": (83.0, 84.3, 84.5, 84.8, 85.8, 85.8),
}
MODEL_CARD: dict[str, dict[str, float]] = {
    name: dict(zip(_CARD_COLUMNS, row)) for name, row in _CARD_ROWS.items()}


def benchmark(name: str) -> Benchmark:
    """The registry entry of `name` (case-insensitive)."""
    try:
        return BENCHMARKS[name.lower()]
    except KeyError:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


def read_benchmark(name: str, path: str | Path, split: str | None = None,
                   limit: int | None = None) -> list[EvalExample]:
    """The examples of benchmark `name` at `path` (a folder, or its annotation or parquet file), in file
    order: `split` defaults to the one the model card reports; `limit` stops reading after that many."""
    b = benchmark(name)
    return list(islice(b.reader(path, split or b.split), limit))


def published(benchmark_name: str, checkpoint: str | Path) -> float | None:
    """The model card's number for a checkpoint: a hub id ("google/paligemma2-3b-pt-224") or a model
    folder, matched by its last part, case-insensitively; None when the card has none."""
    key = Path(str(checkpoint).rstrip("/")).name.lower()
    rows = {name.lower(): row for name, row in MODEL_CARD.items()}
    return rows.get(benchmark_name.lower(), {}).get(key)
