"""The ranks of `micromoe train`: what each one runs, and how a job of spawned ranks ends.

`run_rank` is one rank: build, train, report (rank 0), every collective bounded by `--timeout`
through the runtime's `Watchdog`. `spawn` starts `world` gloo processes and supervises them. Each
spawned rank that fails writes why to REPORTS/rank<r>.txt: `error` (a ValueError: a user mistake
the ranks found), `stall` (a collective timed out, or a peer's connection closed) or `crash` (any
other exception: a bug, with its traceback as text). When one rank
ends badly the others get GRACE_S to end on their own; the rest are then killed (a stopped process
ignores SIGTERM). The job then fails with one line:
- the lowest rank's `error` (ValueError, exit status 2);
- a `crash` report: its traceback (RuntimeError, a bug);
- a rank that ended by itself without a report: it died (a signal or exit code: CommandError);
- `stall` reports: the ranks that reported nothing are the stalled ones (CommandError).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from micromoe.allocator import tune_allocator
from micromoe.errors import CommandError
from micromoe.model import ModelConfig
from micromoe.runtime.timeouts import CollectiveTimeout, init_distributed, is_stall_error
from micromoe.runtime.warmup import warm_up_kernels
from micromoe.train.config import TrainConfig
from micromoe.train.data import TokenData, data_fingerprint, default_corpus, load_tokens
from micromoe.train.loop import train
from micromoe.train.metrics import measure_bf16_peak
from micromoe.train.outputs import CONFIG, LOG, RunLock
from micromoe.train.parallel import ParallelState, resolve_layout
from micromoe.train.precision import resolve_precision
from micromoe.train.preflight import memory_plan, resolve_configs
from micromoe.train.report import read_log, summary_line, write_report
from micromoe.train.startup import resolved_config, startup_lines
from micromoe.train.trainer import build_run

log = logging.getLogger("micromoe.train")

GRACE_S = 2.0  # after one rank fails, the others' time to end on their own (the live ones leave the
# stall probe together and exit at once) before the rest are killed
STALL_EXIT = 3  # exit status of a rank that gave up on a stalled collective


def run_rank(
    local_rank: int,
    rank: int,
    world: int,
    backend: str | None,
    args: argparse.Namespace,
    *,
    compiled_s: float | None,
) -> None:
    """One rank: build, train, report (rank 0), then destroy the process group. `compiled_s`:
    the seconds the launcher spent compiling the kernels for every rank (None: not done, rank 0
    says so when it compiles them), added to this rank's own loading time in the log."""
    if rank != 0 or not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True
        )
    tune_allocator()  # the planner runs every micro-batch: keep its arrays off fresh pages
    torch.set_num_threads(
        max(1, torch.get_num_threads() // max(1, world)) if backend == "gloo" else torch.get_num_threads()
    )
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend is None and torch.cuda.is_available():
        device = torch.device("cuda", 0)
    tokens, vocab = load_tokens(args.data, hf=args.hf)
    cfg, model_cfg = resolve_configs(args, world, vocab)
    ctx = _Rank(rank, world, backend, device, cfg, model_cfg, tokens, vocab, args)
    watchdog = None
    if backend is not None:
        try:  # rendezvous: a rank that never arrives is a stall too
            watchdog = init_distributed(backend, cfg.timeout, rank=rank, world_size=world)
        except RuntimeError as exc:
            raise CollectiveTimeout(f"rank {rank}: the ranks did not all start: {exc}") from exc
    elif resolve_precision(cfg.precision, device).casts:
        # one process: a one-rank group, so FSDP casts the dense weights as in a distributed run
        backend1 = "nccl" if device.type == "cuda" else "gloo"
        extra = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend1, store=dist.HashStore(), rank=0, world_size=1, **extra)
    try:
        if watchdog is None:
            _train_rank(ctx, compiled_s)
        else:
            with watchdog.guard("a collective"):
                _train_rank(ctx, compiled_s)
    except CollectiveTimeout:
        raise  # no clean shutdown: a peer is gone
    except BaseException:
        _destroy(backend)
        raise
    _destroy(backend)


@dataclass(frozen=True)
class _Rank:
    """What one rank resolved before training: where it runs and what it trains on."""

    rank: int
    world: int
    backend: str | None
    device: torch.device
    cfg: TrainConfig
    model_cfg: ModelConfig
    tokens: np.ndarray
    vocab: int
    args: argparse.Namespace


def _train_rank(ctx: _Rank, compiled_s: float | None) -> None:
    cfg, lead = ctx.cfg, ctx.rank == 0
    layout = resolve_layout(cfg, ctx.world) if ctx.world > 1 else None
    par = ParallelState(ctx.rank, ctx.world, ctx.device, layout, cfg.dispatcher)
    compile_s = warm_up_kernels(timed=cfg.cost_model is not None, announce=lead and compiled_s is None)
    compile_s += compiled_s or 0.0
    peak = measure_bf16_peak(ctx.device) if ctx.device.type == "cuda" else None
    data = TokenData(ctx.tokens, ctx.vocab, val_fraction=cfg.val_fraction, seed=cfg.seed)
    run = build_run(cfg, ctx.model_cfg, par, data, peak_flops=peak)
    if lead:  # written once the run is built: a run refused on the way leaves no config behind
        _write_config(ctx, par)
        memory = memory_plan(ctx.args, ctx.world, cfg, ctx.model_cfg, device=ctx.device)
        lines = startup_lines(
            cfg, run.model, par, run.spec, memory, backend=ctx.backend, start_step=run.start_step
        )
        for line in lines:
            log.info(line)
    train(run, compile_s=compile_s)
    out = Path(cfg.out)
    if lead and (out / LOG).exists():
        print(summary_line(read_log(out)), flush=True)  # results on stdout, over the whole run
        if not ctx.args.no_report:
            print(f"report: {write_report(out)}", flush=True)


