"""Tests for palikit.tasks: prompts, <loc>/<seg> encoding and parsing, RLE, drawing."""

import json
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from palikit.tasks import (
    LANGUAGES,
    Detection,
    Segmentation,
    ask_prompt,
    boxes_to_loc,
    caption_prompt,
    detect_prompt,
    detection_suffix,
    detections_to_arrays,
    ocr_prompt,
    parse_detections,
    parse_segmentations,
    Results,
    parse_task,
    question_prompt,
    segment_prompt,
    segmentation_suffix,
)
from palikit.overlay import draw
from palikit.rle import rle_decode, rle_encode


def loc(*values: int) -> str:
    return "".join(f"<loc{v:04d}>" for v in values)


def seg(*values: int) -> str:
    return "".join(f"<seg{v:03d}>" for v in values)


# ----------------------------------------------------------------------------- prompts


def test_prompt_builders():
    assert len(LANGUAGES) == 35
    assert caption_prompt() == "caption en"
    assert caption_prompt("fr", style="describe") == "describe fr"
    assert caption_prompt("zh", "cap") == "cap zh"
    assert ask_prompt("what is on the table?") == "answer en what is on the table?"
    assert ask_prompt("  ¿qué es?  ", lang="es") == "answer es ¿qué es?"
    assert question_prompt("two cats", "de") == "question de two cats"
    assert ocr_prompt() == "ocr"
    assert detect_prompt("cat") == "detect cat"
    labels = ["cat", "10 o'clock", "café, 2nd shelf"]
    assert detect_prompt(labels) == "detect cat ; 10 o'clock ; café, 2nd shelf"
    assert segment_prompt("left dog") == "segment left dog"
    assert segment_prompt(["a", "b"]) == "segment a ; b"
    # One string of labels as the prompt and the web demo write them: the same prompt.
    assert detect_prompt("cat ; dog") == detect_prompt(["cat", "dog"]) == "detect cat ; dog"
    assert segment_prompt("a;b") == "segment a ; b"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: caption_prompt("xx"), "'xx'"),
        (lambda: caption_prompt(style="long"), "'long'"),
        (lambda: ask_prompt("why?", lang="english"), "'english'"),
        (lambda: ask_prompt("why?\n"), "newline"),
        (lambda: ask_prompt("   "), "empty"),
        (lambda: question_prompt("", "en"), "empty"),
        (lambda: detect_prompt(["cat\n"]), "newline"),
        (lambda: detect_prompt(["cat ; dog"]), "';'"),
        (lambda: detect_prompt("cat ; "), "empty"),
        (lambda: detect_prompt([]), "at least one label"),
        (lambda: segment_prompt(""), "empty"),
    ],
)
def test_prompt_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
    with pytest.raises(TypeError, match="labels must be a string or a list"):
        detect_prompt(5)


def test_prompt_errors_list_the_valid_choices():
    with pytest.raises(ValueError, match="en, es"):
        caption_prompt("xx")
    with pytest.raises(ValueError, match="cap, caption, describe"):
        caption_prompt(style="long")


def test_parse_task():
    assert parse_task(caption_prompt()) == "caption"
    assert parse_task(caption_prompt(style="cap")) == "caption"
    assert parse_task(caption_prompt(style="describe")) == "caption"
    assert parse_task(ask_prompt("why?")) == "answer"
    assert parse_task(question_prompt("yes")) == "question"
    assert parse_task(ocr_prompt()) == "ocr"
    assert parse_task(detect_prompt(["a", "b"])) == "detect"
    assert parse_task(segment_prompt("a")) == "segment"
    assert parse_task("caption <loc0001><loc0002><loc0003><loc0004>") == "caption"
    with pytest.raises(ValueError, match="'what'.*detect"):
        parse_task("what is this?")
    with pytest.raises(ValueError, match="unknown task prefix"):
        parse_task("")


# ----------------------------------------------------------------------------- box encoding


