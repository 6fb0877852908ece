"""`palikit eval` end to end on the bundled model: benchmarks written in their published layouts
(VQAv2, COCO captions Karpathy), a fine-tuning .jsonl scored by task word, resume after a kill with
nothing lost or counted twice, two torchrun ranks equal to one process, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import palikit
from palikit import evaluate as ev
from palikit import eval_sets, metrics
from palikit.engine import Engine
from palikit.cli import main
from palikit.synthetic import generate_dataset, iter_examples

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--model", "default", "--dtype", "float32"]


def _report(out: Path) -> dict:
    return json.loads(out.with_suffix(".report.json").read_text())


def _values(rep: dict) -> dict:
    return {(r["group"], r["metric"]): r["values"] for r in rep["results"]}


def _preds(out: Path) -> list[dict]:
    """The predictions, without the file's first line (what made it)."""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["index"] == ev.HEADER
    return records[1:]


@pytest.fixture(scope="module")
def scenes():
    """Held-out scenes of the shapes world (seed 4242): (image, example) pairs of every task."""
    return [(image, ex) for image, ex, _ in iter_examples(8, seed=4242, size=96)]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """A fine-tuning file of every task (captions, questions, ocr, detect) on 4 scenes."""
    return generate_dataset(tmp_path_factory.mktemp("jsonl"), 4, seed=4343, size=96, split_name="test")


def test_vqav2_layout_end_to_end(tmp_path, scenes):
    """The bundled model on questions written as VQAv2 publishes them: questions and annotations
    JSON joined by question_id, COCO image names. 7 of 10 annotators give the true answer, so a
    right prediction scores 1.0 (min(1, 7/3) in every leave-one-out subset) and a wrong one 0.0
    unless it matches the other three."""
    images, questions, annotations = tmp_path / "val2014", [], []
    images.mkdir()
    for n, (image, ex) in enumerate(scenes):
        if ex["task"] not in ("count", "colour"):
            continue
        image_id, qid = 100 + n, 1000 + n
        image.save(images / f"COCO_val2014_{image_id:012d}.jpg", quality=95)
        questions.append({"image_id": image_id, "question": ex["prefix"].removeprefix("answer en "),
                          "question_id": qid})
        answers = [ex["suffix"]] * 7 + ["zebra"] * 3
        annotations.append({"question_id": qid, "image_id": image_id, "answer_type": "other",
                            "question_type": "how many", "multiple_choice_answer": ex["suffix"],
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                        for i, a in enumerate(answers)]})
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    out = tmp_path / "preds.jsonl"
    assert main(["eval", *BASE, "--benchmark", "vqav2", "--data", str(tmp_path), "--out", str(out)]) == 0
    preds, rep = _preds(out), _report(out)
    assert [p["id"] for p in preds] == [str(q["question_id"]) for q in questions]
    truth = {str(a["question_id"]): a["multiple_choice_answer"] for a in annotations}
    right = [p["prediction"].strip() == truth[p["id"]] for p in preds]
    assert 0 < sum(right), "the bundled model answers counting and colour questions"
    assert _values(rep)[("vqav2", "vqav2_accuracy")]["accuracy"] == pytest.approx(sum(right) / len(right))
    assert rep["examples"] == len(questions) and rep["errors"] == 0
    assert "| vqav2 | vqav2_accuracy |" in out.with_suffix(".report.md").read_text()


def test_coco_captions_karpathy_end_to_end(tmp_path, scenes):
    """Captions scored by corpus CIDEr-D over the Karpathy split's images, equal to metrics.cider
    on the predictions file (the report is computed from that file, as a resumed run's is)."""
    images, entries = tmp_path / "val2014", []
    images.mkdir()
    for n, (image, ex) in enumerate(scenes):
        if ex["task"] != "caption":
            continue
        name = f"COCO_val2014_{n:012d}.jpg"
        image.save(images / name, quality=95)
        entries.append({"filepath": "val2014", "filename": name, "cocoid": n, "split": "val",
                        "sentences": [{"raw": ex["suffix"]}, {"raw": ex["suffix"].replace("a ", "one ", 1)}]})
    entries.append({"filepath": "val2014", "filename": "x.jpg", "cocoid": 999, "split": "train", "sentences": []})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    out = tmp_path / "preds.jsonl"
    assert main(["eval", *BASE, "--benchmark", "coco_captions", "--data", str(tmp_path), "--out", str(out)]) == 0
    preds = _preds(out)
    assert len(preds) == len(entries) - 1, "only the Karpathy val images"
    score = _values(_report(out))[("coco_captions", "cider")]["cider"]
    assert score == pytest.approx(metrics.cider([p["prediction"] for p in preds], [p["answers"] for p in preds]))
    assert score > 0.5, "the bundled model captions its own world"
    table = out.with_suffix(".report.md").read_text()
    assert f"cider {score:.4f}" in table, "the Markdown shows CIDEr on the JSON's scale"


