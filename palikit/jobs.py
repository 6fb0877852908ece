"""`palikit run`: thousands of jobs from a JSONL file, batched, resumable, never losing work.

Input line: {"image": PATH, "prompt": "caption en"} or {"image": PATH, "task": "detect", "labels": [...]}
(task: a verb of tasks.TASKS, with its fields as the Pipeline methods take them, e.g. lang, style,
question, labels; "id" is copied through). Output line per input line, in input order:
{"line": N, "id": ..., "prompt": ..., "text": ..., "objects": [...]} or {"line": N, "error": "..."}.
Each batch is appended and fsync'ed; a restart skips the lines already in the output file and
drops a half-written last line, so a crash loses at most the batch in flight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from . import tasks
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
    """Line numbers already answered; truncates a torn last line left by a crash."""
    if not output.exists():
        return set()
    done, good_bytes = set(), 0
    with open(output, "rb") as f:
        for raw in f:
            try:
                done.add(json.loads(raw)["line"])
            except (ValueError, KeyError):
                break
            if not raw.endswith(b"\n"):
                break
            good_bytes += len(raw)
    if good_bytes < output.stat().st_size:
        with open(output, "r+b") as f:
            f.truncate(good_bytes)
    return done


def run_jobs(pipe, input_path: str | Path, output_path: str | Path, batch_size: int = 8,
             max_new_tokens: int = 128, codec=None) -> dict:
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise InputError(f"input file not found: {input_path}")
    lines = input_path.read_text().splitlines()
    done = finished_lines(output_path)
    todo = [i for i, line in enumerate(lines) if line.strip() and i not in done]
    stats = {"total": sum(1 for line in lines if line.strip()), "skipped": len(done), "errors": 0}
    with open(output_path, "a") as out, tqdm(total=len(todo), unit="job", disable=None) as bar:
        for start in range(0, len(todo), batch_size):
            records = _run_batch(pipe, lines, todo[start:start + batch_size], input_path.parent,
                                 max_new_tokens, codec)
            for rec in records:
                stats["errors"] += "error" in rec
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(records))
    return stats


def _run_batch(pipe, lines, idx, base: Path, max_new_tokens: int, codec) -> list[dict]:
    records, ready = {}, []
    for i in idx:
        try:
            job = json.loads(lines[i])
            if not isinstance(job, dict) or "image" not in job:
                raise InputError("a job is a JSON object with an 'image' field")
            prompt, spec = job_prompt(job)
            image_path = Path(job["image"])
            image = load_image(image_path if image_path.is_absolute() else base / image_path)
            ready.append((i, job, prompt, spec, image))
        except (ValueError, InputError) as e:  # JSONDecodeError is a ValueError
            records[i] = {"line": i, "error": str(e)}
    if ready:
        outs = pipe.generate_details([r[4] for r in ready], [r[2] for r in ready], max_new_tokens=max_new_tokens)
        for (i, job, prompt, spec, image), (text, g) in zip(ready, outs):
            rec = {"line": i, "id": job.get("id"), "prompt": prompt, "text": text}
            if spec.parse is not None:
                rec["objects"] = [o.to_dict() for o in pipe.parse_objects(spec, text, g, image, codec)]
            records[i] = rec
    return [records[i] for i in idx]