def _write_config(ctx: _Rank, par: ParallelState) -> None:
    """OUT/config.json: the resolved run, with its data's source, size and fingerprint."""
    source = str(ctx.args.data) if ctx.args.data is not None else f"bundled {default_corpus().name}"
    data = {"source": source, "tokens": int(ctx.tokens.size), "vocab": ctx.vocab}
    data["fingerprint"] = data_fingerprint(ctx.tokens)
    resolved = resolved_config(ctx.cfg, ctx.model_cfg, par, data)
    (Path(ctx.cfg.out) / CONFIG).write_text(json.dumps(resolved, indent=1) + "\n")


def _destroy(backend: str | None) -> None:
    if dist.is_initialized():  # also the one-rank group of a mixed-precision single process
        dist.destroy_process_group()


def spawn(world: int, args: argparse.Namespace, out: Path, *, compiled_s: float) -> None:
    """Start `world` gloo processes on this host, wait for them, end the job in one line if one
    fails (module docstring). The caller holds OUT's lock shared; each rank joins it."""
    verbose = bool(getattr(args, "verbose", False))
    if not verbose:  # torch's C++ error logs of a failed collective: the ranks' reports say it in one line
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    with tempfile.TemporaryDirectory(prefix="micromoe_train_") as reports:
        ctx = mp.start_processes(
            _spawned,
            args=(world, args, str(out), reports, compiled_s),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        try:
            killed = _supervise(ctx.processes)
        except BaseException:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise
        codes = [p.exitcode for p in ctx.processes]
        if any(c != 0 for c in codes):
            _raise_failure(Path(reports), codes, killed)


def _supervise(procs: list) -> set[int]:
    """Wait for every process; once one fails, give the rest GRACE_S, then kill them. Returns the
    ranks killed here."""
    alive = {p.sentinel: r for r, p in enumerate(procs)}
    deadline = None
    while alive:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        for sentinel in multiprocessing.connection.wait(list(alive), timeout=wait):
            rank = alive.pop(sentinel)
            procs[rank].join()
            if procs[rank].exitcode != 0 and deadline is None:
                deadline = time.monotonic() + GRACE_S
        if deadline is not None and time.monotonic() >= deadline:
            break
    for rank in alive.values():
        procs[rank].kill()
        procs[rank].join()
    return set(alive.values())


def _raise_failure(reports: Path, codes: list[int], killed: set[int]) -> None:
    """Raise the job's one-line error from the ranks' reports and exit codes (module docstring)."""
    kinds = {}
    for r in range(len(codes)):
        path = reports / f"rank{r}.txt"
        if path.exists():
            kind, _, text = path.read_text().partition("\n")
            kinds[r] = (kind, text)
    errors = [text for r, (kind, text) in sorted(kinds.items()) if kind == "error"]
    if errors:
        raise ValueError(errors[0])
    crashes = [(r, text) for r, (kind, text) in sorted(kinds.items()) if kind == "crash"]
    if crashes:  # a bug, not a user mistake: the rank's traceback, as text
        raise RuntimeError(f"rank {crashes[0][0]} failed:\n{crashes[0][1]}")
    for r, code in enumerate(codes):
        if r in kinds or r in killed or code == 0:
            continue
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        raise CommandError(f"rank {r} died ({how}); the other ranks were stopped")
    silent = sorted(killed - set(kinds))
    waited = sorted(r for r, (kind, _) in kinds.items() if kind == "stall")
    if silent and waited:
        first = kinds[waited[0]][1]
        raise CommandError(
            f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped responding "
            f"(stopped or hung; ended after the others gave up): rank{'s' if len(waited) > 1 else ''} "
            f"{', '.join(map(str, waited))} timed out waiting for it ({first.split(';')[0]})"
        )
    raise CommandError(f"the job failed: exit statuses by rank {codes}")


def _spawned(
    rank: int, world: int, args: argparse.Namespace, out: str, reports: str, compiled_s: float
) -> None:
    """A spawned rank: holds OUT's lock shared while it lives; its failure is written to
    `reports` for the launcher (module docstring)."""
    lock = RunLock.join(Path(out))
    try:
        run_rank(rank, rank, world, "gloo", args, compiled_s=compiled_s)
    except ValueError as exc:
        _report(reports, rank, "error", str(exc), exc, args)
        sys.exit(2)  # SystemExit passes torch's wrapper, which reports other exceptions itself
    except CollectiveTimeout as exc:
        _report(reports, rank, "stall", str(exc), exc, args)
        os._exit(STALL_EXIT)  # no clean shutdown: a peer is gone
    except RuntimeError as exc:
        if not is_stall_error(exc):
            _report(reports, rank, "crash", "".join(traceback.format_exception(exc)), exc, args)
            raise
        _report(reports, rank, "stall", f"rank {rank}: {exc}".splitlines()[0], exc, args)
        os._exit(STALL_EXIT)
    except Exception as exc:
        _report(reports, rank, "crash", "".join(traceback.format_exception(exc)), exc, args)
        raise
    finally:
        lock.release()


def _report(
    reports: str, rank: int, kind: str, text: str, exc: BaseException, args: argparse.Namespace
) -> None:
    """Write why this rank ended, once (the traceback to stderr only under -v)."""
    if getattr(args, "verbose", False):
        traceback.print_exception(exc)
    path = Path(reports, f"rank{rank}.txt")
    if not path.exists():
        path.write_text(f"{kind}\n{text}")
