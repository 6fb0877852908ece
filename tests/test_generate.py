"""Generation on tiny random PaliGemma 1 and 2 models (float32): batching, sampling, beam search,
stopping, multi-image prompts and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from PIL import Image

import palikit
from palikit import generate as gen
from palikit import kernels
from palikit.api import Pipeline
from palikit.processor import collate
from palikit.config import PaliGemmaConfig
from palikit.paligemma import PaliGemma
from palikit.processor import InputError, Tokenizer, encode_example, preprocess

from .conftest import hf_greedy, randomize, synthetic_image

LONG = " ".join(["a red circle above a blue square and the cow is standing on the beach"] * 8)
IMG = [synthetic_image(20), synthetic_image(21, size=(60, 20)), synthetic_image(22, size=(17, 33)),
       synthetic_image(23, size=(90, 90))]



@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def pipe(request, tokenizer_file, tmp_path_factory):
    """A random tiny model written by palikit's writer and loaded back in float32."""
    name = "tiny-paligemma" if request.param == 1 else "tiny-paligemma2"
    torch.manual_seed(0)
    model = PaliGemma(PaliGemmaConfig.from_name(name)).eval()
    randomize(model, 100 + request.param)
    folder = tmp_path_factory.mktemp(f"gen_pg{request.param}")
    Pipeline(model, Tokenizer(tokenizer_file, image_token_id=1552)).save(folder)
    return palikit.load(folder, dtype="float32")


def details(pipe, images, prompts, **kw):
    return [g for _, g in pipe.generate_details(images, prompts, **kw)]


