"""Checkpoints in and out: Hugging Face safetensors folders (both key layouts, sharded or not) and
big_vision `.npz` files. Only safetensors and npz are read (never pickle).

Weights are read tensor by tensor into a model built on the meta device, so a model never exists
twice in memory and never in float32 when the target is bfloat16.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write, write_text_atomic
from .config import PRESETS, PaliGemmaConfig
from .paligemma import PaliGemma
from .processor import RESAMPLE, RESAMPLE_OF_PIL_ID, Tokenizer
from .tasks import LOC_TOKENS, SEG_TOKENS

log = logging.getLogger(__name__)

# ---- Hugging Face names ---------------------------------------------------------------------
# (prefix in the file, prefix in palikit); None drops the tensor (the LM head is tied).
HF_LEGACY = [  # as released on the hub (transformers < 4.52)
    ("vision_tower.vision_model.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", None),
]
HF_NEW = [  # transformers >= 4.52 save_pretrained
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),  # transformers 5 module names (no vision_model level)
    ("vision_tower.", "vision_tower."),  # transformers 5 save_pretrained: legacy names minus vision_model
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model."),
    ("lm_head.", None),
]
# Module names of transformers' PaliGemmaForConditionalGeneration at run time (transformers 5),
# which peft adapters for it name: (palikit prefix, transformers prefix). hf_to_palikit reads them back.
TRANSFORMERS_MODULES = [("vision_tower.", "model.vision_tower."),
                        ("multi_modal_projector.", "model.multi_modal_projector."),
                        ("language_model.", "model.language_model.")]
# In Gemma 1 checkpoints `post_attention_layernorm` is the norm *before* the MLP.
_PG1_NORM = (re.compile(r"(layers\.\d+\.)post_attention_layernorm"), r"\1pre_feedforward_layernorm")
_PG1_NORM_BACK = (re.compile(r"(layers\.\d+\.)pre_feedforward_layernorm"), r"\1post_attention_layernorm")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


BUNDLED = Path(__file__).parent / "assets" / "default"  # the bundled tiny model


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


def hf_to_palikit(name: str, version: int) -> str | None:
    for table in (HF_LEGACY, HF_NEW):
        for src, dst in table:
            if name.startswith(src):
                if dst is None:
                    return None
                out = dst + name[len(src):]
                return _PG1_NORM[0].sub(_PG1_NORM[1], out) if version == 1 else out
    return name  # unknown: reported as unexpected by the loader


def palikit_to_hf(name: str, version: int) -> str:
    if version == 1:
        name = _PG1_NORM_BACK[0].sub(_PG1_NORM_BACK[1], name)
    for src, dst in HF_LEGACY:
        if dst is not None and name.startswith(dst):
            return src + name[len(dst):]
    raise KeyError(name)


def palikit_to_transformers_module(name: str) -> str:
    """A palikit module name as transformers' PaliGemmaForConditionalGeneration names it."""
    for src, dst in TRANSFORMERS_MODULES:
        if name.startswith(src):
            return dst + name[len(src):]
    raise KeyError(name)


# ---- loading --------------------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in the folder: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        hint = " (pickle .bin weights are not loaded; convert them to safetensors)" if any(
            folder.glob("*.bin")) else ""
        raise CheckpointError(f"no *.safetensors weights in {folder} (found: {found}){hint}")
    return files


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
ALIGNMENT = 64  # bytes: an AVX-512 vector, and what torch's CPU allocator aligns every tensor to


