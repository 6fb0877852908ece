"""The task API, CLI and `palikit run` on a tiny random checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import palikit
from palikit.cli import main
from palikit.generate import Generated

from .conftest import synthetic_image


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return palikit.load(tiny_model_dir, dtype="float32")


def test_text_tasks_return_strings(pipe):
    img = synthetic_image(0)
    assert isinstance(pipe.caption(img, max_new_tokens=4), str)
    assert isinstance(pipe.ask(img, "how many circles?", max_new_tokens=4), str)
    assert isinstance(pipe.ocr(img, max_new_tokens=4), str)
    batch = pipe.caption([img, synthetic_image(1)], lang="fr", max_new_tokens=4)
    assert isinstance(batch, list) and len(batch) == 2
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
    assert dets[0].score == pytest.approx(-0.5)
    json.dumps([d.to_dict() for d in dets])
    assert len(pipe.detect([img, img], "red circle")) == 2


def test_segment_pastes_masks(pipe, monkeypatch):
    codes = "".join(f"<seg{i:03d}>" for i in range(16))
    scripted(pipe, monkeypatch, f"<loc0100><loc0100><loc0900><loc0900>{codes} triangle")
    img = synthetic_image(0, size=(64, 48))
    segs = pipe.segment(img, "triangle")
    assert len(segs) == 1 and segs[0].codes == list(range(16))
    assert segs[0].mask.shape == (48, 64) and segs[0].mask.dtype == bool
    ys, xs = np.nonzero(segs[0].mask)
    if len(xs):  # all mask pixels lie inside the box
        x1, y1, x2, y2 = segs[0].box
        assert xs.min() >= int(x1) and xs.max() < int(x2) + 1 and ys.min() >= int(y1) and ys.max() < int(y2) + 1
    d = segs[0].to_dict()
    assert d["mask"]["size"] == [48, 64]
    overlay = palikit.draw(img, segs)
    assert overlay.size == img.size


def test_segment_without_codec_is_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy(tiny_model_dir / f, tmp_path / f)
    p = palikit.load(tmp_path, dtype="float32")
    with pytest.raises(palikit.InputError, match="codec"):
        p.segment(synthetic_image(0), "cat")


def test_cli_generate_and_tasks(tiny_model_dir, tmp_path, capsys):
    img = tmp_path / "img.png"
    synthetic_image(0).save(img)
    assert main(["generate", "--model", str(tiny_model_dir), "--image", str(img), "--prompt", "caption en",
                 "--max-new-tokens", "3", "--json", "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "tokens"} and len(out["tokens"]) <= 3
    assert main(["detect", str(img), "circle", "square", "--model", str(tiny_model_dir), "--json",
                 "--out", str(tmp_path / "o.png")]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
    assert (tmp_path / "o.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/nonexistent/model", "--image", "x.png", "--prompt", "caption en"], "not found"),
    (["caption", "missing.png"], "not found"),
])
def test_cli_errors_are_one_line(argv, message, tiny_model_dir, capsys):
    if argv[0] == "caption":
        argv = argv + ["--model", str(tiny_model_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_corrupt_image(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["caption", str(bad), "--model", str(tiny_model_dir)]) == 2
    assert "not a readable image" in capsys.readouterr().err


def write_jobs(folder, n):
    for i in range(3):
        synthetic_image(i).save(folder / f"{i}.png")
    jobs = []
    for i in range(n):
        jobs.append({"id": f"job{i}", "image": f"{i % 3}.png", "task": ["caption", "detect", "ocr"][i % 3],
                     "labels": ["circle"]})
    jobs[5] = {"id": "bad", "image": "missing.png", "task": "caption"}
    lines = [json.dumps(j) for j in jobs]
    lines[7] = "{not json"
    (folder / "jobs.jsonl").write_text("\n".join(lines) + "\n")


def read_output(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_reports_bad_lines_and_goes_on(tiny_model_dir, tmp_path):
    write_jobs(tmp_path, 12)
    from palikit.batch import run_jobs

    pipe = palikit.load(tiny_model_dir, dtype="float32")
    stats = run_jobs(pipe, tmp_path / "jobs.jsonl", tmp_path / "out.jsonl", batch_size=4, max_new_tokens=4)
    recs = read_output(tmp_path / "out.jsonl")
    assert [r["line"] for r in recs] == list(range(12)) and stats["errors"] == 2
    assert "not found" in recs[5]["error"] and "error" in recs[7]
    assert all("text" in r for i, r in enumerate(recs) if i not in (5, 7))


def test_run_resumes_after_kill(tiny_model_dir, tmp_path):
    n = 80
    write_jobs(tmp_path, n)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "palikit.cli", "run", "--model", str(tiny_model_dir), "--input",
           str(tmp_path / "jobs.jsonl"), "--output", str(out), "--batch-size", "2", "--max-new-tokens", "6",
           "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    partial = len(read_output_lenient(out))
    assert 0 < partial < n, "the run should have been killed mid-way"
    with open(out, "a") as f:
        f.write('{"line": 999, "text": "torn')  # a half-written record, as a crash can leave
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recs = read_output(out)
    assert sorted(r["line"] for r in recs) == list(range(n))  # nothing lost, nothing duplicated
    # Resumed results equal an uninterrupted run.
    ref_cmd = [str(tmp_path / "ref.jsonl") if c == str(out) else c for c in cmd]
    subprocess.run(ref_cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ref = {r["line"]: r for r in read_output(tmp_path / "ref.jsonl")}
    assert all(r == ref[r["line"]] for r in recs)


def read_output_lenient(path):
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_score_prefers_the_suffix_the_model_generates(pipe):
    img = synthetic_image(3)
    text, g = pipe.generate_details(img, "caption en", max_new_tokens=5)[0]
    assert torch.isfinite(torch.tensor(pipe.score([img], ["caption en"], [text])))