def teacher_forced(pipe, images, prompt: str, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over image + prompt + `tokens` (as suffix) -> ids (L,), hidden states (L, D)."""
    enc = encode_example(pipe.tokenizer, pipe.config.num_image_tokens * len(images), prompt)
    enc.ids += tokens
    enc.mask_ar += [1] * len(tokens)
    enc.loss_mask += [1] * len(tokens)
    batch = collate([enc], pipe.tokenizer.pad_id)
    with torch.no_grad():
        hidden = pipe.model(batch["ids"], preprocess(images, pipe.config.vision.image_size),
                            batch["input_mask"], batch["mask_ar"])
    return batch["ids"][0], hidden[0]


def sequence_logprob(pipe, images, prompt: str, tokens: list[int], eos: bool = False) -> float:
    """Teacher-forced log-likelihood of `tokens` (+ <eos>) after image + prompt, in one forward pass."""
    tail = tokens + ([pipe.tokenizer.eos_id] if eos else [])
    ids, hidden = teacher_forced(pipe, images, prompt, tail)
    with torch.no_grad():
        logprobs = pipe.model.logits(hidden[:-1]).log_softmax(-1)
    picked = logprobs.gather(-1, ids[1:, None])[:, 0]
    return float(picked[-len(tail):].sum()) if tail else 0.0


def next_token_logprobs(pipe, images, prompt: str, tokens: list[int]) -> torch.Tensor:
    """Log-probs (V,) of the token after image + prompt + tokens."""
    _, hidden = teacher_forced(pipe, images, prompt, tokens)
    with torch.no_grad():
        return pipe.model.logits(hidden[-1]).log_softmax(-1)


# ---- batching -------------------------------------------------------------------------------

BATCH_IMAGES = [IMG[0], [IMG[1], IMG[2]], IMG[3], IMG[2]]
BATCH_PROMPTS = ["caption en", "answer en what colour is the star?", LONG, "detect circle ; square <loc0012>"]


def test_batch_equals_alone(pipe):
    assert len(pipe.tokenizer.encode(LONG)) > 8 * len(pipe.tokenizer.encode("caption en"))
    alone = [details(pipe, [im], [p], max_new_tokens=8)[0] for im, p in zip(BATCH_IMAGES, BATCH_PROMPTS)]
    together = details(pipe, BATCH_IMAGES, BATCH_PROMPTS, max_new_tokens=8)
    chunked = details(pipe, BATCH_IMAGES, BATCH_PROMPTS, max_new_tokens=8, batch_size=3)
    assert any(len(g.tokens) > 1 for g in alone)
    for a, b, c in zip(alone, together, chunked):
        assert a.tokens == b.tokens == c.tokens
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=0)
    # Each token's log-prob is the model's: the teacher-forced likelihood of the same sequence.
    for im, p, g in zip(BATCH_IMAGES, BATCH_PROMPTS, together):
        ims = im if isinstance(im, list) else [im]
        assert sum(g.logprobs) == pytest.approx(sequence_logprob(pipe, ims, p, g.tokens), abs=1e-4)


def test_single_prompt_returns_str(pipe):
    out = pipe.generate(IMG[0], "caption en", max_new_tokens=3)
    assert isinstance(out, str)
    outs = pipe.generate([IMG[0], IMG[1]], ["caption en", "ocr"], max_new_tokens=3)
    assert isinstance(outs, list) and len(outs) == 2 and outs[0] == out


# ---- sampling -------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_seed(pipe):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95)
    a = details(pipe, IMG[:2], ["caption en", LONG], seed=123, **kw)
    b = details(pipe, IMG[:2], ["caption en", LONG], seed=123, **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]


def test_different_seeds_differ(pipe, no_eos):
    kw = dict(max_new_tokens=12, do_sample=True, temperature=5.0)
    outs = {tuple(details(pipe, [IMG[0]], ["caption en"], seed=s, **kw)[0].tokens) for s in range(4)}
    assert len(outs) == 4
    greedy = details(pipe, [IMG[0]], ["caption en"], max_new_tokens=12)[0].tokens
    assert tuple(greedy) not in outs


def test_top_k_1_and_tiny_top_p_equal_greedy(pipe):
    greedy = details(pipe, IMG[:2], ["caption en", LONG], max_new_tokens=8)
    for kw in (dict(top_k=1, temperature=3.0), dict(top_p=1e-6, temperature=3.0)):
        for seed in (0, 1):
            sampled = details(pipe, IMG[:2], ["caption en", LONG], max_new_tokens=8, do_sample=True,
                              seed=seed, **kw)
            assert [g.tokens for g in sampled] == [g.tokens for g in greedy]


def test_top_k_restricts_the_choice(pipe, no_eos):
    """With top_k=3 every sampled token is among the 3 most likely after its prefix."""
    out = details(pipe, [IMG[0]], ["caption en"], max_new_tokens=5, do_sample=True, top_k=3, temperature=10.0,
                  seed=5)[0]
    for i, t in enumerate(out.tokens):
        lp = next_token_logprobs(pipe, [IMG[0]], "caption en", out.tokens[:i])
        lp[pipe.tokenizer.eos_id] = float("-inf")  # as the no_eos fixture does
        assert t in lp.topk(3).indices.tolist()


# ---- beam search ----------------------------------------------------------------------------


def test_one_beam_is_greedy(pipe):
    greedy = details(pipe, IMG[:2], ["caption en", LONG], max_new_tokens=6)
    beam1 = details(pipe, IMG[:2], ["caption en", LONG], max_new_tokens=6, num_beams=1)
    assert [g.tokens for g in beam1] == [g.tokens for g in greedy]


@pytest.mark.parametrize("prompt", ["caption en", "answer en how many circles?"])
def test_beam_search_finds_the_best_two_token_answer(pipe, prompt):
    """Two steps, 3 beams, no length normalisation: beam search must return the best pair
    (t1, t2) over the 3 most likely t1 and every t2, which is never worse than greedy."""
    images = [IMG[1]]
    eos = pipe.tokenizer.eos_id
    lp1 = next_token_logprobs(pipe, images, prompt, [])
    assert eos not in lp1.topk(6).indices.tolist()  # precondition: no hypothesis finishes at step 1
    best, best_pair = float("-inf"), None
    for t1 in lp1.topk(3).indices.tolist():
        lp2 = next_token_logprobs(pipe, images, prompt, [t1])
        score, t2 = lp2.max(-1)
        if float(lp1[t1] + score) > best:
            best, best_pair = float(lp1[t1] + score), (t1, int(t2))
    beam = details(pipe, images, [prompt], max_new_tokens=2, num_beams=3, length_penalty=0.0)[0]
    greedy = details(pipe, images, [prompt], max_new_tokens=2)[0]
    assert best_pair[1] != eos
    assert tuple(beam.tokens) == best_pair
    assert sum(beam.logprobs) == pytest.approx(best, abs=1e-4)
    assert sum(beam.logprobs) >= sum(greedy.logprobs) - 1e-5


def test_beam_search_bookkeeping(pipe):
    """Longer beams: returned log-probs are the model's for the returned tokens (cache reordering
    is right), and a prompt gives the same beam result alone as in a batch."""
    prompts, images = ["caption en", LONG, "ocr"], [IMG[0], IMG[1], [IMG[2], IMG[3]]]
    kw = dict(max_new_tokens=6, num_beams=3, length_penalty=0.0)
    together = details(pipe, images, prompts, **kw)
    for im, p, g in zip(images, prompts, together):
        ims = im if isinstance(im, list) else [im]
        alone = details(pipe, [im], [p], **kw)[0]
        assert alone.tokens == g.tokens
        assert 1 <= len(g.tokens) <= 6 and len(g.logprobs) == len(g.tokens)
        assert sum(g.logprobs) == pytest.approx(sequence_logprob(pipe, ims, p, g.tokens), abs=1e-4)


def test_beam_search_beats_greedy(pipe, no_eos):
    """Unnormalised, equal lengths (no <eos>): 3 beams find an answer at least as likely as greedy.
    Not a theorem for more than two steps, but it holds on these fixed random models."""
    for image in IMG[:3]:
        greedy = details(pipe, [image], ["caption en"], max_new_tokens=6)[0]
        beam = details(pipe, [image], ["caption en"], max_new_tokens=6, num_beams=3, length_penalty=0.0)[0]
        assert len(beam.tokens) == len(greedy.tokens) == 6
        assert sum(beam.logprobs) >= sum(greedy.logprobs) - 1e-5


# ---- length and stopping --------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_new_tokens_is_respected(no_eos, n):
    pipe = no_eos
    outs = details(pipe, IMG[:2], ["caption en", LONG], max_new_tokens=n)
    assert [len(g.tokens) for g in outs] == [n, n]
    beams = details(pipe, IMG[:2], ["caption en", LONG], max_new_tokens=n, num_beams=2)
    assert [len(g.tokens) for g in beams] == [n, n]
    sampled = details(pipe, IMG[:2], ["caption en", LONG], max_new_tokens=n, do_sample=True, seed=0)
    assert [len(g.tokens) for g in sampled] == [n, n]


def test_generation_stops_at_eos(pipe, monkeypatch):
    """Force <eos> at step 1 for row 0 and at step 3 for row 1: each row stops there, keeps the
    tokens it had, leaves the batch at once (the steps after run the other row alone), and decoding
    ends as soon as every row is done."""
    prompts, images = ["caption en", LONG], IMG[:2]
    free = details(pipe, images, prompts, max_new_tokens=8)
    original, rows_per_call = pipe.model.logits, []
    eos, stop_at, alive = pipe.tokenizer.eos_id, {0: 1, 1: 3}, [0, 1]

    def logits(hidden, *where):
        out = original(hidden, *where)
        step = len(rows_per_call)
        rows_per_call.append(out.shape[0])
        assert out.shape[0] == len(alive)
        for i, row in enumerate(alive):  # two rows keep their order when one leaves
            if stop_at[row] == step:
                out[i, eos] = 1e4
        alive[:] = [row for row in alive if stop_at[row] != step]
        return out

    monkeypatch.setattr(pipe.model, "logits", logits)
    forced = details(pipe, images, prompts, max_new_tokens=8)
    for row, k in stop_at.items():
        assert forced[row].tokens == free[row].tokens[:k]
        assert len(forced[row].logprobs) == k
        assert eos not in forced[row].tokens
    assert rows_per_call == [2, 2, 1, 1]  # the prefill, then steps 1-3; none after every row finished
    rows_per_call.clear()
    alive[:] = [0, 1]
    texts = [t for t, _ in pipe.generate_details(images, prompts, max_new_tokens=8)]
    assert texts == [pipe.tokenizer.decode(free[row].tokens[:k]) for row, k in stop_at.items()]


def test_eos_from_the_weights_stops_generation(pipe):
    """A model whose <eos> embedding row dominates every logit produces nothing."""
    model = pipe.model
    table = model.language_model.embed_tokens.weight
    eos = pipe.tokenizer.eos_id
    saved = table[eos].clone()
    try:
        with torch.no_grad():
            # Point the <eos> row along the final hidden state of this very prompt, scaled up.
            enc = encode_example(pipe.tokenizer, model.config.num_image_tokens, "caption en")
            batch = collate([enc], pipe.tokenizer.pad_id)
            hidden = model(batch["ids"], preprocess([IMG[0]], model.config.vision.image_size),
                           batch["input_mask"], batch["mask_ar"])[0, -1]
            table[eos] = hidden / hidden.norm() * 100.0
        out = details(pipe, [IMG[0]], ["caption en"], max_new_tokens=5)[0]
        assert out.tokens == [] and out.logprobs == []
        assert pipe.generate(IMG[0], "caption en", max_new_tokens=5) == ""
    finally:
        with torch.no_grad():
            table[eos] = saved


# ---- compiled decode (torch.compile) ----------------------------------------------------------


@pytest.fixture
def compiled(pipe, monkeypatch):
    """pipe with its decode step compiled (generate.DecodeStep(compile=True)), counting its calls;
    skipped where palikit does not compile (kernels.compile_pays)."""
    if reason := kernels.compile_pays(pipe.model.device):
        pytest.skip(reason)
    step, calls = gen.DecodeStep(pipe.model, compile=True), []
    monkeypatch.setattr(pipe, "decode_step", lambda *a: calls.append(1) or step(*a))
    return pipe, calls


@pytest.mark.slow
def test_compiled_decode_equals_eager(pipe, request):
    """Greedy, beam search and seeded sampling give the uncompiled tokens and log-probs, over a batch
    of mixed prompt lengths and images, in a cache rounded up to CACHE_BUCKET slots, and batch 1.
    float32: the two differ by the order of float32 sums only (the same kernels, elementwise ops
    fused), so 1e-4 on log-probs of magnitude ~10 is hundreds of times that rounding."""
    batch, one = (BATCH_IMAGES, BATCH_PROMPTS), (BATCH_IMAGES[:1], BATCH_PROMPTS[:1])
    runs = [(batch, dict(max_new_tokens=8)), (batch, dict(max_new_tokens=6, num_beams=2)),
            (batch, dict(max_new_tokens=8, do_sample=True, seed=3)), (one, dict(max_new_tokens=8))]
    eager = [details(pipe, *inputs, **kw) for inputs, kw in runs]
    _, calls = request.getfixturevalue("compiled")
    for (inputs, kw), want in zip(runs, eager):
        got = details(pipe, *inputs, **kw)
        assert [g.tokens for g in got] == [g.tokens for g in want], kw
        assert any(len(g.tokens) > 2 for g in got)
        for a, b in zip(got, want):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert len(calls) >= 10  # the compiled step ran
    assert gen.cache_length(100) == 128 and gen.cache_length(128) == 128  # the shapes it compiles for


@pytest.mark.parametrize("compile_step", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_unwritten_cache_slots_are_never_read(pipe, compile_step, monkeypatch, request):
    """The compiled step attends over the whole cache, the eager one over the slots written so far;
    slots not written yet must weigh nothing. Filled with large values (not NaN: a zero weight
    times NaN is NaN), they would dominate."""
    if compile_step:
        request.getfixturevalue("compiled")
    want = details(pipe, BATCH_IMAGES, BATCH_PROMPTS, max_new_tokens=6)
    new_cache = pipe.model.new_cache

    def filled(*args):
        cache = new_cache(*args)
        for t in cache.k + cache.v:
            t.fill_(100.0)
        return cache

    monkeypatch.setattr(pipe.model, "new_cache", filled)
    got = details(pipe, BATCH_IMAGES, BATCH_PROMPTS, max_new_tokens=6)
    assert [g.tokens for g in got] == [g.tokens for g in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "w8a8", "int4"])
def test_compiled_quantized_decode_equals_eager(scheme):
    """A quantised float32 model, compiled, against eager: greedy tokens are the same, for a batch and
    for batch 1. Log-probs agree to bfloat16's rounding: the int8 / int4 kernels take their rows in
    bfloat16 (eager, and compiled on AVX2), and the compiled one-row int8 product on AVX-512 is a
    reduction over the float32 row (kernels.int8_linear), so an input of a product differs by at most
    its bfloat16 rounding (2^-8 relative), which moves a logit by at most 2^-8 of its terms; logits
    here reach ~10, and a log-prob moves by at most twice its largest logit's move."""
    noise = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(3)]
    prompts = ["caption en", "detect cat ; dog", "answer en what is this?"]
    eager = palikit.load("default", dtype="float32", quantize=scheme)
    fast = palikit.load("default", dtype="float32", quantize=scheme, compile=True)
    if not fast.options.compile:
        pytest.skip(kernels.compile_pays(fast.model.device))
    for images, texts in [(noise, prompts), (noise[:1], prompts[:1])]:
        want, got = details(eager, images, texts, max_new_tokens=20), details(fast, images, texts, max_new_tokens=20)
        assert [g.tokens for g in got] == [w.tokens for w in want]
        assert len({tuple(w.tokens) for w in want}) == len(texts) and max(len(w.tokens) for w in want) > 10
        for a, b in zip(got, want):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2 * 10 * 2**-8,
                                       rtol=0)


