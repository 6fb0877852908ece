"""Many LoRA adapters on one base, chosen per request (palikit.adapters.AdapterBank in the engine):
each request's answer is the one transformers + peft give with its adapter loaded alone, whatever
adapters and base requests share its steps; with batch_invariant the bits of the request alone.
The adapters are made by transformers + peft on the tiny random PaliGemma 2 of conftest, with
random (large) factors so that each changes the answers, at different ranks and targets, one on
the vision tower and the projector."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

import palikit
from palikit import generate as gen
from palikit.engine import Engine

from .conftest import synthetic_image

# name -> (rank, alpha, peft target_modules over transformers' module names, rslora)
ADAPTERS = {
    "qv": (2, 8, r".*language_model.*\.(q_proj|v_proj)", False),
    "llm": (4, 16, r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", False),
    "vision": (8, 8, r".*(vision_tower.*\.(q_proj|fc1)|multi_modal_projector\.linear|language_model.*\.o_proj)", False),
    "mlp": (3, 6, r".*language_model.*\.(gate_proj|down_proj)", True),
}
PROMPTS = ["caption en", "answer en what is this?", "detect cat", "ocr"]
NEW = 8


def hf_model(folder):
    from transformers import PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(folder).eval()
    model.config._attn_implementation = "eager"  # SDPA drops Gemma 2's attention soft-cap
    model.config.text_config._attn_implementation = "eager"
    return model


def make_adapters(base, root) -> dict:
    """Four peft adapter folders written by transformers + peft for `base` (ADAPTERS)."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for i, (name, (r, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        model = get_peft_model(hf_model(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                          use_rslora=rslora))
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_" in key:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module", params=["tiny", "bundled"])
def base_and_adapters(request, tiny_model_dir, tmp_path_factory):
    """(base folder, its adapters): the tiny random PaliGemma 2 and the bundled (trained) model."""
    from palikit.weights import resolve_source

    base = tiny_model_dir if request.param == "tiny" else resolve_source("default")
    return base, make_adapters(base, tmp_path_factory.mktemp(f"adapters-{request.param}"))


def peft_answer(base, folder, image, prompt: str, tokens: list[int]):
    """transformers + peft with one adapter (None: the base): its greedy tokens, and the log-probs
    it gives `tokens` (palikit's answer) teacher-forced."""
    from peft import PeftModel
    from transformers import AutoProcessor

    model = hf_model(base)
    if folder is not None:
        model = PeftModel.from_pretrained(model, str(folder)).eval()
    processor = AutoProcessor.from_pretrained(base)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        n = inputs["input_ids"].shape[1]
        ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], 1)
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids),
                       token_type_ids=torch.cat([inputs["token_type_ids"], torch.ones(1, len(tokens), dtype=torch.long)], 1)
                       ).logits[0, n - 1:-1].float()
    logprobs = logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return greedy.tolist(), logprobs.tolist()


def submit_mixed(engine, cases, seed):
    rng, order, requests = random.Random(seed), list(range(len(cases))), {}
    rng.shuffle(order)
    while order or engine.busy:
        for _ in range(rng.choice([0, 1, 2])):
            if order:
                i = order.pop()
                adapter, image, prompt = cases[i]
                requests[i] = engine.submit([image], prompt, gen.SamplingConfig(max_new_tokens=NEW), adapter=adapter)
        engine.step()
    return [requests[i].result() for i in range(len(cases))]


def test_each_request_gets_its_adapters_answer_in_a_mixed_batch(base_and_adapters):
    tiny_model_dir, adapter_dirs = base_and_adapters
    pipe = palikit.load(tiny_model_dir, dtype="float32")
    for name, folder in adapter_dirs.items():
        pipe.load_adapter(name, folder)
    images = [synthetic_image(s, (64, 48)) for s in range(3)]
    cases = [(adapter, images[(i + j) % 3], PROMPTS[(i + 2 * j) % 4])
             for i, adapter in enumerate([None, *ADAPTERS]) for j in range(2)]
    got = submit_mixed(Engine(pipe, max_rows=3), cases, seed=0)
    by_adapter = {}
    for (adapter, image, prompt), g in zip(cases, got):
        assert g.tokens, (adapter, prompt)
        greedy, logprobs = peft_answer(tiny_model_dir, adapter_dirs.get(adapter), image, prompt, g.tokens)
        assert greedy[:len(g.tokens)] == g.tokens, (adapter, prompt)
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(logprobs), atol=2e-4, rtol=0)
        by_adapter.setdefault(adapter, []).append((tuple(g.tokens), tuple(round(v, 3) for v in g.logprobs)))
    assert len(set(map(tuple, by_adapter.values()))) == len(by_adapter), "every adapter changes the answers"

    # batch-invariant: each request's bits are those of the request alone
    alone = []
    for adapter, image, prompt in cases:
        engine = Engine(pipe, max_rows=3, batch_invariant=True)
        r = engine.submit([image], prompt, gen.SamplingConfig(max_new_tokens=NEW), adapter=adapter)
        engine.run_until_idle()
        alone.append(r.result())
    mixed = submit_mixed(Engine(pipe, max_rows=3, batch_invariant=True), cases, seed=1)
    for a, m in zip(alone, mixed):
        assert (a.tokens, a.logprobs) == (m.tokens, m.logprobs)


