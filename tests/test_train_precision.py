"""Mixed precision: float32 master weights keep updates that bfloat16 weights lose.

An AdamW update of 1e-4 relative to a weight is below bf16's resolution (2**-8, about 0.4%): with
bf16 parameters it rounds away, with fp32 masters it is applied. Checked on the optimizer the
trainer builds (one process, CPU), for a dense matrix and an expert, with `--precision mixed`
against `--precision bf16`.
"""

from __future__ import annotations

import torch

from micromoe.model import preset
from micromoe.train.config import resolve
from micromoe.train.data import TokenData, load_tokens
from micromoe.train.parallel import ParallelState
from micromoe.train.trainer import build_run

MODEL = {"num_layers": 1, "hidden": 32, "num_heads": 2, "ffn_hidden": 32, "seq_len": 16}


def _one_small_update(precision: str, tmp_path) -> dict[str, float]:
    """Relative change of a dense weight and of an expert after one AdamW step sized 1e-4."""
    tokens, vocab = load_tokens()
    flags = {"precision": precision, "out": str(tmp_path / precision), "lr": 1e-4, "min_lr": 1e-4}
    flags.update({"warmup_steps": 0, "weight_decay": 0.0, "save": False})
    cfg = resolve("tiny", flags)
    par = ParallelState(0, 1, torch.device("cpu"), None, "microep")
    run = build_run(cfg, preset("tiny", **MODEL), par, TokenData(tokens, vocab), peak_flops=None)
    weights = {
        "dense": run.model.blocks[0].attn.qkv.weight,
        "expert": run.model.moe_layers()[0].experts.w_down,
    }
    with torch.no_grad():  # weights of 1.0: the first AdamW step moves each by lr = 1e-4 relative
        for p in weights.values():
            p.fill_(1.0)
    before = {k: p.detach().float().clone() for k, p in weights.items()}
    x, y = run.data.batch("train", 0, 0, 0, run.spec)
    _, loss, _ = run.model(x, y)
    loss.backward()
    for group in run.optimizer.param_groups:
        group["lr"] = 1e-4
    run.optimizer.step()
    return {k: float((p.detach().float() - before[k]).abs().max()) for k, p in weights.items()}


def test_fp32_masters_apply_an_update_that_bf16_weights_lose(tmp_path):
    mixed = _one_small_update("mixed", tmp_path)
    pure = _one_small_update("bf16", tmp_path)
    for kind in ("dense", "expert"):
        assert abs(mixed[kind] - 1e-4) < 2e-6, f"{kind}: the fp32 master moved by {mixed[kind]}"
        assert pure[kind] == 0.0, f"{kind}: bf16 weights kept an update below their resolution"
