"""palikit: run, fine-tune, evaluate and serve PaliGemma / PaliGemma 2 in plain PyTorch."""

from .api import Pipeline, load
from .config import PRESETS, GemmaConfig, PaliGemmaConfig, SiglipConfig
from .maskcodec import MaskCodec
from .options import Options
from .paligemma import PaliGemma
from .processor import InputError, Tokenizer
from .overlay import draw
from .tasks import Detection, Segmentation
from .video import Video, read_video
from .weights import CheckpointError

__all__ = ["load", "Options", "Pipeline", "PaliGemma", "PaliGemmaConfig", "SiglipConfig", "GemmaConfig", "PRESETS",
           "Tokenizer", "InputError", "CheckpointError", "MaskCodec", "Detection", "Segmentation", "draw",
           "Video", "read_video"]
__version__ = "0.1.0"
