"""The task API and `palikit run` on a tiny random checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import palikit
from palikit.generate import Generated

from .conftest import box_pixels, kill_when_it_says, synthetic_image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return palikit.load(tiny_model_dir, dtype="float32")


def test_text_tasks_send_their_prompts(pipe, monkeypatch):
    """caption / ask / ocr answer with exactly what generate gives for their task prefix, and `lang`,
    `style` and the question reach the prompt. Catches a task helper that drops an argument."""
    img, other = synthetic_image(0), synthetic_image(1)
    prompts = []
    generate = pipe.generate_details

    def spy(images, batch_prompts, **kw):
        prompts.append(list(batch_prompts) if isinstance(batch_prompts, list) else [batch_prompts])
        return generate(images, batch_prompts, **kw)

    monkeypatch.setattr(pipe, "generate_details", spy)
    cases = [
        (lambda: pipe.caption(img, lang="fr", max_new_tokens=4), "caption fr"),
        (lambda: pipe.caption(img, lang="de", style="describe", max_new_tokens=4), "describe de"),
        (lambda: pipe.ask(img, "how many circles?", lang="es", max_new_tokens=4),
         "answer es how many circles?"),
        (lambda: pipe.ocr(img, max_new_tokens=4), "ocr"),
    ]
    for call, prompt in cases:
        prompts.clear()
        got = call()
        assert prompts == [[prompt]]
        assert isinstance(got, str) and got == pipe.generate(img, prompt, max_new_tokens=4)
    prompts.clear()
    batch = pipe.caption([img, other], lang="fr", max_new_tokens=4)
    assert prompts == [["caption fr", "caption fr"]]
    assert batch == pipe.generate([img, other], ["caption fr"] * 2, max_new_tokens=4)
    with pytest.raises(ValueError, match="xx"):
        pipe.caption(img, lang="xx")


def scripted(pipe, monkeypatch, text: str):
    """Make generation emit `text` (through the real tokenizer) with known log-probs."""
    ids = pipe.tokenizer.encode(text)

    def fake(images, prompts, **kw):
        n = len(prompts) if isinstance(prompts, list) else 1
        return [(pipe.tokenizer.decode(ids), Generated(list(ids), [-0.5] * len(ids)))] * n

    monkeypatch.setattr(pipe, "generate_details", fake)


def test_detect_parses_boxes_in_pixels(pipe, monkeypatch):
    scripted(pipe, monkeypatch, "<loc0000><loc0000><loc0511><loc1023> red circle ; <loc0100><loc0200><loc0300> junk")
    img = synthetic_image(0, size=(200, 100))
    dets = pipe.detect(img, ["red circle"])
    assert len(dets) == 1 and dets[0].label == "red circle"
    x1, y1, x2, y2 = dets[0].box
    assert (x1, y1) == (0, 0) and abs(x2 - 200) < 0.5 and abs(y2 - 511 / 1023 * 100) < 1e-6
    assert dets[0].logprob == pytest.approx(-0.5)
    json.dumps([d.to_dict() for d in dets])
    assert len(pipe.detect([img, img], "red circle")) == 2


def test_segment_pastes_masks(pipe, monkeypatch):
    """The fixture's codec decodes every code to a positive logit, so each mask is its whole box.
    Catches a mask pasted at the wrong place or size, or not at all."""
    codes = "".join(f"<seg{i:03d}>" for i in range(16))
    scripted(pipe, monkeypatch, f"<loc0100><loc0200><loc0900><loc0800>{codes} triangle")
    img = synthetic_image(0, size=(64, 48))
    segs = pipe.segment(img, "triangle")
    assert len(segs) == 1 and segs[0].codes == list(range(16))
    assert segs[0].mask.shape == (48, 64) and segs[0].mask.dtype == bool
    x1, y1, x2, y2 = segs[0].box  # <locY1><locX1><locY2><locX2>, /1023, in pixels
    assert segs[0].box == pytest.approx((200 / 1023 * 64, 100 / 1023 * 48, 800 / 1023 * 64, 900 / 1023 * 48))
    assert segs[0].mask.any() and np.array_equal(segs[0].mask, box_pixels(segs[0].box, 48, 64))
    d = segs[0].to_dict()
    assert d["mask"]["size"] == [48, 64]
    overlay = np.asarray(palikit.draw(img, segs)).astype(int)
    tint = np.abs(overlay - np.asarray(img).astype(int)).sum(-1) > 0
    inner = box_pixels((x1 + 3, y1 + 14, x2 - 3, y2 - 3), 48, 64)  # clear of the outline and label
    assert tint[inner].all()  # the mask is drawn...
    # ...and nothing below or left (but the label, moved left to fit in the image, inside the box's top)
    assert not tint[int(y2) + 3:].any() and not tint[int(y1) + 14:, :int(x1) - 2].any()


def test_segment_without_codec_is_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy(tiny_model_dir / f, tmp_path / f)
    p = palikit.load(tmp_path, dtype="float32")
    with pytest.raises(palikit.InputError, match="codec"):
        p.segment(synthetic_image(0), "cat")


def write_jobs(folder, n):
    for i in range(3):
        synthetic_image(i).save(folder / f"{i}.png")
    jobs = []
    for i in range(n):
        task = ["caption", "detect", "ocr"][i % 3]
        jobs.append({"id": f"job{i}", "image": f"{i % 3}.png", "task": task} | (
            {"labels": ["circle"]} if task == "detect" else {}))
    jobs[5] = {"id": "bad", "image": "missing.png", "task": "caption"}
    lines = [json.dumps(j) for j in jobs]
    lines[7] = "{not json"
    (folder / "jobs.jsonl").write_text("\n".join(lines) + "\n")


def read_output(path):
    """The records, split at "\n" alone: str.splitlines would also split inside a record at the
    other line breaks JSON strings may hold raw (U+0085, U+2028)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_run_reports_bad_lines_and_goes_on(tiny_model_dir, tmp_path):
    write_jobs(tmp_path, 12)
    from palikit.jobs import run_jobs

    pipe = palikit.load(tiny_model_dir, dtype="float32")
    stats = run_jobs(pipe, tmp_path / "jobs.jsonl", tmp_path / "out.jsonl", batch_size=4, max_new_tokens=4)
    recs = read_output(tmp_path / "out.jsonl")
    assert [r["line"] for r in recs] == list(range(1, 13)) and stats["errors"] == 2  # 1-based, as data check
    assert "not found" in recs[5]["error"] and "error" in recs[7]
    assert all("text" in r for i, r in enumerate(recs) if i not in (5, 7))


