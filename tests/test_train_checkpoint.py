"""Checkpoints on one process: resuming reproduces the uninterrupted losses exactly (float32, CPU);
a process killed (SIGKILL) at any point of a save leaves the previous checkpoint intact; a full
disk is reported and cleaned up; corrupt, truncated, foreign or pickled files and a pointer out of
the run end with one line naming the file, and nothing loaded runs code."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from micromoe.model import preset
from micromoe.train import checkpoint as ckpt
from micromoe.train.config import resolve
from micromoe.train.data import TokenData, load_tokens
from micromoe.train.loop import train
from micromoe.train.parallel import ParallelState
from micromoe.train.trainer import build_run

MODEL = {
    "num_layers": 2,
    "hidden": 32,
    "num_heads": 2,
    "ffn_hidden": 32,
    "seq_len": 16,
    "expert_bias_rate": 1e-2,
}
CLI = ["--preset", "tiny", "--layers", "2", "--hidden", "32", "--heads", "2", "--ffn-hidden", "32"]
CLI += ["--seq-len", "16", "--expert-bias-rate", "0.01", "--micro-batch", "2", "--lr-decay-steps", "4"]
CLI += ["--eval-interval", "0", "--no-report", "--ckpt-interval", "2"]


def _build(out: Path, **flags):
    tokens, vocab = load_tokens()
    base = {"max_steps": 4, "lr_decay_steps": 4, "eval_interval": 0, "micro_batch": 2, "out": str(out)}
    cfg = resolve("tiny", {**base, **flags})
    par = ParallelState(0, 1, torch.device("cpu"), None, "microep")
    out.mkdir(parents=True, exist_ok=True)
    return build_run(cfg, preset("tiny", **MODEL), par, TokenData(tokens, vocab), peak_flops=None)


def _train(out: Path, **flags) -> list[float]:
    return [r["loss"] for r in train(_build(out, **flags))]


def _cli(out: Path, *extra: str, patch: str = "") -> subprocess.CompletedProcess:
    """`micromoe train` in a fresh process, with `patch` (Python) run first."""
    code = f"{patch}\nimport sys\nfrom micromoe.cli import main\nsys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "train", *CLI, "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    want = _train(tmp_path / "straight")
    first = _train(tmp_path / "run", max_steps=2)
    rest = _train(tmp_path / "run", max_steps=4, resume=True)
    assert first + rest == want
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "run"))
    assert meta["step"] == 4 and meta["optimizer_step"] == 4 and meta["world"] == 1
    assert meta["model"]["hidden"] == 32 and meta["train"]["max_steps"] == 4 and meta["placements"] == []
    assert meta["data"] == {"seed": 0, "next_step": 4} and meta["precision"]["master_weights"] == "fp32"


KILL_AT_STATE_FILE = """
import os, signal
import safetensors.torch as st
_save, calls = st.save, [0]
def save(*args, **kwargs):  # the 4th file is the first of the second checkpoint (3 per save)
    calls[0] += 1
    if calls[0] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(*args, **kwargs)
