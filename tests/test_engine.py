"""The continuous-batching engine (palikit.engine) on a tiny random PaliGemma 1 and the bundled
(trained) PaliGemma 2 model, float32, on synthetic scenes: every request's output equals
Pipeline.generate run alone, whatever it shares steps with and whenever it arrives; reused cache
rows, the image cache, seeds, cancellation and the budgets. The bundled model answers each prompt
differently and ends answers with its own <eos>; the random one repeats a token, so there the
log-probs (which depend on every earlier token) are what tells the rows apart."""

from __future__ import annotations

import copy
import random
import threading

import numpy as np
import pytest
import torch

from palikit import generate as gen
from palikit import kernels
from palikit.engine import Engine, EngineBusy, ImageCache, Work, run_in_order
from palikit.processor import InputError

import palikit
from palikit.api import Pipeline
from palikit.config import PaliGemmaConfig
from palikit.paligemma import PaliGemma
from palikit.processor import Tokenizer
from palikit.synthetic import make_scene

from .conftest import randomize

LONG = " ".join(["a red circle above a blue square and the cow is standing on the beach"] * 4)
IMG = [make_scene(np.random.default_rng(seed)).image for seed in range(5)]
# Mixed tasks and lengths; one prompt with two images; IMG[0] appears under three prompts.
CASES = [([IMG[0]], "caption en", 9), ([IMG[1], IMG[2]], "answer en what colour is the star?", 4),
         ([IMG[3]], LONG, 12), ([IMG[2]], "detect circle ; square", 16), ([IMG[0]], "segment triangle", 20),
         ([IMG[0]], "ocr", 3), ([IMG[1]], "caption en", 7), ([IMG[4]], "answer en how many circles?", 5)]


@pytest.fixture(scope="module", params=["pg1", "default"])
def pipe(request, tokenizer_file):
    if request.param == "default":
        return palikit.load("default", dtype="float32")
    torch.manual_seed(0)
    model = PaliGemma(PaliGemmaConfig.from_name("tiny-paligemma")).eval()
    randomize(model, 101)
    return Pipeline(model, Tokenizer(tokenizer_file, image_token_id=1552))


def alone(pipe, images, prompt, n, **sampling):
    return pipe.generate_details([images], [prompt], max_new_tokens=n, **sampling)[0][1]


def assert_same(got: gen.Generated, want: gen.Generated):
    assert got.tokens == want.tokens
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=0)


