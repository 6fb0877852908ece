"""The bundled default model (palikit/assets/default) and the metrics of `palikit eval`.

The quality test runs every task on held-out generated scenes (a seed used neither for the
training data, 0, its validation split, 1, nor the model card's evaluation, 12345) and checks
floors a little under the model card's targets: a regression anywhere in the stack
(image processing, prompt layout, attention masks, decoding, loc/seg parsing, the mask codec)
fails it. A random-init model scores 0 on all but counting (about 0.3).
"""

from __future__ import annotations

import numpy as np
import pytest

import palikit
from palikit.weights import BUNDLED
from palikit.config import PRESETS
from palikit.eval_sets import read_synthetic
from palikit.evaluate import evaluate
from palikit.metrics import box_iou

# The model card's targets (on 200 scenes) less 0.05, for these smaller samples: (task, metric,
# value) -> floor. The bundled model scores 0.96 / 1.0 / 1.0 / 1.0 / 0.95 / 0.84 on the 48 scenes at 96 px.
FLOORS = {
    ("caption", "exact_match", "exact_match"): 0.75,
    ("count", "exact_match", "exact_match"): 0.85,
    ("colour", "exact_match", "exact_match"): 0.85,
    ("ocr", "exact_match", "exact_match"): 0.75,
    ("detect", "detection_map", "map"): 0.80,
    ("segment", "segmentation_miou", "miou"): 0.55,
}


@pytest.fixture(scope="module")
def default_pipe():
    return palikit.load("default", dtype="float32")


def test_bundled_files_fit_the_budget():
    size = sum((BUNDLED / f).stat().st_size for f in ("model.safetensors", "mask_codec.npz"))
    assert size <= 30 * 2**20, f"weights + codec are {size / 2**20:.1f} MiB, over the 30 MiB budget"
    assert (BUNDLED / "MODEL_CARD.md").is_file()


def test_default_resolves_to_the_bundled_model(default_pipe):
    preset = PRESETS["palikit-tiny-shapes"]
    assert (default_pipe.config.vision, default_pipe.config.text) == (preset.vision, preset.text)
    assert default_pipe.codec_path == BUNDLED / "mask_codec.npz", "segment needs the bundled mask codec"


@pytest.mark.slow
@pytest.mark.parametrize("n_images, size", [(48, 96), (24, 160)], ids=["96px", "160px"])
def test_default_model_quality_on_held_out_scenes(default_pipe, n_images, size):
    """At the model's input size (96 px) and, where the bundled preprocessor config's bilinear
    resize really runs, at 160 px."""
    rep = evaluate(default_pipe, list(read_synthetic(n_images=n_images, seed=424242, size=size)), name="synthetic",
                   by_task=True, batch_size=32)
    rows = {(r["group"], r["metric"]): r for r in rep["results"]}
    assert min(rows[k[:2]]["examples"] for k in FLOORS) >= 9, {k: r["examples"] for k, r in rows.items()}
    low = {k: (round(rows[k[:2]]["values"][k[2]], 3), t) for k, t in FLOORS.items() if rows[k[:2]]["values"][k[2]] < t}
    assert not low, f"below the floors (score, floor): {low}"


def test_demo_writes_answers_and_an_overlay(tmp_path, capsys):
    """`palikit demo` on its default scene prints the right answer to every question (the scene's
    ground truth), boxes at the true places, non-empty masks, and an overlay with them drawn."""
    import ast

    from PIL import Image

    from palikit.cli import main
    from palikit.synthetic import caption, make_scene

    assert main(["demo", "--out", str(tmp_path)]) in (0, None)
    answers = dict(line.split("->", 1) for line in capsys.readouterr().out.splitlines() if "->" in line)
    answers = {k.strip(): v.strip() for k, v in answers.items()}
    scene = make_scene(np.random.default_rng(1), number_prob=1.0)  # the demo's default scene
    kinds = {s.kind for s in scene.shapes}
    assert answers["caption en"] == caption(scene.shapes)
    assert answers["ocr"] == scene.number
    for kind in kinds:
        of_kind = [s for s in scene.shapes if s.kind == kind]
        assert answers[f"answer en how many {kind}s?"] == str(len(of_kind))
        if f"answer en what colour is the {kind}?" in answers:
            assert answers[f"answer en what colour is the {kind}?"] == of_kind[0].colour
        for task in ("detect", "segment"):
            found = ast.literal_eval(answers[f"{task} {kind}"])
            assert len(found) == len(of_kind) and all(f[0] == kind for f in found)
            assert all(max(box_iou(f[1], s.box) for s in of_kind) >= 0.5 for f in found), (task, found)
            if task == "segment":
                assert all(int(f[2].split()[0]) > 0 for f in found)  # "383 mask px"
    assert any(k.startswith("answer en what colour") for k in answers)
    image, overlay = Image.open(tmp_path / "input.png"), Image.open(tmp_path / "overlay.png")
    assert overlay.size == image.size
    changed = np.abs(np.asarray(overlay, int) - np.asarray(image.convert("RGB"), int)).sum(-1) > 0
    for s in scene.shapes:  # each shape's box and mask are drawn
        x1, y1, x2, y2 = s.box
        assert changed[y1:y2, x1:x2].mean() > 0.3


def test_readme_model_card_and_demo_say_which_prompts_the_bundled_model_knows(tmp_path, capsys):
    """The bundled model knows its world's prompts only (no cap/describe, no question generation, no
    French): the README, the model card and `palikit demo` each name exactly those, from the one
    list scene_examples writes its data with, and none claims it answers every task prefix."""
    import re
    from pathlib import Path

    import numpy as np

    from palikit import synthetic
    from palikit.cli import main

    said = " ".join(synthetic.trained_prompts_text().split())
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, doc in [("README.md", readme), ("MODEL_CARD.md", (BUNDLED / "MODEL_CARD.md").read_text())]:
        flat = " ".join(doc.split())
        assert said in flat and "every task prefix" not in flat, name
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert said in " ".join(capsys.readouterr().out.split())
    # The list is the data's: every training prompt of a few scenes is one of its templates.
    forms = [re.escape(p).replace(r"\{\}", "(.+)") for p in synthetic.TRAINED_PROMPTS]
    for seed in range(20):
        rng = np.random.default_rng(seed)
        scene = synthetic.make_scene(rng)
        for ex in synthetic.scene_examples(scene, rng, encode_mask=lambda m, b: [0] * 16):
            assert any(re.fullmatch(f, ex["prefix"]) for f in forms), ex["prefix"]
