"""Checkpoint files: the newest complete checkpoint of a run, folders written atomically (into a
temporary folder that is then renamed), optimizer state as safetensors + JSON, and each rank's RNG
state. No pickle anywhere. The Trainer's save_checkpoint / load_checkpoint put them together.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import write_text_atomic


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted(p for p in out_dir.glob("step-*") if re.fullmatch(r"step-\d+", p.name)
                   and (p / "state.json").exists())
    return steps[-1] if steps else None


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of the weights on disk
    except OSError:  # file systems without hard links
        shutil.copy2(src, dst)


def save_optimizer(state: dict, folder: Path) -> None:
    """Optimizer state as safetensors (tensors, keyed `param/name`) + JSON (everything else)."""
    tensors, rest = {}, {}
    for param, values in state["state"].items():
        for k, v in values.items():
            if torch.is_tensor(v):
                tensors[f"{param}/{k}"] = v.detach().cpu().contiguous()
            else:
                rest.setdefault(param, {})[k] = v
    save_file(tensors, folder / "optimizer.safetensors")
    meta = {"param_groups": state["param_groups"], "state": rest}
    write_text_atomic(folder / "optimizer.json", json.dumps(meta))


def load_optimizer(folder: Path) -> dict:
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict = {k: dict(v) for k, v in meta["state"].items()}
    for key, tensor in load_file(folder / "optimizer.safetensors").items():
        param, _, name = key.rpartition("/")
        state.setdefault(param, {})[name] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


def save_rng(path: Path) -> None:
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"python": json.dumps(random.getstate()), "numpy": json.dumps(list(np_state[2:]))}
    save_file(tensors, path, metadata=meta)


def load_rng(path: Path) -> None:
    from safetensors import safe_open

    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
