"""Top-k softmax router with an optional auxiliary loss and optional aux-loss-free expert bias.

Legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from micromoe.runtime.kernels_gate import chosen_softmax


@dataclass(frozen=True)
class RouterOutput:
    """What the router selected for T tokens.

    Attributes:
        expert: int64 [T, K]; chosen experts (distinct per token).
        weight: float [T, K]; gate weights (differentiable).
        probs: float32 [T, E]; softmax of the router logits (None on the lean CUDA path, which
            never materializes it: see `TopKRouter.forward`).
        aux_loss: scalar; coef * E * sum_e f_e * P_e (Switch-style), 0 when coef is 0.
    """

    expert: torch.Tensor
    weight: torch.Tensor
    probs: torch.Tensor | None
    aux_loss: torch.Tensor


_ZEROS: dict[torch.device, torch.Tensor] = {}


def _zero(device: torch.device) -> torch.Tensor:
    """A float32 zero scalar on `device`, cached (one launch fewer per call; read-only: callers
    add it out of place)."""
    if device not in _ZEROS:
        _ZEROS[device] = torch.zeros((), device=device, dtype=torch.float32)
    return _ZEROS[device]


class TopKRouter(nn.Module):
    """Softmax router: probs = softmax(x W^T); top-k by probs (+ bias); gates = chosen probs.

    Args:
        hidden: H.
        num_experts: E.
        top_k: K.
        aux_loss_coef: weight of the load-balancing auxiliary loss (0 disables it).
        expert_bias: keep an aux-loss-free bias that shifts only the top-k *selection*
            (DeepSeek-V3 style); update it with `update_expert_bias`.
        normalize: rescale the K gate weights of a token to sum to 1 (Hugging Face's
            `norm_topk_prob`: Mixtral always, Qwen3-MoE as configured); False keeps the chosen
            experts' softmax probabilities (Qwen2-MoE, OLMoE). Only normalized gates take the lean
            CUDA path (softmax over the K chosen logits); un-normalized ones need all E logits.
    """

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        *,
        aux_loss_coef: float = 0.0,
        expert_bias: bool = False,
        normalize: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {aux_loss_coef}")
        self.num_experts, self.top_k = num_experts, top_k
        self.aux_loss_coef, self.normalize = aux_loss_coef, normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=hidden**-0.5)
        bias = torch.zeros(num_experts, device=device, dtype=torch.float32) if expert_bias else None
        self.register_buffer("expert_bias", bias)

    def forward(self, x: torch.Tensor, forced_expert: torch.Tensor | None = None) -> RouterOutput:
        """x [T, H] -> RouterOutput. `forced_expert` int64 [T, K] overrides the selection (benchmarks
        and tests); the gates still come from the router's probabilities, so gradients flow."""
        logits_TE = x @ self.weight.t()
        if forced_expert is not None and forced_expert.shape != (x.shape[0], self.top_k):
            raise ValueError(
                f"forced_expert must be [T={x.shape[0]}, K={self.top_k}], got {tuple(forced_expert.shape)}"
            )
        if x.is_cuda and self.normalize and self.aux_loss_coef == 0 and self.expert_bias is None:
            return self._lean(logits_TE, forced_expert, x.dtype)
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        if forced_expert is not None:
            expert_TK = forced_expert
        else:
            score_TE = probs_TE if self.expert_bias is None else probs_TE + self.expert_bias
            expert_TK = torch.topk(score_TE.detach(), self.top_k, dim=-1).indices
        weight_TK = probs_TE.gather(1, expert_TK.clamp(0, self.num_experts - 1))
        if self.normalize:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        aux_loss = self._aux_loss(probs_TE, expert_TK)
        return RouterOutput(expert_TK, weight_TK.to(x.dtype), probs_TE, aux_loss)

    def _lean(
        self, logits_TE: torch.Tensor, forced_expert: torch.Tensor | None, dtype: torch.dtype
    ) -> RouterOutput:
        """The same gates from the K chosen logits only: with normalized gates, p_k / sum_j p_j =
        softmax over the chosen logits, and softmax is monotone, so top-k of the logits picks
        what top-k of the probabilities picks. No [T, E] float32 tensor either way."""
        if forced_expert is not None:  # clamped inside: bad ids are refused when counts are read
            expert_TK = forced_expert
        else:
            expert_TK = torch.topk(logits_TE.detach(), self.top_k, dim=-1).indices
        weight_TK = chosen_softmax(logits_TE, expert_TK, dtype)  # one fused kernel each way on CUDA
        return RouterOutput(expert_TK, weight_TK, None, _zero(logits_TE.device))

    def _aux_loss(self, probs_TE: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
        if self.aux_loss_coef == 0 or probs_TE.shape[0] == 0:
            return probs_TE.new_zeros(())
        e = self.num_experts
        flat = expert_TK.reshape(-1).clamp(0, e - 1).long()
        frac_E = probs_TE.new_zeros(e).scatter_add_(0, flat, probs_TE.new_ones(flat.shape)) / flat.numel()
        return self.aux_loss_coef * e * (frac_E * probs_TE.mean(dim=0)).sum()

    @torch.no_grad()
    def update_expert_bias(self, load: torch.Tensor, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.

        Args:
            load: [E] tokens per expert (summed over the data-parallel group, so every rank
                applies the same update).
            rate: step size.
        """
        if self.expert_bias is None:
            raise ValueError("this router was built with expert_bias=False")
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias += rate * torch.sign(load.mean() - load)
