"""Tokenizer, prompt layout and image loading: ids and pixels equal to transformers'
PaliGemmaProcessor on the same tokenizer.model, every image input kind, clear input errors."""

from __future__ import annotations

import io
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from palikit.processor import (LOC_TOKENS, NUM_LOC, NUM_SEG, InputError, Tokenizer, clean_prefix,
                               encode_example,
                               load_image, preprocess, train_tokenizer)

from .conftest import CORPUS, synthetic_image

N = 16  # image tokens of the tiny presets (28 px, patch 7)
SIZE = 28


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return Tokenizer(tokenizer_file)


@pytest.fixture(scope="module")
def hf_processor(tokenizer_file, tmp_path_factory):
    """transformers' PaliGemmaProcessor on the same tokenizer.model, built offline.

    transformers 5 converts the SentencePiece model to a `tokenizers` BPE. Our trained model names
    its specials <s>/</s> (Gemma's are <bos>/<eos>) and has no <mask>, so name them, or
    GemmaTokenizer would append new ones and push <image> past id 1552.
    """
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_tok")
    shutil.copy(tokenizer_file, folder / "tokenizer.model")
    hf_tok = transformers.GemmaTokenizer.from_pretrained(
        str(folder), bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token=None)
    images = transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, resample=3,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = transformers.PaliGemmaProcessor(image_processor=images, tokenizer=hf_tok)
    proc.image_seq_length = N
    assert hf_tok.convert_tokens_to_ids("<image>") == 1552
    return proc


# ---- token ids vs transformers --------------------------------------------------------------

CASES = [
    ("caption en", None),
    ("caption en", "a red circle"),
    ("answer en what colour is the star?", "blue"),
    ("detect circle ; square",
     "<loc0012><loc0051><loc0900><loc1023> circle ; <loc0000><loc0001><loc0002><loc0003> square"),
    ("segment triangle", "<loc0100><loc0200><loc0300><loc0400><seg000><seg127><seg064> triangle"),
    ("answer en <loc0051>where is <seg003> it?", None),
    ("describe fr", "un chat noir est assis sur la table"),
    ("café, crème brûlée, naïve façade", "über straße"),
    ("日本語のテキスト", "日本語 🐄 ok"),
    ("  two  leading spaces and trailing ", " leading space in the answer"),
    ("1234 5678 90", "42"),
    ("", "empty prompt"),
    ("emoji 🐄🦓 and quokka", None),
]


@pytest.mark.parametrize("prefix,suffix", CASES)
def test_ids_match_transformers_processor(tok, hf_processor, prefix, suffix):
    image = synthetic_image(0)
    kwargs = {"suffix": [suffix]} if suffix is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_processor(images=[image], text=[prefix], return_tensors="pt", **kwargs)
    ours = encode_example(tok, N, prefix, suffix)
    assert hf["input_ids"][0].tolist() == ours.ids
    assert hf["token_type_ids"][0].tolist() == ours.mask_ar  # 0 = bidirectional prefix, 1 = suffix
    assert hf["attention_mask"][0].tolist() == [1] * len(ours.ids)
    if suffix is not None:
        labels = [i if m else -100 for i, m in zip(ours.ids, ours.loss_mask)]
        assert hf["labels"][0].tolist() == labels
        assert ours.ids[-1] == tok.eos_id and ours.loss_mask[-1] == 1
    # layout: N image tokens, <bos>, prefix, "\n" [, suffix, <eos>]
    assert ours.ids[:N] == [tok.image_token_id] * N and ours.ids[N] == tok.bos_id
    n_prefix = N + 1 + len(tok.encode(prefix)) + 1
    assert ours.ids[n_prefix - 1] == tok.newline[0] and ours.mask_ar[:n_prefix] == [0] * n_prefix


