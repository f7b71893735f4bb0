"""qformer: train and use BLIP-2 Q-Formers between a frozen vision encoder and a frozen LLM.

    from qformer import Blip2
    model = Blip2.from_pretrained("path/to/model")
    model.itm(images, texts); model.similarity(images, texts)
"""

from .checkpoint import CheckpointError, LoadReport, UnsafeCheckpointError
from .config import Blip2Config, ConfigError, QFormerConfig, VisionConfig
from .model import Blip2
from .stage1 import Stage1Objective, Stage1Output

__version__ = "0.1.0"

__all__ = [
    "Blip2",
    "Blip2Config",
    "CheckpointError",
    "ConfigError",
    "LoadReport",
    "QFormerConfig",
    "Stage1Objective",
    "Stage1Output",
    "UnsafeCheckpointError",
    "VisionConfig",
]