def test_jsonl_scored_by_task_word(tmp_path, jsonl):
    out = tmp_path / "preds.jsonl"
    assert main(["eval", *BASE, "--data", str(jsonl), "--out", str(out)]) == 0
    values = _values(_report(out))
    assert {("caption", "cider"), ("answer", "vqa_accuracy"), ("ocr", "ocr"), ("detect", "referring_detection"),
            ("detect", "detection_map")} <= set(values)
    assert values[("detect", "referring_detection")]["first_box_acc_50"] > 0.5, "detect truths are parsed from the suffix"
    out2 = tmp_path / "exact.jsonl"
    assert main(["eval", *BASE, "--data", str(jsonl), "--metric", "exact_match", "--out", str(out2)]) == 0
    assert {m for _, m in _values(_report(out2))} == {"exact_match"}


@pytest.mark.slow
def test_resume_after_kill_loses_and_repeats_nothing(tmp_path, jsonl, monkeypatch):
    """A run killed while examples are in flight, its file ending in a torn line, then started
    again: the second run generates only the missing examples and the predictions and report equal
    an uninterrupted run's. One row: what an example runs beside changes with where a run starts,
    and float32 GEMMs of a few rows round differently from one (MKL), which can flip a near tie."""
    whole = tmp_path / "whole.jsonl"
    assert main(["eval", *BASE, "--data", str(jsonl), "--batch-size", "1", "--out", str(whole)]) == 0
    n = len(_preds(whole))
    submit, calls, dying = Engine.submit, [], [True]

    def dies_at_the_twelfth_example(self, *args, **kw):
        calls.append(1)
        if dying[0] and len(calls) == 12:  # a window of 4 (rows x 4): 8 or more are written
            raise KeyboardInterrupt
        return submit(self, *args, **kw)

    monkeypatch.setattr(Engine, "submit", dies_at_the_twelfth_example)
    out = tmp_path / "preds.jsonl"
    assert main(["eval", *BASE, "--data", str(jsonl), "--batch-size", "1", "--out", str(out)]) == 130
    written = len(_preds(out))
    assert 8 <= written < n and _preds(out) == _preds(whole)[:written]
    with open(out, "a") as f:
        f.write(f'{{"index": {written}, "id": "torn')
    calls.clear()
    dying[0] = False
    assert main(["eval", *BASE, "--data", str(jsonl), "--batch-size", "1", "--out", str(out)]) == 0
    assert len(calls) == n - written, "only the examples not yet in the file are generated"
    assert _preds(out) == _preds(whole)
    assert _report(out)["results"] == _report(whole)["results"]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, jsonl):
    """One row per rank, as in the resume test: the ranks' examples run beside other examples than
    in one process, and float32 GEMMs of a few rows round differently from one."""
    one = tmp_path / "one.jsonl"
    assert main(["eval", *BASE, "--data", str(jsonl), "--batch-size", "1", "--out", str(one)]) == 0
    two = tmp_path / "two.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
           "--nproc_per_node", "2", "-m", "palikit", "eval", *BASE, "--data", str(jsonl), "--batch-size", "1",
           "--out", str(two)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("| caption | cider |") == 1, "rank 0 alone prints the table"
    assert not list(tmp_path.glob("two.rank*.jsonl")), "the rank files are merged and removed"
    assert _preds(two) == _preds(one)
    assert _report(two)["results"] == _report(one)["results"]


def test_synthetic_is_the_default(tmp_path):
    out = tmp_path / "preds.jsonl"
    assert main(["eval", *BASE, "--synthetic", "3", "--out", str(out)]) == 0
    groups = {g for g, _ in _values(_report(out))}
    assert {"caption", "count", "ocr", "detect", "segment"} <= groups