def test_two_images_give_2n_image_tokens(tok, hf_processor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_processor(images=[[synthetic_image(0), synthetic_image(1)]], text=["caption en"],
                          return_tensors="pt")
    ours = encode_example(tok, 2 * N, "caption en")
    assert hf["input_ids"][0].tolist() == ours.ids
    assert ours.ids.count(tok.image_token_id) == 2 * N


def test_loc_and_seg_are_single_tokens(tok, hf_processor):
    assert tok.has_special_pieces
    assert tok.encode("<loc0051>") == [tok.loc_offset + 51]
    assert tok.encode("<seg003>") == [tok.seg_offset + 3]
    assert tok.loc_offset == 400 and tok.seg_offset == 400 + NUM_LOC
    assert tok.image_token_id == 400 + NUM_LOC + NUM_SEG
    assert tok.encode("".join(LOC_TOKENS[:4])) == [400, 401, 402, 403]
    hf_tok = hf_processor.tokenizer
    assert hf_tok.encode("<loc0051>", add_special_tokens=False) == [tok.loc_offset + 51]
    assert tok.decode([tok.loc_offset + 51, tok.seg_offset + 127]) == "<loc0051><seg127>"


@pytest.mark.parametrize("size", [(40, 30), (25, 50), (300, 200), (10, 7), (28, 28)])
def test_pixels_match_transformers(hf_processor, size):
    image = synthetic_image(sum(size), size=size)
    hf = hf_processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    ours = preprocess([image], SIZE, "bicubic")
    assert ours.shape == hf.shape == (1, 3, SIZE, SIZE) and ours.dtype == torch.float32
    assert (ours - hf).abs().max().item() <= 1e-6
    assert -1.0 <= ours.min() and ours.max() <= 1.0


# ---- image loading --------------------------------------------------------------------------

RGB = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_image_from_path_bytes_pil_and_arrays(tmp_path):
    pil = Image.fromarray(RGB)
    path = tmp_path / "img.png"
    pil.save(path)
    for source in (path, str(path), png_bytes(pil), bytearray(png_bytes(pil)), pil, RGB):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (40, 30)
        assert np.array_equal(np.asarray(out), RGB), type(source)

    gray = RGB[..., 0]
    assert np.array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, -1))
    rgba = np.concatenate([RGB, np.full((30, 40, 1), 255, np.uint8)], -1)
    assert np.array_equal(np.asarray(load_image(rgba)), RGB)  # opaque: the colours
    assert np.array_equal(np.asarray(load_image(RGB.transpose(2, 0, 1))), RGB)  # CHW
    assert np.array_equal(np.asarray(load_image(RGB[..., :1])), np.repeat(RGB[..., :1], 3, -1))  # HxWx1

    floats = load_image(np.stack([np.zeros((3, 4)), np.full((3, 4), 0.5), np.ones((3, 4))], -1))
    assert np.asarray(floats)[0, 0].tolist() == [0, 127, 255]  # [0, 1] floats scaled to bytes
    big_floats = load_image(np.full((3, 4, 3), 200.0))
    assert np.asarray(big_floats)[0, 0].tolist() == [200] * 3  # floats already in 0..255 kept


FILE_FORMAT = {"RGBA": "PNG", "LA": "PNG", "L": "PNG", "P": "PNG", "1": "PNG", "CMYK": "JPEG", "I": "TIFF",
               "F": "TIFF", "YCbCr": "JPEG"}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "PA", "CMYK", "1", "I", "F", "YCbCr"])
def test_modes_become_rgb(mode):
    image = Image.fromarray(RGB).convert(mode)
    sources = [image]
    if mode in FILE_FORMAT:  # and decoded from a file of that mode
        buf = io.BytesIO()
        image.save(buf, FILE_FORMAT[mode])
        sources.append(buf.getvalue())
    for source in sources:
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "RGBA":
        assert np.array_equal(np.asarray(load_image(image)), RGB)


