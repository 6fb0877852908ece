"""palikit.eval_sets: every registry entry read from tiny files written here in the benchmark's
published layout (and its Hugging Face parquet export where it has one), the errors for missing,
misnamed and foreign files, pickles refused unopened, `limit`, and the model card lookup."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from palikit import eval_sets
from palikit.eval_sets import BENCHMARKS, MODEL_CARD, BenchmarkError, published, read_benchmark


def write_image(path: Path, size=(20, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def png(size=(20, 10)) -> dict:
    """An image as HF `datasets` stores it in parquet: {"bytes", "path"}."""
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 30, 200)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


TEN = [" yes", "yes ", "yes", "no", "yes", "yes", "yes", "maybe", "yes", "yes"]


def vqa_annotations(qid, image_id, answer_type="other"):
    return {"question_id": qid, "image_id": image_id, "answer_type": answer_type, "question_type": "what",
            "multiple_choice_answer": "yes",
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(TEN)]}


def write_vqa(d: Path, questions: str, annotations: str, image_dir: str) -> None:
    write_json(d / questions, {"questions": [
        {"image_id": 42, "question": " Is it red? ", "question_id": 420},
        {"image_id": 7, "question": "How many?", "question_id": 70}]})
    # Annotations in another order than the questions: they are joined by question_id.
    write_json(d / annotations, {"annotations": [vqa_annotations(70, 7, "number"), vqa_annotations(420, 42)]})
    write_image(d / image_dir / "COCO_val2014_000000000042.jpg")


# ---------------------------------------------------------------------------- published layouts
# Each fixture writes the benchmark's files under `d` and returns (path to pass, what the first
# example must be, how many examples there are).


def fx_vqav2(d):
    write_vqa(d, "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
              "images/val2014")
    first = dict(id="420", prefix="answer en Is it red?", answers=[a.strip() for a in TEN],
                 image=d / "images/val2014/COCO_val2014_000000000042.jpg",
                 extra={"question_id": 420, "answer_type": "other"})
    return d, first, 2


def fx_okvqa(d):
    write_vqa(d, "OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json", "val2014")
    return d, dict(id="420", prefix="answer en Is it red?", image=d / "val2014/COCO_val2014_000000000042.jpg",
                   extra={"question_id": 420}), 2


def fx_textvqa(d):
    write_json(d / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question": "what is written?", "image_id": "0054c91397f2fe05", "question_id": 34602,
         "answers": ["nous les gosses "] * 10, "image_classes": ["Sign"]},
        {"question": "which brand?", "image_id": "0054c91397f2fe05", "question_id": 34603,
         "answers": ["dakota"] * 10}]})
    write_image(d / "train_images/0054c91397f2fe05.jpg")
    return d, dict(id="34602", prefix="answer en what is written?", answers=["nous les gosses"] * 10,
                   image=d / "train_images/0054c91397f2fe05.jpg",
                   extra={"question_id": 34602, "answer_type": "other"}), 2


def fx_aokvqa_da(d):
    write_json(d / "aokvqa_v1p0_val.json", [
        {"split": "val", "image_id": 461751, "question_id": "22jbM6gDxdaMaunuzgrsBB",
         "question": "What is in the bowl?", "choices": ["a", "b", "c", "d"], "correct_choice_idx": 0,
         "direct_answers": ["fruit", " apples"] * 5},
        {"split": "val", "image_id": 461751, "question_id": "q2", "question": "Why?",
         "direct_answers": ["x"] * 10}])
    write_image(d / "val2017/000000461751.jpg")
    return d, dict(id="22jbM6gDxdaMaunuzgrsBB", prefix="answer en What is in the bowl?",
                   answers=["fruit", "apples"] * 5, image=d / "val2017/000000461751.jpg"), 2


def fx_ocrvqa(d):
    write_json(d / "dataset.json", {
        "0001": {"imageURL": "http://ecx.images-amazon.com/images/I/51.jpg", "title": "T", "genre": "Comics",
                 "questions": ["Who wrote this book?", "Is this a comic book?"],
                 "answers": ["Jane Roe ", "Yes"], "split": 3},
        "0002": {"imageURL": "http://x/52.jpg", "questions": ["Who?"], "answers": ["A"], "split": 1}})
    write_image(d / "images/0001.jpg")
    return d, dict(id="0001-0", prefix="answer en Who wrote this book?", answers=["Jane Roe"],
                   image=d / "images/0001.jpg"), 2


def fx_docvqa(d):
    write_json(d / "val/val_v1.0_withQT.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": [
        {"questionId": 49153, "question": "What is the date?", "image": "documents/pybv0228_81.png",
         "docId": 14465, "answers": ["1/8/93", "January 8, 1993"]}]})
    write_image(d / "val/documents/pybv0228_81.png")
    return d, dict(id="49153", prefix="What is the date?", answers=["1/8/93", "January 8, 1993"],
                   image=d / "val/documents/pybv0228_81.png", extra={"question_id": 49153}), 1


def fx_infovqa(d):
    write_json(d / "infographicsVQA_val_v1.0_withQT.json", {"data": [
        {"questionId": 98313, "question": "Which country?", "image_local_name": "37313.jpeg",
         "answers": ["Japan"]}]})
    write_image(d / "infographicsvqa_images/37313.jpeg")
    return d, dict(id="98313", prefix="answer en Which country?", answers=["Japan"],
                   image=d / "infographicsvqa_images/37313.jpeg",
                   extra={"question_id": 98313}), 1


def fx_stvqa(d):
    write_json(d / "train_task_3.json", {"data": [
        {"question_id": 1, "file_path": "coco-text/COCO_train2014_000000000009.jpg",
         "question": "What brand?", "answers": ["Nike", "nike"]},
        {"question_id": 2, "file_path": "imageNet/n1.JPEG", "question": "What is it?", "answers": ["x"]}]})
    (d / "val_ids.txt").write_text("coco-text/COCO_train2014_000000000009.jpg\n")
    write_image(d / "train_images/coco-text/COCO_train2014_000000000009.jpg")
    return d, dict(id="1", prefix="answer en What brand?", answers=["Nike", "nike"],
                   image=d / "train_images/coco-text/COCO_train2014_000000000009.jpg"), 1


def fx_chartqa(d):
    # The dataset's root is given: the annotation file and charts are in its test/.
    write_json(d / "test/test_human.json", [
        {"imgname": "41699051005347.png", "query": "What is the peak?", "label": "54 "},
        {"imgname": "b.png", "query": "Q2", "label": "1"}])
    write_image(d / "test/png/41699051005347.png")
    return d, dict(id="0", prefix="What is the peak?", answers=["54"],
                   image=d / "test/png/41699051005347.png"), 2


def fx_chartqa_aug(d):
    write_json(d / "test_augmented.json", [{"imgname": "a.png", "query": "Is it larger?", "label": "Yes"}])
    write_image(d / "png/a.png")
    return d, dict(id="0", prefix="Is it larger?", answers=["Yes"], image=d / "png/a.png"), 1


def fx_coco_captions(d):
    def image(cocoid, split):
        return {"filepath": "val2014", "filename": f"COCO_val2014_{cocoid:012d}.jpg", "cocoid": cocoid,
                "split": split, "sentences": [{"raw": "A man riding a horse. ", "tokens": []},
                                              {"raw": "a rider"}]}

    write_json(d / "dataset_coco.json", {"dataset": "coco", "images": [image(1, "test"), image(2, "val"),
                                                                        image(3, "train"), image(4, "val")]})
    write_image(d / "val2014/COCO_val2014_000000000002.jpg")
    return d, dict(id="2", prefix="caption en", answers=["A man riding a horse.", "a rider"],
                   image=d / "val2014/COCO_val2014_000000000002.jpg"), 2


def fx_nocaps(d):
    write_json(d / "nocaps_val_4500_captions.json", {
        "images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "open_images_id": "0013ea2087020901"},
                   {"id": 1, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "id": 9, "caption": "a cat"},
                        {"image_id": 0, "id": 10, "caption": " a dog "},
                        {"image_id": 0, "id": 11, "caption": "a brown dog"}]})
    write_image(d / "validation/0013ea2087020901.jpg")
    return d, dict(id="0", prefix="caption en", answers=["a dog", "a brown dog"],
                   image=d / "validation/0013ea2087020901.jpg"), 2


def fx_textcaps(d):
    # One record per caption, as TextCaps ships them; grouped into one example per image.
    write_json(d / "TextCaps_0.1_val.json", {"data": [
        {"image_id": "011e7e629fb9ae7b", "image_name": "011e7e629fb9ae7b", "caption_str": "a sign says stop",
         "reference_strs": ["a sign says stop", "a red sign"]},
        {"image_id": "c2", "image_name": "c2", "caption_str": "a bottle"},
        {"image_id": "011e7e629fb9ae7b", "image_name": "011e7e629fb9ae7b", "caption_str": "a red sign "}]})
    write_image(d / "train_images/011e7e629fb9ae7b.jpg")
    return d, dict(id="011e7e629fb9ae7b", prefix="caption en", answers=["a sign says stop", "a red sign"],
                   image=d / "train_images/011e7e629fb9ae7b.jpg"), 2


def write_refcoco(d: Path, refs_name: str) -> None:
    write_json(d / "instances.json", {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 20, "height": 10}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [2, 1, 6, 4], "category_id": 1, "iscrowd": 0,
                         "segmentation": [[2, 1, 8, 1, 8, 5, 2, 5]]}],
        "categories": [{"id": 1, "name": "person"}]})
    write_json(d / refs_name, [
        {"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "val", "category_id": 1,
         "file_name": "COCO_train2014_000000000001_10.jpg",
         "sentences": [{"sent": "left man", "raw": "Left man", "sent_id": 0}, {"sent": "man on the left "}]},
        {"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "train", "sentences": [{"sent": "guy"}]}])
    write_image(d / "train2014/COCO_train2014_000000000001.jpg")


def fx_refcoco(d, refs_name="refs(unc).json"):
    write_refcoco(d, refs_name)
    first = dict(id="0-0", prefix="left man", image=d / "train2014/COCO_train2014_000000000001.jpg")
    return d, first, 2


def fx_tallyqa(d):
    write_json(d / "test.json", [
        {"image": "VG_100K_2/2410.jpg", "answer": 2, "data_source": "imported_genome",
         "question": "How many dogs?", "issimple": True, "question_id": 30000, "image_id": 2410},
        {"image": "val2014/COCO_val2014_000000000001.jpg", "answer": 0,
         "question": "How many cats are on it?", "issimple": False, "question_id": 30001, "image_id": 1}])
    write_image(d / "images/VG_100K_2/2410.jpg")
    return d, dict(id="30000", prefix="answer en How many dogs?", answers=["2"],
                   image=d / "images/VG_100K_2/2410.jpg", extra={"issimple": True, "question_id": 30000}), 2


def fx_countbenchqa(d):
    write_parquet(d / "data/test-00000-of-00001.parquet", [
        {"image": png(), "text": "three dogs on a couch", "question": "How many dogs are there?",
         "number": 3},
        {"image": None, "text": "no image", "question": "How many?", "number": 2},  # skipped, as big_vision
        {"image": png(), "text": "two cats", "question": "How many cats?", "number": 2}])
    return d, dict(id="0", prefix="answer en How many dogs are there?", answers=["3"],
                   extra={"text": "three dogs on a couch"}), 2


def fx_gqa(d):
    write_json(d / "testdev_balanced_questions.json", {
        "201307251": {"imageId": "n15740", "question": "Is the sky blue?", "answer": "yes",
                      "fullAnswer": "Yes.", "isBalanced": True},
        "201640614": {"imageId": "n2", "question": "Who?", "answer": "man"}})
    write_image(d / "images/n15740.jpg")
    return d, dict(id="201307251", prefix="answer en Is the sky blue?", answers=["yes"],
                   image=d / "images/n15740.jpg", extra={"question_id": "201307251"}), 2


def fx_synthetic(d):
    return d, dict(id="0-0", prefix="caption en", extra={"task": "caption", "metric": "exact_match"}), None


def _videos(folder, *names):
    """Empty stand-ins for videos: the readers find files, they do not decode them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def fx_msrvtt_cap(d):
    _videos(d / "TestVideo", "video7010.mp4", "video7011.mp4")
    (d / "test_videodatainfo.json").write_text(json.dumps({
        "videos": [{"video_id": "video7010", "split": "test"}, {"video_id": "video7011", "split": "test"}],
        "sentences": [{"video_id": "video7010", "caption": "a man talks"}, {"video_id": "video7010", "caption": "a talk "}]}))
    return d, dict(id="video7010", prefix="caption en", answers=["a man talks", "a talk"],
                   image=d / "TestVideo" / "video7010.mp4", extra={"video": {"frames": 16, "stride": 9}}), 2


