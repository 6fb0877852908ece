"""Tokenizer, prompt layout, image preprocessing and batching: the one place that builds model inputs.

Prompt contract (big_vision and transformers agree on it):
    [<image> x N per image] <bos> prefix "\\n" [suffix <eos>]
The prefix block (images, <bos>, prefix, separator) is attended fully; the suffix causally.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from PIL import ExifTags, Image, ImageOps

from .tasks import LOC_TOKENS, NUM_LOC, NUM_SEG, SEG_TOKENS, SPECIAL_TOKEN_RE, strip_typed_tokens

log = logging.getLogger(__name__)

# Decompression-bomb guard: PIL refuses images above this many pixels (PIL warns at 89 MP and
# errors at twice that by default; we turn its warning into a clean error).
MAX_IMAGE_PIXELS = 64_000_000


class InputError(ValueError):
    """Bad user input (image, prompt); the message says what is wrong."""


# ---- tokenizer ------------------------------------------------------------------------------


class Tokenizer:
    """Gemma SentencePiece model + 1024 <locNNNN> + 128 <segNNN> pieces (+ <image> after them).

    If the .model file lacks the loc/seg pieces (a plain Gemma tokenizer), they get the ids right
    after the base vocabulary, as in PaliGemma's tokenizer.
    """

    def __init__(self, model_file: str | Path, image_token_id: int | None = None):
        path = Path(model_file)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.path = path
        base = self.sp.get_piece_size()
        first_loc = self.sp.piece_to_id(LOC_TOKENS[0])
        self.has_special_pieces = self.sp.id_to_piece(first_loc) == LOC_TOKENS[0]
        self.loc_offset = first_loc if self.has_special_pieces else base
        self.seg_offset = self.loc_offset + NUM_LOC
        self.image_token_id = image_token_id if image_token_id is not None else self.seg_offset + NUM_SEG
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), max(self.sp.pad_id(), 0)
        self.newline = self.sp.encode("\n")

    @property
    def vocab_size(self) -> int:
        return self.image_token_id + 1

    def encode(self, text: str) -> list[int]:
        if self.has_special_pieces:
            return self.sp.encode(text)
        ids, pos = [], 0  # map loc/seg by hand and let SentencePiece encode the text between them
        for m in SPECIAL_TOKEN_RE.finditer(text):
            ids += self.sp.encode(text[pos:m.start()]) if m.start() > pos else []
            ids.append(self.loc_offset + int(m[1]) if m[1] else self.seg_offset + int(m[2]))
            pos = m.end()
        return ids + (self.sp.encode(text[pos:]) if pos < len(text) else [])

    def piece(self, i: int) -> str:
        if not self.has_special_pieces and self.loc_offset <= i < self.seg_offset + NUM_SEG:
            return LOC_TOKENS[i - self.loc_offset] if i < self.seg_offset else SEG_TOKENS[i - self.seg_offset]
        return self.sp.decode([i]) if i < self.sp.get_piece_size() else ""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids up to the first <eos>, without <bos>/<pad>/<image>; loc/seg tokens kept."""
        return "".join(self.decode_pieces(ids))

    def decode_pieces(self, ids: Sequence[int]) -> list[str]:
        """One string per token (up to <eos>) whose concatenation is the decoded text.

        Computed as differences of growing prefixes, so byte-fallback characters that span several
        tokens land on the token that completes them.
        """
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        skip = {self.bos_id, self.pad_id, self.image_token_id}
        # Ids past the tokenizer (the embedding's padding rows, which sampling can pick) have no text.
        known = self.sp.get_piece_size() if self.has_special_pieces else self.seg_offset + NUM_SEG
        out, prev = [], ""
        kept: list[int] = []
        for i in ids:
            if i not in skip and 0 <= i < known:
                kept.append(i)
            text = self._decode_kept(kept)
            # A trailing replacement char means an incomplete UTF-8 sequence: wait for more bytes.
            if text.endswith("\ufffd"):
                out.append("")
                continue
            out.append(text[len(prev):])
            prev = text
        if out and prev != self._decode_kept(kept):  # dangling partial character at the end
            out[-1] += self._decode_kept(kept)[len(prev):]
        return out

    def _decode_kept(self, ids: list[int]) -> str:
        if self.has_special_pieces:
            return self.sp.decode(ids)
        parts, run = [], []
        for i in ids:
            if self.loc_offset <= i < self.seg_offset + NUM_SEG:
                parts += [self.sp.decode(run), self.piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(parts + [self.sp.decode(run)])


def train_tokenizer(texts: Sequence[str], out_file: str | Path, vocab_size: int = 320) -> Path:
    """Train a small Gemma-style SentencePiece model (byte fallback, no dummy prefix, "\\n" as a
    piece, ids 0 pad / 1 eos / 2 bos / 3 unk) and append the loc/seg pieces after its vocabulary,
    as PaliGemma's tokenizer does. For tests and the bundled tiny model.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    out_file = Path(out_file)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=["\n"],
        normalization_rule_name="identity", character_coverage=1.0, minloglevel=2,
        hard_vocab_limit=False, num_threads=1,
    )
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    for tok in LOC_TOKENS + SEG_TOKENS:
        proto.pieces.add(piece=tok, score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(proto.SerializeToString())
    return out_file


# ---- prompt layout --------------------------------------------------------------------------


@dataclass
class Encoded:
    ids: list[int]
    mask_ar: list[int]  # 0 inside the bidirectional prefix, 1 for each causal (suffix) token
    loss_mask: list[int]  # 1 on suffix tokens and <eos>: the training targets


def clean_prefix(prefix: str) -> str:
    """Repair the prompt mistakes users make most: typed <image>/<bos> tokens or a trailing newline."""
    cleaned = strip_typed_tokens(prefix).rstrip("\n")
    if cleaned != prefix:
        log.warning("prompt %r repaired to %r: palikit adds <image>, <bos> and the newline itself", prefix, cleaned)
    if "\n" in cleaned:
        raise InputError(f"prompt {prefix!r} contains a newline; '\\n' separates prefix and answer")
    return cleaned


def encode_example(tok: Tokenizer, num_image_tokens: int, prefix: str, suffix: str | None = None) -> Encoded:
    """`num_image_tokens` is the total over all images of this example (N per image)."""
    prefix_ids = [tok.bos_id] + tok.encode(clean_prefix(prefix)) + tok.newline  # "\n" encoded separately
    ids = [tok.image_token_id] * num_image_tokens + prefix_ids
    mask_ar = [0] * len(ids)
    loss = [0] * len(ids)
    if suffix is not None:
        suffix_ids = tok.encode(suffix) + [tok.eos_id]
        ids += suffix_ids
        mask_ar += [1] * len(suffix_ids)
        loss += [1] * len(suffix_ids)
    return Encoded(ids, mask_ar, loss)


# ---- images ---------------------------------------------------------------------------------

_OBJECT_REPR_RE = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def load_image(image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Path, bytes, PIL image or array -> RGB PIL image, EXIF orientation applied."""
    name = "image"
    try:
        if isinstance(image, (str, Path)):
            name = str(image)
            if not Path(image).exists():
                raise InputError(f"image file not found: {image}")
            image = Image.open(image)
        elif isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, np.ndarray):
            image = _array_to_image(image)
        elif isinstance(image, torch.Tensor):
            raise InputError("pass images as PIL images, arrays, bytes or paths, not tensors")
        if not isinstance(image, Image.Image):
            raise InputError(f"unsupported image type {type(image).__name__}")
        if image.width * image.height > max_pixels:
            raise InputError(f"{name}: {image.width}x{image.height} pixels is over the limit of {max_pixels}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
                image.load()  # upright: decode here (errors become InputError), no copy; the server
                # and the task methods load an image once and resize it, which loads it again
            else:
                image = ImageOps.exif_transpose(image)
        if image.width == 0 or image.height == 0:
            raise InputError(f"{name}: an image of {image.width}x{image.height} pixels has nothing to see")
        if image.mode.startswith("I;16") or image.mode == "I":
            # 16-bit grey (16-bit PNG, TIFF): keep the high byte, as TF's decode_png does. PIL's own
            # convert clips at 255, which turns almost every such image white.
            a = np.asarray(image).astype(np.int64)
            image = Image.fromarray((np.clip(a, 0, 65535) >> 8 if a.max(initial=0) > 255 else a).astype(np.uint8))
        elif image.mode == "F":  # 32-bit float (TIFF): 0..1 scaled, as arrays are, not clipped to black
            image = _array_to_image(np.asarray(image))
        if image.mode != "RGB":
            image = _flatten(image)
        return image
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name}: refused, too many pixels ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for corrupt or unknown data
        why = _OBJECT_REPR_RE.sub("", str(e))  # PIL names an in-memory file by its repr
        raise InputError(f"{name}: not a readable image ({why})") from e


