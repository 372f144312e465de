"""A decoder-only MoE transformer, single device, in one file (nanoGPT style).

Architecture: token embedding -> L blocks of [RMSNorm -> causal self-attention with RoPE ->
residual -> RMSNorm -> FFN -> residual] -> RMSNorm -> LM head. The first `num_dense_layers` blocks
use a dense SwiGLU FFN, the rest an `MoELayer` (top-k router, grouped SwiGLU experts). The model
knows nothing about process groups: `micromoe.model.parallel.parallelize_model` shards its MoE
layers afterwards.

Architecture variants are `ModelConfig` options, not copies of the model (each open model family
in `micromoe.model.hf` is a setting of them):
- `qkv_bias` / `attn_out_bias`: biases on the q, k, v projections (Qwen2-MoE) and on the output
  projection (Qwen3-MoE and OLMoE with `attention_bias`);
- `qk_norm`: RMSNorm of queries and keys before RoPE, per head over head_dim ("head": Qwen3) or
  over the whole projection width ("full": OLMoE);
- `norm_topk_prob`: the router takes a softmax over all experts, then the top k; True rescales the
  k chosen probabilities to sum to 1 (Mixtral, Qwen3-MoE), False keeps them (Qwen2-MoE, OLMoE);
- `shared_ffn_hidden` / `shared_expert_gate`: a dense SwiGLU "shared expert" beside the routed
  ones in every MoE block, optionally scaled by sigmoid(x w_gate) per token (Qwen2-MoE).

Legend: B batch, T sequence, C hidden (model width), V vocab, nh query heads, nkv key/value
heads, hd head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from micromoe.runtime import MoEConfig, MoELayer


@dataclass(frozen=True)
class ModelConfig:
    """Shape and routing options of the model.

    Attributes:
        vocab_size: V.
        seq_len: longest sequence (RoPE table size).
        num_layers: L blocks.
        hidden: C.
        num_heads: query heads nh.
        num_kv_heads: key/value heads (grouped-query attention); None = num_heads.
        head_dim: hd; None = hidden // num_heads.
        ffn_hidden: each expert's SwiGLU hidden size.
        dense_ffn_hidden: the dense layers' SwiGLU hidden size; None = top_k * ffn_hidden.
        num_experts: E experts per MoE layer.
        top_k: experts per token.
        num_dense_layers: the first blocks with a dense FFN instead of MoE.
        tie_embeddings: share the LM head with the token embedding.
        aux_loss_coef: Switch-style load-balancing loss weight (0 = off).
        expert_bias_rate: aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the
            router scores for the top-k *selection* only, moved by rate * sign(mean - load) after
            every optimizer step; 0 = off.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        init_std: std of embeddings and projections (residual outputs get init_std / sqrt(2L)).
        qkv_bias: biases on the query, key and value projections.
        attn_out_bias: a bias on the attention output projection.
        qk_norm: "none", "head" (RMSNorm over head_dim, shared by the heads) or "full" (RMSNorm
            over the whole q and k projection widths, nh * hd and nkv * hd).
        norm_topk_prob: rescale each token's k gate probabilities to sum to 1.
        shared_ffn_hidden: hidden size of a dense SwiGLU shared expert beside the routed experts of
            every MoE block; 0 = none.
        shared_expert_gate: scale the shared expert's output by sigmoid(x w), w [C] (per token).
    """

    vocab_size: int = 256
    seq_len: int = 128
    num_layers: int = 4
    hidden: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_hidden: int = 128
    dense_ffn_hidden: int | None = None
    num_experts: int = 8
    top_k: int = 2
    num_dense_layers: int = 0
    tie_embeddings: bool = True
    aux_loss_coef: float = 0.0
    expert_bias_rate: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    qkv_bias: bool = False
    attn_out_bias: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"
    norm_topk_prob: bool = True
    shared_ffn_hidden: int = 0
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "seq_len",
            "num_layers",
            "hidden",
            "num_heads",
            "ffn_hidden",
            "num_experts",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
        if self.head_dim is None and self.hidden % self.num_heads:
            raise ValueError(
                f"hidden={self.hidden} must be divisible by num_heads={self.num_heads} (or set head_dim)"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}")
        if self.dim_head % 2:
            raise ValueError(f"head_dim={self.dim_head} must be even for RoPE")
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise ValueError(
                f"num_dense_layers={self.num_dense_layers} must be in [0, num_layers={self.num_layers}]"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.aux_loss_coef < 0 or self.expert_bias_rate < 0:
            raise ValueError("aux_loss_coef and expert_bias_rate must be >= 0")
        if self.qk_norm not in ("none", "head", "full"):
            raise ValueError(f"qk_norm must be 'none', 'head' or 'full', got {self.qk_norm!r}")
        if isinstance(self.shared_ffn_hidden, bool) or not isinstance(self.shared_ffn_hidden, int):
            raise ValueError(f"shared_ffn_hidden must be an integer, got {self.shared_ffn_hidden!r}")
        if self.shared_ffn_hidden < 0:
            raise ValueError(
                f"shared_ffn_hidden must be >= 0 (0 = no shared expert), got {self.shared_ffn_hidden}"
            )
        if self.shared_expert_gate and self.shared_ffn_hidden == 0:
            raise ValueError("shared_expert_gate needs a shared expert: set shared_ffn_hidden > 0")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.num_heads

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    def moe_config(self) -> MoEConfig:
        return MoEConfig(
            self.hidden,
            self.ffn_hidden,
            self.num_experts,
            self.top_k,
            aux_loss_coef=self.aux_loss_coef,
            expert_bias=self.expert_bias_rate > 0,
            normalize_gates=self.norm_topk_prob,
        )


class RMSNorm(nn.Module):
    """x / rms(x) * weight (`F.rms_norm`: one fused kernel where the backend has one)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_table(seq_len: int, head_dim: int, theta: float) -> torch.Tensor:
    """float32 [2, seq_len, head_dim]: cos and sign-folded sin of position * theta^(-2i/hd),
    each frequency repeated for both halves (rotate-half convention)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, hd/2]
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)]).float()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + hd/2]) by their angles. x [B, nh, T, hd],
    table [2, T, hd]; computed in x's dtype."""
    cos, sin = table.to(x.dtype)  # [T, hd] each
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal multi-head (optionally grouped-query) attention with RoPE and optional QK-norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.kv_heads, cfg.dim_head
        self.qkv = nn.Linear(cfg.hidden, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.qkv_bias)
        self.proj = nn.Linear(self.nh * self.hd, cfg.hidden, bias=cfg.attn_out_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            self.q_norm = RMSNorm(self.nh * self.hd if full else self.hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.nkv * self.hd if full else self.hd, cfg.norm_eps)
        self.rope_fn = apply_rope  # `MoETransformer.fuse_pointwise` may swap in a fused version

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # x [B, T, C]
        q, k, v = self.qkv(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        if self.qk_norm == "full":  # q [B, T, nh*hd], k [B, T, nkv*hd]
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(b, t, self.nh, self.hd), k.view(b, t, self.nkv, self.hd)
        if self.qk_norm == "head":  # over hd, the same weights for every head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, nh, T, hd], [B, nkv, T, hd]
        v = v.view(b, t, self.nkv, self.hd).transpose(1, 2)
        q, k = self.rope_fn(q, rope[:, :t]), self.rope_fn(k, rope[:, :t])
        if self.nkv != self.nh:  # grouped-query attention: share each K/V head over nh/nkv queries
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, nh, T, hd]
        return self.proj(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))