@pytest.mark.slow
@torch._dynamo.config.patch(recompile_limit=2)
def test_compiled_models_of_every_kind_in_one_process():
    """Dynamo limits the graphs of one code object (8 by default); a model of another dtype or scheme
    needs graphs of its own (batch 1 and larger), and when all shared decode_step's code the fifth
    kind of compiled model in a process failed. With the limit at one model's two graphs, a second
    kind still compiles."""
    for dtype in ("float32", "bfloat16"):
        pipe = palikit.load("default", dtype=dtype, compile=True)
        assert pipe.generate(IMG[0], "caption en", max_new_tokens=3)
        assert all(pipe.generate(IMG[:2], ["caption en", "ocr"], max_new_tokens=3))


# ---- errors ---------------------------------------------------------------------------------


def test_prompt_longer_than_the_model_limit(pipe):
    limit = pipe.config.text.max_position_embeddings
    assert limit == 512
    with pytest.raises(InputError, match="limit of 512"):
        pipe.generate(IMG[0], " ".join(["circle"] * 600), max_new_tokens=4)
    # The prompt fits but prompt + new tokens do not.
    n_prompt = len(encode_example(pipe.tokenizer, pipe.config.num_image_tokens, LONG).ids)
    with pytest.raises(InputError, match="512"):
        pipe.generate(IMG[0], LONG, max_new_tokens=limit - n_prompt + 1)
    assert isinstance(pipe.generate(IMG[0], LONG, max_new_tokens=2), str)
    with pytest.raises(InputError, match="512"):  # scoring checks it too
        pipe.score([IMG[0]], [" ".join(["circle"] * 600)], ["x"])


