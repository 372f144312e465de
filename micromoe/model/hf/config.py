"""Hugging Face `config.json` <-> `ModelConfig`, for the architectures whose semantics we implement.

Supported (`SUPPORTED`), each read with its real keys and the defaults of its `transformers` config
class when a key is missing:

| architecture | routed experts | router | extras |
| --- | --- | --- | --- |
| `MixtralForCausalLM` | `block_sparse_moe.experts.{e}.w1/w3/w2` | softmax, top-k, renormalized | |
| `Qwen2MoeForCausalLM` | `mlp.experts.{e}.gate/up/down_proj` | softmax, top-k, `norm_topk_prob` | q/k/v biases (`qkv_bias`), shared expert with a sigmoid gate, first-N dense layers |
| `Qwen3MoeForCausalLM` | as Qwen2-MoE | as Qwen2-MoE | per-head QK-norm, `attention_bias`, first-N dense layers |
| `OlmoeForCausalLM` | as Qwen2-MoE | as Qwen2-MoE | QK-norm over the whole q/k width, `attention_bias` |

Everything else is refused with one line naming what the model lacks (`REFUSED` lists known
architectures; any other is refused too): RoPE scaling, partial rotary, sliding windows shorter
than the training sequence, dense layers that are not the first blocks, non-SiLU activations,
OLMoE's `clip_qkv`, attention dropout, Mixtral's router jitter.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from micromoe.model.transformer import ModelConfig

SUPPORTED = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
MODEL_TYPES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}

# architecture -> the features our model does not have
REFUSED = {
    "DeepseekV3ForCausalLM": "multi-head latent attention (MLA), sigmoid group-limited routing with a "
    "score-correction bias, and ungated shared experts",
    "DeepseekV2ForCausalLM": "multi-head latent attention (MLA) and group-limited routing",
    "GptOssForCausalLM": "attention sinks, expert biases, a clamped SwiGLU and alternating sliding-window "
    "attention",
    "Qwen3NextForCausalLM": "gated DeltaNet linear attention and gated attention",
    "Glm4MoeForCausalLM": "sigmoid routing with a score-correction bias and partial rotary embeddings",
    "DbrxForCausalLM": "fused, clipped QKV and a LayerNorm instead of RMSNorm",
    "JambaForCausalLM": "Mamba layers",
    "GraniteMoeForCausalLM": "embedding, residual, attention and logit multipliers",
}

# training sequence length when neither the caller nor --seq-len gives one (RoPE table size)
DEFAULT_SEQ_LEN = 2048
# keys of ModelConfig that only training sets (not part of an architecture)
TRAINING_FIELDS = ("seq_len", "aux_loss_coef", "expert_bias_rate", "init_std")


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed `config.json` of a model folder; ValueError naming the file when absent or bad."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: not found; --hf takes a Hugging Face model folder with config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def architecture(hf: dict[str, Any], where: str) -> str:
    """The one supported architecture named by `architectures`; ValueError otherwise."""
    archs = hf.get("architectures") or []
    if len(archs) != 1:
        raise ValueError(f"{where}: expected one entry in 'architectures', got {archs!r}")
    arch = archs[0]
    if arch in REFUSED:
        raise ValueError(
            f"{where}: {arch} is not supported: it needs {REFUSED[arch]}, which micromoe's model does not "
            f"have (supported: {', '.join(SUPPORTED)})"
        )
    if arch not in SUPPORTED:
        raise ValueError(f"{where}: architecture {arch} is not supported (supported: {', '.join(SUPPORTED)})")
    return arch


def _refuse(where: str, arch: str, feature: str) -> ValueError:
    return ValueError(f"{where}: this {arch} needs {feature}, which micromoe's model does not implement")


def _rope_theta(hf: dict[str, Any], default: float, where: str, arch: str) -> float:
    """theta of plain RoPE from `rope_parameters` (transformers 5) or the older `rope_theta` /
    `rope_scaling` keys; refuses scaled or partial RoPE."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise _refuse(where, arch, f"RoPE scaling of type {kind!r}")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise _refuse(where, arch, f"partial rotary embeddings (partial_rotary_factor={partial})")
    return float(params.get("rope_theta") or hf.get("rope_theta") or default)


def _check_window(window: int | None, seq_len: int, where: str, arch: str) -> None:
    """A sliding window at least as long as the sequence is plain causal attention."""
    if window and window < seq_len:
        raise _refuse(
            where,
            arch,
            f"sliding-window attention (window {window} < sequence {seq_len}); use --seq-len {window}",
        )