def test_an_adapter_on_the_vision_tower_has_image_encodings_of_its_own(tiny_model_dir, adapter_dirs):
    pipe = palikit.load(tiny_model_dir, dtype="float32")
    pipe.load_adapter("vision", adapter_dirs["vision"])
    pipe.load_adapter("qv", adapter_dirs["qv"])
    image = synthetic_image(5, (64, 48))
    engine = Engine(pipe, max_rows=4)
    for adapter in (None, "qv", "vision", None, "vision"):
        engine.submit([image], "caption en", gen.SamplingConfig(max_new_tokens=2), adapter=adapter)
    engine.run_until_idle()
    cache = engine.runner.images
    assert cache.misses == 2 and cache.hits == 3  # the base's (shared by "qv") and the vision adapter's


def test_bad_adapters_are_one_line(tiny_model_dir, adapter_dirs, tmp_path, tiny_configs):
    from palikit.weights import CheckpointError

    pipe = palikit.load(tiny_model_dir, dtype="float32")
    pipe.load_adapter("qv", adapter_dirs["qv"])
    with pytest.raises(palikit.InputError, match="named 'qv' is loaded already"):
        pipe.load_adapter("qv", adapter_dirs["llm"])
    with pytest.raises(CheckpointError, match="not a peft adapter folder"):
        pipe.load_adapter("none", tmp_path)
    zero = tmp_path / "zero"
    shutil.copytree(adapter_dirs["llm"], zero)
    config = json.loads((zero / "adapter_config.json").read_text())
    (zero / "adapter_config.json").write_text(json.dumps(config | {"r": 0}))
    with pytest.raises(CheckpointError, match="rank r=0"):
        pipe.load_adapter("zero", zero)
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(adapter_dirs["llm"], bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone().fill_(float("nan"))
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="not all finite"):
        pipe.load_adapter("nan", bad)
    wide = tmp_path / "wide"  # factors of another base's width
    shutil.copytree(adapter_dirs["llm"], wide)
    tensors = load_file(wide / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0] * 2 if "lora_B" in k else v.shape[0], v.shape[1] * 2 if "lora_A" in k else v.shape[1])
               for k, v in tensors.items()}, wide / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit this base model: \S+ has LoRA factors \(4, \d+\) x \(\d+, 4\) for a "
                                              r"\d+ -> \d+ layer"):
        pipe.load_adapter("wide", wide)
    deep = tmp_path / "deep"  # factors for a layer this base does not have (a deeper model's adapter)
    shutil.copytree(adapter_dirs["llm"], deep)
    tensors = load_file(deep / "adapter_model.safetensors")
    save_file(tensors | {k.replace("layers.0.", "layers.99."): v.clone() for k, v in tensors.items() if "layers.0." in k},
              deep / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.99\.\S+, which this base model does not have"):
        pipe.load_adapter("deep", deep)
    with pytest.raises(palikit.InputError, match="no adapter named 'nope' is loaded \\(loaded: qv\\)"):
        pipe.generate(synthetic_image(0), "caption en", adapter="nope")
    assert list(pipe.adapters.adapters) == ["qv"], "a failed load leaves the loaded ones as they were"
    pipe.unload_adapter("qv")
    assert not pipe.adapters.hooks, "no adapter left: no module runs a hook"


def test_the_server_serves_each_adapter_by_name(tiny_model_dir, adapter_dirs, tmp_path):
    """`palikit serve --adapter NAME=DIR`: chat completions' model and the native endpoints' adapter
    choose it (an unknown name is a 404), /v1/models lists each with its parent, /metrics counts
    answers per model; POST /v1/adapters loads one from inside --allow-local-paths (403 without it,
    409 for a taken name or past --max-adapters) and DELETE unloads one once the request running on
    it has finished, which gets its whole answer."""
    import asyncio

    import httpx
    from fastapi.testclient import TestClient

    from palikit.serve import background, create_app

    from .test_serve import chat_body, data_url

    image = synthetic_image(1, (64, 48))
    want = {name: palikit.load(tiny_model_dir, dtype="float32") for name in (None, "qv", "vision")}
    for name, p in want.items():
        if name:
            p.load_adapter(name, adapter_dirs[name])
    want = {name: p.generate(image, "caption en", max_new_tokens=6, adapter=name) for name, p in want.items()}
    assert len(set(want.values())) == 3, "the adapters change the caption"

    pipe = palikit.load(tiny_model_dir, dtype="float32")
    shutil.copytree(adapter_dirs["llm"], tmp_path / "llm")
    app = create_app(pipe, model_name="base", adapters=(f"qv={adapter_dirs['qv']}", f"vision={adapter_dirs['vision']}"),
                     allow_local_paths=str(tmp_path), max_adapters=3)
    with TestClient(app) as c:
        models = c.get("/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("qv", "base"), ("vision", "base")]
        for name in (None, "qv"):
            r = c.post("/v1/chat/completions", json=chat_body(data_url(image), "caption en", max_tokens=6)
                       | ({"model": name} if name else {})).json()
            assert r["model"] == (name or "base") and r["choices"][0]["message"]["content"] == want[name]
        r = c.post("/v1/caption", json={"image": data_url(image), "adapter": "vision", "max_new_tokens": 6})
        assert r.json()["text"] == want["vision"]
        assert c.post("/v1/chat/completions", json=chat_body(data_url(image), "caption en") | {"model": "nope"}
                      ).status_code == 404
        assert c.post("/v1/caption", json={"image": data_url(image), "adapter": "nope"}).status_code == 404
        metrics = c.get("/metrics").text
        assert 'palikit_model_answers_total{model="qv"} 1' in metrics
        assert 'palikit_model_answers_total{model="base"} 1' in metrics
        assert c.post("/v1/adapters", json={"name": "llm", "path": "llm"}).status_code == 201
        assert c.post("/v1/adapters", json={"name": "llm", "path": "llm"}).status_code == 409  # the most: 3
        assert c.post("/v1/adapters", json={"name": "x", "path": "/etc"}).status_code == 400  # outside the folder
        assert c.delete("/v1/adapters/base").status_code == 400
        assert c.delete("/v1/adapters/llm").status_code == 200
        (tmp_path / "empty").mkdir()
        bad = c.post("/v1/adapters", json={"name": "x", "path": "empty"})
        assert bad.status_code == 400 and "not a peft adapter folder" in bad.json()["error"]["message"]
        assert c.post("/v1/adapters", json={"name": "qv", "path": "llm"}).status_code == 409  # a taken name
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "qv", "vision"]
    with TestClient(create_app(pipe, model_name="base2")) as c:  # the same pipe: its adapters stay loaded
        assert c.post("/v1/adapters", json={"name": "y", "path": "llm"}).status_code == 403

    app = create_app(palikit.load(tiny_model_dir, dtype="float32"), model_name="base",
                     adapters=(f"qv={adapter_dirs['qv']}",))

    async def unload_while_running(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            body = {"image": data_url(image), "adapter": "qv", "max_new_tokens": 40}
            running = asyncio.ensure_future(c.post("/v1/predict", json=body | {"prompt": "caption en"}))
            for _ in range(2000):
                if app.state.palikit.batcher.engine.uses_adapter("qv") or running.done():
                    break
                await asyncio.sleep(0.005)
            assert not running.done(), running.result().text
            deleted = await c.delete("/v1/adapters/qv")
            return await running, deleted, await c.post("/v1/caption", json=body)

    with background(app) as url:
        running, deleted, after = asyncio.run(unload_while_running(url))
    assert running.status_code == 200 and running.json()["finish_reason"] in ("eos", "length")
    assert deleted.status_code == 200 and after.status_code == 404


def test_a_bad_adapter_stops_the_server_at_startup_with_one_line(tiny_model_dir, tmp_path):
    from palikit.cli import main

    code = main(["serve", "--model", str(tiny_model_dir), "--adapter", f"x={tmp_path}", "--port", "0"])
    assert code == 2


def test_run_jobs_choose_their_adapter(tiny_model_dir, adapter_dirs, tmp_path, capsys):
    """`palikit run --adapter NAME=DIR --adapters-dir DIR`: each job's "adapter" picks one (the base
    without it); an adapter the run did not load is that job's error record."""
    from palikit.cli import main

    image = synthetic_image(2, (64, 48))
    image.save(tmp_path / "a.png")
    pipe = palikit.load(tiny_model_dir, dtype="float32")
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    shutil.copytree(adapter_dirs["mlp"], shelf / "mlp")
    for name in ("qv", "mlp"):
        pipe.load_adapter(name, adapter_dirs[name])
    jobs = [{"image": "a.png", "prompt": "caption en"}, {"image": "a.png", "prompt": "caption en", "adapter": "qv"},
            {"image": "a.png", "prompt": "caption en", "adapter": "mlp"}, {"image": "a.png", "task": "ocr", "adapter": "x"},
            {"image": "a.png", "prompt": "caption en", "adapter": 3}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    argv = ["run", "--model", str(tiny_model_dir), "--dtype", "float32", "--adapter", f"qv={adapter_dirs['qv']}",
            "--adapters-dir", str(shelf), "--input", str(tmp_path / "jobs.jsonl"), "--output", str(tmp_path / "out.jsonl"),
            "--max-new-tokens", "6"]
    assert main(argv) == 0
    recs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    texts = [pipe.generate(image, "caption en", max_new_tokens=6, adapter=a) for a in (None, "qv", "mlp")]
    assert [r.get("text") for r in recs[:3]] == texts and len(set(texts)) == 3
    assert "no adapter named 'x' is loaded (loaded: qv, mlp)" in recs[3]["error"]
    assert "'adapter' must be the name of a loaded adapter" in recs[4]["error"]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_adapters_apply_on_a_quantised_base(tiny_model_dir, adapter_dirs, scheme):
    """A quantised base takes adapters: each int8 / int4 layer an adapter targets gets, on the rows of
    that adapter, exactly scale * B (A x) added to its output (float32 arithmetic); other rows none."""
    pipe = palikit.load(tiny_model_dir, dtype="float32", quantize=scheme)
    pipe.load_adapter("llm", adapter_dirs["llm"])
    bank = pipe.adapters
    A, B, scale = bank.adapters["llm"].factors["language_model.layers.0.mlp.gate_proj"]
    layer = pipe.model.language_model.layers[0].mlp.gate_proj
    assert type(layer).__name__ != "Linear", "the layer is quantised"
    x = torch.randn(2, 3, A.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = layer(x)
        with bank.rows([0, bank.slot("llm")]):
            tuned = layer(x)
    torch.testing.assert_close(tuned[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(tuned[1] - plain[1], scale * (x[1] @ A.T) @ B.T, rtol=0, atol=1e-5)
    image = synthetic_image(4, (64, 48))
    (_, base), (_, tuned) = (pipe.generate_details([image], ["caption en"], max_new_tokens=4, adapter=a)[0]
                             for a in (None, "llm"))
    assert (base.tokens, base.logprobs) != (tuned.tokens, tuned.logprobs)


def test_grouped_products_equal_per_row_products(tiny_model_dir, adapter_dirs):
    """The serving path (one product per adapter over its rows) against the batch-invariant one (a
    product per row, factors gathered and ranks padded): the same sums to float32 rounding."""
    pipe = palikit.load(tiny_model_dir, dtype="float32")
    for name in ("qv", "llm", "mlp"):
        pipe.load_adapter(name, adapter_dirs[name])
    bank, layer = pipe.adapters, pipe.model.language_model.layers[1].mlp.down_proj
    slots = [bank.slot(n) for n in ("llm", None, "mlp", "llm", "qv", "mlp")]
    x = torch.randn(len(slots), 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = layer(x)
        with bank.rows(slots, per_row=True):
            exact = layer(x)
        with bank.rows(slots):
            grouped = layer(x)
    torch.testing.assert_close(grouped, exact, rtol=0, atol=1e-5)
    assert torch.equal(grouped[[1, 4]], plain[[1, 4]]), "the base's rows and qv's (no down_proj) untouched"
    assert not torch.allclose(grouped[0], plain[0], atol=1e-3)
