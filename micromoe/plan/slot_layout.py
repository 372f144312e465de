"""Slot layouts: which expert sits in which local slot of which GPU of a MicroEP group.

A `SlotLayout` is the validated value type (the slot table and its replica CSR lists); `Placement`
(in `placement.py`) is the same type with its named builders. In `micromoe.plan` "layout" always
means this slot table.

Legend: G = GPUs in the group, E = experts, S = local slots per GPU, R = total replicas (the
non-empty slots). A *replica* is one (GPU, slot) holding an expert; replicas are numbered expert by
expert, and within an expert by ascending GPU id (`host_ptr`/`host_gpu` is that CSR list).

The local-slot rule: all replicas of an expert sit at the same slot index on every GPU that holds
it, so the collectives over replica groups are entered in the same order on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import IntArray, positive_int

Self = TypeVar("Self", bound="SlotLayout")


@dataclass(frozen=True, eq=False)
class SlotLayout:
    """Replica layout of one MoE layer over a MicroEP group (validated at construction).

    Attributes:
        slot_expert: int64 [G, S]; `slot_expert[g, j]` is the expert in local slot j of GPU g, -1
            for an empty slot. Read-only.
        num_experts: E. Every expert in range(E) has at least one replica.
        host_ptr, host_gpu: CSR of replicas by expert: GPUs holding expert e are
            `host_gpu[host_ptr[e]:host_ptr[e+1]]`, ascending.
        replica_slot: int64 [R]; the slot index of each replica (same for all replicas of an expert).
        gpu_ptr, gpu_replica: CSR of replicas by GPU, in slot order.
        replica_expert: int64 [R]; the expert of each replica.
    """

    slot_expert: IntArray
    num_experts: int
    host_ptr: IntArray = field(repr=False)
    host_gpu: IntArray = field(repr=False)
    replica_slot: IntArray = field(repr=False)
    gpu_ptr: IntArray = field(repr=False)
    gpu_replica: IntArray = field(repr=False)
    replica_expert: IntArray = field(repr=False)

    # ----------------------------------------------------------------------------------------
    # construction and validation
    @classmethod
    def from_slots(cls: type[Self], slot_expert: npt.ArrayLike, num_experts: int | None = None) -> Self:
        """Build and validate a placement from `slot_expert[g, j]` (-1 = empty slot).

        `num_experts` defaults to max id + 1; pass it to catch an expert that has no replica at
        the top of the id range. Raises ValueError naming the first rule broken.
        """
        try:
            slots = np.array(slot_expert, copy=True)
        except ValueError:  # numpy's "inhomogeneous shape": rows of different lengths
            raise ValueError(
                "slot_expert must be a rectangular 2-D [num_gpus, slots] array: every GPU needs the same "
                "number of slots (pad the shorter rows with -1, an empty slot)"
            ) from None
        if slots.ndim != 2 or slots.shape[0] < 1 or slots.shape[1] < 1:
            raise ValueError(
                f"slot_expert must be a non-empty 2-D [num_gpus, slots] array, got shape {slots.shape}"
            )
        if not np.issubdtype(slots.dtype, np.integer):
            if not (
                np.issubdtype(slots.dtype, np.floating)
                and np.all(np.isfinite(slots))
                and np.all(slots == np.round(slots))
            ):
                raise ValueError(f"slot_expert must hold integer expert ids, got dtype {slots.dtype}")
        slots = slots.astype(np.int64)
        if np.any(slots < -1):
            g, j = np.argwhere(slots < -1)[0]
            raise ValueError(
                f"slot_expert[{g}, {j}] = {slots[g, j]}: expert ids are >= 0 (-1 marks an empty slot)"
            )
        present = slots[slots >= 0]
        if num_experts is None:
            if present.size == 0:
                raise ValueError("slot_expert holds no expert at all")
            num_experts = int(present.max()) + 1
        num_experts = positive_int(num_experts, "num_experts")
        if present.size and present.max() >= num_experts:
            g, j = np.argwhere(slots >= num_experts)[0]
            raise ValueError(
                f"slot_expert[{g}, {j}] = {slots[g, j]} is out of range for {num_experts} experts"
            )
        _check_rules(slots, num_experts)
        slots.setflags(write=False)
        return cls(slot_expert=slots, num_experts=num_experts, **_csr(slots, num_experts))

    # ----------------------------------------------------------------------------------------
    # queries
    @property
    def num_gpus(self) -> int:
        return int(self.slot_expert.shape[0])

    @property
    def slots_per_gpu(self) -> int:
        return int(self.slot_expert.shape[1])

    @property
    def num_replicas_total(self) -> int:
        return int(self.host_gpu.size)

    @cached_property
    def graph(self) -> tuple[IntArray, IntArray, IntArray, IntArray, IntArray]:
        """The replica graph as the compiled kernels take it:
        (host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert)."""
        return (self.host_ptr, self.host_gpu, self.gpu_ptr, self.gpu_replica, self.replica_expert)

    @cached_property
    def replica_counts(self) -> IntArray:
        """int64 [E]: number of replicas of each expert."""
        return np.diff(self.host_ptr)

    @cached_property
    def expert_slot(self) -> IntArray:
        """int64 [E]: the local slot index every replica of expert e uses."""
        return self.replica_slot[self.host_ptr[:-1]]

    def hosts(self, expert: int) -> IntArray:
        """Sorted GPU ids holding `expert`."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range [0, {self.num_experts})")
        return self.host_gpu[self.host_ptr[expert] : self.host_ptr[expert + 1]].copy()

    def experts_on(self, gpu: int) -> IntArray:
        """Experts held by `gpu`, in local-slot order (empty slots skipped)."""
        row = self.slot_expert[gpu]
        return row[row >= 0].copy()

    def replica_groups(self) -> list[tuple[int, IntArray]]:
        """(expert, hosts) for every expert, ordered by (slot, expert): the collective order."""
        order = np.lexsort((np.arange(self.num_experts), self.expert_slot))
        return [(int(e), self.hosts(int(e))) for e in order]

    def key(self) -> bytes:
        """Bytes that identify the layout (for caches keyed by placement)."""
        return self.slot_expert.tobytes() + np.int64(self.slot_expert.shape[1]).tobytes()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SlotLayout):
            return NotImplemented
        return self.num_experts == other.num_experts and np.array_equal(self.slot_expert, other.slot_expert)

    def __hash__(self) -> int:
        return hash(self.key())


