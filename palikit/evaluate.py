"""`palikit eval`: a checkpoint scored as the model card scores it.

What is evaluated (palikit/eval_sets.py reads it):
- `--benchmark NAME --data PATH`: a benchmark of the model card in the files it is published as
  (its prompt template, metric and split come from eval_sets.BENCHMARKS);
- `--data FILE.jsonl`: one's own held-out file in the fine-tuning format (image, prefix, suffix),
  each example scored by the metrics of its task word (TaskSpec.eval_metrics: caption -> CIDEr,
  answer -> VQA accuracy, ocr -> exact match and ANLS, detect -> acc@0.5 and mAP, segment -> mIoU)
  unless `--metric` names one for all;
- `--benchmark synthetic`: held-out scenes of the shapes world that trained the bundled model.

How (the metrics are palikit/metrics.py's, each computed as big_vision's evaluator does):
1. every example is generated greedily and scored on its own (Metric.score -> a small JSON
   record), one line per example appended to the predictions file (`--out preds.jsonl`, fsync'd
   per batch). A killed run started again skips the examples already there: nothing is lost,
   nothing is counted twice;
2. under torchrun each rank takes every world-th example and appends to its own file
   (preds.rankR.jsonl); rank 0 merges them into the predictions file in example order;
3. the records are aggregated per group (the benchmark, or the task word of a .jsonl/synthetic
   example) and metric (Metric.aggregate: corpus CIDEr and mAP need every record at once) into a
   JSON report and a Markdown table, beside the model card's number when the checkpoint is one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from . import tasks
from .atomic import merge_rank_files, rank_file, rank_files, read_records, write_text_atomic
from .dist import barrier
from .eval_sets import BENCHMARKS, EvalExample, benchmark, published, read_benchmark, read_synthetic
from .data import DatasetError, Example, read_jsonl
from .data import load_examples as read_any
from .metrics import metric as metric_named
from .engine import Work, run_in_order
from .processor import InputError, load_image
from .quantize import scheme_of


def eval_example(ex: Example) -> EvalExample:
    """A fine-tuning example as an evaluation example: its suffix is the one reference (detect /
    segment truths are parsed from it once the image size is known)."""
    return EvalExample(id=ex.where, image=ex.images[0] if len(ex.images) == 1 else list(ex.images),
                       prefix=ex.prefix, answers=[ex.suffix.strip()],
                       extra={"suffix": ex.suffix} | ({"video": ex.video} if ex.video else {}))


def jsonl_examples(path: str | Path, limit: int | None = None) -> list[EvalExample]:
    if not Path(path).is_file():
        raise InputError(f"data file not found: {path}")
    try:
        return [eval_example(ex) for ex in read_jsonl(path)[:limit]]
    except DatasetError as e:
        raise InputError(str(e)) from None


def load_examples(benchmark_name: str | None, data: str | None, split: str | None = None,
                  limit: int | None = None, synthetic: dict | None = None, task: str = "detect",
                  codec=None, columns: dict | None = None) -> tuple[str, list[EvalExample]]:
    """(name shown in the report, examples) for `palikit eval`'s --benchmark / --data; `synthetic`:
    read_synthetic's n_images / seed / size for the synthetic benchmark, also the default. --data
    alone reads what `palikit train` reads (a .jsonl, COCO, Roboflow / maestro folders, a Hugging
    Face dataset with `columns`; `split` of a folder, default valid; `task`, `codec`: COCO's)."""
    if benchmark_name is not None:
        bench = benchmark(benchmark_name)
        if bench.name == "synthetic":
            return bench.name, list(read_synthetic(**(synthetic or {})))[:limit]
        if data is None:
            raise InputError(f"--benchmark {bench.name} needs --data PATH: {bench.layout}")
        return bench.name, read_benchmark(bench.name, data, split, limit)
    if data is None:  # plain `palikit eval`: the world the bundled model was trained on
        return load_examples("synthetic", None, split, limit, synthetic)
    if Path(data).suffix == ".jsonl":
        return Path(data).name, jsonl_examples(data, limit)
    if not Path(data).exists():
        raise InputError(f"data not found: {data}")
    try:
        examples = read_any(data, split or "valid", task, codec, columns=columns)
    except (DatasetError, FileNotFoundError) as e:
        raise InputError(f"{data}: {e}; --data takes what `palikit train` reads, and a benchmark's own files "
                         "with --benchmark NAME") from None
    return Path(data).name, [eval_example(ex) for ex in examples[:limit]]


def task_of(ex: EvalExample) -> tasks.TaskSpec | None:
    """What the output is parsed as: the example's task (RefCOCO's prompt is the bare sentence, as
    big_vision's transfer config has it, yet the answer is a segmentation), else its task word."""
    return tasks.spec_of_word(ex.extra.get("task", "")) or tasks.spec_of_word(tasks.task_word(ex.prefix))


def metrics_of(ex: EvalExample, bench_metric: str | None, override: str | None) -> tuple[str, ...]:
    """Which metrics score an example: --metric, else the example's own (synthetic tasks), else the
    benchmark's, else its task word's (exact match for a free-form prefix)."""
    if override or ex.extra.get("metric") or bench_metric:
        return (override or ex.extra.get("metric") or bench_metric,)
    spec = task_of(ex)
    return spec.eval_metrics if spec is not None else ("exact_match",)


def truth_objects(pipe, ex: EvalExample, image, codec) -> list[dict]:
    """The example's true objects; from its suffix (pixels at this image's size) for a .jsonl."""
    spec = task_of(ex)
    if ex.truth_objects or "suffix" not in ex.extra or spec is None or spec.parse is None:
        return ex.truth_objects
    objects = spec.parse(ex.extra["suffix"], image.width, image.height).objects
    if spec.masks:
        pipe.attach_masks(objects, image, codec)
    return [{"label": o.label, "box": list(o.box), **({"mask": o.mask} if spec.masks else {})}
            for o in objects]


def score_example(pipe, ex: EvalExample, text: str, generated, image, names: Sequence[str], codec=None) -> dict:
    """{metric name: its record} for one generated answer."""
    inputs = {"prediction": text, "answers": ex.answers, "width": image.width, "height": image.height,
              "extra": ex.extra, "truth_objects": truth_objects(pipe, ex, image, codec)}
    spec = task_of(ex)
    if spec is not None and spec.parse is not None:
        try:
            inputs["objects"] = pipe.parse_objects(spec, text, generated, image, codec)
        except ValueError:  # unparseable output: no objects, which the metric counts as invalid
            inputs["objects"] = []
    return {name: metric_named(name).score(inputs) for name in names}


def group_of(ex: EvalExample, name: str, by_task: bool) -> str:
    return (ex.extra.get("task") or tasks.task_word(ex.prefix) or "-") if by_task else name


def predict(pipe, examples: Sequence[EvalExample], indices: Sequence[int], *, name: str, by_task: bool,
            bench_metric: str | None, metric: str | None, batch_size: int, max_new_tokens: int | None,
            codec=None):
    """Yield lists of records, one per index, in order, as palikit.engine finishes them: batch_size
    rows decode together and a freed row takes the next example at once. Each example gets its
    task's token budget (max_new_tokens overrides it), whatever it runs beside."""
    works = []
    for i in indices:
        ex = examples[i]
        paths = ex.image if isinstance(ex.image, list) else [ex.image]
        spec = task_of(ex)
        budget = max_new_tokens or (spec.max_new_tokens if spec else 32)
        work = Work(i, None, budget, lambda paths=paths: [load_image(p) for p in paths])
        n_images = len(paths)
        if "video" in ex.extra:  # a clip: its frames, as the benchmark samples them
            sampled = {**ex.extra["video"], **({"clip": ex.extra["clip"]} if "clip" in ex.extra else {})}
            n_images = sampled["frames"]
            work.read_images = lambda path=paths[0], s=sampled: pipe.read_video(path, **s)
        try:
            work.ids = pipe.prompt_ids(ex.prefix, n_images, budget)
        except InputError as e:  # a newline in the prefix, or too long for the model
            work.error = str(e)
        works.append(work)
    for ready in run_in_order(pipe, works, batch_size):
        yield [_record(pipe, examples[w.key], w, request, name, by_task, bench_metric, metric, codec)
               for w, request in ready]


def _record(pipe, ex: EvalExample, work: Work, request, name, by_task, bench_metric, metric, codec) -> dict:
    rec = {"index": work.key, "id": ex.id, "group": group_of(ex, name, by_task), "prefix": ex.prefix,
           "answers": ex.answers}
    names = metrics_of(ex, bench_metric, metric)
    if work.error:
        return rec | {"error": work.error, "prediction": "", "scores": _failed_scores(ex, names)}
    generated = request.result()
    text = pipe.tokenizer.decode(generated.tokens)
    return rec | {"prediction": text,
                  "scores": score_example(pipe, ex, text, generated, work.images[0], names, codec)}


def _failed_scores(ex: EvalExample, names: Sequence[str]) -> dict:
    """An example that could not run counts as an empty answer, not as absent, where its truth is
    known without the image (answers, a benchmark's boxes); otherwise it is only in the error count."""
    inputs = {"prediction": "", "answers": ex.answers, "objects": [], "truth_objects": ex.truth_objects,
              "width": 1, "height": 1, "extra": ex.extra}
    scores = {}
    for name in names:
        try:
            scores[name] = metric_named(name).score(inputs)
        except (IndexError, KeyError, ValueError):  # a mask metric without the truth mask
            pass
    return scores


# ---- predictions files: resumable, one per rank, merged by rank 0


HEADER = -1  # the index of a predictions file's first line: what made the file (provenance)


def palikit_version() -> str:
    try:
        return importlib.metadata.version("palikit")
    except importlib.metadata.PackageNotFoundError:  # run from a clone without installing
        return "unknown"


def provenance(pipe, examples: Sequence[EvalExample], *, model: str | None, metric: str | None,
               max_new_tokens: int | None, seed: int | None) -> dict:
    """What a predictions file's records depend on: the model and how it was loaded, the examples,
    what scores them, and palikit's version. A file is only continued by the same."""
    where = Path(model) if model is not None else None
    examples_hash = hashlib.sha256(json.dumps([[e.id, e.prefix, e.answers] for e in examples],
                                              ensure_ascii=False, default=str).encode()).hexdigest()
    return {"model": str(where.resolve()) if where is not None and where.exists() else model,
            "dtype": str(pipe.model.dtype).removeprefix("torch."), "quantize": scheme_of(pipe.model),
            "seed": seed, "palikit": palikit_version(), "examples": len(examples), "examples_sha256": examples_hash,
            "metric": metric, "max_new_tokens": max_new_tokens}


def finished(out: Path, rank: int, examples: Sequence[EvalExample], made_by: dict) -> dict[int, dict]:
    """Records already in the predictions file and every rank's file (a rank repairs only its own
    torn last line); errored ones are not: they run again. A file whose first line says it was made
    otherwise (another model, dtype, quantisation, example set, palikit version) is refused, naming
    what differs, rather than mixing the two."""
    done = {}
    for path in [out, *rank_files(out)]:
        records = read_records(path, repair=path in (out, rank_file(out, rank)))
        if not records:
            continue
        header = records[0].get("provenance") if records[0].get("index") == HEADER else None
        if header != made_by:
            what = ("it has no provenance line (an older palikit's)" if header is None else
                    "; ".join(f"{k} {header.get(k)!r} there, {v!r} now" for k, v in made_by.items()
                              if header.get(k) != v))
            raise InputError(f"{path} holds predictions made otherwise: {what}; pass --force-new to start it "
                             "again, or a new --out")
        for rec in records[1:]:
            i = rec.get("index")
            if not isinstance(i, int) or i >= len(examples) or rec.get("id") != examples[i].id:
                raise InputError(f"{path} holds predictions of another evaluation (example {i} is "
                                 f"{rec.get('id')!r}, expected {examples[min(i or 0, len(examples) - 1)].id!r}); "
                                 "pass a new --out")
            if "error" not in rec:
                done[i] = rec
    return done


def merge(out: Path, n_examples: int) -> list[dict]:
    """Every rank's records into `out`, in example order, written atomically; the rank files go."""
    ordered = [r for r in merge_rank_files(out, "index") if r["index"] != HEADER]
    if len(ordered) != n_examples:
        raise InputError(f"{out}: {len(ordered)} of {n_examples} predictions; a rank stopped early, run again "
                         "to finish")
    return ordered


def evaluate(pipe, examples: Sequence[EvalExample], *, name: str, bench_metric: str | None = None,
             metric: str | None = None, batch_size: int = 8, max_new_tokens: int | None = None, codec=None,
             out: str | Path | None = None, rank: int = 0, world: int = 1, by_task: bool = False,
             model: str | None = None, split: str | None = None, seed: int | None = None,
             force_new: bool = False) -> dict:
    """Generate and score every example (this rank's share), resuming from `out`; -> the report
    (on every rank; the predictions are merged and scored on rank 0, the others return {})."""
    if metric is not None:
        metric_named(metric)  # an unknown --metric fails before any generation
    if not examples:
        raise InputError(f"{name}: no examples to evaluate")
    out = Path(out) if out is not None else None
    if out is None and world > 1:
        raise InputError("under torchrun pass --out PREDS.jsonl: the ranks merge their predictions through it")
    made_by = provenance(pipe, examples, model=model, metric=metric, max_new_tokens=max_new_tokens, seed=seed)
    if out is not None and force_new:
        if rank == 0:
            for path in [out, *rank_files(out)]:
                path.unlink(missing_ok=True)
        if world > 1:
            barrier()
    done = finished(out, rank, examples, made_by) if out is not None else {}
    mine = [i for i in range(rank, len(examples), world) if i not in done]
    kept = list(done.values())
    writer = None
    if out is not None:
        writer = open(rank_file(out, rank) if world > 1 else out, "a", encoding="utf-8")
        if writer.tell() == 0:
            writer.write(json.dumps({"index": HEADER, "provenance": made_by}) + "\n")
    try:
        with tqdm(total=len(mine), unit="example", disable=None if rank == 0 else True,
                  desc=f"eval {name}") as bar:
            for batch in predict(pipe, examples, mine, name=name, by_task=by_task, bench_metric=bench_metric,
                                 metric=metric, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 codec=codec):
                if writer is not None:
                    writer.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch))
                    writer.flush()
                    os.fsync(writer.fileno())
                kept += batch
                bar.update(len(batch))
    finally:
        if writer is not None:
            writer.close()
    if world > 1:
        barrier()
    if rank != 0:
        return {}
    records = merge(out, len(examples)) if out is not None else sorted(kept, key=lambda r: r["index"])
    return report(records, name=name, model=model, predictions=out, split=split) | {"provenance": made_by}