def fx_msrvtt_qa(d):
    _videos(d / "video", "video7010.mp4")
    (d / "test_qa.json").write_text(json.dumps([{"question": "who talks?", "answer": "man", "video_id": 7010, "id": 3}]))
    return d, dict(id="3", prefix="answer en who talks?", answers=["man"], image=d / "video" / "video7010.mp4"), 1


def fx_msvd_qa(d):
    _videos(d / "YouTubeClips", "abc_1_5.avi")
    (d / "youtube_mapping.txt").write_text("abc_1_5 vid1\n")
    (d / "test_qa.json").write_text(json.dumps([{"question": "what is it?", "answer": "dog", "video_id": 1, "id": 0}]))
    return d, dict(id="0", prefix="answer en what is it?", answers=["dog"], image=d / "YouTubeClips" / "abc_1_5.avi"), 1


def fx_activitynet_qa(d):
    _videos(d / "videos", "v_xyz.mp4")
    (d / "test_q.json").write_text(json.dumps([{"question": "is it red", "question_id": "xyz_0", "video_name": "xyz"}]))
    (d / "test_a.json").write_text(json.dumps([{"answer": "yes", "question_id": "xyz_0", "type": 3}]))
    return d, dict(id="xyz_0", prefix="answer en is it red", answers=["yes"], image=d / "videos" / "v_xyz.mp4"), 1