def test_boxes_to_loc_known_values():
    # Box x 10..60, y 40..80 in a 100 x 200 image: normalised y1=0.2, x1=0.1, y2=0.4, x2=0.6;
    # times 1023: 204.6, 102.3, 409.2, 613.8, rounded 205, 102, 409, 614.
    expected = [loc(205, 102, 409, 614)]
    assert boxes_to_loc([[10, 40, 60, 80]], 100, 200) == expected
    assert boxes_to_loc([[10, 40, 50, 40]], 100, 200, fmt="coco") == expected
    assert boxes_to_loc(np.array([[0.1, 0.2, 0.6, 0.4]]), 100, 200, fmt="xyxy_norm") == expected
    # Edges land on <loc1023>, never <loc1024>; boxes past the image are clamped.
    assert boxes_to_loc([[0, 0, 100, 200], [-5, -5, 300, 300]], 100, 200) == [loc(0, 0, 1023, 1023)] * 2
    assert boxes_to_loc([], 100, 200) == []


@pytest.mark.parametrize(
    "boxes, kwargs, message",
    [
        ([[10, 10, 5, 20]], {}, "x2 < x1"),
        ([[0, 0, -1, 5]], {"fmt": "coco"}, "x2 < x1"),
        ([[1, 2, 3]], {}, r"shape \[N, 4\]"),
        ([[0, 0, float("nan"), 1]], {}, "NaN"),
        ([[0, 0, 1, 1]], {"fmt": "xywh"}, "'xywh'"),
        ([[0, 0, 1, 1]], {"width": 0}, "positive"),
    ],
)
def test_boxes_to_loc_errors(boxes, kwargs, message):
    args = {"width": 100, "height": 100, **kwargs}
    with pytest.raises(ValueError, match=message):
        boxes_to_loc(boxes, **args)


def test_suffixes():
    suffix = detection_suffix([[10, 40, 60, 80], [0, 0, 100, 200]], ["cat", "t-shirt (red)"], 100, 200)
    assert suffix == f"{loc(205, 102, 409, 614)} cat ; {loc(0, 0, 1023, 1023)} t-shirt (red)"
    assert detection_suffix([], [], 100, 200) == ""
    codes = list(range(0, 128, 8))
    tokens = loc(1, 2, 3, 4) + seg(*codes)
    assert segmentation_suffix(loc(1, 2, 3, 4), codes, "dog") == tokens + " dog"
    assert segmentation_suffix(loc(1, 2, 3, 4), np.array(codes), "") == tokens  # refcoco style
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        detection_suffix([[0, 0, 1, 1]] * 2, ["a"], 10, 10)
    with pytest.raises(ValueError, match="';'"):
        detection_suffix([[0, 0, 1, 1]], ["a;b"], 10, 10)
    with pytest.raises(ValueError, match="16 ints"):
        segmentation_suffix(loc(1, 2, 3, 4), codes[:15], "dog")
    with pytest.raises(ValueError, match="16 ints"):
        segmentation_suffix(loc(1, 2, 3, 4), codes[:15] + [128], "dog")
    with pytest.raises(ValueError, match="4 <locNNNN>"):
        segmentation_suffix(loc(1, 2, 3), codes, "dog")
    with pytest.raises(ValueError, match="4 <locNNNN>"):
        segmentation_suffix(loc(1, 2, 3, 1024), codes, "dog")


# Normalised boxes at least 1.5 bins wide and high, so their tokens survive as a valid box.
@st.composite
def norm_boxes(draw_):
    x1, x2, y1, y2 = (draw_(st.floats(0, 1)) for _ in range(4))
    x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
    assume(x2 - x1 > 1.5 / 1023 and y2 - y1 > 1.5 / 1023)
    return x1, y1, x2, y2


@given(
    boxes=st.lists(norm_boxes(), min_size=1, max_size=5),
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    fmt=st.sampled_from(["xyxy", "xyxy_norm", "coco"]),
)
def test_box_round_trip_within_one_bin(boxes, width, height, fmt):
    pixels = np.array(boxes) * [width, height, width, height]
    given_boxes = {
        "xyxy": pixels,
        "xyxy_norm": np.array(boxes),
        "coco": np.concatenate([pixels[:, :2], pixels[:, 2:] - pixels[:, :2]], axis=1),
    }[fmt]
    text = detection_suffix(given_boxes, ["obj"] * len(boxes), width, height, fmt=fmt)
    parsed = parse_detections(text, width, height)
    assert parsed.skipped == 0 and len(parsed) == len(boxes)
    tolerance = np.array([width, height, width, height]) / 1023 + 1
    for det, expected in zip(parsed, pixels):
        assert det.label == "obj"
        assert (np.abs(np.array(det.box) - expected) <= tolerance).all()


# ----------------------------------------------------------------------------- parsing


