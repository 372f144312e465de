"""Tiny random Hugging Face MoE models for the interop tests, built with `transformers`' own config
and model classes and saved locally (no network). Every parameter is redrawn so that biases and
norms are not at their zero/one initialization, and routers separate the experts clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

transformers = __import__("pytest").importorskip("transformers")
tokenizers = __import__("pytest").importorskip("tokenizers")

ARCHS = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")

COMMON: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "eos_token_id": 1,
    "bos_token_id": 0,
    "pad_token_id": None,
}

# per architecture: (config class, model class, fields)
SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "MixtralForCausalLM": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_hidden_layers": 2, "intermediate_size": 40, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "Qwen2MoeForCausalLM": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_hidden_layers": 3,
            "intermediate_size": 40,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 36,
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "mlp_only_layers": [0],
            "norm_topk_prob": False,
        },
    ),
    "Qwen3MoeForCausalLM": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_hidden_layers": 3,
            "head_dim": 16,
            "intermediate_size": 40,
            "moe_intermediate_size": 24,
            "num_experts": 6,
            "num_experts_per_tok": 3,
            "mlp_only_layers": [0],
            "norm_topk_prob": True,
            "attention_bias": True,
        },
    ),
    "OlmoeForCausalLM": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        {
            "num_hidden_layers": 2,
            "intermediate_size": 24,
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "tie_word_embeddings": True,
        },
    ),
}


def hf_config(arch: str, **overrides: Any) -> Any:
    """A tiny `transformers` config of `arch`."""
    cfg_cls, _, fields = SPECS[arch]
    return getattr(transformers, cfg_cls)(**{**COMMON, **fields, **overrides})


def hf_model(arch: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random `transformers` model of `arch` (eval mode, fp32, eager attention)."""
    _, model_cls, _ = SPECS[arch]
    cfg = hf_config(arch, **overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "gate.weight" in name and "experts" not in name:  # routers and the shared-expert gate
                p.normal_(std=0.5)
            else:
                p.normal_(std=0.1)
    return model


def tiny_tokenizer(vocab_size: int = 96) -> Any:
    """A word-level `tokenizers` tokenizer of `vocab_size` ids: 0 <s>, 1 </s>, 2 [UNK], then words."""
    words = ["<s>", "</s>", "[UNK]"] + [f"w{i}" for i in range(vocab_size - 3)]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def save_hf(arch: str, folder: Path, seed: int = 0, *, tokenizer: bool = True, **overrides: Any) -> Any:
    """Save a tiny random model (and a tokenizer) into `folder`; returns the model."""
    model = hf_model(arch, seed, **overrides)
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer(model.config.vocab_size).save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return model
