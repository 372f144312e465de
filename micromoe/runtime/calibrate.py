"""Measure a `CostModel` by timing the layer's own expert code on this device.

Legend: S local slots of a GPU, N rows. A *sample* is one GPU's rows per local slot; its time is
the forward+backward of `GroupedSwiGLU` (bf16 on CUDA via `torch._grouped_mm`, fp32 on CPU) at
those rows, the median of a few repetitions after a warm-up. On the GPU: CUDA events, with a spin
kernel queued first so the host is ahead and the time is the GPU's execution, not the host's
launch latency (which a training step hides); on the CPU: this process's CPU time, one thread.

The designed samples (`calibrate_design.py`) span slot counts, row totals and shapes of the split.
Every fourth sample (by design order) is held out: the model is fitted on the
rest and its relative error on the held-out ones goes into `meta['heldout']`. Samples are taken in
an order that covers the space early, until a time budget runs out.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

import micromoe
from micromoe.plan.cost import CostModel, fit_cost_model, relative_errors
from micromoe.runtime.calibrate_design import ALIGN, design
from micromoe.runtime.experts import GroupedSwiGLU

TILES = (64, 128, 256)  # candidate row tiles of the slot term; the best in-sample fit is kept
MIN_SAMPLES = 12
FIT_SHARE = 0.05  # of a whole-call budget, kept for fitting the model after the last sample
SAFETY = 1.5  # a sample is taken only if 1.5 x its predicted time fits: CPU timings vary
# GPU cycles of the spin kernel queued ahead of each run (about 1.5 ms at 2 GHz, about twice the
# host's launch time of one forward+backward): the timed kernels then run back to back, as in a
# training step where the host is ahead, instead of waiting for their launches
SLEEP_CYCLES_PER_RUN = 3_000_000


@dataclass(frozen=True)
class Samples:
    """Timed samples: rows int64 [N, S_max] (zero-padded), slots int64 [N], times_us float64 [N],
    kinds list[str] [N], heldout bool [N]."""

    rows: np.ndarray
    slots: np.ndarray
    times_us: np.ndarray
    kinds: list[str]
    heldout: np.ndarray
    startup_s: float = 0.0  # one-time warm-up before the budget started (not stored in JSON)

    @classmethod
    def from_json(cls, obj: dict) -> Samples:
        """Inverse of `to_json` (for refitting stored samples)."""
        rows, slots = _padded(obj["rows"])
        return cls(
            rows,
            slots,
            np.array(obj["times_us"], dtype=np.float64),
            list(obj["kinds"]),
            np.array(obj["heldout"]),
        )

    def to_json(self) -> dict:
        return {
            "rows": [r[:s].tolist() for r, s in zip(self.rows, self.slots, strict=True)],
            "times_us": self.times_us.tolist(),
            "kinds": self.kinds,
            "heldout": self.heldout.tolist(),
        }


def _padded(rows_list: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rows per slot -> (rows int64 [N, S_max] zero-padded, slots int64 [N])."""
    slots = np.array([len(r) for r in rows_list], dtype=np.int64)
    rows = np.zeros((len(rows_list), int(slots.max())), dtype=np.int64)
    for i, r in enumerate(rows_list):
        rows[i, : len(r)] = r
    return rows, slots


