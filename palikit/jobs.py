"""`palikit run`: thousands of jobs from a JSONL file, batched, resumable, never losing work.

Records are appended in input order as the jobs finish and fsync'ed, and a restart skips the lines
already in the output file and drops a torn last line, so a crash loses at most the jobs in flight.
Under torchrun (`torchrun --nproc_per_node N -m palikit run ...`, one node or many) each rank
answers every N-th line into OUTPUT.rankR.jsonl, and rank 0 merges them into the output in line
order: the same file as one process writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from . import tasks, video
from .atomic import merge_rank_files, rank_file, rank_files, read_records
from .dist import barrier
from .engine import Work, run_in_order
from .maskcodec import MaskCodec
from .processor import InputError, load_image

JOB_FORMAT = """\
Each line of --input is one job, a JSON object:
  {"image": "cat.jpg", "prompt": "caption en"}
  {"image": "shelf.png", "task": "detect", "labels": ["bottle", "can"], "id": "shelf-1"}
  {"image": "/data/scan.png", "task": "ocr", "max_new_tokens": 256}
image: a path (relative to the input file's folder). Either "prompt" (any PaliGemma prefix) or
"task" (a verb: %s) with that task's fields (lang, question, labels, ...). "id": any
JSON value, copied to the record. "max_new_tokens": this job's budget (default --max-new-tokens, or
else its task's: `palikit TASK --help` says it). "adapter": the name of a LoRA adapter the run
loaded (--adapter NAME=DIR, --adapters-dir DIR); without it, the base model. "video" instead of
"image": a clip (mp4, webm, mov, mkv, animated GIF) whose "frames" (default 16) are taken every
"stride"-th (default 9) from the first, as big_vision samples them; its record has "frame_times".
Each line gets one record in the output, in input order:
  {"line": N, "id": ..., "prompt": ..., "text": ..., "finish_reason": ..., "objects": [...]}
(finish_reason: eos, the answer ended; length, it used its budget; objects: detect, segment)
  {"line": N, "id": ..., "error": "what is wrong"}
N is the 1-based line number. A bad job (not JSON, a field of the wrong type, an unknown task,
an unreadable image, too long for the model) gets its error record and every other job runs.""" % ", ".join(tasks.TASKS)

JOB_KEYS = ("image", "video", "frames", "stride", "prompt", "task", "id", "max_new_tokens", "adapter")


def job_prompt(job: dict) -> tuple[str, tasks.TaskSpec]:
    """-> (prompt, its task); raises InputError for a malformed job."""
    if "prompt" in job:
        prompt = job["prompt"]
        if not isinstance(prompt, str):
            raise InputError(f"'prompt' must be a string, got {_kind(prompt)}")
        if unknown := sorted(set(job) - set(JOB_KEYS) - {"task"}):
            raise InputError(f"unknown field {unknown[0]!r} beside 'prompt' (job fields: {', '.join(JOB_KEYS)})")
        try:
            return prompt, tasks.spec_of_prompt(prompt)
        except ValueError as e:
            raise InputError(str(e)) from None
    verb = job.get("task")
    if not isinstance(verb, str) or verb not in tasks.TASKS:
        raise InputError(f"unknown task {verb!r}; use one of {', '.join(tasks.TASKS)} or give a 'prompt'")
    spec = tasks.TASKS[verb]
    fields = {spec.aliases.get(k, k): (k, v) for k, v in job.items() if k not in JOB_KEYS}
    if unknown := sorted(k for f, (k, _) in fields.items() if f not in {a.name for a in spec.args}):
        raise InputError(f"task {verb!r} has no field {unknown[0]!r}; its fields: "
                         f"{', '.join(a.name for a in spec.args) or '(none)'}")
    try:
        prompt = spec.build(**{f: v for f, (_, v) in fields.items()})
    except (TypeError, ValueError) as e:  # a missing field, or one of the wrong type or value
        raise InputError(str(e)) from None
    return prompt, spec


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def job_budget(job: dict, default: int) -> int:
    n = job.get("max_new_tokens", default)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"'max_new_tokens' must be a whole number >= 1, got {n!r}")
    return n


def finished_lines(output: Path) -> set[int]:
    """Line numbers already answered in the output file and in the rank files beside it (a torn
    last record is cut off, see atomic.read_records)."""
    done = set()
    for path in [output, *rank_files(output)]:
        for rec in read_records(path):
            if not isinstance(rec.get("line"), int):
                break
            done.add(rec["line"])
    return done


def run_jobs(pipe, input_path: str | Path, output_path: str | Path, batch_size: int = 8,
             max_new_tokens: int | None = None, codec=None, rank: int = 0, world: int = 1) -> dict:
    """Answer every job of input_path into output_path; a bad job gets an error record, and only a
    problem with the run itself (input, output, codec) raises. Jobs stream through palikit.engine
    (batch_size rows; a row freed by a finished job takes the next at once); the records are
    appended in input order, each run of finished ones fsync'ed. Under torchrun (world > 1) each
    rank answers every world-th line into its own file (output.rankR.jsonl) and rank 0 merges them.
    max_new_tokens: a job's budget unless it sets its own; None: its task's (tasks.default_budget)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise InputError(f"input file not found: {input_path}")
    if codec is not None and not isinstance(codec, MaskCodec):
        codec = MaskCodec.from_npz(codec)  # a bad --vae stops the run before any job
    lines = input_path.read_bytes().split(b"\n")
    if lines[-1] == b"":  # the file's last newline ends a line; it starts none
        lines.pop()
    done = finished_lines(output_path)
    todo = [n for n in range(1, len(lines) + 1) if n not in done and (n - 1) % world == rank]
    stats = {"total": len(lines), "skipped": len(done), "answered": 0, "errors": 0}
    works = [_check(pipe, n, lines[n - 1], input_path.parent, max_new_tokens, codec) for n in todo]
    writer = rank_file(output_path, rank) if world > 1 else output_path
    with open(writer, "a") as out, tqdm(total=len(todo), unit="job", disable=None if rank == 0 else True) as bar:
        for ready in run_in_order(pipe, works, batch_size):
            for work, request in ready:
                rec = _record(pipe, work, request, codec)
                stats["answered"] += 1
                stats["errors"] += "error" in rec
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(ready))
    if world > 1:
        barrier()
    if rank == 0:
        merge_rank_files(output_path, "line")  # rank files of this run, or of a torchrun run resumed alone
    return stats


