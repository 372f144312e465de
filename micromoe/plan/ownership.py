"""Expert ownership: which GPU of a MicroEP group keeps each expert's master weights, and the
gather table that brings slot copies from their owners.

Every expert is *owned* by exactly one GPU of the group: the owner holds its master weights and
optimizer state; the replica slots of the placement are working copies sent from the owner before
the expert GEMMs, and their gradients go back to it. Ownership is chosen once from a placement and
then kept: a new placement is only a new gather table, so no optimizer state ever moves.

Legend: G GPUs of the group, E experts, S local slots per GPU, P numbers per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from micromoe.plan.slot_layout import SlotLayout

IntArray = npt.NDArray[np.int64]


def expert_owners(placement: SlotLayout) -> IntArray:
    """int64 [E]: the owning GPU of every expert; deterministic (every rank computes the same).

    Each GPU owns at most ceil(E / G) experts, and as many experts as possible are owned by one of
    their own hosts (a maximum bipartite b-matching, found by augmenting paths in a fixed order):
    then the owner's copy is a local cast, not a transfer. An expert no host can take (more
    experts crowd onto fewer GPUs than their capacity) goes to the GPU that owns the fewest so far,
    lowest id first.
    """
    g, e = placement.num_gpus, placement.num_experts
    cap = -(-e // g)
    hosts = [placement.hosts(x).tolist() for x in range(e)]
    owner = np.full(e, -1, dtype=np.int64)
    owned: list[list[int]] = [[] for _ in range(g)]
    for x in range(e):
        _take(x, hosts, owner, owned, cap, set())
    for x in np.flatnonzero(owner < 0):
        gpu = min(range(g), key=lambda q: (len(owned[q]), q))
        owner[x] = gpu
        owned[gpu].append(int(x))
    return owner


def _take(
    x: int, hosts: list[list[int]], owner: IntArray, owned: list[list[int]], cap: int, seen: set
) -> bool:
    """Kuhn's augmenting path for the b-matching: give expert x one of its hosts, moving an expert
    that host owns to another of that expert's hosts when the host is full. `seen`: hosts already
    on the path."""
    for gpu in hosts[x]:
        if gpu in seen:
            continue
        seen.add(gpu)
        if len(owned[gpu]) >= cap:
            moved = next((y for y in list(owned[gpu]) if _take(y, hosts, owner, owned, cap, seen)), None)
            if moved is None:
                continue
            owned[gpu].remove(moved)
        owner[x] = gpu
        owned[gpu].append(x)
        return True
    return False


@dataclass(frozen=True)
class GatherTable:
    """One GPU's part of filling its slots from the owners (and of returning slot gradients).

    Attributes:
        owned: int64 [E_own]; the experts this GPU owns, ascending (its master rows, in order).
        send_index: int64 [N_send]; rows of `owned` to send, grouped by destination GPU (ascending)
            and, inside a destination, by its slot index.
        send_splits: int64 [G]; rows sent to each GPU (itself included).
        recv_slot: int64 [N_recv]; the local slot each received row fills, grouped by source GPU
            (ascending), inside a source by slot index. Empty slots receive nothing.
        recv_splits: int64 [G]; rows received from each GPU.
        num_slots: S.
        gpu: this GPU's index in the group.
    """

    owned: IntArray
    send_index: IntArray
    send_splits: IntArray
    recv_slot: IntArray
    recv_splits: IntArray
    num_slots: int
    gpu: int

    @property
    def local_only(self) -> bool:
        """Whether every slot comes from this GPU's own masters (no transfer at all)."""
        others = np.arange(self.send_splits.size) != self.gpu
        return not (self.send_splits[others].any() or self.recv_splits[others].any())


def gather_table(placement: SlotLayout, owners: IntArray, gpu: int) -> GatherTable:
    """The gather table of GPU `gpu` for `placement` under `owners` (from `expert_owners`, possibly
    of an earlier placement: ownership does not follow re-placements)."""
    g, s = placement.num_gpus, placement.slots_per_gpu
    owners = np.asarray(owners, dtype=np.int64)
    if owners.shape != (placement.num_experts,) or owners.min(initial=0) < 0 or owners.max(initial=0) >= g:
        raise ValueError(f"owners must be int [E={placement.num_experts}] of GPU ids in [0, {g})")
    if not 0 <= gpu < g:
        raise ValueError(f"gpu {gpu} out of range for {g} GPUs")
    owned = np.flatnonzero(owners == gpu).astype(np.int64)
    row_of = {int(x): i for i, x in enumerate(owned)}
    slots = placement.slot_expert
    send_index, send_splits = [], np.zeros(g, dtype=np.int64)
    for dst in range(g):
        for x in slots[dst]:
            if x >= 0 and owners[x] == gpu:
                send_index.append(row_of[int(x)])
                send_splits[dst] += 1
    mine = slots[gpu]
    recv_slot, recv_splits = [], np.zeros(g, dtype=np.int64)
    for src in range(g):
        for j, x in enumerate(mine):
            if x >= 0 and owners[x] == src:
                recv_slot.append(j)
                recv_splits[src] += 1
    return GatherTable(
        owned=owned,
        send_index=np.asarray(send_index, dtype=np.int64),
        send_splits=send_splits,
        recv_slot=np.asarray(recv_slot, dtype=np.int64),
        recv_splits=recv_splits,
        num_slots=s,
        gpu=gpu,
    )