def test_images_that_decode_wrongly_elsewhere():
    """Transparent pixels are composited on white (palikit.processor.TRANSPARENT_BACKGROUND), not
    shown as whatever colour they hold; float images in 0..1 (TIFF) are scaled, not black; 32-bit
    integer grey keeps its contrast; an image of no pixels is refused."""
    black_but_transparent = np.zeros((30, 40, 4), np.uint8)
    black_but_transparent[:, 20:, 3] = 255  # the left half transparent, the right half opaque black
    black_but_transparent[:, :20, 3] = 0
    for source in (black_but_transparent, png_bytes(Image.fromarray(black_but_transparent, "RGBA"))):
        out = np.asarray(load_image(source))
        assert (out[:, :20] == 255).all() and (out[:, 20:] == 0).all()
    half = np.concatenate([np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 1), 128, np.uint8)], -1)
    assert abs(int(np.asarray(load_image(half))[0, 0, 0]) - 127) <= 1  # blended: half of white
    floats = Image.fromarray(np.full((30, 40), 0.5, np.float32), "F")
    buf = io.BytesIO()
    floats.save(buf, "TIFF")
    for source in (floats, buf.getvalue()):
        assert np.asarray(load_image(source))[0, 0].tolist() == [127] * 3
    wide = Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 54).astype(np.int32), "I")
    assert np.asarray(load_image(wide)).max() > 200  # not clipped: the high byte
    for empty in (np.zeros((0, 0, 3), np.uint8), Image.new("RGB", (0, 5))):
        with pytest.raises(InputError, match="nothing to see"):
            load_image(empty)


def test_16_bit_grey_keeps_its_contrast():
    values = (np.arange(30 * 40).reshape(30, 40) * 54).astype(np.uint16)  # spans 0..64746
    for image in (Image.fromarray(values), Image.open(io.BytesIO(png_bytes(Image.fromarray(values))))):
        assert image.mode.startswith("I;16")
        out = np.asarray(load_image(image))
        assert out.shape == (30, 40, 3)
        assert np.array_equal(out[..., 0], (values >> 8).astype(np.uint8))  # not clipped to white
    big_endian = Image.frombytes("I;16B", (40, 30), values.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(load_image(big_endian))[..., 1], (values >> 8).astype(np.uint8))


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    Image.fromarray(RGB).save(buf, "JPEG", exif=exif, quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).size == (40, 30)
    out = load_image(buf.getvalue())
    assert out.size == (30, 40) and out.mode == "RGB"
    # The content is rotated too: the top-left of the display is the stored bottom-left.
    stored = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(int)
    assert np.abs(np.asarray(out).astype(int) - np.rot90(stored, -1)).max() == 0


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def test_corrupt_and_truncated_images(tmp_path):
    with pytest.raises(InputError, match="not a readable image"):
        load_image(b"definitely not an image")
    truncated = png_bytes(Image.fromarray(RGB))[:200]
    with pytest.raises(InputError, match="not a readable image"):
        load_image(truncated)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(InputError) as info:
        load_image(bad)
    assert "broken.jpg" in str(info.value)


@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 MP: over our limit; 400 MP: PIL's own bomb error
def test_huge_images_are_refused(side):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on open above 89 MP
        with pytest.raises(InputError, match="pixels"):
            load_image(png_header(side, side))


def test_max_pixels_limit():
    with pytest.raises(InputError, match="40x30 pixels is over the limit of 1000"):
        load_image(RGB, max_pixels=1000)
    assert load_image(RGB, max_pixels=1200).size == (40, 30)


def test_bad_image_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="not tensors"):
        load_image(torch.zeros(3, 4, 4))
    with pytest.raises(InputError, match="unsupported image type"):
        load_image(12345)
    with pytest.raises(InputError, match="expected HxW"):
        load_image(np.zeros((7, 5, 2), np.uint8))
    with pytest.raises(InputError, match="expected HxW"):
        load_image(np.zeros((1, 7, 5, 3), np.uint8))
    with pytest.raises(InputError):
        preprocess([RGB, b"junk"], SIZE)


# ---- prompt repair --------------------------------------------------------------------------


@pytest.mark.parametrize("typed", ["<image>caption en", "<bos>caption en", "caption en\n",
                                   "<image><image> <bos>caption en\n\n", "<image>" * 3 + "<bos>caption en\n"])
def test_prompt_repair(tok, typed, caplog):
    clean = encode_example(tok, N, "caption en", "a cat")
    with caplog.at_level("WARNING", logger="palikit.processor"):
        repaired = encode_example(tok, N, typed, "a cat")
    assert repaired == clean
    assert "repaired" in caplog.text


def test_newline_inside_prompt_is_an_error(tok):
    with pytest.raises(InputError, match="newline"):
        encode_example(tok, N, "caption en\nwhat is this")
    with pytest.raises(InputError):
        clean_prefix("a\nb\n")
    assert clean_prefix("caption en") == "caption en"


