"""Stage-wise GPT and Llama models (see ``stages`` for the execution contract)."""

from fuyou.models.config import ModelConfig
from fuyou.models.model import StageModel
from fuyou.models.config import PRESETS, preset
from fuyou.models.stages import ParamSpec, Stage

__all__ = ["ModelConfig", "PRESETS", "ParamSpec", "Stage", "StageModel", "preset"]
