"""The segmentation VQ-VAE: PaliGemma's 16 <seg> tokens <-> a 64x64 mask inside a box.

It is the instance-segmentation VQ-VAE of "All in Tokens" (Ning et al. 2023), published by
big_vision as `vae-oid.npz`, a PyTorch state dict. Submodule names reproduce its keys, so loading
is a checked copy. Behaviour follows big_vision `pp/proj/paligemma/segmentation.py` (mask -> tokens)
and `evaluators/proj/paligemma/transfers/segmentation.py` (tokens -> mask in the image).
Dims: B batch, K codes, D code width, T tokens (4x4 grid, row-major), S mask side.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .atomic import atomic_write
from .tasks import NUM_SEG

# The published npz may carry the EMA quantiser's running statistics; inference never reads them.
_IGNORED_KEYS = {"_vq_vae._ema_w", "_vq_vae._ema_cluster_size"}


@dataclass(frozen=True)
class MaskCodecConfig:
    num_codes: int = NUM_SEG  # codebook rows = the <segNNN> tokens
    code_dim: int = 512  # width of a codebook entry and of the encoder output
    # Encoder conv widths (each conv halves the side); the decoder mirrors them back up.
    hidden: tuple[int, ...] = (16, 32, 64, 128)
    mask_size: int = 64  # side of the mask the codes describe

    @property
    def grid_size(self) -> int:
        return self.mask_size // 2 ** len(self.hidden)  # 4 for the real codec: 16 tokens


MASK_CODEC_PRESETS = {
    "vae-oid": MaskCodecConfig(),
    # Same layout, a quarter of the widths: trains on synthetic shapes in ~15 s on two CPU cores.
    "tiny": MaskCodecConfig(code_dim=64, hidden=(8, 16, 32, 64)),
}


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)  # no ReLU after the sum


class VectorQuantizer(nn.Module):
    """Holds the codebook; the npz stores it as a bare tensor, hence a Parameter, not nn.Embedding."""

    def __init__(self, num_codes: int, code_dim: int):
        super().__init__()
        self._embedding = nn.Parameter(torch.randn(num_codes, code_dim))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., D) -> index of the nearest codebook row by squared L2, shape (...)."""
        e = self._embedding
        # |z|^2 is the same for every code, so it does not change the argmin.
        dist = (e * e).sum(1) - 2 * z @ e.t()
        return dist.argmin(-1)


