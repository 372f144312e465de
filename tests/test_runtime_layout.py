"""ParallelLayout validation and rank arithmetic; row layouts of dispatches (pure, no processes)."""

from __future__ import annotations

import numpy as np
import pytest

from micromoe.plan import Placement, schedule
from micromoe.runtime.layout import ParallelLayout
from micromoe.runtime.routing import RankRoute, expand_ranges, plain_ep_route, planned_route, row_layout


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
    """Run every rank's layout through a NumPy all-to-all of (src, expert, k) labels."""
    g, e = counts.shape
    layouts = [row_layout(routes[r], g, placement.slot_expert[r], e, align) for r in range(g)]
    sent = []
    for r, lay in enumerate(layouts):
        sorted_rows = [(r, ex, i) for ex in range(e) for i in range(counts[r, ex])]
        order = np.arange(len(sorted_rows)) if lay.send_pos is None else lay.send_pos
        if lay.send_pos is not None:  # the inverse map the backward pass uses
            inv = expand_ranges(lay.inv_start, lay.inv_count)
            np.testing.assert_array_equal(inv[lay.send_pos], np.arange(len(sorted_rows)))
        rows = [sorted_rows[i] for i in order]
        blocks, start = [], 0
        for n in lay.send_splits:
            blocks.append(rows[start : start + n])
            start += n
        sent.append(blocks)
    grouped = []
    for r, lay in enumerate(layouts):
        recv = [row for src in range(g) for row in sent[src][r]]
        assert [len(sent[src][r]) for src in range(g)] == list(lay.recv_splits)
        buf = [None] * lay.num_grouped
        for row, pos in zip(recv, lay.group_pos, strict=True):
            assert buf[pos] is None
            buf[pos] = row
        grouped.append(buf)
    return layouts, grouped


@pytest.mark.parametrize("gpus_per_node", [None, 2])
@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("seed", range(6))
def test_row_layout_delivers_every_row_once_to_its_expert(seed, align, gpus_per_node):
    rng = np.random.default_rng(seed)
    placement = [Placement.symmetric(4, 8, 2), Placement.random(8, 16, 2, seed=seed)][seed % 2]
    g, e = placement.num_gpus, placement.num_experts
    counts = rng.integers(0, 12, size=(g, e)) * (rng.random((g, e)) < 0.8)
    counts[:, 0] += rng.integers(0, 40, size=g)  # a hot expert
    plan = schedule(counts, placement, gpus_per_node=gpus_per_node)
    layouts, grouped = _simulate([planned_route(plan, r) for r in range(g)], placement, counts, align)
    delivered = []
    for r, (lay, buf) in enumerate(zip(layouts, grouped, strict=True)):
        assert np.all(lay.slot_rows % align == 0)
        start = 0
        for j, ex in enumerate(placement.slot_expert[r]):
            block = buf[start : start + lay.slot_rows[j]]
            real = block[: lay.slot_load[j]]
            assert all(row is not None and row[1] == ex for row in real)
            assert all(row is None for row in block[lay.slot_load[j] :])  # padding
            if ex >= 0:
                assert lay.slot_load[j] == plan.quota[ex, r]
            delivered += real
            start += lay.slot_rows[j]
    want = [(r, ex, i) for r in range(g) for ex in range(e) for i in range(counts[r, ex])]
    assert sorted(delivered) == sorted(want)


def test_plain_ep_route_is_already_in_send_order():
    placement = Placement.expert_parallel(4, 8, 1)
    counts = np.arange(32).reshape(4, 8) % 5
    routes = [plain_ep_route(counts, placement, r) for r in range(4)]
    layouts, grouped = _simulate(routes, placement, counts, 1)
    assert all(lay.send_pos is None for lay in layouts)
    for r, buf in enumerate(grouped):  # every row of every source reaches the expert's host
        want = [(s, ex, i) for s in range(4) for ex in placement.experts_on(r) for i in range(counts[s, ex])]
        assert sorted(buf) == sorted(want)
    with pytest.raises(ValueError, match="exactly one replica"):
        plain_ep_route(counts, Placement.symmetric(4, 8, 2), 0)