def test_parse_well_formed_detections_keeps_whole_labels():
    labels = ["café, 2nd shelf", "10 o'clock", "9.5mm bolt", "t-shirt (red)", "猫 <3", "a"]
    text = " ; ".join(f"{loc(0, 10 * i, 1023, 10 * i + 5)} {label}" for i, label in enumerate(labels))
    parsed = parse_detections(text, 1023, 2046)
    assert parsed.skipped == 0
    assert [d.label for d in parsed] == labels
    assert [d.box for d in parsed] == [(10.0 * i, 0.0, 10.0 * i + 5, 2046.0) for i in range(len(labels))]
    assert all(d.logprob is None and d.confidence is None for d in parsed)
    # HF integration-test output for "detect shoe" on a 224 model.
    (shoe,) = parse_detections("<loc0051><loc0309><loc0708><loc0646> shoe", 640, 480)
    assert shoe.label == "shoe"
    assert shoe.box == pytest.approx((309 / 1023 * 640, 51 / 1023 * 480, 646 / 1023 * 640, 708 / 1023 * 480))


@pytest.mark.parametrize(
    "text, labels, skipped",
    [
        ("", [], 0),
        ("   ", [], 0),
        ("no objects here", [], 1),
        (loc(1, 2, 3) + " cat", [], 1),  # 3 locs
        (loc(1, 2, 3, 4, 5) + " cat", [], 1),  # 5 locs
        (loc(5, 2, 5, 4) + " cat ; " + loc(1, 9, 3, 4) + " dog", [], 2),  # y2 <= y1, x2 <= x1
        (loc(1, 2, 1024, 4) + " cat", [], 1),  # out of range
        (loc(1, 2, 3, 4), [""], 0),  # no label: kept with ""
        (loc(1, 2, 3, 4) + " cat ; " + "<loc00", ["cat"], 1),  # truncated
        (loc(1, 2, 3, 4) + " cat <loc00", ["cat"], 1),  # truncated without separator
        (loc(1, 2, 3, 4) + " cat" + loc(1, 2, 3, 4) + "dog", ["cat", "dog"], 0),  # no separator
        (loc(1, 2, 3, 4) + " cat ;; ; " + loc(1, 2, 3, 4) + " dog ;", ["cat", "dog"], 0),
        ("detect cat\n" + loc(1, 2, 3, 4) + " cat", ["cat"], 1),  # echoed prompt is not an object
        (loc(1, 2, 3, 4) + seg(*range(16)) + " cat", ["cat"], 0),  # segmentation output: its box
        (loc(1, 2, 3, 4) + seg(*range(15)) + " cat", [], 1),
        (loc(1, 2, 3, 4) + " cat" + seg(1), ["cat"], 1),  # a stray seg token
    ],
)
def test_parse_detections_tolerates_malformed_output(text, labels, skipped):
    parsed = parse_detections(text, 100, 100)
    assert [d.label for d in parsed] == labels
    assert parsed.skipped == skipped


def test_parse_segmentations():
    codes = [3 * i for i in range(16)]
    # Whitespace between tokens is tolerated.
    one = loc(100, 200, 300, 400) + " " + " ".join(seg(c) for c in codes) + " left dog"
    text = f"{one} ; {loc(1, 2, 3, 4)}{seg(*codes)} ; {loc(1, 2, 3, 4)}{seg(*codes[:15])} cat"
    parsed = parse_segmentations(text, 1023, 1023)
    assert parsed.skipped == 1  # 15 seg tokens
    assert [s.label for s in parsed] == ["left dog", ""]
    assert parsed[0].codes == codes and parsed[0].mask is None
    assert parsed[0].box == (200.0, 100.0, 400.0, 300.0)
    # Detection output has no seg tokens: not a segmentation.
    assert parse_segmentations(loc(1, 2, 3, 4) + " cat", 10, 10).skipped == 1
    assert parse_segmentations(loc(1, 2, 3, 4) + seg(*codes[:15], 128) + " cat", 10, 10).skipped == 1