# --------------------------------------------------------------------------------------------
# timing
class ExpertTimer:
    """Times forward+backward of `GroupedSwiGLU` at given rows per slot, one module per slot count."""

    def __init__(self, hidden: int, ffn: int, device: torch.device, *, max_rows: int, seed: int = 0):
        self.hidden, self.ffn, self.device = hidden, ffn, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gen = torch.Generator(device=device).manual_seed(seed)
        self.x = torch.randn(max_rows, hidden, device=device, dtype=self.dtype, generator=gen)
        self.grad = torch.randn(max_rows, hidden, device=device, dtype=self.dtype, generator=gen)
        self.modules: dict[int, GroupedSwiGLU] = {}

    def module(self, num_slots: int) -> GroupedSwiGLU:
        if num_slots not in self.modules:
            self.modules[num_slots] = GroupedSwiGLU(
                num_slots, self.hidden, self.ffn, device=self.device, dtype=self.dtype
            )
        return self.modules[num_slots]

    def time_us(self, rows: np.ndarray, *, reps: int, warmup: int = 1) -> float:
        """Median forward+backward time (us) over `reps` runs at rows int64 [S]."""
        layer = self.module(len(rows))
        n = int(rows.sum())
        if n > self.x.shape[0]:
            raise ValueError(f"sample of {n} rows exceeds the timer's max_rows {self.x.shape[0]}")
        rows_t = torch.as_tensor(rows, dtype=torch.int64, device=self.device)
        x, gy = self.x[:n].detach().requires_grad_(True), self.grad[:n]
        if self.device.type == "cuda":
            torch.cuda._sleep(SLEEP_CYCLES_PER_RUN * (warmup + reps))  # host runs ahead of the GPU
        spans = [self._run(layer, x, gy, rows_t) for _ in range(warmup + reps)][warmup:]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: read every rep's events at once
            return statistics.median(a.elapsed_time(b) * 1e3 for a, b in spans)
        return statistics.median(b - a for a, b in spans) * 1e6

    def _run(self, layer: GroupedSwiGLU, x: torch.Tensor, gy: torch.Tensor, rows: torch.Tensor):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            layer(x, rows).backward(gy)
            end.record()
            return start, end
        # CPU time of this process, not wall time: a shared CPU's other jobs would dominate
        t0 = time.process_time()
        layer(x, rows).backward(gy)
        return t0, time.process_time()


