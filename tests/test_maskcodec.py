"""MaskCodec: npz layout, parity with a functional re-implementation, training, pasting into images.

The functional reference below reads the raw npz arrays by key name and follows the decoder of
big_vision's `pp/proj/paligemma/segmentation.py` directly, so it shares no code with palikit.maskcodec.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from palikit.maskcodec import (
    MASK_CODEC_PRESETS,
    MaskCodec,
    MaskCodecConfig,
    paste_mask,
    train_codec,
)


def random_shape_masks(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """n filled ellipses, rectangles or triangles, float (n, size, size) in {0, 1}.

    Half fill the whole frame, as a mask cropped to its own box does (what the codec sees in
    PaliGemma); the rest have random sizes and positions.
    """
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size), np.float32)
    for i in range(n):
        if rng.random() < 0.5:
            w = h = size - 1
            x0 = y0 = 0.0
        else:
            w, h = rng.uniform(0.3, 1.0, 2) * (size - 1)
            x0, y0 = rng.uniform(0, size - 1 - w), rng.uniform(0, size - 1 - h)
        img = Image.new("L", (size, size))
        draw = ImageDraw.Draw(img)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=1)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=1)
        else:
            # Apex somewhere on the top edge, base along the bottom; a random quarter turn then
            # points it any of four ways.
            apex = x0 + rng.uniform(0, w)
            draw.polygon([(apex, y0), (x0, y0 + h), (x0 + w, y0 + h)], fill=1)
        m = np.asarray(img, np.float32)
        if kind == 2:
            m = np.rot90(m, rng.integers(4))
        out[i] = m
    return torch.from_numpy(out)

# The real vae-oid.npz sizes (PyTorch layouts: Conv2d (out, in, kh, kw), ConvTranspose2d
# (in, out, kh, kw)).
SPEC_SHAPES = {
    "_vq_vae._embedding": (128, 512),
    "encoder.0.weight": (16, 1, 4, 4),
    "encoder.6.weight": (128, 64, 4, 4),
    "encoder.10.weight": (512, 128, 1, 1),
    "decoder.0.weight": (128, 512, 1, 1),
    "decoder.2.net.0.weight": (128, 128, 3, 3),
    "decoder.3.net.4.weight": (128, 128, 1, 1),
    "decoder.4.weight": (128, 128, 4, 4),
    "decoder.6.weight": (128, 64, 4, 4),
    "decoder.8.weight": (64, 32, 4, 4),
    "decoder.10.weight": (32, 16, 4, 4),
    "decoder.12.weight": (1, 16, 1, 1),
    "decoder.12.bias": (1,),
}


def spec_keys() -> set[str]:
    def layer(name):
        return {f"{name}.weight", f"{name}.bias"}

    def resblock(name):
        return set().union(*(layer(f"{name}.net.{i}") for i in (0, 2, 4)))

    keys = {"_vq_vae._embedding"}
    for i in (0, 2, 4, 6, 10):
        keys |= layer(f"encoder.{i}")
    for i in (0, 4, 6, 8, 10, 12):
        keys |= layer(f"decoder.{i}")
    return keys | resblock("encoder.8") | resblock("encoder.9") | resblock("decoder.2") | resblock("decoder.3")


# ---- functional reference over raw arrays ----


def _conv(x, a, name, transpose=False, **kw):
    w, b = torch.from_numpy(a[f"{name}.weight"]), torch.from_numpy(a[f"{name}.bias"])
    return (F.conv_transpose2d if transpose else F.conv2d)(x, w, b, **kw)


def _resblock(x, a, name):
    h = F.relu(_conv(x, a, f"{name}.net.0", padding=1))
    h = F.relu(_conv(h, a, f"{name}.net.2", padding=1))
    return x + _conv(h, a, f"{name}.net.4")


def ref_decode(a, codes):
    B = codes.shape[0]
    x = F.embedding(codes, torch.from_numpy(a["_vq_vae._embedding"]))  # (B, 16, D)
    x = x.reshape(B, 4, 4, -1).permute(0, 3, 1, 2)  # token r*4+c sits at grid row r, column c
    x = F.relu(_conv(x, a, "decoder.0"))
    x = _resblock(_resblock(x, a, "decoder.2"), a, "decoder.3")
    for i in (4, 6, 8, 10):
        x = F.relu(_conv(x, a, f"decoder.{i}", transpose=True, stride=2, padding=1))
    return _conv(x, a, "decoder.12")[:, 0]


def ref_encode(a, masks):
    x = (2 * masks - 1)[:, None]
    for i in (0, 2, 4, 6):
        x = F.relu(_conv(x, a, f"encoder.{i}", stride=2, padding=1))
    x = _conv(_resblock(_resblock(x, a, "encoder.8"), a, "encoder.9"), a, "encoder.10")
    z = x.permute(0, 2, 3, 1).reshape(x.shape[0], 16, -1)
    e = torch.from_numpy(a["_vq_vae._embedding"])
    return ((z[:, :, None, :] - e) ** 2).sum(-1).argmin(-1)


def iou(a, b):
    a, b = torch.as_tensor(a).bool(), torch.as_tensor(b).bool()
    inter = (a & b).flatten(-2).sum(-1).float()
    return inter / (a | b).flatten(-2).sum(-1).float().clamp(min=1)


@pytest.fixture(scope="module")
def random_npz(tmp_path_factory):
    """A real-sized codec with seeded random weights, saved by save_npz."""
    torch.manual_seed(0)
    codec = MaskCodec(MASK_CODEC_PRESETS["vae-oid"])
    # Random codes sit far from the encoder outputs and would all lose to the smallest one; seed the
    # codebook with noisy encoder outputs so the argmin comparison is meaningful.
    with torch.no_grad():
        z = codec._latents(random_shape_masks(16, seed=1)).reshape(-1, 512)
        codec._vq_vae._embedding.copy_(z[torch.randperm(len(z))[:128]] + 0.01 * torch.randn(128, 512))
    path = tmp_path_factory.mktemp("codec") / "vae.npz"
    codec.save_npz(path)
    return path


# ---- layout and parity ----


def test_save_npz_writes_exactly_the_spec_keys(random_npz):
    with np.load(random_npz) as npz:
        assert set(npz.files) == spec_keys()
        assert all(npz[k].dtype == np.float32 for k in npz.files)
        for k, shape in SPEC_SHAPES.items():
            assert npz[k].shape == shape, k
    assert os.listdir(random_npz.parent) == [random_npz.name]  # no temp file left behind


def test_decode_matches_functional_reference(random_npz):
    codec = MaskCodec.from_npz(random_npz)
    codes = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    out = codec.decode(codes)
    assert out.shape == (5, 64, 64) and out.dtype == torch.float32
    with np.load(random_npz) as npz:
        ref = ref_decode(dict(npz), codes)
    assert (out - ref).abs().max().item() <= 1e-5
    # numpy and nested lists decode the same
    torch.testing.assert_close(codec.decode(codes.numpy().astype(np.int32)), out)
    torch.testing.assert_close(codec.decode(codes.tolist()), out)


def test_encode_matches_functional_reference(random_npz):
    codec = MaskCodec.from_npz(random_npz)
    masks = random_shape_masks(8, seed=2)
    codes = codec.encode(masks)
    with np.load(random_npz) as npz:
        ref = ref_encode(dict(npz), masks)
    assert codes.dtype == torch.int64 and codes.shape == (8, 16)
    assert codes.unique().numel() > 8  # the comparison must not be between constant outputs
    assert torch.equal(codes, ref)
    assert torch.equal(codec.encode(masks.numpy() > 0.5), codes)  # bool masks are accepted


def test_decode_and_encode_validate_inputs(random_npz):
    codec = MaskCodec.from_npz(random_npz)
    for bad in (torch.zeros(2, 15, dtype=torch.long), torch.zeros(16, dtype=torch.long)):
        with pytest.raises(ValueError, match="shape"):
            codec.decode(bad)
    for value in (-1, 128):
        with pytest.raises(ValueError, match=r"\[0, 127\]"):
            codec.decode(torch.full((1, 16), value))
    with pytest.raises(ValueError, match="integers"):
        codec.decode(torch.zeros(1, 16))
    with pytest.raises(ValueError, match="shape"):
        codec.encode(torch.zeros(2, 32, 32))


# ---- loading ----


def _rewrite(src, dst, drop=(), **extra):
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files if not k.startswith(drop)}
    np.savez(dst, **{**arrays, **extra})
    return dst


def test_ema_buffers_are_ignored(random_npz, tmp_path):
    path = _rewrite(
        random_npz,
        tmp_path / "ema.npz",
        **{"_vq_vae._ema_w": np.ones((128, 512), np.float32), "_vq_vae._ema_cluster_size": np.ones(128)},
    )
    codes = torch.arange(16)[None] * 7
    torch.testing.assert_close(MaskCodec.from_npz(path).decode(codes), MaskCodec.from_npz(random_npz).decode(codes))


def test_missing_unexpected_and_misshapen_keys_raise(random_npz, tmp_path):
    with pytest.raises(ValueError, match=r"missing keys \['decoder.2.net.2.bias'\]"):
        MaskCodec.from_npz(_rewrite(random_npz, tmp_path / "a.npz", drop=("decoder.2.net.2.bias",)))
    with pytest.raises(ValueError, match=r"unexpected keys \['decoder.13.weight'\]"):
        MaskCodec.from_npz(_rewrite(random_npz, tmp_path / "b.npz", **{"decoder.13.weight": np.ones(3)}))
    bad = np.zeros((1, 16, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"decoder.12.weight: file \(1, 16, 3, 3\) vs model \(1, 16, 1, 1\)"):
        MaskCodec.from_npz(_rewrite(random_npz, tmp_path / "c.npz", **{"decoder.12.weight": bad}))
    with pytest.raises(ValueError, match="_vq_vae._embedding"):
        MaskCodec.from_npz(random_npz, config=MaskCodecConfig(code_dim=256))


def test_decoder_only_and_encoder_only_files_load(random_npz, tmp_path):
    full = MaskCodec.from_npz(random_npz)
    dec = MaskCodec.from_npz(_rewrite(random_npz, tmp_path / "dec.npz", drop=("encoder.",)))
    codes = torch.arange(32).reshape(2, 16)
    torch.testing.assert_close(dec.decode(codes), full.decode(codes))
    with pytest.raises(ValueError, match="without encoder weights"):
        dec.encode(torch.zeros(1, 64, 64))
    dec.save_npz(tmp_path / "dec2.npz")  # round-trips as a decoder-only file
    with np.load(tmp_path / "dec2.npz") as npz:
        assert set(npz.files) == {k for k in spec_keys() if not k.startswith("encoder.")}

    enc = MaskCodec.from_npz(_rewrite(random_npz, tmp_path / "enc.npz", drop=("decoder.",)))
    masks = random_shape_masks(4, seed=3)
    assert torch.equal(enc.encode(masks), full.encode(masks))
    with pytest.raises(ValueError, match="without decoder weights"):
        enc.decode(codes)


# ---- training on synthetic shapes ----


@pytest.fixture(scope="module")
def trained():
    """The tiny preset trained with train_codec's defaults (300 steps, Adam 3e-3, batch 32)."""
    return train_codec(random_shape_masks(2000, seed=0), MASK_CODEC_PRESETS["tiny"], seed=0)


