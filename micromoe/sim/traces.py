"""Routing trace files: aggregate per-layer counts and per-micro-batch routing logs.

Legend: L layers, E experts, G source GPUs, M micro-batches.

Two formats are read (the format is detected from the file's content):

1. **Aggregate counts** (one JSON object), e.g. the bundled Qwen2-57B traces::

       {"counts": [[c_0, ..., c_{E-1}], ...one row per layer...], "top_k": 8, ...}

   `counts[l][e]` = (token, expert) selections of expert e in layer l summed over a whole run.
   Extra keys are kept as metadata; an optional integer `top_k` is used as the default top-k.
   Micro-batches are *sampled* from these distributions (see `workload.py`).

2. **Per-micro-batch routing log** (JSON lines, format "micromoe-routing-v1"), replayed as is.
   One object per line, one line per (micro-batch, layer); blank lines are ignored::

       {"step": 12, "micro_batch": 0, "layer": 3, "counts": [[...E per-expert counts...], ...G rows...]}

   - `step` (int >= 0): the training step; `micro_batch` (int >= 0, optional, default 0): the
     micro-batch within the step. Micro-batches replay in (step, micro_batch) order.
   - `layer` (int >= 0): the MoE layer; every micro-batch must list the same set of layers.
   - `counts[src][e]`: whole, non-negative token selections on source GPU src for expert e (each
     top-k choice counts once); the same G x E shape on every line.
   `write_routing_record` writes one such line; the training system records routing with it.

Every problem raises ValueError naming the file, the line or layer, and what to fix. Counts must be
JSON numbers (not strings or booleans), finite and >= 0, and each layer's total (per micro-batch in
a routing log, per run in an aggregate) below 2**53 (`plan.checks.MAX_TOTAL`), the planner's limit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from micromoe.plan.checks import MAX_TOTAL, FloatArray, IntArray, positive_int

# the writer lives below sim and train (both use the format); re-exported here
from micromoe.routing_log import ROUTING_FORMAT, write_routing_record  # noqa: F401


@dataclass(frozen=True)
class AggregateTrace:
    """Per-layer expert counts summed over a run. counts: float64 [L, E], finite, >= 0, rows > 0."""

    name: str
    counts: FloatArray
    top_k: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutingTrace:
    """Per-micro-batch routing, replayed as is.

    counts: int64 [M, L, G, E]; `keys[m]` = (step, micro_batch); `layers[l]` = the layer id of row l.
    """

    name: str
    counts: IntArray
    keys: list[tuple[int, int]]
    layers: list[int]


Trace = AggregateTrace | RoutingTrace


def load_trace(path: str | Path) -> Trace:
    """Read an aggregate counts file or a JSON-lines routing log (detected from the content)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read trace {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"trace {str(path)!r} is not a UTF-8 text file (byte {exc.start}); give a JSON or JSON-lines trace"
        ) from None
    if not text.strip():
        raise ValueError(f"trace {str(path)!r} is empty")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values: a JSON-lines routing log
            return parse_routing_lines(text.splitlines(), name=path.name)
        raise ValueError(f"trace {str(path)!r} is not valid JSON: {exc}") from None
    if isinstance(doc, dict) and "step" in doc:  # a routing log with a single line
        return parse_routing_lines(text.splitlines(), name=path.name)
    if isinstance(doc, dict):  # every routing-log line has a step; an aggregate document does not
        return parse_aggregate(doc, name=path.name)
    raise ValueError(
        f"trace {str(path)!r}: expected a JSON object with a 'counts' key (aggregate counts) or JSON "
        f"lines of {{'step', 'layer', 'counts'}} (routing log), got a JSON {type(doc).__name__}"
    )


def parse_aggregate(doc: dict[str, Any], *, name: str = "<aggregate>") -> AggregateTrace:
    """Validate an aggregate document `{"counts": [[...E...] per layer], ...}`."""
    counts = _numeric_array(doc.get("counts"), f"{name}: counts", ndim=2)
    if counts.shape[0] < 1 or counts.shape[1] < 1:
        raise ValueError(
            f"{name}: counts must be [layers][experts] with at least one of each, got shape {counts.shape}"
        )
    _check_non_negative(counts, f"{name}: counts")
    for layer in range(counts.shape[0]):
        _check_total(counts[layer], f"{name}: layer {layer}")
    empty = np.flatnonzero(counts.sum(axis=1) <= 0)
    if empty.size:
        raise ValueError(f"{name}: layer {empty[0]} has no tokens (all counts 0); drop it or fix the file")
    for key, size in (("num_layers", counts.shape[0]), ("num_experts", counts.shape[1])):
        if key in doc and doc[key] != size:
            raise ValueError(f"{name}: {key}={doc[key]!r} disagrees with counts, which has {size}")
    top_k = doc.get("top_k")
    if top_k is not None:
        top_k = positive_int(top_k, f"{name}: top_k")
    meta = {k: v for k, v in doc.items() if k != "counts"}
    return AggregateTrace(name=name, counts=counts, top_k=top_k, meta=meta)


