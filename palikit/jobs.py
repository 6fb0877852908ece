"""`palikit run`: thousands of jobs from a JSONL file, batched, resumable, never losing work.

Input line: {"image": PATH, "prompt": "caption en"} or {"image": PATH, "task": "detect", "labels": [...]}
(task: a verb of tasks.TASKS, with its fields as the Pipeline methods take them, e.g. lang, style,
question, labels; "id" is copied through). Output line per input line, in input order:
{"line": N, "id": ..., "prompt": ..., "text": ..., "objects": [...]} or {"line": N, "error": "..."}, N
the 1-based line number of the job (as `palikit data check` and editors count). A bad job (not
JSON, unknown task, missing field, unreadable image, a newline in its prompt, too long for the
model, segment without a mask codec) gets its error record and every other job runs. Each batch is
appended and fsync'ed; a restart skips the lines already in the output file and drops a torn last
line, so a crash loses at most the batch in flight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from . import tasks
from .api import PipelineProtocol, generate_alone_on_failure
from .atomic import read_records
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
    """Line numbers already answered (a torn last record is cut off, see atomic.read_records)."""
    done = set()
    for rec in read_records(output):
        if not isinstance(rec.get("line"), int):
            break
        done.add(rec["line"])
    if 0 in done:  # palikit before 1-based line numbers: resuming would skip and redo the wrong jobs
        raise InputError(f"{output} numbers its lines from 0 (an older palikit); write to a new output file "
                         "or add 1 to each record's 'line' to resume it")
    return done


def run_jobs(pipe: PipelineProtocol, input_path: str | Path, output_path: str | Path, batch_size: int = 8,
             max_new_tokens: int = 128, codec=None) -> dict:
    """Answer every job of input_path into output_path; a bad job gets an error record, and only a
    problem with the run itself (input, output, codec) raises."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise InputError(f"input file not found: {input_path}")
    if codec is not None and not isinstance(codec, MaskCodec):
        codec = MaskCodec.from_npz(codec)  # a bad --vae stops the run before any job
    lines = input_path.read_text().splitlines()
    done = finished_lines(output_path)
    todo = [n for n, line in enumerate(lines, 1) if line.strip() and n not in done]
    stats = {"total": sum(1 for line in lines if line.strip()), "skipped": len(done), "errors": 0}
    with open(output_path, "a") as out, tqdm(total=len(todo), unit="job", disable=None) as bar:
        for start in range(0, len(todo), batch_size):
            jobs = [(n, lines[n - 1]) for n in todo[start:start + batch_size]]
            for rec in _run_batch(pipe, jobs, input_path.parent, max_new_tokens, codec):
                stats["errors"] += "error" in rec
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(jobs))
    return stats


def _run_batch(pipe, jobs: list[tuple[int, str]], base: Path, max_new_tokens: int, codec) -> list[dict]:
    """One record per (line number, text) job, in order."""
    records, ready = {}, []
    for n, text in jobs:
        try:
            job = json.loads(text)
            if not isinstance(job, dict) or "image" not in job:
                raise InputError("a job is a JSON object with an 'image' field")
            prompt, spec = job_prompt(job)
            if spec.masks and codec is None and pipe.codec_path is None:
                raise InputError(f"a {spec.verb} job needs the mask codec: pass --vae PATH (big_vision's "
                                 "vae-oid.npz); the model folder has none")
            pipe.prompt_ids(prompt, 1, max_new_tokens)  # a newline or an over-long prompt fails this job only
            image_path = Path(job["image"])
            image = load_image(image_path if image_path.is_absolute() else base / image_path)
            ready.append((n, job, prompt, spec, image))
        except (ValueError, InputError) as e:  # JSONDecodeError is a ValueError
            records[n] = {"line": n, "error": str(e)}
    records.update(_generate(pipe, ready, max_new_tokens, codec))
    return [records[n] for n, _ in jobs]


def _generate(pipe, ready: list, max_new_tokens: int, codec) -> dict[int, dict]:
    """Records of checked jobs; if the batch fails, each job runs alone so only the bad one fails."""
    outs = generate_alone_on_failure(pipe, [r[4] for r in ready], [r[2] for r in ready],
                                     max_new_tokens=max_new_tokens)
    records = {}
    for (n, job, prompt, spec, image), out in zip(ready, outs):
        if isinstance(out, ValueError):
            records[n] = {"line": n, "error": str(out)}
            continue
        text, g = out
        rec = {"line": n, "id": job.get("id"), "prompt": prompt, "text": text}
        try:
            if spec.parse is not None:
                rec["objects"] = [o.to_dict() for o in pipe.parse_objects(spec, text, g, image, codec)]
        except ValueError as e:
            rec = {"line": n, "id": job.get("id"), "prompt": prompt, "error": str(e)}
        records[n] = rec
    return records
