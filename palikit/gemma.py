"""Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2) decoders, one code path switched by GemmaConfig.

Dims: B batch, T query length, S key length (cache slots), D width, H query heads, K kv heads,
G = H // K queries per kv head, Dh head dim, F MLP width.
Module names follow transformers so LoRA target lists (q_proj, ..., down_proj) work unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .config import GemmaConfig
from .kernels import Linear, linear, matmul


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w): Gemma stores the scale minus one (initialised to zero)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # statistics in float32 whatever the model dtype
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, Dh), computed in float32 then cast."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotates the two halves of each head (not interleaved pairs), as big_vision and HF do.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class KVCache:
    """Preallocated keys/values, one (B, K, S_max, Dh) tensor per layer each. Separate tensors, not
    one with a layer axis: a decode step then writes each in place (scatter_), where a write into
    a slice of a shared tensor makes torch.compile copy the whole cache every step."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, config: GemmaConfig, batch: int, length: int, dtype, device) -> KVCache:
        shape = (batch, config.num_kv_heads, length, config.head_dim)
        return cls(*([torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
                     for _ in "kv"))

    def write(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, K, T, Dh) into slots [start, start + T): `start` an int for the whole batch, or
        a tensor (B,) of one slot per row for a single token (T = 1) at a different slot per row,
        as decode steps write (a tensor keeps the step's shapes and code constant for torch.compile)."""
        if isinstance(start, int):
            self.k[layer][:, :, start : start + k.shape[2]] = k
            self.v[layer][:, :, start : start + v.shape[2]] = v
        else:
            index = start.view(-1, 1, 1, 1).expand(k.shape)
            self.k[layer].scatter_(2, index, k)
            self.v[layer].scatter_(2, index, v)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search)."""
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        H, K, Dh, D = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
        self.q_proj = Linear(D, H * Dh, bias=False)
        self.k_proj = Linear(D, K * Dh, bias=False)
        self.v_proj = Linear(D, K * Dh, bias=False)
        self.o_proj = Linear(H * Dh, D, bias=False)
        self.scale = config.query_pre_attn_scalar**-0.5

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, start: int | torch.Tensor = 0):
        """x (B, T, D); mask bool (B, 1, T, S), True = may attend, or the same as a FlexAttention
        BlockMask (Gemma.attention = "flex"); cache slots [start, start+T) are written (see
        KVCache.write) and slots [0, S) attended."""
        B, T, _ = x.shape
        H, K, Dh = self.config.num_heads, self.config.num_kv_heads, self.config.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, Dh).transpose(1, 2), cos, sin)  # (B, H, T, Dh)
        k = apply_rope(self.k_proj(x).view(B, T, K, Dh).transpose(1, 2), cos, sin)  # (B, K, T, Dh)
        v = self.v_proj(x).view(B, T, K, Dh).transpose(1, 2)
        if cache is not None:
            cache.write(self.layer_idx, start, k, v)
            k = cache.k[self.layer_idx][:, :, : mask.shape[-1]]
            v = cache.v[self.layer_idx][:, :, : mask.shape[-1]]
        cap = self.config.attn_logit_softcap
        if isinstance(mask, BlockMask):
            out = flex(q, k, v, mask, cap, self.scale)
        elif cap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=K != H)
        else:
            # SDPA has no soft-cap, so Gemma 2 runs the scores explicitly. Queries are grouped per kv
            # head, (B, K, G*T, Dh), so k/v are never repeated in memory.
            S = k.shape[2]
            scores = matmul(q.reshape(B, K, H // K * T, Dh), k.transpose(-1, -2)) * self.scale
            scores = cap * torch.tanh(scores / cap)  # before masking, as in big_vision and HF
            scores = scores.view(B, K, H // K, T, S).masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
            probs = scores.float().softmax(-1).to(v.dtype).view(B, K, H // K * T, S)
            out = matmul(probs, v).view(B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * Dh))


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        # Gemma 2 alternates local (even layers) and global attention when a window is configured
        # (attention_masks then builds a "sliding" mask); see GemmaConfig.sliding_window.
        self.local_if_windowed = layer_idx % 2 == 0
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = Attention(config, layer_idx)
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.mlp = MLP(config)
        if config.post_norms:
            self.post_attention_layernorm = RMSNorm(D, eps)
            self.post_feedforward_layernorm = RMSNorm(D, eps)
        self.post_norms = config.post_norms

    def forward(self, x, cos, sin, masks: dict, cache=None, start=0):
        """x (B, T, D) -> (B, T, D)."""
        mask = masks["sliding"] if self.local_if_windowed and "sliding" in masks else masks["global"]
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        if self.post_norms:
            h = self.post_attention_layernorm(h)
        x = x + h
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.post_norms:
            h = self.post_feedforward_layernorm(h)
        return x + h


class Gemma(nn.Module):
    """The decoder. attention: the kernel of prompts and training sequences, "eager" (SDPA, or
    Gemma 2's soft-capped scores written out) or "flex" (FlexAttention); decode steps (one query)
    always run eager."""

    def __init__(self, config: GemmaConfig, attention: str = "eager"):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.attention = attention

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(D), the factor rounded to the table's dtype (big_vision)."""
        rows = self.embed_tokens(ids)  # an nn.Embedding, or quantize.Int8Embedding's dequantised rows
        return rows * torch.tensor(self.config.hidden_size**0.5, dtype=rows.dtype)

    def forward(self, x, positions, masks: dict, cache: KVCache | None = None, start: int | torch.Tensor = 0,
                layers: slice = slice(None)) -> torch.Tensor:
        """x (B, T, D) embeddings; positions (B, T) -> the hidden states (B, T, D) after `layers`
        (all by default; the final norm is the output layer's, see logits)."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        masks = self.kernel_masks(masks)
        for layer in self.layers[layers]:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, masks, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks, cache, start)
        return x

    def kernel_masks(self, masks: dict) -> dict:
        """attention_masks' boolean masks as the attention kernel takes them: FlexAttention's
        BlockMasks (made once per forward, shared by the layers) for prompts and training sequences
        when self.attention is "flex", else as they are. FlexAttention has no backward on a CPU
        (torch 2.13), so training there runs eager."""
        mask = masks["global"]
        if self.attention != "flex" or mask.shape[2] == 1 or (torch.is_grad_enabled() and mask.device.type == "cpu"):
            return masks
        return {name: block_mask(m) for name, m in masks.items()}

    def logits(self, hidden: torch.Tensor, capped: bool = True) -> torch.Tensor:
        """The output layer: final norm, tied embedding, Gemma 2's final soft-cap when `capped`;
        float32 for stable log-probs."""
        hidden = self.norm(hidden)
        if hasattr(self.embed_tokens, "project"):  # quantised: palikit.quantize.Int8Embedding
            logits = self.embed_tokens.project(hidden).float()
        else:
            logits = linear(hidden, self.embed_tokens.weight).float()
        cap = self.config.final_logit_softcap
        return cap * torch.tanh(logits / cap) if cap and capped else logits


def attention_masks(q_block, q_pos, k_block, k_pos, k_valid, config: GemmaConfig) -> dict:
    """Prefix-LM masks, (B, 1, T, S) bool, True = may attend.

    Every token carries a block number c = cumsum(mask_ar): 0 for image + <bos> + prefix + "\\n"
    (one bidirectional block), 1, 2, ... for suffix tokens. A query sees a key iff the key is a
    real token and c_key <= c_query (big_vision's make_attn_mask). That is full attention over the
    prefix and causal attention over the suffix, in training, scoring, prefill and decoding alike.
    """
    allowed = (k_block[:, None, :] <= q_block[:, :, None]) & k_valid[:, None, :]
    masks = {"global": allowed[:, None]}
    if config.sliding_window is not None:
        near = (q_pos[:, :, None] - k_pos[:, None, :]) < config.sliding_window
        both_prefix = (q_block[:, :, None] == 0) & (k_block[:, None, :] == 0)
        masks["sliding"] = (allowed & (near | both_prefix))[:, None]
    return masks


# ---- FlexAttention (Dong et al., "Flex Attention", 2024; torch.nn.attention.flex_attention)


def block_mask(mask: torch.Tensor) -> BlockMask:
    """A boolean mask (B, 1, T, S) as a BlockMask: FlexAttention skips the blocks it excludes (the
    suffix's future, the keys beyond a sliding window) and never writes out a (T, S) score matrix."""
    B, _, T, S = mask.shape
    return create_block_mask(lambda b, h, q, kv: mask[b, 0, q, kv], B, None, T, S, device=mask.device)


@functools.cache
def _softcap(cap: float):
    def score_mod(score, b, h, q, kv):
        return cap * torch.tanh(score / cap)  # before the mask, as in big_vision and transformers

    return score_mod


@functools.cache
def _compiled_flex(device_type: str):
    # Uncompiled, flex_attention runs a slow reference; compiled, fused kernels (Triton on a GPU,
    # C++ on a CPU), one compilation per process reused by every layer. On a CPU with static shapes
    # (a compilation per prompt length): once torch 2.13 turned the shapes dynamic there, after a
    # PaliGemma 1 model had run, the C++ kernel of a soft-capped one failed to compile
    # ("cur_kvSplitSize5 was not declared"). On a GPU shapes go dynamic after the first change.
    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


def flex(q, k, v, mask: BlockMask, cap: float | None, scale: float) -> torch.Tensor:
    """q (B, H, T, Dh), k / v (B, K, S, Dh) -> (B, H, T, Dh): Gemma 2's soft-capped attention (the
    cap a score_mod) under the prefix-LM mask, grouped queries without repeating k / v."""
    attend = _compiled_flex(q.device.type)
    return attend(q, k, v, score_mod=_softcap(cap) if cap else None, block_mask=mask, scale=scale,
                  enable_gqa=k.shape[1] != q.shape[1])