# ---- the report


def aggregate(records: Sequence[dict]) -> list[dict]:
    """One row per (group, metric): its numbers over the group's records."""
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in records:
        for m, scored in rec["scores"].items():
            by_key[(rec["group"], m)].append(scored)
    return [{"group": group, "metric": m, "examples": len(rows), "values": metric_named(m).aggregate(rows)}
            for (group, m), rows in by_key.items()]


def report(records: Sequence[dict], *, name: str, model: str | None = None,
           predictions: Path | None = None, split: str | None = None) -> dict:
    """The rows of aggregate(), each beside the model card's number for the checkpoint (the card
    names other splits than the default one as "refcoco/testA")."""
    rows = aggregate(records)
    hits = defaultdict(list)  # the whole output equal to the first reference: a check at a glance
    for r in records:
        hit = bool(r["answers"]) and r["prediction"].strip() == r["answers"][0]
        hits["all"].append(hit)
        hits[r["group"]].append(hit)
    for row in rows:
        if model is not None and row["group"] in BENCHMARKS:
            other = split is not None and split != BENCHMARKS[row["group"]].split
            card = published(f"{row['group']}/{split}" if other else row["group"], model)
            row["model_card"] = None if card is None else card / 100  # the card prints x100; one scale here
    return {"evaluated": name, "model": model, "examples": len(records),
            "errors": sum("error" in r for r in records),
            "first_error": next((r["error"] for r in records if "error" in r), None), "results": rows,
            "exact_match": {g: sum(h) / len(h) for g, h in hits.items()},
            "predictions": str(predictions) if predictions else None}