def run_with_arrivals(engine: Engine, cases, seed: int, **sampling) -> list:
    """Submit the cases in a random order, a random number of them between steps, and step to the end."""
    rng = random.Random(seed)
    order = list(range(len(cases)))
    rng.shuffle(order)
    requests = {}
    while order or engine.running or engine.depth:
        for _ in range(rng.choice([0, 0, 1, 2])):
            if order:
                i = order.pop()
                ims, p, n = cases[i]
                requests[i] = engine.submit(ims, p, gen.SamplingConfig(max_new_tokens=n, **sampling))
        engine.step()
    return [requests[i] for i in range(len(cases))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_alone_whatever_the_arrival(pipe, no_eos, seed):
    """Eight requests through three rows, arriving at random steps: each gives the tokens and
    log-probs of running it alone. no_eos: every request runs its own max_new_tokens, so rows
    finish at different steps, leave holes that the last row moves into, and are reused."""
    want = [alone(pipe, *c) for c in CASES]
    engine = Engine(pipe, max_rows=3)
    moves = []
    move = engine.runner.move
    engine.runner.move = lambda src, dst: moves.append((src, dst)) or move(src, dst)
    got = run_with_arrivals(engine, CASES, seed)
    for r, w, (_, _, n) in zip(got, want, CASES):
        assert r.finish_reason == "length" and len(r.tokens) == n
        assert_same(r.result(), w)
    assert moves, "no row left from the middle of the pool: the test does not exercise row moves"
    assert engine.runner.images.hits >= 2  # IMG[0] under three prompts


def in_dtype(pipe, dtype: torch.dtype):
    """The module's pipe with its weights in `dtype`, never choosing <eos> (as no_eos)."""
    if dtype == torch.float32:
        return pipe
    model = copy.deepcopy(pipe.model).to(dtype)
    model.__dict__.pop("logits", None)  # no_eos's patch, bound to the float32 model
    forward, eos = model.logits, torch.tensor([pipe.tokenizer.eos_id])
    model.logits = lambda hidden, *where: forward(hidden, *where).index_fill_(-1, eos, float("-inf"))
    return Pipeline(model, pipe.tokenizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant_answers_are_bit_identical_whatever_the_company(pipe, no_eos, dtype):
    """batch_invariant=True: each request's tokens, log-probs and top log-probs are bit-identical
    to the request run alone in an engine of the same size, whatever shares its steps, however
    prefills are grouped and chunked by layers, greedy or sampled, and when a neighbour fails."""
    p = in_dtype(pipe, dtype)
    cases = CASES + [([IMG[2]], "caption es", 6)]
    sampled = {1: dict(do_sample=True, seed=7, temperature=0.8), 5: dict(do_sample=True, seed=3)}

    def engine(**kw):
        return Engine(p, max_rows=4, batch_invariant=True, **kw)

    def submit(e, i):
        ims, prompt, n = cases[i]
        return e.submit(ims, prompt, gen.SamplingConfig(max_new_tokens=n, top_logprobs=2, **sampled.get(i, {})))

    want = []
    for i in range(len(cases)):
        e = engine()
        want.append(submit(e, i))
        e.run_until_idle()
    for seed, prefill_tokens in [(0, 4096), (1, 40), (2, 4096)]:
        e = engine(prefill_tokens=prefill_tokens)
        rng, order, got = random.Random(seed), list(range(len(cases))), {}
        rng.shuffle(order)
        while order or e.busy:
            for _ in range(rng.choice([0, 1, 3])):
                if order:
                    i = order.pop()
                    got[i] = submit(e, i)
            e.step()
        for i, w in enumerate(want):
            g = got[i].result()
            assert (g.tokens, g.logprobs, g.top_logprobs) == (w.result().tokens, w.result().logprobs,
                                                             w.result().top_logprobs), (seed, i)
        assert len({len(r.tokens) for r in got.values()}) > 2  # rows left at different steps


def test_batch_invariant_images_are_encoded_one_per_call(pipe):
    """A SigLIP product over several images may round otherwise than over one, and the image cache
    hands an encoding to later requests: in batch-invariant mode each image is encoded alone."""
    calls = []
    model = type("Spy", (), {"device": pipe.model.device,
                             "embed_images": lambda self, px: calls.append(len(px)) or pipe.model.embed_images(px)})()
    pixels = torch.rand(3, 3, 8, 8)
    ImageCache(2**20, one_per_call=True).encode(model, pixels)
    ImageCache(2**20).encode(model, pixels)
    assert calls == [1, 1, 1, 3]


def test_batch_invariant_decode_rows_do_not_depend_on_their_place(pipe):
    """A decode step of the whole pool gives each row the same bits wherever the row sits and
    whatever the other rows hold (random caches and masks)."""
    torch.manual_seed(0)
    engine = Engine(pipe, max_rows=4, batch_invariant=True)
    r = engine.runner
    S = r.pool.k[0].shape[2]
    for cache in (*r.pool.k, *r.pool.v):
        cache.normal_()
    r.layout.valid.copy_(torch.rand(4, S) > 0.3)
    r.layout.pos.copy_(torch.arange(S).expand(4, S))
    r.slot.copy_(torch.randint(S // 2, S - 1, (4,)))
    r.layout.block.copy_(torch.clamp(torch.arange(S) - r.slot[:, None], min=0))
    token = torch.randint(0, 300, (4,))
    with torch.inference_mode():
        want = r._decode_every_row(token, slice(0, 4))
        for perm in ([3, 2, 1, 0], [1, 0, 3, 2]):
            for t in (*r.pool.k, *r.pool.v, r.layout.valid, r.layout.pos, r.layout.block, r.slot):
                t.copy_(t[perm])
            token = token[perm]
            got = r._decode_every_row(token, slice(0, 4))
            want = want[perm]
            assert torch.equal(got, want)


def test_batch_runs_are_bit_identical_across_resume_and_ranks(pipe, no_eos):
    """`palikit run` and `eval` (run_in_order, batch-invariant by default): a job's tokens and
    log-probs are the same bits in the whole set, in the part left after a resume, and on each
    rank of two (every other job); the Python API's default (off) is not asked to be."""
    cases = CASES + [([IMG[2]], "caption es", 6)]

    def run(keys):
        works = [Work(i, pipe.prompt_ids(cases[i][1], len(cases[i][0]), cases[i][2]), cases[i][2],
                      lambda i=i: cases[i][0]) for i in keys]
        return {w.key: r.result() for ready in run_in_order(pipe, works, 3) for w, r in ready}

    whole = run(range(len(cases)))
    for part in (range(4, len(cases)), range(0, len(cases), 2), range(1, len(cases), 2)):
        for i, got in run(part).items():
            assert (got.tokens, got.logprobs) == (whole[i].tokens, whole[i].logprobs), i


def test_stops_at_eos_as_alone(pipe):
    """Rows that end with the model's <eos> at different steps leave as alone."""
    if pipe.config.text.post_norms is False:
        pytest.skip("the random model does not choose <eos>")
    cases = [(ims, p, 24) for ims, p, _ in CASES]
    want = [alone(pipe, *c) for c in cases]
    got = run_with_arrivals(Engine(pipe, max_rows=4), cases, seed=5)
    assert len({len(w.tokens) for w in want if len(w.tokens) < 24}) >= 3, "too few answers end early"
    assert len({tuple(w.tokens) for w in want}) >= 6, "answers must differ per request"
    for r, w in zip(got, want):
        assert r.finish_reason == ("eos" if len(w.tokens) < 24 else "length")
        assert_same(r.result(), w)


def test_reused_rows_never_read_what_they_held(pipe, no_eos):
    """A pool full of large values and a layout that marks every slot seen (as finished requests
    leave behind) changes nothing."""
    want = [alone(pipe, *c) for c in CASES[:4]]
    engine = Engine(pipe, max_rows=2)
    for t in engine.runner.pool.k + engine.runner.pool.v:
        t.fill_(100.0)
    engine.runner.layout.valid.fill_(True)  # and a layout that lets every slot be seen
    engine.runner.layout.block.zero_()
    # All queued at once: the first two (one image and two) prefill together, the shorter left-padded.
    got = [engine.submit(ims, p, gen.SamplingConfig(max_new_tokens=n)) for ims, p, n in CASES[:4]]
    engine.run_until_idle()
    for r, w in zip(got, want):
        assert_same(r.result(), w)


def test_two_prompts_on_one_image_encode_it_once(pipe):
    """caption then detect the same photo: one SigLIP pass, and each result is that of running it alone."""
    engine = Engine(pipe, max_rows=4)
    calls = []
    embed = pipe.model.embed_images
    pipe.model.embed_images = lambda pixels: calls.append(len(pixels)) or embed(pixels)
    try:
        a = engine.submit([IMG[3]], "caption en", gen.SamplingConfig(max_new_tokens=6))
        engine.step()
        b = engine.submit([IMG[3]], "detect circle", gen.SamplingConfig(max_new_tokens=6))
        engine.run_until_idle()
    finally:
        del pipe.model.embed_images
    assert calls == [1]
    assert engine.runner.images.hits == 1 and engine.runner.images.misses == 1
    assert_same(a.result(), alone(pipe, [IMG[3]], "caption en", 6))
    assert_same(b.result(), alone(pipe, [IMG[3]], "detect circle", 6))


def test_image_cache_is_bounded_in_bytes(pipe):
    engine = Engine(pipe)
    images = engine.runner.images
    n, d = pipe.config.num_image_tokens, pipe.config.text.hidden_size
    images.max_bytes = int(1.5 * n * d * 4)  # room for one float32 encoding
    for im in (IMG[0], IMG[1], IMG[0]):
        engine.submit([im], "ocr", gen.SamplingConfig(max_new_tokens=1))
        engine.run_until_idle()
    assert images.misses == 3 and images.hits == 0  # IMG[1] evicted IMG[0]
    assert len(images.entries) == 1 and images.bytes == n * d * 4


def test_seeded_sampling_is_reproducible_per_request(pipe, no_eos):
    """Seeded requests sampled side by side each sample what they sample alone (Pipeline.generate),
    whatever runs beside them; different seeds sample different tokens."""
    kw = dict(do_sample=True, temperature=3.0)
    seeds = [11, 12, 13]
    want = [alone(pipe, [IMG[0]], "caption en", 16, **kw, seed=s) for s in seeds]
    assert len({tuple(w.tokens) for w in want}) == 3
    engine = Engine(pipe, max_rows=6)
    others = [engine.submit(ims, p, gen.SamplingConfig(max_new_tokens=n)) for ims, p, n in CASES[2:5]]
    engine.step()
    got = [engine.submit([IMG[0]], "caption en", gen.SamplingConfig(max_new_tokens=16, **kw, seed=s))
           for s in seeds]
    engine.run_until_idle()
    for r, w in zip(got, want):
        assert_same(r.result(), w)
    assert all(o.done for o in others)


def test_cancel_frees_the_row(pipe, no_eos):
    engine = Engine(pipe, max_rows=1)
    long = engine.submit([IMG[0]], "caption en", gen.SamplingConfig(max_new_tokens=50))
    short = engine.submit([IMG[1]], "ocr", gen.SamplingConfig(max_new_tokens=3))
    for _ in range(3):
        engine.step()
    assert engine.running == 1 and engine.depth == 1  # short waits for the only row
    long.cancel()
    engine.run_until_idle()
    assert long.finish_reason == "cancelled" and 0 < len(long.tokens) < 50
    assert_same(short.result(), alone(pipe, [IMG[1]], "ocr", 3))


def test_prefill_budget_admits_one_long_prompt_per_step(pipe):
    engine = Engine(pipe, max_rows=4, prefill_tokens=1)  # below any prompt: one newcomer per group
    for ims, p, n in CASES[:3]:
        engine.submit(ims, p, gen.SamplingConfig(max_new_tokens=n))
    engine.step()
    assert len(engine.scheduler.prefilling) == 1 and engine.depth == 2


def test_a_long_prefill_runs_layer_by_layer_beside_decoding(pipe, no_eos):
    """A budget below every prompt: each newcomer is prefilled alone, one decoder layer per step,
    while the running rows get a token every step. The first request leaves during the third
    one's prefill, whose rows then move down to follow the running one. Every output equals
    running it alone."""
    layers = pipe.config.text.num_layers
    cases = [CASES[6][:2] + (layers + 2,), CASES[0][:2] + (40,), CASES[2], CASES[1]]  # LONG; two images
    want = [alone(pipe, *c) for c in cases]
    engine = Engine(pipe, max_rows=4, prefill_tokens=1)
    got = [engine.submit(ims, p, gen.SamplingConfig(max_new_tokens=n)) for ims, p, n in cases]
    joined, moved_down, step = {}, False, 0
    sched = engine.scheduler
    while engine.busy:
        before = {id(r): len(r.tokens) for r in sched.running}
        engine.step()
        step += 1
        for r in sched.running:
            assert len(r.tokens) == before.get(id(r), 0) + 1, "a token per step, and one for a newcomer"
        joined |= {i: step for i, r in enumerate(got) if i not in joined and (r in sched.running or r.done)}
        moved_down |= bool(sched.prefilling) and sched.prefill_start > engine.running
    assert joined == {i: (i + 1) * layers for i in range(4)}, "each prefill takes one step per layer"
    assert moved_down
    for r, w in zip(got, want):
        assert_same(r.result(), w)


def test_budgets_and_bad_requests(pipe):
    text = pipe.config.text
    row = 2 * text.num_layers * text.num_kv_heads * text.head_dim * 4  # bytes per slot, float32
    engine = Engine(pipe, max_rows=16, max_len=250, kv_cache_gb=3.5 * row * 256 / 2**30)  # 250 -> 256 slots
    assert engine.max_rows == 3 and engine.runner.pool.k[0].shape[:3] == (3, text.num_kv_heads, 256)
    with pytest.raises(InputError, match="holds no request"):
        Engine(pipe, max_len=256, kv_cache_gb=row * 200 / 2**30)
    with pytest.raises(InputError, match="raise --max-len"):
        engine.submit([IMG[0]], LONG, gen.SamplingConfig(max_new_tokens=200))
    with pytest.raises(InputError, match="beam search"):
        engine.submit([IMG[0]], "ocr", gen.SamplingConfig(num_beams=2))
    engine.scheduler.max_queue = 1
    engine.submit([IMG[0]], "ocr", gen.SamplingConfig())
    with pytest.raises(EngineBusy):
        engine.submit([IMG[0]], "ocr", gen.SamplingConfig())
    bad = engine.submit([], [pipe.tokenizer.image_token_id] * 3, gen.SamplingConfig(), force=True)  # no image
    good = engine.submit([IMG[0]], "ocr", gen.SamplingConfig(max_new_tokens=2), force=True)
    engine.run_until_idle()
    assert isinstance(bad.error, ValueError) and good.error is None and good.done  # only the bad one fails


def test_engine_thread_and_in_order(pipe, no_eos):
    """Requests from several threads through the engine's own thread, then a stream of requests
    in order (as `palikit run` and `palikit eval` use it): at most `window` submitted and not yet
    yielded, every one yielded once, in order, each as alone."""
    engine = Engine(pipe, max_rows=2)
    engine.start()
    try:
        results = {}

        def client(i):
            ims, p, n = CASES[i]
            r = engine.submit(ims, p, gen.SamplingConfig(max_new_tokens=n))
            r.wait(60)
            results[i] = r.result()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        in_flight, most = [], []

        def submit(i):
            in_flight.append(i)
            most.append(len(in_flight))
            ims, p, n = CASES[i]
            return engine.submit(ims, p, gen.SamplingConfig(max_new_tokens=n)) if i != 3 else None  # 3: failed before
        streamed = []
        for ready in engine.in_order(range(len(CASES)), submit, window=3):
            for i, request in ready:
                in_flight.remove(i)
                streamed.append((i, request))
    finally:
        engine.close()
    for i in range(4):
        assert_same(results[i], alone(pipe, *CASES[i]))
    assert [i for i, _ in streamed] == list(range(len(CASES))) and max(most) == 3
    for i, request in streamed:
        if i == 3:
            assert request is None
        else:
            assert_same(request.result(), alone(pipe, *CASES[i]))


@pytest.mark.slow
def test_compiled_step_equals_alone(pipe, no_eos, monkeypatch):
    """The engine on a compiled decode step (generate.DecodeStep(compile=True): constant shapes over
    the whole pool row) gives the uncompiled tokens. PaliGemma 2 only (the bundled model), as each
    compilation takes ~25 s here; tests/test_generate.py compiles both."""
    if not pipe.config.text.post_norms:
        pytest.skip("compiled for PaliGemma 2 only")
    if reason := kernels.compile_pays(pipe.model.device):
        pytest.skip(reason)
    want = [alone(pipe, *c) for c in CASES[:5]]
    step, calls = gen.DecodeStep(pipe.model, compile=True), []
    monkeypatch.setattr(pipe, "decode_step", lambda *a: calls.append(1) or step(*a))
    got = run_with_arrivals(Engine(pipe, max_rows=3), CASES[:5], seed=4)
    for r, w in zip(got, want):
        assert_same(r.result(), w)
    assert len(calls) >= 10


@pytest.mark.parametrize("seed", [0, 1])
def test_faults_fail_only_their_own_rows(pipe, no_eos, seed, monkeypatch):
    """Bad requests interleaved at random with good ones, three rows under load: one whose sampling
    raises, one whose decode step raises (after the model wrote its cache slot, as a real fault
    would), one whose group's prefill raises after its layers ran, one whose seed no generator
    takes. Each bad one fails with its own error; every good one equals its answer alone."""
    bad_temperature = 1.75  # sampling at this temperature raises
    real_probs = gen.logits_to_probs

    def probs(logits, sampling):
        if sampling.temperature == bad_temperature:
            raise RuntimeError("bad sampling")
        return real_probs(logits, sampling)

    monkeypatch.setattr(gen, "logits_to_probs", probs)
    engine = Engine(pipe, max_rows=3)
    poisoned: dict[str, set] = {"decode": set(), "prefill": set()}
    rows: list = []
    real_decode, real_step, real_advance = engine.runner.decode, pipe.decode_step, engine.runner.advance_prefill

    def decode(running, start=0):
        rows[:] = running
        return real_decode(running, start)

    def decode_step(*args):
        out = real_step(*args)
        if poisoned["decode"] & {id(r) for r in rows}:
            raise RuntimeError("bad decode")
        return out

    def advance_prefill():
        out = real_advance()
        if poisoned["prefill"] & {id(r) for r in engine.scheduler.prefilling} and out is not None:
            raise RuntimeError("bad prefill")
        return out

    engine.runner.decode, engine.runner.advance_prefill = decode, advance_prefill
    monkeypatch.setattr(pipe, "decode_step", decode_step)
    want = [alone(pipe, *c) for c in CASES]
    kinds = ["good"] * len(CASES) + ["sampling", "decode", "prefill", "seed"]
    rng = random.Random(seed)
    rng.shuffle(kinds)
    good_cases = iter(range(len(CASES)))
    requests = []
    order = list(range(len(kinds)))
    while order or engine.busy:
        for _ in range(rng.choice([0, 1, 2])):
            if not order:
                break
            kind = kinds[order.pop(0)]
            if kind == "good":
                i = next(good_cases)
                ims, p, n = CASES[i]
                requests.append((kind, i, engine.submit(ims, p, gen.SamplingConfig(max_new_tokens=n))))
                continue
            sampling = gen.SamplingConfig(max_new_tokens=6, do_sample=kind == "sampling",
                                          temperature=bad_temperature)
            r = engine.submit([IMG[1]], "caption en", sampling)
            if kind == "seed":  # past what SamplingConfig lets through: the engine's generator refuses it
                r.sampling = gen.SamplingConfig.__new__(gen.SamplingConfig)
                r.sampling.__dict__ |= dict(vars(sampling), do_sample=True, seed=2**70)
            if kind in poisoned:
                poisoned[kind].add(id(r))
            requests.append((kind, None, r))
        engine.step()
    assert {k for k, _, _ in requests} == {"good", "sampling", "decode", "prefill", "seed"}
    for kind, i, r in requests:
        assert r.done
        if kind == "good":
            assert r.error is None and r.finish_reason == "length", kind
            assert_same(r.result(), want[i])
        else:
            assert r.error is not None and r.finish_reason is None, kind
            with pytest.raises(Exception):
                r.result()


def test_sampling_settings_are_checked_at_admission():
    for bad in (dict(seed=2**64), dict(seed=-(2**63) - 1), dict(temperature=float("nan"), do_sample=True),
                dict(top_p=float("inf"))):
        with pytest.raises(ValueError):
            gen.SamplingConfig(**bad)
    gen.SamplingConfig(seed=2**64 - 1)
    gen.SamplingConfig(seed=-(2**63))


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_every_quantisation_scheme_runs_several_rows(scheme, no_eos):
    """`palikit run`, `eval` and `serve` share the engine: a quantised model decodes several rows a
    step (rows that are views of the pool, arriving at random) and each request gets the tokens of
    running it alone. Catches a kernel that takes one row only."""
    pipe = palikit.load("default", dtype="float32", quantize=scheme)
    cases = CASES[:6]
    want = [alone(pipe, *c) for c in cases]
    engine = Engine(pipe, max_rows=3)
    steps = []
    decode = engine.runner.decode
    engine.runner.decode = lambda running, start=0: steps.append(len(running)) or decode(running, start)
    got = run_with_arrivals(engine, cases, seed=3)
    assert max(steps) == 3
    for r, w in zip(got, want):
        assert r.error is None, r.error
        assert r.tokens == w.tokens