def _dense_prefix(hf: dict[str, Any], num_layers: int, where: str, arch: str) -> int:
    """Qwen's dense layers (in `mlp_only_layers` or off the `decoder_sparse_step` grid) among the
    first `num_layers`; they must be the first N blocks, as in our model. Returns N."""
    only = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step") or 1)
    dense = [i for i in range(num_layers) if i in only or (i + 1) % step != 0]
    if dense != list(range(len(dense))):
        raise _refuse(where, arch, f"dense layers at {dense}, which are not the first blocks")
    return len(dense)


def _num_experts(hf: dict[str, Any], arch: str, where: str) -> int:
    """`num_local_experts` (Mixtral) or `num_experts`; each config class maps the other name onto
    its own (`attribute_map`), so a saved config.json may hold either."""
    keys = ("num_local_experts", "num_experts")
    for key in keys if arch == "MixtralForCausalLM" else keys[::-1]:
        if hf.get(key):
            return int(hf[key])
    raise ValueError(f"{where}: no num_experts / num_local_experts: not a mixture-of-experts model")


def _attention(hf: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    """Fields every supported architecture reads the same way."""
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, arch, f"the activation {hf['hidden_act']!r} (micromoe's SwiGLU uses SiLU)")
    if float(hf.get("attention_dropout") or 0.0) != 0.0:
        raise _refuse(where, arch, f"attention dropout ({hf['attention_dropout']})")
    heads = int(hf["num_attention_heads"])
    return {
        "vocab_size": int(hf["vocab_size"]),
        "hidden": int(hf["hidden_size"]),
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": hf.get("head_dim") or None,
        "num_experts": _num_experts(hf, arch, where),
        "top_k": int(hf["num_experts_per_tok"]),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm_eps": float(
            hf.get("rms_norm_eps") or (1e-5 if arch in ("MixtralForCausalLM", "OlmoeForCausalLM") else 1e-6)
        ),
        "init_std": float(hf.get("initializer_range") or 0.02),
        "rope_theta": _rope_theta(hf, 1e6 if arch == "MixtralForCausalLM" else 1e4, where, arch),
    }


def _mixtral(hf: dict[str, Any], num_layers: int, seq_len: int, where: str) -> dict[str, Any]:
    arch = "MixtralForCausalLM"
    if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
        raise _refuse(where, arch, f"router jitter noise ({hf['router_jitter_noise']})")
    _check_window(hf.get("sliding_window"), seq_len, where, arch)
    return {"ffn_hidden": int(hf["intermediate_size"]), "norm_topk_prob": True}