TRANSPARENT_BACKGROUND = (255, 255, 255)


def _flatten(image: Image.Image) -> Image.Image:
    """Any mode -> RGB. Transparent pixels (RGBA, LA, a palette's transparency) are composited on
    white, as transformers' convert_to_rgb does: dropping alpha (big_vision's decode_image) shows
    whatever colour the transparent pixels happen to hold, often black."""
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, TRANSPARENT_BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _array_to_image(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise InputError(f"image array of shape {a.shape}: expected HxW, HxWx3 or HxWx4")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = a * 255.0  # floats in [0, 1]
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a)


RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
# preprocessor_config.json's "resample" (PIL's enum values, as transformers writes them) <-> the names above
RESAMPLE_OF_PIL_ID = {int(v): k for k, v in RESAMPLE.items()}


def resize(image, size: int, resample: str = "bicubic") -> Image.Image:
    """An RGB image squashed to size x size (no crop, no padding), as big_vision and HF resize.

    An image already at that size is returned as is, so resizing early (the server does on
    arrival, to queue small images) costs nothing later."""
    image = load_image(image)
    if image.size == (size, size):
        return image
    return image.resize((size, size), RESAMPLE[resample])


def preprocess(images: Sequence, size: int, resample: str = "bicubic") -> torch.Tensor:
    """Images -> (I, 3, size, size) float32 in [-1, 1]."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(resize(image, size, resample))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---- batching -------------------------------------------------------------------------------


def collate(examples: Sequence[Encoded], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into tensors: ids, input_mask, mask_ar, loss_mask (B, L).

    Padding sits after the suffix with mask_ar = 1 and input_mask = 0, so no real token sees it
    and the loss ignores it.
    """
    L = max(len(e.ids) for e in examples)
    out = {k: torch.zeros((len(examples), L), dtype=torch.long) for k in ("ids", "input_mask", "mask_ar", "loss_mask")}
    out["ids"].fill_(pad_id)
    out["mask_ar"].fill_(1)
    for i, e in enumerate(examples):
        n = len(e.ids)
        out["ids"][i, :n] = torch.tensor(e.ids)
        out["input_mask"][i, :n] = 1
        out["mask_ar"][i, :n] = torch.tensor(e.mask_ar)
        out["loss_mask"][i, :n] = torch.tensor(e.loss_mask)
    return {k: v.to(device) for k, v in out.items()}


def suffix_logprobs(outputs: torch.Tensor, batch: dict, head=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 log-softmax where the next token is a target: position t predicts token t + 1, where
    loss_mask[:, 1:] is 1 (suffix and <eos>). The one home of that rule, for score and the loss.

    outputs: hidden states (B, L, D) with `head` (e.g. model.logits), applied only at the target
    positions (V is 257k: full logits of a batch would be gigabytes), or logits (B, L, V).
    -> (log-probs (T, V), target ids (T,), row of each target (T,)), T = targets in the batch.
    """
    targets = batch["loss_mask"][:, 1:].bool()
    x = outputs[:, :-1][targets]
    logits = (head(x) if head is not None else x).float()
    return logits.log_softmax(-1), batch["ids"][:, 1:][targets], targets.nonzero()[:, 0]
