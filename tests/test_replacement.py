"""Adaptive replacement in training (gloo, CPU, 4 processes): a small MoE transformer that
re-places its MoE layers against an identical model that never does.

Both models train two AdamW steps on the same data; the AR hook is fed Zipf-skewed counts so that
the symmetric placement scores above the threshold. Checks: every rank takes the same decisions
and logs when, why and at what cost; after the re-placement the model computes the same function;
no weight or optimizer byte moved (the owners keep the same tensors, bit-identical to the model
that never re-placed); the next training step gives the same loss and the same per-expert weights
as without the re-placement (float tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _dist import run_workers

from micromoe.model import ModelConfig, MoETransformer, parallelize_model
from micromoe.plan import Placement, placement_score
from micromoe.plan.cost import CostModel
from micromoe.runtime import (
    ParallelLayout,
    build_process_groups,
    sync_dense_gradients,
    sync_expert_gradients,
)
from micromoe.train.parallel import ParallelState
from micromoe.train.replacement import AdaptiveReplacement, NoReplacement, build_replacement

CFG = ModelConfig(
    vocab_size=32, seq_len=8, num_layers=2, hidden=16, num_heads=2, ffn_hidden=16, num_experts=8
)
BATCH, TOL = 3, 1e-5


def _build(rank: int, world: int) -> tuple[ParallelState, MoETransformer, torch.optim.Optimizer]:
    layout = ParallelLayout(world, world, 2, 2)
    groups = build_process_groups(layout, Placement.symmetric(4, CFG.num_experts, 2), rank)
    par = ParallelState(rank, world, torch.device("cpu"), layout, "microep", [groups] * CFG.num_moe_layers)
    torch.manual_seed(0)
    model = parallelize_model(MoETransformer(CFG), par.groups, "microep")
    return par, model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _tokens(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    idx = torch.randint(0, CFG.vocab_size, (BATCH, CFG.seq_len + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def _step(par: ParallelState, model, opt, step: int) -> float:
    """One optimizer step as the training loop takes it; returns the loss averaged over ranks."""
    x, y = _tokens(step, par.rank)
    _, loss, _ = model(x, y)
    loss.backward()
    experts = {id(p) for m in model.moe_layers() for p in m.experts.parameters()}
    sync_dense_gradients([p for p in model.parameters() if id(p) not in experts], par.groups[0])
    for layer, groups in zip(model.moe_layers(), par.groups, strict=True):
        sync_expert_gradients(layer.experts, groups)
    opt.step()
    opt.zero_grad(set_to_none=True)
    total = loss.detach().clone()
    dist.all_reduce(total)  # collective (world)
    return float(total) / par.world


def _skewed_counts() -> np.ndarray:
    """int64 [G=4, E]: every source sends Zipf(1.5) loads (expert 0 hottest)."""
    loads = np.round(200.0 / np.arange(1, CFG.num_experts + 1) ** 1.5).astype(np.int64)
    return np.tile(loads, (4, 1))


def _experts(par, model, opt) -> dict[tuple[int, int], list[np.ndarray]]:
    """(MoE layer, owned expert) -> [w_gate_up, exp_avg, exp_avg_sq, w_down, exp_avg, exp_avg_sq]."""
    out = {}
    for i, layer in enumerate(model.moe_layers()):
        for j, e in enumerate(layer.experts.owned):
            parts = []
            for p in layer.experts.parameters():
                st = opt.state[p]
                parts += [p.detach()[j].numpy().copy(), st["exp_avg"][j].numpy().copy()]
                parts.append(st["exp_avg_sq"][j].numpy().copy())
            out[(i, e)] = parts
    return out


def _state_ids(model, opt) -> list[int]:
    """Identity of every expert master and optimizer-state tensor (a move would replace them)."""
    return [
        id(t) for m in model.moe_layers() for p in m.experts.parameters() for t in (p, *opt.state[p].values())
    ]


def _gather(obj, world: int) -> list:
    everyone: list = [None] * world
    dist.all_gather_object(everyone, obj)  # collective (world)
    return everyone


def _check_time_aware_second_move(par, model, opt, world: int) -> None:
    """A time-aware check (cost model) on loads with the hot expert reversed moves the layers
    again; the function and the replicas' agreement survive the second move."""
    cost = CostModel(fixed_us=5.0, max_row_us=0.01, tile=16, c_row=0.1, c_tile=1.0, c_active=2.0)
    ar = AdaptiveReplacement(par, interval=1, threshold=1.02, cost=cost)
    for i in range(CFG.num_moe_layers):
        ar.observe(i, _skewed_counts()[:, ::-1])
    x_eval, _ = _tokens(98, par.rank)
    with torch.no_grad():
        before = model(x_eval)[0]
    events = ar.maybe_replace(4, model, opt)
    assert events and all("predicted time" in e["reason"] for e in events), events
    with torch.no_grad():
        torch.testing.assert_close(model(x_eval)[0], before, rtol=TOL, atol=TOL)


