"""LoRA adapters (peft's folders: adapter_config.json, adapter_model.safetensors) read onto
palikit's model: for `palikit merge`, for resuming, and for serving a fine-tune without merging it
(`palikit.load(base, adapter=DIR)`, or the adapter folder itself as the model); and many of them
beside one base, each request choosing its own (AdapterBank: no peft needed). Written by
palikit.finetune (under transformers' module names, so transformers + peft read them too) or by
transformers + peft directly. peft comes with the train extra."""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .paligemma import PaliGemma
from .processor import InputError
from .weights import CheckpointError, hf_to_palikit, palikit_to_transformers_module

# peft's adapter files: adapter_model.safetensors keys "base_model.model.<module>.lora_A.weight".
_PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _adapter_module(key: str) -> tuple[str, str]:
    """(module name, the rest) of a peft adapter key."""
    name, sep, rest = key.removeprefix(_PEFT_PREFIX).partition(".lora_")
    return name, sep + rest


TRAINED_WITH = "palikit_trained_with.json"  # text config fields the adapters were trained with (no cap)


def is_adapter_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def base_of(folder: str | Path) -> str:
    """The base model an adapter folder names (peft's base_model_name_or_path)."""
    base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise InputError(f"{folder}: the adapter does not name its base model (base_model_name_or_path in "
                         f"{ADAPTER_CONFIG}); pass it: palikit.load(BASE, adapter=...), --model BASE --adapter ...")
    return base


def trained_with(folder: str | Path) -> dict | None:
    """The text config fields to load the base with for these adapters (see TRAINED_WITH)."""
    path = Path(folder) / TRAINED_WITH
    return json.loads(path.read_text()) if path.exists() else None


def require_adapter_files(folder: Path) -> None:
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder} is not a peft adapter folder (no {ADAPTER_CONFIG} / {ADAPTER_WEIGHTS})")


