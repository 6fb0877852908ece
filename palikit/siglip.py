"""SigLIP vision tower as PaliGemma uses it: patch conv, learned positions, pre-LN ViT, final LN.

No pooling head: PaliGemma keeps all N = (image_size / patch_size)^2 tokens.
Dims: B batch, N image tokens, C vision width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SiglipConfig
from .kernels import Linear


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.num_image_tokens, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels)  # (B, C, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C), row-major over the patch grid
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        c = config.hidden_size
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads); scale 1/sqrt(head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(config) for _ in range(config.num_layers))


class SiglipVisionTower(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) in [-1, 1] -> (B, N, C)."""
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.post_layernorm(x)