def _check_disagreement_refused(par, model, opt) -> None:
    """Ranks that would choose differently (here: a different threshold on rank 0) all refuse
    with ValueError instead of hanging in the migration's collectives; nothing moves."""
    before = list(par.groups)
    ar = AdaptiveReplacement(par, interval=1, threshold=1.0 if par.rank == 0 else 50.0)
    for i in range(CFG.num_moe_layers):
        hot = int(np.argmin(par.groups[i].placement.replica_counts))  # an expert with few replicas
        ar.observe(i, np.tile(np.where(np.arange(CFG.num_experts) == hot, 100, 1), (4, 1)))  # 93% of rows
    with pytest.raises(ValueError, match="different placements"):
        ar.maybe_replace(0, model, opt)
    assert par.groups == before


def _check_loads_over_microep_groups(rank: int, world: int) -> None:
    """With two MicroEP groups (EP=1, d=2), every rank gathers each micro-batch's group loads of
    every rank: the policy is fed their mean (the mean group load) and scores the worst group."""
    layout = ParallelLayout(world, world, 1, 2)
    groups = build_process_groups(layout, Placement.symmetric(2, CFG.num_experts, 2), rank)
    par = ParallelState(rank, world, torch.device("cpu"), layout, "microep", [groups])
    ar = AdaptiveReplacement(par, interval=1, threshold=1.02, micro_batches=3)
    group = rank // 2  # ranks 0, 1 form MicroEP group 0; ranks 2, 3 group 1
    batches = [np.full((2, CFG.num_experts), 10 * (group + 1) + m) for m in range(3)]
    batches[1][:, 0] += 50 * group  # group 1's second micro-batch is skewed to expert 0
    for counts in batches:
        ar.observe(0, counts)  # both ranks of a group see the same gathered counts
    loads = ar._gather_loads()  # [W, L, M, E]
    assert loads.shape == (world, 1, 3, CFG.num_experts)
    for m in range(3):
        group_loads = [2 * (np.full(CFG.num_experts, 10 * (g + 1) + m)) for g in range(2)]
        if m == 1:
            group_loads[1][0] += 2 * 50
        np.testing.assert_array_equal(loads[:, 0, m], [group_loads[r // 2] for r in range(world)])
        np.testing.assert_allclose(loads[:, 0, m].mean(axis=0), np.mean(group_loads, axis=0))
    for m in range(3):
        ar._observe_micro_batch(0, 0, m, loads[:, 0, m])
    place = par.groups[0].placement  # each GPU holds every expert here: any load balances
    for m, check in enumerate(ar.checks):
        want = max(placement_score(loads[r, 0, m], place) for r in (0, 2))  # the worse group
        assert check["realized"] == want == 1.0
    np.testing.assert_allclose(
        ar.policy.tracker.forecast(0),
        loads[:, 0, 0].mean(axis=0) * 0.9**2 * 1.0
        + 0.1 * 0.9 * loads[:, 0, 1].mean(axis=0)
        + 0.1 * loads[:, 0, 2].mean(axis=0),
    )


def _worker(rank: int, world: int) -> dict:
    _check_loads_over_microep_groups(rank, world)
    par, model, opt = _build(rank, world)
    par_ref, ref, ref_opt = _build(rank, world)
    # no cold start within the test (warmup 10): the replacement comes from the interval check
    ar = AdaptiveReplacement(par, interval=2, threshold=1.02, warmup=10)
    events = []
    for step in range(2):
        assert abs(_step(par, model, opt, step) - _step(par_ref, ref, ref_opt, step)) <= TOL
        for i in range(CFG.num_moe_layers):
            ar.observe(i, _skewed_counts())
        x_eval, _ = _tokens(99, rank)
        with torch.no_grad():
            before = model(x_eval)[0]
        ids, owned = _state_ids(model, opt), _experts(par, model, opt)
        events += ar.maybe_replace(step, model, opt)
        assert _state_ids(model, opt) == ids, "a re-placement keeps every master and state tensor"
        after_move = _experts(par, model, opt)
        for key, arrays in owned.items():  # and their bytes: nothing moved
            for a, b in zip(arrays, after_move[key], strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"(layer, expert) {key}")
    assert [e["step"] for e in events] == [1, 1], "both layers re-placed at the interval's end"
    with torch.no_grad():
        after, ref_out = model(x_eval)[0], ref(x_eval)[0]
    torch.testing.assert_close(after, before, rtol=TOL, atol=TOL)
    torch.testing.assert_close(after, ref_out, rtol=TOL, atol=TOL)
    for i, layer in enumerate(model.moe_layers()):
        assert par.groups[i].placement != par_ref.groups[i].placement
        assert layer.dispatcher.placement == par.groups[i].placement
    moved_now = _gather(_experts(par, model, opt), world)
    ref_now = _gather(_experts(par_ref, ref, ref_opt), world)
    ref_by_id = {k: v for part in ref_now for k, v in part.items()}
    assert sorted(k for part in moved_now for k in part) == sorted(ref_by_id), "each expert owned once"
    for part in moved_now:  # every owner holds its expert's exact weights and moments
        for key, arrays in part.items():
            for a, b in zip(arrays, ref_by_id[key], strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"(layer, expert) {key}")
    loss = _step(par, model, opt, 2)
    loss_ref = _step(par_ref, ref, ref_opt, 2)
    assert abs(loss - loss_ref) <= TOL * max(1.0, abs(loss_ref))
    moved_next = _gather(_experts(par, model, opt), world)
    ref_next = {k: v for part in _gather(_experts(par_ref, ref, ref_opt), world) for k, v in part.items()}
    for part in moved_next:
        for key, arrays in part.items():
            for a, b in zip(arrays, ref_next[key], strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{key} after the next step")
    assert ar.maybe_replace(3, model, opt) == [], "nothing observed, nothing re-placed"
    _check_time_aware_second_move(par, model, opt, world)
    _check_disagreement_refused(par, model, opt)
    state = ar.state_dict()
    fresh = AdaptiveReplacement(par, interval=2, threshold=1.02, warmup=10)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    return {
        "events": [{k: v for k, v in e.items() if k != "ms"} for e in events],
        "ms": [e["ms"] for e in events],
    }


@pytest.mark.timeout(240)
def test_replacement_in_training_4_ranks():
    results = run_workers(_worker, 4)
    events = results[0]["events"]
    assert all(r["events"] == events for r in results), "every rank decides identically"
    for e in events:
        assert e["old_score"] > 1.02 and e["new_score"] < e["old_score"]
        assert e["rule"] == "interval" and e["reason"].startswith("interval check every 2 micro-batches")
        assert "> threshold 1.02" in e["reason"] and e["bytes_moved"] == 0 and e["slots_changed"] > 0
    assert all(ms > 0 for r in results for ms in r["ms"])


def test_hook_validation_and_noop():
    assert build_replacement(0, 1.05, None).maybe_replace(0, None, None) == []
    assert isinstance(build_replacement(0, 1.05, None), NoReplacement)
    single = ParallelState(0, 1, torch.device("cpu"), None, "microep")
    with pytest.raises(ValueError, match="distributed run"):
        build_replacement(5, 1.05, single)
    layout = ParallelLayout(4, 4, 4, 1)
    ep = ParallelState(0, 4, torch.device("cpu"), layout, "ep", [object()])
    with pytest.raises(ValueError, match="--dispatcher microep"):
        build_replacement(5, 1.05, ep)