def fx_activitynet_cap(d):
    _videos(d / "videos", "v_xyz.mp4")
    (d / "val_1.json").write_text(json.dumps({"v_xyz": {"duration": 9.0, "timestamps": [[0.0, 4.5], [4.5, 9.0]],
                                                        "sentences": ["A man walks. ", "He sits."]}}))
    return d, dict(id="v_xyz[0.0-4.5]", prefix="caption en", answers=["A man walks."],
                   extra={"clip": [0.0, 4.5]}), 2


def fx_vatex_cap(d):
    _videos(d / "videos", "Ab_000001_000011.mp4")
    (d / "vatex_validation_v1.0.json").write_text(json.dumps([{"videoID": "Ab_000001_000011", "enCap": ["a dog runs"]}]))
    return d, dict(id="Ab_000001_000011", prefix="caption en", answers=["a dog runs"]), 1


FIXTURES = {
    "msrvtt_cap": fx_msrvtt_cap, "msrvtt_qa": fx_msrvtt_qa, "msvd_qa": fx_msvd_qa, "activitynet_qa": fx_activitynet_qa,
    "activitynet_cap": fx_activitynet_cap, "vatex_cap": fx_vatex_cap,
    "vqav2": fx_vqav2, "textvqa": fx_textvqa, "okvqa": fx_okvqa, "aokvqa_da": fx_aokvqa_da,
    "ocrvqa": fx_ocrvqa, "docvqa": fx_docvqa, "infovqa": fx_infovqa, "stvqa": fx_stvqa, "chartqa": fx_chartqa,
    "chartqa_aug": fx_chartqa_aug, "coco_captions": fx_coco_captions, "nocaps": fx_nocaps,
    "textcaps": fx_textcaps,
    "refcoco": fx_refcoco, "refcoco+": fx_refcoco, "refcocog": lambda d: fx_refcoco(d, "refs(umd).json"),
    "tallyqa": fx_tallyqa, "countbenchqa": fx_countbenchqa, "gqa": fx_gqa, "synthetic": fx_synthetic,
}


