"""The model card's metrics (palikit.metrics) on hand-built cases, each checked against its formula
worked out by hand, against pycocoevalcap / pycocotools run directly, or against outputs of
Stanford's PTBTokenizer recorded here."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from palikit import metrics
from palikit.metrics import (
    anls,
    box_iou,
    cider,
    count_accuracy,
    detection_map,
    exact_match,
    mask_iou,
    normalize_vqa_answer,
    relaxed_accuracy,
    tokenize_captions,
    vqa_accuracy,
    vqav2_accuracy,
)
from palikit.tasks import Detection, parse_segmentations

# ----------------------------------------------------------------------------- VQAv2


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqav2_leave_one_out(matches, expected):
    # Ten answers, `matches` of them "cat". Leaving out a "cat" leaves matches - 1, leaving out another
    # answer leaves all: 2 matches -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; 3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqav2_accuracy("cat", answers) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("dont", "don't"),  # contraction typed without its apostrophe
    ("couldnt've", "couldn't've"),
    ("somebody'd", "somebodyd"),  # the official table's entry the wrong way round
    ("A Dog", "dog"),  # articles go, case goes
    ("the two dogs", "2 dogs"),  # number words become digits
    ("none", "0"),
    ("1,000", "1000"),  # a digit comma deletes the punctuation
    ("x,y 1,2", "xy 12"),  # ... all of it, also where it is not between digits
    ("red,blue", "red blue"),  # punctuation inside a word is a space
    ("hello, world", "hello world"),  # next to a space it is deleted
    ("yes.", "yes"),
    ("3.5", "3.5"),  # a full stop before a digit stays
    ("a.m.", "am"),
    ("(left)", "left"),
])
def test_vqa_answer_normalisation(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_vqav2_normalises_only_when_the_answers_disagree():
    assert vqav2_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqav2_accuracy("a dog", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert vqav2_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqav2_accuracy("1,000", ["1000"] * 3 + ["many"] * 7) == pytest.approx(0.9)
    # Ten equal answers: compared as they are, after stripping blanks only.
    assert vqav2_accuracy("two", ["2"] * 10) == 0.0
    assert vqav2_accuracy("1,000", ["1000"] * 10) == 0.0
    assert vqav2_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqav2_accuracy("", ["yes"] * 10) == 0.0
    with pytest.raises(ValueError, match="no ground-truth"):
        vqav2_accuracy("yes", [])


# ----------------------------------------------------------------------------- simple answers


def test_vqa_accuracy():
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(2 / 3)
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == 1.0
    assert vqa_accuracy("cat", ["cat"]) == 1.0  # one answer (OCR-VQA): an exact match
    # No normalisation at all: case and blanks count.
    assert vqa_accuracy("Cat", ["cat"]) == 0.0
    assert vqa_accuracy(" cat", ["cat"] * 10) == 0.0


def test_exact_match():
    assert exact_match(" cat ", ["dog", "cat"]) == 1.0
    assert exact_match("Cat", ["cat"]) == 0.0
    assert exact_match("", ["cat"]) == 0.0
    assert exact_match("", [""]) == 1.0
    with pytest.raises(ValueError):
        exact_match("cat", [])


def test_anls():
    assert anls("hello", ["hello"]) == 1.0
    assert anls(" HELLO ", ["Hello"]) == 1.0  # lower-cased and stripped
    assert anls("helo", ["hello"]) == pytest.approx(1 - 1 / 5)
    assert anls("helo", ["zzzzz", "hello"]) == pytest.approx(0.8)  # the best answer counts
    assert anls("abcxx", ["abcde"]) == pytest.approx(1 - 2 / 5)  # distance 0.4 < 0.5
    # The threshold: a normalised distance of exactly theta scores 0.
    assert anls("ab", ["ax"]) == 0.0
    assert anls("ab", ["ax"], theta=0.51) == pytest.approx(0.5)
    assert anls("", [""]) == 1.0  # an empty answer matches only an empty prediction
    assert anls("x", [""]) == 0.0
    assert anls("", ["abc"]) == 0.0


@pytest.mark.parametrize("prediction, answer, expected", [
    ("45%", "0.45", 1.0),  # a percentage reads as a fraction ...
    ("45%", "45", 0.0),  # ... so it is far from 45
    ("45", "45%", 0.0),
    ("45%", "45%", 1.0),
    ("105", "100", 1.0),  # relative error 0.05: still right
    ("95", "100", 1.0),
    ("105.1", "100", 0.0),
    ("-10.4", "-10", 1.0),
    ("0", "0", 1.0),  # a zero answer needs the same string
    ("0.0", "0", 0.0),
    ("Yes", "yes", 1.0),  # lower-cased
    ("yes", "no", 0.0),
    ("", "12", 0.0),
])
def test_relaxed_accuracy(prediction, answer, expected):
    assert relaxed_accuracy(prediction, answer) == expected


def test_relaxed_accuracy_tolerance():
    assert relaxed_accuracy("110", "100", max_relative_error=0.1) == 1.0
    assert relaxed_accuracy("110", "100", max_relative_error=0.09) == 0.0


@pytest.mark.parametrize("prediction, answer, expected", [
    ("2", "2", 1.0), ("two", "2", 1.0), ("Two", "2", 1.0), ("none", "0", 1.0), ("twenty", "20", 1.0),
    ("2 dogs", "2", 0.0), ("3", "2", 0.0), (" 2", "2", 0.0),
])
def test_count_accuracy(prediction, answer, expected):
    assert count_accuracy(prediction, answer) == expected


# ----------------------------------------------------------------------------- captions

# Outputs of pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, -preserveLines -lowerCase) with its
# punctuation removed, recorded from Java.
PTB_CASES = {
    "A man (in a hat) rides a bike.": "a man -lrb- in a hat -rrb- rides a bike",
    "He doesn't know. I'm here, they'll go; we've seen it! You're OK? Can't won't.":
        "he does n't know i 'm here they 'll go we 've seen it you 're ok ca n't wo n't",
    "It costs $5.50 or 5% or 1,000 or 3.5 or 1/2 or 10:30 or 2nd.":
        "it costs $ 5.50 or 5 % or 1,000 or 3.5 or 1/2 or 10:30 or 2nd",
    "The U.S. flag. Made in the U.S.": "the u.s. flag made in the u.s.",
    '"Hello," she said, \'hi\'.': "hello she said hi",
    "A black-and-white photo -- with dashes - and ... ellipsis... end.":
        "a black-and-white photo with dashes and ellipsis end",
    "wow!!! really?! no.": "wow !!! really ?! no",
    "mr. smith and Dr. Jones etc.": "mr. smith and dr. jones etc.",
    "gonna cannot rock'n'roll": "gon na can not rock 'n' roll",
    "the dogs' bowls and James’s hat": "the dogs bowls and james 's hat",
    "dog 😀 and £5 and ½ cup": "dog and # 5 and 1/2 cup",
    "A Santa hat :) and a 1,000-piece puzzle": "a santa hat :-rrb- and a 1,000-piece puzzle",
}

# Where the Python rules and Java disagree in the caption set below.
KNOWN_PTB_DIFFERENCES = {
    "Y'all sitting on a bench.": "java: y' all",
    "A poster of a ’90s rock band.": "java keeps ’90s with the curly apostrophe, python: '90s",
    'A man who is 5\'10" tall.': "java: 5 10, python: 5 '10",
    "A non\u2011stick frying pan on a stove.": "java keeps the non-breaking hyphen inside the word",
}


def test_python_ptb_rules_on_recorded_outputs():
    assert tokenize_captions(list(PTB_CASES), java=False) == list(PTB_CASES.values())


def test_removed_punctuation_is_pycocoevalcap_list():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    # Its bracket names never match the lower-cased tokens, so they are not in palikit's set.
    assert metrics._PTB_REMOVED == set(PUNCTUATIONS) - {"-LRB-", "-RRB-", "-LCB-", "-RCB-"}


def test_tokenize_captions_without_java(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    # The Python rules: Java would give "y' all".
    assert tokenize_captions(["Y'all here.", "a\rb"]) == ["y'all here", "a b"]


def _self_cider(tokens: list[str]) -> float:
    """CIDEr with caption i the prediction and captions i..i+3 its references (scores well above 0)."""
    from pycocoevalcap.cider.cider import Cider

    n = len(tokens)
    score, _ = Cider().compute_score({i: [tokens[(i + k) % n] for k in range(4)] for i in range(n)},
                                     {i: [tokens[i]] for i in range(n)})
    return score


@pytest.fixture(scope="module")
def java_tokens():
    if shutil.which("java") is None:
        pytest.skip("no java: the Python PTB rules cannot be compared with Stanford's tokenizer")
    return tokenize_captions(CAPTIONS, java=True)


def test_python_ptb_rules_match_java(java_tokens):
    python_tokens = tokenize_captions(CAPTIONS, java=False)
    differ = {c for c, j, p in zip(CAPTIONS, java_tokens, python_tokens) if j != p}
    assert differ == set(KNOWN_PTB_DIFFERENCES)
    # 4 of 200 captions differ; CIDEr moves by about 1e-5 of 2.5.
    assert _self_cider(python_tokens) == pytest.approx(_self_cider(java_tokens), abs=1e-4)


def test_cider_tokenises_with_java_when_it_is_there(java_tokens):
    n = len(CAPTIONS)
    references = [[CAPTIONS[(i + k) % n] for k in range(4)] for i in range(n)]
    assert cider(CAPTIONS, references) == pytest.approx(_self_cider(java_tokens), rel=1e-12)


def test_cider_is_pycocoevalcap_cider_on_tokenised_captions(monkeypatch):
    from pycocoevalcap.cider.cider import Cider

    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)  # tokenised text: either tokenizer
    predictions = ["a man riding a horse", "two dogs on the grass", "a red bus", "a plate of food"]
    references = [
        ["a man rides a brown horse", "a person on a horse", "a man riding a horse on a beach"],
        ["two dogs playing in the grass", "dogs on a lawn", "two puppies on green grass"],
        ["a red double decker bus", "a bus on the street", "a red bus parked"],
        ["a plate with food on it", "a dish of rice and chicken", "food on a white plate"],
    ]
    expected, _ = Cider().compute_score(dict(enumerate(references)), {i: [p] for i, p in enumerate(predictions)})
    assert 0 < expected
    assert cider(predictions, references) == pytest.approx(expected, rel=1e-12)
    # Punctuation and case are tokenised away first.
    assert cider([p.capitalize() + "." for p in predictions], references) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="at least one reference"):
        cider(["a cat"], [[]])


# ----------------------------------------------------------------------------- boxes and masks


def test_box_iou():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 20)) == 0.5
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_mask_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert mask_iou(a, b) == 1.0  # two empty masks agree
    a[0, :] = True  # 4 pixels
    b[0, :2] = b[1, :2] = True  # 4 pixels, 2 shared
    assert mask_iou(a, b) == pytest.approx(2 / 6)


W, H = 20, 10  # the image of the segmentation cases


def _loc(*values: int) -> str:
    return "".join(f"<loc{v:04d}>" for v in values)


def _segmentation_example(prediction: str, mask: np.ndarray | None) -> dict:
    truth = np.zeros((H, W), bool)
    truth[2:6, 2:10] = True  # 4 x 8 = 32 pixels
    objects = parse_segmentations(prediction, W, H).objects
    for obj in objects:
        obj.mask = mask
    return {"prediction": prediction, "objects": objects, "width": W, "height": H,
            "truth_objects": [{"label": "thing", "box": [0, 0, 10, 10], "mask": truth}]}


SEG = "<seg005>" * 16


def test_segmentation_metric():
    shifted = np.zeros((H, W), bool)
    shifted[3:7, 2:10] = True  # one row lower: 24 shared pixels, union 40
    exact = np.zeros((H, W), bool)
    exact[2:6, 2:10] = True
    examples = [
        # The whole image: box IoU 0.5 / 1 = 0.5 with the true box, the left half.
        _segmentation_example(_loc(0, 0, 1023, 1023) + SEG, shifted),
        # The true box to within 1/1023: box IoU 511/1023 / 0.5 > 0.75.
        _segmentation_example(_loc(0, 0, 1023, 511) + SEG + " thing", exact),
        _segmentation_example("a thing", None),  # no object
        # A box 1/1023 wide is empty once truncated to 20 pixels: invalid, its box still scored.
        _segmentation_example(_loc(0, 0, 1023, 1) + SEG, np.zeros((H, W), bool)),
    ]
    m = metrics.metric("segmentation_miou")
    records = json.loads(json.dumps([m.score(ex) for ex in examples]))
    assert [r["iou"] for r in records] == pytest.approx([24 / 40, 1.0, 0.0, 0.0])
    assert [r["box_iou"] for r in records] == pytest.approx([0.5, (511 / 1023) / 0.5, 0.0, (1 / 1023) / 0.5])
    assert [r["invalid"] for r in records] == [False, False, True, True]
    assert m.aggregate(records) == pytest.approx(
        {"miou": (0.6 + 1.0) / 4, "boxacc_50": 2 / 4, "boxacc_75": 1 / 4, "invalid": 2, "total": 4})
    assert next(iter(m.aggregate(records))) == "miou"


@pytest.mark.parametrize("prediction", [
    " " + _loc(0, 0, 1023, 1023) + SEG,  # the output must start with the tokens
    _loc(0, 0, 1023, 1023) + "<seg005>" * 15,  # 15 seg tokens
    _loc(0, 0, 1023, 1023) + "<seg128>" + "<seg005>" * 15,  # a seg value past the codebook
    _loc(500, 0, 500, 1023) + SEG,  # y2 == y1
    _loc(0, 600, 1023, 599) + SEG,  # x2 < x1
], ids=["leading-space", "15-seg-tokens", "seg-128", "y2-equals-y1", "x2-below-x1"])
def test_segmentation_invalid_outputs(prediction):
    example = _segmentation_example(prediction, np.ones((H, W), bool))
    example["objects"] = parse_segmentations(_loc(0, 0, 1023, 1023) + SEG, W, H).objects  # even with one
    example["objects"][0].mask = np.ones((H, W), bool)
    assert metrics.metric("segmentation_miou").score(example) == {"iou": 0.0, "box_iou": 0.0, "invalid": True}


def test_referring_detection():
    truth = [{"label": "dog", "box": [0, 0, 10, 10]}]
    examples = [
        {"objects": [Detection("dog", (0, 0, 10, 20)), Detection("dog", (0, 0, 10, 10))]},  # IoU 0.5 first
        {"objects": [Detection("dog", (0, 0, 10, 30))]},  # IoU 1/3
        {"objects": []},
    ]
    m = metrics.metric("referring_detection")
    records = json.loads(json.dumps([m.score(ex | {"prediction": "", "truth_objects": truth}) for ex in examples]))
    assert m.aggregate(records) == pytest.approx({"first_box_acc_50": 1 / 3, "invalid": 1, "total": 3})


def _box(x1, y1, x2, y2, label, logprob=None):
    return Detection(label, (x1, y1, x2, y2), logprob)


DETECTION_IMAGES = [
    {   # a hit, a hit at a lower score, a false dog
        "truth": [("cat", (10, 10, 50, 50)), ("dog", (60, 60, 100, 100))],
        "pred": [_box(12, 12, 50, 50, "cat", -0.1), _box(0, 0, 20, 20, "dog", -0.5),
                 _box(61, 61, 99, 99, "dog", -0.2)],
    },
    {   # the cat missed, a confident false cat elsewhere
        "truth": [("cat", (0, 0, 30, 30))],
        "pred": [_box(40, 40, 70, 70, "cat", -0.05)],
    },
    {   # a loose person (IoU 0.75), a bird no image has, a cat at IoU ~0.81
        "truth": [("person", (5, 5, 25, 45)), ("cat", (30, 30, 60, 60))],
        "pred": [_box(5, 5, 25, 35, "person", -0.3), _box(0, 0, 10, 10, "bird", -0.01),
                 _box(30, 30, 58, 62, "cat", -1.0)],
    },
    {"truth": [("dog", (0, 0, 40, 40))], "pred": []},  # nothing found
]


def _cocoeval_stats(images) -> list[float]:
    """pycocotools run the usual way: a ground-truth COCO, detections through loadRes."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = ["bird", "cat", "dog", "person"]

    def xywh(box):
        return [box[0], box[1], box[2] - box[0], box[3] - box[1]]

    truth = [(i, label, box) for i, image in enumerate(images) for label, box in image["truth"]]
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i} for i in range(len(images))],
        "categories": [{"id": 10 + k, "name": n} for k, n in enumerate(names)],
        "annotations": [
            {"id": k, "image_id": i, "category_id": 10 + names.index(label), "bbox": xywh(box),
             "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0}
            for k, (i, label, box) in enumerate(truth, 1)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([
            {"image_id": i, "category_id": 10 + names.index(d.label), "bbox": xywh(d.box), "score": math.exp(d.logprob)}
            for i, image in enumerate(images) for d in image["pred"]
        ])
        evaluation = COCOeval(gt, dt, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return list(evaluation.stats[:3])


def test_detection_map_is_cocoeval():
    m = metrics.metric("detection_map")
    examples = [
        {"prediction": "", "objects": image["pred"],
         "truth_objects": [{"label": label, "box": list(box)} for label, box in image["truth"]]}
        for image in DETECTION_IMAGES
    ]
    records = json.loads(json.dumps([m.score(ex) for ex in examples]))
    result = m.aggregate(records)
    expected = _cocoeval_stats(DETECTION_IMAGES)
    assert 0 < expected[0] < expected[1] < 1
    assert [result["map"], result["ap50"], result["ap75"]] == pytest.approx(expected, abs=1e-12)
    assert next(iter(result)) == "map" and result["num"] == 4


def test_negative_examples_empty_truths_and_empty_predictions():
    """An example with nothing to find (Roboflow's null images, COCO images without annotations):
    an empty prediction is right, a predicted object is a miss; every object metric scores it and
    aggregates. mAP over no true box at all is undefined: None, shown "n/a"."""
    from palikit.evaluate import markdown, validation_values

    cat = Detection("cat", (0, 0, 5, 5))
    cat.mask = np.ones((8, 8), bool)
    truth = [{"label": "cat", "box": [0, 0, 5, 5], "mask": np.ones((8, 8), bool)}]
    cases = [({"objects": [], "truth_objects": []}, 1.0), ({"objects": [cat], "truth_objects": []}, 0.0)]
    for example, right in cases:
        example |= {"prediction": "<loc0000><loc0000><loc0511><loc0511>" + "<seg000>" * 16 + " cat"
                    if example["objects"] else ""}
        assert metrics.referring_detection(example) == {"box_iou": right, "invalid": False}
        assert metrics.referring_segmentation(example) == {"iou": right, "box_iou": right, "invalid": False}
    m = metrics.metric("referring_detection")
    scored = [m.score(ex) for ex, _ in cases] + [m.score({"objects": [cat], "truth_objects": truth})]
    assert m.aggregate(scored) == pytest.approx({"first_box_acc_50": 2 / 3, "invalid": 0, "total": 3})
    empty = {"boxes": [], "labels": [], "scores": [], "truth_boxes": [], "truth_labels": []}
    fp = empty | {"boxes": [[0, 0, 5, 5]], "labels": ["cat"], "scores": [0.9]}
    hit = empty | {"boxes": [[0, 0, 5, 5]], "labels": ["cat"], "scores": [0.5], "truth_boxes": [[0, 0, 5, 5]],
                   "truth_labels": ["cat"]}
    assert detection_map([empty, empty]) == {"map": None, "ap50": None, "ap75": None, "num": 2}
    assert detection_map([fp])["map"] is None  # no true box: nothing to recall
    assert detection_map([hit, empty])["map"] == pytest.approx(1.0)
    assert detection_map([hit, fp])["map"] < 1.0  # the negative's box is a false positive, ranked first
    row = {"group": "detect", "metric": "detection_map", "examples": 2, "values": detection_map([empty, empty])}
    rep = {"evaluated": "x", "model": "m", "examples": 2, "errors": 0, "results": [row]}
    assert "map n/a" in markdown(rep) and "-100" not in markdown(rep)
    logged = validation_values(rep | {"exact_match": {"all": 0.0}})  # the trainer logs these as numbers
    assert logged == {"num/detect": 2, "exact_match": 0.0}


def test_detection_map_without_detections():
    records = [{"boxes": [], "labels": [], "scores": [], "truth_boxes": [[0, 0, 5, 5]], "truth_labels": ["cat"]}]
    assert detection_map(records)["map"] == 0.0


# ----------------------------------------------------------------------------- the registry


def _answer_examples(*pairs) -> list[dict]:
    return [{"prediction": p, "answers": a} for p, a in pairs]


# (metric, examples, aggregate worked out by hand)
AGGREGATE_CASES = [
    ("exact_match", _answer_examples(("cat", ["cat"]), (" dog", ["dog", "x"]), ("cow", ["pig"]), ("a", [])),
     {"exact_match": 2 / 3, "num": 4}),
    ("vqav2_accuracy", [
        {"prediction": "yes", "answers": ["yes"] * 10, "extra": {"answer_type": "yes/no"}},
        {"prediction": "two", "answers": ["2"] * 3 + ["3"] * 7, "extra": {"answer_type": "number"}},
        {"prediction": "cat", "answers": ["dog"] * 10, "extra": {"answer_type": "other"}},
        {"prediction": "cat", "extra": {"answer_type": "other"}},  # test-dev: no answers
    ], {"accuracy": 1.9 / 3, "accuracy_yesno": 1.0, "num_yesno": 1, "accuracy_number": 0.9, "num_number": 1,
        "accuracy_other": 0.0, "num_other": 1, "num": 4}),
    ("vqa_accuracy", _answer_examples(("cat", ["cat"] * 2 + ["dog"] * 8), ("Cat", ["cat"])),
     {"accuracy": (2 / 3 + 0) / 2, "accuracy_any": 1 / 2, "num": 2}),
    ("vqa_accuracy_lowercase", _answer_examples(("Cat", ["cat"]), ("DOG", ["dog"] * 2 + ["cat"] * 8)),
     {"accuracy": (1 + 2 / 3) / 2, "accuracy_any": 1.0, "num": 2}),
    ("anls", _answer_examples(("helo", ["hello"]), ("ab", ["ax"])), {"anls": 0.8 / 2, "num": 2}),
    ("ocr", _answer_examples(("Hello", ["hello"]), ("world", ["world"])),
     {"exact_match": 1 / 2, "anls": 1.0, "num": 2}),
    ("relaxed_accuracy", _answer_examples(("104", ["100"]), ("45%", ["45"]), ("Yes", ["yes"])),
     {"relaxed_accuracy": 2 / 3, "accuracy": 1 / 3, "num": 3}),
    ("tallyqa_accuracy", [
        {"prediction": "2", "answers": ["2"], "extra": {"issimple": True}},
        {"prediction": "two", "answers": ["2"], "extra": {"issimple": False}},
        {"prediction": "3", "answers": ["2"], "extra": {"issimple": 1}},
        {"prediction": "Zero", "answers": ["0"]},
        {"prediction": "17", "answers": ["17"], "extra": {"issimple": 0}},  # counts above 15 have no entry
    ], {"accuracy": 4 / 5, "num": 5, "accuracy_simple": 1 / 2, "num_simple": 2, "accuracy_complex": 1.0,
        "num_complex": 2, "accuracy_count_0": 1.0, "num_count_0": 1, "accuracy_count_2": 2 / 3, "num_count_2": 3}),
    ("countbench_accuracy", _answer_examples(("seven", ["7"]), ("8", ["7"])),
     {"accuracy": 1 / 2, "num": 2, "accuracy_count_7": 1 / 2, "num_count_7": 2}),
]


@pytest.mark.parametrize("name, examples, expected", AGGREGATE_CASES, ids=[c[0] for c in AGGREGATE_CASES])
def test_metric_records_are_json_and_aggregate(name, examples, expected):
    m = metrics.metric(name)
    records = json.loads(json.dumps([m.score(ex) for ex in examples]))
    result = m.aggregate(records)
    assert result == pytest.approx(expected)
    assert list(result) == list(expected)  # the main number first, big_vision's order after it


def test_cider_metric(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    m = metrics.metric("cider")
    examples = [{"prediction": "a red bus", "answers": ["a red bus", "a bus"]},
                {"prediction": "a cat", "answers": ["a dog on a sofa", "a cat"]}]
    records = json.loads(json.dumps([m.score(ex) for ex in examples]))
    assert m.aggregate(records) == {"cider": cider(["a red bus", "a cat"], [ex["answers"] for ex in examples]),
                                    "num": 2}


def test_registry():
    required = {"exact_match", "vqav2_accuracy", "vqa_accuracy", "anls", "relaxed_accuracy", "cider",
                "segmentation_miou", "referring_detection", "detection_map", "tallyqa_accuracy",
                "countbench_accuracy", "ocr"}
    assert required <= set(metrics.METRICS)
    assert all(name == m.name and m.summary and "\n" not in m.summary for name, m in metrics.METRICS.items())
    with pytest.raises(ValueError, match="unknown metric 'bleu'; known: exact_match, ") as error:
        metrics.metric("bleu")
    assert "\n" not in str(error.value)


# 200 captions: COCO-like, alt-text-like and translated, with punctuation, hyphens, apostrophes, numbers,
# quotes and currency; the last four are the known differences.
CAPTIONS = [
    'A man riding a wave on top of a surfboard.',
    'A black-and-white photo of a train station.',
    'Two dogs playing with a frisbee in the park.',
    "The cat's toy is under the couch.",
    'A woman holding an umbrella in the rain',
    'A group of people standing around a table with food on it.',
    'A close up of a pizza with pepperoni and cheese',
    'an old red truck parked next to a building',
    'A person on skis going down a snowy hill.',
    'A kitchen with stainless steel appliances and granite counter tops.',
    'The bus is driving down the street in the U.S.',
    'A sign that says "STOP" on a street corner.',
    'A plate of food with broccoli, rice, and chicken.',
    'Three giraffes standing next to each other in a field.',
    "A boy doesn't want to eat his vegetables.",
    'A cake that costs $5 at the bakery.',
    'There are 2 cats sleeping on a bed.',
    'A man in a suit and tie talking on a cell phone',
    "An elephant's trunk reaching for some leaves.",
    'A street sign for W. 34th St. in New York.',
    'A bathroom with a toilet, sink, and mirror.',
    'A laptop computer sitting on top of a wooden desk.',
    'People walking down a sidewalk next to tall buildings.',
    'A clock tower with the time 10:30 on it.',
    'A train traveling down tracks next to a forest',
    'A young girl is flying a kite on the beach!',
    'Is this a dog or a cat?',
    'A bowl of fruit: apples, bananas, and oranges.',
    'A baseball player swinging a bat at a ball; the catcher waits.',
    "The players' uniforms are blue and white.",
    "A man's hat is on the table.",
    'A bunch of bananas hanging from a tree...',
    'A motorcycle parked on the side of the road -- near a fence.',
    'A sandwich cut in half on a white plate.',
    'An airplane flying through a clear blue sky.',
    'A zebra grazing on grass in the wild.',
    'Two men playing tennis on a clay court.',
    'A stop sign with graffiti on it.',
    "A dog's nose poking out of a car window.",
    'A vase (filled with flowers) sitting on a table.',
    'A 3-year-old boy holding a teddy bear.',
    "A pizza that's been cut into 8 slices.",
    'Cars stopped at a red light in the city.',
    "A woman who's wearing a pink dress.",
    'A skateboarder doing a trick on a half-pipe.',
    "It's a sunny day at the beach.",
    'A horse-drawn carriage on a cobblestone street.',
    'A fire hydrant painted red, white & blue.',
    'A cat sitting in front of a T.V.',
    'A man and a woman cutting a wedding cake',
    "Some people are skiing down a mountain, others aren't.",
    "I can't see what's in the box.",
    'A couple of sheep grazing on a green hillside.',
    "A teddy bear sitting on a chair; it's brown.",
    'A large clock on the side of a building.',
    'The desk has a keyboard, a mouse, and 2 monitors.',
    'A 1,000-piece puzzle on a table.',
    'A bird perched on a branch of a tree.',
    'A man is holding a Wii controller.',
    'A cow standing in a field of tall grass.',
    'A red double-decker bus in London.',
    "A kid's bedroom with toys everywhere.",
    "A woman's purse on the floor.",
    '"Welcome" written on a door mat.',
    'A glass of wine next to a plate of cheese.',
    'The U.S. flag flying over a government building.',
    'A refrigerator with magnets on the door.',
    'A boat docked at a pier on a lake.',
    'A herd of elephants walking across a dry field.',
    "A little boy who won't stop crying.",
    'A computer monitor showing a 50% discount ad.',
    'A girl eating a hot dog at a baseball game.',
    'A bear standing on its hind legs.',
    'An orange cat laying on top of a blue blanket.',
    'A living room with a couch, TV, and coffee table.',
    'A person riding a bike down a dirt path.',
    'Several people flying kites in an open field.',
    'A toilet with its lid up in a small bathroom.',
    "The sign reads 'Do not enter'.",
    'A traffic light that is red.',
    'A dog catching a frisbee in mid-air.',
    'A donut with pink frosting and sprinkles.',
    'A man doing a kick-flip on his skateboard.',
    'A hot-air balloon floating over the city.',
    'A yellow school bus parked in a lot.',
    'A table set for 4 people with plates and glasses.',
    "Two women laughing while they're cooking.",
    "A living room that's decorated for Christmas.",
    'A police officer on a motorcycle.',
    'A man holding a sign that says "will work for food".',
    'The sandwich is $4.99 at the deli.',
    'A photo taken in the 1950s of a car.',
    'An old-fashioned phone on a desk.',
    "A woman's hand holding a smartphone.",
    'A child is brushing his teeth with a toothbrush.',
    'A bowl of soup with a spoon in it.',
    "The cat is sitting on the laptop's keyboard.",
    'A group of friends posing for a picture.',
    'A big brown dog lying on the grass.',
    'A pair of scissors next to some paper.',
    'A man surfing on a big wave!!!',
    'What a cute puppy!',
    'A sheep, a goat, and a cow in a pen.',
    'A half-eaten sandwich on a plate.',
    'An empty street at night, lit by street lamps.',
    'A city skyline with a tall tower in the middle.',
    'Three kids sitting on a bench eating ice cream.',
    'A living room with hardwood floors and a fireplace.',
    'A man wearing a hat and sunglasses.',
    "There's a cat on the roof.",
    "We're looking at a herd of cows.",
    "They've parked the car in the garage.",
    "You'll see a dog near the door.",
    "I'm standing next to a bicycle.",
    "He'd like to eat the pizza.",
    "A bike that's leaning against a wall.",
    'A plate with eggs, bacon and toast -- a full breakfast.',
    'A person holding a tennis racket (ready to serve).',
    'A pile of oranges at a market stall.',
    'An old man sitting on a park bench.',
    'A woman carrying a surf board into the ocean.',
    'The 2nd floor of a building with a balcony.',
    'A bathroom sink with a mirror above it.',
    'A bunch of people on a beach with umbrellas.',
    'A baby elephant walking next to its mother.',
    'A room with a bed, a desk and a lamp.',
    'A train on the tracks at 5:30 p.m.',
    'A sign that reads "No parking"; a car is parked anyway.',
    'A man hitting a tennis ball with a racquet.',
    'A cat looking at itself in the mirror.',
    'A plate with a slice of cake and a fork.',
    'A small dog wearing a sweater.',
    'A woman sitting on a bench reading a book.',
    'A store selling T-shirts and hats.',
    'An x-ray of a human hand.',
    'A bottle of beer next to a glass.',
    "A picture of a man's face with a beard.",
    'A giraffe eating leaves from a tall tree.',
    'A man standing on a surfboard in the ocean',
    'A park with trees, benches and a fountain.',
    'A kitchen counter covered in dirty dishes.',
    'A herd of zebras running across a field.',
    "Mr. Smith's dog is sitting on the porch.",
    'Dr. Brown is holding a stethoscope.',
    'A woman in a red coat walking her dog.',
    'A picture of the U.K. flag on a pole.',
    'A boy and a girl playing in the sand.',
    "A plane that's about to land on a runway.",
    'A cup of coffee (with milk) on a saucer.',
    'A tennis player waiting for the ball... ',
    'A bunch of donuts in a box.',
    'A man on a horse in a rodeo.',
    "Someone's shoes on the floor by the door.",
    'A group of cows standing in a barn.',
    'A room with a big-screen TV on the wall.',
    'A 12-inch pizza with mushrooms.',
    "Un chat noir assis sur une chaise, à côté d'une fenêtre.",
    'Ein Hund läuft über die Straße (bei Nacht).',
    'Una mujer con un paraguas rojo; está lloviendo.',
    '一只猫坐在桌子上。',
    'テーブルの上に猫がいます。',
    'Кошка сидит на столе, рядом с собакой.',
    'Stock photo: Young businessman with laptop, smiling at camera',
    'Close-up of hands typing on a keyboard | Office work',
    'Vintage 1960s Ford Mustang, red, parked outside — classic car show',
    'iPhone 12 Pro Max (128GB) - Pacific Blue',
    "Men's running shoes, size 10.5 US",
    '"The Great Gatsby" by F. Scott Fitzgerald (paperback)',
    "Aerial view of New York City's skyline at dusk",
    '5 ways to cook pasta: a step-by-step guide',
    'Dog wearing a Santa hat :)',
    'Happy 4th of July! 🇺🇸 Fireworks over the lake',
    'A cat... or is it a fox?!',
    "COVID-19 testing site at St. Mary's Hospital",
    '100% cotton T-shirt, $19.99',
    'Photo by John Doe / Getty Images',
    'Sunset over the Pacific Ocean, Calif., U.S.A.',
    'A man (left) and a woman (right) shake hands.',
    'Infographic: "How to save energy" – 10 tips',
    'Mt. Everest base camp, Nepal, 5,364 m',
    "Children's books on a shelf: ages 3-5",
    "A chef's knife & cutting board w/ vegetables",
    "Lake Tahoe's crystal-clear water in summer",
    'Picture of a dog, who is 2 yrs. old',
    "NASA's Mars rover Perseverance on Feb. 18, 2021",
    'The Eiffel Tower at night; Paris, France',
    "A boy's 10th birthday party (with cake & balloons)",
    "Black & white photo of a 1920's flapper girl",
    'Fig. 3: results of the experiment',
    'An e-bike parked outside a coffee shop',
    "Bob's Burgers, Inc. storefront",
    'Dr. Martin Luther King Jr. giving a speech',
    'Jan. 1st fireworks at 12:00 a.m.',
    "He's gonna catch the ball, isn't he?",
    "The dog ran 'round the yard",
    'a 50-50 chance of rain',
    *KNOWN_PTB_DIFFERENCES,
]


def test_every_metric_declares_the_values_it_reports():
    """Metric.values (what a trainer's keep_best is checked against at start) holds every name its
    aggregate reports, on examples that make each metric report its most names."""
    box = [0.0, 0.0, 5.0, 5.0]
    obj = Detection("cat", tuple(box))
    obj.mask = np.ones((8, 8), bool)
    truth = [{"label": "cat", "box": box, "mask": np.ones((8, 8), bool)}]
    examples = [{"prediction": p, "answers": a, "objects": [obj], "truth_objects": truth, "width": 8, "height": 8,
                 "extra": {"answer_type": t, "issimple": s}}
                for p, a, t, s in [("2", ["2"], "number", 1), ("yes", ["yes"], "yes/no", 0),
                                   ("a cat", ["a cat"], "other", 1)]]
    for name, m in metrics.METRICS.items():
        reported = m.aggregate([m.score(ex | ({"answers": ex["answers"] * 10} if name == "vqav2_accuracy" else {}))
                                for ex in examples])
        assert reported and set(reported) <= set(m.values), (name, set(reported) - set(m.values))
