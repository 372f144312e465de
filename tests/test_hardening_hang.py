"""A stopped rank ends a gloo job in bounded time with an error naming the timeout and the rank.

Four gloo processes with a 10 s timeout train a MicroEP layer (its process groups built by
`build_process_groups`, which must inherit the timeout, not torch's 30 minutes); rank 2 sends itself
SIGSTOP at step 2. The other three must exit non-zero within 60 s of that (not torch's 30 min),
each with a message naming the 10 s timeout, and rank 0's naming rank 2 as the one that stalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from micromoe.plan import Placement
from micromoe.runtime import (
    MoEConfig,
    MoELayer,
    ParallelLayout,
    apply_expert_parallel,
    build_process_groups,
    sync_gradients,
)
from micromoe.runtime.timeouts import CollectiveTimeout, as_timeout, init_distributed

WORLD, STOPPED, TIMEOUT_S, BOUND_S, STARTUP_S = 4, 2, 10.0, 60.0, 60.0
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """Training steps of a MicroEP layer (all-gather of counts, all-to-alls, replica all-reduces)."""
    torch.set_num_threads(1)
    watchdog = init_distributed(
        "gloo", TIMEOUT_S, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    layout = ParallelLayout(world_size=WORLD, dp=WORLD, ep=WORLD // 2, merge=2)
    groups = build_process_groups(layout, Placement.symmetric(WORLD, 8, 2), rank)  # world's timeout
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden=16, ffn_hidden=32, num_experts=8, top_k=2))
    apply_expert_parallel(layer, groups, "microep")
    try:
        with watchdog.guard("a training step"):
            for step in range(6):
                if rank == STOPPED and step == 2:
                    Path(out_dir, "stalled_at").write_text(repr(time.time()))
                    os.kill(os.getpid(), signal.SIGSTOP)
                layer(torch.randn(32, 16)).pow(2).mean().backward()
                sync_gradients(layer, groups)
    except CollectiveTimeout as exc:
        Path(out_dir, f"rank{rank}.err").write_text(str(exc))
        os._exit(3)  # no clean shutdown: a peer is gone
    os._exit(0)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP is POSIX")
def test_a_stopped_rank_ends_the_job_with_a_clear_error(tmp_path: Path) -> None:
    out_dir = str(tmp_path)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out_dir), daemon=True) for r in range(WORLD)]
    start = time.monotonic()
    for p in procs:
        p.start()
    try:  # start-up (spawn, imports, groups) gets its own allowance; the bound counts from the stall
        for r, p in enumerate(procs):
            if r != STOPPED:
                p.join(max(0.0, STARTUP_S + BOUND_S - (time.monotonic() - start)))
        ended = time.time()
        alive = [r for r, p in enumerate(procs) if r != STOPPED and p.is_alive()]
        assert not alive, f"ranks {alive} still waiting {STARTUP_S + BOUND_S} s after the start"
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
    elapsed = ended - float(Path(out_dir, "stalled_at").read_text())
    assert elapsed < BOUND_S, f"the job ended {elapsed:.0f} s after rank {STOPPED} stopped"
    for r in range(WORLD):
        if r == STOPPED:
            continue
        assert procs[r].exitcode == 3, f"rank {r} exited with {procs[r].exitcode}"
        msg = Path(out_dir, f"rank{r}.err").read_text()
        assert f"rank {r}: a training step did not complete within the 10 s timeout (--timeout)" in msg
    assert f"rank(s) {STOPPED} did not respond" in Path(out_dir, "rank0.err").read_text()


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "10", True])
def test_timeout_must_be_a_positive_number(bad: object) -> None:
    with pytest.raises(ValueError, match="--timeout must be"):
        as_timeout(bad)  # type: ignore[arg-type]


def test_timeout_accepts_seconds() -> None:
    assert as_timeout(2.5).total_seconds() == 2.5


def test_parallel_layout_takes_numpy_integers() -> None:
    layout = ParallelLayout(np.int64(8), dp=np.int64(8), ep=np.int32(4), merge=np.int64(2))
    assert layout.world_size == 8 and type(layout.world_size) is int


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += [f"--master_port={_free_port()}", str(ROOT / "examples" / "microep_layer.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)


def test_example_refuses_an_unsupported_rank_count() -> None:
    """One message for the job (rank 0's), no traceback from the example's ranks (torchrun still
    lists the ranks that exited non-zero, as it does for any failed job)."""
    out = _torchrun(3, "--timeout", "30")
    assert out.returncode != 0
    messages = [line for line in out.stderr.splitlines() if line.startswith("microep_layer.py: error:")]
    assert len(messages) == 1 and "needs 2, 4, 8 or 16 ranks" in messages[0] and "got 3" in messages[0]
    assert 'microep_layer.py", line' not in out.stderr, "no traceback through the example"


def test_example_outside_torchrun_says_how_to_start_it() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "microep_layer.py")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "microep_layer.py: error: run it under torchrun: torchrun --nproc_per_node=4 examples/microep_layer.py"
    ]
