"""The parallel layout: one validated object that says which ranks form which group.

Legend: W = world size, DP = data-parallel degree (dense parameters), EP = expert-parallel degree,
d = merge factor. Ranks are laid out contiguously: EP group i is ranks [i*EP, (i+1)*EP), MicroEP
group m is ranks [m*d*EP, (m+1)*d*EP) (d EP groups merged). With d = 1 the MicroEP group is the EP
group and MicroEP degenerates to plain EP.

Everything here is pure Python arithmetic (no torch.distributed): a layout is validated against the
world size *before* any process group exists, so a bad configuration fails identically on every
rank instead of hanging in a collective (torchtitan's ParallelDims does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

from micromoe.plan import Placement, positive_int


@dataclass(frozen=True)
class ParallelLayout:
    """World size, DP, EP and merge factor d, validated on construction.

    micromoe has no tensor or pipeline parallelism, so DP must equal the world size: every rank
    holds a full copy of the dense parameters and one shard of the expert slots.
    """

    world_size: int
    dp: int
    ep: int
    merge: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "dp", "ep", "merge"):  # stored as plain ints
            object.__setattr__(self, name, positive_int(getattr(self, name), name))
        w, dp, ep, d = self.world_size, self.dp, self.ep, self.merge
        if dp != w:
            raise ValueError(
                f"DP={dp} must equal the world size {w}: micromoe has no tensor/pipeline parallelism, "
                f"so set dp={w}"
            )
        if dp % ep:
            raise ValueError(f"EP={ep} must divide DP={dp}; pick EP from the divisors of {dp}")
        if d > 1 and dp <= ep:
            raise ValueError(
                f"merge factor d={d} > 1 needs DP > EP (experts must have copies in several EP groups "
                f"to merge); got DP={dp}, EP={ep}: use d=1 or a smaller EP"
            )
        if w % (d * ep):
            raise ValueError(
                f"d*EP = {d}*{ep} = {d * ep} GPUs per MicroEP group must divide the world size {w}; "
                f"valid d for EP={ep}: {[k for k in range(1, w // ep + 1) if w % (k * ep) == 0]}"
            )

    # ----------------------------------------------------------------------------------------
    @property
    def microep_size(self) -> int:
        """GPUs per MicroEP group (d*EP)."""
        return self.merge * self.ep

    @property
    def num_microep_groups(self) -> int:
        return self.world_size // self.microep_size

    def ep_group_ranks(self) -> list[list[int]]:
        """The plain EP groups: W/EP lists of EP consecutive ranks."""
        return _blocks(self.world_size, self.ep)

    def microep_group_ranks(self) -> list[list[int]]:
        """The MicroEP groups: W/(d*EP) lists of d*EP consecutive ranks."""
        return _blocks(self.world_size, self.microep_size)

    def dp_ranks(self) -> list[int]:
        """The one DP group for dense parameters: all ranks."""
        return list(range(self.world_size))

    def microep_rank(self, rank: int) -> int:
        """Position of `rank` inside its MicroEP group (the planner's GPU index)."""
        self._check_rank(rank)
        return rank % self.microep_size

    def replica_ranks(self, placement: Placement, expert: int) -> list[int]:
        """Global ranks holding a replica of `expert`: its hosts in every MicroEP group, ascending."""
        hosts = placement.hosts(expert)
        size = self.microep_size
        return [m * size + int(h) for m in range(self.num_microep_groups) for h in hosts]

    def check_placement(self, placement: Placement) -> None:
        """Raise ValueError unless `placement` describes one MicroEP group of this layout."""
        if not isinstance(placement, Placement):
            raise ValueError(f"placement must be a micromoe.plan.Placement, got {type(placement).__name__}")
        if placement.num_gpus != self.microep_size:
            raise ValueError(
                f"placement is for {placement.num_gpus} GPUs but the MicroEP group has d*EP = "
                f"{self.merge}*{self.ep} = {self.microep_size}; build it with num_gpus={self.microep_size}"
            )

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range for world size {self.world_size}")


def _blocks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, i + size)) for i in range(0, n, size)]
