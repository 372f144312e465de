"""micromoe.model: the MoE transformer (single device) and the function that shards it.

Owns the architecture (`ModelConfig`, `MoETransformer`: RMSNorm, RoPE attention, dense or MoE
SwiGLU FFNs), the named shapes (`PRESETS`, `preset`), and `parallelize_model`, which applies plain
EP or MicroEP to every MoE layer. Training, data and checkpoints live in `micromoe.train`.
"""

from micromoe.model.parallel import parallelize_model
from micromoe.model.presets import PRESETS, preset
from micromoe.model.transformer import ModelConfig, MoETransformer

__all__ = ["PRESETS", "ModelConfig", "MoETransformer", "parallelize_model", "preset"]
