"""The trainer on tiny models: configs, what trains, overfitting, exact resume after a kill, LoRA,
merging, and torchrun (DDP / FSDP2 on gloo) against a single process."""

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import palikit
from palikit.finetune import (
    LORA_TARGETS,
    ConfigError,
    Trainer,
    apply_lora,
    load_adapter,
    load_config,
    merge,
    param_table,
    train,
)
from palikit.config import PaliGemmaConfig
from palikit.finetune.config import smoke_dir
from palikit.data import DataSpec, StepSampler
from palikit.api import Pipeline
from palikit.paligemma import PaliGemma
from palikit.processor import Tokenizer
from palikit.synthetic import generate_dataset

from .conftest import kill_when_it_says

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic train file (3 images -> ~17 examples) and an 8-example file for overfitting."""
    folder = tmp_path_factory.mktemp("synth")
    train_file = generate_dataset(folder, 3, seed=0, size=64)
    eight = folder / "eight.jsonl"
    eight.write_text("".join(train_file.read_text().splitlines(keepends=True)[:8]))
    return {"train": train_file, "eight": eight}


@pytest.fixture
def cfg(tmp_path, data, tokenizer_file):
    return {"model": {"preset": "tiny-paligemma2", "tokenizer": str(tokenizer_file)},
            "train_file": str(data["train"]), "out_dir": str(tmp_path / "run"), "steps": 3, "batch_size": 4,
            "lr": 1e-3, "warmup": 0, "max_text_len": 64, "seed": 0}


def _run(config: dict, starts_at: int = 0) -> Trainer:
    """Train `config` to its end; the trainer must start at step `starts_at` (a resumed checkpoint's)."""
    trainer = Trainer(load_config(config))
    try:
        assert trainer.step == starts_at, f"the run starts at step {trainer.step}, not {starts_at}"
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# ---- config ----------------------------------------------------------------------------------


def test_config_overrides_and_errors(cfg, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    c = load_config(path, ["lr=3e-4", "lora.r=4", "lora.targets=[q_proj, v_proj]", "eval_file=null"])
    assert c.lr == 3e-4 and c.lora.r == 4 and c.lora.targets == ["q_proj", "v_proj"] and c.eval_file is None
    with pytest.raises(ConfigError, match="learning_rate.*did you mean lr"):
        load_config(cfg | {"learning_rate": 1})
    with pytest.raises(ConfigError, match="exactly one of steps and epochs"):
        load_config(cfg | {"epochs": 2})
    with pytest.raises(ConfigError, match="trainable='vision'"):
        load_config(cfg | {"trainable": "vision"})
    with pytest.raises(ConfigError, match="mixes weight dtypes.*autocast"):
        load_config(cfg | {"trainable": "attention-only", "dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(cfg, ["lr"])


def test_config_refuses_zero_steps_and_says_where_yaml_breaks(cfg, tmp_path, capsys):
    """steps/epochs/batch_size/grad_accum of 0 are refused up front (steps=0 used to pass validation
    and crash later with a TypeError); a broken YAML file is one line with its file and line number,
    not the parser's traceback."""
    from palikit.cli import main

    for key in ("steps", "batch_size", "grad_accum"):
        with pytest.raises(ConfigError, match=f"{key}=0 must be positive"):
            load_config(cfg | {key: 0})
    without_steps = {k: v for k, v in cfg.items() if k != "steps"}
    with pytest.raises(ConfigError, match=r"epochs=0(\.0)? must be positive"):
        load_config(without_steps | {"epochs": 0})
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: 1e-3\nsteps: [3\nbatch_size: 2\n")
    with pytest.raises(ConfigError, match=f"{broken}:3: not valid YAML"):
        load_config(broken)
    assert main(["train", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{broken}:3: not valid YAML" in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_config_errors_under_torchrun_are_said_once(cfg, tmp_path):
    """Every rank fails on the same bad config; only rank 0 prints it, and each exits 2."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg | {"steps": 0}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
           "--nproc_per_node", "2", "-m", "palikit", "train", str(path)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("palikit train: error: steps=0 must be positive") == 1, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # (the traceback after it is torchrun's own summary)


def test_qlora_fails_loudly_without_cuda_or_bitsandbytes(cfg):
    # The misspelling copied across tutorials (bnb_4bit_compute_type: transformers' BitsAndBytesConfig,
    # src/transformers/utils/quantization_config.py, ignores it) is an error, not a silent fp32.
    with pytest.raises(ConfigError, match="quantize.compute_type.*did you mean compute_dtype"):
        load_config(cfg | {"lora": {}, "quantize": {"compute_type": "bfloat16"}})
    with pytest.raises(ConfigError, match="add a `lora` section"):
        load_config(cfg | {"quantize": {}})
    with pytest.raises(ConfigError, match="unknown config field.*quantize.bits"):  # 4 bits is QLoRA
        load_config(cfg | {"lora": {}, "quantize": {"bits": 8}})
    want = "needs a CUDA GPU" if not torch.cuda.is_available() else "needs bitsandbytes"
    with pytest.raises(ConfigError, match=want):
        train(cfg | {"lora": {}, "quantize": {}, "device": "cpu" if want == "needs a CUDA GPU" else "auto"})
    assert not (Path(cfg["out_dir"]) / "step-000003").exists()


def test_schedule_and_data_order():
    t = Trainer.__new__(Trainer)
    t.cfg = load_config({"steps": 10, "lr": 1.0, "warmup": 0.2, "train_file": "x"})
    t.total_steps, t.warmup_steps = 10, 2
    lrs = [t.lr_at(s) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]  # warm-up, then cosine from step 2 of 10 down to 0 at step 10
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(7 / 8 * math.pi)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    # One global batch whatever the number of ranks; ranks hold disjoint contiguous slices.
    one = StepSampler(10, 4, 2, 0, 1, seed=3)
    two = [StepSampler(10, 4, 1, r, 2, seed=3) for r in range(2)]
    it1, it2 = iter(one), [iter(s) for s in two]
    for step in range(6):
        single = next(it1) + next(it1)
        assert single == one.global_batch(step) == next(it2[0]) + next(it2[1])
    seen = [i for s in range(5) for i in one.global_batch(s)]  # 20 positions = two epochs
    assert sorted(seen[:10]) == sorted(seen[10:]) == list(range(10)) and seen[:10] != seen[10:]
    resumed = iter(StepSampler(10, 4, 2, 0, 1, seed=3, start_step=4))
    assert next(resumed) + next(resumed) == one.global_batch(4)


# ---- what trains -----------------------------------------------------------------------------

EXPECTED = {  # trainable preset -> the rule, written out independently of TRAINABLE's regexes
    "all": lambda n: True,
    "llm-only": lambda n: n.startswith("language_model."),
    "attention-only": lambda n: n.startswith("language_model.layers.") and ".self_attn." in n,
    "projector+llm": lambda n: n.startswith(("multi_modal_projector.", "language_model.")),
}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_trainable_presets_train_exactly_their_parameters(cfg, preset):
    trainer = Trainer(load_config(cfg | {"trainable": preset, "steps": 2}))
    before = {n: p.detach().clone() for n, p in trainer.core.named_parameters()}
    trainer.train()
    trainer.cleanup()
    want = {n for n in before if EXPECTED[preset](n)}
    assert {n for n, p in trainer.core.named_parameters() if p.requires_grad} == want
    changed = {n for n, p in trainer.core.named_parameters() if not torch.equal(p, before[n])}
    assert changed == want


def test_lora_leaves_frozen_weights_bit_identical(cfg):
    trainer = Trainer(load_config(cfg | {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "steps": 3}))
    model = trainer.loss_module.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    table = param_table(model)
    trainer.train()
    trainer.cleanup()
    wrapped = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for n, _ in model.named_parameters() if ".lora_A." in n}
    expected = {f"language_model.layers.{i}.{m}" for i in range(3) for m in
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
    assert wrapped == expected  # nothing in vision_tower or the projector
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.requires_grad
        else:
            assert not p.requires_grad and torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".lora_B." in n)
    assert re.search(r"lora adapters\)\s+[\d,]+\s+[\d,]+\s+100\.00%", table)
    assert re.search(r"vision_tower\s+[\d,]+\s+0\s+0\.00%", table)


def test_param_table_counts_adapters_where_they_sit(cfg):
    """all-linear puts adapters in the vision tower too: its row shows them as trainable (it used to
    read 0, every adapter on one separate row), and the total counts each adapter once."""
    trainer = Trainer(load_config(cfg | {"lora": {"r": 4, "targets": "all-linear"}, "steps": 1}))
    try:
        model = trainer.loss_module.model
        table = param_table(model)
    finally:
        trainer.cleanup()
    rows = {line[:24].strip(): [int(v.replace(",", "")) for v in line[24:].split()[:2]]
            for line in table.splitlines()[1:]}
    vision = [p.numel() for n, p in model.named_parameters() if ".lora_" in n and "vision_tower" in n]
    assert vision and rows["vision_tower"][1] == sum(vision)
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert rows["(lora adapters)"][1] == adapters and rows["total"][0] == sum(p.numel() for p in model.parameters())


def test_lora_target_forms():
    model = PaliGemma(PaliGemmaConfig.from_name("tiny-paligemma"))
    # Tutorial lists ("q_proj", ...) would also hit SigLIP's q/k/v by name: kept to the LLM here.
    peft_model = apply_lora(model, load_config({"steps": 1, "lora": {"targets": ["q_proj", "v_proj"]},
                                                "train_file": "x"}).lora, None)
    hit = {n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert hit and all(".language_model.layers." in n and re.search(r"\.(q|v)_proj\.", n) for n in hit)
    vision = [n for n, _ in PaliGemma(PaliGemmaConfig.from_name("tiny-paligemma")).named_modules()
              if re.fullmatch(LORA_TARGETS["all-linear"], n) and n.startswith("vision_tower.")]
    assert len(vision) == 2 * 6  # only when asked: q, k, v, out, fc1, fc2 in both layers
    with pytest.raises(ConfigError, match="matches no module"):
        apply_lora(model, load_config({"steps": 1, "lora": {"targets": "nothing"}, "train_file": "x"}).lora,
                   None)


# ---- learning ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_overfits_eight_examples(cfg, data):
    result = train(cfg | {"train_file": str(data["eight"]), "eval_file": str(data["eight"]), "steps": 150,
                          "batch_size": 8, "lr": 3e-3, "warmup": 0.1, "eval_examples": 8})
    losses = _losses(cfg["out_dir"])
    assert losses[-1] < losses[0] / 10, losses[::10]
    assert result["exact_match"] == 1.0  # greedy generation reproduces every suffix
    rows = [json.loads(line) for line in data["eight"].read_text().splitlines()]
    tasks = {r["prefix"].split()[0] for r in rows}  # caption, answer, ocr, detect
    assert len(tasks) > 1 and {k: result[f"exact_match/{k}"] for k in tasks} == dict.fromkeys(tasks, 1.0)
    # ... and by each task's own metric, as `palikit eval` scores it
    assert result["accuracy/answer"] == result["first_box_acc_50/detect"] == 1.0, sorted(result)
    assert "cider/caption" in result and result["map/detect"] > 0.9
    pipe = palikit.load(Path(cfg["out_dir"]) / "final", dtype="float32")
    images = [str(data["eight"].parent / r["image"]) for r in rows]
    texts = pipe.generate(images, [r["prefix"] for r in rows], max_new_tokens=40)
    assert texts == [r["suffix"] for r in rows]
    _transformers_agrees(Path(cfg["out_dir"]) / "final", Path(cfg["out_dir"]) / "final", pipe, images[:3],
                         [r["prefix"] for r in rows[:3]])


def _transformers_agrees(base: Path, adapter: Path | None, pipe, images: list, prompts: list[str]) -> list:
    """transformers (+ peft for an adapter) with AutoProcessor reading `adapter or base` gives palikit's
    greedy tokens for `pipe`; -> palikit's tokens."""
    from peft import PeftModel
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    want = [g.tokens for _, g in pipe.generate_details(images, prompts, max_new_tokens=12)]
    model = PaliGemmaForConditionalGeneration.from_pretrained(base)
    if adapter != base:
        model = PeftModel.from_pretrained(model, str(adapter))
    processor = AutoProcessor.from_pretrained(adapter)
    for image, prompt, tokens in zip(images, prompts, want):
        inputs = processor(images=Image.open(image).convert("RGB"), text=prompt, return_tensors="pt")
        with torch.no_grad():
            out_ids = model.eval().generate(**inputs, max_new_tokens=12, do_sample=False)
        got = out_ids[0, inputs["input_ids"].shape[1]:].tolist()
        assert tokens and got[:len(tokens)] == tokens, (prompt, got, tokens)
    return want


def test_keep_best_and_early_stopping(cfg, data):
    """keep_best keeps the checkpoint of the best evaluation as out_dir/best; early_stopping ends the
    run once that many evaluations bring no better value (a learning rate too small to change
    the greedy outputs: the first evaluation stays the best)."""
    result = train(cfg | {"eval_file": str(data["eight"]), "steps": 8, "eval_every": 2, "eval_examples": 4,
                          "lr": 1e-12, "keep_best": "exact_match", "early_stopping": 1})
    out = Path(cfg["out_dir"])
    assert result["step"] == 4, "stopped at the first evaluation without a new best"
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == 2 and best["value"] == result["exact_match"]
    assert palikit.load(out / "best", dtype="float32").config.text == palikit.load(out / "final").config.text


def test_validation_config_errors(cfg, data):
    with pytest.raises(ConfigError, match="eval_metric: unknown metric 'bleu'"):
        load_config(cfg | {"eval_file": str(data["eight"]), "eval_metric": "bleu"})
    with pytest.raises(ConfigError, match="need an eval_file"):
        load_config(cfg | {"keep_best": "eval_loss"})
    with pytest.raises(ConfigError, match="needs keep_best and eval_every"):
        load_config(cfg | {"eval_file": str(data["eight"]), "early_stopping": 2})
    # keep_best is checked when the run starts, before the model (a folder that does not exist) loads
    late = {"eval_file": str(data["eight"]), "steps": 1, "eval_examples": 4, "model": str(data["eight"].parent / "none")}
    with pytest.raises(ConfigError, match="keep_best='cider' is not a validation value of this run; it can log "
                                          ".*cider/caption"):
        train(cfg | late | {"keep_best": "cider"})
    with pytest.raises(ConfigError, match="keep_best='cider/caption' .* it can log eval_loss$"):
        train(cfg | late | {"keep_best": "cider/caption", "eval_examples": 0})  # no generations: loss only


# ---- checkpoints and resume ----------------------------------------------------------------------


def _final_tensors(run_dir: Path, lora: bool) -> dict:
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    return load_file(run_dir / "final" / name)


SENTINEL = 12345.0  # a loss no run logs


def _plant_sentinel(run_dir: Path) -> None:
    """Overwrite the loss logged at step 1 (before the checkpoint a resume starts from): a resume
    that restarts at step 0 rewrites the row, a real one keeps it."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    first = next(r for r in rows if r["step"] == 1 and "loss" in r)
    first["loss"] = SENTINEL
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _with_sentinel(losses: list[float]) -> list[float]:
    return [SENTINEL, *losses[1:]]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_is_exact(cfg, tmp_path, lora):
    """Stopped after step 3, resumed from the step-2 checkpoint: the same weights and losses as an
    uninterrupted run. Catches a --resume that restarts at step 0 (the trainer's first step and the
    kept step-1 row), and one that misses weights, optimizer state, RNG (LoRA dropout) or data
    position (the final weights)."""
    extra = {"steps": 6, "save_every": 2, "keep_last": 5}
    if lora:  # dropout makes the restored RNG state matter
        extra["lora"] = {"r": 4, "dropout": 0.2}
    straight = cfg | extra | {"out_dir": str(tmp_path / "straight")}
    _run(straight)
    broken = cfg | extra | {"out_dir": str(tmp_path / "broken")}
    _run(broken | {"stop_after": 3})  # ends after step 3; the newest checkpoint is step 2
    out = tmp_path / "broken"
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000002"]
    files = sorted(p.name for p in (out / "step-000002").rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl"))], files  # no pickle anywhere
    with pytest.raises(ConfigError, match="--resume"):
        _run(broken)
    _plant_sentinel(out)
    _run(broken | {"resume": True}, starts_at=2)
    a, b = _final_tensors(tmp_path / "straight", lora), _final_tensors(out, lora)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The rows up to the checkpoint are kept, the killed run's row of step 3 is dropped.
    assert _losses(out) == _with_sentinel(_losses(tmp_path / "straight"))


def test_resume_from_a_chosen_checkpoint_warns_of_every_changed_setting(cfg, tmp_path, caplog):
    """`--resume PATH` continues from that checkpoint (not out_dir's newest) and ends with the weights
    of the uninterrupted run; a setting changed since (any that shapes the weights, here the label
    smoothing and the gradient clipping) is named in the resume warning; a folder that is no
    checkpoint is one line naming the ones there are."""
    run = cfg | {"steps": 4, "save_every": 2, "keep_last": 5, "out_dir": str(tmp_path / "run")}
    _run(run)
    first = _final_tensors(tmp_path / "run", False)
    again = train(run, resume=str(tmp_path / "run" / "step-000002"))
    assert again["step"] == 4
    b = _final_tensors(tmp_path / "run", False)
    assert all(torch.equal(first[k], b[k]) for k in first)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="palikit.finetune.recipe"):
        train(run | {"label_smoothing": 0.1, "clip_grad": 0.5}, resume=str(tmp_path / "run" / "step-000002"))
    warned = " ".join(r.getMessage() for r in caplog.records if "resuming" in r.getMessage())
    assert "label_smoothing (0.0 -> 0.1)" in warned and "clip_grad (1.0 -> 0.5)" in warned
    assert "out_dir" not in warned and "resume" not in warned.split("with changed")[1]
    with pytest.raises(ConfigError, match=r"--resume .*nothing: not a checkpoint folder .* step-000002, step-000004"):
        train(run, resume=str(tmp_path / "nothing"))


# A training run that hangs inside the optimizer save of step `stop_at`, once it has said so on
# stdout: the parent kills it there, so the kill always lands mid-save (no timing window).
HANG_IN_SAVE = textwrap.dedent("""
    import sys
    import palikit.finetune.checkpoint as ckpt
    from palikit.cli import main

    config, stop_at = sys.argv[1], int(sys.argv[2])
    save = ckpt.save_optimizer

    def save_then_hang(state, folder):
        save(state, folder)
        if folder.name == f".step-{stop_at:06d}.tmp":
            print("saving", flush=True)
            sys.stdin.read()  # until killed

    ckpt.save_optimizer = save_then_hang
    raise SystemExit(main(["train", config]))
""")


@pytest.mark.slow
def test_resume_after_sigkill(cfg, tmp_path):
    """A real kill -9 inside a checkpoint save (step 3's, half-written) still resumes to identical
    weights from step 2. Catches a resume that leaves the half-written .step-*.tmp folder behind,
    and one that restarts at step 0 (the kept step-1 row)."""
    extra = {"steps": 6, "save_every": 1, "keep_last": 2}
    _run(cfg | extra | {"out_dir": str(tmp_path / "straight")})
    out = tmp_path / "killed"
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(cfg | extra | {"out_dir": str(out)}))
    kill_when_it_says(["-c", HANG_IN_SAVE, str(path), "3"], "saving", cwd=ROOT,
                      env={**os.environ, "OMP_NUM_THREADS": "1"})  # inside step 3's save
    assert (out / ".step-000003.tmp" / "optimizer.safetensors").exists()  # the half-written save
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000001", "step-000002"]
    # And one this run would never write again (as a killed run with more steps leaves).
    shutil.copytree(out / ".step-000003.tmp", out / ".step-000009.tmp")
    _plant_sentinel(out)
    _run(cfg | extra | {"out_dir": str(out), "resume": True}, starts_at=2)
    a, b = _final_tensors(tmp_path / "straight", False), _final_tensors(out, False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.glob(".step-*"))  # both half-written folders are gone
    assert _losses(out) == _with_sentinel(_losses(tmp_path / "straight"))


def test_lora_checkpoints_are_saved_offline(cfg, monkeypatch):
    """A LoRA run whose base is named like a Hub id saves its adapters without asking the Hub
    (peft's save_embedding_layers="auto" would)."""
    import peft.utils.save_and_load as peft_save

    def no_network(*args, **kwargs):
        raise AssertionError("peft asked the Hub while saving")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_network)
    monkeypatch.setattr(Trainer, "_save_base", lambda self, core: "google/paligemma2-3b-pt-224")
    assert train(cfg | {"lora": {"r": 2}, "steps": 1})["step"] == 1


def test_merge_lora(cfg, tmp_path, tiny_model_dir, capsys):
    """LoRA on a checkpoint, then merged: the merged model computes what base + adapters do."""
    run = cfg | {"model": str(tiny_model_dir), "lora": {"r": 4, "alpha": 32, "targets": "llm+projector"},
                 "steps": 3, "lr": 1e-2}
    _run(run)
    adapter = Path(run["out_dir"]) / "final"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    merged = merge(tiny_model_dir, adapter, tmp_path / "merged")

    images = [str(Path(cfg["train_file"]).parent / "images" / "train_000000.png")]
    args = (images, ["caption en"], ["a red circle"])
    base = palikit.load(tiny_model_dir, dtype="float32", logit_softcap="off")  # as the adapters trained
    plain = base.score(*args)
    load_adapter(base.model, adapter)  # injects the (unmerged) adapters into base.model
    want = base.score(*args)
    got = palikit.load(merged, dtype="float32").score(*args)
    assert got == pytest.approx(want, abs=1e-4) and want != pytest.approx(plain, abs=1e-3)
    # Without merging first: the adapter folder as the model (it names its base), or the base with
    # --adapter; on every verb, as the flag comes from palikit.Options.
    for pipe in (palikit.load(adapter, dtype="float32"), palikit.load(tiny_model_dir, dtype="float32", adapter=adapter)):
        assert pipe.score(*args) == pytest.approx(want, abs=1e-4)
        assert pipe.options.adapter == str(adapter)
    from palikit.cli import main

    caption = palikit.load(merged, dtype="float32").caption(images[0], max_new_tokens=5)
    capsys.readouterr()
    for argv in (["--model", str(adapter)], ["--model", str(tiny_model_dir), "--adapter", str(adapter)]):
        assert main(["caption", images[0], "--dtype", "float32", "--max-new-tokens", "5", *argv]) == 0
        assert capsys.readouterr().out.strip() == caption
    with pytest.raises(palikit.InputError, match="does not name its base"):
        bare = tmp_path / "bare"
        shutil.copytree(adapter, bare)
        (bare / "adapter_config.json").write_text(json.dumps(adapter_config | {"base_model_name_or_path": None}))
        palikit.load(bare)

    # merge's bad input: each one line, --out checked before anything loads, nothing half-written
    with pytest.raises(palikit.InputError, match="merged exists; --force replaces it"):
        merge(tmp_path / "no-such-base", adapter, merged)
    assert merge(tiny_model_dir, adapter, merged, force=True) == merged
    other = tmp_path / "other-base"  # another width
    config = json.loads((tiny_model_dir / "config.json").read_text())
    wide = PaliGemma(PaliGemmaConfig.from_name("tiny-paligemma2", text={"hidden_size": 96})).eval()
    Pipeline(wide, Tokenizer(tiny_model_dir / "tokenizer.model", image_token_id=config["image_token_index"])).save(other)
    with pytest.raises(palikit.CheckpointError, match=r"does not fit this base model: \S+ lora_[AB] is \(\d+, \d+\) "
                                                      r"in the adapter, \(\d+, \d+\) here"):
        merge(other, adapter, tmp_path / "wrong")
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "wrong").exists()


# ---- shipped configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_parses_and_smoke_runs(path, tmp_path, data, tokenizer_file):
    """Every config parses; then the same recipe runs 2 steps, with a tiny model of its family in
    place of a hub checkpoint and test files in place of data or tokenizers that are not here."""
    header = path.read_text().split("\n\n")[0]
    assert f"palikit train configs/{path.name}" in header  # the run command sits in the header
    cfg = load_config(path)
    overrides = [f"out_dir={tmp_path / 'run'}"]
    model = dict(cfg.model) if isinstance(cfg.model, dict) else {"source": cfg.model}
    if "source" in model and not Path(model["source"]).exists():
        family = "tiny-paligemma2" if "paligemma2" in model.pop("source") else "tiny-paligemma"
        model |= {"preset": family, "tokenizer": str(tokenizer_file)}
    if model.get("tokenizer") not in (None, "train") and not Path(model["tokenizer"]).exists():
        model["tokenizer"] = str(tokenizer_file)
    overrides.append(f"model={json.dumps(model)}")
    for key, test_file in (("train_file", data["train"]), ("eval_file", data["eight"])):
        value = getattr(cfg, key)
        if isinstance(value, DataSpec) and value.path is not None and not Path(value.path).exists():
            overrides.append(f"{key}={test_file}")
    result = train(path, overrides, smoke=True)
    assert result["step"] == 2 and result["loss"] > 0
    assert (smoke_dir(str(tmp_path / "run")) / "final").is_dir()  # a folder of its own
    assert not (tmp_path / "run").exists()


# ---- torchrun ------------------------------------------------------------------------------------


def _torchrun(config: dict, path: Path, *args: str, script: Path | None = None) -> None:
    """Two ranks on gloo, running `palikit train` (or `script`). --standalone binds its store to a
    free port of this run; --local-addr names loopback so the ranks do not depend on how this
    host's name resolves."""
    path.write_text(yaml.safe_dump(config))
    entry = [str(script)] if script else ["-m", "palikit", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
           "--nproc_per_node", "2", *entry, str(path), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    # What a failing rank printed (a Python traceback, or a C++ `terminate called ...` before a
    # SIGABRT) comes before torchrun's own traceback and summary: show it, not only the summary.
    ranks = proc.stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0]
    assert proc.returncode == 0, ranks[-6000:] + "\n...\n" + proc.stderr[-1500:]


# SGD without clipping: AdamW's normalised steps and clipping hide a wrong 1/world or 1/grad_accum
# gradient factor; plain SGD turns it into a 2x larger or smaller update (lr high enough to see it).
OPTIMIZERS = {"adamw": {"clip_grad": 1.0}, "sgd": {"optimizer": "sgd", "clip_grad": None, "lr": 0.5}}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_matches_single_process(cfg, tmp_path, mode, optimizer):
    """2 ranks x 1 micro-batch of 2 == 1 rank x 2 micro-batches of 2: same global batch, same curve.
    Catches a gradient averaged over ranks or micro-batches with the wrong factor (the sgd case)."""
    base = cfg | {"steps": 4, "batch_size": 4} | OPTIMIZERS[optimizer]
    _run(base | {"grad_accum": 2, "out_dir": str(tmp_path / "single")})
    _torchrun(base | {"grad_accum": 1, "distributed": mode, "out_dir": str(tmp_path / "dist")},
              tmp_path / "dist.yaml")
    state = json.loads((tmp_path / "dist" / "step-000004" / "state.json").read_text())
    assert state["world_size"] == 2
    single, dist = _losses(tmp_path / "single"), _losses(tmp_path / "dist")
    assert len(dist) == 4
    assert dist == pytest.approx(single, abs=1e-5), [a - b for a, b in zip(dist, single)]
    a, b = _final_tensors(tmp_path / "single", False), _final_tensors(tmp_path / "dist", False)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# Rank 1 writes its RNG file only once rank 0, having written its own, waits in a barrier: a rank 0
# that renames the checkpoint folder without waiting for the other ranks has renamed it by then.
SLOW_RANK_1 = textwrap.dedent("""
    import os
    import sys
    import time
    from pathlib import Path

    import palikit.finetune.checkpoint as ckpt
    import palikit.dist as ranks
    from palikit.cli import main

    rank, waiting = int(os.environ["RANK"]), Path(sys.argv[1]).with_suffix(".rank0-waits")
    save_rng, barrier, saved = ckpt.save_rng, ranks.barrier, []

    def late_save_rng(path):
        while rank == 1 and not waiting.exists():
            time.sleep(0.01)
        save_rng(path)
        saved.append(path)

    def barrier_after_save():
        if rank == 0 and saved:
            waiting.touch()
        barrier()

    ckpt.save_rng, ranks.barrier = late_save_rng, barrier_after_save
    raise SystemExit(main(["train", *sys.argv[1:]]))
""")


@pytest.mark.slow
def test_ddp_checkpoint_waits_for_every_rank(cfg, tmp_path):
    """Under DDP, rank 0 publishes a checkpoint only after every rank has written into it. Catches a
    save that renames the folder while another rank is still writing its RNG state (seen as a
    'No such file or directory' in rank 1 on a busy machine)."""
    script = tmp_path / "slow_rank_1.py"
    script.write_text(SLOW_RANK_1)
    config = cfg | {"steps": 2, "batch_size": 4, "save_every": 1, "distributed": "ddp",
                    "out_dir": str(tmp_path / "run")}
    _torchrun(config, tmp_path / "ddp.yaml", script=script)
    for step in ("step-000001", "step-000002"):
        assert {p.name for p in (tmp_path / "run" / step).glob("rng-rank*")} == {"rng-rank0.safetensors",
                                                                                "rng-rank1.safetensors"}


@pytest.mark.slow
def test_fsdp_resume_is_exact(cfg, tmp_path):
    """Sharded state (FSDP2 DTensors) gathered into the checkpoint and sharded again on resume.
    Catches a resume that restarts at step 0 (the kept step-1 row) or misses the sharded state."""
    base = cfg | {"steps": 4, "batch_size": 4, "save_every": 2, "distributed": "fsdp"}
    _torchrun(base | {"out_dir": str(tmp_path / "straight")}, tmp_path / "a.yaml")
    broken = base | {"out_dir": str(tmp_path / "broken")}
    _torchrun(broken | {"stop_after": 3}, tmp_path / "b.yaml")
    _plant_sentinel(tmp_path / "broken")
    _torchrun(broken, tmp_path / "c.yaml", "--resume")
    a, b = _final_tensors(tmp_path / "straight", False), _final_tensors(tmp_path / "broken", False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "broken") == _with_sentinel(_losses(tmp_path / "straight"))


def test_lora_adapter_loads_in_transformers_and_peft(tmp_path):
    """A LoRA trained by palikit on the bundled model, loaded as users of transformers do:
    PaliGemmaForConditionalGeneration (base folder) + peft's PeftModel (adapter folder) + AutoProcessor
    (the adapter folder has the processor files too) gives palikit's greedy tokens, which the adapter
    changed."""
    base = tmp_path / "base"
    palikit.load("default", dtype="float32").save(base)
    data = generate_dataset(tmp_path / "data", 3, seed=5, size=96)
    out = tmp_path / "run"
    train({"model": str(base), "train_file": str(data), "out_dir": str(out), "steps": 6, "batch_size": 4,
           "lr": 3e-2, "warmup": 0, "lora": {"r": 8, "alpha": 16, "targets": "llm"}})
    adapter = out / "final"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert all(t.startswith("model.language_model.layers.") for t in config["target_modules"])

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows = [r for r in rows if r["task"] in ("caption", "count", "colour", "ocr")][:6]
    images, prompts = [str(data.parent / r["image"]) for r in rows], [r["prefix"] for r in rows]
    plain = palikit.load(base, dtype="float32")
    before = [g.tokens for _, g in plain.generate_details(images, prompts, max_new_tokens=12)]
    load_adapter(plain.model, adapter)
    assert _transformers_agrees(base, adapter, plain, images, prompts) != before, "the adapter changes outputs"


def test_train_refuses_bad_data_before_the_model_loads(cfg, data, tmp_path):
    """`<loc1024>` and a missing image stop the run with the data check's finding, before the model
    (here a folder that does not exist) is even looked at; allow_data_errors skips and counts the
    broken examples (an unreadable line too) and trains on the rest."""
    rows = [json.loads(line) for line in data["eight"].read_text().splitlines()]
    for r in rows:
        r["image"] = str(data["eight"].parent / r["image"])
    rows[1]["suffix"] = "<loc1024><loc0000><loc0100><loc0100> circle"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"train_file .*bad.jsonl: 1 data error\(s\), e.g. .*bad.jsonl:2: loc-range"):
        train(cfg | {"train_file": str(bad), "model": str(tmp_path / "no-such-model")})
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(rows[0] | {"image": "gone.png"}) + "\n")
    with pytest.raises(ConfigError, match="eval_file .*missing-image: image not found"):
        train(cfg | {"eval_file": str(missing)})
    with bad.open("a") as f:  # and a line that is not JSON, and one whose image is gone
        f.write("{not json\n" + json.dumps(rows[0] | {"image": "gone.png"}) + "\n")
    result = train(cfg | {"train_file": str(bad), "eval_file": str(missing), "steps": 1, "allow_data_errors": True})
    assert result["step"] == 1  # trained on the examples left: the broken ones skipped and counted
    assert result["skipped_examples"] == {"train_file": 3, "eval_file": 1}


@pytest.mark.slow
def test_fsdp_trains_the_shipped_lora_recipe(cfg, tmp_path):
    """configs/hf_lora.yaml's precision under FSDP2 on 2 ranks: a bfloat16 base with float32 LoRA
    adapters (once refused: FSDP2 shards one dtype per group, so the adapters are groups of their
    own), equal to one process with the same global batch."""
    recipe = yaml.safe_load((ROOT / "configs" / "hf_lora.yaml").read_text())
    base = cfg | {"steps": 3, "batch_size": 4, "lr": 1e-2, "dtype": recipe["dtype"], "autocast": recipe["autocast"],
                  "lora": recipe["lora"] | {"r": 4}}
    _run(base | {"grad_accum": 2, "out_dir": str(tmp_path / "single")})
    _torchrun(base | {"grad_accum": 1, "distributed": "fsdp", "out_dir": str(tmp_path / "dist")}, tmp_path / "d.yaml")
    single, dist = _losses(tmp_path / "single"), _losses(tmp_path / "dist")
    assert len(dist) == 3 and dist == pytest.approx(single, rel=1e-3), (dist, single)
    assert single[-1] != single[0], "the adapters train"
    adapter = json.loads((tmp_path / "dist" / "final" / "adapter_config.json").read_text())
    assert adapter["target_modules"], "the FSDP run saved its adapters"


def test_train_from_a_datasets_folder(cfg, data, tmp_path):
    """train_file as a Hugging Face save_to_disk folder with its own column names, mapped in the config."""
    import datasets

    rows = [json.loads(line) for line in data["eight"].read_text().splitlines()]
    table = {"img": [str(data["eight"].parent / r["image"]) for r in rows], "q": [r["prefix"] for r in rows],
             "a": [r["suffix"] for r in rows]}
    src = tmp_path / "hf"
    datasets.Dataset.from_dict(table).cast_column("img", datasets.Image()).save_to_disk(str(src))
    spec = {"path": str(src), "columns": {"image": "img", "prefix": "q", "suffix": "a"}}
    result = train(cfg | {"train_file": spec, "eval_file": spec, "steps": 2, "eval_examples": 2})
    assert result["step"] == 2 and "eval_loss" in result


@pytest.mark.slow
def test_metrics_reach_wandb_and_mlflow_offline(cfg, tmp_path, monkeypatch):
    """log_to: the same numbers as metrics.jsonl in an offline W&B run and a local MLflow store, one
    run each per out_dir, continued by a resumed run."""
    from mlflow.tracking import MlflowClient

    from palikit.finetune.config import LOGGERS
    from palikit.finetune.recipe import _SINKS

    assert set(_SINKS) == set(LOGGERS)
    import wandb

    sent, log = [], wandb.Run.log
    monkeypatch.setattr(wandb.Run, "log", lambda self, values, step=None, **kw: (sent.append((step, values)),
                                                                                log(self, values, step=step, **kw)))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = cfg | {"steps": 2, "save_every": 2, "log_to": ["wandb", "mlflow"]}
    train(run)
    train(run | {"steps": 3}, resume=True)
    out = Path(cfg["out_dir"])
    client = MlflowClient(f"sqlite:///{(out / 'mlflow.db').resolve()}")
    run_id = (out / "mlflow_run_id").read_text().strip()
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert history == [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                       if "loss" in r]
    assert len(history) == 3 and client.get_run(run_id).data.params["lr"] == str(cfg["lr"])
    wandb_id = (out / "wandb_run_id").read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(runs) == 2 and all(list(r.glob("*.wandb")) for r in runs), "both runs logged under one id"
    assert [(step, v["loss"]) for step, v in sent if "loss" in v] == history
    with pytest.raises(ConfigError, match="log_to: 'comet' is not one of tensorboard, wandb, mlflow"):
        load_config(cfg | {"log_to": ["comet"]})