# ---- tokenizer without loc/seg pieces -------------------------------------------------------


@pytest.fixture(scope="module")
def plain_tokenizer_file(tmp_path_factory):
    """A Gemma-style SentencePiece model without the 1152 appended loc/seg pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = train_tokenizer(CORPUS, tmp_path_factory.mktemp("plain") / "tokenizer.model", vocab_size=400)
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    assert proto.pieces[-1].piece == "<seg127>"
    del proto.pieces[-(NUM_LOC + NUM_SEG):]
    assert not any(p.piece.startswith(("<loc", "<seg")) for p in proto.pieces)
    path.write_bytes(proto.SerializeToString())
    return path


def test_tokenizer_without_loc_seg_pieces(plain_tokenizer_file, tok):
    plain = Tokenizer(plain_tokenizer_file)
    base = plain.sp.get_piece_size()
    assert not plain.has_special_pieces and base == 400
    assert plain.encode("<loc0005>") == [base + 5]
    assert plain.encode("<seg003>") == [base + NUM_LOC + 3]
    assert plain.image_token_id == base + NUM_LOC + NUM_SEG == tok.image_token_id
    assert plain.decode([base + 5]) == "<loc0005>"
    assert plain.piece(base + NUM_LOC + 127) == "<seg127>"
    text = "a red circle <loc0005><loc1023> and <seg003><seg127> café 🐄 end"
    ids = plain.encode(text)
    assert ids == tok.encode(text)  # the same ids as the tokenizer that has the pieces
    assert plain.decode(ids) == text == tok.decode(ids)
    pieces = plain.decode_pieces(ids)
    assert "".join(pieces) == text and len(pieces) == len(ids)
    assert pieces[ids.index(base + 5)] == "<loc0005>"
    assert encode_example(plain, N, "detect <loc0001>", "<loc0002> x").ids == \
        encode_example(tok, N, "detect <loc0001>", "<loc0002> x").ids


# ---- decode_pieces --------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Hello this is a test", "café, crème brûlée, naïve façade", "über straße",
                                  "日本語のテキスト", "emoji 🐄🦓 x", "<loc0010><loc0020> cat ; <seg005>",
                                  "ß€𝄞"])
def test_decode_pieces(tok, text):
    ids = tok.encode(text)
    pieces = tok.decode_pieces(ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert "\ufffd" not in "".join(pieces)
    for ch in set(text) - set(" "):  # a multi-byte character lands whole on one piece
        if len(ch.encode()) > 1:
            assert any(ch in p for p in pieces), ch


def test_decode_pieces_byte_fallback_waits_for_the_last_byte(tok):
    ids = tok.encode("🐄")
    assert len(ids) == 4  # not in the vocabulary: four byte-fallback tokens
    assert tok.decode_pieces(ids) == ["", "", "", "🐄"]
    # An incomplete character at the end is not lost silently nor turned into text.
    assert "".join(tok.decode_pieces(ids[:2])) == tok.decode(ids[:2])


def test_decode_stops_at_eos_and_skips_specials(tok):
    ids = tok.encode("a red circle")
    noisy = [tok.image_token_id, tok.bos_id] + ids + [tok.pad_id, tok.eos_id] + tok.encode("junk")
    assert tok.decode(noisy) == "a red circle"
    pieces = tok.decode_pieces(noisy)
    assert "".join(pieces) == "a red circle" and len(pieces) == len(ids) + 3


def test_decode_ignores_ids_past_the_tokenizer(tok, plain_tokenizer_file):
    """The embedding has padding rows past <image> (1553..1599 in the tiny model, 257153.. in HF
    checkpoints); sampling can pick them and decoding must not crash on them."""
    ids = tok.encode("a red circle")
    assert tok.decode(ids[:2] + [1553, 1599] + ids[2:]) == "a red circle"
    assert "".join(tok.decode_pieces(ids + [1560])) == "a red circle"
    plain = Tokenizer(plain_tokenizer_file)
    assert plain.decode(ids + [1553, plain.loc_offset + 7]) == "a red circle<loc0007>"