def test_scores_are_mean_logprob_of_each_objects_tokens():
    pieces = [*loc(100, 200, 300, 400).replace(">", ">|").split("|")[:4], " c", "at", " ;", " "]
    pieces += [*loc(500, 600, 700, 800).replace(">", ">|").split("|")[:4], " dog"]
    logprobs = [-0.1, -0.2, -0.3, -0.4, -1.0, -2.0, -5.0, -6.0, -0.5, -0.5, -0.5, -0.5, -3.0]
    text = "".join(pieces)
    assert text == f"{loc(100, 200, 300, 400)} cat ; {loc(500, 600, 700, 800)} dog"
    cat, dog = parse_detections(text, 10, 10, pieces=pieces, logprobs=logprobs)
    # The separator pieces " ;" and " " belong to neither object.
    assert cat.logprob == pytest.approx((-0.1 - 0.2 - 0.3 - 0.4 - 1.0 - 2.0) / 6)
    assert dog.logprob == pytest.approx((-0.5 * 4 - 3.0) / 5)
    # Segmentation scores cover the seg tokens too.
    seg_pieces = [loc(1, 2, 3, 4), seg(*range(16)), " x"]
    (only,) = parse_segmentations("".join(seg_pieces), 10, 10, seg_pieces, [-1.0, -2.0, -6.0])
    assert only.logprob == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="concatenate"):
        parse_detections(text + "!", 10, 10, pieces=pieces, logprobs=logprobs)
    with pytest.raises(ValueError, match="together"):
        parse_detections(text, 10, 10, pieces=pieces)


LABELS = st.text(st.characters(exclude_characters=";<\r\n", exclude_categories=["Cs"]), max_size=20)


@st.composite
def objects(draw_, with_masks):
    y1, y2 = sorted(draw_(st.lists(st.integers(0, 1023), min_size=2, max_size=2, unique=True)))
    x1, x2 = sorted(draw_(st.lists(st.integers(0, 1023), min_size=2, max_size=2, unique=True)))
    codes = draw_(st.lists(st.integers(0, 127), min_size=16, max_size=16)) if with_masks else []
    return (y1, x1, y2, x2), codes, draw_(LABELS)


TOKENS_AND_TEXT = st.one_of(
    objects(with_masks=False).map(lambda o: f"{loc(*o[0])} {o[2]}"),
    objects(with_masks=True).map(lambda o: f"{loc(*o[0])}{seg(*o[1])} {o[2]}"),
    st.integers(0, 9999).map(lambda v: f"<loc{v:04d}>"),
    st.integers(0, 999).map(lambda v: f"<seg{v:03d}>"),
    st.integers(0, 1023).map(lambda v: f"<loc{v:04d}>"),
    st.text(max_size=6),
    st.sampled_from([" ", " ; ", ";", "\n", "<loc", "<seg", "<loc12>", "<eos>", "٠١٢٣", "label"]),
)


def check_invariants(parsed, width, height):
    assert parsed.skipped >= 0
    for obj in parsed:
        x1, y1, x2, y2 = obj.box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert obj.label == obj.label.strip() and ";" not in obj.label
        assert obj.logprob is None or math.isfinite(obj.logprob)
    json.dumps(parsed.to_dict())


@settings(deadline=None)
@given(text=st.text(), width=st.integers(1, 4000), height=st.integers(1, 4000))
def test_parser_never_raises_on_arbitrary_text(text, width, height):
    check_invariants(parse_detections(text, width, height), width, height)
    check_invariants(parse_segmentations(text, width, height), width, height)


@settings(deadline=None)
@given(parts=st.lists(TOKENS_AND_TEXT, max_size=60), data=st.data())
def test_parser_never_raises_on_token_soup(parts, data):
    text = "".join(parts)
    text = text[: data.draw(st.integers(0, len(text)), label="truncate at")]
    # Split the text into pieces at random places, each with a random log-prob.
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=20), label="cuts"))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    logprobs = data.draw(st.lists(st.floats(-20, 0), min_size=len(pieces), max_size=len(pieces)))
    for parse in (parse_detections, parse_segmentations):
        check_invariants(parse(text, 640, 480), 640, 480)
        check_invariants(parse(text, 640, 480, pieces=pieces, logprobs=logprobs), 640, 480)


@given(objs=st.lists(objects(with_masks=False), max_size=6), width=st.integers(1, 3000))
def test_well_formed_detections_parse_exactly(objs, width):
    text = " ; ".join(f"{loc(*ys_xs)} {label}" for ys_xs, _, label in objs)
    parsed = parse_detections(text, width, 1023)
    assert parsed.skipped == 0
    assert [d.label for d in parsed] == [label.strip() for _, _, label in objs]
    for det, ((y1, x1, y2, x2), _, _) in zip(parsed, objs):
        assert det.box == pytest.approx((x1 / 1023 * width, y1, x2 / 1023 * width, y2))


