"""Adaptive replacement through `micromoe train` (4 gloo processes): migrations happen, are logged
with their rule and reason, are saved in the checkpoint, and a run resumed after them reproduces
the uninterrupted losses and replacement decisions (the policy's history is checkpointed too).

16 experts with top-1 routing on 4 ranks (EP=2, d=2), micro-batches of 16 tokens per rank (so
per-expert counts are uneven), and a large aux-loss-free bias rate that moves the routing every
step: the routing drift trips the realized-imbalance trigger (2 micro-batches) and the interval
check (2 steps), before and after the step-3 checkpoint.
The run resumes from its step-3 checkpoint; a later decision depends on the policy's counters
and forecast from before the checkpoint, so only a restored policy repeats it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from micromoe.plan import Placement

ARGS = ["--preset", "tiny", "--nproc", "4", "--experts", "16", "--top-k", "1", "--layers", "2"]
ARGS += ["--micro-batch", "1", "--seq-len", "16", "--seed", "1"]
ARGS += ["--replace-interval", "2", "--replace-threshold", "1.0", "--no-report", "--eval-interval", "0"]
ARGS += ["--lr-decay-steps", "100", "--ckpt-interval", "3", "--expert-bias-rate", "0.2"]
ARGS += [
    "--replace-trigger-after",
    "2",
    "--replace-window",
    "1",
    "--replace-cooldown",
    "1",
    "--replace-warmup",
    "1",
]
STEPS = 6
OPENING = {
    "cold-start": "cold start: ",
    "realized": "realized score > 1.0 for 2",
    "interval": "interval check",
}


def _train(out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "micromoe", "train", *ARGS, "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _without_ms(rec: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "ms"} for e in rec.get("replacements", [])]


@pytest.mark.timeout(300)
def test_replacement_is_logged_checkpointed_and_resumable(tmp_path):
    full = tmp_path / "full"
    _train(full, "--max-steps", str(STEPS))
    log = _log(full)
    events = [e for rec in log for e in rec.get("replacements", [])]
    assert any(e["step"] < 3 for e in events) and any(e["step"] >= 3 for e in events), events
    for e in events:
        assert e["old_score"] > 1.0 and e["new_score"] < e["old_score"]
        assert e["bytes_moved"] == 0 and e["slots_changed"] > 0 and e["ms"] > 0 and e["layer"] in (0, 1)
        assert e["reason"].startswith(OPENING[e["rule"]]), e
    for rec in log:  # every move is also one of the step's logged checks, with the same reason
        checks = {(c["layer"], c["reason"]) for c in rec.get("replace_checks", []) if c["replace"]}
        for e in rec.get("replacements", []):
            assert (e["layer"], e["reason"]) in checks, (rec["step"], e, checks)
    assert any(not c["replace"] for rec in log for c in rec.get("replace_checks", [])), "kept ones too"
    meta = json.loads((full / "checkpoints" / "step_00000003" / "meta.json").read_text())
    symmetric = Placement.symmetric(4, 16, 2).slot_expert
    moved = {e["layer"] for e in events if e["step"] < 3}
    assert len(meta["placements"]) == 2, "one placement per MoE layer in the checkpoint"
    for i, slots in enumerate(meta["placements"]):
        assert (not np.array_equal(slots, symmetric)) == (i in moved), (
            "the checkpoint holds the new placement"
        )

    # resume from the step-3 checkpoint (after migrations) in a copy of the run
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "checkpoints" / "latest").write_text("step_00000003")
    (part / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:3]))
    _train(part, "--max-steps", str(STEPS), "--resume")
    resumed = _log(part)
    assert [r["step"] for r in resumed] == list(range(STEPS))
    for a, b in zip(resumed[3:], log[3:], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
        assert _without_ms(a) == _without_ms(b), "the restored policy takes the same decisions"
    end = f"step_{STEPS:08d}"
    ends = [json.loads((run / "checkpoints" / end / "meta.json").read_text()) for run in (full, part)]
    assert ends[0]["placements"] == ends[1]["placements"], "the resumed run ends on the same placements"