def iter_safetensors(files: list[Path], version: int, dtype: torch.dtype | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(palikit name, tensor) of every tensor. A file whose tensors all are `dtype` already is
    memory-mapped: the weights are its own pages, no copy. A file that converts is read tensor by
    tensor with pread(2): a mapped file's pages stay resident (in RSS) until it is closed, so
    converting float32 to bfloat16 through mmap would peak at the whole file plus the new model."""
    for path in files:
        try:
            with safe_open(path, framework="pt", backend=_backend(path, dtype)) as f:
                for key in f.keys():
                    name = hf_to_palikit(key, version)
                    if name is not None:
                        yield name, f.get_tensor(key)
        except (OSError, RuntimeError, SafetensorError) as e:  # truncated/corrupt files
            raise CheckpointError(f"cannot read {path}: {e}") from e


def _backend(path: Path, dtype: torch.dtype | None) -> str:
    if dtype is None:
        return "mmap"
    with safe_open(path, framework="pt") as f:  # reads the header only
        same = all(f.get_slice(k).get_dtype() == _SAFETENSORS_DTYPES.get(dtype) for k in f.keys())
    return "mmap" if same else "pread"


@contextlib.contextmanager
def _skip_init():
    """Meta tensors hold no values, so random init is wasted work; its first call on the meta
    device also costs about a second of one-time set-up in torch. Skip it while building."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda t, *args, **kwargs: t)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def build_on_meta(config: PaliGemmaConfig, **options) -> PaliGemma:
    """The model's layout without values (PaliGemma's keyword options: attention, logit_softcap)."""
    with torch.device("meta"), _skip_init():
        return PaliGemma(config, **options)


def load_tensors(model: PaliGemma, tensors: Iterator[tuple[str, torch.Tensor]], dtype, device, source,
                 keep_dtype: Callable[[str, torch.Tensor], bool] | None = None) -> PaliGemma:
    """Assign named tensors to a meta-device model, converting each one as it arrives; those for which
    `keep_dtype` holds (a quantised folder's packed weights and scales) are copied as they are."""
    expected = dict(model.state_dict())
    state, unexpected = {}, []
    for name, tensor in tensors:
        if name not in expected:
            unexpected.append(name)
            continue
        want = expected[name].shape
        if name == "language_model.embed_tokens.weight" and tensor.shape[0] != want[0]:
            raise CheckpointError(f"{source}: embedding has {tensor.shape[0]} rows but the config says "
                                  f"vocab_size={want[0]}")
        if tensor.shape != want:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, expected {tuple(want)}")
        # The packed weights must be aligned for the kernels' vector loads, and a tensor mapped from the
        # file may start at any byte offset: such a one is copied (int4 decoding crashed with SIGSEGV
        # on the bundled model without it). A tensor read into memory of its own is aligned already.
        if keep_dtype is not None and keep_dtype(name, tensor):
            tensor = tensor.to(device=device)
            state[name] = tensor.clone() if tensor.data_ptr() % ALIGNMENT else tensor
        else:
            state[name] = tensor.to(device=device, dtype=dtype)
    missing = [k for k in expected if k not in state]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match a PaliGemma layout: "
            + (f"missing {len(missing)} tensors ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
               if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} tensors ({', '.join(unexpected[:5])}"
               f"{', ...' if len(unexpected) > 5 else ''})" if unexpected else "")
        )
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


CODEC_FILES = ("mask_codec.npz", "vae-oid.npz")  # the segmentation mask codec, looked for beside the weights
QUANTIZED_KEY = "palikit_quantization"  # in config.json of a `palikit quantize` folder: its scheme


@dataclass
class Checkpoint:
    """What a checkpoint holds, read without its weights: its config, where its files are, and a
    reader of its tensors (palikit names) for a target dtype."""

    path: Path
    config: PaliGemmaConfig
    tensors: Callable[[torch.dtype], Iterator[tuple[str, torch.Tensor]]]
    tokenizer: Path  # tokenizer.model beside the weights, or the one given
    codec: Path | None
    big_vision: bool  # a big_vision .npz (its logits soft-capped as big_vision does, by default)
    quantization: dict | None  # the scheme of a `palikit quantize` folder (palikit.quantize)


def open_checkpoint(path: Path, sliding_window: bool = False, tokenizer: str | Path | None = None) -> Checkpoint:
    """A Hugging Face folder (single or sharded safetensors) or a big_vision .npz file."""
    if path.is_file():
        if path.suffix != ".npz":
            raise CheckpointError(f"{path}: expected a folder with safetensors or a big_vision .npz file")
        config, tensors = _open_npz(path)
        folder, quantization = path.parent, None
    else:
        config, quantization = _read_hf_config(path, sliding_window)
        files = weight_files(path)
        tensors = lambda dtype: iter_safetensors(files, config.version, dtype)  # noqa: E731
        folder = path
    tok = Path(tokenizer) if tokenizer else folder / "tokenizer.model"
    codec = next((folder / n for n in CODEC_FILES if (folder / n).exists()), None)
    return Checkpoint(path, config, tensors, tok, codec, path.is_file(), quantization)


