"""PaliGemma: SigLIP image tokens, a linear projector, and a Gemma decoder under a prefix-LM mask.

Sequence layout (one row): [<image> x N per image] <bos> prefix "\\n" [suffix <eos>] [pad ...]
Image features replace the <image> placeholders; text embeddings are scaled by sqrt(D) and image
features are not (big_vision; transformers gets the same by dividing the image features first).
Dims: B batch, L sequence length, N image tokens, C vision width, D text width, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PaliGemmaConfig
from .gemma import Gemma, KVCache, attention_masks
from .siglip import SiglipVisionTower


class Projector(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision.hidden_size, config.text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PaliGemma(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTower(config.vision)
        self.multi_modal_projector = Projector(config)
        self.language_model = Gemma(config.text)

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
        """Teacher-forced hidden states (B, L, D) of a whole padded batch (training, scoring).

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
        "decode"; the final soft-cap as config.logit_softcap says for that kind of position."""
        return self.language_model.logits(hidden, self.config.caps(where))

    def new_cache(self, batch: int, length: int) -> KVCache:
        return KVCache.allocate(self.config.text, batch, length, self.dtype, self.device)


def blocks_and_positions(input_mask: torch.Tensor, mask_ar: torch.Tensor):
    """Block number c = cumsum(mask_ar) and 0-based RoPE positions cumsum(input_mask) - 1.

    Positions count real tokens only, so left padding does not shift a row (transformers numbers
    from 1; RoPE is relative, so both give the same attention in exact arithmetic).
    """
    block = torch.cumsum(mask_ar.long(), dim=-1)
    positions = (torch.cumsum(input_mask.long(), dim=-1) - 1).clamp(min=0)
    return block, positions