# --------------------------------------------------------------------------------------------
# calibration
def measure(
    hidden: int,
    ffn: int,
    device: torch.device,
    *,
    slot_counts: Sequence[int],
    totals: Sequence[int],
    budget_s: float,
    reps: int = 5,
    seed: int = 0,
    count_startup: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> Samples:
    """Time designed samples until `budget_s` seconds have passed.

    By default the budget starts after one untimed run per slot count (`warm_up`): a fresh process
    pays for its first CUDA and GEMM-library work there (seconds), once, as its first training step
    would; it is recorded as `Samples.startup_s`, and at least MIN_SAMPLES are taken whatever the
    budget (the start-up calibration of `cost_model='auto'`). With `count_startup` the budget is a
    promise about the whole call (`micromoe calibrate --budget-s`): the warm-up counts, a sample is
    taken only if its predicted time (from the samples so far, `_Pace`) still fits, and too small a
    budget for MIN_SAMPLES is a ValueError. `progress(samples, elapsed_s)` is called after each.
    """
    t_start = time.perf_counter()
    timer = ExpertTimer(hidden, ffn, device, max_rows=_max_rows(slot_counts, totals), seed=seed)
    pace = _Pace(reps)
    deadline = t_start + budget_s * (1 - FIT_SHARE) if count_startup else None
    warm_up(timer, slot_counts, min(totals), pace, deadline=deadline)
    startup_s = time.perf_counter() - t_start
    clock = t_start if count_startup else time.perf_counter()
    planned = list(design(slot_counts, totals, seed=seed))
    if count_startup:  # fail now, not at the end, if even the cheapest samples cannot fit
        cheapest = sum(sorted(pace.predict(rows) for rows, _ in planned)[:MIN_SAMPLES])
        room = budget_s * (1 - FIT_SHARE) - startup_s
        if cheapest > room:
            raise ValueError(
                f"the warm-up took {startup_s:.1f} s and the {MIN_SAMPLES} quickest samples a fit needs would "
                f"take about {cheapest:.0f} s more on {device.type}, more than the {max(room, 0):.1f} s left "
                "for them; give more time, or smaller rows or slot counts"
            )
    rows_list, kinds, times = [], [], []
    for rows, kind in planned:
        elapsed = time.perf_counter() - clock
        if count_startup:
            if elapsed + pace.predict(rows) > budget_s * (1 - FIT_SHARE):
                continue  # would overrun: a smaller sample later in the design may still fit
        elif len(times) >= MIN_SAMPLES and elapsed > budget_s:
            break
        t0 = time.perf_counter()
        times.append(timer.time_us(rows, reps=reps))
        pace.add(rows, time.perf_counter() - t0)
        rows_list.append(rows)
        kinds.append(kind)
        if progress is not None:
            progress(len(times), time.perf_counter() - clock)
    if len(times) < MIN_SAMPLES:
        raise ValueError(
            f"in {budget_s:.1f} s only {len(times)} of the {MIN_SAMPLES} samples a fit needs could be timed on "
            f"{device.type} (the warm-up took {startup_s:.1f} s); give more time, or smaller rows or slot counts"
        )
    padded, slots = _padded(rows_list)
    heldout = np.arange(len(times)) % 4 == 3
    return Samples(padded, slots, np.array(times), kinds, heldout, startup_s=startup_s)


class _Pace:
    """Predicts a sample's wall time (warm-up run + `reps` timed runs) from the runs so far at its
    slot count: no less than a run with fewer rows took (the slots' weight gradients cost the same
    whatever the rows), and growing linearly past the largest one seen. A budget is kept, not
    filled to the last second."""

    def __init__(self, reps: int) -> None:
        self.runs = reps + 1
        self.seen: dict[int, list[tuple[int, float]]] = {}  # slots -> (rows, seconds per run)

    def add(self, rows: np.ndarray, seconds: float, runs: int | None = None) -> None:
        self.seen.setdefault(len(rows), []).append((int(rows.sum()), seconds / (runs or self.runs)))

    def predict(self, rows: np.ndarray) -> float:
        seen = self.seen.get(len(rows)) or [o for obs in self.seen.values() for o in obs]
        n = int(rows.sum())
        per_run = max((t * max(1.0, n / max(r, 1)) for r, t in seen), default=0.0)
        return SAFETY * self.runs * per_run


def warm_up(
    timer: ExpertTimer,
    slot_counts: Sequence[int],
    total: int,
    pace: _Pace | None = None,
    *,
    deadline: float | None = None,
) -> None:
    """One untimed forward+backward per slot count at an even split of `total` rows (module
    creation, first kernel loads and library handles happen here, not in a timed sample); its
    wall time seeds `pace`. With a `deadline` (perf_counter seconds), a slot count whose warm-up
    would pass it (predicted from the smaller ones: its fixed costs grow with the slots) is a
    ValueError instead."""
    for s in sorted(set(slot_counts)):
        per_slot = max(ALIGN, -(-total // s // ALIGN) * ALIGN)
        rows = np.full(s, per_slot, dtype=np.int64)
        if deadline is not None and pace is not None and pace.seen:
            done = max(pace.seen)
            guess = 2 * max(t for _, t in pace.seen[done]) * s / done
            if time.perf_counter() + guess > deadline:
                raise ValueError(
                    f"the warm-up alone (one run per slot count) would take longer than the time given: "
                    f"{s} slots need about {guess:.0f} s more; give more time, or smaller rows or slot counts"
                )
        t0 = time.perf_counter()
        timer.time_us(rows, reps=1, warmup=1)
        if pace is not None:
            pace.add(rows, time.perf_counter() - t0, runs=2)


def _max_rows(slot_counts: Sequence[int], totals: Sequence[int]) -> int:
    # off-tile samples may exceed the total by up to 136 rows a slot; alignment by ALIGN a slot
    return max(totals) + (136 + ALIGN) * max(slot_counts)


def fit_samples(samples: Samples, *, meta: dict) -> CostModel:
    """Fit on the non-held-out samples (best of TILES in-sample), record held-out errors in meta."""
    train = ~samples.heldout
    fits = [
        fit_cost_model(
            samples.rows[train], samples.times_us[train], tile=t, meta=meta, num_slots_N=samples.slots[train]
        )
        for t in TILES
    ]
    model = min(fits, key=lambda m: m.meta["fit"]["median_rel_err"])
    return CostModel(**{**model.__dict__, "meta": {**model.meta, "heldout": heldout_errors(model, samples)}})


def heldout_errors(model: CostModel, samples: Samples) -> dict[str, float | int]:
    """The model's relative errors on the held-out samples: count, median, p90 and max."""
    test = samples.heldout
    err = relative_errors(model, samples.rows[test], samples.times_us[test], samples.slots[test])
    return {
        "samples": int(test.sum()),
        "median_rel_err": float(np.median(err)),
        "p90_rel_err": float(np.quantile(err, 0.9)),
        "max_rel_err": float(err.max()),
    }


def environment(device: torch.device) -> dict:
    """GPU (or CPU) name and software versions, for a model's meta."""
    env = {
        "device": device.type,
        "torch": torch.__version__,
        "micromoe": micromoe.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = "cpu"
        env["cpu"] = platform.processor() or platform.machine()
    return env


def calibrate(
    hidden: int,
    ffn: int,
    device: torch.device | str,
    *,
    slot_counts: Sequence[int] = (8, 16, 32),
    totals: Sequence[int] = (2048, 8192, 16384, 32768, 65536),
    budget_s: float = 30.0,
    reps: int = 5,
    seed: int = 0,
    count_startup: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[CostModel, Samples]:
    """Measure and fit a cost model of `GroupedSwiGLU(S, hidden, ffn)` on `device`.

    `budget_s`, `count_startup` and `progress` as in `measure` (with `count_startup` the whole
    call, fit included, stays within about `budget_s`). Returns the model (meta: environment,
    shape, dtype, design, in-sample 'fit' and 'heldout' errors, seconds taken) and the samples.
    """
    device = torch.device(device)
    if min(hidden, ffn) < 1 or min(slot_counts) < 1 or min(totals) < ALIGN:
        raise ValueError(
            f"need hidden, ffn, slot counts >= 1 and totals >= {ALIGN}; got hidden={hidden} ffn={ffn} "
            f"slot_counts={list(slot_counts)} totals={list(totals)}"
        )
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU makes spinning worker threads time each other
    try:
        samples = measure(
            hidden,
            ffn,
            device,
            slot_counts=slot_counts,
            totals=totals,
            budget_s=budget_s,
            reps=reps,
            seed=seed,
            count_startup=count_startup,
            progress=progress,
        )
    finally:
        torch.set_num_threads(threads)
    meta = {
        **environment(device),
        "seconds": round(time.perf_counter() - t0, 2),
        "startup_seconds": round(samples.startup_s, 2),
        "hidden": hidden,
        "ffn": ffn,
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "pass": "forward+backward",
        "slot_counts": list(slot_counts),
        "totals": list(totals),
        "reps": reps,
    }
    return fit_samples(samples, meta=meta), samples


def calibrate_cost_model(
    hidden: int,
    ffn: int,
    device: torch.device | str,
    *,
    budget_s: float = 2.0,
    num_slots: int | None = None,
    rows_per_gpu: int | None = None,
) -> CostModel:
    """Fast start-up calibration: a model for this GPU and shape from about `budget_s` seconds of
    measurement, after a one-time warm-up of the expert GEMMs (`meta['startup_seconds']`; seconds
    in a process that has not used CUDA yet, well under a second in one that has).

    `num_slots` and `rows_per_gpu` (the dispatcher's local slots and expected rows) centre the
    design on the regime the planner will see; by default 8-32 slots and 4k-32k rows.
    """
    slots = (8, 16, 32) if num_slots is None else sorted({max(1, num_slots // 2), num_slots, 2 * num_slots})
    rows = 16384 if rows_per_gpu is None else max(rows_per_gpu, 64)
    totals = sorted({max(rows // 4, ALIGN), max(rows // 2, ALIGN), rows, 2 * rows})
    model, _ = calibrate(
        hidden, ffn, device, slot_counts=slots, totals=totals, budget_s=0.8 * budget_s, reps=3
    )
    return model
