"""Memory: what a rank really holds (gloo, 4 processes) against the design and the memory plan;
`--dry-run` and the refusal of a run that does not fit.

With experts owned once per MicroEP group, a rank's expert master weights and AdamW state are
those of E/G experts instead of its S = E*d/G replica slots (1/d of the slot design); the dense
parameters and their state are FSDP shards, about 1/W of the whole.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _dist import run_workers
from torch.distributed.tensor import DTensor

from micromoe.model import preset
from micromoe.model.parallel import expert_parameters
from micromoe.train.config import resolve
from micromoe.train.data import TokenData, load_tokens
from micromoe.train.loop import train
from micromoe.train.memory import plan_memory
from micromoe.train.parallel import ParallelState, resolve_layout
from micromoe.train.precision import resolve_precision
from micromoe.train.trainer import build_run

MODEL = {"num_layers": 2, "hidden": 32, "num_heads": 2, "ffn_hidden": 48, "num_experts": 16, "seq_len": 16}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _measure(rank: int, world: int, root: str) -> dict:
    tokens, vocab = load_tokens()
    cfg = resolve("tiny", {"out": root, "max_steps": 1, "eval_interval": 0, "micro_batch": 2, "save": False})
    par = ParallelState(rank, world, torch.device("cpu"), resolve_layout(cfg, world), cfg.dispatcher)
    run = build_run(cfg, preset("tiny", **MODEL), par, TokenData(tokens, vocab), peak_flops=None)
    train(run)
    experts = {id(p) for p in expert_parameters(run.model)}
    out = {"dense_master": 0, "dense_state": 0, "expert_master": 0, "expert_state": 0}
    for p in run.model.parameters():
        kind = "expert" if id(p) in experts else "dense"
        out[f"{kind}_master"] += _local(p).nbytes
        out[f"{kind}_state"] += sum(_local(t).nbytes for t in run.optimizer.state[p].values() if t.dim() > 0)
    out["slots"] = run.parallel.groups[0].placement.slots_per_gpu
    out["owned"] = [len(m.experts.owned) for m in run.model.moe_layers()]
    return out


@pytest.mark.timeout(300)
def test_owned_experts_and_dense_shards_per_rank(tmp_path):
    ranks = run_workers(_measure, 4, str(tmp_path))
    cfg = preset("tiny", **MODEL)
    per_expert = 3 * cfg.hidden * cfg.ffn_hidden * 4  # float32 bytes
    d, world, e = 2, 4, cfg.num_experts
    slot_design = ranks[0]["slots"] * per_expert * cfg.num_moe_layers  # every slot a full copy
    assert ranks[0]["slots"] == e * d // world
    for r in ranks:
        assert r["owned"] == [e // world] * cfg.num_moe_layers, "E/G experts owned per layer"
        assert r["expert_master"] * d == slot_design, "expert masters: 1/d of the slot design"
        assert r["expert_state"] * d == 2 * slot_design, "AdamW moments: 1/d of the slot design"
    dense = sum(r["dense_master"] for r in ranks)  # the shards add up to the model once
    with torch.device("meta"):
        from micromoe.model import MoETransformer

        model = MoETransformer(cfg)
    ids = {id(p) for m in model.moe_layers() for p in m.experts.parameters()}
    assert dense == 4 * sum(p.numel() for p in model.parameters() if id(p) not in ids)
    for r in ranks:
        assert r["dense_master"] <= 1.15 * dense / world, "dense masters: about 1/W each"
        assert r["dense_state"] == 2 * r["dense_master"], "dense AdamW state sharded alike"
    # the plan's weights and state match the busiest rank
    tcfg = resolve("tiny", {"micro_batch": 2})
    plan = plan_memory(
        cfg,
        tcfg,
        resolve_precision("fp32", torch.device("cpu")),
        world=world,
        layout=resolve_layout(tcfg, world),
        capacity=2**40,
        device="cpu",
        where="test",
    )
    items = {i.name: i.bytes for i in plan.items}
    busiest = max(r["dense_master"] + r["expert_master"] for r in ranks)
    assert abs(items["master weights"] - busiest) <= 0.05 * busiest
    assert abs(items["optimizer state"] - 2 * busiest) <= 0.05 * 2 * busiest


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "micromoe", "train", "--dry-run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_dry_run_fits_the_paper_scale_on_16_gpus_and_not_on_4():
    base = ["--preset", "qwen3-30b-a3b", "--device-memory", "80", "--micro-batch", "1", "--ac", "full"]
    fits = _dry_run(*base, "--world-size", "16", "--ep", "8", "--merge", "2")
    assert fits.returncode == 0, fits.stderr
    last = fits.stdout.strip().splitlines()[-1]
    assert last.startswith("fits:") and float(last.split("(")[1].split("%")[0]) >= 15
    for item in ("master weights", "optimizer state", "expert slots", "activations", "logits and loss"):
        assert item in fits.stdout
    small = _dry_run(*base, "--world-size", "4", "--ep", "2", "--merge", "2")
    assert small.returncode == 1
    last = small.stdout.strip().splitlines()[-1]
    assert last.startswith("does not fit:") and "optimizer state" in last and "--ep" in last


def test_dry_run_follows_the_options():
    base = ["--preset", "qwen3-30b-a3b", "--device-memory", "80", "--world-size", "16", "--ep", "8"]

    def total(*extra: str) -> float:
        out = _dry_run(*base, *extra).stdout.splitlines()
        return float(next(line for line in out if line.startswith("total")).split()[1])

    assert total("--ac", "full") < total("--ac", "moe") < total("--ac", "none")
    assert total("--ac", "full", "--micro-batch", "1") < total("--ac", "full", "--micro-batch", "4")
    assert total("--ac", "full", "--expert-gather", "micro") < total(
        "--ac", "full", "--expert-gather", "step"
    )
    assert total("--ac", "full", "--precision", "bf16") < total("--ac", "full", "--precision", "mixed")


def test_a_run_that_does_not_fit_is_refused_unless_forced(tmp_path):
    args = ["--preset", "tiny", "--max-steps", "1", "--eval-interval", "0", "--no-report", "--no-save"]
    args += ["--device-memory", "0.01", "--out", str(tmp_path / "run")]
    cmd = [sys.executable, "-m", "micromoe", "train", *args]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "does not fit" in refused.stderr and "--force" in refused.stderr
    assert not (tmp_path / "run" / "log.jsonl").exists(), "refused before anything ran"
    forced = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr[-2000:]


def test_the_plan_is_within_10_percent_of_peaks_measured_on_a_gpu():
    """Peaks measured on an H100 (benchmarks/results/memory_plan_1xH100.json) against the plan
    without its runtime reserve (which `max_memory_allocated` does not see)."""
    import json
    from pathlib import Path

    from micromoe.train.memory import GIB, RUNTIME_RESERVE

    recorded = json.loads(
        Path(__file__).parents[1].joinpath("benchmarks/results/memory_plan_1xH100.json").read_text()
    )
    for run in recorded["runs"]:
        preset_name = run["args"].split()[1]
        cfg = resolve(preset_name, run["train"])
        plan = plan_memory(
            preset(preset_name, **run["model"]),
            cfg,
            resolve_precision(run["precision"], torch.device("cuda")),
            world=1,
            layout=None,
            capacity=80 * GIB,
            device="cuda",
            where="H100",
        )
        planned = (plan.total - RUNTIME_RESERVE["cuda"]) / GIB
        assert abs(run["measured_peak_gib"] / planned - 1) <= 0.10, (run["args"], planned)
