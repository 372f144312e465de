"""Experts owned once per MicroEP group, their replica slots gathered for each use.

Each rank of a MicroEP group keeps the master weights (and, through the optimizer, the optimizer
state) of the experts it owns (`plan.ownership.expert_owners`). Before its expert GEMMs a layer
fills its S local slots with copies sent by the owners: one all-to-all with split sizes that
follow from the placement, so no count exchange (`_GatherSlots.forward`). In the backward the slot
gradients travel back the same way and are summed at the owner in float32 (`_GatherSlots.backward`):
one collective per layer each way instead of one per replica group. A new placement is a new
gather table; weights and optimizer state stay where they are.

The gather runs on its own process group over the MicroEP ranks (`ProcessGroups.gather`), so a
prefetched gather (issued by the previous MoE layer, `OwnedExperts.prefetch`) can run beside the
token all-to-alls. With `gather="step"` the slots are gathered once per optimizer step and their
gradients summed over the step's micro-batches before one return trip (`finish_gradients`).

Legend: E_own experts owned by this rank, S local slots, H hidden, F expert FFN hidden,
P = 3*H*F numbers per expert (gate_up, then down, flattened).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from micromoe.plan.ownership import GatherTable
from micromoe.runtime.experts import swiglu_experts

GatherMode = Literal["micro", "step"]


def _in_backward() -> bool:
    # a forward rerun by activation checkpointing inside the backward must not prefetch: the
    # prefetched gather would be consumed by no one
    return torch._C._current_graph_task_id() != -1


@dataclass
class _Pending:
    """A gather on its way: the received rows once `work` completes, and the master versions it
    read (a stale prefetch, made before an optimizer step, is discarded)."""

    work: dist.Work | None
    recv: torch.Tensor
    versions: tuple[int, int]


class OwnedExperts(nn.Module):
    """This rank's owned experts of one MoE layer and the gather of its local slots.

    Parameters (master weights, float32 in mixed precision):
        w_gate_up: [E_own, H, 2F] of the experts in `table.owned` (ascending ids).
        w_down: [E_own, F, H].

    Args:
        w_gate_up, w_down: the owned rows to take as masters.
        table: this rank's `GatherTable` for the current placement.
        group: the gather process group over the MicroEP ranks (None: one process, all local).
        compute_dtype: dtype of the slot copies the GEMMs use (None: the masters' dtype).
        gather: "micro" gathers per forward; "step" once per optimizer step (see module doc).
        owners: int64 [E], every expert's owner in the group (kept for later gather tables).
    """

    def __init__(
        self,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        table: GatherTable,
        group: dist.ProcessGroup | None,
        *,
        compute_dtype: torch.dtype | None = None,
        gather: GatherMode = "micro",
        owners: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if gather not in ("micro", "step"):
            raise ValueError(f"gather must be 'micro' or 'step', got {gather!r}")
        if w_gate_up.shape[0] != len(table.owned) or w_down.shape[0] != len(table.owned):
            raise ValueError(f"master rows {w_gate_up.shape[0]} != owned experts {len(table.owned)}")
        self.w_gate_up = nn.Parameter(w_gate_up.detach().clone().contiguous())
        self.w_down = nn.Parameter(w_down.detach().clone().contiguous())
        self.hidden, self.ffn_hidden = w_down.shape[2], w_down.shape[1]
        self.group = group
        self.owners = owners
        self.compute_dtype = compute_dtype
        self.gather = gather
        self.__dict__["_next"] = None  # the next MoE layer's experts (a reference, not a submodule)
        self._pending: _Pending | None = None
        self._step_slots: torch.Tensor | None = None  # "step": the step's gathered slots [S, P]
        self._step_grad: torch.Tensor | None = None  # "step": their summed gradients, float32
        self.set_table(table)

    # ------------------------------------------------------------------------------------------
    @property
    def next(self) -> OwnedExperts | None:
        """The next MoE layer's experts, whose gather this layer's forward starts early."""
        return self.__dict__["_next"]

    def set_next(self, other: OwnedExperts | None) -> None:
        """Prefetch `other`'s slots during this layer's forward (the next MoE layer)."""
        self.__dict__["_next"] = other  # bypasses nn.Module's registration: layers must not nest

    @property
    def owned(self) -> tuple[int, ...]:
        """Expert ids whose masters this rank holds (rows of the parameters, in order)."""
        return tuple(int(e) for e in self.table.owned)

    @property
    def num_slots(self) -> int:
        return self.table.num_slots

    def set_table(self, table: GatherTable) -> None:
        """Use a new gather table (a new placement); the owned experts must not change."""
        if hasattr(self, "table") and not np.array_equal(table.owned, self.table.owned):
            raise ValueError("a new gather table must keep this rank's owned experts")
        self.table = table
        self._index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending = self._step_slots = self._step_grad = None

    def _indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(send_index, recv_slot) as int64 tensors on the masters' device (made on first use:
        the module may be built on the meta device and allocated later)."""
        dev = self.w_down.device
        if dev not in self._index:
            self._index[dev] = (
                torch.from_numpy(self.table.send_index).to(dev),
                torch.from_numpy(self.table.recv_slot).to(dev),
            )
        return self._index[dev]

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.w_down.dtype

    def _versions(self) -> tuple[int, int]:
        return (self.w_gate_up._version, self.w_down._version)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _start_gather(self, *, async_op: bool) -> _Pending:
        """Send the owned masters (cast to the compute dtype) to the slots that host them."""
        t = self.table
        flat = torch.cat([self.w_gate_up.flatten(1), self.w_down.flatten(1)], dim=1)
        send = flat.index_select(0, self._indices()[0]).to(self.dtype)  # [N_send, P]
        if self.group is None or t.local_only:
            return _Pending(None, send, self._versions())  # all slots come from this rank
        recv = send.new_empty((int(t.recv_splits.sum()), send.shape[1]))
        # collective (gather group = MicroEP ranks): owners send slot copies, fixed split sizes
        work = dist.all_to_all_single(
            recv, send, t.recv_splits.tolist(), t.send_splits.tolist(), group=self.group, async_op=async_op
        )
        return _Pending(work if async_op else None, recv, self._versions())

    def prefetch(self) -> None:
        """Start this layer's gather now (asynchronously), unless one is already on its way or the
        step's slots are cached."""
        if self._pending is None and self._step_slots is None and not _in_backward():
            self._pending = self._start_gather(async_op=True)

    def _received(self) -> torch.Tensor:
        """The received rows [N_recv, P] of a fresh gather (the prefetched one if still valid)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.work is not None:
            pending.work.wait()  # the prefetch must finish even if stale: the group stays in step
        if pending is None or pending.versions != self._versions():
            pending = self._start_gather(async_op=False)
        return pending.recv

    def slot_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_gate_up [S, H, 2F], w_down [S, F, H]) of the local slots, in the compute dtype;
        differentiable into the masters (gradients summed at the owners, float32)."""
        flat = _GatherSlots.apply(self.w_gate_up, self.w_down, self)  # [S, P]
        h2f = self.hidden * 2 * self.ffn_hidden
        s = self.num_slots
        return flat[:, :h2f].view(s, self.hidden, 2 * self.ffn_hidden), flat[:, h2f:].view(
            s, self.ffn_hidden, self.hidden
        )

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor, *, offs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [N, H] slot-major, rows int [S] -> [N, H] in x's dtype; prefetches the next layer's slots."""
        w_gate_up, w_down = self.slot_weights()
        if self.next is not None:
            self.next.prefetch()  # runs beside this layer's GEMMs and the token all-to-alls
        return swiglu_experts(x.to(w_down.dtype), w_gate_up, w_down, rows, offs=offs).to(x.dtype)

    # ------------------------------------------------------------------------------------------
    def _slots_forward(self) -> torch.Tensor:
        """[S, P] slot copies in the compute dtype (zeros for empty slots)."""
        if self.gather == "step" and self._step_slots is not None:
            return self._step_slots
        recv = self._received()
        slots = recv.new_zeros((self.num_slots, recv.shape[1]))
        slots.index_copy_(0, self._indices()[1], recv)
        if self.gather == "step" and torch.is_grad_enabled():
            self._step_slots = slots
        return slots

    def _return_gradients(self, grad_SP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Send slot gradients [S, P] back to the owners; their sums as master-shaped float32."""
        t = self.table
        send_index, recv_slot = self._indices()
        rows = grad_SP.index_select(0, recv_slot).float()  # [N_recv, P]
        if self.group is None or t.local_only:
            back = rows
        else:
            back = rows.new_empty((int(t.send_splits.sum()), rows.shape[1]))
            # collective (gather group): slot gradients go back to their owners
            dist.all_to_all_single(
                back, rows.contiguous(), t.send_splits.tolist(), t.recv_splits.tolist(), group=self.group
            )
        summed = back.new_zeros((len(t.owned), back.shape[1])).index_add_(0, send_index, back)
        h2f = self.hidden * 2 * self.ffn_hidden
        return summed[:, :h2f].view_as(self.w_gate_up), summed[:, h2f:].view_as(self.w_down)

    def finish_gradients(self) -> None:
        """ "step" gathering: return the step's summed slot gradients to the owners (collective
        over the gather group; every rank calls it after its last backward of the step) and drop
        the cached slots. A no-op for "micro"."""
        grad, self._step_grad, self._step_slots = self._step_grad, None, None
        if self.gather != "step" or grad is None:
            return
        g_gate_up, g_down = self._return_gradients(grad)
        for p, g in ((self.w_gate_up, g_gate_up), (self.w_down, g_down)):
            g = g.to(p.dtype)
            p.grad = g if p.grad is None else p.grad.add_(g)


class _GatherSlots(torch.autograd.Function):
    """Masters -> slot copies [S, P]; backward: slot gradients summed at the owners."""

    @staticmethod
    def forward(ctx, w_gate_up, w_down, mod: OwnedExperts):  # type: ignore[override]
        ctx.mod = mod
        return mod._slots_forward()

    @staticmethod
    def backward(ctx, grad_SP):  # type: ignore[override]
        mod: OwnedExperts = ctx.mod
        if mod.gather == "step":  # summed over the micro-batches, returned by finish_gradients
            g = grad_SP.float()
            mod._step_grad = g if mod._step_grad is None else mod._step_grad.add_(g)
            return None, None, None
        g_gate_up, g_down = mod._return_gradients(grad_SP)
        return g_gate_up.to(mod.w_gate_up.dtype), g_down.to(mod.w_down.dtype), None
