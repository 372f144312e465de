"""micromoe.sim: trace-driven comparison of MoE load balancers (`micromoe simulate`).

Pure NumPy on top of `micromoe.plan`; never imports torch. Files: `traces` (file formats),
`workload` (sampling micro-batches), `eplb` and `lplb` (the peers), `balancers` (the common
interface), `runner` (the loop), `metrics`, `report` and `plot` (the outputs), `command` (the CLI).
"""

from micromoe.sim.balancers import BALANCERS, GroupConfig
from micromoe.sim.runner import simulate
from micromoe.sim.traces import load_trace, write_routing_record
from micromoe.sim.workload import Workload

__all__ = ["BALANCERS", "GroupConfig", "Workload", "load_trace", "simulate", "write_routing_record"]