class MaskCodec(nn.Module):
    def __init__(self, config: MaskCodecConfig = MASK_CODEC_PRESETS["vae-oid"]):
        super().__init__()
        if config.grid_size < 1 or config.mask_size % 2 ** len(config.hidden):
            raise ValueError(f"mask_size {config.mask_size} is not divisible by 2^{len(config.hidden)}")
        self.config = config
        c = config.hidden
        # Indices matter: they are the npz keys (encoder.0/2/4/6 convs, 8/9 resblocks, 10 to codes).
        down = []
        for c_in, c_out in zip((1, *c[:-1]), c):
            down += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(
            *down, ResBlock(c[-1]), ResBlock(c[-1]), nn.Conv2d(c[-1], config.code_dim, 1)
        )
        self._vq_vae = VectorQuantizer(config.num_codes, config.code_dim)
        # decoder.0 from codes, 2/3 resblocks, 4/6/8/10 transposed convs, 12 to one channel.
        up = []
        widths = c[::-1]
        for c_in, c_out in zip((widths[0], *widths[:-1]), widths):
            up += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        self.decoder = nn.Sequential(
            nn.Conv2d(config.code_dim, c[-1], 1),
            nn.ReLU(),
            ResBlock(c[-1]),
            ResBlock(c[-1]),
            *up,
            nn.Conv2d(c[0], 1, 1),
        )

    # ---- tokens <-> 64x64 masks ----

    def _latents(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, S, S) masks in [0, 1] -> encoder output (B, T, D), row-major over the grid."""
        if self.encoder is None:
            raise ValueError("this MaskCodec was loaded without encoder weights; it can only decode")
        x = 2 * (masks.float() - 0.5)  # the codec was trained on masks in [-1, 1]
        z = self.encoder(x[:, None])  # (B, D, g, g)
        return z.flatten(2).transpose(1, 2)

    def _decode_latents(self, zq: torch.Tensor) -> torch.Tensor:
        """(B, T, D) quantised latents -> (B, S, S) mask logits."""
        B, T, D = zq.shape
        g = self.config.grid_size
        return self.decoder(zq.transpose(1, 2).reshape(B, D, g, g))[:, 0]

    @torch.no_grad()
    def encode(self, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, S, S) float masks in [0, 1] (or bool) -> (B, T) int64 codes."""
        masks = masks if torch.is_tensor(masks) else torch.from_numpy(np.asarray(masks))
        S = self.config.mask_size
        if masks.ndim != 3 or masks.shape[1:] != (S, S):
            raise ValueError(f"masks must have shape (B, {S}, {S}), got {tuple(masks.shape)}")
        return self._vq_vae.nearest(self._latents(masks.to(self._vq_vae._embedding.device)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray | Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, T) codes, row-major over the grid -> (B, S, S) float logits approximating 2*mask - 1."""
        if self.decoder is None:
            raise ValueError("this MaskCodec was loaded without decoder weights; it can only encode")
        codes = codes if torch.is_tensor(codes) else torch.from_numpy(np.asarray(codes))
        T, K = self.config.grid_size**2, self.config.num_codes
        if codes.ndim != 2 or codes.shape[1] != T:
            raise ValueError(f"codes must have shape (B, {T}), got {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= K):
            raise ValueError(f"codes must be in [0, {K - 1}], got range [{codes.min()}, {codes.max()}]")
        e = self._vq_vae._embedding
        return self._decode_latents(e[codes.to(e.device).long()])

    def encode_mask_in_box(self, mask_full: np.ndarray, box_xyxy_pixels: Sequence[float]) -> torch.Tensor:
        """Tokens for the part of a full-image bool mask inside a pixel box, as big_vision makes targets."""
        H, W = mask_full.shape
        x1, y1, x2, y2 = box_xyxy_pixels
        # Round, then clamp so a box poking out of the image cannot wrap around via negative indices.
        rows = [min(max(int(round(v)), 0), H) for v in (y1, y2)]
        cols = [min(max(int(round(v)), 0), W) for v in (x1, x2)]
        crop = np.asarray(mask_full, np.float32)[rows[0] : rows[1], cols[0] : cols[1]]
        if crop.size == 0:
            raise ValueError(f"box {tuple(box_xyxy_pixels)} selects an empty crop of the {H}x{W} mask")
        S = self.config.mask_size
        # PIL's bilinear filter widens its support when shrinking, i.e. it antialiases.
        small = np.asarray(Image.fromarray(crop).resize((S, S), Image.BILINEAR))
        return self.encode(np.clip(small, 0.0, 1.0)[None])[0]

    # ---- npz checkpoints ----

    @classmethod
    def from_npz(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        config: MaskCodecConfig | None = None,
    ) -> MaskCodec:
        """Load `vae-oid.npz` (or one written by save_npz); sizes come from the tensor shapes unless
        `config` is given. A file without any encoder.* keys (or decoder.* keys) loads too; using the
        missing half then raises. EMA statistics are ignored; any other key or shape difference raises."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"mask codec not found: {path}")
        if not zipfile.is_zipfile(path):  # np.load would call anything else "pickled data"
            raise ValueError(f"{path} is not an .npz file: the mask codec is big_vision's vae-oid.npz "
                             "or a mask_codec.npz written by palikit")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k not in _IGNORED_KEYS}
        codec = cls(config or _infer_config(arrays))
        present = {part: any(k.startswith(part + ".") for k in arrays) for part in ("encoder", "decoder")}
        if any(present.values()):  # a file with neither half is simply missing keys
            for part in ("encoder", "decoder"):
                if not present[part]:
                    setattr(codec, part, None)  # drops its keys from the expected state dict
        expected = codec.state_dict()
        missing = sorted(set(expected) - set(arrays))
        unexpected = sorted(set(arrays) - set(expected))
        wrong = [
            f"{k}: file {arrays[k].shape} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in arrays and arrays[k].shape != tuple(v.shape)
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path} does not match MaskCodec({codec.config}): missing keys {missing}, "
                f"unexpected keys {unexpected}, shape mismatches {wrong}"
            )
        codec.load_state_dict({k: torch.from_numpy(np.asarray(arrays[k], np.float32)) for k in expected})
        return codec.to(device).eval()

    def save_npz(self, path: str | os.PathLike) -> None:
        """Write the state dict as float32 arrays, atomically (temp file in the same dir, then rename)."""
        path = Path(path)
        arrays = {k: v.detach().cpu().float().numpy() for k, v in self.state_dict().items()}
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, **arrays)

        atomic_write(path, write)