@given(objs=st.lists(objects(with_masks=True), max_size=4))
def test_well_formed_segmentations_parse_exactly(objs):
    text = " ; ".join(f"{loc(*ys_xs)}{seg(*codes)} {label}" for ys_xs, codes, label in objs)
    parsed = parse_segmentations(text, 1023, 1023)
    assert parsed.skipped == 0
    assert [(s.label, s.codes) for s in parsed] == [(label.strip(), codes) for _, codes, label in objs]


# ----------------------------------------------------------------------------- results and RLE


# Expected strings follow by hand from the COCO algorithm (pycocotools maskApi.c rleToString):
# counts are runs in column-major order starting with zeros; each count (from the 4th on, minus
# the count two before) is cut into 5-bit chunks, low first; each chunk becomes chr(48 + chunk),
# plus 32 if more chunks follow; encoding stops when the rest is the sign extension of bit 4.
@pytest.mark.parametrize(
    "mask, counts, string",
    [
        # 4 zeros: [4] -> chr(48 + 4).
        ([[0, 0], [0, 0]], [4], "4"),
        # Columns (0,1), (1,1): 0,1,1,1 -> [1, 3].
        ([[0, 1], [1, 1]], [1, 3], "13"),
        # Starts with a one: an empty zero run first.
        ([[1, 1, 1], [1, 1, 1]], [0, 6], "06"),
        # Column-major: (1,0),(0,0) -> [0, 1, 3]; (0,0),(1,0) -> [2, 1, 1] (row-major would be [1, 1, 2]).
        ([[1, 0], [0, 0]], [0, 1, 3], "013"),
        ([[0, 1], [0, 0]], [2, 1, 1], "211"),
        # [1, 1, 5, 1, 1]: 4th count 1 - 1 = 0 -> "0"; 5th 1 - 5 = -4: chunk -4 & 31 = 28, and
        # -4 >> 5 = -1 is the sign extension of bit 4 of 28, so one char: chr(48 + 28) = "L".
        ([[0, 1, 0, 0, 0, 0, 0, 1, 0]], [1, 1, 5, 1, 1], "1150L"),
        # [40]: 40 = 0b01000_01000 -> chunk 8 with "more" -> chr(48 + 8 + 32) = "X", then chr(48 + 1).
        ([[0] * 40], [40], "X1"),
    ],
)
def test_rle_known_cases(mask, counts, string):
    mask = np.array(mask, dtype=bool)
    assert rle_encode(mask) == {"size": list(mask.shape), "counts": string}
    assert (rle_decode({"size": list(mask.shape), "counts": string}) == mask).all()
    assert (rle_decode({"size": list(mask.shape), "counts": counts}) == mask).all()
    assert (rle_decode({"size": list(mask.shape), "counts": string.encode()}) == mask).all()


@given(hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=40)))
def test_rle_round_trip_random_masks(mask):
    rle = rle_encode(mask)
    assert rle["size"] == list(mask.shape) and rle["counts"].isascii()
    decoded = rle_decode(json.loads(json.dumps(rle)))
    assert decoded.dtype == bool and decoded.shape == mask.shape and (decoded == mask).all()


@given(runs=st.lists(st.integers(1, 5000), min_size=1, max_size=12), first=st.booleans())
def test_rle_round_trip_long_runs(runs, first):
    # Long runs exercise multi-chunk counts and negative deltas.
    flat = np.concatenate([np.full(n, (i % 2 == 0) == first) for i, n in enumerate(runs)])
    mask = flat.reshape(-1, 1) if len(flat) % 3 else flat.reshape(3, -1, order="F")
    assert (rle_decode(rle_encode(mask)) == mask).all()


def test_rle_rejects_bad_input():
    with pytest.raises(ValueError, match="cover"):
        rle_decode({"size": [2, 2], "counts": "3"})
    with pytest.raises(ValueError, match="invalid character"):
        rle_decode({"size": [2, 2], "counts": " "})
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros(4, bool))


