"""Decoding around the model's prefill and decode_step: sampling, the decode step a run uses
(compiled or not), prompt layouts, and beam search.

Greedy and sampled generation run in palikit.engine, for one prompt as for a server's many; beam
search keeps its own loop here, as it reorders whole beams between steps.
Rows of a batch are left-padded so every prompt ends at the same cache slot; positions count only
real tokens and padded slots are masked, so a row gives the same tokens in a batch as alone.
Dims: B batch (rows x beams), P padded prompt length, S cache slots, V vocab.
"""

from __future__ import annotations

import dataclasses

import logging
import types

import torch

from . import kernels, quantize
from .paligemma import Layout, PaliGemma
from .scheduler import Generated, SamplingConfig

__all__ = ["CACHE_BUCKET", "DecodeStep", "Generated", "SamplingConfig", "beam_search", "cache_length",
           "logits_to_probs", "new_generator"]

log = logging.getLogger(__name__)


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


def new_generator(device, seed: int | None) -> torch.Generator:
    """The sampling generator of one request: seeded, or from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# A compiled step attends over whole cache rows: caches are allocated in multiples of this many
# slots, so that a compiled step (and a CUDA graph) sees few shapes.
CACHE_BUCKET = 64


def cache_length(n_tokens: int) -> int:
    return -(-n_tokens // CACHE_BUCKET) * CACHE_BUCKET


class DecodeStep:
    """model.decode_step as a run calls it: compiled with torch.compile when asked (dynamic shapes:
    one compilation for batch size 1, which torch specialises, and one for every larger batch and
    cache length; CUDA graphs on a GPU when asked), or eager over the slots written so far (attending over the
    empty rest costs eager mode ~10 % on the bundled model; shapes that change cost it nothing).
    One-row steps run their products as kernels.one_row_products says.

    emulate_precision_casts rounds fused bf16 / fp16 intermediates as eager does, so compiled greedy
    outputs equal the uncompiled ones. Dynamo keeps its graphs, and counts recompilations against its
    limit (8), per code object: the step compiles a copy of decode_step's code per model, so a
    process may hold compiled models of any dtypes and schemes side by side."""

    def __init__(self, model: PaliGemma, compile: bool = False, cuda_graphs: bool = False):
        self.model, self.compiled = model, None
        self.quantized = quantize.scheme_of(model) is not None
        if compile:
            fn = type(model).decode_step
            step = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
            options = {"emulate_precision_casts": True, "triton.cudagraphs": cuda_graphs and model.device.type == "cuda"}
            self.compiled = torch.compile(step, fullgraph=True, dynamic=True, options=options)

    def __call__(self, token: torch.Tensor, slot: torch.Tensor, layout: Layout, cache,
                 every_slot: bool = False) -> torch.Tensor:
        """every_slot: attend over all the layout's slots in eager mode too (one shape whatever the
        rows' lengths: the engine's batch-invariant mode)."""
        with kernels.one_row_products(token.shape[0], self.model.dtype, self.model.device, self.quantized):
            if self.compiled is not None:
                return self.compiled(self.model, token, slot, layout, cache)
            if not every_slot:
                layout = layout.slots(int(slot.max()) + 1)
            return self.model.decode_step(token, slot, layout, cache)


@torch.inference_mode()
def beam_search(model: PaliGemma, step: DecodeStep, prompts: list[list[int]], image_tokens: torch.Tensor | None,
                cfg: SamplingConfig, eos_id: int, pad_id: int) -> list[Generated]:
    """Standard beam search: keep the num_beams best partial sequences per prompt, collect those that
    end in <eos>, return the best finished one by length-normalised log-prob."""
    nb, B, P = cfg.num_beams, len(prompts), max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], device=model.device)
    layout = Layout.of_prompts([len(p) for p in prompts], cache_length(P + cfg.max_new_tokens), model.device)
    cache = model.new_cache(B, layout.valid.shape[1])
    hidden = model.prefill(model.embed(ids, image_tokens), layout, cache)
    logits = model.logits(hidden[:, -1], "prefill")
    slot = torch.full((B * nb,), P, device=model.device)
    rows = torch.arange(B, device=model.device).repeat_interleave(nb)  # expand every row to its beams
    cache.reorder(rows)
    layout = layout.rows(rows)
    logprobs = logits.log_softmax(-1)[rows]
    beam_score = torch.zeros(B, nb, device=model.device)
    beam_score[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    seqs = [[Generated([]) for _ in range(nb)] for _ in range(B)]
    finished: list[list[tuple[float, Generated]]] = [[] for _ in range(B)]
    V = logprobs.shape[-1]
    for n in range(cfg.max_new_tokens):
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
                    finished[b].append((score / length**cfg.length_penalty,
                                        Generated(prev.tokens, prev.logprobs, finish_reason="eos")))
                    continue
                new_seqs[b][kept] = Generated(prev.tokens + [tok], prev.logprobs + [lp])
                new_score[b, kept], parents[b, kept], tokens[b, kept] = score, parent, tok
                kept += 1
                if kept == nb:
                    break
        seqs, beam_score = new_seqs, new_score
        best_open = (beam_score / (n + 1) ** cfg.length_penalty).max(-1).values
        if all(len(f) >= nb and max(s for s, _ in f) >= best_open[b] for b, f in enumerate(finished)):
            break
        if n == cfg.max_new_tokens - 1:
            break
        cache.reorder((torch.arange(B, device=model.device)[:, None] * nb + parents).view(-1))
        logits = step(tokens.view(-1), slot, layout, cache)
        slot += 1
        logprobs = logits.log_softmax(-1)
    results = []
    for b in range(B):
        pool = finished[b] or [(float(beam_score[b, j]) / max(1, len(seqs[b][j].tokens)) ** cfg.length_penalty,
                                dataclasses.replace(seqs[b][j], finish_reason="length")) for j in range(nb)]
        results.append(max(pool, key=lambda x: x[0])[1])
    return results
