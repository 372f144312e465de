"""Adaptive replacement through `micromoe train` (4 gloo processes): a migration happens, is logged,
is saved in the checkpoint, and a run resumed after it reproduces the uninterrupted losses and
replacement decisions (the policy's history is checkpointed too).

16 experts with top-1 routing on 4 ranks (EP=2, d=2): the cold start re-places the layers after
the first 2 micro-batches (step 1); with no cooldown the interval check at step 3 may move them
again, and the resumed run (from the step-3 checkpoint) must decide exactly the same.
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
ARGS += ["--replace-interval", "2", "--replace-threshold", "1.0", "--no-report", "--eval-interval", "0"]
ARGS += ["--lr-decay-steps", "100", "--ckpt-interval", "3", "--replace-cooldown", "0"]


def _train(out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "micromoe", "train", *ARGS, "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
def test_replacement_is_logged_checkpointed_and_resumable(tmp_path):
    full = tmp_path / "full"
    _train(full, "--max-steps", "4")
    log = _log(full)
    events = [e for rec in log for e in rec.get("replacements", [])]
    assert events, "the forecast passes the threshold: at least one layer is re-placed"
    for e in events:
        assert e["old_score"] > 1.0 and e["new_score"] < e["old_score"]
        assert e["bytes"] > 0 and e["ms"] > 0 and e["layer"] in (0, 1)
        if e["step"] == 1:
            assert e["rule"] == "cold-start" and e["reason"].startswith("cold start: first 2 micro-batch")
        else:
            assert e["step"] == 3 and e["rule"] == "interval" and "> threshold 1.0" in e["reason"], e
    meta = json.loads((full / "checkpoints" / "step_00000003" / "meta.json").read_text())
    symmetric = Placement.symmetric(4, 16, 2).slot_expert
    moved = {e["layer"] for e in events if e["step"] < 3}
    for i, slots in enumerate(meta["placements"]):
        assert (not np.array_equal(slots, symmetric)) == (i in moved), (
            "the checkpoint holds the new placement"
        )

    # resume from the step-3 checkpoint (after the migration) in a copy of the run
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "checkpoints" / "latest").write_text("step_00000003")
    (part / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:3]))
    _train(part, "--max-steps", "4", "--resume")
    resumed = _log(part)
    assert [r["step"] for r in resumed] == list(range(4))
    for a, b in zip(resumed[3:], log[3:], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
        drop_ms = [{k: v for k, v in e.items() if k != "ms"} for e in a.get("replacements", [])]
        assert drop_ms == [{k: v for k, v in e.items() if k != "ms"} for e in b.get("replacements", [])]
    ends = [
        json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text()) for run in (full, part)
    ]
    assert ends[0]["placements"] == ends[1]["placements"], "the resumed run ends on the same placements"
