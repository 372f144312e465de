"""The training loop: micro-batches, gradient sync, AdamW step, balancing, logging, checkpoints.

One optimizer step on every rank, in the same order (the MoE layers' collectives require it):
  for each of grad_accum micro-batches: forward (MoE layers all-to-all inside), backward;
  [collective] dense gradients averaged over DP, each expert's gradient over its replica group;
  [collective] the global gradient norm, clipped; AdamW step; [collective] expert loads summed for the aux-loss-free bias update;
  the adaptive-replacement hook; [collective] the step's loss averaged for the log.
Host syncs per step (each marked where it happens): none between micro-batches; the MoE stats
are read once after the optimizer step is queued, the loss/aux/norm scalars once at the end, and
the step's wall time on GPU (plus the adaptive-replacement hook's own, when it is on).
Legend: L MoE layers, E experts, G GPUs of a MicroEP group.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist

from micromoe.routing_log import write_routing_record
from micromoe.runtime import MoEStats
from micromoe.train.grads import clip_gradients, sync_gradients
from micromoe.train.metrics import StepMeter, mfu
from micromoe.train.trainer import Run, save

log = logging.getLogger("micromoe.train")
ROUTINE_DECISIONS = ("no check due", "cooldown")  # the policy's reasons when it checked nothing


def lr_at(step: int, run: Run) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at lr_decay_steps."""
    cfg = run.cfg
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = cfg.lr_decay_steps or cfg.max_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def _all_reduce_sum(t: torch.Tensor, run: Run) -> torch.Tensor:
    if run.parallel.distributed:
        dist.all_reduce(t)  # collective (world)
    return t