def check_first(examples, first: dict, count: int | None, benchmark) -> None:
    if count is not None:
        assert len(examples) == count
    ex = examples[0]
    for key, want in first.items():
        got = getattr(ex, key)
        if key == "extra":
            assert {k: got.get(k) for k in want} == want
        elif key == "image":
            assert Path(got) == want and Path(got).is_absolute()
        else:
            assert got == want, key
    assert len({e.id for e in examples}) == len(examples), "ids must be unique"
    for e in examples:
        assert all(a == a.strip() for a in e.answers)
        assert isinstance(e.image, bytes) or Path(e.image).is_absolute()


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_reader(name, tmp_path):
    """Every registry entry reads its published layout; a new benchmark needs a fixture here."""
    assert name in FIXTURES, f"benchmark {name!r} has no reader test: add a fixture writing its files"
    path, first, count = FIXTURES[name](tmp_path)
    b = BENCHMARKS[name]
    examples = read_benchmark(name, path, limit=None if count else 12)
    check_first(examples, first, count, b)


def test_every_benchmark_is_complete():
    metrics = {"exact_match", "vqav2_accuracy", "vqa_accuracy", "anls", "relaxed_accuracy", "cider",
               "segmentation_miou", "referring_detection", "detection_map", "tallyqa_accuracy",
               "countbench_accuracy", "ocr",
               "vqa_accuracy_lowercase"}  # palikit.metrics' OCR-VQA metric (big_vision: to_lower=True)
    for name, b in BENCHMARKS.items():
        assert b.name == name == name.lower()
        assert b.metric in metrics, name
        assert b.layout and "\n" not in b.layout
        assert b.split