def _olmoe(hf: dict[str, Any], num_layers: int, seq_len: int, where: str) -> dict[str, Any]:
    arch = "OlmoeForCausalLM"
    if hf.get("clip_qkv") is not None:
        raise _refuse(where, arch, f"clipped q/k/v activations (clip_qkv={hf['clip_qkv']})")
    if hf.get("head_dim") not in (None, int(hf["hidden_size"]) // int(hf["num_attention_heads"])):
        raise _refuse(where, arch, f"head_dim={hf['head_dim']} other than hidden_size / num_attention_heads")
    bias = bool(hf.get("attention_bias", False))
    return {
        "ffn_hidden": int(hf["intermediate_size"]),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "qk_norm": "full",  # RMSNorm over the whole q (nh * hd) and k (nkv * hd) widths
        "qkv_bias": bias,
        "attn_out_bias": bias,
    }


def _qwen(hf: dict[str, Any], num_layers: int, seq_len: int, where: str, arch: str) -> dict[str, Any]:
    """What Qwen2-MoE and Qwen3-MoE share: expert width, router, first-N dense layers, windows."""
    dense = _dense_prefix(hf, num_layers, where, arch)
    if hf.get("use_sliding_window", False):
        types = hf.get("layer_types") or ["sliding_attention"] * num_layers
        if "sliding_attention" in types[:num_layers]:
            _check_window(hf.get("sliding_window"), seq_len, where, arch)
    return {
        "ffn_hidden": int(hf["moe_intermediate_size"]),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "num_dense_layers": dense,
        "dense_ffn_hidden": int(hf["intermediate_size"]) if dense else None,
    }


def _qwen2_moe(hf: dict[str, Any], num_layers: int, seq_len: int, where: str) -> dict[str, Any]:
    arch = "Qwen2MoeForCausalLM"
    shared = int(hf.get("shared_expert_intermediate_size", 5632))
    if shared < 1:
        raise _refuse(where, arch, "a shared expert of size 0")
    return {
        **_qwen(hf, num_layers, seq_len, where, arch),
        "qkv_bias": bool(hf.get("qkv_bias", True)),  # older configs lack the key: always biased
        "shared_ffn_hidden": shared,
        "shared_expert_gate": True,
    }


def _qwen3_moe(hf: dict[str, Any], num_layers: int, seq_len: int, where: str) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return {
        **_qwen(hf, num_layers, seq_len, where, "Qwen3MoeForCausalLM"),
        "qk_norm": "head",  # RMSNorm over head_dim, before RoPE
        "qkv_bias": bias,
        "attn_out_bias": bias,
    }


# architecture -> its fields beyond `_attention`'s: (config, kept layers, sequence, file) -> fields
VARIANTS = {
    "MixtralForCausalLM": _mixtral,
    "Qwen2MoeForCausalLM": _qwen2_moe,
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "OlmoeForCausalLM": _olmoe,
}


def model_config(
    hf: dict[str, Any],
    *,
    where: str = "config.json",
    num_layers: int | None = None,
    seq_len: int | None = None,
) -> ModelConfig:
    """Our `ModelConfig` for a Hugging Face config.

    Args:
        hf: the parsed config.json.
        where: the file, for messages.
        num_layers: keep the first N blocks (None = all of `num_hidden_layers`).
        seq_len: training sequence length (None = min(max_position_embeddings, DEFAULT_SEQ_LEN)).

    Raises ValueError naming `where` for an unsupported architecture or feature.
    """
    arch = architecture(hf, where)
    total = int(hf["num_hidden_layers"])
    layers = total if num_layers is None else num_layers
    if not 1 <= layers <= total:
        raise ValueError(f"--layers {layers}: {where} has {total} layers; keep between 1 and {total}")
    max_pos = int(hf.get("max_position_embeddings") or DEFAULT_SEQ_LEN)
    seq = seq_len if seq_len is not None else min(max_pos, DEFAULT_SEQ_LEN)
    fields = {**_attention(hf, arch, where), **VARIANTS[arch](hf, layers, seq, where)}
    return ModelConfig(num_layers=layers, seq_len=seq, **fields)


def _comparable(cfg: ModelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for name in TRAINING_FIELDS:
        d.pop(name)
    d["num_kv_heads"], d["head_dim"] = cfg.kv_heads, cfg.dim_head
    if cfg.num_dense_layers == 0:
        d["dense_ffn_hidden"] = None
    return d


def hf_config(cfg: ModelConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config.json for `cfg`: the source model's `base` updated for the layers and vocabulary the
    run kept, or (no base) a Mixtral config, the architecture of a plain `ModelConfig`.

    Raises ValueError when the result would not describe `cfg` (e.g. a model with dense layers and
    no source folder, or one trained with a selection bias that no exported architecture has)."""
    if cfg.expert_bias_rate > 0:
        raise ValueError(
            "the run trained a DeepSeek-style expert-selection bias (--expert-bias-rate); no exported "
            "architecture has one, so the exported model would route differently"
        )
    out = dict(base) if base is not None else _mixtral_base(cfg)
    out["num_hidden_layers"] = cfg.num_layers
    out["vocab_size"] = cfg.vocab_size
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = out["layer_types"][: cfg.num_layers]
    if isinstance(out.get("mlp_only_layers"), list):
        out["mlp_only_layers"] = [i for i in out["mlp_only_layers"] if i < cfg.num_layers]
    back = model_config(out, where="the exported config.json", seq_len=cfg.seq_len)
    if _comparable(back) != _comparable(cfg):
        diff = {
            k: (v, _comparable(back)[k]) for k, v in _comparable(cfg).items() if _comparable(back)[k] != v
        }
        raise ValueError(
            f"the model cannot be written as {out['architectures'][0]}: (ours, exported) differ in {diff}"
        )
    return out


def _mixtral_base(cfg: ModelConfig) -> dict[str, Any]:
    """MixtralForCausalLM fields for a ModelConfig without a source folder."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn_hidden,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "sliding_window": None,
        "router_jitter_noise": 0.0,
        "attention_dropout": 0.0,
        "dtype": "float32",
    }
