"""Named model shapes. `preset(name, **overrides)` returns a `ModelConfig`.

- `tiny`: the CPU demo (4 gloo processes train it in a few minutes); byte-level vocabulary.
- `small`: one GPU (bf16, grouped GEMMs); byte-level vocabulary.
- `gpt-32x1.3b`, `mixtral-8x7b`: the MicroMoE paper's models (hidden 2048/FFN 8192/32 experts and
  hidden 4096/FFN 14336/8 experts, both top-2).
- `qwen3-30b-a3b`: the open 128-expert shape (hidden 2048, expert FFN 768, top-8, 4 KV heads).
Override `num_layers` (and anything else) to fit the machine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from micromoe.model.transformer import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=256,
        seq_len=64,
        num_layers=4,
        hidden=64,
        num_heads=4,
        ffn_hidden=128,
        num_experts=8,
        top_k=2,
    ),
    "small": ModelConfig(
        vocab_size=256,
        seq_len=1024,
        num_layers=8,
        hidden=1024,
        num_heads=16,
        ffn_hidden=2816,
        num_experts=16,
        top_k=2,
    ),
    "gpt-32x1.3b": ModelConfig(
        vocab_size=50304,
        seq_len=2048,
        num_layers=24,
        hidden=2048,
        num_heads=16,
        ffn_hidden=8192,
        num_experts=32,
        top_k=2,
        tie_embeddings=True,
    ),
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000,
        seq_len=4096,
        num_layers=32,
        hidden=4096,
        num_heads=32,
        num_kv_heads=8,
        ffn_hidden=14336,
        num_experts=8,
        top_k=2,
        tie_embeddings=False,
        rope_theta=1e6,
    ),
    "qwen3-30b-a3b": ModelConfig(
        vocab_size=151936,
        seq_len=4096,
        num_layers=48,
        hidden=2048,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        ffn_hidden=768,
        num_experts=128,
        top_k=8,
        tie_embeddings=False,
        rope_theta=1e6,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named shape with `overrides` (ModelConfig fields; None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown model option(s) {bad}; valid: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