def test_training_is_deterministic():
    masks = random_shape_masks(64, seed=5)
    a, b, c = (train_codec(masks, steps=3, seed=s) for s in (7, 7, 8))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a._vq_vae._embedding, c._vq_vae._embedding)


@pytest.mark.slow
def test_trained_codec_reconstructs_held_out_shapes(trained, tmp_path):
    held_out = random_shape_masks(200, seed=1234)
    recon = trained.decode(trained.encode(held_out)) > 0
    scores = iou(recon, held_out > 0.5)
    assert scores.mean() >= 0.8, f"mean IoU {scores.mean():.3f}"
    # The tiny codec survives save/load with its sizes read back from the shapes.
    trained.save_npz(tmp_path / "tiny.npz")
    loaded = MaskCodec.from_npz(tmp_path / "tiny.npz")
    assert loaded.config == MASK_CODEC_PRESETS["tiny"]
    assert torch.equal(loaded.encode(held_out[:16]), trained.encode(held_out[:16]))


# ---- boxes and pasting ----


def test_paste_mask_fills_exactly_the_truncated_box():
    ones = np.ones((64, 64), np.float32)
    out = paste_mask(ones, (10.7, 20.2, 50.9, 41.5), height=60, width=80)
    expected = np.zeros((60, 80), bool)
    expected[20:41, 10:50] = True  # int() truncation of every coordinate
    assert out.dtype == bool and np.array_equal(out, expected)
    assert not paste_mask(-ones, (10, 20, 50, 41), 60, 80).any()
    clipped = paste_mask(ones, (-5, -5, 10, 200), 60, 80)  # clamped to the image
    assert clipped.sum() == 10 * 60 and clipped[:, :10].all()


@pytest.mark.parametrize("box", [(30, 30, 30, 50), (30, 50, 60, 49.9), (90, 10, 95, 40)])
def test_paste_mask_degenerate_box_is_empty(box):
    out = paste_mask(np.ones((64, 64), np.float32), box, height=60, width=80)
    assert out.shape == (60, 80) and not out.any()


def test_encode_mask_in_box_rejects_empty_crop(trained):
    with pytest.raises(ValueError, match="empty crop"):
        trained.encode_mask_in_box(np.ones((50, 50), bool), (10, 10, 10.2, 30))


@pytest.mark.parametrize("box", [(40, 30, 130, 90), (25.4, 18.6, 141.2, 101.7)])
def test_round_trip_through_box(trained, box):
    mask = np.zeros((120, 160), bool)
    mask[30:90, 40:130] = True
    codes = trained.encode_mask_in_box(mask, box)
    assert codes.shape == (16,) and codes.dtype == torch.int64
    pasted = paste_mask(trained.decode(codes[None])[0].numpy(), box, *mask.shape)
    assert iou(pasted, mask) >= 0.8, f"IoU {iou(pasted, mask):.3f}"
