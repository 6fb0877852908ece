"""`palikit eval`: task metrics on held-out images of the synthetic shapes world.

Metrics (each over the examples of its task):
- caption / ocr: exact match of the greedy output;
- count / colour: answer accuracy (exact match of the short answer);
- detect: box accuracy at IoU 0.5: ground-truth boxes matched one-to-one by a predicted box of
  the same label, divided by (ground-truth boxes + unmatched predictions), so both misses and
  false detections count against it;
- segment: mean IoU between the union of predicted masks and the union of true masks of the kind.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import tasks
from .synthetic import iter_examples


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(pred: list[tasks.Detection], true: list[tasks.Detection], threshold: float = 0.5) -> tuple[int, int]:
    """Greedy one-to-one matching by IoU within each label -> (matched, denominator)."""
    used, matched = set(), 0
    for t in true:
        best, best_iou = None, threshold
        for j, p in enumerate(pred):
            if j not in used and p.label == t.label and (iou := box_iou(p.box, t.box)) >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            used.add(best)
            matched += 1
    return matched, len(true) + len(pred) - len(used)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def evaluate_synthetic(pipe, n_images: int = 200, seed: int = 12345, size: int = 96,
                       batch_size: int = 16) -> dict:
    """Run every task on `n_images` generated scenes (a seed unseen in training) -> metrics.

    Scenes are drawn at `size` px, as the training data, and resized by the processor."""
    jobs = []  # (task, image, prompt, truth)
    rng = np.random.default_rng(seed)
    last_scene = None
    for image, ex, scene in iter_examples(n_images, seed, size):
        truth = tasks.parse_detections(ex["suffix"], *image.size).objects if ex["task"] == "detect" else ex["suffix"]
        jobs.append((ex["task"], image, ex["prefix"], truth))
        if scene is not last_scene:  # one segmentation question per scene, on a present kind
            last_scene = scene
            kind = scene.shapes[rng.integers(len(scene.shapes))].kind
            mask = np.zeros(image.size[::-1], bool)
            for shape in scene.shapes:
                if shape.kind == kind:
                    mask |= shape.mask
            jobs.append(("segment", image, f"segment {kind}", mask))

    scores: dict[str, list] = defaultdict(list)  # detect: (matched, denominator) per example
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        outs = pipe.generate_details([j[1] for j in chunk], [j[2] for j in chunk], max_new_tokens=64)
        for (task, image, prompt, truth), (text, g) in zip(chunk, outs):
            if task == "detect":
                pred = pipe.parse_objects(task, text, g, image)
                scores["detect"].append(match_boxes(pred, truth))
            elif task == "segment":
                pred = np.zeros(truth.shape, bool)
                for seg in pipe.parse_objects(task, text, g, image):
                    pred |= seg.mask
                scores["segment"].append(mask_iou(pred, truth))
            else:
                scores[task].append(float(text.strip() == truth))
    metrics = {f"{t}_accuracy" if t in ("count", "colour") else f"{t}_exact_match": float(np.mean(v))
               for t, v in scores.items() if t in ("caption", "count", "colour", "ocr")}
    matched, total = np.sum(scores["detect"], axis=0) if scores["detect"] else (0, 0)
    metrics["detect_box_accuracy_iou50"] = float(matched / max(1, total))
    metrics["segment_miou"] = float(np.mean(scores["segment"])) if scores["segment"] else 0.0
    metrics["examples"] = {t: len(v) for t, v in scores.items()}
    return metrics


def write_report(metrics: dict, path: str | Path) -> None:
    from .atomic import write_text_atomic

    write_text_atomic(path, json.dumps(metrics, indent=2))