def test_run_gives_a_bad_job_its_error_and_runs_the_rest(tiny_model_dir, tmp_path):
    """One batch holding a prompt with a newline, one over the model's length limit and a segment
    job on a model without a mask codec: each gets an error record naming its problem, the good
    jobs around them are answered as alone. Catches a run that aborts (and writes nothing) on them."""
    import shutil

    from palikit.jobs import run_jobs

    model = tmp_path / "model"
    model.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.model"):  # no mask codec
        shutil.copy(tiny_model_dir / f, model / f)
    pipe = palikit.load(model, dtype="float32")
    synthetic_image(0).save(tmp_path / "0.png")
    jobs = [{"image": "0.png", "task": "caption"}, {"image": "0.png", "prompt": "caption en\nanswer"},
            {"image": "0.png", "prompt": "answer en " + "why " * 600}, {"image": "0.png", "task": "segment",
                                                                        "labels": ["circle"]},
            {"image": "0.png", "task": "detect", "labels": ["circle"]}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    stats = run_jobs(pipe, tmp_path / "jobs.jsonl", tmp_path / "out.jsonl", batch_size=8, max_new_tokens=4)
    recs = read_output(tmp_path / "out.jsonl")
    assert [r["line"] for r in recs] == [1, 2, 3, 4, 5] and stats["errors"] == 3
    assert "newline" in recs[1]["error"] and "limit" in recs[2]["error"]
    assert "--vae" in recs[3]["error"] and "codec" in recs[3]["error"]
    assert recs[0]["text"] == pipe.caption(synthetic_image(0), max_new_tokens=4)
    (_, alone), = pipe.generate_details([synthetic_image(0)], [recs[0]["prompt"]], max_new_tokens=4)
    assert recs[0]["finish_reason"] == alone.finish_reason and recs[1].keys() == {"line", "id", "error"} - {"id"}
    assert recs[4]["text"] == pipe.generate(synthetic_image(0), "detect circle", max_new_tokens=4)


def test_run_answers_every_malformed_job_with_its_error_and_id(pipe, tmp_path):
    """Fields of the wrong type, unknown tasks and fields, a blank line, a line that is not UTF-8,
    budgets: each line gets one record in order, a malformed job an error naming what is wrong and
    carrying its id; a job's own max_new_tokens is honoured. Catches a TypeError that stops the run."""
    from palikit.jobs import run_jobs

    synthetic_image(0).save(tmp_path / "0.png")
    cases = [  # (job or raw line, what its error says; None: answered)
        ({"id": 1, "image": 5, "task": "ocr"}, "'image' must be a path"),
        ({"id": 2, "image": None, "task": "ocr"}, "'image' must be a path"),
        ({"id": 3, "image": ["0.png"], "task": "ocr"}, "'image' must be a path"),
        ({"id": 4, "image": "0.png", "task": ["ocr"]}, "unknown task"),
        ({"id": 5, "image": "0.png", "task": "detect", "labels": 5}, "labels must be a string or a list"),
        ({"id": 6, "image": "0.png", "prompt": 5}, "'prompt' must be a string"),
        ({"id": 7, "image": "0.png", "task": "caption", "lables": ["x"]}, "no field 'lables'"),
        ({"id": 8, "image": "0.png", "task": "ocr", "max_new_tokens": "many"}, "max_new_tokens"),
        ({"id": 9, "image": "0.png", "task": "ocr", "max_new_tokens": 0}, "max_new_tokens"),
        ({"id": 10, "image": "0.png", "task": "ocr", "max_new_tokens": 10**9}, "limit"),
        ({"id": 11, "image": "0.png", "task": "caption", "lang": ["en"]}, "unknown lang"),
        ({"id": {"any": "json"}, "image": "0.png", "task": "caption", "max_new_tokens": 2}, None),
        ("", "empty line"),
        ("   ", "empty line"),
        (b'{"image": "0.png", "task": "ocr", "id": "\xff"}', "not UTF-8"),
        ("[1, 2]", "a job is a JSON object, got list"),
        ('"0.png"', "got str"),
        ({"id": 12, "image": "0.png\u0000x", "task": "ocr"}, ""),
        ({"id": 13, "image": "0.png", "task": "caption", "max_new_tokens": 5}, None),
    ]
    raw = [c if isinstance(c, bytes) else (c if isinstance(c, str) else json.dumps(c)).encode() for c, _ in cases]
    (tmp_path / "jobs.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    stats = run_jobs(pipe, tmp_path / "jobs.jsonl", tmp_path / "out.jsonl", batch_size=4, max_new_tokens=3)
    recs = read_output(tmp_path / "out.jsonl")
    assert [r["line"] for r in recs] == list(range(1, len(cases) + 1))
    assert stats == {"total": len(cases), "skipped": 0, "answered": len(cases), "errors": len(cases) - 2}
    for (job, message), rec in zip(cases, recs):
        if message is None:
            assert "error" not in rec and rec["id"] == job["id"]
            want = pipe.generate(synthetic_image(0), "caption en", max_new_tokens=job["max_new_tokens"])
            assert rec["text"] == want, rec
        else:
            assert message in rec["error"], (job, rec)
            assert rec.get("id") == (job.get("id") if isinstance(job, dict) else None)
    assert len(pipe.tokenizer.encode(recs[-1]["text"])) > 3  # the job's 5, not the run's 3


@pytest.mark.slow
def test_run_survives_any_json_in_any_field(pipe, tmp_path_factory):
    """Any JSON value in any field of a job, lines in any mix: the run finishes and writes one
    record per line, in order, each a text or an error."""
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from palikit.jobs import run_jobs

    folder = tmp_path_factory.mktemp("fuzz")
    synthetic_image(0).save(folder / "0.png")
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                               | st.text(max_size=8) | st.sampled_from(["0.png", "caption", "detect", "ocr",
                                                                          "caption en", "en", "segment"]),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                           inner, max_size=3),
                               max_leaves=6)
    keys = st.sampled_from(["image", "task", "prompt", "id", "max_new_tokens", "labels", "lang", "question",
                            "style", "label", "x"])
    jobs = st.lists(st.dictionaries(keys, json_values, max_size=5) | json_values, min_size=1, max_size=6)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @example([{"id": {"\x85": None}, "image": "0.png", "task": "ocr"}])  # a raw NEL in a record: one line
    @given(jobs)
    def run(lines):
        src, out = folder / "jobs.jsonl", folder / "out.jsonl"
        out.unlink(missing_ok=True)
        src.write_text("".join(json.dumps(j) + "\n" for j in lines))
        run_jobs(pipe, src, out, batch_size=2, max_new_tokens=2)
        recs = read_output(out)
        assert [r["line"] for r in recs] == list(range(1, len(lines) + 1))
        assert all(("text" in r) != ("error" in r) for r in recs)

    run()