class DenseSwiGLU(nn.Module):
    """(silu(x W_gate) * (x W_up)) W_down."""

    def __init__(self, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * ffn_hidden, bias=False)
        self.down = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block; `ffn` is a `DenseSwiGLU` or an `MoELayer`, the latter with an
    optional (gated) dense shared expert beside it.

    `recompute` (activation checkpointing, set by `model.parallel.apply_activation_checkpointing`):
    "none" keeps every activation for the backward, "full" recomputes the whole block in the
    backward, "moe" only its MoE FFN (token dispatch and expert GEMMs, the largest activations)."""

    def __init__(self, cfg: ModelConfig, moe: bool) -> None:
        super().__init__()
        self.recompute = "none"
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        dense_hidden = cfg.dense_ffn_hidden or cfg.top_k * cfg.ffn_hidden
        self.ffn: nn.Module = MoELayer(cfg.moe_config()) if moe else DenseSwiGLU(cfg.hidden, dense_hidden)
        self.shared_expert = (
            DenseSwiGLU(cfg.hidden, cfg.shared_ffn_hidden) if moe and cfg.shared_ffn_hidden else None
        )
        self.shared_expert_gate = (
            nn.Linear(cfg.hidden, 1, bias=False) if moe and cfg.shared_expert_gate else None
        )

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, C] -> routed (or dense) FFN + the shared expert, sigmoid-gated per token."""
        y = self.ffn(h)
        if self.shared_expert is not None:
            shared = self.shared_expert(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared  # gate [B, T, 1]
            y = y + shared
        return y

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, C] -> ([B, T, C], the MoE layer's aux loss or None)."""
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, rope, use_reentrant=False)
        return self._forward(x, rope)

    def _forward(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.attn_norm(x), rope)
        if not isinstance(self.ffn, MoELayer):
            return x + self.ffn(self.ffn_norm(x)), None
        if self.recompute == "moe" and torch.is_grad_enabled():
            y, aux = checkpoint(self._moe, self.ffn_norm(x), use_reentrant=False)
        else:
            y, aux = self._moe(self.ffn_norm(x))
        return x + y, aux

    def _moe(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self._ffn(h)
        return y, self.ffn.last_stats.aux_loss


class MoETransformer(nn.Module):
    """Decoder-only language model; `forward(idx, targets)` -> (logits, loss, aux_loss)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, moe=i >= cfg.num_dense_layers) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.register_buffer("rope", rope_table(cfg.seq_len, cfg.dim_head, cfg.rope_theta), persistent=False)
        self._init_weights()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Compute the buffers again (after `to_empty`): the RoPE table, zero expert biases."""
        self.rope = rope_table(self.cfg.seq_len, self.cfg.dim_head, self.cfg.rope_theta).to(self.rope.device)
        for layer in self.moe_layers():
            if layer.router.expert_bias is not None:
                layer.router.expert_bias.zero_()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)  # attention biases start at zero (no RNG drawn)
                continue
            if ".ffn.router" in name or ".ffn.experts" in name or p.dim() < 2:
                continue  # the MoE layer and the norms keep their own initialization
            scale = (
                1 / math.sqrt(2 * self.cfg.num_layers) if name.endswith(("proj.weight", "down.weight")) else 1
            )
            nn.init.normal_(p, std=std * scale)

    def fuse_pointwise(self, compiler: Callable[[Callable], Callable] = torch.compile) -> None:
        """Run RoPE as one fused kernel forward and one backward (on GPU: `torch.compile`); same
        math. The MoE layers stay eager (their dispatch syncs with the host)."""
        rope = compiler(apply_rope)
        for m in self.modules():
            if isinstance(m, Attention):
                m.rope_fn = rope

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in depth order (index i = MoE layer i, as logged and checkpointed)."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """idx int64 [B, T] -> logits [B, T, V]; loss = mean cross-entropy vs targets [B, T]
        (float32, None without targets); aux_loss = sum of the MoE layers' aux losses (float32)."""
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds ModelConfig.seq_len={self.cfg.seq_len}")
        x = self.embed(idx)  # [B, T, C]
        aux = torch.zeros((), device=idx.device, dtype=torch.float32)
        for block in self.blocks:
            x, block_aux = block(x, self.rope)
            if block_aux is not None:
                aux = aux + block_aux.float()
        logits = self.head(self.norm(x))  # [B, T, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss, aux

    @torch.no_grad()
    def update_expert_biases(self, loads_le: torch.Tensor) -> None:
        """Aux-loss-free balancing step: loads_le [L_moe, E] tokens per expert in the last
        optimizer step (identical on every rank). No-op when expert_bias_rate is 0."""
        if self.cfg.expert_bias_rate == 0:
            return
        for layer, load in zip(self.moe_layers(), loads_le, strict=True):
            layer.router.update_expert_bias(load, rate=self.cfg.expert_bias_rate)

    def num_params(self) -> dict[str, int]:
        """Parameter counts of the unsharded model (also after `parallelize_model`): total,
        active per token (matmul weights a token passes through), embedding."""
        cfg = self.cfg
        expert_ids = {id(p) for m in self.moe_layers() for p in m.experts.parameters()}
        other = sum(p.numel() for p in self.parameters() if id(p) not in expert_ids)  # tied: once
        per_expert = 3 * cfg.hidden * cfg.ffn_hidden  # gate, up and down projections
        embed = self.embed.weight.numel()
        total = other + cfg.num_moe_layers * cfg.num_experts * per_expert
        active = other + cfg.num_moe_layers * cfg.top_k * per_expert
        if not cfg.tie_embeddings:
            active -= embed  # the input embedding is a lookup, not a matmul
        return {"total": total, "active": active, "embedding": embed}

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 * active matmul parameters + attention (nanoGPT/PaLM)."""
        cfg = self.cfg
        attn = 12 * cfg.num_layers * cfg.num_heads * cfg.dim_head * cfg.seq_len // 2  # causal half
        return 6.0 * self.num_params()["active"] + attn
