"""ParallelLayout validation and rank arithmetic; row maps of dispatches (pure, no processes)."""

from __future__ import annotations

import numpy as np
import pytest

from micromoe.plan import Placement, schedule
from micromoe.runtime.layout import ParallelLayout
from micromoe.runtime.rows import (
    RankRoute,
    expand_ranges,
    local_row_map,
    plain_ep_route,
    planned_route,
    rank_row_map,
)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((8, 4, 2, 1), "must equal the world size"),
        ((8, 8, 3, 1), "EP=3 must divide DP=8"),
        ((4, 4, 4, 2), "needs DP > EP"),
        ((8, 8, 2, 3), "must divide the world size 8"),
        ((8, 8, 0, 1), "ep must be a positive integer"),
        ((8, 8, 2, True), "merge must be a positive integer"),
        ((8.0, 8, 2, 1), "world_size must be a positive integer"),
    ],
)
def test_layout_rejects_impossible_combinations(args, match):
    with pytest.raises(ValueError, match=match):
        ParallelLayout(*args)


def test_layout_accepts_numpy_integers_like_placement():
    lay = ParallelLayout(np.int64(8), np.int64(8), np.int32(2), np.int64(2))
    assert lay == ParallelLayout(8, 8, 2, 2)
    assert all(type(v) is int for v in (lay.world_size, lay.dp, lay.ep, lay.merge))
    Placement.symmetric(np.int64(4), np.int64(8), np.int64(2))  # the planner accepts them too
    with pytest.raises(ValueError, match="merge must be a positive integer"):
        ParallelLayout(8, 8, 2, np.bool_(True))


def test_layout_groups():
    lay = ParallelLayout(8, 8, 2, 2)
    assert lay.microep_size == 4 and lay.num_microep_groups == 2
    assert lay.ep_group_ranks() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.microep_group_ranks() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [lay.microep_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    p = Placement.symmetric(4, 8, 2)
    for e in range(8):
        hosts = [int(h) for h in p.hosts(e)]
        assert lay.replica_ranks(p, e) == hosts + [h + 4 for h in hosts]
    with pytest.raises(ValueError, match="d\\*EP = 2\\*2 = 4"):
        lay.check_placement(Placement.symmetric(8, 16, 2))
    with pytest.raises(ValueError, match="rank 8 out of range"):
        lay.microep_rank(8)


def _simulate(routes: list[RankRoute], placement: Placement, counts: np.ndarray, align: int):
    """Run every rank's row map through a NumPy all-to-all of (src, expert, k) labels."""
    g, e = counts.shape
    row_maps = [rank_row_map(routes[r], g, placement.slot_expert[r], e, align) for r in range(g)]
    sent = []
    for r, rm in enumerate(row_maps):
        sorted_rows = [(r, ex, i) for ex in range(e) for i in range(counts[r, ex])]
        order = np.arange(len(sorted_rows)) if rm.send_pos is None else rm.send_pos
        if rm.send_pos is not None:  # the inverse map the backward pass uses
            inv = expand_ranges(rm.inv_start, rm.inv_count)
            np.testing.assert_array_equal(inv[rm.send_pos], np.arange(len(sorted_rows)))
        rows = [sorted_rows[i] for i in order]
        blocks, start = [], 0
        for n in rm.send_splits:
            blocks.append(rows[start : start + n])
            start += n
        sent.append(blocks)
    grouped = []
    for r, rm in enumerate(row_maps):
        recv = [row for src in range(g) for row in sent[src][r]]
        assert [len(sent[src][r]) for src in range(g)] == list(rm.recv_splits)
        buf = [None] * rm.num_grouped
        for row, pos in zip(recv, rm.group_pos, strict=True):
            assert buf[pos] is None
            buf[pos] = row
        grouped.append(buf)
    return row_maps, grouped


@pytest.mark.parametrize("gpus_per_node", [None, 2])
@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("seed", range(6))
def test_row_map_delivers_every_row_once_to_its_expert(seed, align, gpus_per_node):
    rng = np.random.default_rng(seed)
    placement = [Placement.symmetric(4, 8, 2), Placement.random(8, 16, 2, seed=seed)][seed % 2]
    g, e = placement.num_gpus, placement.num_experts
    counts = rng.integers(0, 12, size=(g, e)) * (rng.random((g, e)) < 0.8)
    counts[:, 0] += rng.integers(0, 40, size=g)  # a hot expert
    plan = schedule(counts, placement, gpus_per_node=gpus_per_node)
    row_maps, grouped = _simulate([planned_route(plan, r) for r in range(g)], placement, counts, align)
    delivered = []
    for r, (rm, buf) in enumerate(zip(row_maps, grouped, strict=True)):
        assert np.all(rm.slot_rows % align == 0)
        start = 0
        for j, ex in enumerate(placement.slot_expert[r]):
            block = buf[start : start + rm.slot_rows[j]]
            real = block[: rm.slot_load[j]]
            assert all(row is not None and row[1] == ex for row in real)
            assert all(row is None for row in block[rm.slot_load[j] :])  # padding
            if ex >= 0:
                assert rm.slot_load[j] == plan.quota[ex, r]
            delivered += real
            start += rm.slot_rows[j]
    want = [(r, ex, i) for r in range(g) for ex in range(e) for i in range(counts[r, ex])]
    assert sorted(delivered) == sorted(want)


def test_plain_ep_route_is_already_in_send_order():
    placement = Placement.expert_parallel(4, 8, 1)
    counts = np.arange(32).reshape(4, 8) % 5
    routes = [plain_ep_route(counts, placement, r) for r in range(4)]
    row_maps, grouped = _simulate(routes, placement, counts, 1)
    assert all(rm.send_pos is None for rm in row_maps)
    for r, buf in enumerate(grouped):  # every row of every source reaches the expert's host
        want = [(s, ex, i) for s in range(4) for ex in placement.experts_on(r) for i in range(counts[s, ex])]
        assert sorted(buf) == sorted(want)
    with pytest.raises(ValueError, match="exactly one replica"):
        plain_ep_route(counts, Placement.symmetric(4, 8, 2), 0)


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("seed", range(4))
def test_local_row_map_is_the_one_gpu_plain_ep_map(seed, align):
    """The single-device map equals the all-to-all map of a 1-GPU EP group (independent code)."""
    rng = np.random.default_rng(seed)
    e = int(rng.integers(1, 12))
    counts = rng.integers(0, 20, size=e) * (rng.random(e) < 0.7)
    placement = Placement.expert_parallel(1, e, 1)
    want = rank_row_map(plain_ep_route(counts[None], placement, 0), 1, placement.slot_expert[0], e, align)
    got = local_row_map(counts, align)
    assert got.send_pos is None and got.send_splits == got.recv_splits == (int(counts.sum()),)
    np.testing.assert_array_equal(got.slot_load, want.slot_load)
    np.testing.assert_array_equal(got.slot_rows, want.slot_rows)
    np.testing.assert_array_equal(got.group_pos, want.group_pos)