def test_run_keeps_a_complete_last_record_without_its_newline(tiny_model_dir, tmp_path, pipe, monkeypatch):
    """A crash right after a record but before its "\\n": the record is kept (and terminated), not
    cut off and lost; its job does not run again. Catches a resume that drops a valid last line."""
    from palikit.jobs import run_jobs

    write_jobs(tmp_path, 8)
    out = tmp_path / "out.jsonl"
    run_jobs(pipe, tmp_path / "jobs.jsonl", out, batch_size=2, max_new_tokens=3)
    recs = read_output(out)
    recs[1]["text"] = "kept"
    out.write_text("".join(json.dumps(r) + "\n" for r in recs[:1]) + json.dumps(recs[1]))  # no newline
    generated = count_submissions(monkeypatch)
    run_jobs(pipe, tmp_path / "jobs.jsonl", out, batch_size=2, max_new_tokens=3)
    again = read_output(out)
    assert [r["line"] for r in again] == list(range(1, 9)) and again[1]["text"] == "kept"
    assert len(generated) == 4  # lines 3, 4, 5 and 7 (6 names a missing image, 8 is not JSON)
    assert again[2:] == recs[2:]


def count_submissions(monkeypatch) -> list:
    """The prompts `palikit run` hands to its engine from now on (one per generated job)."""
    from palikit.engine import Engine

    generated, submit = [], Engine.submit
    monkeypatch.setattr(Engine, "submit", lambda self, images, prompt, *a, **kw: (
        generated.append(prompt), submit(self, images, prompt, *a, **kw))[1])
    return generated


