"""Helpers for the multi-process (gloo, CPU) tests: a process launcher and a dense MoE reference.

`run_workers(fn, world_size, *args)` starts `world_size` spawned processes, initializes gloo on a
free localhost port, calls `fn(rank, world_size, *args)` in each and returns their results. A
worker exception fails the test with that rank's traceback; a hang is killed after `timeout` s.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; return results by rank."""
    port = free_port()
    out_dir = Path(tempfile.mkdtemp(prefix="micromoe_dist_"))
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, str(out_dir), args), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
    results, errors = [], []
    for r in range(world_size):
        f = out_dir / f"rank{r}.pkl"
        if not f.exists():
            if r not in hung:
                errors.append(f"rank {r}: exited with code {procs[r].exitcode} and no result")
            continue
        ok, value = pickle.loads(f.read_bytes())
        if not ok:
            errors.append(f"rank {r}:\n{value}")
        results.append(value)
    if hung:
        errors.insert(0, f"ranks {hung} still running after {timeout} s (a collective hung?)")
    if errors:
        raise AssertionError("worker failure(s):\n" + "\n".join(errors))
    return results


def _entry(fn, rank, world_size, port, out_dir, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        payload = (True, fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        payload = (False, traceback.format_exc())
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(payload))
    if payload[0]:
        dist.destroy_process_group()


def dense_moe(
    x: torch.Tensor,
    router_w: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    expert: torch.Tensor,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Single-process dense MoE: every expert on every token, masked by the routing.

    x [T, H], router_w [E, H], w_gate_up [E, H, 2F], w_down [E, F, H], expert int64 [T, K].
    Returns [T, H] = sum_k gate_k * SwiGLU_{expert_k}(x). Independent of the dispatch code.
    """
    probs = torch.softmax(x @ router_w.t(), dim=-1)
    gate = probs.gather(1, expert)
    if normalize:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    ffn = w_down.shape[1]
    y = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        h = x @ w_gate_up[e]
        out = (F.silu(h[:, :ffn]) * h[:, ffn:]) @ w_down[e]
        y = y + (gate * (expert == e)).sum(dim=1, keepdim=True) * out
    return y


def forced_routing(
    num_tokens: int, num_experts: int, top_k: int, skew: float, generator: torch.Generator
) -> torch.Tensor:
    """int64 [T, K]: distinct experts per token drawn from Zipf(skew) (expert 0 hottest).

    skew=0 is uniform; skew=inf sends every token to experts 0..K-1.
    """
    if skew == float("inf"):
        return torch.arange(top_k).expand(num_tokens, top_k).clone()
    p = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** skew
    return torch.multinomial(p.expand(num_tokens, -1), top_k, replacement=False, generator=generator)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are empty)."""
    if b.numel() == 0:
        return 0.0
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