def _infer_config(arrays: dict[str, np.ndarray]) -> MaskCodecConfig:
    """Sizes read off the tensor shapes. Anything unreadable falls back to the vae-oid value, so a
    damaged file still reaches the key check in from_npz and gets its precise error."""
    default = MaskCodecConfig()
    K, D = default.num_codes, default.code_dim
    codebook = arrays.get("_vq_vae._embedding")
    if codebook is not None and codebook.ndim == 2:
        K, D = codebook.shape
    n = len(default.hidden)
    # encoder.0/2/4/6 output the widths; decoder.10/8/6/4 output them too (ConvTranspose2d
    # weights are (in, out, kh, kw)).
    enc = [arrays.get(f"encoder.{2 * i}.weight") for i in range(n)]
    dec = [arrays.get(f"decoder.{4 + 2 * (n - 1 - i)}.weight") for i in range(n)]
    if all(w is not None for w in enc):
        hidden = tuple(w.shape[0] for w in enc)
    elif all(w is not None for w in dec):
        hidden = tuple(w.shape[1] for w in dec)
    else:
        hidden = default.hidden
    return MaskCodecConfig(num_codes=K, code_dim=D, hidden=hidden)


def paste_mask(mask64: np.ndarray, box_xyxy_pixels: Sequence[float], height: int, width: int) -> np.ndarray:
    """Decoded logits (S, S) -> bool (height, width) mask, as the big_vision evaluator scores it."""
    x1, y1, x2, y2 = (int(v) for v in box_xyxy_pixels)  # int() truncates, like the evaluator
    x1, x2 = (min(max(v, 0), width) for v in (x1, x2))
    y1, y2 = (min(max(v, 0), height) for v in (y1, y2))
    out = np.zeros((height, width), bool)
    if x2 <= x1 or y2 <= y1:
        return out
    resized = Image.fromarray(np.asarray(mask64, np.float32)).resize((x2 - x1, y2 - y1), Image.BILINEAR)
    out[y1:y2, x1:x2] = np.asarray(resized) > 0.0  # logits approximate 2*mask - 1
    return out


# ---- training ----


def train_codec(
    masks: torch.Tensor,
    config: MaskCodecConfig = MASK_CODEC_PRESETS["tiny"],
    steps: int = 300,
    lr: float = 3e-3,
    seed: int = 0,
    batch_size: int = 32,
    beta: float = 0.25,
    decay: float = 0.9,
) -> MaskCodec:
    """Fit a MaskCodec to (N, S, S) masks in [0, 1] with the VQ-VAE objective, CPU-sized.

    The encoder and decoder minimise MSE(decoder output, 2m - 1) + beta |z - sg(e)|^2 (commitment)
    through the straight-through estimator. The codebook is not trained by gradient but, like AiT's
    quantiser, as an exponential moving average of the encoder outputs assigned to each code
    (k-means online): Adam moves a code by about lr per step, far slower than the encoder drifts
    early on, which left most codes unused. Codes unused for 25 steps are re-seeded
    from encoder outputs of the current batch. Deterministic for a given seed.
    """
    K, D = config.num_codes, config.code_dim
    if batch_size * config.grid_size**2 < K:
        raise ValueError(f"batch_size {batch_size} gives fewer encoder outputs than the {K} codes to seed")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    codec = MaskCodec(config)
    e = codec._vq_vae._embedding
    e.requires_grad_(False)
    opt = torch.optim.Adam([p for p in codec.parameters() if p.requires_grad], lr=lr)
    masks = masks.float()
    ema_count, ema_sum = torch.ones(K), e.detach().clone()  # overwritten at step 0
    usage = torch.zeros(K)
    reseed_every = 25
    codec.train()
    for step in range(steps):
        batch = masks[torch.randint(len(masks), (batch_size,), generator=gen)]
        z = codec._latents(batch)  # (B, T, D)
        flat = z.detach().reshape(-1, D)
        if step == 0:
            # Start the codebook on real encoder outputs instead of noise far from them.
            e.copy_(flat[torch.randperm(len(flat), generator=gen)[:K]])
            ema_sum = e.clone()
        codes = codec._vq_vae.nearest(z.detach())
        q = e[codes]
        zq = z + (q - z).detach()  # forward uses the code, backward hands its gradient to z
        loss = F.mse_loss(codec._decode_latents(zq), 2 * batch - 1) + beta * F.mse_loss(z, q)
        opt.zero_grad()
        loss.backward()
        opt.step()

        with torch.no_grad():
            count = torch.bincount(codes.flatten(), minlength=K).float()
            ema_count.mul_(decay).add_(count, alpha=1 - decay)
            ema_sum.mul_(decay).index_add_(0, codes.flatten(), flat, alpha=1 - decay)
            e.copy_(ema_sum / ema_count.clamp(min=1e-5)[:, None])
            usage += count
            if (step + 1) % reseed_every == 0:
                dead = (usage == 0).nonzero().flatten()
                pick = flat[torch.randint(len(flat), (len(dead),), generator=gen)]
                e[dead], ema_sum[dead], ema_count[dead] = pick, pick, 1.0
                usage.zero_()
    e.requires_grad_(True)
    return codec.eval()
