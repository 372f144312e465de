"""Our model against `transformers` on tiny random models of every supported architecture: the
same logits (fp32, within 1e-4 of the logits' scale), the same experts chosen by every router,
the same loss and gradient norm, and the same loss after one AdamW step from the same weights."""

from __future__ import annotations

import pytest
import torch
from _hf_models import ARCHS, save_hf, transformers

from micromoe.model import MoETransformer
from micromoe.model.hf import hf_source, load_into_model, logical_rules, split_experts
from micromoe.runtime.router import TopKRouter

SEQ = 16


def _pair(arch: str, tmp_path, seed: int = 0):
    theirs = save_hf(arch, tmp_path, seed)
    source = hf_source(tmp_path, seq_len=SEQ)
    ours = MoETransformer(source.config)
    load_into_model(ours, source)
    return ours.eval(), theirs.eval()


def _tokens(seed: int, rows: int = 3, cols: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 96, (rows, cols), generator=torch.Generator().manual_seed(seed))


def _record_routes(model: torch.nn.Module, ours: bool) -> list[torch.Tensor]:
    """Hook every router; the list fills with int64 [T, K] expert ids (sorted per token)."""
    routes: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, TopKRouter) if ours else type(m).__name__.endswith("TopKRouter"):
            m.register_forward_hook(
                lambda _m, _i, out, ours=ours: routes.append((out.expert if ours else out[2]).sort(-1).values)
            )
    return routes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_routing_match_transformers(arch, tmp_path):
    ours, theirs = _pair(arch, tmp_path)
    ours_routes, their_routes = _record_routes(ours, True), _record_routes(theirs, False)
    idx = _tokens(1)
    with torch.no_grad():
        want = theirs(idx).logits
        got = ours(idx)[0]
    assert _rel(got, want) < 1e-4
    assert len(ours_routes) == len(their_routes) == ours.cfg.num_moe_layers
    for a, b in zip(ours_routes, their_routes, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_adamw_step_gives_the_same_loss(arch, tmp_path):
    ours, theirs = _pair(arch, tmp_path, seed=3)
    ours.train()
    theirs.train()
    idx = _tokens(2, cols=SEQ + 1)
    x, y = idx[:, :-1], idx[:, 1:]

    def their_loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(theirs(x).logits.flatten(0, 1), y.flatten())

    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (ours, theirs)]
    losses = [ours(x, y)[1], their_loss()]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    for loss in losses:
        loss.backward()
    norms = [sum(float(p.grad.double().square().sum()) for p in m.parameters()) for m in (ours, theirs)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)  # same gradients, up to layout
    for opt in opts:
        opt.step()
    with torch.no_grad():
        after = [ours(x, y)[1].item(), their_loss().item()]
    assert after[0] == pytest.approx(after[1], rel=1e-5)
    assert after[0] < losses[0].item()


@pytest.mark.parametrize("arch", ARCHS)
def test_logical_names_are_the_models_state_dict_with_experts_split(arch, tmp_path):
    ours, _ = _pair(arch, tmp_path)
    state = split_experts(ours.state_dict())
    rules = logical_rules(ours.cfg, arch)
    assert list(rules) == list(state)
    for name, rule in rules.items():
        assert rule.shape == tuple(state[name].shape), name


@pytest.mark.parametrize("arch", ARCHS)
def test_rules_round_trip_logical_to_hf_and_back(arch, tmp_path):
    ours, _ = _pair(arch, tmp_path)
    source = hf_source(tmp_path, seq_len=SEQ)
    for name, tensor in split_experts(ours.state_dict()).items():
        rule = source.rules[name]
        pieces = rule.to_hf(tensor)
        assert list(pieces) == list(rule.hf_names)
        for hf_name, piece in pieces.items():  # what the folder stores
            torch.testing.assert_close(piece, source.files.get(hf_name), rtol=0, atol=0)
        torch.testing.assert_close(rule.to_logical(list(pieces.values())), tensor, rtol=0, atol=0)


def test_keeping_the_first_layers_matches_a_truncated_transformers_model(tmp_path):
    arch = "Qwen2MoeForCausalLM"
    save_hf(arch, tmp_path, seed=5)
    source = hf_source(tmp_path, num_layers=2, seq_len=SEQ)
    assert source.config.num_layers == 2 and source.config.num_dense_layers == 1
    ours = MoETransformer(source.config).eval()
    load_into_model(ours, source)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, num_hidden_layers=2, layer_types=["full_attention"] * 2, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        assert _rel(ours(_tokens(4))[0], theirs(_tokens(4)).logits) < 1e-4
