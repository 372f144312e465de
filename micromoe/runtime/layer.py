"""The MoE layer: router, token dispatcher, grouped SwiGLU experts.

Written for one device: built with all E experts in E local slots and the `LocalDispatcher`.
`parallelize.apply_expert_parallel` turns it into a plain-EP or MicroEP layer (the experts become
`OwnedExperts`: this rank's owned masters, local slots gathered from the owners; the dispatcher is
swapped); nothing else changes.
Legend: T tokens, H hidden, E experts, K top-k, S local slots, N dispatched rows, G ranks of the
dispatch group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from micromoe.plan import Plan, positive_int
from micromoe.runtime.dispatch_fast import FastMeta
from micromoe.runtime.dispatch_local import DispatchMeta, LocalDispatcher
from micromoe.runtime.experts import GroupedSwiGLU
from micromoe.runtime.router import TopKRouter


@dataclass(frozen=True)
class MoEConfig:
    """Shape of one MoE layer.

    Attributes:
        hidden: H, the model width.
        ffn_hidden: F, each expert's SwiGLU hidden size.
        num_experts: E.
        top_k: K experts per token.
        aux_loss_coef: load-balancing loss weight (0 = off).
        expert_bias: aux-loss-free selection bias (DeepSeek-V3 style).
        normalize_gates: rescale each token's K gates to sum to 1.
    """

    hidden: int
    ffn_hidden: int
    num_experts: int
    top_k: int = 2
    aux_loss_coef: float = 0.0
    expert_bias: bool = False
    normalize_gates: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn_hidden", "num_experts", "top_k"):  # stored as plain ints
            object.__setattr__(self, name, positive_int(getattr(self, name), f"MoEConfig.{name}"))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")


@dataclass(frozen=True)
class MoEStats:
    """Counters of the last forward pass (for logging and tests), read from its dispatch record.

    Read lazily: on the single-device fast path the counts reach the host only when `slot_load`
    or `counts_ge` is read (a host sync then, which also raises a deferred input error), and
    `gpu_idle_ms` waits for the GPU; read them after the step's own sync.

    Attributes:
        aux_loss: scalar tensor (add it to the training loss).
        meta: the dispatcher's record of the call.
    """

    aux_loss: torch.Tensor
    meta: DispatchMeta | FastMeta

    @property
    def slot_load(self) -> npt.NDArray[np.int64]:
        """int64 [S]; (token, expert) rows each local slot computed."""
        return self.meta.slot_load

    @property
    def counts_ge(self) -> npt.NDArray[np.int64]:
        """int64 [G, E]; rows per (source rank, expert) in the dispatch group."""
        return self.meta.counts_ge

    @property
    def plan(self) -> Plan | None:
        """The MicroEP plan, None for other dispatchers."""
        return self.meta.plan

    @property
    def route_s(self) -> float:
        """Host seconds spent routing."""
        return self.meta.route_s

    @property
    def gpu_idle_ms(self) -> float:
        """GPU idle time this layer's host wait for the counts caused (0 without a wait)."""
        return self.meta.gpu_idle_ms


class MoELayer(nn.Module):
    """y = sum over the token's top-k experts of gate * SwiGLU_expert(x).

    Args:
        cfg: the layer's shape.
        device, dtype: where the parameters live.
    """

    def __init__(
        self, cfg: MoEConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = TopKRouter(
            cfg.hidden,
            cfg.num_experts,
            cfg.top_k,
            aux_loss_coef=cfg.aux_loss_coef,
            expert_bias=cfg.expert_bias,
            normalize=cfg.normalize_gates,
            device=device,
            dtype=dtype,
        )
        # GroupedSwiGLU on one device; apply_expert_parallel swaps in an OwnedExperts
        self.experts: nn.Module = GroupedSwiGLU(
            cfg.num_experts, cfg.hidden, cfg.ffn_hidden, device=device, dtype=dtype
        )
        self.dispatcher: LocalDispatcher = LocalDispatcher(cfg.num_experts)
        self.last_stats: MoEStats | None = None

    def forward(self, x: torch.Tensor, *, forced_expert: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., H] -> [..., H]. `forced_expert` int64 [T, K] fixes the routing (tests, benchmarks).

        Raises ValueError on every rank of the dispatch group when any rank's input is bad.
        """
        problem = _input_dtype_problem(x, self.router.weight.dtype)  # the experts cast to their own
        if problem:
            self.dispatcher.fail(problem, x.device)
        if x.shape[-1] != self.cfg.hidden:
            self.dispatcher.fail(
                f"input hidden size {x.shape[-1]} != MoEConfig.hidden={self.cfg.hidden}", x.device
            )
        x_TH = x.reshape(-1, self.cfg.hidden)
        if forced_expert is not None and forced_expert.shape != (x_TH.shape[0], self.cfg.top_k):
            self.dispatcher.fail(
                f"forced_expert must be [T={x_TH.shape[0]}, K={self.cfg.top_k}], got "
                f"{tuple(forced_expert.shape)}",
                x.device,
            )
        sel = self.router(x_TH, forced_expert)
        tokens_NH, rows_S, meta = self.dispatcher.dispatch(x_TH, sel.expert, sel.weight)
        # the fast path hands over its group ends (no scan of rows_S on the device)
        out_NH = self.experts(tokens_NH, rows_S, offs=getattr(meta, "offs", None))
        self.dispatcher.mark("experts")
        y_TH = self.dispatcher.combine(out_NH, meta)
        self.last_stats = MoEStats(sel.aux_loss, meta)
        return y_TH.reshape(x.shape)


def _input_dtype_problem(x: torch.Tensor, weight_dtype: torch.dtype) -> str:
    """'' if the layer can take `x`, else why not: integer, bool or complex input (token ids
    instead of hidden states, say), or a float dtype other than the weights' outside autocast."""
    if not x.dtype.is_floating_point:
        return (
            f"input must be floating-point hidden states [..., H] of dtype {weight_dtype}, got dtype "
            f"{x.dtype} (token ids? pass them through an embedding first)"
        )
    if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
        return f"input dtype {x.dtype} != the layer's {weight_dtype}; cast one of them (x.to({weight_dtype}))"
    return ""
