"""micromoe.sim: trace-driven comparison of MoE load balancers (`micromoe simulate`).

Owns the offline evaluation: reading routing traces, sampling micro-batches, the peer balancers
(EPLB, LPLB) next to the MicroEP planner, the loop that times and measures them, and the report.
Pure NumPy on top of `micromoe.plan`; never imports torch or `micromoe.runtime`. Files: `traces`
(file formats), `workload` (sampling micro-batches), `eplb` and `lplb` (the peers), `balancers`
(the common interface and `GroupConfig`), `runner` (the loop; it times every balancer's decision
the same way; `progress` shows how far it got), `metrics`, `predicted` (expert time under a cost
model), `report` and `plot` (the outputs), `outputs` (output paths checked before any work),
`command_workloads` (the workloads built from the options), `command` (the CLI).
"""

from micromoe.sim.balancers import BALANCERS, GroupConfig
from micromoe.sim.runner import simulate
from micromoe.sim.traces import load_trace, write_routing_record
from micromoe.sim.workload import Workload

__all__ = ["BALANCERS", "GroupConfig", "Workload", "load_trace", "simulate", "write_routing_record"]
