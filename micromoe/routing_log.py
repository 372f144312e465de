"""The per-micro-batch routing-log format ("micromoe-routing-v1"), shared by the trainer that
writes it and the simulator that replays it (`micromoe.sim.traces` reads and documents it).

One JSON object per line, one line per (step, micro-batch, MoE layer)::

    {"step": 12, "micro_batch": 0, "layer": 3, "counts": [[...E counts...], ...G rows...]}

`counts[src][e]` = token selections on source GPU src for expert e (each top-k choice counts once).
"""

from __future__ import annotations

import json
from typing import IO

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import MAX_TOTAL

ROUTING_FORMAT = "micromoe-routing-v1"


def write_routing_record(
    fp: IO[str], *, step: int, layer: int, counts: npt.ArrayLike, micro_batch: int = 0
) -> None:
    """Append one routing-log line. counts: int [G, E] token selections per source GPU and expert.

    Refuses (ValueError) what the reader would refuse: step, micro_batch or layer that is not an
    integer >= 0; counts that are not a non-empty integer [G, E] array of values >= 0 summing below
    2**53.
    """
    index = {"step": step, "micro_batch": micro_batch, "layer": layer}
    for key, value in index.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    arr = np.asarray(counts)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"counts must be a non-empty integer [G, E] array, got shape {arr.shape} dtype {arr.dtype}"
        )
    if arr.min() < 0:
        g, e = (int(i) for i in np.argwhere(arr < 0)[0])
        raise ValueError(f"counts[{g}, {e}] = {arr[g, e]}: token counts must be >= 0")
    if float(arr.sum(dtype=np.float64)) >= MAX_TOTAL:
        raise ValueError("counts sum to 2**53 or more; the largest supported total per layer is 2**53 - 1")
    rec = {**{k: int(v) for k, v in index.items()}, "counts": arr.tolist()}
    fp.write(json.dumps(rec, separators=(",", ":")) + "\n")