def test_refcoco_json_boxes_and_masks(tmp_path):
    fx_refcoco(tmp_path)
    examples = read_benchmark("refcoco", tmp_path)
    assert [e.prefix for e in examples] == ["left man", "man on the left"]  # the sentence alone (big_vision)
    for e in examples:
        (obj,) = e.truth_objects
        assert obj["label"] == e.prefix
        assert obj["box"] == [2.0, 1.0, 8.0, 5.0]  # COCO x, y, w, h -> x1, y1, x2, y2
        assert obj["mask"].shape == (10, 20) and obj["mask"].dtype == bool
        assert obj["mask"][2:4, 3:7].all() and not obj["mask"][:, 12:].any()
    assert [e.id for e in read_benchmark("refcoco", tmp_path, split="train")] == ["1-0"]


# ---------------------------------------------------------------------------- parquet exports
# Rows with the columns the hub exports have, images as HF's {"bytes", "path"} struct.


def pq_vqav2(d):
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(TEN)]
    write_parquet(d / "data/validation-00000-of-00002.parquet", [
        {"question_type": "is the", "multiple_choice_answer": "yes", "answers": answers, "image_id": 42,
         "answer_type": "yes/no", "question_id": 420, "question": "Is it red?", "image": png()}])
    write_parquet(d / "data/testdev-00000-of-00001.parquet", [
        {"question_type": "", "multiple_choice_answer": "", "answers": answers, "image_id": 1,
         "answer_type": "", "question_id": 1, "question": "test question", "image": png()}])
    return d, None, dict(id="420", prefix="answer en Is it red?", answers=[a.strip() for a in TEN],
                         extra={"answer_type": "yes/no", "question_id": 420}), 1


def pq_textvqa(d):
    write_parquet(d / "validation-00000-of-00001.parquet", [
        {"image_id": "0054c91397f2fe05", "question_id": 34602, "question": "what is written?", "image": png(),
         "answers": ["nous "] * 10, "ocr_tokens": ["nous"], "set_name": "val"}])
    return d, None, dict(id="34602", prefix="answer en what is written?", answers=["nous"] * 10,
                         extra={"answer_type": "other"}), 1


def pq_okvqa(d):
    # lmms-lab/OK-VQA: answers as plain strings, read by the same map as VQAv2's answer structs.
    write_parquet(d / "val2014-00000-of-00001.parquet", [
        {"question_type": "eight", "answers": ["race", "racing"] * 5, "answer_type": "other",
         "image_id": 297147, "question_id": 2971475, "question": "What sport?", "image": png()}])
    return d, None, dict(id="2971475", prefix="answer en What sport?", answers=["race", "racing"] * 5), 1


def pq_aokvqa_da(d):
    write_parquet(d / "data/validation-00000-of-00001.parquet", [
        {"image": png(), "question_id": "22jbM6", "question": "What is in the bowl?", "choices": ["a", "b"],
         "correct_choice_idx": 0, "direct_answers": ["fruit"] * 10, "difficult_direct_answer": False,
         "rationales": ["r"]}])
    return d, None, dict(id="22jbM6", prefix="answer en What is in the bowl?", answers=["fruit"] * 10), 1


def pq_docvqa(d):
    write_parquet(d / "DocVQA/validation-00000-of-00001.parquet", [
        {"questionId": "49153", "question": "What is the date?", "question_types": ["form"], "image": png(),
         "docId": 14465, "ucsf_document_id": "x", "ucsf_document_page_no": "81", "answers": ["1/8/93"],
         "data_split": "val"}])
    return d, None, dict(id="49153", prefix="What is the date?", answers=["1/8/93"]), 1


def pq_infovqa(d):
    write_parquet(d / "InfographicVQA/validation-00000-of-00001.parquet", [
        {"questionId": "98313", "question": "Which country?", "answers": ["Japan"], "answer_type": ["span"],
         "image": png(), "image_url": "u", "operation/reasoning": None, "ocr": "{}", "data_split": "val"}])
    return d, None, dict(id="98313", prefix="answer en Which country?", answers=["Japan"],
                         extra={}), 1


def write_chartqa_parquet(d):
    write_parquet(d / "data/test-00000-of-00001.parquet", [
        {"type": "human_test", "question": "What is the peak?", "answer": "54", "image": png()},
        {"type": "augmented_test", "question": "Is it larger?", "answer": "Yes", "image": png()},
        {"type": "human_test", "question": "Q3", "answer": "1", "image": png()}])