# `palikit run` that hangs before it submits job number `after` (0-based) to its engine, once it has
# said so on stdout: the parent kills it there, with the jobs before it written or in flight.
HANG_BEFORE_JOB = textwrap.dedent("""
    import sys

    import torch

    from palikit import cli
    from palikit.engine import Engine

    torch.set_num_threads(1)
    after, calls = int(sys.argv[1]), []
    submit = Engine.submit

    def submit_or_hang(self, *args, **kwargs):
        if len(calls) == after:
            print("hanging", flush=True)
            sys.stdin.read()  # until killed
        calls.append(1)
        return submit(self, *args, **kwargs)

    Engine.submit = submit_or_hang
    cli.main(sys.argv[2:])
""")


@pytest.mark.slow
def test_run_resumes_after_kill(tiny_model_dir, tmp_path, pipe, monkeypatch):
    """kill -9 while jobs are in flight, a torn last line added (as a crash inside a write leaves),
    then a rerun: every line answered once, as an uninterrupted run answers it, and no finished job
    runs again. Catches a rerun that starts over (the planted record would be rewritten and every
    job generated again) or that loses or repeats lines."""
    from palikit.jobs import run_jobs

    n = 40
    write_jobs(tmp_path, n)
    out = tmp_path / "out.jsonl"
    args = ["run", "--model", str(tiny_model_dir), "--input", str(tmp_path / "jobs.jsonl"), "--output",
            str(out), "--batch-size", "2", "--max-new-tokens", "6", "--dtype", "float32"]
    # A window of 4 rows x 2: the 24th job waits for the first ones to be written.
    kill_when_it_says(["-c", HANG_BEFORE_JOB, "20", *args], "hanging")
    before = read_output(out)
    m = len(before)
    assert m >= 8 and [r["line"] for r in before] == list(range(1, m + 1)), "finished jobs, in line order"
    before[0]["text"] = "written before the kill"  # a rerun that starts over would lose this
    out.write_text("".join(json.dumps(r) + "\n" for r in before) + '{"line": 999, "text": "torn')

    generated = count_submissions(monkeypatch)
    run_jobs(pipe, tmp_path / "jobs.jsonl", out, batch_size=2, max_new_tokens=6)
    recs = read_output(out)
    assert [r["line"] for r in recs] == list(range(1, n + 1))  # nothing lost, nothing duplicated, in order
    assert recs[0] == before[0]
    errors = sum(1 for r in recs[m:] if "error" in r)  # lines 6 and 8 are bad (a missing image, not JSON)
    assert len(generated) == n - m - errors, "only the unfinished jobs ran"
    monkeypatch.undo()
    run_jobs(pipe, tmp_path / "jobs.jsonl", tmp_path / "ref.jsonl", batch_size=2, max_new_tokens=6)
    ref = {r["line"]: r for r in read_output(tmp_path / "ref.jsonl")}
    assert all(r == ref[r["line"]] for r in recs[1:])  # resumed results equal an uninterrupted run


