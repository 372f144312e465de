"""The MoE transformer on one device: shapes, causality, RoPE, parameter counts, presets, balancing."""

from __future__ import annotations

import pytest
import torch

from micromoe.model import PRESETS, ModelConfig, MoETransformer, preset
from micromoe.model.transformer import apply_rope, rope_table

SMALL = ModelConfig(
    vocab_size=64, seq_len=16, num_layers=3, hidden=32, num_heads=4, ffn_hidden=16, num_experts=4
)


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = MoETransformer(SMALL)
    idx = torch.randint(0, 64, (2, 16))
    logits, loss, aux = model(idx, idx)
    assert logits.shape == (2, 16, 64)
    # an untrained model predicts about uniformly: loss near log(V)
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5
    assert aux.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = MoETransformer(SMALL)
    a = torch.randint(0, 64, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 64
    la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[0, :10], lb[0, :10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


def test_rope_scores_depend_only_on_relative_position():
    table = rope_table(32, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i: int, j: int) -> float:
        qi = apply_rope(q.expand(1, 1, 32, 8), table)[0, 0, i]
        kj = apply_rope(k.expand(1, 1, 32, 8), table)[0, 0, j]
        return float(qi @ kj)

    assert score(5, 2) == pytest.approx(score(20, 17), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
    # a rotation keeps norms
    x = torch.randn(1, 1, 32, 8)
    torch.testing.assert_close(apply_rope(x, table).norm(dim=-1), x.norm(dim=-1))


def test_fuse_pointwise_swaps_rope_without_changing_the_math():
    torch.manual_seed(0)
    model = MoETransformer(SMALL)
    idx = torch.randint(0, 64, (2, 16))
    want = model(idx)[0]
    calls = []

    def fake_compiler(fn):
        def wrapped(*args):
            calls.append(1)
            return fn(*args)

        return wrapped

    model.fuse_pointwise(compiler=fake_compiler)
    torch.testing.assert_close(model(idx)[0], want, rtol=0, atol=0)
    assert len(calls) == 2 * SMALL.num_layers  # q and k of every block


def test_param_counts_match_the_formula():
    cfg = ModelConfig(
        vocab_size=64, seq_len=16, num_layers=3, hidden=32, num_heads=4, ffn_hidden=16, num_experts=4,
        top_k=2, num_dense_layers=1, dense_ffn_hidden=24, tie_embeddings=False,
    )  # fmt: skip
    model = MoETransformer(cfg)
    h, f, e, v = 32, 16, 4, 64
    attn = 4 * h * h
    norms = 2 * h
    dense = 3 * h * 24
    moe_router = e * h
    total = 2 * v * h + h + 3 * (attn + norms) + dense + 2 * (moe_router + e * 3 * h * f)
    assert model.num_params()["total"] == total == sum(p.numel() for p in model.parameters())
    active = v * h + h + 3 * (attn + norms) + dense + 2 * (moe_router + 2 * 3 * h * f)
    assert model.num_params()["active"] == active


def test_grouped_query_attention_runs():
    cfg = ModelConfig(
        vocab_size=32, seq_len=8, num_layers=1, hidden=32, num_heads=4, num_kv_heads=2, head_dim=16
    )
    logits, _, _ = MoETransformer(cfg)(torch.randint(0, 32, (2, 8)))
    assert logits.shape == (2, 8, 32)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_with_fewer_layers(name):
    with torch.device("meta"):  # shapes only, no memory
        model = MoETransformer(preset(name, num_layers=2))
    assert len(model.moe_layers()) == 2
    assert model.num_params()["active"] < model.num_params()["total"]


def test_paper_shapes():
    assert (PRESETS["gpt-32x1.3b"].hidden, PRESETS["gpt-32x1.3b"].ffn_hidden) == (2048, 8192)
    assert (PRESETS["gpt-32x1.3b"].num_experts, PRESETS["gpt-32x1.3b"].top_k) == (32, 2)
    assert (PRESETS["mixtral-8x7b"].hidden, PRESETS["mixtral-8x7b"].ffn_hidden) == (4096, 14336)
    assert (PRESETS["qwen3-30b-a3b"].ffn_hidden, PRESETS["qwen3-30b-a3b"].num_experts) == (768, 128)
    assert PRESETS["qwen3-30b-a3b"].top_k == 8


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt-5")
    with pytest.raises(ValueError, match="unknown model option"):
        preset("tiny", layers=3)
    with pytest.raises(ValueError, match="top_k=9"):
        ModelConfig(num_experts=8, top_k=9)
    with pytest.raises(ValueError, match="exceeds ModelConfig.seq_len"):
        MoETransformer(SMALL)(torch.zeros(1, 17, dtype=torch.long))


def test_expert_bias_moves_against_load():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**{**SMALL.__dict__, "expert_bias_rate": 0.1}))
    loads = torch.tensor([[10.0, 0.0, 5.0, 5.0]] * 3)
    model.update_expert_biases(loads)
    for layer in model.moe_layers():
        torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    # a large bias on expert 3 makes every token select it, while gates still come from the probs
    for layer in model.moe_layers():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    model(torch.randint(0, 64, (2, 16)))
    for layer in model.moe_layers():
        counts = layer.last_stats.counts_ge.sum(0)
        assert counts[3] == 32  # every token picked expert 3


@pytest.mark.parametrize(
    "bad",
    [
        {"qk_norm": "layer"},
        {"shared_ffn_hidden": -1},
        {"shared_expert_gate": True},
        {"shared_ffn_hidden": 1.5},
    ],
)
def test_variant_options_are_validated(bad):
    with pytest.raises(ValueError, match="qk_norm|shared"):
        ModelConfig(**bad)


def test_variants_add_their_parameters_and_a_shared_expert_counts_as_active():
    base = dict(vocab_size=64, seq_len=16, num_layers=2, hidden=32, num_heads=4, ffn_hidden=16, num_experts=4)
    plain = MoETransformer(ModelConfig(**base))
    cfg = ModelConfig(
        **base,
        qkv_bias=True,
        attn_out_bias=True,
        qk_norm="head",
        shared_ffn_hidden=24,
        shared_expert_gate=True,
    )
    model = MoETransformer(cfg)
    names = set(dict(model.named_parameters()))
    for extra in ("attn.qkv.bias", "attn.proj.bias", "attn.q_norm.weight", "shared_expert.down.weight"):
        assert f"blocks.1.{extra}" in names
    assert model.blocks[0].attn.q_norm.weight.shape == (8,)  # per head: head_dim
    extra = 2 * (32 * 2 * 24 + 24 * 32 + 32) + 2 * ((4 + 2 * 4) * 8 + 32 + 2 * 8)
    assert model.num_params()["active"] - plain.num_params()["active"] == extra
    assert all(not p.detach().any() for n, p in model.named_parameters() if n.endswith(".bias"))
    full = MoETransformer(ModelConfig(**base, num_kv_heads=2, qk_norm="full"))
    assert full.blocks[0].attn.k_norm.weight.shape == (2 * 8,)  # the whole k width


def test_shared_expert_with_a_closed_gate_leaves_the_routed_output():
    base = dict(vocab_size=64, seq_len=16, num_layers=1, hidden=32, num_heads=4, ffn_hidden=16, num_experts=4)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**base, shared_ffn_hidden=24, shared_expert_gate=True))
    h = torch.randn(2, 16, 32)
    block = model.blocks[0]
    with torch.no_grad():
        block.shared_expert_gate.weight.zero_()  # sigmoid(0) = 1/2
        half = block._ffn(h) - block.ffn(h)
        torch.testing.assert_close(half, 0.5 * block.shared_expert(h))
