"""A task added through the registry alone (a prompt builder, a parser, one `tasks.register`) is
offered everywhere: the Pipeline method, `palikit run`, the CLI verb, the server's /v1/<verb> and
/tasks (the web demo's menu), the OpenAPI schema, `palikit data check` and parse_task. Catches any
surface that keeps its own task list instead of reading tasks.TASKS."""

from __future__ import annotations

import json
import math

import httpx
import pytest

import palikit
from palikit import tasks
from palikit.cli import main
from palikit.engine import Engine, Request
from palikit.serve import background, create_app

from .conftest import synthetic_image


def find_prompt(thing: str, lang: str = "en") -> str:
    """`find {lang} {thing}`: a task no PaliGemma checkpoint knows, made up for this test."""
    if not thing.strip():
        raise ValueError("thing must not be empty")
    return f"find {lang} {thing.strip()}"


def shout(text, width, height, pieces=None, logprobs=None):
    """The toy task's parser: detections, labels upper-cased (so its use is visible)."""
    found = tasks.parse_detections(text, width, height, pieces, logprobs)
    for obj in found:
        obj.label = obj.label.upper()
    return found


@pytest.fixture
def toy_task():
    spec = tasks.register(tasks.TaskSpec(
        "find", "find", ("find",), find_prompt, 16, "find one thing", "find a thing",
        {"thing": tasks.FieldText("Thing", "what to look for", "a cat")}, parse=shout))
    yield spec
    del tasks.TASKS["find"]


@pytest.fixture
def answers(monkeypatch):
    """Every engine (so the Pipeline's generate_details, `palikit run`, `palikit eval` and the server)
    answers a `find` prompt at once with a box around the top-left quarter and the thing asked for
    (so each request's answer differs), each token with log-prob -0.5; records (prompt,
    max_new_tokens) per request submitted, `find` or not."""
    calls = []
    submit = Engine.submit

    def engine_submit(self, images, prompt, sampling, force=False, **options):
        tok = self.pipe.tokenizer
        text = prompt if isinstance(prompt, str) else tok.decode(
            [i for i in prompt if i != tok.image_token_id]).strip()
        calls.append((text, sampling.max_new_tokens))
        if not text.startswith("find "):
            return submit(self, images, prompt, sampling, force=force, **options)
        ids = prompt if isinstance(prompt, list) else self.pipe.prompt_ids(prompt, len(images),
                                                                           sampling.max_new_tokens)
        request = Request(ids, images, sampling, **options)
        answer = "<loc0000><loc0000><loc0511><loc0511> " + text.split(maxsplit=2)[2]
        for token in tok.encode(answer)[: sampling.max_new_tokens]:
            request.tokens.append(token)
            request.logprobs.append(-0.5)
            if request.on_token is not None:
                request.on_token(request, token)
        request.finish("stop")
        return request

    monkeypatch.setattr(Engine, "submit", engine_submit)
    return calls


def quarter(width: int, height: int) -> list[float]:
    return [0.0, 0.0, 511 / 1023 * width, 511 / 1023 * height]


def test_a_registered_task_is_offered_everywhere(toy_task, answers, tiny_model_dir, tmp_path, capsys):
    pipe = palikit.load(tiny_model_dir, dtype="float32")
    img = synthetic_image(0)  # 40 x 30
    assert tasks.parse_task("find en a dog") == "find" and "find" in tasks.prompt_words()

    # the Pipeline method, with the registry's default budget
    (obj,) = pipe.find(img, "a dog")
    assert (obj.label, list(obj.box), obj.logprob) == ("A DOG", quarter(40, 30), -0.5)
    assert answers[-1] == ("find en a dog", 16)
    assert [o.label for o in pipe.run_task("find", img, thing="an owl", lang="fr")] == ["AN OWL"]
    assert answers[-1][0] == "find fr an owl"

    # palikit run
    image_file = tmp_path / "img.png"
    img.save(image_file)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": "img.png", "task": "find", "thing": "a cat"}) + "\n"
                    + json.dumps({"image": "img.png", "task": "find"}) + "\n")
    out = tmp_path / "out.jsonl"
    model = ["--model", str(tiny_model_dir), "--dtype", "float32"]
    assert main(["run", *model, "--input", str(jobs), "--output", str(out)]) == 0
    done, missing = (json.loads(line) for line in out.read_text().splitlines())
    assert done["prompt"] == "find en a cat" and [o["label"] for o in done["objects"]] == ["A CAT"]
    assert answers[-1][0] == "find en a cat"  # through the engine of `palikit run`
    assert missing == {"line": 2, "error": "task 'find' needs the field 'thing'"}

    # the CLI verb: positional fields, --options, the overlay
    capsys.readouterr()
    assert main(["find", str(image_file), "a bird", "--lang", "de", *model, "--json",
                 "--out", str(tmp_path / "o.png")]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"label": "A BIRD", "box": quarter(40, 30), "confidence": math.exp(-0.5), "logprob": -0.5}]
    assert answers[-1] == ("find de a bird", 16) and (tmp_path / "o.png").exists()

    # the server: /v1/find, the web demo's /tasks, the OpenAPI schema
    with background(create_app(pipe)) as url:  # its engine answers as scripted
        from .test_serve import data_url

        r = httpx.post(url + "/v1/find", json={"image": data_url(img), "thing": "a fox"}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["task"], body["prompt"]) == ("find", "find en a fox")
        assert [(o["label"], o["box"]) for o in body["objects"]] == [("A FOX", quarter(40, 30))]
        assert answers[-1] == ("find en a fox", 16)
        bad = httpx.post(url + "/v1/find", json={"image": data_url(img)}, timeout=60)
        assert bad.status_code == 400 and "thing" in bad.json()["error"]["message"]
        menu = {t["verb"]: t for t in httpx.get(url + "/tasks").json()}
        assert menu["find"]["arg"] == {"name": "thing", "title": "Thing", "example": "a cat", "required": True,
                                       "many": False}
        assert menu["find"]["max_new_tokens"] == 16
        schema = httpx.get(url + "/openapi.json").json()
        find = schema["components"]["schemas"]["FindRequest"]
        assert set(find["required"]) == {"thing"} and {"image", "video"} <= set(find["properties"])  # one of them

    # data check counts it as a known task
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"image": "img.png", "prefix": "find en a cat", "suffix": "a cat"}) + "\n")
    assert main(["data", "check", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tasks"] == {"find": 1} and "unknown-task" not in report["counts"]


def test_removing_a_task_removes_it_everywhere(tiny_model_dir):
    """Without the registration the same calls fail with one clear line: the surfaces have no
    private list of tasks."""
    pipe = palikit.load(tiny_model_dir, dtype="float32")
    with pytest.raises(AttributeError, match="find"):
        pipe.find(synthetic_image(0), "a dog")
    with pytest.raises(ValueError, match="unknown task prefix 'find'"):
        tasks.parse_task("find en a dog")
    assert main(["find", "img.png", "a dog"]) == 2
    with background(create_app(pipe)) as url:
        assert httpx.post(url + "/v1/find", json={"image": "x", "thing": "a"}).status_code == 404
        assert "find" not in {t["verb"] for t in httpx.get(url + "/tasks").json()}


def test_the_registry_refuses_a_taken_word(toy_task):
    with pytest.raises(ValueError, match="registered already"):
        tasks.register(tasks.TaskSpec("hunt", "hunt", ("find",), find_prompt, 7, "", ""))