def train_step(run: Run, step: int, meter: StepMeter, routing_fp: IO[str] | None) -> dict[str, Any]:
    """One optimizer step; returns the log fields it measured (loss averaged over the world).

    Nothing is read back to the host between micro-batches: losses accumulate on the device and
    each MoE layer's stats (counts, plan) are kept by reference and read once, after the
    optimizer step has been queued (`_read_stats`)."""
    model, cfg, par = run.model, run.cfg, run.parallel
    sums = torch.zeros(2, dtype=torch.float64, device=par.device)  # loss, aux loss
    stats: list[list[MoEStats]] = []  # [micro-batch][MoE layer]
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, run)
    for micro in range(cfg.grad_accum):
        x, y = run.data.batch("train", step, micro, par.rank, run.spec)
        _, loss, aux = model(x.to(par.device, non_blocking=True), y.to(par.device, non_blocking=True))
        ((loss + aux) / cfg.grad_accum).backward()
        sums += torch.stack([loss.detach(), aux.detach()]).double()  # on the device, no sync
        stats.append([layer.last_stats for layer in model.moe_layers()])
    sync_gradients(run)
    grad_norm = clip_gradients(run, cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    loads_le = _read_stats(run, stats, meter, step, routing_fp)  # host sync on the GPU fast path
    # every rank applies the same bias update: loads summed over the world (a uniform multiple of
    # the true loads, and sign(mean - load) does not change under scaling)
    model.update_expert_biases(_all_reduce_sum(torch.from_numpy(loads_le).to(par.device), run))
    events = run.replacer.maybe_replace(step, model, run.optimizer)
    sums = _all_reduce_sum(sums, run)
    # host sync: the step's one read of the device scalars (loss, aux loss, gradient norm)
    loss_sum, aux_sum, norm = torch.cat([sums, grad_norm.double().view(1)]).cpu().tolist()
    n = cfg.grad_accum * par.world
    out: dict[str, Any] = {"loss": loss_sum / n, "aux_loss": aux_sum / n, "grad_norm": norm}
    if events:
        out["replacements"] = events
    return out


def _read_stats(
    run: Run, stats: list[list[MoEStats]], meter: StepMeter, step: int, routing_fp: IO[str] | None
) -> np.ndarray:
    """Read every micro-batch's MoE stats (in micro-batch order), feed the meter, the replacement
    hook and the routing log; returns float64 [L, E], this rank's rows per expert in the step.

    Reading `counts_ge` is a host sync on the single-device GPU fast path (its counts stay on the
    device until read); the distributed dispatchers already hold their all-gathered counts on the
    host (their planners need them), so there it costs nothing."""
    loads_le = np.zeros((len(run.model.moe_layers()), run.model.cfg.num_experts), dtype=np.float64)
    for micro, layers in enumerate(stats):
        for i, st in enumerate(layers):
            counts = st.counts_ge  # host sync (GPU fast path only, first read of the step)
            meter.add(i, st)
            run.replacer.observe(i, counts)
            loads_le[i] += counts.sum(axis=0)
            if routing_fp is not None:
                write_routing_record(routing_fp, step=step, layer=i, counts=counts, micro_batch=micro)
    return loads_le


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean validation loss over eval_batches micro-batches per rank (same batches every time)."""
    run.model.eval()
    total = torch.zeros((), dtype=torch.float64, device=run.parallel.device)
    for i in range(run.cfg.eval_batches):
        x, y = run.data.batch("val", i, 0, run.parallel.rank, run.spec)
        _, loss, _ = run.model(x.to(run.parallel.device), y.to(run.parallel.device))
        total += loss.double()  # on the device, no sync
    run.model.train()
    total = _all_reduce_sum(total, run).item()  # host sync: the evaluation's one read
    return total / (run.cfg.eval_batches * run.parallel.world)


def train(run: Run, *, compile_s: float | None = None) -> list[dict[str, Any]]:
    """Train from run.start_step to max_steps; append one JSON line per step to out/log.jsonl.
    Returns the records of this call (rank 0 writes files; every rank returns the same losses).

    The first record of the call is marked `"cold": true` (its time includes one-time set-up) and
    carries `compile_s`, the seconds this process spent compiling or loading the planner's kernels
    before it (kept out of the scheduler time). Before every checkpoint the logs are flushed and
    fsynced (`sync_logs`), so after a crash they hold every step up to the newest checkpoint."""
    cfg, par = run.cfg, run.parallel
    out = Path(cfg.out)
    lead = par.rank == 0
    log_fp = open_log(out / "log.jsonl", run.start_step) if lead else None
    routing_fp = open_log(Path(cfg.record_routing), run.start_step) if lead and cfg.record_routing else None
    tokens_per_step = run.spec.global_batch * run.spec.seq_len
    scheduled = par.distributed and par.dispatcher == "microep"  # plain EP and one process plan nothing
    bar = _progress(run) if lead else None
    records = []
    try:
        for step in range(run.start_step, cfg.max_steps):
            t0 = time.perf_counter()
            meter = StepMeter(len(run.model.moe_layers()), par.ep_size)
            rec: dict[str, Any] = {"step": step, "lr": lr_at(step, run)}
            rec.update(train_step(run, step, meter, routing_fp))
            checks = replacement_checks(run, step)
            if checks:
                rec["replace_checks"] = checks
            if par.device.type == "cuda":
                torch.cuda.synchronize(par.device)  # host sync: the step's wall time
            step_s = time.perf_counter() - t0
            rec.update(
                {"tokens": tokens_per_step, "step_s": step_s, "tokens_per_s": tokens_per_step / step_s}
            )
            rec["mfu"] = mfu(run.flops_per_token, rec["tokens_per_s"], run.peak_flops, par.world)
            if par.device.type == "cuda":  # this rank's peak so far (what the memory plan predicts)
                rec["max_memory_gib"] = torch.cuda.max_memory_allocated(par.device) / 2**30
            rec.update(meter.record(scheduled=scheduled))
            if not records:
                rec.update({"cold": True, "compile_s": compile_s})
            last = step + 1 == cfg.max_steps
            if cfg.eval_interval and ((step + 1) % cfg.eval_interval == 0 or last):
                rec["val_loss"] = evaluate(run)
            records.append(rec)
            if lead:
                log_fp.write(json.dumps(rec) + "\n")
                log_fp.flush()
                _show(bar, rec, cfg.log_interval, cfg.max_steps)
            if cfg.save and cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0 and not last:
                sync_logs(log_fp, routing_fp)  # every logged step is on disk before the checkpoint
                save(run, step + 1)
        if cfg.save and run.start_step < cfg.max_steps:
            sync_logs(log_fp, routing_fp)
            save(run, cfg.max_steps)
    finally:
        for fp in (log_fp, routing_fp):
            if fp is not None:
                fp.close()
        if bar is not None:
            bar.close()
    return records


def replacement_checks(run: Run, step: int) -> list[dict[str, Any]]:
    """The adaptive-replacement checks of `step` (cold start, realized trigger, interval), moved or
    not, each with its layer, micro-batch, realized score and the policy's reason: the moves are
    also logged as `replacements` with their cost, but a check that kept the placement (the usual
    outcome) would otherwise leave no trace. Micro-batches without a check are left out."""
    checks = getattr(run.replacer, "checks", ())
    return [
        {k: c[k] for k in ("layer", "micro_batch", "realized", "replace", "reason")}
        for c in checks
        if c["step"] == step and not c["reason"].startswith(ROUTINE_DECISIONS)
    ]


def sync_logs(*files: IO[str] | None) -> None:
    """Flush and fsync each open log (None: not this rank's): a checkpoint written after this
    never runs ahead of the logs, whatever kills the job."""
    for fp in files:
        if fp is not None:
            fp.flush()
            os.fsync(fp.fileno())


def open_log(path: Path, start_step: int) -> IO[str]:
    """Open a JSON-lines log (one object with a "step" per line) to continue from `start_step`.

    A fresh run (step 0) starts it empty. A resumed run keeps the lines of earlier steps and cuts
    the file (in place, at a byte offset) before the first line of a later one: those were written
    after the checkpoint it resumes from, and it writes them again. A torn last line (a crash in
    the middle of a write) is cut too; an unreadable line followed by others is an error naming
    the file and line, as is a log that ends before the checkpoint (steps missing)."""
    if start_step == 0 or not path.exists():
        return path.open("w")
    cut, last_step = _resume_offset(path, start_step)
    if last_step is not None and last_step < start_step - 1:
        log.warning(
            "%s ends at step %d but the run resumes at step %d: steps %d-%d are missing from it",
            path, last_step, start_step, last_step + 1, start_step - 1,
        )  # fmt: skip
    with path.open("r+b") as fp:
        fp.truncate(cut)
        if cut and fp.seek(cut - 1) is not None and fp.read(1) != b"\n":
            fp.write(b"\n")  # a complete last record whose newline was not written
    return path.open("a")


def _resume_offset(path: Path, start_step: int) -> tuple[int, int | None]:
    """(byte offset of the first line to drop, the last kept line's step) of a JSON-lines log."""
    offset, last_step = 0, None
    with path.open("rb") as fp:
        lines = iter(fp)
        for number, raw in enumerate(lines, start=1):
            try:
                step = json.loads(raw)["step"]
                if isinstance(step, bool) or not isinstance(step, int):
                    raise TypeError("step is not an integer")
            except (ValueError, KeyError, TypeError) as exc:
                if next(lines, None) is None:  # a torn last line: cut it
                    return offset, last_step
                raise ValueError(
                    f"{str(path)!r} line {number} is not a log record ({exc}); fix or remove that line "
                    "to resume"
                ) from None
            if step >= start_step:
                return offset, last_step
            offset += len(raw)
            last_step = step
    return offset, last_step


def _progress(run: Run):
    """A tqdm bar on a terminal, None otherwise (then `_show` logs one line every log_interval)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # optional UI dependency, only on a terminal

    return tqdm(total=run.cfg.max_steps, initial=run.start_step, unit="step", dynamic_ncols=True)


def _show(bar, rec: dict[str, Any], every: int, total: int) -> None:
    text = (
        f"loss {rec['loss']:.4f} | {rec['tokens_per_s']:,.0f} tok/s | max/mean load {rec['max_mean_load']:.3f}"
        f" (plain EP {rec['ep_max_mean_load']:.3f})"
    )
    if rec.get("sched_us") is not None:
        text += f" | sched {rec['sched_us']:.0f} us"
    if rec.get("mfu") is not None:
        text += f" | MFU {100 * rec['mfu']:.1f}%"
    if "val_loss" in rec:
        text += f" | val {rec['val_loss']:.4f}"
    if bar is not None:
        bar.set_postfix_str(text, refresh=False)
        bar.update(1)
        if "val_loss" in rec:
            bar.write(f"step {rec['step'] + 1}: {text}")
    elif (rec["step"] + 1) % every == 0 or "val_loss" in rec or rec["step"] + 1 == total:
        log.info("step %d/%d: %s", rec["step"] + 1, total, text)