def _check_rules(slots: IntArray, num_experts: int) -> None:
    """Every expert has a replica, no expert twice on one GPU, the local-slot rule."""
    num_gpus = slots.shape[0]
    for g in range(num_gpus):
        row = slots[g][slots[g] >= 0]
        uniq, cnt = np.unique(row, return_counts=True)
        if np.any(cnt > 1):
            raise ValueError(
                f"expert {uniq[cnt > 1][0]} appears twice on GPU {g}; each GPU holds at most one replica of an expert"
            )
    gpus, cols = np.nonzero(slots >= 0)
    experts = slots[gpus, cols]
    count = np.bincount(experts, minlength=num_experts)
    if np.any(count == 0):
        missing = np.flatnonzero(count == 0)
        raise ValueError(
            f"expert {missing[0]} has no replica ({missing.size} expert(s) missing); every expert needs >= 1 replica"
        )
    slot_of = np.full(num_experts, -1, dtype=np.int64)
    for e, j, g in zip(experts, cols, gpus, strict=True):
        if slot_of[e] == -1:
            slot_of[e] = j
        elif slot_of[e] != j:
            raise ValueError(
                f"expert {e} sits in slot {slot_of[e]} on one GPU and slot {j} on GPU {g}: the local-slot rule "
                "needs every replica of an expert at the same slot index"
            )


def _csr(slots: IntArray, num_experts: int) -> dict[str, IntArray]:
    gpus, cols = np.nonzero(slots >= 0)  # row-major: by GPU, then slot
    experts = slots[gpus, cols]
    order = np.lexsort((gpus, experts))  # replicas by expert, then GPU
    host_gpu = gpus[order].astype(np.int64)
    replica_expert = experts[order].astype(np.int64)
    replica_slot = cols[order].astype(np.int64)
    host_ptr = np.zeros(num_experts + 1, dtype=np.int64)
    np.cumsum(np.bincount(replica_expert, minlength=num_experts), out=host_ptr[1:])
    # by GPU, in slot order: stable sort of replica ids by (gpu, slot)
    by_gpu = np.lexsort((replica_slot, host_gpu)).astype(np.int64)
    gpu_ptr = np.zeros(slots.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(host_gpu, minlength=slots.shape[0]), out=gpu_ptr[1:])
    out = dict(
        host_ptr=host_ptr,
        host_gpu=host_gpu,
        replica_slot=replica_slot,
        gpu_ptr=gpu_ptr,
        gpu_replica=by_gpu,
        replica_expert=replica_expert,
    )
    for a in out.values():
        a.setflags(write=False)
    return out