def pq_chartqa(d):
    write_chartqa_parquet(d)
    return d, None, dict(id="0", prefix="What is the peak?", answers=["54"]), 2


def pq_chartqa_aug(d):
    write_chartqa_parquet(d)
    return d, None, dict(id="1", prefix="Is it larger?", answers=["Yes"]), 1


def pq_coco_captions(d):
    write_parquet(d / "data/val-00000-of-00001.parquet", [
        {"question_id": "COCO_val2014_000000391895.jpg", "image": png(), "question": "Provide a caption",
         "answer": ["A man riding a bike. ", "a cyclist"], "id": 391895,
         "file_name": "COCO_val2014_000000391895.jpg"}])
    return d, "val2014", dict(id="COCO_val2014_000000391895.jpg", prefix="caption en",
                              answers=["A man riding a bike.", "a cyclist"]), 1


def pq_nocaps(d):
    write_parquet(d / "data/validation-00000-of-00001.parquet", [
        {"image": png(), "image_coco_url": "u", "image_file_name": "0013ea2087020901.jpg", "image_id": 0,
         "image_open_images_id": "0013ea2087020901", "annotations_ids": [1, 2],
         "annotations_captions": ["a dog", "a brown dog"]}])
    return d, None, dict(id="0", prefix="caption en", answers=["a dog", "a brown dog"]), 1


def pq_textcaps(d):
    write_parquet(d / "data/val-00000-of-00001.parquet", [
        {"image_id": "011e", "image": png(), "caption_id": 1, "caption_str": "a sign"},
        {"image_id": "011e", "image": png(), "caption_id": 2, "caption_str": "a red sign"},
        {"image_id": "c2", "image": png(), "caption_id": 3, "caption_str": "a bottle"}])
    return d, None, dict(id="011e", prefix="caption en", answers=["a sign", "a red sign"]), 2


def write_refcoco_parquet(d):
    write_parquet(d / "data/val-00000-of-00001.parquet", [
        {"question_id": "123", "image": png((20, 10)), "question": "Describe this region.",
         "answer": ["left man", "man on the left"], "segmentation": [2.0, 1.0, 8.0, 1.0, 8.0, 5.0, 2.0, 5.0],
         "bbox": [2.0, 1.0, 6.0, 4.0], "iscrowd": 0, "file_name": "COCO_train2014_000000000001_10.jpg"}])
    write_parquet(d / "data/testA-00000-of-00001.parquet", [
        {"question_id": "9", "image": png(), "question": "q", "answer": ["x"],
         "segmentation": [0.0, 0.0, 1.0, 1.0], "bbox": [0.0, 0.0, 1.0, 1.0], "iscrowd": 0, "file_name": "f"}])


def pq_refcoco(d):
    write_refcoco_parquet(d)
    return d, None, dict(id="123-0", prefix="left man"), 2


def pq_countbenchqa(d):
    path, first, count = fx_countbenchqa(d)
    return path, None, first, count


PARQUET = {
    "vqav2": pq_vqav2, "textvqa": pq_textvqa, "okvqa": pq_okvqa, "aokvqa_da": pq_aokvqa_da,
    "docvqa": pq_docvqa, "infovqa": pq_infovqa, "chartqa": pq_chartqa, "chartqa_aug": pq_chartqa_aug,
    "coco_captions": pq_coco_captions,
    "nocaps": pq_nocaps, "textcaps": pq_textcaps, "refcoco": pq_refcoco, "refcoco+": pq_refcoco,
    "refcocog": pq_refcoco, "countbenchqa": pq_countbenchqa,
}


@pytest.mark.parametrize("name", [n for n, b in BENCHMARKS.items() if "parquet" in b.layout])
def test_parquet(name, tmp_path):
    """Every benchmark that names a parquet export in its layout reads one."""
    assert name in PARQUET, f"benchmark {name!r} names a parquet export but has no parquet test"
    path, split, first, count = PARQUET[name](tmp_path)
    examples = read_benchmark(name, path, split=split)
    check_first(examples, first, count, BENCHMARKS[name])
    assert all(isinstance(e.image, bytes) and Image.open(io.BytesIO(e.image)).size for e in examples)