def test_results_to_dict_and_arrays():
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    det = Detection("cat", (1.0, 2.0, 3.0, 4.0), logprob=math.log(0.5))
    sgm = Segmentation("dog", (2.0, 1.0, 5.0, 3.0), mask=mask, logprob=None, codes=list(range(16)))
    for result in (det, sgm):
        json.dumps(result.to_dict())
    assert det.to_dict() == {"label": "cat", "box": [1.0, 2.0, 3.0, 4.0], "confidence": pytest.approx(0.5),
                            "logprob": math.log(0.5)}
    assert (rle_decode(sgm.to_dict()["mask"]) == mask).all()

    arrays = detections_to_arrays([det, sgm])
    assert arrays["xyxy"].dtype == np.float32 and arrays["xyxy"].shape == (2, 4)
    assert arrays["confidence"] == pytest.approx([0.5, 1.0])
    assert list(arrays["class_name"]) == ["cat", "dog"]
    assert arrays["mask"].shape == (2, 4, 6)
    assert not arrays["mask"][0].any() and (arrays["mask"][1] == mask).all()
    assert detections_to_arrays([det])["mask"] is None
    empty = detections_to_arrays([])
    assert empty["xyxy"].shape == (0, 4) and len(empty["confidence"]) == len(empty["class_name"]) == 0


def test_results_go_to_supervision_and_its_annotators():
    """Results.to_supervision gives what supervision's own connectors give (class_id, confidence,
    mask, data["class_name"]), so BoxAnnotator, MaskAnnotator and LabelAnnotator draw it as is.
    Catches arrays without class_id ("Detections do not have class_id") or ids not per label."""
    import supervision as sv

    scene = np.full((48, 64, 3), 128, np.uint8)
    mask = np.zeros((48, 64), bool)
    mask[25:45, 35:60] = True
    results = Results([Detection("cat", (2.0, 3.0, 30.0, 20.0), logprob=math.log(0.8)),
                       Segmentation("dog", (35.0, 25.0, 60.0, 45.0), mask=mask, logprob=math.log(0.5)),
                       Detection("cat", (5.0, 25.0, 20.0, 40.0))])
    d = results.to_supervision(classes=["dog", "cat"])
    assert isinstance(d, sv.Detections) and len(d) == 3
    assert list(d.class_id) == [1, 0, 1] and list(d.data["class_name"]) == ["cat", "dog", "cat"]
    assert d.confidence == pytest.approx([0.8, 0.5, 1.0]) and d.xyxy[1].tolist() == [35, 25, 60, 45]
    assert d.mask.shape == (3, 48, 64) and (d.mask[1] == mask).all() and not d.mask[0].any()
    assert list(results.to_supervision().class_id) == [0, 1, 0]  # without classes: order of appearance
    boxed = sv.BoxAnnotator().annotate(scene.copy(), d)
    assert (boxed[3, 2:30] != 128).any() and (boxed[46, 2] == 128).all()
    masked = sv.MaskAnnotator().annotate(scene.copy(), d)
    assert (masked[30, 40] != 128).any() and (masked[10, 45] == 128).all()
    labelled = sv.LabelAnnotator().annotate(scene.copy(), d)
    assert (labelled != scene).any()


# ----------------------------------------------------------------------------- drawing


def test_draw():
    image = Image.new("RGB", (64, 48), (128, 128, 128))
    mask = np.zeros((48, 64), bool)
    mask[30:44, 45:60] = True
    results = [
        Detection("café, 2nd shelf", (10.0, 20.0, 40.0, 30.0), logprob=-0.1),
        Segmentation("dog", (44.0, 29.0, 61.0, 45.0), mask=mask),
    ]
    out = draw(image, results)
    assert out.size == image.size and out.mode == "RGB"
    assert image.getpixel((10, 25)) == (128, 128, 128)  # the input is untouched
    assert out.getpixel((10, 25)) != (128, 128, 128)  # left edge of the box
    assert out.getpixel((52, 37)) != (128, 128, 128)  # inside the mask
    assert out.getpixel((2, 46)) == (128, 128, 128)  # far from everything
    # Colours are stable per label, not per position: "cat" after another label is drawn as alone.
    cat = Detection("cat", (10.0, 10.0, 30.0, 30.0))
    other = Detection("dog", (40.0, 5.0, 60.0, 20.0))
    alone, second = np.asarray(draw(image, [cat])), np.asarray(draw(image, [other, cat]))
    assert np.array_equal(alone[8:33, 8:33], second[8:33, 8:33])
    owl = np.asarray(draw(image, [Detection("owl", cat.box)]))
    assert not np.array_equal(second[8:33, 8:33], owl[8:33, 8:33])  # another label, another colour
    with pytest.raises(ValueError, match="does not match"):
        draw(image, [Segmentation("x", (0.0, 0.0, 1.0, 1.0), mask=np.zeros((4, 4), bool))])


