"""The public entry point: `palikit.load(source)` -> `Pipeline` with generate / score (and the tasks)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from . import generate as gen
from . import tasks
from .maskcodec import paste_mask
from .config import PaliGemmaConfig
from .paligemma import PaliGemma
from .processor import InputError, Tokenizer, encode_example, load_image, preprocess
from .weights import CheckpointError, load_hf_folder, load_npz, save_hf_folder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BUNDLED = Path(__file__).parent / "assets" / "default"
CODEC_FILES = ("mask_codec.npz", "vae-oid.npz")  # looked for beside the weights


def resolve_source(source: str | Path) -> Path:
    """A local folder / .npz file, "default" (the bundled model), or a hub id (cache first)."""
    if str(source) == "default":
        if not (BUNDLED / "config.json").exists():
            raise CheckpointError(f"the bundled default model is missing from {BUNDLED}")
        return BUNDLED
    path = Path(source).expanduser()
    if path.exists():
        return path
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise CheckpointError(f"model not found: {source} (no such file or folder, and not a hub id 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    try:  # the local cache first: works offline and costs no request
        return Path(snapshot_download(str(source), allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CheckpointError(f"{source} is not in the Hugging Face cache and HF_HUB_OFFLINE=1")
    try:
        return Path(snapshot_download(str(source), allow_patterns=patterns))
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot fetch {source} from the Hugging Face hub (offline or no access?): {e}") from e


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(source: str | Path = "default", dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
         tokenizer: str | Path | None = None, sliding_window: bool = False) -> Pipeline:
    """Load a PaliGemma / PaliGemma 2 checkpoint: an HF folder (single or sharded safetensors), a
    big_vision .npz (pass `tokenizer=` for it), a hub id, or "default" (the bundled tiny model).

    sliding_window=True applies Gemma 2's local attention window from config.json as transformers
    does; by default it is off, as in big_vision (it only matters past 4096 tokens, i.e. 896 px).
    """
    path = resolve_source(source)
    dtype = _dtype(dtype)
    if path.is_file():
        if path.suffix != ".npz":
            raise CheckpointError(f"{path}: expected a folder with safetensors or a big_vision .npz file")
        model = load_npz(path, dtype, device)
        tok_file = Path(tokenizer) if tokenizer else path.parent / "tokenizer.model"
    else:
        model = load_hf_folder(path, dtype, device, sliding_window)
        tok_file = Path(tokenizer) if tokenizer else path / "tokenizer.model"
        pre = path / "preprocessor_config.json"
        if pre.exists():  # the resize filter the checkpoint was made with (3 = bicubic, 2 = bilinear)
            resample = json.loads(pre.read_text()).get("resample")
            model.config.resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(resample, "bicubic")
    if not tok_file.exists():
        raise CheckpointError(f"no tokenizer: {tok_file} not found (pass tokenizer=PATH)")
    folder = path.parent if path.is_file() else path
    codec = next((folder / n for n in CODEC_FILES if (folder / n).exists()), None)
    return Pipeline(model, Tokenizer(tok_file, image_token_id=model.config.image_token_id), codec)


class Pipeline:
    """A loaded model with its tokenizer: generate, score, and the task helpers."""

    def __init__(self, model: PaliGemma, tokenizer: Tokenizer, codec_path: Path | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config: PaliGemmaConfig = model.config
        self.codec_path = codec_path  # segmentation mask codec found beside the weights, if any
        self._codecs: dict = {}

    # ---- inputs ---------------------------------------------------------------------------

    def _normalise(self, images, prompts) -> tuple[list[list], list[str], bool]:
        """-> (images per example, prompts, whether the caller passed a single prompt)."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        if single:
            images = [images]
        elif not isinstance(images, (list, tuple)) or len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts need a list of {len(prompts)} images (one entry per prompt)")
        per_example = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        if any(not ims for ims in per_example):
            raise InputError("every prompt needs at least one image")
        return per_example, prompts, single

    def _image_tokens(self, per_example: list[list]) -> torch.Tensor:
        flat = [im for ims in per_example for im in ims]
        pixels = preprocess(flat, self.config.vision.image_size, self.config.resample)
        with torch.inference_mode():
            return self.model.embed_images(pixels.to(self.model.device))

    def _check_length(self, n: int) -> None:
        limit = self.config.text.max_position_embeddings
        if n > limit:
            raise InputError(f"sequence of {n} tokens (image + prompt + new tokens) is longer than the "
                             f"model's limit of {limit}")

    # ---- generation -----------------------------------------------------------------------

    def generate_details(self, images, prompts, batch_size: int = 8, **sampling) -> list[tuple[str, gen.Generated]]:
        """Like generate, with each output's token ids and log-probs."""
        cfg = gen.SamplingConfig(**sampling)
        per_example, prompts, _ = self._normalise(images, prompts)
        n_img = self.config.num_image_tokens
        encoded = [encode_example(self.tokenizer, n_img * len(ims), p).ids for ims, p in zip(per_example, prompts)]
        for ids in encoded:
            self._check_length(len(ids) + cfg.max_new_tokens)
        results = []
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            image_tokens = self._image_tokens(per_example[chunk])
            outs = gen.generate(self.model, encoded[chunk], image_tokens, cfg,
                                self.tokenizer.eos_id, self.tokenizer.pad_id)
            results += [(self.tokenizer.decode(o.tokens), o) for o in outs]
        return results

    def generate(self, images, prompts, max_new_tokens: int = 32, **sampling) -> str | list[str]:
        """Text for one prompt (str) or a list of prompts (list[str]).

        `images`: one image per prompt; a prompt with several images (pairs, video frames) takes a
        list of images. Sampling: do_sample, temperature, top_k, top_p, seed, num_beams.
        """
        single = isinstance(prompts, str)
        out = [t for t, _ in self.generate_details(images, prompts, max_new_tokens=max_new_tokens, **sampling)]
        return out[0] if single else out

    # ---- scoring --------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, images, prefixes: Sequence[str], suffixes: Sequence[str], batch_size: int = 8) -> list[float]:
        """Log-likelihood of each suffix (its tokens and <eos>) given image + prefix."""
        if isinstance(prefixes, str) or isinstance(suffixes, str):
            raise InputError("score takes lists: images, prefixes and suffixes of the same length")
        per_example, prefixes, _ = self._normalise(images, list(prefixes))
        if len(suffixes) != len(prefixes):
            raise InputError(f"{len(prefixes)} prefixes but {len(suffixes)} suffixes")
        n_img = self.config.num_image_tokens
        encoded = [encode_example(self.tokenizer, n_img * len(ims), p, s)
                   for ims, p, s in zip(per_example, prefixes, suffixes)]
        scores = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            for e in chunk:
                self._check_length(len(e.ids))
            batch = collate(chunk, self.tokenizer.pad_id, self.model.device)
            pixels = preprocess([im for ims in per_example[start:start + batch_size] for im in ims],
                                self.config.vision.image_size, self.config.resample).to(self.model.device)
            hidden = self.model(batch["ids"], pixels, batch["input_mask"], batch["mask_ar"])
            # Logits only where a suffix token is predicted: position t predicts token t + 1.
            targets = batch["loss_mask"][:, 1:].bool()
            logprobs = self.model.logits(hidden[:, :-1][targets]).log_softmax(-1)
            tok_lp = logprobs.gather(-1, batch["ids"][:, 1:][targets][:, None])[:, 0]
            row = targets.nonzero()[:, 0]
            scores += torch.zeros(len(chunk)).index_add_(0, row.cpu(), tok_lp.cpu()).tolist()
        return scores

    # ---- tasks ----------------------------------------------------------------------------
    # Each accepts one image (-> one result) or a list of images (-> a list, run in batches).

    def caption(self, image, lang: str = "en", style: str = "caption", max_new_tokens: int = 64, **sampling):
        return self._task_text(image, tasks.caption_prompt(lang, style), max_new_tokens, sampling)

    def ask(self, image, question: str, lang: str = "en", max_new_tokens: int = 32, **sampling):
        return self._task_text(image, tasks.ask_prompt(question, lang), max_new_tokens, sampling)

    def ocr(self, image, max_new_tokens: int = 128, **sampling):
        return self._task_text(image, tasks.ocr_prompt(), max_new_tokens, sampling)

    def detect(self, image, labels: str | Sequence[str], max_new_tokens: int = 128, **sampling):
        """-> list[Detection] (boxes in the input image's pixels), or one list per image."""
        return self._objects(image, "detect", tasks.detect_prompt(labels), None, max_new_tokens, sampling)

    def segment(self, image, label: str | Sequence[str], codec=None, max_new_tokens: int = 128, **sampling):
        """-> list[Segmentation] with full-size boolean masks, or one list per image.

        codec: a MaskCodec or the path of big_vision's vae-oid.npz; defaults to the codec saved
        beside the model (mask_codec.npz / vae-oid.npz), if any.
        """
        codec = self._codec(codec)  # fails before generating when there is no codec
        return self._objects(image, "segment", tasks.segment_prompt(label), codec, max_new_tokens, sampling)

    def objects(self, task: str, text: str, generated: gen.Generated, image, codec=None) -> list:
        """Parse a detect / segment output for `image` (anything with .width and .height): each
        object is scored by the mean log-prob of its tokens when the tokens and log-probs describe
        `text` (unscored otherwise), and segment masks are pasted at the image's size."""
        pieces = self.tokenizer.decode_pieces(generated.tokens)
        scored = len(generated.logprobs) == len(generated.tokens) and "".join(pieces) == text
        parse = tasks.parse_detections if task == "detect" else tasks.parse_segmentations
        objects = parse(text, image.width, image.height, pieces=pieces if scored else None,
                        logprobs=generated.logprobs if scored else None).objects
        return self.attach_masks(objects, image, codec) if task == "segment" else objects

    def attach_masks(self, segmentations: list, image, codec=None) -> list:
        """Decode each Segmentation's 16 codes and paste the mask into its box at the image size."""
        if segmentations:
            with torch.inference_mode():
                masks64 = self._codec(codec).decode([s.codes for s in segmentations]).float().numpy()
            for seg, m in zip(segmentations, masks64):
                seg.mask = paste_mask(m, seg.box, image.height, image.width)
        return segmentations

    def _task_text(self, image, prompt: str, max_new_tokens: int, sampling: dict):
        batch = isinstance(image, list)
        images = image if batch else [image]
        out = self.generate(images, [prompt] * len(images), max_new_tokens=max_new_tokens, **sampling)
        return out if batch else out[0]

    def _objects(self, image, task: str, prompt: str, codec, max_new_tokens: int, sampling: dict):
        """Generate for one image or a list and parse each output."""
        images = [load_image(im) for im in (image if isinstance(image, list) else [image])]
        outs = self.generate_details(images, [prompt] * len(images), max_new_tokens=max_new_tokens, **sampling)
        results = [self.objects(task, text, g, im, codec) for im, (text, g) in zip(images, outs)]
        return results if isinstance(image, list) else results[0]

    def _codec(self, codec):
        from .maskcodec import MaskCodec

        if isinstance(codec, MaskCodec):
            return codec
        path = Path(codec) if codec is not None else self.codec_path
        if path is None:
            raise InputError("segment needs the mask codec: pass codec=palikit.MaskCodec.from_npz('vae-oid.npz') "
                             "or codec='path/to/vae-oid.npz'")
        if path not in self._codecs:
            self._codecs[path] = MaskCodec.from_npz(path)
        return self._codecs[path]

    def save(self, folder: str | Path) -> None:
        """Write the model in the released HF layout, with its tokenizer."""
        save_hf_folder(self.model, folder)
        data = self.tokenizer.path.read_bytes()
        (Path(folder) / "tokenizer.model").write_bytes(data)


def collate(examples, pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
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