def _check(pipe, n: int, line: bytes, base: Path, max_new_tokens: int | None, codec) -> Work:
    """Line n as a Work (its image read when it is submitted), or with the error of a bad job."""
    work = Work(n, None, max_new_tokens or 0, lambda: [], about=({}, None, None))
    try:
        try:
            job = json.loads(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise InputError(f"the line is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except ValueError as e:
            raise InputError(f"not JSON ({e})" if line.strip() else "an empty line: no job") from None
        if not isinstance(job, dict):
            raise InputError(f"a job is a JSON object, got {_kind(job)}")
        work.about = (job, None, None)
        key = "video" if "video" in job else "image"
        image = job.get(key)
        if not isinstance(image, str) or not image.strip():
            raise InputError(f"'{key}' must be a path (a string), got {image!r}")
        if "video" in job and "image" in job:
            raise InputError("a job has an 'image' or a 'video', not both")
        prompt, spec = job_prompt(job)
        work.max_new_tokens = job_budget(job, max_new_tokens or tasks.default_budget(prompt))
        sampled = {}
        if key == "video":
            for name, default in (("frames", video.NUM_FRAMES), ("stride", video.STRIDE)):
                sampled[name] = n = job.get(name, default)
                if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    raise InputError(f"'{name}' must be a whole number >= 1, got {n!r}")
        work.adapter = job.get("adapter")
        if work.adapter is not None and not isinstance(work.adapter, str):
            raise InputError(f"'adapter' must be the name of a loaded adapter (a string), got {work.adapter!r}")
        if spec.masks and codec is None and pipe.codec_path is None:
            raise InputError(f"a {spec.verb} job needs the mask codec: pass --vae PATH (big_vision's "
                             "vae-oid.npz); the model folder has none")
        work.ids = pipe.prompt_ids(prompt, sampled.get("frames", 1), work.max_new_tokens)  # a newline or an over-long prompt
        path = Path(image)
        path = path if path.is_absolute() else base / path
        if key == "video":
            work.read_images = lambda: pipe.read_video(path, **sampled)
        else:
            work.read_images = lambda: [load_image(path)]
        work.about = (job, prompt, spec)
    except (ValueError, InputError) as e:
        work.error = str(e)
    return work


def _record(pipe, work: Work, request, codec) -> dict:
    n = work.key
    job, prompt, spec = work.about
    if work.error:
        return {"line": n, **({"id": job["id"]} if "id" in job else {}), "error": work.error}
    g = request.result()
    text = pipe.tokenizer.decode(g.tokens)
    rec = {"line": n, "id": job.get("id"), "prompt": prompt, "text": text, "finish_reason": g.finish_reason}
    if isinstance(work.images, video.Video):
        rec["frame_times"] = work.images.times
    try:
        if spec.parse is not None:
            rec["objects"] = [o.to_dict() for o in pipe.parse_objects(spec, text, g, work.images[0], codec)]
    except ValueError as e:
        rec = {"line": n, "id": job.get("id"), "prompt": prompt, "error": str(e)}
    return rec