st.save = save
"""

KILL_BEFORE_POINTER = """
import os, signal
_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith("checkpoints/latest"):
        seen[0] += 1
        if seen[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
"""


@pytest.mark.parametrize("patch", [KILL_AT_STATE_FILE, KILL_BEFORE_POINTER], ids=["state file", "pointer"])
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, patch):
    done = _cli(tmp_path / "straight", "--max-steps", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    killed = _cli(tmp_path / "run", "--max-steps", "4", patch=patch)
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = ckpt.latest_checkpoint(tmp_path / "run")
    assert folder.name == "step_00000002"
    ckpt.check_checkpoint(folder)
    resumed = _cli(tmp_path / "run", "--max-steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*")), "leftovers of the kill removed"


def test_full_disk_is_reported_and_the_partial_checkpoint_removed(tmp_path, monkeypatch):
    run = _build(tmp_path, max_steps=2)
    train(run)
    import safetensors.torch as st

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save", no_space)
    from micromoe.train.trainer import save

    with pytest.raises(ValueError, match="no space left on device.*partial checkpoint was removed"):
        save(run, 3)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    ckpt.check_checkpoint(ckpt.latest_checkpoint(tmp_path))


class _Payload:
    """Unpickling this creates a marker file: a loader that unpickles runs code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _corrupt(folder: Path, how: str, marker: Path) -> Path:
    files = sorted((folder / "state").glob("*.safetensors"))
    target = files[-1]
    data = target.read_bytes()
    if how == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif how == "random bytes":
        target.write_bytes(os.urandom(len(data)))
    elif how == "pickle":
        target.write_bytes(pickle.dumps(_Payload(str(marker))))
    elif how == "torch.save":
        torch.save({"x": _Payload(str(marker))}, target)
    elif how == "torn meta":
        target = folder / "meta.json"
        target.write_text(target.read_text()[:40])
    elif how == "foreign meta":
        target = folder / "meta.json"
        target.write_text(json.dumps({"step": 2}))
    return target


@pytest.mark.parametrize(
    "how", ["truncated", "random bytes", "pickle", "torch.save", "torn meta", "foreign meta"]
)
def test_a_bad_file_ends_resume_with_one_line_naming_it(tmp_path, how):
    out = tmp_path / "run"
    assert _cli(out, "--max-steps", "2").returncode == 0
    marker = tmp_path / "code-ran"
    bad = _corrupt(ckpt.latest_checkpoint(out), how, marker)
    with pytest.raises(ValueError, match=str(bad)):
        ckpt.check_checkpoint(ckpt.latest_checkpoint(out))
    done = _cli(out, "--max-steps", "4", "--resume")
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and str(bad) in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not marker.exists(), "loading ran code from the checkpoint"


@pytest.mark.parametrize("pointer", ["../..", "/etc", "step_1", "step_00000009", ""])
def test_the_pointer_names_only_a_complete_step_folder_of_this_run(tmp_path, pointer):
    _train(tmp_path, max_steps=1)
    (tmp_path / "checkpoints" / ckpt.LATEST).write_text(pointer)
    with pytest.raises(ValueError, match="checkpoint pointer|not a complete checkpoint"):
        ckpt.latest_checkpoint(tmp_path)


def test_keep_prunes_older_checkpoints(tmp_path):
    _train(tmp_path, max_steps=5, ckpt_interval=1, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000005"]
    _train(tmp_path / "all", max_steps=3, ckpt_interval=1, keep=0)
    assert len(list((tmp_path / "all" / "checkpoints").glob("step_*"))) == 3


def test_reader_returns_the_models_logical_tensors(tmp_path):
    run = _build(tmp_path, max_steps=2)
    train(run)
    reader = ckpt.open_checkpoint(tmp_path)
    names = reader.tensor_names()
    assert "blocks.1.ffn.experts.7.w_down" in names and "embed.weight" in names
    assert "head.weight" not in names, "a tied weight is stored once"
    assert "blocks.0.ffn.router.expert_bias" in names
    for i, layer in enumerate(run.model.moe_layers()):
        for e in range(layer.cfg.num_experts):
            got = reader.tensor(f"blocks.{i}.ffn.experts.{e}.w_gate_up")
            torch.testing.assert_close(got, layer.experts.w_gate_up[e].detach(), rtol=0, atol=0)
    torch.testing.assert_close(reader.tensor("embed.weight"), run.model.embed.weight.detach(), rtol=0, atol=0)
    moment = reader.tensor("optim.embed.weight.exp_avg")
    torch.testing.assert_close(moment, run.optimizer.state[run.model.embed.weight]["exp_avg"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no checkpoint of step 7"):
        ckpt.open_checkpoint(tmp_path, 7)


def test_resume_refuses_another_model(tmp_path):
    _train(tmp_path, max_steps=1)
    tokens, vocab = load_tokens()
    cfg = resolve("tiny", {"max_steps": 2, "out": str(tmp_path), "resume": True, "micro_batch": 2})
    par = ParallelState(0, 1, torch.device("cpu"), None, "microep")
    with pytest.raises(ValueError, match="another model .differs in hidden"):
        build_run(
            cfg, preset("tiny", **{**MODEL, "hidden": 64}), par, TokenData(tokens, vocab), peak_flops=None
        )
