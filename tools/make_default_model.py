"""Build palikit's bundled default model from nothing, reproducibly from the seeds below.

    .venv/bin/python tools/make_default_model.py --work runs/default_model [--steps N]

1. a mask codec (the big_vision VQ-VAE architecture, "tiny" widths) trained on the synthetic
   world's shape masks;
2. the synthetic data set (palikit.synthetic, every task, segment suffixes through that codec);
3. a small SentencePiece tokenizer (+ the 1024 loc and 128 seg pieces) fitted on its texts;
4. `palikit train configs/default_model.yaml` (the preset "palikit-tiny-shapes" from scratch);
5. the last checkpoint + tokenizer + codec copied to palikit/assets/default;
6. `palikit eval` on held-out generated images; the scores go into the model card.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "palikit" / "assets" / "default"


def build_codec(work: Path):
    from palikit.maskcodec import MASK_CODEC_PRESETS, MaskCodec, train_codec
    from palikit.synthetic import shape_masks

    path = work / "mask_codec.npz"
    if not path.exists():
        masks = torch.from_numpy(shape_masks(3000, seed=1))
        train_codec(masks, MASK_CODEC_PRESETS["tiny"], steps=600, lr=3e-3, seed=0).save_npz(path)
    return MaskCodec.from_npz(path)


def build_data(work: Path, codec, n_train: int) -> None:
    from palikit.synthetic import generate_dataset

    def encode(mask, box):
        return codec.encode_mask_in_box(mask, box).tolist()

    for split, n, seed in (("train", n_train, 0), ("val", 200, 1)):
        if not (work / "data" / f"{split}.jsonl").exists():
            generate_dataset(work / "data", n, seed, size=96, encode_mask=encode, split_name=split)


def build_tokenizer(work: Path) -> Path:
    from palikit.processor import train_tokenizer

    path = work / "tokenizer.model"
    if not path.exists():
        texts = []
        for line in (work / "data" / "train.jsonl").read_text().splitlines():
            ex = json.loads(line)
            texts += [ex["prefix"], re.sub(r"<(loc|seg)\d+>", " ", ex["suffix"])]
        train_tokenizer(texts, path, vocab_size=400)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/default_model")
    ap.add_argument("--images", type=int, default=8000, help="training images")
    ap.add_argument("--set", action="append", default=[], help="extra key=value for palikit train")
    ap.add_argument("--export", action="store_true", help="only copy the newest checkpoint and evaluate")
    args = ap.parse_args()
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    np.random.seed(0)

    codec = build_codec(work)
    build_data(work, codec, args.images)
    tok = build_tokenizer(work)
    palikit = [sys.executable, "-m", "palikit.cli"]
    if not args.export:
        sets = [f"model.tokenizer={tok}", f"train_file={work / 'data' / 'train.jsonl'}",
                f"eval_file={work / 'data' / 'val.jsonl'}", f"out_dir={work / 'run'}", *args.set]
        cmd = palikit + ["train", str(ROOT / "configs" / "default_model.yaml")]
        for s in sets:
            cmd += ["--set", s]
        if (work / "run").exists():
            cmd.append("--resume")
        subprocess.run(cmd, check=True, cwd=ROOT)

    ckpt = work / "run" / "final"  # the trainer's last weights, in the released HF layout
    ASSETS.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(ckpt / f, ASSETS / f)
    shutil.copy(tok, ASSETS / "tokenizer.model")
    shutil.copy(work / "mask_codec.npz", ASSETS / "mask_codec.npz")
    (ASSETS / "preprocessor_config.json").write_text(json.dumps({"resample": 2, "size": {"height": 96, "width": 96}}))
    subprocess.run(palikit + ["eval", "--model", "default", "--synthetic", "100", "--seed", "12345",
                              "--out", str(work / "eval.json")], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
