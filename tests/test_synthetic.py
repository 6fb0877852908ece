import json
import re

import numpy as np
import pytest
from PIL import Image

from palikit import synthetic as S

N_SCENES = 50


def _scenes(n: int = N_SCENES, seed: int = 0, size: int = 96):
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = S.make_scene(rng, size)
        yield scene, S.scene_examples(scene, rng, encode_mask=_fake_encoder)


def _fake_encoder(mask: np.ndarray, box: S.Box) -> list[int]:
    # Any deterministic function of the crop will do: the codes only need to reach the suffix.
    x1, y1, x2, y2 = box
    return [int(v) % 128 for v in np.resize(mask[y1:y2, x1:x2].sum(axis=0), 16)]


@pytest.fixture(scope="module")
def scenes():
    return list(_scenes())


def _parse_objects(suffix: str) -> list[tuple[list[int], str]]:
    objects = []
    for part in suffix.split(" ; "):
        m = re.fullmatch(r"((?:<loc\d{4}>){4})((?:<seg\d{3}>){16})? (\w+)", part)
        assert m, part
        locs = [int(v) for v in re.findall(r"<loc(\d{4})>", m[1])]
        objects.append((locs, m[3]))
    return objects


def test_same_seed_same_bytes(tmp_path):
    a = S.generate_dataset(tmp_path / "a", 6, seed=3)
    b = S.generate_dataset(tmp_path / "b", 6, seed=3, workers=2)  # forked workers, same bytes
    assert a.read_bytes() == b.read_bytes()
    for line in a.read_text().splitlines():
        rel = json.loads(line)["image"]
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes()


def test_image_does_not_depend_on_dataset_length():
    short = [ex for _, ex, _ in S.iter_examples(2, seed=7)]
    long = [ex for _, ex, _ in S.iter_examples(5, seed=7)]
    assert short == long[: len(short)]


def test_different_seeds_differ():
    img = [np.asarray(S.make_scene(np.random.default_rng(s)).image) for s in (0, 1)]
    assert not np.array_equal(*img)


def test_boxes_tight_and_masks_valid(scenes):
    for scene, _ in scenes:
        assert 1 <= len(scene.shapes) <= 3
        union = np.zeros((96, 96), dtype=int)
        for s in scene.shapes:
            x1, y1, x2, y2 = s.box
            crop = s.mask[y1:y2, x1:x2]
            assert crop.sum() == s.mask.sum() > 0
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
            assert s.visible >= 0.6
            assert max(x2 - x1, y2 - y1) >= 14  # brief: shapes >= ~14 px at size 96
            union += s.mask
        assert union.max() == 1  # visible masks never share a pixel


def test_captions_parse_back(scenes):
    phrase = r"a (red|green|blue|yellow) (circle|square|triangle|star)"
    grammar = rf"{phrase}|{phrase} and {phrase}|{phrase}, {phrase} and {phrase}"
    for scene, examples in scenes:
        (text,) = [e["suffix"] for e in examples if e["task"] == "caption"]
        assert re.fullmatch(grammar, text), text
        parsed = re.findall(phrase, text)
        order = sorted(scene.shapes, key=lambda s: s.box[0])
        assert parsed == [(s.colour, s.kind) for s in order]


def test_counts_and_colours(scenes):
    seen_zero = False
    for scene, examples in scenes:
        for e in examples:
            if e["task"] == "count":
                kind = re.fullmatch(r"answer en how many (\w+)s\?", e["prefix"])[1]
                assert e["suffix"] == str(sum(s.kind == kind for s in scene.shapes))
                seen_zero |= e["suffix"] == "0"
            elif e["task"] == "colour":
                kind = re.fullmatch(r"answer en what colour is the (\w+)\?", e["prefix"])[1]
                (shape,) = [s for s in scene.shapes if s.kind == kind]
                assert e["suffix"] == shape.colour
    assert seen_zero


def test_detect_and_segment_decode_to_boxes(scenes):
    bin_px = 96 / 1023
    for scene, examples in scenes:
        for e in examples:
            if e["task"] not in ("detect", "segment"):
                continue
            kinds = e["prefix"].split(" ", 1)[1].split(" ; ")
            want = sorted((s for s in scene.shapes if s.kind in kinds), key=lambda s: s.box[0])
            got = _parse_objects(e["suffix"])
            assert [k for _, k in got] == [s.kind for s in want]
            for (y1, x1, y2, x2), s in zip((locs for locs, _ in got), want):
                decoded = np.array([x1, y1, x2, y2]) / 1023 * 96
                assert np.abs(decoded - np.array(s.box)).max() <= bin_px
            if e["task"] == "segment":
                assert all(len(re.findall(r"<seg\d{3}>", p)) == 16 for p in e["suffix"].split(" ; "))


def test_number_is_drawn_apart_from_shapes(scenes):
    with_number = [(sc, ex) for sc, ex in scenes if sc.number is not None]
    assert 10 < len(with_number) < 40  # number_prob=0.5
    for scene, examples in with_number:
        assert re.fullmatch(r"\d{4}", scene.number)
        assert [e["suffix"] for e in examples if e["task"] == "ocr"] == [scene.number]
        x1, y1, x2, y2 = scene.number_box
        assert y2 - y1 >= 14  # digits tall enough to read at 96 px
        region = np.asarray(scene.image.convert("L"))[y1:y2, x1:x2]
        assert (region < 100).mean() > 0.1  # dark ink on a light background
        for s in scene.shapes:
            assert not s.mask[y1:y2, x1:x2].any()
    for scene, examples in scenes:
        if scene.number is None:
            assert not any(e["task"] == "ocr" for e in examples)


def test_every_task_is_covered(scenes):
    tasks = {e["task"] for _, examples in scenes for e in examples}
    assert tasks == set(S.SCENE_QUESTIONS)
    prefixes = {e["prefix"] for _, examples in scenes for e in examples if e["task"] == "detect"}
    assert any(" ; " in p for p in prefixes)


def test_no_segment_without_encoder():
    rng = np.random.default_rng(0)
    scene = S.make_scene(rng)
    assert all(e["task"] != "segment" for e in S.scene_examples(scene, rng))


def test_small_resolution():
    for scene, _ in _scenes(10, seed=1, size=64):
        assert scene.image.size == (64, 64)
        assert all(s.mask.shape == (64, 64) for s in scene.shapes)


def test_generate_dataset_writes_valid_jsonl(tmp_path):
    jsonl = S.generate_dataset(tmp_path, 5, seed=0, encode_mask=_fake_encoder, split_name="val")
    assert jsonl == tmp_path / "val.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert rows and all(set(r) == {"image", "prefix", "suffix", "task"} for r in rows)
    assert {r["image"] for r in rows} == {f"images/val_{i:06d}.png" for i in range(5)}
    for r in rows:
        with Image.open(jsonl.parent / r["image"]) as im:
            assert im.size == (96, 96) and im.mode == "RGB"
    in_memory = [ex for _, ex, _ in S.iter_examples(5, seed=0, encode_mask=_fake_encoder)]
    assert [{k: r[k] for k in ("prefix", "suffix", "task")} for r in rows] == in_memory
    assert not list(tmp_path.rglob("*.tmp"))


def test_shape_masks():
    masks = S.shape_masks(20, seed=0)
    assert masks.shape == (20, 64, 64) and masks.dtype == np.float32
    assert masks.min() >= 0 and masks.max() <= 1
    assert (masks.mean(axis=(1, 2)) > 0.3).all()  # a crop to the box is mostly shape
    assert np.array_equal(masks, S.shape_masks(20, seed=0))
