"""PaliGemma: SigLIP image tokens, a linear projector, and a Gemma decoder under a prefix-LM mask.

Sequence layout (one row): [<image> x N per image] <bos> prefix "\\n" [suffix <eos>] [pad ...]
Image features replace the <image> placeholders; text embeddings are scaled by sqrt(D) and image
features are not (big_vision; transformers gets the same by dividing the image features first).
Dims: B batch, L sequence length, N image tokens, C vision width, D text width, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import PaliGemmaConfig
from .gemma import Gemma, KVCache, attention_masks
from .kernels import Linear
from .siglip import SiglipVisionTower

# The linear layers by module name (regexes matched in full), for quantisation and LoRA targets.
LLM_LINEAR = r"language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION_LINEAR = (r"vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
                 r"|multi_modal_projector\.linear")


@dataclass
class Layout:
    """What the masks need to know of each cache slot (B, S): its block number (0 for the whole
    prompt, then 1, 2, ... per generated token), RoPE position and whether it holds a real token.
    Slots not written yet have block numbers above every query's, so they are never attended."""

    block: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of_prompts(cls, lengths: list[int], slots: int, device) -> Layout:
        """Prompts of these lengths left-padded to the longest, P, followed by generated slots up to
        `slots` in all."""
        B, P = len(lengths), max(lengths)
        valid = torch.zeros((B, slots), dtype=torch.bool, device=device)
        for i, n in enumerate(lengths):
            valid[i, P - n:] = True  # the generated slots too: block numbers keep each out until written
        pos = (torch.cumsum(valid.long(), -1) - 1).clamp(min=0)
        block = torch.clamp(torch.arange(slots, device=device) - P + 1, min=0).expand(B, slots)
        return cls(block, pos, valid)

    def rows(self, index) -> Layout:
        return Layout(self.block[index], self.pos[index], self.valid[index])

    def slots(self, n: int) -> Layout:
        return Layout(self.block[:, :n], self.pos[:, :n], self.valid[:, :n])


class Projector(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = Linear(config.vision.hidden_size, config.text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PaliGemma(nn.Module):
    """attention: the prompt kernel (gemma.Gemma); logit_softcap: which logits get the final
    soft-cap, "config", "big_vision" or "off" (palikit.options.LOGIT_SOFTCAP_MODES)."""

    def __init__(self, config: PaliGemmaConfig, attention: str = "eager", logit_softcap: str = "config"):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTower(config.vision)
        self.multi_modal_projector = Projector(config)
        self.language_model = Gemma(config.text, attention)
        capped = {"config": {"teacher", "prefill", "decode"}, "big_vision": {"decode"}, "off": set()}
        self.capped = frozenset(capped[logit_softcap] if config.text.final_logit_softcap else ())

    @property
    def dtype(self) -> torch.dtype:  # the final norm's: the embedding table may be quantised
        return self.language_model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.norm.weight.device

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (I, 3, S, S) -> (I, N, D) image tokens in the decoder's space."""
        return self.multi_modal_projector(self.vision_tower(pixels.to(self.dtype)))

    def embed(self, ids: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """ids (B, L) with <image> placeholders; image_tokens (I, N, D), in order of appearance."""
        is_image = ids == self.config.image_token_id
        # The <image> id may lie past the embedding table (big_vision vocab); it is never looked up.
        x = self.language_model.embed(ids.masked_fill(is_image, 0))
        if image_tokens is None:
            if is_image.any():
                raise ValueError("the prompt has <image> tokens but no image was given")
            return x
        n_slots, n_feats = int(is_image.sum()), image_tokens.shape[0] * image_tokens.shape[1]
        if n_slots != n_feats:
            raise ValueError(f"{n_slots} <image> tokens in the input but {n_feats} image features")
        return x.masked_scatter(is_image[..., None], image_tokens.to(x.dtype))

    def forward(self, ids, pixels, input_mask, mask_ar) -> torch.Tensor:
        """Teacher-forced hidden states (B, L, D) of a whole padded batch (training, scoring); their
        logits are `logits(hidden)`.

        input_mask (B, L): real tokens; mask_ar (B, L): 1 where a causal step starts (suffix and
        padding), 0 in the bidirectional prefix. See gemma.attention_masks.
        """
        image_tokens = self.embed_images(pixels) if pixels is not None else None
        x = self.embed(ids, image_tokens)
        block, positions = blocks_and_positions(input_mask, mask_ar)
        masks = attention_masks(block, positions, block, positions, input_mask.bool(), self.config.text)
        return self.language_model(x, positions, masks)

    def logits(self, hidden: torch.Tensor, where: str = "teacher") -> torch.Tensor:
        """Logits of hidden states at `where`: "teacher" (teacher-forced: loss, scores), "prefill" or
        "decode"; the final soft-cap as logit_softcap says for that kind of position."""
        return self.language_model.logits(hidden, where in self.capped)

    # ---- decoding: big_vision's prefill_cache and extend_cache (models/proj/paligemma/paligemma.py)

    def new_cache(self, batch: int, length: int) -> KVCache:
        return KVCache.allocate(self.config.text, batch, length, self.dtype, self.device)

    def prefill(self, x: torch.Tensor, layout: Layout, cache: KVCache, layers: slice = slice(None)) -> torch.Tensor:
        """Decoder layers `layers` (all by default) over a prompt's embeddings or the hidden states
        of the layers before, x (B, P, D), under the prefix-LM mask; their keys and values go to
        cache slots [0, P). -> the hidden states after them; the next token's logits are
        `logits(hidden[:, -1], "prefill")` after the last layer.

        A prompt cannot be split by tokens as causal models chunk their prefill: image + prefix are
        one bidirectional block, so a layer's keys for the first token depend on the last one. It
        can be split by layers, which is how palikit.engine bounds the time a long prompt holds back
        the rows it decodes."""
        P = x.shape[1]
        pos, block, valid = layout.pos[:, :P], layout.block[:, :P], layout.valid[:, :P]
        masks = attention_masks(block, pos, block, pos, valid, self.config.text)
        return self.language_model(x, pos, masks, cache, 0, layers)

    def decode_step(self, token: torch.Tensor, slot: torch.Tensor, layout: Layout, cache: KVCache) -> torch.Tensor:
        """One token per row, token (B,), written at cache slot `slot` (B,) and attending over the
        layout's S slots -> next-token logits (B, V).

        The layout describes every slot, those not written yet included: their block numbers are
        above the query's, so the prefix-LM rule keeps them out, and a step needs no slicing, no
        per-row Python and no new shapes: torch.compile compiles it once, CUDA graphs replay it."""
        rows = torch.arange(token.shape[0], device=token.device)
        q_block, q_pos = layout.block[rows, slot][:, None], layout.pos[rows, slot][:, None]
        masks = attention_masks(q_block, q_pos, layout.block, layout.pos, layout.valid, self.config.text)
        x = self.language_model.embed(token[:, None])
        hidden = self.language_model(x, q_pos, masks, cache, start=slot)
        return self.logits(hidden[:, -1], "decode")


def blocks_and_positions(input_mask: torch.Tensor, mask_ar: torch.Tensor):
    """Block number c = cumsum(mask_ar) and 0-based RoPE positions cumsum(input_mask) - 1.

    Positions count real tokens only, so left padding does not shift a row (transformers numbers
    from 1; RoPE is relative, so both give the same attention in exact arithmetic).
    """
    block = torch.cumsum(mask_ar.long(), dim=-1)
    positions = (torch.cumsum(input_mask.long(), dim=-1) - 1).clamp(min=0)
    return block, positions
