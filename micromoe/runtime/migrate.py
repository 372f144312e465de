"""Expert migration: move one MoE layer to a new placement, weights and optimizer state together.

Adaptive replacement changes which expert sits in which local slot. Legend: W world size, G GPUs
of a MicroEP group, S local slots per GPU, E experts. Both placements have the same G, S and E.
An expert's *bundle* is its slot of every expert parameter (`w_gate_up`, `w_down`) and of every
optimizer-state tensor shaped like that parameter (AdamW's `exp_avg`, `exp_avg_sq`), as raw bytes.
Scalar state (AdamW's `step`) belongs to the whole parameter and does not move; it must agree on
every rank.

`migrate_layer` runs these steps, every collective in the same order on every rank:
1. local validation, then [collective, world] an all-gather of a small agreement record
   (error flag, placement hash, bundle size, optimizer step): a bad call raises ValueError on every
   rank before any group is created or any byte moves;
2. [collective, world] `dist.new_group` for the replica groups of the new placement that do not
   exist yet, in the new placement's collective order;
3. the transfer plan (NumPy, identical on every rank): a GPU that already holds an expert copies it
   between its own slots; otherwise it takes the bundle from one host of the old placement in its
   MicroEP group, the one with the fewest sends so far (ties: lowest GPU id);
4. [collective, MicroEP group] one all-to-all of bundle bytes;
5. the new slot contents are written into the existing tensors with `copy_`, so the optimizer's
   parameter-keyed state and any outside reference stay valid; gradients are dropped;
6. the layer gets a new dispatcher for the new placement;
7. [collective, world] an all-gather of per-slot checksums; a replica group whose copies differ is
   re-broadcast from its lowest rank [collective, that replica group]. A correct migration never
   needs it; the count is in the stats.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from micromoe.plan import Placement
from micromoe.runtime.comm import all_gather_counts
from micromoe.runtime.dispatch_microep import MicroEPDispatcher
from micromoe.runtime.groups import ProcessGroups, ReplicaGroup
from micromoe.runtime.layer import MoELayer
from micromoe.runtime.timeouts import world_timeout

GroupCache = dict[tuple[int, ...], "dist.ProcessGroup | None"]
_PARAMS = ("w_gate_up", "w_down")


@dataclass(frozen=True)
class MigrationStats:
    """What one layer migration cost.

    Attributes:
        bytes_moved: bundle bytes sent between ranks, summed over the world (weights + state).
        bytes_local: bundle bytes copied to another slot of the same rank, summed over the world.
        num_transfers: replicas received from another rank, summed over the world.
        num_resynced: replica groups whose copies differed after the move and were re-broadcast
            (0 on a correct migration).
        ms: this rank's wall time for the whole migration, in milliseconds (device synchronized).
    """

    bytes_moved: int
    bytes_local: int
    num_transfers: int
    num_resynced: int
    ms: float


@dataclass(frozen=True)
class TransferPlan:
    """Where every non-empty slot of the new placement takes its bundle from, inside one MicroEP
    group. All arrays are int64 [N], sorted by (dst_gpu, dst_slot); src_gpu == dst_gpu marks a
    local copy."""

    expert: npt.NDArray[np.int64]
    src_gpu: npt.NDArray[np.int64]
    src_slot: npt.NDArray[np.int64]
    dst_gpu: npt.NDArray[np.int64]
    dst_slot: npt.NDArray[np.int64]

    @property
    def remote(self) -> npt.NDArray[np.bool_]:
        return self.src_gpu != self.dst_gpu


def plan_transfers(old: Placement, new: Placement) -> TransferPlan:
    """The deterministic transfer plan from `old` to `new` (same G, S, E; checked by the caller).

    A GPU keeping an expert copies it locally; otherwise the sender is the old host of that expert
    with the fewest sends so far (ties: lowest GPU id), which spreads the sends of hot experts.
    """
    sends = np.zeros(old.num_gpus, dtype=np.int64)
    rows = []
    for g in range(new.num_gpus):
        old_row = old.slot_expert[g]
        for j, e in enumerate(new.slot_expert[g]):
            if e < 0:
                continue
            local = np.flatnonzero(old_row == e)
            if local.size:
                rows.append((e, g, int(local[0]), g, j))
                continue
            hosts = old.hosts(int(e))
            src = int(hosts[np.argmin(sends[hosts])])  # argmin: first (lowest id) among ties
            sends[src] += 1
            rows.append((e, src, int(old.expert_slot[e]), g, j))
    a = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return TransferPlan(a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4])


def migrate_layer(
    layer: MoELayer,
    groups: ProcessGroups,
    placement: Placement,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    group_cache: GroupCache | None = None,
) -> tuple[ProcessGroups, MigrationStats]:
    """Move `layer` (sharded by `groups`, MicroEP dispatcher) to `placement`. Collective (world).

    Every rank calls it with the same `placement`. The expert parameters and their optimizer state
    are rewritten in place; the layer's dispatcher is replaced.

    Args:
        layer: an expert-parallel MoE layer built by `apply_expert_parallel(..., "microep")`.
        groups: its current process groups (`groups.placement` is the old placement).
        placement: the new placement: same GPUs, local slots and experts as the old one.
        optimizer: the optimizer holding the expert parameters, whose per-parameter state tensors
            shaped like the parameter move with them (None: move weights only).
        group_cache: replica groups by rank tuple, reused and extended (keep one per training run
            so repeated migrations do not create duplicate groups); None: reuse `groups`' only.

    Returns:
        (the new ProcessGroups: use them for this layer's gradient sync from now on, stats).
    Raises ValueError on every rank, before any data moves, if any rank's arguments are invalid.
    """
    t0 = time.perf_counter()
    tensors, problem = _bundle_tensors(layer, groups, placement, optimizer)
    device = layer.experts.w_down.device
    bundle_bytes = sum(t[0].numel() * t.element_size() for t in tensors) if not problem else 0
    _agree(problem, placement, bundle_bytes, _optimizer_step(layer, optimizer), groups, device)
    new_groups = _new_groups(groups, placement, group_cache)
    plan = plan_transfers(groups.placement, placement)
    _move_bundles(tensors, plan, groups)
    for p in layer.experts.parameters():
        p.grad = None  # gradients of the old slot layout are meaningless now
    layer.dispatcher = _rebuild_dispatcher(layer, new_groups)
    resynced = _verify_replicas(tensors, new_groups, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: the timing covers the device work
    num_groups = groups.layout.num_microep_groups
    remote = int(plan.remote.sum())
    stats = MigrationStats(
        bytes_moved=remote * bundle_bytes * num_groups,
        bytes_local=int((~plan.remote & (plan.src_slot != plan.dst_slot)).sum()) * bundle_bytes * num_groups,
        num_transfers=remote * num_groups,
        num_resynced=resynced,
        ms=(time.perf_counter() - t0) * 1e3,
    )
    return new_groups, stats


# ------------------------------------------------------------------------------------------------
# validation and agreement


def _bundle_tensors(
    layer: MoELayer, groups: ProcessGroups, placement: Placement, optimizer: torch.optim.Optimizer | None
) -> tuple[list[torch.Tensor], str]:
    """(the [S, ...] tensors that form a bundle, in a fixed order; '' or what is wrong)."""
    old = groups.placement
    if not isinstance(placement, Placement):
        return [], f"placement must be a micromoe.plan.Placement, got {type(placement).__name__}"
    if not isinstance(layer.dispatcher, MicroEPDispatcher):
        return [], (
            f"only a MicroEP layer can migrate; this layer's dispatcher is "
            f"{type(layer.dispatcher).__name__}: apply_expert_parallel(layer, groups, 'microep') first"
        )
    if layer.dispatcher.placement != old:
        return [], "the layer's dispatcher placement differs from groups.placement: pass the layer's groups"
    if (placement.num_gpus, placement.slots_per_gpu, placement.num_experts) != (
        old.num_gpus,
        old.slots_per_gpu,
        old.num_experts,
    ):
        return [], (
            f"the new placement has (GPUs, slots, experts) = ({placement.num_gpus}, {placement.slots_per_gpu}, "
            f"{placement.num_experts}) but the old one ({old.num_gpus}, {old.slots_per_gpu}, {old.num_experts}); "
            "build it with Placement.asymmetric(loads, num_gpus, slots_per_gpu) of the old placement"
        )
    ex = layer.experts
    params = [getattr(ex, name) for name in _PARAMS]
    if any(p.shape[0] != old.slots_per_gpu for p in params):
        return [], f"expert parameters have {params[0].shape[0]} slots, the placement {old.slots_per_gpu}"
    tensors = list(params)
    for p in params:
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for key in sorted(state):
            v = state[key]
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                if not v.is_contiguous():
                    return [], f"optimizer state {key!r} is not contiguous"
                tensors.append(v)
    if any(not t.is_contiguous() for t in tensors):
        return [], "expert parameters must be contiguous"
    return tensors, ""


def _optimizer_step(layer: MoELayer, optimizer: torch.optim.Optimizer | None) -> int:
    """The optimizer's step count of the expert parameters (-1: no state); -2 if they disagree."""
    if optimizer is None:
        return -1
    steps = set()
    for name in _PARAMS:
        v = optimizer.state.get(getattr(layer.experts, name), {}).get("step", -1)
        steps.add(int(v.item()) if isinstance(v, torch.Tensor) else int(v))  # host sync (a scalar)
    return steps.pop() if len(steps) == 1 else -2


def placement_hash(placement: Placement) -> int:
    """A signed 64-bit hash of the slot table (for cross-rank agreement checks)."""
    digest = hashlib.blake2b(placement.key(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _agree(
    problem: str,
    placement: Placement,
    bundle_bytes: int,
    step: int,
    groups: ProcessGroups,
    device: torch.device,
) -> None:
    """Raise ValueError on every rank unless all ranks are valid and agree on everything."""
    h = 0 if problem else placement_hash(placement)
    mine = torch.tensor([int(bool(problem)), h, bundle_bytes, step], dtype=torch.int64, device=device)
    # collective (world): the agreement record; host sync in wait()
    rec = all_gather_counts(mine, groups.dp).wait()
    bad = np.flatnonzero(rec[:, 0])
    if bad.size:
        where = f"this rank: {problem}" if problem else "see those ranks' messages"
        raise ValueError(f"expert migration refused on ranks {bad.tolist()} ({where}); nothing moved")
    for col, what in ((1, "placement"), (2, "expert bundle size"), (3, "optimizer step")):
        if np.any(rec[:, col] != rec[0, col]):
            raise ValueError(
                f"expert migration refused: ranks disagree on the {what} ({rec[:, col].tolist()}); "
                "every rank must pass the same placement and the same model/optimizer; nothing moved"
            )
    if rec[0, 3] == -2:
        raise ValueError("expert migration refused: w_gate_up and w_down have different optimizer steps")


# ------------------------------------------------------------------------------------------------
# groups, data movement, dispatcher


def _new_groups(groups: ProcessGroups, placement: Placement, cache: GroupCache | None) -> ProcessGroups:
    """ProcessGroups for `placement`, reusing the DP/EP/MicroEP groups and cached replica groups."""
    layout, rank = groups.layout, groups.rank
    if cache is None:
        cache = {}
    for rg in groups.replicas:
        cache.setdefault(rg.ranks, rg.group)
    replicas = []
    for expert, _ in placement.replica_groups():  # collective order: (slot, expert)
        ranks = tuple(layout.replica_ranks(placement, expert))
        if ranks not in cache:
            # collective (world): every rank creates the same new group in the same order
            group = dist.new_group(list(ranks), timeout=world_timeout())  # the world's timeout
            cache[ranks] = group if rank in ranks else None
        slot = int(placement.expert_slot[expert])
        replicas.append(ReplicaGroup(expert, slot, ranks, cache[ranks]))
    return ProcessGroups(
        layout=layout,
        placement=placement,
        rank=rank,
        dp=groups.dp,
        microep=groups.microep,
        replicas=tuple(replicas),
    )


def _rebuild_dispatcher(layer: MoELayer, groups: ProcessGroups) -> MicroEPDispatcher:
    old = layer.dispatcher
    new = MicroEPDispatcher(
        groups.microep,
        groups.microep_rank,
        groups.placement,
        gpus_per_node=old.gpus_per_node,
        timer=old.timer,
        cost_model=old.cost_model,  # the new placement is planned with the same time model
    )
    return new


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[S, ...] contiguous -> uint8 [S, bytes per slot] (a view)."""
    return t.view(t.shape[0], -1).view(torch.uint8)


@torch.no_grad()
def _move_bundles(tensors: list[torch.Tensor], plan: TransferPlan, groups: ProcessGroups) -> None:
    me, size = groups.microep_rank, groups.layout.microep_size
    views = [_as_bytes(t) for t in tensors]
    send_mask = plan.remote & (plan.src_gpu == me)
    recv_mask = plan.remote & (plan.dst_gpu == me)
    # plan rows are sorted by (dst_gpu, dst_slot): the same order on both sides of every pair
    send_slots = plan.src_slot[send_mask]
    send_counts = np.bincount(plan.dst_gpu[send_mask], minlength=size)
    recv_order = np.lexsort((plan.dst_slot[recv_mask], plan.src_gpu[recv_mask]))
    recv_slots = plan.dst_slot[recv_mask][recv_order]
    recv_counts = np.bincount(plan.src_gpu[recv_mask], minlength=size)
    device = views[0].device
    idx = torch.from_numpy(send_slots).to(device)
    send = torch.cat([v.index_select(0, idx) for v in views], dim=1) if idx.numel() else None
    width = sum(v.shape[1] for v in views)
    recv = views[0].new_empty((int(recv_counts.sum()), width))
    send = send if send is not None else views[0].new_empty((0, width))
    # collective (MicroEP group): every rank sends the bundles it hosts to their new GPUs
    dist.all_to_all_single(
        recv,
        send,
        recv_counts.tolist(),
        send_counts.tolist(),
        group=groups.microep,
    )
    local = ~plan.remote & (plan.dst_gpu == me)
    src_local = torch.from_numpy(plan.src_slot[local]).to(device)
    dst_local = torch.from_numpy(plan.dst_slot[local]).to(device)
    dst_recv = torch.from_numpy(recv_slots).to(device)
    offset = 0
    for v in views:
        new = torch.zeros_like(v)  # empty slots hold zeros, as after apply_expert_parallel
        new.index_copy_(0, dst_local, v.index_select(0, src_local))
        new.index_copy_(0, dst_recv, recv[:, offset : offset + v.shape[1]])
        v.copy_(new)  # in place: same storage, same Parameter / state tensor objects
        offset += v.shape[1]


def _slot_checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """int64 [S, 2]: a word sum and a position-weighted word sum per slot over all tensors (equal
    bytes give equal sums; int64 arithmetic wraps alike on every rank). Words are the widest
    integer view the slot's byte count allows; temporaries stay one slot big."""
    sums = torch.zeros((tensors[0].shape[0], 2), dtype=torch.int64, device=tensors[0].device)
    for t in tensors:
        b = _as_bytes(t)
        width = b.shape[1]
        words = b.view(torch.int64) if width % 8 == 0 else b.view(torch.int32) if width % 4 == 0 else b
        weight = torch.arange(words.shape[1], device=b.device, dtype=torch.int64) % 65521 + 1
        for j in range(words.shape[0]):
            w = words[j].to(torch.int64)  # a no-op view for int64 words
            sums[j, 0] += w.sum()
            sums[j, 1] += (w * weight).sum()
    return sums


@torch.no_grad()
def _verify_replicas(tensors: list[torch.Tensor], groups: ProcessGroups, device: torch.device) -> int:
    """Compare every replica group's copies by checksum; re-broadcast any that differ."""
    sums = _slot_checksums(tensors)
    # collective (world): everyone's per-slot checksums; host sync in wait()
    table = all_gather_counts(sums.reshape(-1), groups.dp).wait().reshape(groups.layout.world_size, -1, 2)
    resynced = 0
    for rg in groups.replicas:  # collective order, identical on every rank
        rows = table[list(rg.ranks), rg.slot]
        if np.all(rows == rows[0]):
            continue
        resynced += 1
        if rg.group is None:
            continue
        for t in tensors:
            # collective (replica group of rg.expert): the lowest rank's copy wins
            dist.broadcast(t[rg.slot], src=rg.ranks[0], group=rg.group)
    return resynced