@pytest.mark.parametrize("argv, message", [
    (["--benchmark", "nope"], "unknown benchmark 'nope'"),
    (["--benchmark", "vqav2"], "--benchmark vqav2 needs --data"),
    (["--data", "x.json"], "data not found: x.json"),
    (["--data", "missing.jsonl"], "data file not found"),
    (["--metric", "bleu"], "unknown metric 'bleu'"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main(["eval", *BASE, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_predictions_file_is_continued_only_by_what_made_it(tmp_path, jsonl, capsys):
    """The file's first line records the model, dtype, quantisation, seed, version and example set;
    another model (here the same weights in bfloat16), other examples or an old file without that
    line are refused in one line naming what differs; --force-new starts it again; the report
    says how the model was run."""
    out = tmp_path / "preds.jsonl"
    assert main(["eval", *BASE, "--synthetic", "2", "--out", str(out)]) == 0
    made = json.loads(out.read_text().splitlines()[0])["provenance"]
    assert made["dtype"] == "float32" and made["quantize"] is None and made["seed"] == 12345
    assert made["examples"] == len(_preds(out)) and made["palikit"] == palikit.__version__
    capsys.readouterr()
    for argv, differs in [(["--data", str(jsonl)], "examples"), (["--synthetic", "2", "--seed", "7"], "seed"),
                          (["--synthetic", "2", "--dtype", "bfloat16"], "dtype 'float32' there, 'bfloat16' now")]:
        argv = ["eval", "--model", "default", *(["--dtype", "float32"] if "--dtype" not in argv else []), *argv]
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "made otherwise" in err and differs in err and "--force-new" in err and len(err.splitlines()) == 1
    assert main(["eval", *BASE, "--data", str(jsonl), "--out", str(out), "--force-new"]) == 0
    rep = _report(out)
    assert rep["provenance"]["examples"] == len(jsonl.read_text().splitlines()) and "dtype float32" in \
        out.with_suffix(".report.md").read_text()
    out.write_text("\n".join(out.read_text().splitlines()[1:]) + "\n")  # a file of an older palikit
    assert main(["eval", *BASE, "--data", str(jsonl), "--out", str(out)]) == 2
    assert "no provenance line" in capsys.readouterr().err


def test_errored_examples_run_again_on_resume_and_all_failing_is_an_error(tmp_path, jsonl, capsys, monkeypatch):
    """An example that failed (its image unreadable then) is retried by the next run and its
    answer replaces the error record; a run in which every example fails exits non-zero."""
    rows = [json.loads(r) for r in jsonl.read_text().splitlines()[:3]]
    for r in rows:
        r["image"] = str(jsonl.parent / r["image"])
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "preds.jsonl"
    real = ev.load_image
    monkeypatch.setattr(ev, "load_image", lambda p: (_ for _ in ()).throw(OSError("flaky disk")))
    assert main(["eval", *BASE, "--data", str(data), "--out", str(out)]) == 2
    assert "every example failed (3)" in capsys.readouterr().err
    monkeypatch.setattr(ev, "load_image", real)
    assert main(["eval", *BASE, "--data", str(data), "--out", str(out)]) == 0
    preds = _preds(out)
    assert [p["index"] for p in preds] == [0, 1, 2] and not any("error" in p for p in preds)
    assert _report(out)["errors"] == 0


def test_an_example_that_fails_counts_as_wrong(tmp_path, jsonl):
    """A missing image is an error record scored as an empty answer, not a dropped example."""
    rows = [json.loads(r) for r in jsonl.read_text().splitlines()[:4]]
    for r in rows:
        r["image"] = str(jsonl.parent / r["image"])
    rows[0]["image"] = "gone.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = ev.evaluate(palikit.load("default", dtype="float32"), ev.jsonl_examples(bad), name="bad", by_task=True)
    assert rep["examples"] == 4 and rep["errors"] == 1


def test_refcoco_answers_are_parsed_as_segmentations(tmp_path):
    """RefCOCO's prompt is the bare sentence (big_vision's transfer config) and has no task word:
    the benchmark's task still makes the output a segmentation, scored by mIoU."""
    from palikit.eval_sets import read_benchmark

    from .test_eval_sets import fx_refcoco

    path, _, _ = fx_refcoco(tmp_path)
    ex = read_benchmark("refcoco", path)[0]
    assert ex.prefix.split()[0] not in ("segment", "detect")
    assert ev.task_of(ex).verb == "segment"
    assert ev.metrics_of(ex, "segmentation_miou", None) == ("segmentation_miou",)


def test_report_shows_the_model_card_number_for_the_checkpoint():
    def record(group, name, inputs):
        return {"index": 0, "id": "0", "group": group, "prefix": "", "answers": inputs.get("answers", []),
                "prediction": inputs["prediction"], "scores": {name: metrics.metric(name).score(inputs)}}

    vqa = [record("vqav2", "vqav2_accuracy", {"prediction": "yes", "answers": ["yes"] * 10, "extra": {}})]
    rep = ev.report(vqa, name="vqav2", model="/ckpts/paligemma2-3b-pt-224/")
    assert rep["results"][0]["model_card"] == pytest.approx(0.83)  # the card's 83.0, on the report's scale
    assert "| 0.8300 |" in ev.markdown(rep)
    assert ev.report(vqa, name="vqav2", model="my-finetune")["results"][0]["model_card"] is None
    seg = [record("refcoco", "segmentation_miou", {"prediction": "", "objects": [], "width": 4, "height": 4,
                                                   "truth_objects": [{"label": "x", "box": [0, 0, 2, 2], "mask": np.eye(4, dtype=bool)}]})]
    rep = ev.report(seg, name="refcoco", model="google/paligemma2-3b-pt-448", split="testA")
    assert rep["results"][0]["model_card"] == eval_sets.published("refcoco/testA", "paligemma2-3b-pt-448") / 100


def test_failed_detect_and_segment_examples_do_not_stop_the_run(tmp_path):
    """A detect or segment example whose image is missing (its truth is in the suffix, at the image's
    size) is an error record; the others are scored."""
    from palikit.synthetic import generate_dataset

    from palikit.weights import CODEC_FILES
    from palikit.weights import BUNDLED
    from palikit.maskcodec import MaskCodec

    codec = MaskCodec.from_npz(BUNDLED / CODEC_FILES[0])
    src = generate_dataset(tmp_path / "d", 2, seed=9, size=96, encode_mask=codec.encode_mask_in_box)
    rows = [json.loads(r) for r in src.read_text().splitlines()]
    rows = [r for r in rows if r["task"] in ("detect", "segment")]
    for r in rows:
        r["image"] = str(src.parent / r["image"])
    rows[0]["image"] = rows[-1]["image"] = "gone.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = ev.evaluate(palikit.load("default", dtype="float32"), ev.jsonl_examples(bad), name="bad", by_task=True)
    assert rep["examples"] == len(rows) and rep["errors"] == 2
    assert {r["group"] for r in rep["results"]} == {"detect", "segment"}


def test_an_overlong_prompt_fails_alone_in_its_batch(tmp_path, jsonl):
    """Generation raises for the whole batch on one over-long prompt: that example gets the error,
    the others of its batch are generated alone and score as in a clean run."""
    rows = [json.loads(r) for r in jsonl.read_text().splitlines()[:4]]
    for r in rows:
        r["image"] = str(jsonl.parent / r["image"])
    bad = rows[1] | {"prefix": "answer en " + "why " * 4200}  # past the bundled model's 4096 positions
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], bad, *rows[2:]]))
    pipe = palikit.load("default", dtype="float32")
    out = tmp_path / "preds.jsonl"
    ev.evaluate(pipe, ev.jsonl_examples(path), name="long", by_task=True, batch_size=4, out=out)
    preds = _preds(out)
    assert "error" in preds[1] and "limit" in preds[1]["error"]
    alone = [t for t, _ in pipe.generate_details([r["image"] for r in rows], [r["prefix"] for r in rows],
                                                max_new_tokens=64, batch_size=1)]
    assert [p["prediction"] for i, p in enumerate(preds) if i != 1] == [alone[0], *alone[2:]]


def test_negative_detection_examples_are_scored_not_crashed(tmp_path, jsonl):
    """A detect example with nothing to find (an empty suffix, as Roboflow's null images become)
    beside the others: `palikit eval` finishes with a report; a box predicted there is a miss."""
    lines = jsonl.read_text().splitlines()
    detect = next(json.loads(line) for line in lines if json.loads(line)["prefix"].startswith("detect"))
    data = jsonl.parent / "with_negatives.jsonl"  # beside its images
    data.write_text("\n".join([*lines, json.dumps(detect | {"suffix": ""})]) + "\n")
    out = tmp_path / "preds.jsonl"
    assert main(["eval", *BASE, "--data", str(data), "--out", str(out)]) == 0
    values = _values(_report(out))
    negative = _preds(out)[-1]
    assert negative["scores"]["referring_detection"]["box_iou"] == (0.0 if negative["prediction"] else 1.0)
    assert values[("detect", "detection_map")]["map"] is not None
