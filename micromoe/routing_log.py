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

ROUTING_FORMAT = "micromoe-routing-v1"


def write_routing_record(
    fp: IO[str], *, step: int, layer: int, counts: npt.ArrayLike, micro_batch: int = 0
) -> None:
    """Append one routing-log line. counts: int [G, E] token selections per source GPU and expert."""
    arr = np.asarray(counts)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"counts must be an integer [G, E] array, got shape {arr.shape} dtype {arr.dtype}")
    rec = {"step": int(step), "micro_batch": int(micro_batch), "layer": int(layer), "counts": arr.tolist()}
    fp.write(json.dumps(rec, separators=(",", ":")) + "\n")
