"""Fine-tuning PaliGemma / PaliGemma 2 (`palikit train CONFIG`, or `torchrun ... -m palikit train
CONFIG`). The package map:

- recipe.py: the recipe: Trainer (setup -> train -> save_checkpoint -> cleanup), the loss, train, merge
- config.py: TrainConfig, LoraSettings, QuantSettings, the TRAINABLE / LORA_TARGETS presets, load_config,
  ConfigError
- model.py: the model a config names, random init, LoRA adapters (saved under transformers' module
  names: export_adapter / load_adapter), the trainable-parameter table
- checkpoint.py: atomic checkpoint folders, optimizer and RNG state, the newest checkpoint of a run
- qlora.py: QLoRA's 4-bit language model (bitsandbytes, CUDA)

The torchrun helpers are palikit.dist; data (DataSpec, readers, the data order) is palikit.data.
"""

from .config import LORA_TARGETS, TRAINABLE, ConfigError, LoraSettings, TrainConfig, load_config
from ..adapters import load_adapter
from .model import apply_lora, param_table
from .recipe import Trainer, loss_fn, merge, train

__all__ = ["LORA_TARGETS", "TRAINABLE", "ConfigError", "LoraSettings", "TrainConfig", "Trainer", "apply_lora",
           "load_adapter", "load_config", "loss_fn", "merge", "param_table", "train"]
