"""The public entry point: `palikit.load(source, options)` -> `Pipeline` with generate / stream /
score and one method per registered task (caption, ask, question, ocr, detect, segment; see
tasks.TASKS). Generation runs on palikit.engine (beam search on generate.beam_search)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from . import generate as gen
from . import adapters, kernels, quantize, tasks, video
from .config import PaliGemmaConfig
from .engine import Engine, batch_invariant, engine_for
from .maskcodec import paste_mask
from .options import DTYPES, Options
from .paligemma import PaliGemma
from .processor import InputError, Tokenizer, collate, encode_example, load_image, preprocess, resize, suffix_logprobs
from .weights import (CheckpointError, build_on_meta, load_tensors, open_checkpoint, resolve_source,
                      save_hf_folder, save_model_files)

log = logging.getLogger(__name__)


def check_device(device: str | torch.device) -> torch.device:
    """The torch device, or one line saying why it cannot be used (before any weights are read)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}: use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        if not torch.backends.cuda.is_built():
            raise InputError(f"CUDA is not available in this PyTorch build (torch {torch.__version__}); "
                             "use --device cpu or install a CUDA build of torch")
        raise InputError("CUDA is not available: no GPU is visible to this PyTorch (check CUDA_VISIBLE_DEVICES "
                         "and the driver); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"no GPU {dev.index}: this machine has {torch.cuda.device_count()}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("MPS (Apple GPU) is not available in this PyTorch; use --device cpu")
    return dev


def load(source: str | Path = "default", options: Options | None = None, *, overrides: dict | None = None,
         **changes) -> Pipeline:
    """Load a PaliGemma / PaliGemma 2 checkpoint: an HF folder (single or sharded safetensors, or a
    `palikit quantize` folder), a big_vision .npz, a hub id, or "default" (the bundled tiny model).

    options: how to load and run it (palikit.options.Options: dtype, device, quantize, compile,
    attention, logit_softcap, sliding_window, tokenizer), or its fields as keywords:
    `palikit.load("default", dtype="float32", quantize="int8")`.
    overrides: fields of the checkpoint's text config to change before the model is built
    (fine-tuning: {"final_logit_softcap": None}).
    A LoRA fine-tune loads merged into its base: `load(base, adapter=DIR)`, or `load(DIR)`, whose
    adapter_config.json names the base.
    """
    try:
        options = dataclasses.replace(options or Options(), **changes)
    except (TypeError, ValueError) as e:  # an unknown option, or a value out of its choices
        raise InputError(str(e)) from None
    if options.adapter is None and adapters.is_adapter_folder(source):
        options = dataclasses.replace(options, adapter=str(source))
        source = adapters.base_of(source)
    elif options.adapter is not None:
        options = dataclasses.replace(options, adapter=str(options.adapter))
    if options.adapter is not None:
        overrides = {**(adapters.trained_with(options.adapter) or {}), **(overrides or {})}
    ckpt = open_checkpoint(resolve_source(source), options.sliding_window, options.tokenizer)
    if not ckpt.tokenizer.exists():
        raise CheckpointError(f"no tokenizer: {ckpt.tokenizer} not found (pass tokenizer=PATH)")
    config = ckpt.config
    if overrides:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, **overrides))
    stored = ckpt.quantization
    if stored and options.adapter:
        raise InputError(f"{ckpt.path} holds {stored['scheme']} weights, which adapters cannot merge into: load "
                         "the full-precision base with the adapter (and quantize=... to quantise the result)")
    if stored and options.quantize:
        raise quantize.QuantizeError(f"{ckpt.path} holds {stored['scheme']} weights already; load it without "
                                     "quantize")
    device = _device(options.device, quantized=bool(stored or options.quantize))
    # "auto" is eager, the soft-cap written out, on every device: FlexAttention is opt-in until
    # benchmarks/gpu_check.sh has passed on a GPU (palikit's CUDA paths have not run on one yet).
    attention = "eager" if options.attention == "auto" else options.attention
    if attention == "flex" and (reason := kernels.flex_attention_runs(device)):
        log.warning(reason)
        attention = "eager"
    softcap = options.logit_softcap or ("big_vision" if ckpt.big_vision else "config")
    model = build_on_meta(config, attention=attention, logit_softcap=softcap)
    dtype = options.torch_dtype
    if scheme := (stored or {}).get("scheme") or options.quantize:
        if reason := kernels.quantization_pays(scheme, device):
            raise quantize.QuantizeError(reason)
    if stored:
        if device.type != "cpu":
            raise quantize.QuantizeError(f"{stored['scheme']} weights run on the CPU kernels; load with device='cpu'")
        quantize.lay_out(model, stored, dtype)
    load_tensors(model, ckpt.tensors(dtype), dtype, device, ckpt.path,
                 keep_dtype=quantize.is_stored_as_is if stored else None)
    if options.adapter is not None:
        model = adapters.merged(model, options.adapter)
    if stored:
        quantize.pack_loaded(model)
    elif options.quantize:
        quantize.quantize_weights(model, options.quantize, options.group_size)
    tokenizer = Tokenizer(ckpt.tokenizer, image_token_id=config.image_token_id)
    resolved = dataclasses.replace(options, device=str(device), attention=attention, logit_softcap=softcap)
    return Pipeline(model, tokenizer, ckpt.codec, resolved)


