"""Tensor names and layouts between Hugging Face checkpoints and our logical names.

Logical names are the single-device `MoETransformer.state_dict()` names with each MoE layer's
experts split per expert id (also the layout of our checkpoints on disk):

    embed.weight                                  [V, C]
    blocks.{i}.attn_norm.weight                   [C]
    blocks.{i}.attn.qkv.weight / .bias            [(nh + 2 nkv) hd, C] / [(nh + 2 nkv) hd]: q, k, v rows
    blocks.{i}.attn.q_norm.weight, k_norm.weight  [hd] ("head") or [nh hd], [nkv hd] ("full")
    blocks.{i}.attn.proj.weight / .bias           [C, nh hd] / [C]
    blocks.{i}.ffn_norm.weight                    [C]
    blocks.{i}.ffn.gate_up.weight, ffn.down.weight          dense block: [2F', C] (gate rows first), [C, F']
    blocks.{i}.ffn.router.weight                  [E, C]
    blocks.{i}.ffn.experts.{e}.w_gate_up          [C, 2F]: x @ w, columns [:F] gate, [F:] up
    blocks.{i}.ffn.experts.{e}.w_down             [F, C]
    blocks.{i}.shared_expert.gate_up.weight, .down.weight   [2S, C], [C, S]
    blocks.{i}.shared_expert_gate.weight          [1, C]
    norm.weight                                   [C]
    head.weight                                   [V, C] (the embedding when tied)

Hugging Face stores every projection as an `nn.Linear` weight [out, in] and the experts one file
entry per expert and projection (what `save_pretrained` writes and `from_pretrained` reads in
transformers 5, which fuses them into 3-D tensors only in memory). A `Rule` says which HF tensors
make one logical tensor: concatenated along rows, then transposed for the experts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from micromoe.model.transformer import ModelConfig

# a logical expert tensor: (the model's [E, ...] parameter name, expert id)
EXPERT_NAME = re.compile(r"^(blocks\.\d+\.ffn\.experts)\.(\d+)\.(w_gate_up|w_down)$")


@dataclass(frozen=True)
class Rule:
    """One logical tensor = cat(HF tensors along dim 0), transposed when `transpose`.

    Attributes:
        hf_names: the HF tensors, in concatenation order.
        hf_shapes: their shapes ([out, in] for weights, [out] for biases and norms).
        transpose: the logical tensor is the transpose (experts: x @ w instead of x @ W^T).
    """

    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    transpose: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical tensor's shape."""
        rows = sum(s[0] for s in self.hf_shapes)
        shape = (rows, *self.hf_shapes[0][1:])
        return tuple(reversed(shape)) if self.transpose else shape

    def to_logical(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The HF tensors (in `hf_names` order) -> the logical tensor."""
        if not self.transpose:
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        out = parts[0].new_empty(self.shape)  # [in, sum of outs]: one copy, no concatenated temporary
        start = 0
        for p in parts:
            out[:, start : start + p.shape[0]].copy_(p.t())
            start += p.shape[0]
        return out

    def to_hf(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logical tensor -> {HF name: tensor} (contiguous, ready to save)."""
        if tuple(tensor.shape) != self.shape:
            raise ValueError(
                f"expected shape {self.shape} for {self.hf_names[0]}'s source, got {tuple(tensor.shape)}"
            )
        t = tensor.t() if self.transpose else tensor
        pieces = t.split([s[0] for s in self.hf_shapes], dim=0)
        return {n: p.contiguous() for n, p in zip(self.hf_names, pieces, strict=True)}


def _linear(names: list[str], outs: list[int], cols: int, bias: bool = False) -> Rule:
    if bias:
        return Rule(tuple(f"{n}.bias" for n in names), tuple((o,) for o in outs))
    return Rule(tuple(f"{n}.weight" for n in names), tuple((o, cols) for o in outs))


def _attention(cfg: ModelConfig, i: int, p: str) -> dict[str, Rule]:
    c, nh, nkv, hd = cfg.hidden, cfg.num_heads, cfg.kv_heads, cfg.dim_head
    a = f"{p}self_attn."
    qkv = [f"{a}q_proj", f"{a}k_proj", f"{a}v_proj"]
    outs = [nh * hd, nkv * hd, nkv * hd]
    rules = {
        f"blocks.{i}.attn_norm.weight": Rule((f"{p}input_layernorm.weight",), ((c,),)),
        f"blocks.{i}.attn.qkv.weight": _linear(qkv, outs, c),
    }
    if cfg.qkv_bias:
        rules[f"blocks.{i}.attn.qkv.bias"] = _linear(qkv, outs, c, bias=True)
    rules[f"blocks.{i}.attn.proj.weight"] = _linear([f"{a}o_proj"], [c], nh * hd)
    if cfg.attn_out_bias:
        rules[f"blocks.{i}.attn.proj.bias"] = _linear([f"{a}o_proj"], [c], nh * hd, bias=True)
    if cfg.qk_norm != "none":
        full = cfg.qk_norm == "full"
        rules[f"blocks.{i}.attn.q_norm.weight"] = Rule((f"{a}q_norm.weight",), ((nh * hd if full else hd,),))
        rules[f"blocks.{i}.attn.k_norm.weight"] = Rule((f"{a}k_norm.weight",), ((nkv * hd if full else hd,),))
    rules[f"blocks.{i}.ffn_norm.weight"] = Rule((f"{p}post_attention_layernorm.weight",), ((c,),))
    return rules


def _swiglu(ours: str, theirs: str, c: int, f: int) -> dict[str, Rule]:
    """A dense SwiGLU (`DenseSwiGLU`: gate_up rows = gate then up)."""
    return {
        f"{ours}.gate_up.weight": _linear([f"{theirs}.gate_proj", f"{theirs}.up_proj"], [f, f], c),
        f"{ours}.down.weight": _linear([f"{theirs}.down_proj"], [c], f),
    }


def _moe(cfg: ModelConfig, i: int, p: str, arch: str) -> dict[str, Rule]:
    c, f = cfg.hidden, cfg.ffn_hidden
    mixtral = arch == "MixtralForCausalLM"
    m = f"{p}block_sparse_moe." if mixtral else f"{p}mlp."
    rules = {f"blocks.{i}.ffn.router.weight": _linear([f"{m}gate"], [cfg.num_experts], c)}
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    for e in range(cfg.num_experts):  # state_dict order: every w_gate_up, then every w_down
        gu = _linear([f"{m}experts.{e}.{gate}", f"{m}experts.{e}.{up}"], [f, f], c)
        rules[f"blocks.{i}.ffn.experts.{e}.w_gate_up"] = Rule(gu.hf_names, gu.hf_shapes, transpose=True)
    for e in range(cfg.num_experts):
        dn = _linear([f"{m}experts.{e}.{down}"], [c], f)
        rules[f"blocks.{i}.ffn.experts.{e}.w_down"] = Rule(dn.hf_names, dn.hf_shapes, transpose=True)
    if cfg.shared_ffn_hidden:
        rules.update(_swiglu(f"blocks.{i}.shared_expert", f"{m}shared_expert", c, cfg.shared_ffn_hidden))
    if cfg.shared_expert_gate:
        rules[f"blocks.{i}.shared_expert_gate.weight"] = _linear([f"{m}shared_expert_gate"], [1], c)
    return rules


def logical_rules(cfg: ModelConfig, arch: str) -> dict[str, Rule]:
    """{logical name: Rule} for every tensor of a model with `cfg`, in state_dict order, written in
    architecture `arch` (one of `micromoe.model.hf.config.SUPPORTED`)."""
    c, v = cfg.hidden, cfg.vocab_size
    rules = {"embed.weight": _linear(["model.embed_tokens"], [v], c)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        rules.update(_attention(cfg, i, p))
        if i < cfg.num_dense_layers:
            f = cfg.dense_ffn_hidden or cfg.top_k * cfg.ffn_hidden
            rules.update(_swiglu(f"blocks.{i}.ffn", f"{p}mlp", c, f))
        else:
            rules.update(_moe(cfg, i, p, arch))
    rules["norm.weight"] = Rule(("model.norm.weight",), ((c,),))
    rules["head.weight"] = _linear(["model.embed_tokens" if cfg.tie_embeddings else "lm_head"], [v], c)
    return rules


def hf_tensors(
    rules: dict[str, Rule], tensor: Callable[[str], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of a model, read one logical tensor at a time through
    `tensor(logical name)`, in HF order. A tied head (its rule names the embedding again) is
    written once."""
    seen: set[str] = set()
    for name, rule in rules.items():
        if set(rule.hf_names) <= seen:
            continue
        for hf_name, t in rule.to_hf(tensor(name)).items():
            seen.add(hf_name)
            yield hf_name, t


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A single-device state dict -> logical names: each [E, ...] expert tensor becomes E tensors
    `...experts.{e}.w_gate_up` / `w_down` (views, no copy)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        base, _, leaf = name.rpartition(".")
        if base.endswith(".ffn.experts") and leaf in ("w_gate_up", "w_down"):
            out.update({f"{base}.{e}.{leaf}": t[e] for e in range(t.shape[0])})
        else:
            out[name] = t
    return out