def test_images_and_prompts_must_match(pipe):
    with pytest.raises(InputError, match="2 prompts need a list of 2 images"):
        pipe.generate([IMG[0]], ["caption en", "ocr"])
    with pytest.raises(InputError, match="list of 2 images"):
        pipe.generate(IMG[0], ["caption en", "ocr"])
    with pytest.raises(InputError, match="at least one image"):
        pipe.generate([[], IMG[0]], ["caption en", "ocr"])
    with pytest.raises(InputError):
        pipe.score([IMG[0]], ["caption en"], ["a", "b"])
    with pytest.raises(InputError, match="no prompts"):
        pipe.generate([], [])


def test_one_prompt_is_asked_of_every_image_and_says_why_it_ended(pipe):
    """generate([a, b], "caption en") is one caption per image, as generate([a, b], [p, p]); an
    entry that is a list is one prompt with several images. Each Generated says why it ended."""
    each = pipe.generate([IMG[0], IMG[1]], "caption en", max_new_tokens=3)
    assert each == [pipe.generate(IMG[0], "caption en", max_new_tokens=3),
                    pipe.generate(IMG[1], "caption en", max_new_tokens=3)]
    pair = pipe.generate([[IMG[0], IMG[1]]], "caption en", max_new_tokens=3)
    assert pair == pipe.generate([[IMG[0], IMG[1]]], ["caption en"], max_new_tokens=3) and len(pair) == 1
    (_, cut), = pipe.generate_details([IMG[0]], ["caption en"], max_new_tokens=2)
    (_, beams), = pipe.generate_details([IMG[0]], ["caption en"], max_new_tokens=2, num_beams=2)
    assert cut.finish_reason == beams.finish_reason == "length" and len(cut.tokens) == 2
    eos = pipe.tokenizer.eos_id
    stopped = pipe.generate_details([IMG[0]], ["caption en"], max_new_tokens=40)[0][1]
    assert stopped.finish_reason == ("eos" if len(stopped.tokens) < 40 else "length")
    assert eos not in stopped.tokens


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, do_sample=True), "beam"),
])
def test_bad_sampling_arguments(pipe, kw, match):
    kw = {"max_new_tokens": 3} | kw
    with pytest.raises(ValueError, match=match):
        pipe.generate(IMG[0], "caption en", **kw)