def test_refcoco_parquet(tmp_path):
    write_refcoco_parquet(tmp_path)
    examples = read_benchmark("refcoco", tmp_path)
    assert [(e.id, e.prefix) for e in examples] == [("123-0", "left man"), ("123-1", "man on the left")]
    for e in examples:
        (obj,) = e.truth_objects
        assert obj["box"] == [2.0, 1.0, 8.0, 5.0]  # xywh -> xyxy pixels
        assert obj["label"] == e.prefix
        # The mask is drawn at the image's size (read from the PNG header: the export has no width/height).
        assert obj["mask"].shape == (10, 20) and obj["mask"][2:4, 3:7].all() and obj["mask"].sum() < 60
    assert [e.id for e in read_benchmark("refcoco", tmp_path, split="testA")] == ["9-0"]
    one_file = tmp_path / "data/val-00000-of-00001.parquet"  # a parquet file itself, whatever the split
    assert len(read_benchmark("refcocog", one_file, split="test")) == 2


def test_parquet_split_and_columns_errors(tmp_path):
    pq_vqav2(tmp_path)
    with pytest.raises(BenchmarkError, match=r"no parquet files of split 'test'.*testdev, validation"):
        read_benchmark("vqav2", tmp_path, split="test")
    write_parquet(tmp_path / "other/validation-00000-of-00001.parquet", [{"image": png(), "caption": "x"}])
    with pytest.raises(BenchmarkError, match=r"no column answer_type, answers, question, question_id"):
        read_benchmark("vqav2", tmp_path / "other")


# ---------------------------------------------------------------------------- errors


def test_missing_file_names_the_file_and_folder(tmp_path):
    with pytest.raises(BenchmarkError) as e:
        read_benchmark("textvqa", tmp_path)
    msg = str(e.value)
    assert "TextVQA_0.5.1_val.json" in msg and str(tmp_path) in msg and "\n" not in msg
    with pytest.raises(BenchmarkError, match="does not exist"):
        read_benchmark("gqa", tmp_path / "nowhere")