def parse_routing_lines(lines: Iterable[str], *, name: str = "<routing>") -> RoutingTrace:
    """Validate JSON lines of `{"step", ["micro_batch"], "layer", "counts"}` into a RoutingTrace."""
    records: dict[tuple[int, int], dict[int, IntArray]] = {}
    shape: tuple[int, int] | None = None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        rec = _json_object(line, where)
        step = _index(rec, "step", where)
        micro = _index(rec, "micro_batch", where, default=0)
        layer = _index(rec, "layer", where)
        counts = _numeric_array(rec.get("counts"), f"{where}: counts", ndim=2)
        if counts.shape[0] < 1 or counts.shape[1] < 1:
            raise ValueError(
                f"{where}: counts must be [GPUs][experts] with at least one of each, got shape {counts.shape}"
            )
        _check_non_negative(counts, f"{where}: counts")
        _check_total(counts, where)
        if not np.all(counts == np.floor(counts)):
            raise ValueError(f"{where}: counts must be whole token counts, got fractional entries")
        if shape is None:
            shape = counts.shape
        elif counts.shape != shape:
            raise ValueError(
                f"{where}: counts has shape {counts.shape} (GPUs x experts) but earlier lines have {shape}"
            )
        per_key = records.setdefault((step, micro), {})
        if layer in per_key:
            raise ValueError(f"{where}: layer {layer} of step {step} micro_batch {micro} appears twice")
        per_key[layer] = counts.astype(np.int64)
    if not records:
        raise ValueError(f"{name}: routing log holds no records")
    keys = sorted(records)
    layers = sorted(records[keys[0]])
    for key in keys:
        if sorted(records[key]) != layers:
            missing = sorted(set(layers) ^ set(records[key]))
            raise ValueError(
                f"{name}: step {key[0]} micro_batch {key[1]} does not list the same layers as step "
                f"{keys[0][0]} micro_batch {keys[0][1]} (differs in layer(s) {missing}); every micro-batch "
                "needs every layer"
            )
    counts = np.stack([np.stack([records[k][layer] for layer in layers]) for k in keys])
    return RoutingTrace(name=name, counts=counts, keys=keys, layers=layers)


# ------------------------------------------------------------------------------------------------
# validation helpers

_IS_NUMBER = np.frompyfunc(lambda x: type(x) in (int, float), 1, 1)  # bool is not int here


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise ValueError(
            f"{where}: expected a JSON object with step, layer, counts; got {type(rec).__name__}"
        )
    return rec


def _index(rec: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = rec.get(key, default)
    if value is None:
        raise ValueError(f"{where}: missing {key!r}; each line needs step, layer and counts")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {key} must be an integer >= 0, got {value!r}")
    return value


def _numeric_array(value: Any, what: str, *, ndim: int) -> FloatArray:
    if value is None:
        raise ValueError(f"{what} is missing")
    try:
        obj = np.array(value, dtype=object)
    except ValueError:
        obj = np.empty(0, dtype=object)
    if obj.ndim != ndim:
        raise ValueError(
            f"{what} must be a rectangular {ndim}-D array of numbers, got "
            f"{'ragged rows' if obj.ndim < ndim and isinstance(value, list) else f'{obj.ndim}-D data'}"
        )
    if obj.size:  # JSON numbers only: "1" and true are mistakes, not counts
        is_number = _IS_NUMBER(obj).astype(bool)
        if not is_number.all():
            idx = tuple(int(i) for i in np.argwhere(~is_number)[0])
            raise ValueError(
                f"{what}{list(idx)} = {json.dumps(obj[idx])}: counts must be JSON numbers, not strings, booleans or null"
            )
    try:
        arr = obj.astype(np.float64)
    except OverflowError:
        raise ValueError(
            f"{what} holds a number beyond any supported count (totals stay below 2**53)"
        ) from None
    if not np.all(np.isfinite(arr)):
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise ValueError(f"{what}{list(idx)} = {arr[idx]}: counts must be finite")
    return arr


def _check_total(arr: FloatArray, what: str) -> None:
    """One layer's selections (one micro-batch's, or a whole run's) must sum below MAX_TOTAL."""
    total = float(arr.sum())
    if not total < MAX_TOTAL:
        raise ValueError(
            f"{what}: counts sum to {total:.4g}; the largest supported total per layer is 2**53 - 1 "
            f"({MAX_TOTAL - 1:.4g}) selections"
        )


def _check_non_negative(arr: FloatArray, what: str) -> None:
    if arr.size and arr.min() < 0:
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmin(arr)), arr.shape))
        raise ValueError(f"{what}{list(idx)} = {arr[idx]}: counts must be >= 0")
