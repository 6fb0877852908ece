"""Every snippet of the README runs as written. Its Python blocks run in order, in one namespace,
in a folder holding the files they name (photo.png, a scene of the shapes world the bundled model
knows); its shell blocks run command by command there (`palikit serve` until it answers /health, and a
Python block right after one, a client of that server, while it runs), each with exit status 0. Three lines cannot run inside a test and are checked instead: `git clone`
(no network), `pip install` (its extras must exist in pyproject.toml) and `make test` (this suite)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest

from palikit.synthetic import make_clip, make_scene

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README, re.S)
# A Python block right after a bash block that ends with `palikit serve`: a client of that server.
CLIENTS = {i + 1 for i, (kind, body) in enumerate(BLOCKS[:-1])
           if kind == "bash" and body.strip().splitlines()[-1].startswith("palikit serve") and BLOCKS[i + 1][0] == "python"}
PALIKIT = str(Path(sys.executable).parent / "palikit")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The files the README's snippets name."""
    where = tmp_path_factory.mktemp("readme")
    make_scene(np.random.default_rng(1), number_prob=1.0).image.save(where / "photo.png")
    (where / "jobs.jsonl").write_text(json.dumps({"image": "photo.png", "prompt": "caption en"}) + "\n"
                                      + json.dumps({"image": "photo.png", "task": "detect", "labels": ["circle"]}) + "\n")
    (where / "train.jsonl").write_text(json.dumps({"image": "photo.png", "prefix": "caption en",
                                                   "suffix": "a circle"}) + "\n")
    for colour in ("red", "blue"):  # two fine-tunes to serve side by side
        (where / f"{colour}.jsonl").write_text(4 * (json.dumps({"image": "photo.png", "prefix": "caption en",
                                                                  "suffix": f"all {colour}"}) + "\n"))
    shutil.copytree(ROOT / "configs", where / "configs")
    make_clip(where / "clip.mp4", frames=160)
    return where


def test_the_python_snippets_run(folder, monkeypatch, capsys):
    monkeypatch.chdir(folder)
    code = "\n".join(body for i, (kind, body) in enumerate(BLOCKS) if kind == "python" and i not in CLIENTS)
    assert "palikit.load" in code and code.count("\n") > 20
    exec(compile(code, "README.md", "exec"), {})
    assert (folder / "overlay.png").exists()


def commands() -> list[str]:
    return [line for line, _ in commands_and_clients()]


def commands_and_clients() -> list[tuple[str, str | None]]:
    """Each shell line, with the client block that follows it (a last `palikit serve` line's) or None."""
    out = []
    for i, (kind, body) in enumerate(BLOCKS):
        if kind == "bash":
            lines = [line.split("  #")[0].strip() for line in body.splitlines() if line.strip()]
            client = BLOCKS[i + 1][1] if i + 1 in CLIENTS else None
            out += [(line, client if n == len(lines) - 1 else None) for n, line in enumerate(lines)]
    return out


def test_the_lines_that_cannot_run_here_are_true():
    lines = commands()
    assert lines[:2] == ["make demo", "make test"]  # `make test` is this suite; CI runs it
    clone = next(line for line in lines if line.startswith("git clone"))
    assert clone.endswith("cd palikit")
    install = next(line for line in lines if line.startswith("pip install"))
    assert "torch==2.13.0" in install  # the CPU wheel the Makefile pins
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    asked = set(re.search(r"\[([\w,]+)\]", install).group(1).split(","))
    assert asked <= extras
    for name in re.findall(r"`(\w+)` \(", README[README.index("Extras:"):README.index("## Quick start")]):
        assert name in extras, name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_shell_snippets_run(folder, monkeypatch, capsys):
    monkeypatch.chdir(folder)  # the client blocks read the files the README names
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran = 0
    for line, client in commands_and_clients():
        if line.startswith(("git clone", "pip install", "make test")):
            continue  # test_the_lines_that_cannot_run_here_are_true
        if line == "make demo":
            run = subprocess.run(["make", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        elif line.startswith("palikit serve"):
            port = free_port()
            argv = shlex.split(line.replace("--port 8000", f"--port {port}"))
            server = subprocess.Popen([PALIKIT, *argv[1:]], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                for _ in range(600):
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.1)
                else:
                    pytest.fail("palikit serve never answered /health")
                if client is not None:
                    exec(compile(client.replace(":8000/", f":{port}/"), "README.md", "exec"), {"__name__": "client"})
                    answers = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines() if " " in line)
                    assert {"default", "red", "blue"} <= set(answers), answers
                    assert len({answers[m] for m in ("default", "red", "blue")}) == 3, answers  # each its own
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(30)
            ran += 1
            continue
        else:
            assert line.startswith("palikit "), line
            run = subprocess.run([PALIKIT, *shlex.split(line)[1:]], cwd=folder, env=env, capture_output=True,
                                 text=True, timeout=600)
        assert run.returncode == 0, f"{line}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
        ran += 1
    assert ran >= 10
    assert (folder / "results.jsonl").exists() and (folder / "preds.jsonl").exists()