def test_vqa_missing_annotations_file(tmp_path):
    write_vqa(tmp_path, "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
              "val2014")
    (tmp_path / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(BenchmarkError, match=r"v2_mscoco_val2014_annotations\.json not found"):
        read_benchmark("vqav2", tmp_path)


def test_missing_first_image_names_the_folders(tmp_path):
    fx_vqav2(tmp_path)
    (tmp_path / "images/val2014/COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(BenchmarkError) as e:
        read_benchmark("vqav2", tmp_path)
    msg = str(e.value)
    assert msg.startswith("image not found: COCO_val2014_000000000042.jpg")
    assert "the COCO val2014 images" in msg and str(tmp_path / "val2014") in msg
    assert str(tmp_path / "images/val2014") in msg


def test_wrong_layout(tmp_path):
    captions = write_json(tmp_path / "captions_val2014.json", {
        "info": {}, "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"image_id": 1, "caption": "x"}]})
    with pytest.raises(BenchmarkError, match=r"captions_val2014\.json: expected a JSON object with a 'quest"):
        read_benchmark("vqav2", captions)
    # A list of records, but not the benchmark's: the message says which fields are missing.
    other = write_json(tmp_path / "test.json", [{"img": "a.jpg", "q": "how many?"}])
    with pytest.raises(BenchmarkError, match=r"records have no question_id, image, question, answer, iss"):
        read_benchmark("tallyqa", other)
    broken = tmp_path / "gqa" / "testdev_balanced_questions.json"
    broken.parent.mkdir()
    broken.write_text("{")
    with pytest.raises(BenchmarkError, match=r"testdev_balanced_questions\.json: not a JSON file"):
        read_benchmark("gqa", broken.parent)
    fx_coco_captions(tmp_path / "coco")
    with pytest.raises(BenchmarkError, match=r"Karpathy's split has no 'val2014' images"):
        read_benchmark("coco_captions", tmp_path / "coco" / "dataset_coco.json", split="val2014")


def test_stvqa_val_needs_the_listing(tmp_path):
    fx_stvqa(tmp_path)
    (tmp_path / "val_ids.txt").unlink()
    with pytest.raises(BenchmarkError, match=r"val_ids\.txt"):
        read_benchmark("stvqa", tmp_path)
    assert len(read_benchmark("stvqa", tmp_path, split="train", limit=1)) == 1


def test_unknown_benchmark_lists_names():
    with pytest.raises(BenchmarkError) as e:
        eval_sets.benchmark("vqa3")
    msg = str(e.value)
    assert "vqa3" in msg and "\n" not in msg
    assert all(name in msg for name in BENCHMARKS)
    assert eval_sets.benchmark("VQAv2") is BENCHMARKS["vqav2"]


def trap(marker: Path) -> bytes:
    """A pickle that makes the folder `marker` when loaded."""

    class Trap:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    return pickle.dumps(Trap())


def test_pickle_refused_unopened(tmp_path):
    control = tmp_path / "control"
    pickle.loads(trap(control))
    assert control.is_dir()  # the trap works: loading it would have made the marker
    marker = tmp_path / "opened"
    refs = tmp_path / "refcoco" / "refs(unc).p"
    refs.parent.mkdir()
    refs.write_bytes(trap(marker))
    write_json(refs.parent / "instances.json", {"images": [], "annotations": []})
    for path in (refs, refs.parent):  # the pickle itself, or the refer toolkit's folder holding it
        with pytest.raises(BenchmarkError) as e:
            read_benchmark("refcoco", path)
        msg = str(e.value)
        assert "pickle" in msg and "refs(unc).p" in msg and "parquet" in msg and "refs(unc).json" in msg
    assert not marker.exists()


def test_limit_and_the_file_itself(tmp_path):
    fx_vqav2(tmp_path)
    # The second question's image is absent: with limit=1 it is never looked at.
    assert [e.id for e in read_benchmark("vqav2", tmp_path, limit=1)] == ["420"]
    file = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    assert [e.id for e in read_benchmark("vqav2", file, split="val")] == ["420", "70"]
    fx_ocrvqa(tmp_path / "ocr")
    write_image(tmp_path / "ocr/images/0002.jpg")
    assert [e.id for e in read_benchmark("ocrvqa", tmp_path / "ocr", split="train")] == ["0002-0"]


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_examples_per_task():
    examples = list(eval_sets.read_synthetic(n_images=6, seed=3))
    tasks = {e.extra["task"] for e in examples}
    assert {"caption", "count", "detect", "segment"} <= tasks
    assert len({e.id for e in examples}) == len(examples)
    metric = {"caption": "exact_match", "count": "exact_match", "colour": "exact_match", "ocr": "exact_match",
              "detect": "detection_map", "segment": "segmentation_miou"}
    for e in examples:
        assert e.extra["metric"] == metric[e.extra["task"]]
        assert Image.open(io.BytesIO(e.image)).size == (96, 96)
    segments = [e for e in examples if e.extra["task"] == "segment"]
    # at most one per scene, right after the scene's first example, on a kind the scene holds once
    assert 3 <= len(segments) <= 6
    assert all(examples[examples.index(s) - 1].id.endswith("-0") for s in segments)
    for s in segments:
        (obj,) = s.truth_objects
        x1, y1, x2, y2 = obj["box"]
        assert s.prefix == f"segment {obj['label']}" and obj["mask"].any() and not obj["mask"][:, :x1].any()
        assert np.asarray(obj["mask"]).shape == (96, 96)
    detects = [e for e in examples if e.extra["task"] == "detect"]
    assert all(e.truth_objects and all(len(o["box"]) == 4 for o in e.truth_objects) for e in detects)


# ---------------------------------------------------------------------------- model card


def test_published():
    assert published("vqav2", "paligemma2-3b-pt-224") == 83.0
    assert published("vqav2", "google/paligemma2-3b-pt-224") == 83.0  # a hub id
    assert published("docvqa", "/models/PaliGemma2-10B-PT-448/") == 76.6  # a folder, any case
    assert published("refcoco/testA", Path("ckpt/paligemma2-28b-pt-448")) == 79.3
    assert published("chartqa_aug", "paligemma2-3b-pt-448") == 89.2
    assert published("vqav2", "paligemma2-3b-mix-224") is None  # the card reports fine-tuned pt models only
    assert published("vqav2", "paligemma2-3b-pt-896") is None
    assert published("synthetic", "paligemma2-3b-pt-224") is None
    assert published("no-such-benchmark", "paligemma2-3b-pt-224") is None


def test_model_card_rows_name_benchmarks():
    for key, row in MODEL_CARD.items():
        assert key.split("/")[0] in BENCHMARKS, key
        assert len(row) == 6 and all(k.startswith("paligemma2-") for k in row)
    # Each benchmark with a card row of its own split has it under its name.
    # (the PaliGemma 2 card reports no video benchmark)
    missing = [n for n, b in BENCHMARKS.items()
               if n not in MODEL_CARD and n not in ("tallyqa", "synthetic") and "video" not in b.layout]
    assert not missing
