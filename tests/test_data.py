"""Datasets (JSONL layouts, COCO, the checker), collate, the prefix-LM mask and the loss, each
against an independent construction."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from palikit.processor import collate
from palikit.config import PaliGemmaConfig
from palikit.data import (
    DatasetError,
    PaliGemmaDataset,
    check_dataset,
    find_annotations,
    load_examples,
    make_collate,
    read_coco,
    read_jsonl,
)
from palikit.finetune import loss_fn
from palikit.gemma import attention_masks
from palikit.paligemma import PaliGemma, blocks_and_positions
from palikit.processor import Tokenizer, encode_example

from .conftest import randomize


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return Tokenizer(tokenizer_file, image_token_id=1552)


def _image(path, size=(40, 30), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- layouts --------------------------------------------------------------------------------


def test_jsonl_image_paths_are_relative_to_the_file(tmp_path):
    _image(tmp_path / "d" / "img" / "a.png")
    f = _jsonl(tmp_path / "d" / "x.jsonl", [
        {"image": "img/a.png", "prefix": "caption en", "suffix": "red"},
        {"image": ["img/a.png", "img/a.png"], "prefix": "ocr", "suffix": "1"},
    ])
    ex = read_jsonl(f)
    assert ex[0].images == [tmp_path / "d" / "img" / "a.png"]
    assert len(ex[1].images) == 2 and (ex[0].prefix, ex[0].suffix) == ("caption en", "red")


def test_roboflow_and_maestro_layouts(tmp_path):
    row = {"image": "a.png", "prefix": "caption en", "suffix": "x"}
    rf = tmp_path / "roboflow"  # one folder, _annotations.<split>.jsonl
    _jsonl(rf / "_annotations.train.jsonl", [row])
    _jsonl(rf / "_annotations.valid.jsonl", [row, row])
    assert find_annotations(rf, "train") == rf / "_annotations.train.jsonl"
    assert len(load_examples(rf, "valid")) == 2
    ms = tmp_path / "maestro"  # a folder per split
    _jsonl(ms / "train" / "annotations.jsonl", [row])
    _jsonl(ms / "valid" / "annotations.jsonl", [row] * 3)
    assert load_examples(ms, "train")[0].images == [ms / "train" / "a.png"]
    assert len(load_examples(ms, "valid")) == 3
    assert len(load_examples(ms / "valid")) == 3  # a split folder on its own
    with pytest.raises(DatasetError, match="no test annotations"):
        load_examples(ms, "test")


def test_bad_lines_name_the_file_and_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"image": "a.png", "prefix": "ocr", "suffix": "1"}\n'
                 '{"image": "a.png", "prefix": "ocr"}\n'
                 'not json\n')
    with pytest.raises(DatasetError, match=r"x\.jsonl:2: missing key\(s\) suffix"):
        read_jsonl(f)
    errors = []
    assert len(read_jsonl(f, errors)) == 1
    assert [w.rsplit(":", 1)[1] for w, _ in errors] == ["2", "3"]


def _coco(tmp_path):
    _image(tmp_path / "c" / "a.jpg", (200, 100))
    _image(tmp_path / "c" / "b.jpg", (50, 50))
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
                   {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50}],
        # Roboflow's export: category 0 is the dataset name, only used as a supercategory.
        "categories": [{"id": 0, "name": "pets", "supercategory": "none"},
                       {"id": 1, "name": "cat", "supercategory": "pets"},
                       {"id": 2, "name": "dog", "supercategory": "pets"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [20, 10, 60, 40], "iscrowd": 0,
             "segmentation": [[20, 10, 80, 10, 80, 50, 20, 50]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 0, 100, 100], "iscrowd": 0,
             "segmentation": [[100, 0, 199, 0, 150, 99]]},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1,
             "segmentation": {"size": [100, 200], "counts": [0, 10, 19990]}},
        ],
    }
    path = tmp_path / "c" / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    return path


def _loc(v):  # the tasks.py contract: round(c * 1023), y before x
    return f"<loc{int(round(v * 1023)):04d}>"


def test_coco_to_detect(tmp_path):
    ex = read_coco(_coco(tmp_path), "detect")
    assert [e.prefix for e in ex] == ["detect cat ; dog"] * 2  # every class, as Roboflow's export
    want = (f"{_loc(10 / 100)}{_loc(20 / 200)}{_loc(50 / 100)}{_loc(80 / 200)} dog ; "
            f"{_loc(0)}{_loc(100 / 200)}{_loc(1)}{_loc(1)} cat")  # the crowd box is skipped
    assert ex[0].suffix == want
    assert ex[1].suffix == ""  # nothing in image 2: the target is just <eos>
    assert read_coco(_coco(tmp_path), "detect", classes="present")[0].prefix == "detect cat ; dog"
    assert find_annotations(tmp_path / "c").name == "_annotations.coco.json"


def test_coco_to_segment(tmp_path):
    from palikit.maskcodec import MASK_CODEC_PRESETS, MaskCodec

    torch.manual_seed(0)
    codec = MaskCodec(MASK_CODEC_PRESETS["tiny"]).eval()
    ex = read_coco(_coco(tmp_path), "segment", codec=codec)
    assert [e.prefix for e in ex] == ["segment cat", "segment dog"]
    # The dog's mask, rasterised independently: the polygon is the box itself.
    mask = np.zeros((100, 200), bool)
    canvas = Image.new("1", (200, 100))
    ImageDraw.Draw(canvas).polygon([(20, 10), (80, 10), (80, 50), (20, 50)], fill=1)
    mask[:] = np.array(canvas)
    codes = codec.encode_mask_in_box(mask, (20, 10, 80, 50)).tolist()
    box = f"{_loc(0.1)}{_loc(0.1)}{_loc(0.5)}{_loc(0.4)}"
    assert ex[1].suffix == box + "".join(f"<seg{c:03d}>" for c in codes) + " dog"
    with pytest.raises(DatasetError, match="needs the mask codec"):
        read_coco(_coco(tmp_path), "segment")


# ---- checker --------------------------------------------------------------------------------


def test_check_dataset_reports_each_problem(tmp_path, tok):
    _image(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "prefix": "caption en", "suffix": "a red square"},  # fine
        {"image": "gone.png", "prefix": "caption en", "suffix": "x"},
        {"image": "a.png", "prefix": "detect cat", "suffix": "<loc0010><loc0020><loc1024><loc0040> cat"},
        {"image": "a.png", "prefix": "segment cat", "suffix": "<loc0010><loc0020><loc0030><loc0040>"
                                                           "<seg200>" + "<seg001>" * 15 + " cat"},
        {"image": "a.png", "prefix": "what is this", "suffix": "a square"},
        {"image": "a.png", "prefix": "detect cat ; dog",
         "suffix": "<loc0010><loc0020><loc0030><loc0040> bird"},
        {"image": "a.png", "prefix": "detect cat", "suffix": "<loc0010><loc0020><loc0030> cat"},
        {"image": "a.png", "prefix": "detect cat", "suffix": "<loc0500><loc0020><loc0030><loc0040> cat"},
        {"image": "a.png", "prefix": "<image>caption en", "suffix": "x"},
        {"image": "a.png", "prefix": "caption en", "suffix": "word " * 60},
        {"image": "a.png", "prefix": "detect cat", "suffix": "<loc-010><loc0020><loc0030><loc0040> cat"},
        {"image": "a.png", "prefix": "caption en", "suffix": " "},
        {"image": "a.png", "prefix": "detect cat", "suffix": ""},  # a negative: nothing to find, fine
    ]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    with f.open("ab") as fh:
        fh.write(b"{broken\n")
        fh.write(b'{"image": "a.png", "prefix": "caption en", "suffix": "caf\xe9"}\n')  # Latin-1, not UTF-8
    report = check_dataset(f, config="tiny-paligemma2", tokenizer=tok, max_text_len=48)
    kinds = {(p.where.rsplit(":", 1)[1], p.kind) for p in report.problems}
    assert kinds == {("2", "missing-image"), ("3", "loc-range"), ("4", "seg-range"), ("5", "unknown-task"),
                     ("6", "label-not-in-prompt"), ("7", "loc-count"), ("8", "box-order"),
                     ("9", "prompt-format"), ("10", "too-long"), ("11", "token-format"), ("11", "loc-count"), ("12", "empty-suffix"),
                     ("14", "bad-line"), ("15", "bad-line")}
    assert all(p.error for p in report.problems if p.kind in ("loc-count", "token-format", "empty-suffix"))
    assert "not UTF-8" in next(p.message for p in report.problems if p.where.endswith(":15"))
    assert not report.ok and report.examples == 13
    assert report.to_dict()["counts"]["missing-image"] == 1
    assert "FAILED" in report.format()
    ok = check_dataset(_jsonl(tmp_path / "ok.jsonl", rows[:1]), config="tiny-paligemma2", tokenizer=tok)
    assert ok.ok and ok.text_tokens[0] == len(encode_example(tok, 0, "caption en", "a red square").ids)


def test_check_dataset_against_the_model_length_limit(tmp_path, tok):
    _image(tmp_path / "a.png")
    f = _jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "prefix": "caption en", "suffix": "word " * 200}])
    config = PaliGemmaConfig.from_name("tiny-paligemma2", text={"max_position_embeddings": 100})
    report = check_dataset(f, config=config, tokenizer=tok)
    assert [p.kind for p in report.problems] == ["too-long"] and not report.ok
    # Training truncates the text to max_text_len first, and then it fits: a warning, not an error.
    n_image = config.num_image_tokens
    cut = check_dataset(f, config=config, tokenizer=tok, max_text_len=100 - n_image)
    assert [(p.kind, p.error) for p in cut.problems] == [("too-long", False)] and cut.ok
    ds = PaliGemmaDataset(load_examples(f), tok, n_image, 100 - n_image)
    assert len(ds.encoded[0].ids) == 100 and ds.truncated == 1


# ---- Dataset, collate ------------------------------------------------------------------------


def test_dataset_truncates_and_collates(tmp_path, tok):
    _image(tmp_path / "a.png", (40, 30))
    _image(tmp_path / "b.png", (20, 60))
    f = _jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "prefix": "caption en", "suffix": "a red square"},
                                      {"image": ["a.png", "b.png"], "prefix": "ocr", "suffix": "word " * 50}])
    config = PaliGemmaConfig.from_name("tiny-paligemma2")
    N = config.num_image_tokens
    ds = PaliGemmaDataset(read_jsonl(f), tok, N, max_text_len=20)
    assert ds.truncated == 1 and len(ds.encoded[1].ids) == 2 * N + 20
    assert len(ds.encoded[0].ids) == N + len(encode_example(tok, 0, "caption en", "a red square").ids)
    batch = make_collate(tok, config)([ds[0], ds[1]])
    assert batch["ids"].shape == (2, 2 * N + 20) and batch["pixels"].shape == (3, 3, 28, 28)
    ref = collate([ds.encoded[0], ds.encoded[1]], tok.pad_id)
    assert all(torch.equal(batch[k], ref[k]) for k in ref)


# ---- masks and loss against independent constructions ------------------------------------------


def _two_examples(tok, n_image=4):
    a = encode_example(tok, n_image, "caption en", "a red circle")
    b = encode_example(tok, n_image, "answer en how many circles?", "3")
    return [a, b], collate([a, b], tok.pad_id)


def test_prefix_lm_mask_matches_explicit_loops(tok):
    (a, b), batch = _two_examples(tok)
    config = PaliGemmaConfig.from_name("tiny-paligemma2").text
    block, pos = blocks_and_positions(batch["input_mask"], batch["mask_ar"])
    got = attention_masks(block, pos, block, pos, batch["input_mask"].bool(), config)["global"][:, 0]
    L = batch["ids"].shape[1]
    for row, enc in enumerate((a, b)):
        n_prefix = enc.loss_mask.index(1)  # image + <bos> + prefix + "\n"
        n_real = len(enc.ids)
        want = torch.zeros(L, L, dtype=torch.bool)
        for q in range(n_real):
            for k in range(n_real):
                if k < n_prefix:  # every real token sees the whole prefix block
                    want[q, k] = True
                elif q >= n_prefix and k <= q:  # suffix: earlier suffix tokens and itself
                    want[q, k] = True
        # Real queries: exactly the explicit mask. Padding keys are never visible to anyone.
        assert torch.equal(got[row, :n_real], want[:n_real]), row
        assert not got[row, :, n_real:].any()
        # (Padding *queries* may look at real tokens: their outputs feed no loss and no token,
        # and a non-empty row keeps the softmax finite.)
        assert torch.equal(batch["loss_mask"][row, :n_real],
                           torch.tensor([0] * n_prefix + [1] * (n_real - n_prefix)))
        assert enc.ids[-1] == tok.eos_id  # the loss covers the suffix and <eos>
        assert batch["loss_mask"][row, n_real:].sum() == 0


def _hand_loss(logits, batch, eps=0.0):
    """Per-example mean over suffix targets, then batch mean, by explicit loops."""
    per_example = []
    V = logits.shape[-1]
    for i in range(logits.shape[0]):
        terms = []
        for t in range(logits.shape[1] - 1):
            if batch["loss_mask"][i, t + 1]:
                logp = torch.log_softmax(logits[i, t].double(), -1)
                y = batch["ids"][i, t + 1]
                others = -(logp.sum() - logp[y])
                terms.append(-(1 - eps) * logp[y] + eps / (V - 1) * others)
        per_example.append(sum(terms) / max(1, len(terms)))
    return torch.stack(per_example).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_matches_hand_computation(tok, eps):
    _, batch = _two_examples(tok)
    g = torch.Generator().manual_seed(0)
    B, L = batch["ids"].shape
    V, D = 1600, 8
    hidden = torch.randn(B, L, D, generator=g)
    W = torch.randn(V, D, generator=g)
    seen = []

    def head(x):
        seen.append(x.shape)
        return x @ W.T

    want = _hand_loss(hidden @ W.T, batch, eps)
    got = loss_fn(hidden, batch, label_smoothing=eps, head=head)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # The head ran only on the target positions, not on all B x L.
    assert seen == [(int(batch["loss_mask"][:, 1:].sum()), D)]
    torch.testing.assert_close(loss_fn(hidden @ W.T, batch, label_smoothing=eps), got)
    # Per-example mean then batch mean, not a mean over all tokens.
    per = loss_fn(hidden, batch, eps, head, reduction="none")
    assert per.shape == (2,) and not math.isclose(per.mean().item(), per.max().item())


def test_right_padding_does_not_change_the_loss(tok):
    torch.manual_seed(0)
    model = PaliGemma(PaliGemmaConfig.from_name("tiny-paligemma2")).eval()
    randomize(model, 1)
    N = model.config.num_image_tokens
    short = encode_example(tok, N, "answer en how many circles?", "3")
    long = encode_example(tok, N, "caption en", "a red circle above a blue square")
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))

    def per_example(encs, px):
        batch = collate(encs, tok.pad_id)
        hidden = model(batch["ids"], px, batch["input_mask"], batch["mask_ar"])
        return loss_fn(hidden, batch, head=model.logits, reduction="none")

    with torch.no_grad():
        alone = per_example([short], pixels[:1])
        padded = per_example([short, long], pixels)  # short is right-padded here
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("annotation, kind, message", [
    ({"image_id": 2, "category_id": 2, "bbox": [60, 0, 20, 20]}, "box-outside", "entirely outside the 50x50 image"),
    ({"image_id": 2, "category_id": 2, "bbox": [-30, 10, 20, 20]}, "box-outside", "entirely outside"),
    ({"image_id": 5, "category_id": 2, "bbox": [0, 0, 20, 20]}, "unknown-image", "image_id 5 is not among"),
    ({"image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20]}, "no-segmentation", "no 'segmentation'"),
])
def test_coco_annotations_that_cannot_train_are_errors(tmp_path, annotation, kind, message):
    """A box entirely outside its image, an annotation of an image the file does not list, and (for
    segment) one without a segmentation: each an error finding of `data check`, and one line
    naming the annotation when training reads the file."""
    from palikit.maskcodec import MASK_CODEC_PRESETS, MaskCodec

    codec = MaskCodec(MASK_CODEC_PRESETS["tiny"]).eval()
    path = _coco(tmp_path)
    coco = json.loads(path.read_text())
    coco["annotations"].append({"id": 7, "iscrowd": 0, **annotation})
    path.write_text(json.dumps(coco))
    task = "segment" if kind == "no-segmentation" else "detect"
    found = []
    read_coco(path, task, codec, errors=found)
    assert [(p.where.rsplit(":", 1)[1], p.kind, p.error) for p in found if p.error] == [("annotation 7", kind, True)]
    with pytest.raises(DatasetError, match=f"annotation 7: .*{message}"):
        read_coco(path, task, codec)
    if kind != "no-segmentation":
        assert read_coco(path, "segment", codec, errors=[])  # the others still convert


def test_data_check_reports_coco_annotation_problems_and_goes_on(tmp_path, capsys):
    """A negative box, an unknown category id and a box past the edge are each one finding, and
    the check goes on past them; training refuses the first two and clips the third. Lengths
    unchecked without a tokenizer say so; --image-dir finds images kept elsewhere."""
    from palikit.cli import main

    path = _coco(tmp_path)
    coco = json.loads(path.read_text())
    coco["annotations"] += [
        {"id": 7, "image_id": 2, "category_id": 1, "bbox": [10, 10, -5, 20], "iscrowd": 0},
        {"id": 8, "image_id": 2, "category_id": 9, "bbox": [10, 10, 5, 20], "iscrowd": 0},
        {"id": 9, "image_id": 2, "category_id": 2, "bbox": [40, 40, 20, 20], "iscrowd": 0},
    ]
    path.write_text(json.dumps(coco))
    report = check_dataset(path)
    found = {(p.where.rsplit(":", 1)[1], p.kind, p.error) for p in report.problems}
    assert {("annotation 7", "box-size", True), ("annotation 8", "unknown-category", True),
            ("annotation 9", "box-outside", False)} <= found
    assert report.examples == 2 and not report.ok
    assert "lengths: not checked" in report.format()
    with pytest.raises(DatasetError, match="annotation 7: bbox .* negative"):
        read_coco(path, "detect")
    del coco["annotations"][-3:-1]  # the edge box alone trains, clipped to the image
    path.write_text(json.dumps(coco))
    assert read_coco(path, "detect")[1].suffix.startswith(f"{_loc(40 / 50)}{_loc(40 / 50)}{_loc(1)}{_loc(1)} dog")

    elsewhere = tmp_path / "images"
    elsewhere.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (path.parent / name).rename(elsewhere / name)
    assert main(["data", "check", str(path)]) == 1
    assert "missing-image" in capsys.readouterr().out
    assert main(["data", "check", str(path), "--image-dir", str(elsewhere)]) == 0


@pytest.mark.parametrize("kind", ["disk", "parquet", "imagefolder"])
def test_hugging_face_datasets_sources(tmp_path, kind):
    """train_file as people hold their data: a save_to_disk folder, a parquet folder with splits,
    an imagefolder with metadata.jsonl; columns mapped by name or by a format string."""
    import datasets

    images = [_image(tmp_path / "img" / f"{i}.png", (40, 30), (200, 30 * i, 30)) for i in range(3)]
    rows = {"image": [str(p) for p in images], "question": ["what colour?", "how many?", "what is it?"],
            "answer": ["red", "2", "a box"]}
    columns = {"prefix": "answer en {question}", "suffix": "answer"}
    if kind == "disk":
        src = tmp_path / "disk"
        data = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
        datasets.DatasetDict({"train": data, "validation": data.select([0])}).save_to_disk(str(src))
    elif kind == "parquet":
        src = tmp_path / "pq" / "data"
        src.mkdir(parents=True)
        data = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
        data.to_parquet(str(src / "train-00000-of-00001.parquet"))
        data.select([0]).to_parquet(str(src / "validation-00000-of-00001.parquet"))
        src = src.parent
    else:
        src = tmp_path / "folder"
        src.mkdir()
        for i, p in enumerate(images):
            p.rename(src / p.name)
        (src / "metadata.jsonl").write_text("".join(
            json.dumps({"file_name": f"{i}.png", "question": q, "answer": a}) + "\n"
            for i, (q, a) in enumerate(zip(rows["question"], rows["answer"]))))
    examples = load_examples(src, "train", columns=columns)
    assert [(e.prefix, e.suffix) for e in examples] == [
        ("answer en what colour?", "red"), ("answer en how many?", "2"), ("answer en what is it?", "a box")]
    first = examples[0].images[0]
    assert np.asarray(Image.open(first) if isinstance(first, Path) else first.convert("RGB"))[0, 0].tolist() == [200, 0, 30]
    if kind != "imagefolder":
        assert len(load_examples(src, "valid", columns=columns)) == 1  # the validation split
    with pytest.raises(DatasetError, match="no column 'prefix'; the columns are"):
        load_examples(src, "train")
    # `palikit data check` and `palikit eval --data` read it as `palikit train` does.
    from palikit.cli import main

    assert main(["data", "check", str(src), "--columns", json.dumps(columns)]) == 0
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps({"model": "default", "steps": 1, "train_file": {"path": str(src), "columns": columns}}))
    assert main(["data", "check", "--config", str(config)]) == 0
    if kind != "imagefolder":
        out = tmp_path / "preds.jsonl"
        argv = ["eval", "--model", "default", "--dtype", "float32", "--data", str(src), "--out", str(out)]
        assert main([*argv, "--columns", json.dumps(columns)]) == 0
        assert len(out.read_text().splitlines()) == 2  # what made it, and the validation split's example