def test_draw_colours_each_object_in_its_labels_family():
    """Each object its own colour; shades of one hue for one label, another hue for another label; the
    colours of palikit.overlay.colours, which the web demo computes too (tests/test_web_demo.py)."""
    import colorsys

    image = Image.new("RGB", (96, 64), (128, 128, 128))
    labels = ["cat", "dog", "cat", "cat"]
    boxes = [(5, 20, 20, 40), (25, 20, 40, 40), (45, 20, 60, 40), (65, 20, 80, 40)]
    out = draw(image, [Detection(label, box) for label, box in zip(labels, boxes)])
    drawn = [out.getpixel((x1, 30)) for x1, *_ in boxes]  # each box's left side
    assert len(set(drawn)) == 4
    hue = [colorsys.rgb_to_hls(*(v / 255 for v in c))[0] * 360 for c in drawn]
    assert max(hue[i] for i in (0, 2, 3)) - min(hue[i] for i in (0, 2, 3)) < 2 and abs(hue[1] - hue[0]) > 20
    from palikit.overlay import colours

    assert drawn == colours(labels)


def test_draw_shows_a_mask_on_a_shape_of_its_own_colour():
    """A mask over a region of exactly its colour is still seen (its stripes), where a tint alone would
    leave the region as it was."""
    mask = np.zeros((64, 64), bool)
    mask[20:50, 10:54] = True
    seg = Segmentation("ball", (10.0, 20.0, 54.0, 50.0), mask=mask)
    colour = draw(Image.new("RGB", (64, 64), (128, 128, 128)), [seg]).getpixel((10, 35))  # its left side
    same = Image.new("RGB", (64, 64), colour)
    inside = np.asarray(draw(same, [seg])).astype(int)[23:47, 13:51]  # clear of the outline
    assert (np.abs(inside - colour).max(-1) > 40).mean() > 0.1


def test_draw_keeps_labels_inside_the_image_and_off_the_object():
    """At 96 px, a label is moved inside the image and off its object: below a box at the top edge, left
    of the right edge for a box there (whole, not cut off); over the top of a box filling the image."""
    from PIL import ImageDraw

    grey = (128, 128, 128)
    image = Image.new("RGB", (96, 96), grey)
    pen = ImageDraw.Draw(image)

    def label_size(caption):
        left, top, right, bottom = pen.textbbox((0, 0), caption)
        return right - left + 2, bottom - top + 2

    top = Detection("circle", (2.0, 0.0, 30.0, 40.0), logprob=-0.1)
    out = np.asarray(draw(image, [top]))
    colour = out[20, 2]  # the box's left side
    w, h = label_size("circle 0.90")
    assert (out[41:41 + h, 2:2 + w] == colour).all(-1).mean() > 0.5  # below the box...
    assert (out[3:38, 5:28] == grey).all()  # ...and not over it

    right = Detection("long label", (70.0, 50.0, 95.0, 80.0), logprob=-0.1)
    out = np.asarray(draw(image, [right]))
    colour = out[60, 70]
    w, h = label_size("long label 0.90")
    row = (out[50 - h:50] == colour).all(-1).any(0)  # the columns of the label, above the box
    assert row.sum() == w and row[-1]  # whole, and as far right as the image goes

    full = Detection("square", (0.0, 0.0, 95.0, 95.0), logprob=-0.1)
    out = np.asarray(draw(image, [full]))
    w, h = label_size("square 0.90")
    assert (out[2:h - 1, 3:w - 1] != grey).any(-1).all() and h < 48  # inside its top, clear of the middle
    assert (out[h + 2:93, 3:93] == grey).all()


def test_draw_takes_a_path_like_every_api_call(tmp_path):
    """palikit.draw("photo.png", results) draws on the file's image, as on the image itself."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "photo.png")
    results = [Detection("cat", (5.0, 5.0, 30.0, 25.0), logprob=-0.2)]
    assert np.array_equal(np.asarray(draw(str(tmp_path / "photo.png"), results)), np.asarray(draw(image, results)))
    assert np.array_equal(np.asarray(draw(tmp_path / "photo.png", results)), np.asarray(draw(image, results)))
