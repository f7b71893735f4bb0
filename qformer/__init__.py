"""qformer: train and use BLIP-2 Q-Formers between a frozen vision encoder and a frozen LLM.

    from qformer import Blip2
    model = Blip2.from_pretrained("path/to/model")
    model.caption(images); model.itm(images, texts); model.similarity(images, texts)
"""

from .blip2 import Blip2
from .config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from .errors import CheckpointError, ConfigError, QFormerError, UnsafeCheckpointError
from .model import Blip2Model
from .persistence import LoadReport
from .stage1 import Stage1Config, Stage1Objective, Stage1Output
from .stage2 import Stage2Objective, Stage2Output, Stage2TextCollator

__version__ = "0.1.0"

__all__ = [
    "Blip2",
    "Blip2Config",
    "Blip2Model",
    "CheckpointError",
    "ConfigError",
    "LLMConfig",
    "LoadReport",
    "QFormerConfig",
    "QFormerError",
    "Stage1Config",
    "Stage1Objective",
    "Stage1Output",
    "Stage2Objective",
    "Stage2Output",
    "Stage2TextCollator",
    "UnsafeCheckpointError",
    "VisionConfig",
]
