"""`palikit run`: thousands of jobs from a JSONL file, batched, resumable, never losing work.

Input line: {"image": PATH, "prompt": "caption en"} or {"image": PATH, "task": "detect", "labels": [...]}
(task: a verb of tasks.TASKS, with its fields as the Pipeline methods take them, e.g. lang, style,
question, labels; "id" is copied through). Output line per input line, in input order:
{"line": N, "id": ..., "prompt": ..., "text": ..., "objects": [...]} or {"line": N, "error": "..."}, N
the 1-based line number of the job (as `palikit data check` and editors count). A bad job (not
JSON, unknown task, missing field, unreadable image, a newline in its prompt, too long for the
model, segment without a mask codec) gets its error record and every other job runs. Jobs stream
through palikit.engine; records are appended in input order as the jobs finish and fsync'ed, and a
restart skips the lines already in the output file and drops a torn last line, so a crash loses at
most the jobs in flight.

Under torchrun (`torchrun --nproc_per_node N -m palikit run ...`, one node or many) each rank
answers every N-th line into OUTPUT.rankR.jsonl, and rank 0 merges them into the output in line
order: the same file as one process writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from . import tasks
from .atomic import merge_rank_files, rank_file, rank_files, read_records
from .dist import barrier
from .engine import Work, run_in_order
from .maskcodec import MaskCodec
from .processor import InputError, load_image


def job_prompt(job: dict) -> tuple[str, tasks.TaskSpec]:
    """-> (prompt, its task); raises InputError for a malformed job."""
    if "prompt" in job:
        prompt = str(job["prompt"])
        return prompt, tasks.spec_of_prompt(prompt)
    verb = job.get("task")
    if verb not in tasks.TASKS:
        raise InputError(f"unknown task {verb!r}; use one of {', '.join(tasks.TASKS)} or give a 'prompt'")
    spec = tasks.TASKS[verb]
    names = {a.name for a in spec.args}
    values = {spec.aliases.get(k, k): v for k, v in job.items() if spec.aliases.get(k, k) in names}
    try:
        prompt = spec.build(**values)
    except TypeError as e:  # a missing field
        raise InputError(str(e)) from None
    return prompt, spec


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
             max_new_tokens: int = 128, codec=None, rank: int = 0, world: int = 1) -> dict:
    """Answer every job of input_path into output_path; a bad job gets an error record, and only a
    problem with the run itself (input, output, codec) raises. Jobs stream through palikit.engine
    (batch_size rows; a row freed by a finished job takes the next at once); the records are
    appended in input order, each run of finished ones fsync'ed. Under torchrun (world > 1) each
    rank answers every world-th line into its own file (output.rankR.jsonl) and rank 0 merges them."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise InputError(f"input file not found: {input_path}")
    if codec is not None and not isinstance(codec, MaskCodec):
        codec = MaskCodec.from_npz(codec)  # a bad --vae stops the run before any job
    lines = input_path.read_text().splitlines()
    done = finished_lines(output_path)
    todo = [n for n, line in enumerate(lines, 1) if line.strip() and n not in done and (n - 1) % world == rank]
    stats = {"total": sum(1 for line in lines if line.strip()), "skipped": len(done), "answered": 0, "errors": 0}
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


def _check(pipe, n: int, text: str, base: Path, max_new_tokens: int, codec) -> Work:
    """Line n as a Work (its image read when it is submitted), or with the error of a bad job."""
    work = Work(n, None, max_new_tokens, lambda: [])
    try:
        job = json.loads(text)
        if not isinstance(job, dict) or "image" not in job:
            raise InputError("a job is a JSON object with an 'image' field")
        prompt, spec = job_prompt(job)
        if spec.masks and codec is None and pipe.codec_path is None:
            raise InputError(f"a {spec.verb} job needs the mask codec: pass --vae PATH (big_vision's "
                             "vae-oid.npz); the model folder has none")
        work.ids = pipe.prompt_ids(prompt, 1, max_new_tokens)  # a newline or an over-long prompt
        path = Path(job["image"])
        work.read_images = lambda: [load_image(path if path.is_absolute() else base / path)]
        work.about = (job, prompt, spec)
    except (ValueError, InputError) as e:  # JSONDecodeError is a ValueError
        work.error = str(e)
    return work


def _record(pipe, work: Work, request, codec) -> dict:
    n = work.key
    if work.error:
        return {"line": n, "error": work.error}
    job, prompt, spec = work.about
    g = request.result()
    text = pipe.tokenizer.decode(g.tokens)
    rec = {"line": n, "id": job.get("id"), "prompt": prompt, "text": text}
    try:
        if spec.parse is not None:
            rec["objects"] = [o.to_dict() for o in pipe.parse_objects(spec, text, g, work.images[0], codec)]
    except ValueError as e:
        rec = {"line": n, "id": job.get("id"), "prompt": prompt, "error": str(e)}
    return rec