def _read_hf_config(folder: Path, sliding_window: bool) -> tuple[PaliGemmaConfig, dict | None]:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
    resample = "bicubic"
    pre = folder / "preprocessor_config.json"
    if pre.exists():  # the resize filter the checkpoint was made with (3 = bicubic, 2 = bilinear)
        resample = RESAMPLE_OF_PIL_ID.get(json.loads(pre.read_text()).get("resample"), "bicubic")
    try:
        config = PaliGemmaConfig.from_hf_config(hf, name=folder.name, sliding_window=sliding_window, resample=resample)
    except KeyError as e:
        raise CheckpointError(f"{config_path} lacks the field {e.args[0]!r} in its text_config") from e
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    return config, hf.get(QUANTIZED_KEY)


def save_hf_folder(model: PaliGemma, folder: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors in the released (legacy) layout, shards above max_shard_bytes.

    Each file is written to a temporary name and renamed, so a crash never leaves a half-written
    checkpoint behind a valid name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    version = model.config.version
    shards, current, size = [], {}, 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[palikit_to_hf(name, version)] = tensor.detach().contiguous().cpu()
        size += nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for shard, fname in zip(shards, names):
        atomic_write(folder / fname, lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
                 "weight_map": {k: f for s, f in zip(shards, names) for k in s}}
        write_text_atomic(folder / "model.safetensors.index.json", json.dumps(index, indent=2))
    elif (folder / "model.safetensors.index.json").exists():
        (folder / "model.safetensors.index.json").unlink()
    write_text_atomic(folder / "config.json", json.dumps(model.config.to_hf_config(), indent=2))


# ---- big_vision npz -------------------------------------------------------------------------
# Layers are stacked on a leading axis (flax scan); kernels are (in, out) and get transposed.

_VIT = "img/Transformer/encoderblock/"
_ATT = _VIT + "MultiHeadDotProductAttention_0/"
_LLM = "llm/layers/"


def _npz_tensor(npz, key: str) -> torch.Tensor:
    a = npz[key]
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:  # bfloat16 is saved as raw 2-byte voids
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def config_from_npz(keys: dict[str, tuple], name: str) -> PaliGemmaConfig:
    """Infer the sizes from the array shapes; take the remaining fields from the matching preset."""
    L, H, D, h = keys["llm/layers/attn/q_einsum/w"]
    K = keys["llm/layers/attn/kv_einsum/w"][2]
    F = keys["llm/layers/mlp/gating_einsum"][-1]
    V = keys["llm/embedder/input_embedding"][0]
    n_img, C = keys["img/pos_embedding"][1:]
    patch = keys["img/embedding/kernel"][0]
    v2 = "llm/layers/post_attention_norm/scale" in keys
    sizes = dict(hidden_size=D, num_layers=L, num_heads=H, num_kv_heads=K, head_dim=h, intermediate_size=F)
    base = next((p for p in PRESETS.values() if p.version == (2 if v2 else 1)
                 and all(getattr(p.text, k) == v for k, v in sizes.items())), None)
    if base is None:
        raise CheckpointError(f"{name}: no preset has a decoder of these sizes {sizes}")
    config = PaliGemmaConfig.from_name(
        base.name,
        text=dict(vocab_size=V),
        vision=dict(image_size=int(round(n_img**0.5)) * patch, patch_size=patch, hidden_size=C,
                    num_layers=keys[_VIT + "LayerNorm_0/scale"][0], intermediate_size=keys[_VIT + "MlpBlock_0/Dense_0/kernel"][-1],
                    num_heads=keys[_ATT + "query/kernel"][2]),
    )
    config.name = name  # from_name's first argument is the preset name, so set ours afterwards
    return config


def iter_npz(npz, keys: dict, config: PaliGemmaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    def get(key):
        return _npz_tensor(npz, key)

    C, D = config.vision.hidden_size, config.text.hidden_size
    H, K, h = config.text.num_heads, config.text.num_kv_heads, config.text.head_dim
    yield "vision_tower.embeddings.patch_embedding.weight", get("img/embedding/kernel").permute(3, 2, 0, 1)
    yield "vision_tower.embeddings.patch_embedding.bias", get("img/embedding/bias")
    yield "vision_tower.embeddings.position_embedding.weight", get("img/pos_embedding").reshape(-1, C)
    stacked = {
        "layer_norm1.weight": (_VIT + "LayerNorm_0/scale", lambda a: a),
        "layer_norm1.bias": (_VIT + "LayerNorm_0/bias", lambda a: a),
        "layer_norm2.weight": (_VIT + "LayerNorm_1/scale", lambda a: a),
        "layer_norm2.bias": (_VIT + "LayerNorm_1/bias", lambda a: a),
        **{f"self_attn.{p}_proj.weight": (_ATT + f"{q}/kernel", lambda a: a.reshape(C, C).T)
           for p, q in (("q", "query"), ("k", "key"), ("v", "value"))},
        **{f"self_attn.{p}_proj.bias": (_ATT + f"{q}/bias", lambda a: a.reshape(C))
           for p, q in (("q", "query"), ("k", "key"), ("v", "value"))},
        "self_attn.out_proj.weight": (_ATT + "out/kernel", lambda a: a.reshape(C, C).T),
        "self_attn.out_proj.bias": (_ATT + "out/bias", lambda a: a),
        "mlp.fc1.weight": (_VIT + "MlpBlock_0/Dense_0/kernel", lambda a: a.T),
        "mlp.fc1.bias": (_VIT + "MlpBlock_0/Dense_0/bias", lambda a: a),
        "mlp.fc2.weight": (_VIT + "MlpBlock_0/Dense_1/kernel", lambda a: a.T),
        "mlp.fc2.bias": (_VIT + "MlpBlock_0/Dense_1/bias", lambda a: a),
    }
    for name, (key, fn) in stacked.items():
        arr = get(key)
        for i in range(arr.shape[0]):
            yield f"vision_tower.encoder.layers.{i}.{name}", fn(arr[i]).contiguous()
    yield "vision_tower.post_layernorm.weight", get("img/Transformer/encoder_norm/scale")
    yield "vision_tower.post_layernorm.bias", get("img/Transformer/encoder_norm/bias")
    yield "multi_modal_projector.linear.weight", get("img/head/kernel").T.contiguous()
    yield "multi_modal_projector.linear.bias", get("img/head/bias")
    yield "language_model.embed_tokens.weight", get("llm/embedder/input_embedding")
    yield "language_model.norm.weight", get("llm/final_norm/scale")
    llm = {
        "self_attn.q_proj.weight": ("attn/q_einsum/w", lambda a: a.permute(0, 2, 1).reshape(H * h, D)),
        "self_attn.k_proj.weight": ("attn/kv_einsum/w", lambda a: a[0].permute(0, 2, 1).reshape(K * h, D)),
        "self_attn.v_proj.weight": ("attn/kv_einsum/w", lambda a: a[1].permute(0, 2, 1).reshape(K * h, D)),
        "self_attn.o_proj.weight": ("attn/attn_vec_einsum/w", lambda a: a.reshape(H * h, D).T),
        "mlp.gate_proj.weight": ("mlp/gating_einsum", lambda a: a[0].T),
        "mlp.up_proj.weight": ("mlp/gating_einsum", lambda a: a[1].T),
        "mlp.down_proj.weight": ("mlp/linear", lambda a: a.T),
        "input_layernorm.weight": ("pre_attention_norm/scale", lambda a: a),
        "pre_feedforward_layernorm.weight": ("pre_ffw_norm/scale", lambda a: a),
    }
    if config.text.post_norms:
        llm["post_attention_layernorm.weight"] = ("post_attention_norm/scale", lambda a: a)
        llm["post_feedforward_layernorm.weight"] = ("post_ffw_norm/scale", lambda a: a)
    for name, (key, fn) in llm.items():
        arr = get(_LLM + key)
        for i in range(arr.shape[0]):
            yield f"language_model.layers.{i}.{name}", fn(arr[i]).contiguous()


def _open_npz(path: Path) -> tuple[PaliGemmaConfig, Callable[[torch.dtype], Iterator[tuple[str, torch.Tensor]]]]:
    """The config of a big_vision .npz (from its arrays' shapes) and a reader of its tensors."""
    try:
        npz = np.load(path, allow_pickle=False)
        # Strip the optional "params/" prefix; remember each array's shape without reading it.
        arrays = {k.removeprefix("params/"): k for k in npz.files}
        headers = {k: _npz_header(npz, v) for k, v in arrays.items()}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # not a zip / bad header
        raise CheckpointError(f"cannot read {path} as a big_vision npz: {e}") from e
    # Object arrays are pickles. allow_pickle=False makes numpy refuse one only when it is read (an
    # unused one passes unseen); the headers name them all, so refuse the file up front, clearly.
    if pickled := [arrays[k] for k, (_, dtype) in headers.items() if dtype.hasobject]:
        raise CheckpointError(f"{path} holds Python objects (pickle) in {', '.join(pickled[:3])}: palikit "
                              "reads numeric arrays only and never unpickles")
    shapes = {k: shape for k, (shape, _) in headers.items()}
    required = ["llm/layers/attn/q_einsum/w", "img/pos_embedding", "llm/embedder/input_embedding"]
    if missing := [k for k in required if k not in shapes]:
        raise CheckpointError(f"{path} is not a PaliGemma big_vision checkpoint: no {', '.join(missing)}")

    class _View:  # strips the prefix on access
        def __getitem__(self, k):
            return npz[arrays[k]]

    config = config_from_npz(shapes, name=path.name.split(".")[0])
    return config, lambda dtype: iter_npz(_View(), shapes, config)


def _npz_header(npz, key: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of an array from its .npy header, without reading (or unpickling) the data."""
    # NpzFile has no header query; the zip member's header says it. Public readers only: numpy 2
    # removed the private _read_array_header.
    with npz.zip.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"{key}: .npy format {version} is not supported (expected 1.0 or 2.0)")
        shape, _, dtype = read(f)
        return shape, dtype


IMAGE_TOKEN = "<image>"  # transformers' PaliGemmaProcessor's name for the image placeholder

# transformers' tokenizer and processor files: kept beside tokenizer.model when a model is written
# from a folder that has them (a fine-tune, a quantised copy).
TOKENIZER_COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "processor_config.json", "chat_template.json", "chat_template.jinja")


def save_model_files(folder: str | Path, config: PaliGemmaConfig, tokenizer: Path, codec: Path | None) -> None:
    """What a model folder holds besides config.json and the weights: tokenizer.model and the
    transformers files beside it (or a tokenizer_config.json naming its special pieces, so that
    transformers' processor pads a batch), preprocessor_config.json (the input size, resize filter
    and image tokens, in transformers' SiglipImageProcessor form) and the mask codec when there is
    one; each file written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = config.vision.image_size
    preprocessor = {
        "image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": int(RESAMPLE[config.resample]),
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_seq_length": config.num_image_tokens,
    }
    write_text_atomic(folder / "preprocessor_config.json", json.dumps(preprocessor, indent=2) + "\n")
    companions = [Path(tokenizer).parent / name for name in TOKENIZER_COMPANIONS]
    companions = [p for p in companions if p.is_file()]
    for src, name in [(Path(tokenizer), "tokenizer.model"), (Path(codec) if codec else None, None),
                      *((p, None) for p in companions)]:
        if src is not None and src.resolve() != (folder / (name or src.name)).resolve():
            atomic_write(folder / (name or src.name), lambda p, src=src: shutil.copyfile(src, p))
    if not (folder / "tokenizer_config.json").exists():
        config_json = _tokenizer_config(Tokenizer(tokenizer, image_token_id=config.image_token_id))
        write_text_atomic(folder / "tokenizer_config.json", json.dumps(config_json, indent=2) + "\n")


def _tokenizer_config(tok: Tokenizer) -> dict:
    """transformers' GemmaTokenizer settings for a SentencePiece model: its special pieces by name
    (a tokenizer trained with other names than Gemma's <pad>, <bos>, <eos> keeps them), and the
    loc / seg / <image> tokens at palikit's ids where the model file lacks them (transformers'
    processor would otherwise append them in another order)."""
    sp = tok.sp
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    added = {}
    if not tok.has_special_pieces:
        added = {str(tok.loc_offset + i): t for i, t in enumerate(LOC_TOKENS + SEG_TOKENS)}
    if tok.image_token_id >= sp.get_piece_size():
        added[str(tok.image_token_id)] = IMAGE_TOKEN
    decoder = {i: {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                   "special": t == IMAGE_TOKEN} for i, t in sorted(added.items(), key=lambda kv: int(kv[0]))}
    return {"tokenizer_class": "GemmaTokenizer", "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()),
            "pad_token": piece(max(sp.pad_id(), 0)), "unk_token": piece(sp.unk_id()), "add_bos_token": True,
            "add_eos_token": False, "padding_side": "left", "model_max_length": 1_000_000,
            "added_tokens_decoder": decoder}
