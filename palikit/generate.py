"""Generation: one prefill of image + prefix into a preallocated KV cache, then one token per step.

Rows of a batch are left-padded so every prompt ends at the same cache slot; positions count only
real tokens and padded slots are masked, so a row gives the same tokens in a batch as alone.
Dims: B batch (rows x beams), P padded prompt length, S cache slots, V vocab.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .gemma import attention_masks, rope_cos_sin
from .paligemma import PaliGemma


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    do_sample: bool = False  # greedy unless asked, as both references
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum log-prob / length ** length_penalty

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1 or (self.num_beams > 1 and self.do_sample):
            raise ValueError("num_beams must be >= 1 and beam search does not sample")


@dataclass
class Generated:
    tokens: list[int]  # generated ids, without the final <eos>
    logprobs: list[float] = field(default_factory=list)  # model log-prob of each token in `tokens`


@dataclass
class Layout:
    """What the masks need to know of each cache slot (B, S): its block number, RoPE position and
    whether it holds a real token. A PromptBatch has one; the engine keeps one per pool row."""

    block: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor


class PromptBatch:
    """Left-padded prompt ids plus the per-slot bookkeeping the masks need."""

    def __init__(self, prompts: list[list[int]], pad_id: int, extra_slots: int, device):
        B, P = len(prompts), max(len(p) for p in prompts)
        S = P + extra_slots
        self.ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
        self.valid = torch.zeros((B, S), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            self.ids[i, P - len(p):] = torch.tensor(p, device=device)
            self.valid[i, P - len(p):] = True
        self.valid[:, P:] = True  # generated slots: block numbers keep each out until it is written
        self.pos = (torch.cumsum(self.valid.long(), -1) - 1).clamp(min=0)  # (B, S) RoPE positions
        # Block numbers: 0 for the whole prompt (bidirectional), then 1, 2, ... per generated token.
        self.block = torch.clamp(torch.arange(S, device=device) - P + 1, min=0).expand(B, S)
        self.prompt_len = P


def new_batch(model: PaliGemma, prompts: list[list[int]], pad_id: int, max_new_tokens: int) -> PromptBatch:
    """The prompts laid out in a cache with room for max_new_tokens (see cache_slots)."""
    P = max(len(p) for p in prompts)
    return PromptBatch(prompts, pad_id, cache_slots(model, P, max_new_tokens), model.device)


def logits_to_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest set reaching top_p
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.inference_mode()
def prefill(model: PaliGemma, batch: PromptBatch, image_tokens, cache) -> torch.Tensor:
    """Run the whole prompt under the prefix-LM mask; returns the logits of its last slot (B, V)."""
    *_, logits = prefill_by_layer(model, batch, model.embed(batch.ids, image_tokens), cache)
    return logits


@torch.inference_mode()
def prefill_by_layer(model: PaliGemma, batch: PromptBatch, x: torch.Tensor, cache) -> Iterator[torch.Tensor | None]:
    """prefill of the prompt embeddings x (B, P, D), one decoder layer per iteration: yields None
    after each layer but the last, then the logits of the last slot (B, V).

    The prompt cannot be split by tokens as causal models chunk their prefill: image + prefix are
    one bidirectional block (big_vision's prefix-LM), so a layer's keys for the first token depend
    on the last one. It can be split by layers, which is how the engine bounds the time a long
    prompt holds back the rows it decodes."""
    P = batch.prompt_len
    pos, block, valid = batch.pos[:, :P], batch.block[:, :P], batch.valid[:, :P]
    lm = model.language_model
    masks = attention_masks(block, pos, block, pos, valid, model.config.text)
    # Only the last slot's logits are wanted, so the last layer needs every slot's keys and values
    # (the cache) but the queries, attention output and feed-forward of the last slot alone: ~3 %
    # of a PG2-3B-224 prompt's multiply-adds skipped (llama.cpp does the same: its inp_out_ids).
    last_slot_masks = {name: m[:, :, -1:] for name, m in masks.items()}
    masks = lm.kernel_masks(masks)
    cos, sin = rope_cos_sin(pos, lm.config.head_dim, lm.config.rope_theta, x.dtype)
    for layer in lm.layers[:-1]:
        x = layer(x, cos, sin, masks, cache, 0)
        yield None
    x = lm.layers[-1](x, cos, sin, last_slot_masks, cache, 0, last_rows=1)
    yield model.logits(lm.norm(x[:, -1]), "prefill")


def decode_logits(model: PaliGemma, token: torch.Tensor, slot: torch.Tensor, block: torch.Tensor,
                  pos: torch.Tensor, valid: torch.Tensor, cache) -> torch.Tensor:
    """One decode step with constant shapes: token (B,) written at cache slot `slot` (B,), one slot
    per row, attending over all S slots -> next-token logits (B, V).

    block / pos / valid (B, S) describe every slot, the ones not written yet included: their block
    numbers are above the query's, so the prefix-LM rule (attention_masks) keeps them out, and a
    step needs no slicing, no per-step Python over rows, and no new shapes. That is what lets
    torch.compile compile it once (compile_decode) and CUDA graphs replay it."""
    rows = torch.arange(token.shape[0], device=token.device)
    q_block, q_pos = block[rows, slot][:, None], pos[rows, slot][:, None]
    masks = attention_masks(q_block, q_pos, block, pos, valid, model.config.text)
    x = model.language_model.embed(token[:, None])
    hidden = model.language_model(x, q_pos, masks, cache, start=slot)
    return model.logits(hidden[:, -1], "decode")


def compile_decode(model: PaliGemma) -> None:
    """Compile the decode step with torch.compile, with dynamic shapes: one compilation for batch
    size 1 (which torch specialises) and one for every larger batch and any cache length, with CUDA
    graphs on a GPU (those record one graph per shape: caches are allocated in multiples of
    CACHE_BUCKET slots to keep them few). emulate_precision_casts rounds fused bf16 / fp16
    intermediates as eager does, so compiled greedy outputs equal the uncompiled ones (without it,
    an int8 bundled model's log-probs moved by 0.09 instead of 0.005)."""
    options = {"emulate_precision_casts": True, "triton.cudagraphs": model.device.type == "cuda"}
    # Dynamo keeps its graphs, and counts recompilations against its limit (8), per code object. On
    # decode_logits' own, every compiled model of another dtype or scheme added two graphs (batch 1,
    # larger), and the fifth kind in one process failed ("recompile limit"): a copy of the code per
    # model gives each model its own count and cache, freed with it.
    code = decode_logits.__code__.replace()  # equal, not the same object
    step = types.FunctionType(code, decode_logits.__globals__, decode_logits.__name__)
    model.compiled_decode = torch.compile(step, fullgraph=True, dynamic=True, options=options)


CACHE_BUCKET = 64


def decode_step(model: PaliGemma, batch: PromptBatch | Layout, token: torch.Tensor, slot: torch.Tensor, cache) -> torch.Tensor:
    """decode_logits, compiled when compile_decode was called on the model. Uncompiled, the step
    sees only the slots written so far: attending over the empty rest costs eager mode ~10 % on
    the bundled model, and shapes that change each step cost it nothing."""
    step = getattr(model, "compiled_decode", None)
    if step is not None:
        return step(model, token, slot, batch.block, batch.pos, batch.valid, cache)
    n = int(slot.max()) + 1
    return decode_logits(model, token, slot, batch.block[:, :n], batch.pos[:, :n], batch.valid[:, :n], cache)


def cache_slots(model: PaliGemma, prompt_len: int, max_new_tokens: int) -> int:
    """Extra cache slots after a prompt: max_new_tokens, rounded up for a compiled step (CACHE_BUCKET)."""
    if getattr(model, "compiled_decode", None) is None:
        return max_new_tokens
    return -(-(prompt_len + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET - prompt_len


def new_generator(device, seed: int | None) -> torch.Generator:
    """The sampling generator of one request: seeded, or from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@torch.inference_mode()
def stream_tokens(model: PaliGemma, prompts: list[list[int]], image_tokens: torch.Tensor | None,
                  cfg: SamplingConfig, eos_id: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (token (B,), its log-prob (B,)) per step until every row has produced <eos> or
    max_new_tokens is reached; a consumer may stop early (streaming). Rows that finished keep
    yielding tokens that the consumer ignores."""
    batch = new_batch(model, prompts, pad_id, cfg.max_new_tokens)
    cache = model.new_cache(len(prompts), batch.valid.shape[1])
    logits = prefill(model, batch, image_tokens, cache)
    slot = torch.full((len(prompts),), batch.prompt_len, device=model.device)
    generator = new_generator(model.device, cfg.seed)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    for step in range(cfg.max_new_tokens):
        if cfg.do_sample:
            token = torch.multinomial(logits_to_probs(logits, cfg), 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(-1)
        yield token, logits.log_softmax(-1).gather(-1, token[:, None])[:, 0]
        done |= token == eos_id
        if done.all() or step == cfg.max_new_tokens - 1:
            return
        logits = decode_step(model, batch, token.masked_fill(done, pad_id), slot, cache)
        slot += 1


def generate(model: PaliGemma, prompts: list[list[int]], image_tokens: torch.Tensor | None,
             cfg: SamplingConfig, eos_id: int, pad_id: int) -> list[Generated]:
    """prompts: token ids with <image> placeholders; image_tokens (I, N, D) in order of appearance."""
    if cfg.num_beams > 1:
        return beam_search(model, prompts, image_tokens, cfg, eos_id, pad_id)
    out = [Generated([]) for _ in prompts]
    done = [False] * len(prompts)
    for token, token_lp in stream_tokens(model, prompts, image_tokens, cfg, eos_id, pad_id):
        for i, (t, lp) in enumerate(zip(token.tolist(), token_lp.tolist())):
            if not done[i] and t != eos_id:
                out[i].tokens.append(t)
                out[i].logprobs.append(lp)
            done[i] = done[i] or t == eos_id
    return out


@torch.inference_mode()
def beam_search(model, prompts, image_tokens, cfg: SamplingConfig, eos_id: int, pad_id: int) -> list[Generated]:
    """Standard beam search: keep the num_beams best partial sequences per prompt, collect those that
    end in <eos>, return the best finished one by length-normalised log-prob."""
    nb, B = cfg.num_beams, len(prompts)
    batch = new_batch(model, prompts, pad_id, cfg.max_new_tokens)
    cache = model.new_cache(B, batch.valid.shape[1])
    logits = prefill(model, batch, image_tokens, cache)
    slot = torch.full((B * nb,), batch.prompt_len, device=model.device)
    rows = torch.arange(B, device=model.device).repeat_interleave(nb)  # expand every row to its beams
    cache.reorder(rows)
    batch.block, batch.pos, batch.valid = batch.block[rows], batch.pos[rows], batch.valid[rows]
    logprobs = logits.log_softmax(-1)[rows]
    beam_score = torch.zeros(B, nb, device=model.device)
    beam_score[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    seqs = [[Generated([]) for _ in range(nb)] for _ in range(B)]
    finished: list[list[tuple[float, Generated]]] = [[] for _ in range(B)]
    V = logprobs.shape[-1]
    for step in range(cfg.max_new_tokens):
        cand = (beam_score[..., None] + logprobs.view(B, nb, V)).view(B, -1)
        top_score, top_idx = cand.topk(2 * nb, dim=-1)  # 2*nb so that nb survive after <eos> ends some
        new_score = torch.full((B, nb), float("-inf"), device=model.device)
        parents = torch.zeros(B, nb, dtype=torch.long, device=model.device)
        tokens = torch.full((B, nb), pad_id, dtype=torch.long, device=model.device)
        new_seqs = [[Generated([]) for _ in range(nb)] for _ in range(B)]
        for b in range(B):
            kept = 0
            for score, idx in zip(top_score[b].tolist(), top_idx[b].tolist()):
                if score == float("-inf"):
                    break
                parent, tok = divmod(idx, V)
                prev = seqs[b][parent]
                lp = float(logprobs[b * nb + parent, tok])
                if tok == eos_id:
                    length = len(prev.tokens) + 1
                    finished[b].append((score / length**cfg.length_penalty, Generated(prev.tokens, prev.logprobs)))
                    continue
                new_seqs[b][kept] = Generated(prev.tokens + [tok], prev.logprobs + [lp])
                new_score[b, kept], parents[b, kept], tokens[b, kept] = score, parent, tok
                kept += 1
                if kept == nb:
                    break
        seqs, beam_score = new_seqs, new_score
        best_open = (beam_score / (step + 1) ** cfg.length_penalty).max(-1).values
        if all(len(f) >= nb and max(s for s, _ in f) >= best_open[b] for b, f in enumerate(finished)):
            break
        if step == cfg.max_new_tokens - 1:
            break
        cache.reorder((torch.arange(B, device=model.device)[:, None] * nb + parents).view(-1))
        logits = decode_step(model, batch, tokens.view(-1), slot, cache)
        slot += 1
        logprobs = logits.log_softmax(-1)
    results = []
    for b in range(B):
        pool = finished[b] or [(float(beam_score[b, j]) / max(1, len(seqs[b][j].tokens)) ** cfg.length_penalty,
                                seqs[b][j]) for j in range(nb)]
        results.append(max(pool, key=lambda x: x[0])[1])
    return results