def markdown(rep: dict) -> str:
    """The report as a Markdown table, its numbers on the JSON's scale (the evaluators': fractions, and
    CIDEr as pycocoevalcap computes it; the model card prints both x100)."""
    def shown(v):
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    made = rep.get("provenance") or {}
    quantized = (made.get("quantize") or {}).get("scheme", "none")
    how = ", ".join(f"{k} {v}" for k, v in [("dtype", made.get("dtype")), ("quantize", quantized),
                                            ("seed", made.get("seed")), ("palikit", made.get("palikit"))]) if made else ""
    lines = [f"**{rep['evaluated']}** ({rep['model']}{'; ' + how if how else ''}): {rep['examples']} examples, "
             f"{rep['errors']} errors", "",
             "| group | metric | result | examples | model card / 100 |", "|---|---|---|---|---|"]
    for row in rep["results"]:
        values = ", ".join(f"{k} {shown(v)}" for k, v in row["values"].items())
        card = row.get("model_card")
        lines.append(f"| {row['group']} | {row['metric']} | {values} | {row['examples']} | "
                     f"{'' if card is None else shown(card)} |")
    return "\n".join(lines) + "\n"


def validation_values(rep: dict) -> dict[str, float]:
    """The trainer's validation numbers: `VALUE/GROUP` per task (cider/caption, accuracy/answer,
    acc50/detect, ...) and exact match of the whole output, overall and per task."""
    out = {f"{k}/{row['group']}": v for row in rep["results"] for k, v in row["values"].items()
           if v is not None}  # an undefined mAP (no true box among them) is not a number to log
    return out | {"exact_match": rep["exact_match"]["all"]} | {
        f"exact_match/{g}": v for g, v in rep["exact_match"].items() if g != "all"}


def validation_names(examples: Sequence[EvalExample], metric: str | None) -> set[str]:
    """Every name validation_values can give for these examples scored by task (with --metric
    `metric`): what a trainer's keep_best is checked against before the run starts."""
    names = {"exact_match"}
    for ex in examples:
        group = group_of(ex, "", by_task=True)
        names.add(f"exact_match/{group}")
        for m in metrics_of(ex, None, metric):
            names |= {f"{value}/{group}" for value in metric_named(m).values}
    return names


def write_report(rep: dict, path: str | Path) -> None:
    """The JSON report at `path` and its Markdown table beside it (same name, .md)."""
    path = Path(path)
    write_text_atomic(path, json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(path.with_suffix(".md"), markdown(rep))