def adapter_state(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter's tensors under palikit's module names (peft's keys, without the adapter name):
    saved by palikit, or trained with transformers + peft (transformers 5 or older names)."""
    out = {}
    for key, tensor in load_file(folder / ADAPTER_WEIGHTS).items():
        name, rest = _adapter_module(key)
        out[_PEFT_PREFIX + hf_to_palikit(name, 2) + rest] = tensor
    return out


def load_adapter(model: PaliGemma, folder: str | Path):
    """peft LoRA adapters from `folder` on palikit's model -> the PeftModel. The adapters' targets
    are matched as peft matches them, against transformers' names of palikit's linear layers."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import check_target_module_exists

    folder = Path(folder)
    require_adapter_files(folder)
    config = PeftConfig.from_pretrained(str(folder))
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = [n for n in linear if check_target_module_exists(config, palikit_to_transformers_module(n))]
    if not targets:
        raise CheckpointError(f"{folder}: the adapter's target_modules {config.target_modules!r} match no layer")
    config.target_modules = targets
    peft_model = get_peft_model(model, config)
    state = adapter_state(folder)
    own = peft_model.state_dict()
    for key, tensor in state.items():  # an adapter of another base: one line, not torch's list
        mine = own.get(re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", key))
        if mine is not None and mine.shape != tensor.shape:
            raise CheckpointError(f"{folder} does not fit this base model: {_adapter_module(key)[0]} "
                                  f"{key.rsplit('.', 2)[-2]} is {tuple(tensor.shape)} in the adapter, "
                                  f"{tuple(mine.shape)} here (an adapter trained on another base?)")
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise CheckpointError(f"{folder}: adapter tensors for no layer here, e.g. {result.unexpected_keys[0]}")
    return peft_model


def merged(model: PaliGemma, folder: str | Path) -> PaliGemma:
    """`model` with the adapters of `folder` merged into its weights (W + B A * alpha / r)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise InputError("LoRA adapters need peft: pip install 'palikit[train]'") from None
    return load_adapter(model, folder).merge_and_unload()


# ---- many adapters on one base, chosen per batch row (palikit.engine; `palikit serve --adapter NAME=DIR`)


@dataclass
class _Stack:
    """One module's LoRA factors of every loaded adapter, by slot: the adapters' own tensors, and,
    made on the first per-row product, stacked copies (slot 0, the base, and adapters that skip
    the module: zeros, never gathered) with ranks zero-padded to the largest."""

    factors: dict[int, tuple[torch.Tensor, torch.Tensor, float]]  # slot -> A (r, in), B (out, r), scale
    n_slots: int  # the largest slot + 1
    padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # A (slots, r_max, in), B, scale

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.padded is None:
            n, r_max = self.n_slots, max(A.shape[0] for A, _, _ in self.factors.values())
            A0, B0, _ = next(iter(self.factors.values()))
            A = A0.new_zeros(n, r_max, A0.shape[1])
            B = B0.new_zeros(n, B0.shape[0], r_max)
            scale = A0.new_zeros(n)
            for slot, (a, b, s) in self.factors.items():
                A[slot, :a.shape[0]], B[slot, :, :a.shape[0]], scale[slot] = a, b, s
            self.padded = A, B, scale
        return self.padded


@dataclass
class LoadedAdapter:
    name: str
    folder: str
    slot: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> A (r, in), B (out, r), scale

    @property
    def touches_images(self) -> bool:
        """Whether the adapter changes image encodings (the vision tower or the projector)."""
        return any(not m.startswith("language_model.") for m in self.factors)


class AdapterBank:
    """LoRA adapters loaded beside one base model, applied unmerged and per batch row: a forward run
    under `bank.rows(slots)` adds, to each target module's output for row i, row i's adapter's
    scale * B (A x), gathered per row and multiplied as batched products (Punica's BGMV, Chen et
    al. 2023; S-LoRA, Sheng et al. 2023). A row of slot 0 (the base) or of an adapter that does not
    target the module costs nothing there; a module no adapter targets has no hook at all. Each row
    is its own product of one shape, so the engine's batch-invariant mode holds with adapters too.

    Adapters are peft folders (palikit's or transformers + peft's): their factors are read from
    adapter_model.safetensors and their scale from adapter_config.json (lora_alpha / r, or / sqrt(r)
    with use_rslora), in float32 (the product is rounded to the layer's dtype once, as peft does
    for float32 adapters on a 16-bit base)."""

    def __init__(self, model: PaliGemma, max_adapters: int = 8):
        self.model, self.max_adapters = model, max_adapters
        self.adapters: dict[str, LoadedAdapter] = {}
        self.stacks: dict[str, _Stack] = {}
        self.hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._rows = threading.local()  # the slots of the batch rows of this thread's forward
        self.lock = threading.Lock()

    # ---- loading

    def load(self, name: str, folder: str | Path) -> LoadedAdapter:
        """Read the adapter of `folder` as `name`; CheckpointError / InputError say what is wrong in
        one line (another base's shapes, no adapter files, rank 0, non-finite factors)."""
        folder = Path(folder)
        if not name or not re.fullmatch(r"[\w.\-]+", name):
            raise InputError(f"adapter name {name!r}: use letters, digits, '_', '-', '.'")
        if name in self.adapters:
            raise InputError(f"an adapter named {name!r} is loaded already (from {self.adapters[name].folder})")
        if len(self.adapters) >= self.max_adapters:
            raise InputError(f"{len(self.adapters)} adapters are loaded, the most this server takes "
                             f"(--max-adapters {self.max_adapters}); unload one first")
        require_adapter_files(folder)
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
        if not isinstance(r, int) or r < 1:
            raise CheckpointError(f"{folder}: LoRA rank r={r!r}; an adapter has rank >= 1")
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        modules = dict(self.model.named_modules())
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in adapter_state(folder).items():
            module, rest = _adapter_module(key)
            if rest not in (".lora_A.weight", ".lora_B.weight"):
                raise CheckpointError(f"{folder}: {key.removeprefix(_PEFT_PREFIX)} is not a LoRA factor this "
                                      "server applies (only lora_A / lora_B of linear layers)")
            pairs.setdefault(module, {})[rest[6]] = tensor.float()
        factors = {}
        for module, ab in sorted(pairs.items()):
            layer = modules.get(module)
            if layer is None:
                raise CheckpointError(f"{folder}: adapter factors for {module}, which this base model does not have "
                                      "(an adapter of another base?)")
            A, B = ab.get("A"), ab.get("B")
            n_in, n_out = _features(layer)
            if A is None or B is None or A.shape != (r, n_in) or B.shape != (n_out, r):
                raise CheckpointError(
                    f"{folder} does not fit this base model: {module} has LoRA factors "
                    f"{None if A is None else tuple(A.shape)} x {None if B is None else tuple(B.shape)} for a "
                    f"{n_in} -> {n_out} layer with rank {r} (an adapter trained on another base?)")
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise CheckpointError(f"{folder}: {module}'s LoRA factors are not all finite")
            factors[module] = (A.to(self.model.device), B.to(self.model.device), scale)
        if not factors:
            raise CheckpointError(f"{folder}: the adapter has no LoRA factors")
        with self.lock:
            used = {a.slot for a in self.adapters.values()}
            slot = next(s for s in range(1, self.max_adapters + 2) if s not in used)
            adapter = LoadedAdapter(name, str(folder), slot, factors)
            self.adapters[name] = adapter
            self._restack()
        return adapter

    def unload(self, name: str) -> None:
        """Forget an adapter (the caller makes sure no running request uses it)."""
        with self.lock:
            if name not in self.adapters:
                raise InputError(f"no adapter named {name!r} is loaded")
            del self.adapters[name]
            self._restack()

    def slot(self, name: str | None) -> int:
        """The slot of a loaded adapter (0: None, the base); InputError for an unknown name."""
        if name is None:
            return 0
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise InputError(f"no adapter named {name!r} is loaded (loaded: {known})")
        return self.adapters[name].slot

    def touches_images(self, slot: int) -> bool:
        return any(a.slot == slot and a.touches_images for a in self.adapters.values())

    def _restack(self) -> None:
        """Stacks and hooks for the loaded adapters (a module no adapter targets loses its hook)."""
        modules = dict(self.model.named_modules())
        targeted = sorted({m for a in self.adapters.values() for m in a.factors})
        n_slots = max((a.slot for a in self.adapters.values()), default=0) + 1
        stacks = {}
        for module in targeted:
            mine = {a.slot: a.factors[module] for a in self.adapters.values() if module in a.factors}
            stacks[module] = _Stack(mine, n_slots)
        for module in set(self.hooks) - set(targeted):
            self.hooks.pop(module).remove()
        for module in set(targeted) - set(self.hooks):
            self.hooks[module] = modules[module].register_forward_hook(self._hook(module))
        self.stacks = stacks

    # ---- applying

    @contextlib.contextmanager
    def rows(self, slots: list[int] | torch.Tensor, per_row: bool = False):
        """Run forwards in this block with batch row i on adapter slots[i] (0: the base). per_row:
        each row's product alone (its bits independent of the other rows: batch-invariant);
        otherwise one product per adapter over its rows (S-LoRA's grouping; no factor is copied)."""
        slots = [int(s) for s in slots]
        device = self.model.device
        # each adapter's rows, found once per forward rather than in every module
        groups = {s: torch.tensor([i for i, t in enumerate(slots) if t == s], device=device) for s in set(slots) if s}
        before = getattr(self._rows, "state", None)
        self._rows.state = (groups, per_row) if groups else None
        try:
            yield
        finally:
            self._rows.state = before

    def _hook(self, module: str):
        def add_lora(layer, args, out):
            state, stack = getattr(self._rows, "state", None), self.stacks.get(module)
            if state is None or stack is None:
                return out
            groups, per_row = state
            mine = [(slot, rows) for slot, rows in groups.items() if slot in stack.factors]
            if not mine:
                return out
            x = args[0]
            # added in float32 and rounded once to the layer's dtype, as peft adds float32 factors
            if per_row:  # each row its own product of one shape (gathered factors, padded ranks add zeros)
                A, B, scale = stack.stacked()
                rows = torch.cat([r for _, r in mine])
                picked = torch.cat([torch.full_like(r, s) for s, r in mine])
                xs = x[rows].float().reshape(len(rows), -1, x.shape[-1])
                delta = torch.bmm(torch.bmm(xs, A[picked].transpose(1, 2)), B[picked].transpose(1, 2))
                delta = delta * scale[picked].view(-1, 1, 1)
                return out.index_copy(0, rows, (out[rows].float() + delta.view(len(rows), *out.shape[1:])).to(out.dtype))
            out = out.clone() if torch.is_grad_enabled() else out
            for slot, rows in mine:  # one product per adapter over its rows, on its own factors
                A, B, scale = stack.factors[slot]
                out[rows] = (out[rows].float() + (x[rows].float() @ A.T) @ B.T * scale).to(out.dtype)
            return out

        return add_lora


def _features(layer: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a linear layer, dense or quantised (palikit.quantize keeps both)."""
    return layer.in_features, layer.out_features
