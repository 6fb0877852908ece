"""Every `palikit` verb through the command line, against what the Python API gives for the same
request: generate, the task verbs, train (with --set, --resume, --smoke), merge, data check, eval
and serve (its defaults: 127.0.0.1, no key). Errors are one line and exit status 2."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import load_file

import palikit
from palikit import generate as gen
from palikit import kernels
from palikit.cli import main
from palikit.synthetic import generate_dataset

from .conftest import synthetic_image


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return palikit.load(tiny_model_dir, dtype="float32")


def printed_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_and_task_verbs_print_what_the_api_returns(pipe, tiny_model_dir, tmp_path, capsys):
    img = tmp_path / "img.png"
    synthetic_image(0).save(img)
    model = ["--model", str(tiny_model_dir), "--dtype", "float32"]
    assert main(["generate", *model, "--image", str(img), "--prompt", "caption en", "--max-new-tokens", "3",
                 "--json"]) == 0
    (text, g), = pipe.generate_details(str(img), "caption en", max_new_tokens=3)
    assert printed_json(capsys) == {"prompt": "caption en", "text": text, "tokens": g.tokens,
                                    "logprob": pytest.approx(sum(g.logprobs)), "finish_reason": g.finish_reason}
    assert g.finish_reason in ("eos", "length")
    assert main(["caption", str(img), *model, "--lang", "fr", "--json"]) == 0
    assert printed_json(capsys) == {"text": pipe.caption(str(img), lang="fr")}
    assert main(["segment", str(img), "circle", *model, "--json", "--out", str(tmp_path / "o.png")]) == 0
    assert printed_json(capsys) == [s.to_dict() for s in pipe.segment(str(img), "circle")]
    assert (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_compile_flag_gives_the_same_text(pipe, tiny_model_dir, tmp_path, capsys, monkeypatch):
    compiled = []
    monkeypatch.setattr(gen, "DecodeStep", lambda model, compile=False, real=gen.DecodeStep, **kw: (
        compiled.append(compile), real(model, compile, **kw))[1])
    img = tmp_path / "img.png"
    synthetic_image(1).save(img)
    argv = ["generate", "--model", str(tiny_model_dir), "--dtype", "float32", "--image", str(img), "--prompt",
            "caption en", "--max-new-tokens", "6", "--json"]
    assert main(argv) == 0
    eager = printed_json(capsys)
    assert main([*argv, "--compile"]) == 0
    eager["logprob"] = pytest.approx(eager["logprob"], abs=1e-4)
    used = kernels.compile_pays(pipe.model.device) is None  # not on a CPU where it does not pay
    assert printed_json(capsys) == eager and len(eager["tokens"]) > 2 and compiled == [False, used]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/nonexistent/model", "--image", "x.png", "--prompt", "caption en"],
     "not found"),
    (["caption", "missing.png"], "not found"),
])
def test_cli_errors_are_one_line(argv, message, tiny_model_dir, capsys):
    if argv[0] == "caption":
        argv = argv + ["--model", str(tiny_model_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_corrupt_image(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["caption", str(bad), "--model", str(tiny_model_dir)]) == 2
    assert "not a readable image" in capsys.readouterr().err


# ---- train, merge, data check ------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("synth"), 2, seed=0, size=64)


def write_config(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def test_train_verb_takes_overrides_resume_and_smoke(train_file, tokenizer_file, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml",
                          model={"preset": "tiny-paligemma2", "tokenizer": str(tokenizer_file)},
                          train_file=str(train_file), out_dir=str(out), steps=50, batch_size=2, lr=1e-3,
                          max_text_len=64, save_every=1)
    assert main(["train", str(config), "--set", "steps=2"]) == 0  # --set wins over the file
    assert printed_json(capsys)["step"] == 2 and (out / "final" / "model.safetensors").exists()
    assert main(["train", str(config), "--set", "steps=2"]) == 2  # a finished run is not overwritten
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(config), "--set", "steps=3", "--resume"]) == 0
    assert printed_json(capsys)["step"] == 3
    assert json.loads((out / "step-000003" / "state.json").read_text())["step"] == 3
    before = sorted(p.name for p in out.iterdir())
    assert main(["train", str(config), "--smoke"]) == 0  # beside a finished run: in a folder of its own
    assert printed_json(capsys)["step"] == 2  # a smoke run is 2 steps whatever the config says
    assert sorted(p.name for p in out.iterdir()) == before
    (tmp_path / "file").write_text("")
    for setting, message in [("warmup=-1", "warmup=-1"), ("lr=0", "lr=0"), (f"out_dir={tmp_path / 'file'}", "is a file")]:
        assert main(["train", str(config), "--set", setting]) == 2
        assert message in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "gone.png", "prefix": "caption en", "suffix": "x"}) + "\n")
    argv = ["train", str(config), "--set", f"train_file={bad}", "--set", f"out_dir={tmp_path / 'bad'}"]
    assert main(argv) == 2 and "missing-image" in capsys.readouterr().err  # checked before the model loads
    assert main([*argv, "--allow-data-errors", "--smoke"]) == 2  # skipped: nothing is left to train on
    err = capsys.readouterr().err
    assert "all 1 were broken (allow_data_errors skipped them)" in err, err


def test_merge_verb_writes_what_merge_writes(tiny_model_dir, train_file, tmp_path, capsys):
    from palikit.finetune import merge

    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", model=str(tiny_model_dir), train_file=str(train_file),
                          out_dir=str(out), steps=2, batch_size=2, lr=1e-2, max_text_len=64, lora={"r": 4})
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(out / "final"), "--out",
                 str(tmp_path / "merged")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    direct = load_file(merge(tiny_model_dir, out / "final", tmp_path / "direct") / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert merged.keys() == direct.keys() and all((merged[k] == direct[k]).all() for k in merged)
    assert any(not (merged[k] == base[k]).all() for k in merged)  # the adapters are in it


def test_data_check_verb_exit_status_and_report(train_file, tokenizer_file, tmp_path, capsys):
    assert main(["data", "check", str(train_file), "--model", "tiny-paligemma2", "--tokenizer",
                 str(tokenizer_file), "--json"]) == 0
    report = printed_json(capsys)
    assert report["ok"] and report["examples"] == len(train_file.read_text().splitlines())
    assert report["text_tokens"]["max"] > 0  # lengths were checked with the tokenizer
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "gone.png", "prefix": "caption en", "suffix": "x"}) + "\n")
    assert main(["data", "check", str(bad)]) == 1
    assert "missing-image" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "nothing.jsonl")]) == 2


def test_eval_verb_passes_its_options(tmp_path, capsys, monkeypatch):
    """--synthetic/--seed/--size reach the synthetic reader, --batch-size the runner; the report
    printed with --json is the one written beside --out."""
    from palikit import evaluate

    calls, read, run = [], evaluate.read_synthetic, evaluate.evaluate

    def reader(**kw):
        calls.append(kw)
        return read(**kw)

    def runner(pipe, examples, **kw):
        calls.append(kw["batch_size"])
        return run(pipe, examples, **kw)

    monkeypatch.setattr(evaluate, "read_synthetic", reader)
    monkeypatch.setattr(evaluate, "evaluate", runner)
    path = tmp_path / "preds.jsonl"
    assert main(["eval", "--model", "default", "--dtype", "float32", "--synthetic", "4", "--seed", "7",
                 "--size", "80", "--batch-size", "3", "--out", str(path), "--json"]) == 0
    assert calls == [{"n_images": 4, "seed": 7, "size": 80}, 3]
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(path.with_suffix(".report.json").read_text())
    assert {r["group"]: r["examples"] for r in printed["results"]}["caption"] == 4


# ---- serve -----------------------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch):
    """Run `palikit serve` up to uvicorn.run, which records what it was given instead of serving."""
    import uvicorn

    calls, threads = [], torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() + 1)  # none of the counts serve may choose
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw | {"threads": torch.get_num_threads()})))
    monkeypatch.delenv("PALIKIT_API_KEY", raising=False)
    yield calls
    torch.set_num_threads(threads)  # serve sets the process's torch threads


def test_serve_verb_binds_localhost_without_a_key_by_default(served, tiny_model_dir):
    assert main(["serve", "--model", str(tiny_model_dir), "--dtype", "float32"]) == 0
    (app, kw), = served
    assert (kw["host"], kw["port"]) == ("127.0.0.1", 8000)
    assert kw["threads"] == max(1, os.cpu_count() - 1), "a core is left to the HTTP loop"
    with TestClient(app) as c:
        health = c.get("/health").json()
        assert health["auth"] is False and health["model"] == tiny_model_dir.name
        r = c.post("/v1/ocr", json={"image": "/etc/hostname"})  # no server-side paths by default
        assert r.status_code == 400 and "disabled" in r.json()["error"]["message"]


def test_serve_verb_options(served, tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setenv("PALIKIT_API_KEY", "from-env")
    assert main(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0", "--port", "9123",
                 "--max-batch", "3", "--max-queue", "5", "--threads", str(os.cpu_count() + 2)]) == 0
    with caplog.at_level(logging.WARNING, logger="palikit.serve"):
        assert main(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0"]) == 0
    assert "without an API key" not in caplog.text  # the key came from the environment
    (app, kw), _ = served
    assert (kw["host"], kw["port"], kw["threads"]) == ("0.0.0.0", 9123, os.cpu_count() + 2)
    with TestClient(app) as c:
        assert c.get("/health").json() | {"model": None} == {"status": "ok", "model": None, "auth": True,
                                                              "queue_depth": 0, "max_batch": 3, "adapters": [],
                                                              "max_len": 512, "image_tokens": 16}
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    assert app.state.palikit.batcher.max_queue == 5
    monkeypatch.delenv("PALIKIT_API_KEY")
    with caplog.at_level(logging.WARNING, logger="palikit.serve"):
        assert main(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0"]) == 0
    assert "without an API key" in caplog.text


def test_every_folder_palikit_writes_is_a_complete_model(tiny_model_dir, train_file, tmp_path):
    """Pipeline.save, the trainer's final/ (full and LoRA) and merge each write config, weights,
    tokenizer, preprocessor config and the mask codec: reloaded, the resize filter is still the
    source's (bilinear here) and segment works and gives the same masks. Catches a saved folder that
    falls back to bicubic or loses the codec."""
    import shutil

    from palikit.finetune import merge

    source = tmp_path / "source"
    shutil.copytree(tiny_model_dir, source)
    (source / "preprocessor_config.json").write_text(json.dumps({"resample": 2}))  # bilinear
    pipe = palikit.load(source, dtype="float32")
    img = synthetic_image(3, size=(50, 40))  # not the model's size: the filter matters

    def assert_complete(folder: Path, same_as=None) -> None:
        got = palikit.load(folder, dtype="float32")
        assert got.config.resample == "bilinear" and got.codec_path is not None, folder
        segs = got.segment(img, "circle", max_new_tokens=24)
        assert all(s.mask.any() for s in segs)
        if same_as is not None:
            assert got.generate(img, "caption en", 8) == same_as.generate(img, "caption en", 8)
            want = same_as.segment(img, "circle", max_new_tokens=24)
            assert [s.to_dict() for s in segs] == [s.to_dict() for s in want]

    pipe.save(tmp_path / "saved")
    assert_complete(tmp_path / "saved", same_as=pipe)
    for name, extra in [("full", {}), ("lora", {"lora": {"r": 4}})]:
        out = tmp_path / name
        config = write_config(tmp_path / f"{name}.yaml", model=str(source), train_file=str(train_file),
                              out_dir=str(out), steps=2, batch_size=2, lr=1e-2, max_text_len=64, **extra)
        assert main(["train", str(config)]) == 0
        if name == "full":
            assert_complete(out / "final")
        else:
            pre = json.loads((out / "final" / "preprocessor_config.json").read_text())
            assert pre["resample"] == 2 and (out / "final" / "mask_codec.npz").exists()
            assert_complete(merge(source, out / "final", tmp_path / "merged"))
    assert (tmp_path / "saved" / "mask_codec.npz").read_bytes() == (source / "mask_codec.npz").read_bytes()


@pytest.fixture(scope="module")
def codecless_model(tiny_model_dir, tmp_path_factory):
    import shutil

    folder = tmp_path_factory.mktemp("no_codec")
    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy(tiny_model_dir / f, folder / f)
    return folder


def test_cli_checks_arguments_as_the_server_checks_requests(tiny_model_dir, codecless_model, tmp_path, capsys):
    """Each bad argument is one line naming it, exit 2, before any model work: an empty prompt or
    label, sampling out of the server's ranges, --synthetic 0, a --vae that is no npz, segment
    without a codec (the advice names --vae), CUDA on a CPU-only torch, --json where it does nothing.
    Catches the CLI printing an answer for an empty prompt, silently clamping a temperature, or a
    numpy "pickled data" message."""
    import torch

    img = tmp_path / "img.png"
    synthetic_image(0).save(img)
    (tmp_path / "not.npz").write_bytes(b"\x89PNG\r\n\x1a\n not a zip")
    model = ["--model", str(tiny_model_dir), "--dtype", "float32"]
    gen = ["generate", *model, "--image", str(img)]
    cases = [
        (gen + ["--prompt", ""], "--prompt: must not be empty"),
        (gen + ["--prompt", "  "], "--prompt: must not be empty"),
        (gen + ["--prompt", "caption en", "--temperature", "-1"], "--temperature: -1 is out of range"),
        (gen + ["--prompt", "caption en", "--temperature", "2.5"], "--temperature: 2.5 is out of range"),
        (gen + ["--prompt", "caption en", "--top-p", "0"], "--top-p: 0 is out of range"),
        (gen + ["--prompt", "caption en", "--max-new-tokens", "0"], "--max-new-tokens: 0 is out of range"),
        (gen + ["--prompt", "caption en", "--num-beams", "x"], "--num-beams: 'x' is not an integer"),
        (["detect", str(img), "", *model], "labels: must not be empty"),
        (["eval", *model, "--synthetic", "0"], "--synthetic: 0 is out of range"),
        (["run", *model, "--input", "j", "--output", "o", "--json"], "unrecognized arguments: --json"),
        (["eval", *model, "--limit", "0"], "--limit: 0 is out of range"),
        (["segment", str(img), "cat", *model, "--vae", str(tmp_path / "not.npz")], "is not an .npz file"),
        (["segment", str(img), "cat", "--model", str(codecless_model)], "pass --vae PATH"),
    ]
    if not torch.cuda.is_available():
        cases.append((["serve", "--model", str(tiny_model_dir), "--device", "cuda"],
                      "CUDA is not available in this PyTorch build"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA build with a GPU can load on cuda")
def test_load_on_cuda_without_cuda_is_one_clear_error(tiny_model_dir):
    with pytest.raises(palikit.InputError, match="CUDA is not available in this PyTorch build"):
        palikit.load(tiny_model_dir, device="cuda")
    with pytest.raises(palikit.InputError, match="unknown device 'gpu'"):
        palikit.load(tiny_model_dir, device="gpu")


def test_help_says_what_palikit_is(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "run, fine-tune, evaluate and serve" in out and "plain functions" not in out.split("\n\n")[1]


def test_data_check_model_takes_what_every_verb_takes(train_file, capsys):
    """`--model default` (the bundled model) works in data check as in every other verb, and its
    tokenizer is used to check lengths."""
    assert main(["data", "check", str(train_file), "--model", "default", "--json"]) == 0
    report = printed_json(capsys)
    assert report["ok"] and report["text_tokens"]["max"] > 0


def test_run_stops_with_one_line_only_for_problems_of_the_run_itself(tiny_model_dir, tmp_path, capsys):
    """A missing model, an output that cannot be written: one line, exit 2, nothing half-done. (A bad
    job is only that job's error record: tests/test_api.py.)"""
    synthetic_image(0).save(tmp_path / "0.png")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": "0.png", "task": "ocr"}) + "\n")
    model = ["--model", str(tiny_model_dir), "--dtype", "float32"]
    for argv, message in [
        (["run", "--model", str(tmp_path / "nothing"), "--input", str(jobs), "--output", str(tmp_path / "o")],
         "model not found"),
        (["run", *model, "--input", str(jobs), "--output", str(tmp_path / "no" / "such" / "dir.jsonl")],
         "No such file or directory"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)


def test_task_verbs_print_the_confidence(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The CLI shows the same confidence as the JSON (exp of the mean log-prob), not the log-prob."""
    import math

    from palikit.api import Pipeline
    from palikit.generate import Generated

    def answer(self, images, prompts, **kw):
        ids = self.tokenizer.encode("<loc0000><loc0000><loc0511><loc0511> circle")
        return [(self.tokenizer.decode(ids), Generated(ids, [-0.5] * len(ids)))]

    monkeypatch.setattr(Pipeline, "generate_details", answer)
    synthetic_image(0).save(tmp_path / "0.png")
    assert main(["detect", str(tmp_path / "0.png"), "circle", "--model", str(tiny_model_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"circle: 0, 0, 20, 15 ({math.exp(-0.5):.2f})"


def test_every_option_is_a_flag_and_reaches_load_and_the_server(tiny_model_dir, monkeypatch):
    """palikit.Options and ServerSettings are the one definition: each field is a --flag of every verb
    that loads a model (and of serve), the flags build the same dataclass, and /v1/models says the
    options the model was loaded with."""
    import dataclasses

    from palikit.cli import build_parser
    from palikit.options import Options, ServerSettings, from_flags
    from palikit.serve import create_app

    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    for verb in ("generate", "caption", "detect", "run", "eval", "demo", "serve"):
        flags = set(verbs[verb]._option_string_actions)
        assert {"--" + f.name.replace("_", "-") for f in dataclasses.fields(Options)} <= flags, verb
    serve_flags = set(verbs["serve"]._option_string_actions)
    assert {"--" + f.name.replace("_", "-") for f in dataclasses.fields(ServerSettings) if f.metadata["flag"]} <= serve_flags
    args = parser.parse_args(["caption", "x.png", "--dtype", "float32", "--quantize", "int4", "--group-size", "64",
                              "--compile", "--attention", "eager", "--logit-softcap", "off", "--sliding-window"])
    assert from_flags(args, Options) == Options(dtype="float32", quantize="int4", group_size=64, compile=True,
                                                attention="eager", logit_softcap="off", sliding_window=True)
    args = parser.parse_args(["serve", "--port", "9000", "--max-batch", "3", "--allow-urls"])
    assert from_flags(args, ServerSettings) == ServerSettings(port=9000, max_batch=3, allow_urls=True)
    pipe = palikit.load(tiny_model_dir, dtype="float32")
    with TestClient(create_app(pipe, model_name="tiny")) as c:
        card = c.get("/v1/models").json()["data"][0]
    assert card["id"] == "tiny" and card["options"] == dataclasses.asdict(pipe.options)
    assert card["options"]["dtype"] == "float32" and card["options"]["logit_softcap"] == "config"


def test_a_closed_pipe_ends_quietly_and_serve_names_its_extra(capsys, monkeypatch):
    """`palikit ... | head` stops without a traceback or an error line; `palikit serve` without
    the server extra says what to install."""
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone, as `head` after its lines
    with open(write, "w", buffering=1) as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["eval", "--list-benchmarks"]) == 0
        monkeypatch.undo()
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, "palikit.serve", None)  # as if FastAPI were not installed
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'palikit[serve]'" in err and len(err.splitlines()) == 1