def test_unknown_sampling_argument(pipe):
    with pytest.raises(TypeError, match="temprature"):
        pipe.generate(IMG[0], "caption en", temprature=0.5)


# ---- several images per prompt --------------------------------------------------------------


def test_two_images_in_one_prompt(hf_pair):
    """Two images in one prompt: the logits equal transformers' given the same two images, greedy
    tokens too, and the second image matters ([A, B] differs from [A, C]). Catches images embedded
    in the wrong order, one image used for both, or the second one dropped."""
    _, hf, folder = hf_pair
    pipe = palikit.load(folder, dtype="float32", sliding_window=True)  # transformers applies the window
    n = pipe.config.num_image_tokens
    prompt = "answer en which is bigger?"
    enc = encode_example(pipe.tokenizer, 2 * n, prompt)
    image_id = pipe.tokenizer.image_token_id
    assert enc.ids[: 2 * n] == [image_id] * (2 * n) and enc.ids.count(image_id) == 2 * n
    assert enc.ids[2 * n] == pipe.tokenizer.bos_id

    def logits(images):
        _, hidden = teacher_forced(pipe, images, prompt, [])
        with torch.no_grad():
            return pipe.model.logits(hidden)

    ids = torch.tensor([enc.ids])
    a_b, a_c = [IMG[0], IMG[1]], [IMG[0], IMG[2]]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                 pixel_values=preprocess(a_b, pipe.config.vision.image_size)).logits[0]
    ours = logits(a_b)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    for other in (a_c, a_b[::-1]):  # another second image, the same two swapped
        assert (logits(other) - ours)[2 * n:].abs().max() > 1e-2
    hf_tokens, _ = hf_greedy(hf, ids, preprocess(a_b, pipe.config.vision.image_size), max_new_tokens=6)
    both = details(pipe, [a_b], [prompt], max_new_tokens=6)[0]
    assert both.tokens == hf_tokens
    # One prompt for a nested list: the prompt asked of both images together.
    (_, alone), = pipe.generate_details([a_b], prompt, max_new_tokens=6)
    assert alone.tokens == both.tokens
    assert sum(both.logprobs) == pytest.approx(sequence_logprob(pipe, a_b, prompt, both.tokens), abs=1e-4)