def _device(name: str, quantized: bool) -> torch.device:
    """Options.device as a torch device: "auto" is a GPU when there is one, unless the weights are
    quantised (they run on the CPU's kernels)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not quantized else "cpu")
    return check_device(name)


class Pipeline:
    """A loaded model with its tokenizer: generate, stream, score, and a method per task."""

    def __init__(self, model: PaliGemma, tokenizer: Tokenizer, codec_path: Path | None = None,
                 options: Options | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config: PaliGemmaConfig = model.config
        self.codec_path = codec_path  # segmentation mask codec found beside the weights, if any
        dtype = next(name for name, d in DTYPES.items() if d == model.dtype)
        self.options = options or Options(dtype=dtype, device=str(model.device))
        if self.options.compile and (reason := kernels.compile_pays(model.device)):
            log.warning(reason)
            self.options = dataclasses.replace(self.options, compile=False)
        self.decode_step = gen.DecodeStep(model, compile=self.options.compile, cuda_graphs=self.options.cuda_graphs)
        self._codecs: dict = {}
        self.adapters: adapters.AdapterBank | None = None  # LoRA adapters a request may choose (load_adapter)

    # ---- adapters chosen per request --------------------------------------------------------

    def load_adapter(self, name: str, folder: str | Path, max_adapters: int = 8) -> None:
        """Load the LoRA adapter of `folder` (a peft folder, palikit's or transformers + peft's) beside
        the base model as `name`: generate(..., adapter=name) and every task method then run on it,
        unmerged, in the same batches as the base and other adapters (palikit.adapters.AdapterBank)."""
        if self.adapters is None:
            self.adapters = adapters.AdapterBank(self.model, max_adapters)
        self.adapters.load(name, folder)

    def unload_adapter(self, name: str) -> None:
        if self.adapters is None:
            raise InputError(f"no adapter named {name!r} is loaded")
        self.adapters.unload(name)

    # ---- inputs ---------------------------------------------------------------------------

    def _normalise(self, images, prompts, max_new_tokens: int = 0, frames: int = video.NUM_FRAMES,
                   stride: int | None = video.STRIDE) -> tuple[list[list], list[str], bool, dict]:
        """-> (the images of each example, read, the prompts, whether the caller passed a single prompt
        for a single image, {example: its video frames' times}). One prompt (a str) with a list asks it of every entry of the list: an
        image, or a list of images for one prompt (pairs, video frames). An entry may be a video:
        a palikit.Video, or a clip's path (frames / stride: palikit.video.read_video's), read only
        once its prompt is known to fit the model (frames x image tokens + text)."""
        frame_times: dict[int, list[float]] = {}
        single = isinstance(prompts, str)
        if single and isinstance(images, (list, tuple)):
            prompts, single = [prompts] * len(images), False
        prompts = [prompts] if single else list(prompts)
        if single:
            images = [images]
        elif not prompts:
            raise InputError("no prompts: give at least one image and prompt")
        elif not isinstance(images, (list, tuple)) or len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts need a list of {len(prompts)} images (one entry per prompt)")
        per_example = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        if any(not ims for ims in per_example):
            raise InputError("every prompt needs at least one image")
        out = []
        for i, (ims, prompt) in enumerate(zip(per_example, prompts)):
            if any(video.is_video_path(im) for im in ims):  # refused before decoding when too long
                count = sum(frames if video.is_video_path(im) else len(im) if isinstance(im, video.Video) else 1
                            for im in ims)
                self.prompt_ids(prompt, count, max_new_tokens)
            read = []
            for im in ims:
                if video.is_video_path(im):
                    im = self.read_video(im, frames, stride)
                if isinstance(im, video.Video):
                    read += im.frames
                    frame_times.setdefault(i, []).extend(im.times)
                else:
                    read.append(load_image(im))
            out.append(read)
        return out, prompts, single, frame_times

    def embed_images(self, per_example: list[list]) -> torch.Tensor:
        """The image tokens (I, N, D) of every image of every example, in order."""
        flat = [im for ims in per_example for im in ims]
        pixels = preprocess(flat, self.config.vision.image_size, self.config.resample)
        with torch.inference_mode():
            return self.model.embed_images(pixels.to(self.model.device))

    def check_length(self, n_tokens: int, max_new_tokens: int = 0) -> None:
        """InputError when n_tokens (images included) plus max_new_tokens exceed the model's limit."""
        limit = self.config.text.max_position_embeddings
        if n_tokens + max_new_tokens > limit:
            raise InputError(f"{n_tokens} tokens (image + text) + {max_new_tokens} new tokens is more than "
                             f"the model's limit of {limit}")

    def prompt_ids(self, prompt: str, n_images: int = 1, max_new_tokens: int = 0) -> list[int]:
        """The prompt's token ids, image placeholders included; InputError for a malformed prompt or
        one that leaves no room for max_new_tokens within the model's length limit."""
        ids = encode_example(self.tokenizer, self.config.num_image_tokens * n_images, prompt).ids
        self.check_length(len(ids), max_new_tokens)
        return ids

    def read_video(self, source, frames: int = video.NUM_FRAMES, stride: int | None = video.STRIDE,
                   **options) -> video.Video:
        """A clip's chosen frames as the model sees them: palikit.video.read_video, each frame resized
        to the model's input with its filter as it is decoded."""
        return video.read_video(source, frames, stride, size=self.config.vision.image_size,
                                resample=self.config.resample, **options)

    def prepare_image(self, image) -> Image.Image:
        """An image as the model sees it (RGB, EXIF-rotated, resized to its input with its filter).
        Inputs at that size are used as they are, so preparing early costs nothing later."""
        return resize(image, self.config.vision.image_size, self.config.resample)

    # ---- generation -----------------------------------------------------------------------

    def generate_details(self, images, prompts, batch_size: int = 8, adapter: str | None = None,
                         frames: int = video.NUM_FRAMES, stride: int | None = video.STRIDE,
                         **sampling) -> list[tuple[str, gen.Generated]]:
        """Like generate, with each output's token ids and log-probs (and a video prompt's frame
        times). Up to `batch_size` prompts decode together (palikit.engine: a prompt that finishes
        makes room for the next at once). adapter: the name of a LoRA adapter loaded with
        load_adapter (None: the base model). frames, stride: how a clip given by its path is
        sampled (palikit.video.read_video; stride None: uniformly)."""
        cfg = gen.SamplingConfig(**sampling)
        if adapter is not None and cfg.num_beams > 1:
            raise InputError("beam search runs the base model only; adapters run in the engine (num_beams=1)")
        per_example, prompts, _, times = self._normalise(images, prompts, cfg.max_new_tokens, frames, stride)
        encoded = [self.prompt_ids(p, len(ims), cfg.max_new_tokens) for ims, p in zip(per_example, prompts)]
        if cfg.num_beams > 1:
            outs = []
            for start in range(0, len(prompts), batch_size):
                chunk = slice(start, start + batch_size)
                outs += gen.beam_search(self.model, self.decode_step, encoded[chunk],
                                        self.embed_images(per_example[chunk]), cfg, self.tokenizer.eos_id,
                                        self.tokenizer.pad_id)
        else:
            rows = batch_size if batch_invariant(self, default=False) else min(batch_size, len(prompts))
            engine = engine_for(self, rows, (len(ids) + cfg.max_new_tokens for ids in encoded),
                                default_invariant=False)
            requests = [engine.submit(ims, ids, cfg, force=True, adapter=adapter) for ims, ids in zip(per_example, encoded)]
            engine.run_until_idle()
            outs = [r.result() for r in requests]
        outs = [dataclasses.replace(o, frame_times=times.get(i)) for i, o in enumerate(outs)]
        return [(self.tokenizer.decode(o.tokens), o) for o in outs]

    def generate(self, images, prompts, max_new_tokens: int = 32, **sampling) -> str | list[str]:
        """Text for one image and prompt (str), or a list of texts, one per entry of `images`.

        `images`: one image; or a list with one entry per prompt, an entry a list of images for a
        prompt with several (pairs, video frames): generate([a, b], "caption en") captions a and b,
        generate([[a, b]], "caption en") asks one prompt of both. `prompts`: one for every entry,
        or a list of as many. Sampling: do_sample, temperature, top_k, top_p, seed (each prompt samples
        with its own generator, seeded alike), num_beams, length_penalty. adapter: a LoRA adapter's
        name (load_adapter).
        """
        single = isinstance(prompts, str) and not isinstance(images, (list, tuple))
        out = [t for t, _ in self.generate_details(images, prompts, max_new_tokens=max_new_tokens, **sampling)]
        return out[0] if single else out

    def stream(self, image, prompt: str, max_new_tokens: int = 32, **sampling) -> Iterator[int]:
        """The token ids of one generation as they are made (without <eos>); stop iterating to stop
        generating. `image`: one image, or a list for a prompt with several. Decode the ids so far
        with `tokenizer.decode`. Greedy or sampled as generate (beam search does not stream)."""
        if not isinstance(prompt, str):
            raise InputError("stream takes one prompt (a str); use generate for a batch")
        cfg = gen.SamplingConfig(max_new_tokens=max_new_tokens, **sampling)
        if cfg.num_beams > 1:
            raise InputError("beam search does not stream; use generate with num_beams")
        (images,), _, _, _ = self._normalise([image], [prompt])
        ids = self.prompt_ids(prompt, len(images), max_new_tokens)
        engine, made = Engine(self, max_rows=1, max_len=len(ids) + max_new_tokens), []
        request = engine.submit(images, ids, cfg, on_token=lambda r, token: made.append(token))
        try:
            while True:
                busy = engine.step()
                while made:
                    yield made.pop(0)
                if not busy:
                    break
            request.result()  # its error, if it had one
        finally:
            request.cancel()

    # ---- scoring --------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, images, prefixes: Sequence[str], suffixes: Sequence[str], batch_size: int = 8) -> list[float]:
        """Log-likelihood of each suffix (its tokens and <eos>) given image + prefix."""
        if isinstance(prefixes, str) or isinstance(suffixes, str):
            raise InputError("score takes lists: images, prefixes and suffixes of the same length")
        per_example, prefixes, _, _ = self._normalise(images, list(prefixes))
        if len(suffixes) != len(prefixes):
            raise InputError(f"{len(prefixes)} prefixes but {len(suffixes)} suffixes")
        n_img = self.config.num_image_tokens
        encoded = [encode_example(self.tokenizer, n_img * len(ims), p, s)
                   for ims, p, s in zip(per_example, prefixes, suffixes)]
        scores = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            for e in chunk:
                self.check_length(len(e.ids))
            batch = collate(chunk, self.tokenizer.pad_id, self.model.device)
            pixels = preprocess([im for ims in per_example[start:start + batch_size] for im in ims],
                                self.config.vision.image_size, self.config.resample).to(self.model.device)
            hidden = self.model(batch["ids"], pixels, batch["input_mask"], batch["mask_ar"])
            logprobs, labels, rows = suffix_logprobs(hidden, batch, self.model.logits)
            token_lp = logprobs.gather(-1, labels[:, None])[:, 0]
            scores += torch.zeros(len(chunk)).index_add_(0, rows.cpu(), token_lp.cpu()).tolist()
        return scores

    # ---- tasks ----------------------------------------------------------------------------
    # pipe.caption(image, lang="fr"), pipe.detect(image, ["cat", "dog"]), ...: one method per task
    # of tasks.TASKS, made by __getattr__. Each takes one image (-> one result) or a list of
    # images (-> a list, decoded together).

    def __getattr__(self, name: str):
        spec = tasks.TASKS.get(name)
        if spec is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

        def method(image, *args, **kwargs):
            return self.run_task(name, image, *args, **kwargs)

        method.__name__ = method.__qualname__ = name
        method.__doc__ = _task_doc(spec)
        method.__signature__ = _task_signature(spec)
        return method

    def __dir__(self):
        return [*super().__dir__(), *tasks.TASKS]

    def run_task(self, verb: str, image, *args, max_new_tokens: int | None = None, codec=None, **kwargs):
        """Run the task `verb` of tasks.TASKS: its fields by position or name, the rest sampling.

        -> text (str) for a text task, a list of Detection / Segmentation for an object task; a
        list of those for a list of images. codec (segment): a MaskCodec or the path of
        big_vision's vae-oid.npz; defaults to the codec saved beside the model.
        """
        spec = tasks.task_spec(verb)
        names = [a.name for a in spec.args]
        if len(args) > len(names):
            raise TypeError(f"{verb}() takes {len(names)} field(s) after the image ({', '.join(names)}), "
                            f"got {len(args)}")
        values = dict(zip(names, args))
        for key in list(kwargs):
            name = spec.aliases.get(key, key)
            if name in names:
                values[name] = kwargs.pop(key)
        prompt = spec.build(**values)
        max_new_tokens = max_new_tokens or spec.budget(prompt)
        if spec.parse is None:
            if codec is not None:
                raise TypeError(f"{verb}() takes no codec")
            batch = isinstance(image, list)
            images = image if batch else [image]
            out = self.generate(images, [prompt] * len(images), max_new_tokens=max_new_tokens, **kwargs)
            return out if batch else out[0]
        codec = self._codec(codec) if spec.masks else None  # fails before generating without a codec
        entries = image if isinstance(image, list) else [image]
        sampled = {k: kwargs.pop(k) for k in ("frames", "stride") if k in kwargs}
        read, _, _, times = self._normalise([[e] for e in entries], [prompt] * len(entries), max_new_tokens, **sampled)
        videos = [video.Video(frames, [], times[i], len(frames)) if i in times else frames[0]
                  for i, frames in enumerate(read)]
        outs = self.generate_details(videos, [prompt] * len(entries), max_new_tokens=max_new_tokens, **kwargs)
        # a video's boxes are in its frames' pixels (the model's input size: the frames were shrunk as read)
        results = [self.parse_objects(spec, text, g, frames[0], codec) for frames, (text, g) in zip(read, outs)]
        return results if isinstance(image, list) else results[0]

    def parse_objects(self, task: str | tasks.TaskSpec, text: str, generated: gen.Generated, image,
                      codec=None) -> list:
        """The objects of a detect / segment output for `image` (anything with .width and
        .height): each is scored by the mean log-prob of its tokens when the tokens and log-probs
        describe `text` (unscored otherwise), and segment masks are pasted at the image's size."""
        spec = task if isinstance(task, tasks.TaskSpec) else tasks.task_spec(task)
        if spec.parse is None:
            raise ValueError(f"task {spec.verb!r} answers in text; it has no objects to parse")
        pieces = self.tokenizer.decode_pieces(generated.tokens)
        scored = len(generated.logprobs) == len(generated.tokens) and "".join(pieces) == text
        objects = tasks.Results(spec.parse(text, image.width, image.height, pieces=pieces if scored else None,
                                           logprobs=generated.logprobs if scored else None).objects)
        return self.attach_masks(objects, image, codec) if spec.masks else objects

    def attach_masks(self, segmentations: list, image, codec=None) -> list:
        """Decode each Segmentation's 16 codes and paste the mask into its box at the image size."""
        if segmentations:
            with torch.inference_mode():
                masks64 = self._codec(codec).decode([s.codes for s in segmentations]).float().numpy()
            for seg, m in zip(segmentations, masks64):
                seg.mask = paste_mask(m, seg.box, image.height, image.width)
        return segmentations

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
        """A complete model folder, in the released HF layout: config.json, the weights, and
        save_model_files' tokenizer, preprocessor config and mask codec. palikit.load reads it back
        with the same resize filter and segment still working."""
        if quantize.scheme_of(self.model):
            raise InputError("a quantised model is saved by `palikit quantize` (quantize.save_quantized_folder); "
                             "Pipeline.save writes the released layout, which has no quantised weights")
        save_hf_folder(self.model, folder)
        save_model_files(folder, self.config, self.tokenizer.path, self.codec_path)


def _task_signature(spec: tasks.TaskSpec) -> inspect.Signature:
    P = inspect.Parameter
    params = [P("image", P.POSITIONAL_OR_KEYWORD)]
    params += [P(a.name, P.POSITIONAL_OR_KEYWORD, default=P.empty if a.required else a.default) for a in spec.args]
    params.append(P("max_new_tokens", P.KEYWORD_ONLY, default=None))  # None: spec.budget(prompt)
    if spec.masks:
        params.append(P("codec", P.KEYWORD_ONLY, default=None))
    return inspect.Signature([*params, P("sampling", P.VAR_KEYWORD)])


def _task_doc(spec: tasks.TaskSpec) -> str:
    result = "list[Segmentation] with full-size masks" if spec.masks else (
        "list[Detection] (boxes in the input image's pixels)" if spec.parse else "str")
    fields = "; ".join(f"{a.name}: {a.text.help or a.text.title}" for a in spec.args) or "no fields"
    return (f"{spec.help.capitalize()} (prompt `{spec.words[0]} ...`) -> {result}, or one per image "
            f"for a list of images. Fields: {fields}. Sampling as generate.")