@pytest.mark.slow
def test_run_under_torchrun_equals_one_process(tiny_model_dir, tmp_path):
    """Two ranks (gloo, two CPU processes) each answer every other line and rank 0 merges their
    files into the output: the file one process writes, byte for byte, and every line counted once.
    One row per process: which jobs run side by side differs between the two, and float32 GEMMs of
    a few rows round differently from one (MKL), which can flip a near tie."""
    from palikit.cli import main

    write_jobs(tmp_path, 12)
    args = ["run", "--model", str(tiny_model_dir), "--input", str(tmp_path / "jobs.jsonl"), "--batch-size", "1",
            "--max-new-tokens", "5", "--dtype", "float32", "--device", "cpu"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main([*args, "--output", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
           "--nproc_per_node", "2", "-m", "palikit", *args, "--output", str(two)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed == [{"total": 12, "skipped": 0, "answered": 12, "errors": 2}], "rank 0 prints every rank's count"
    assert not list(tmp_path.glob("two.rank*.jsonl")), "the rank files are merged and removed"
    assert two.read_text() == one.read_text()


def test_score_prefers_the_suffix_the_model_generates(pipe, monkeypatch):
    """score(text) is the log-likelihood of the text's tokens and <eos>: the sum of the log-probs that
    generation gave those tokens plus log p(<eos>) after them (from generation's own next step), and
    the model's greedy text outscores other texts. Catches a score over shifted positions, without
    the <eos> term, or with the wrong tokens."""
    img = synthetic_image(3)
    step_logits = []
    logits = pipe.model.logits
    monkeypatch.setattr(pipe.model, "logits",
                        lambda h, *where: step_logits.append(logits(h, *where)) or step_logits[-1])
    (_, g), = pipe.generate_details(img, "caption en", max_new_tokens=6)
    monkeypatch.undo()
    tokens = g.tokens[:5]
    text = pipe.tokenizer.decode(tokens)
    assert len(g.tokens) == 6 and pipe.tokenizer.encode(text) == tokens  # the text is these tokens
    log_p_eos = float(step_logits[5][0].log_softmax(-1)[pipe.tokenizer.eos_id])
    (score,) = pipe.score([img], ["caption en"], [text])
    assert score == pytest.approx(sum(g.logprobs[:5]) + log_p_eos, abs=1e-4)
    # Other texts: another repeated token, these tokens after another first one, plain words.
    others = [pipe.generate(img, "ocr", max_new_tokens=5),
              pipe.tokenizer.decode([tokens[0] + 1] + tokens[1:]), "a red circle"]
    assert len({text, *others}) == 4
    assert all(score > s for s in pipe.score([img] * 3, ["caption en"] * 3, others)), others


def test_stream_yields_the_tokens_generate_makes_and_stops_when_dropped(pipe, monkeypatch):
    """Pipeline.stream (the server's SSE path) gives generate's tokens one by one, greedy and seeded,
    for one image or several; a consumer that stops iterating stops the decoding. Catches a stream
    that drifts from generate (wrong position, other sampling) or runs on for a gone reader."""

    a, b = synthetic_image(0), synthetic_image(1)
    for images, sampling in [(a, {}), ([a, b], {}), (a, {"do_sample": True, "temperature": 1.5, "seed": 3})]:
        (_, g), = pipe.generate_details([images], ["caption en"], max_new_tokens=8, **sampling)
        assert list(pipe.stream(images, "caption en", max_new_tokens=8, **sampling)) == g.tokens
    seeded = [list(pipe.stream(a, "caption en", 8, do_sample=True, temperature=1.5, seed=s)) for s in (3, 4)]
    assert seeded[0] != seeded[1]

    decode, steps = pipe.decode_step, []
    monkeypatch.setattr(pipe, "decode_step", lambda *a, **k: (steps.append(1), decode(*a, **k))[1])
    stream = pipe.stream(a, "describe en", max_new_tokens=50)
    # token 1 from the prefill; each engine step chooses a token, then decodes the next one's logits
    assert [next(stream) for _ in range(3)] and len(steps) == 3
    stream.close()
    assert len(steps) == 3
    with pytest.raises(palikit.InputError, match="one prompt"):
        next(pipe.stream(a, ["caption en", "ocr"]))
