"""Which expert-GEMM cost model a MicroEP dispatcher plans with.

A spec is one of:
  - None: plan tokens (the exact token optimum);
  - a `micromoe.plan.cost.CostModel`;
  - "bundled": the model shipped for this GPU and the layer's hidden/FFN shape;
  - "auto": calibrated at start-up on this GPU (about 2 s, `runtime.calibrate.calibrate_cost_model`);
  - any other string: a bundled name ("h200-4096x1536") or a JSON path (`plan.cost.load`).

Every rank of a MicroEP group must plan with the identical model (a different plan on one rank
deadlocks the all-to-all), so "auto" (calibration) and "bundled" (which depends on the GPU's name)
are resolved on the group's first rank only and its coefficients broadcast; the other specs read
the same file or object on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from micromoe.plan import cost as cost_models
from micromoe.plan.cost import CostModel
from micromoe.plan.timed import check_cost_model
from micromoe.runtime.calibrate import calibrate_cost_model

CostSpec = CostModel | str | None
AUTO_BUDGET_S = 2.0


def load_cost_spec(spec: CostSpec) -> CostModel | None:
    """A model from a spec that needs no GPU or group (None, a model, a bundled name or a path)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec in ("auto", "bundled"):
            raise ValueError(
                f"cost_model={spec!r} needs the layer's shape and device: pass it to apply_expert_parallel"
            )
        return cost_models.load(spec)  # checked there, naming the file
    if isinstance(spec, CostModel):
        return spec.check_plannable(where="cost_model")
    return check_cost_model(spec)


def check_layer_shape(model: CostModel | None, *, hidden: int, ffn: int, spec: object) -> None:
    """ValueError unless `model` was measured for this layer shape (meta 'hidden' and 'ffn'; a
    model without them, e.g. built in code, is taken as given): another shape's GEMMs take
    another time, so its plans would balance the wrong thing."""
    if model is None:
        return
    shape = (model.meta.get("hidden"), model.meta.get("ffn"))
    if None in shape or shape == (hidden, ffn):
        return
    name = spec if isinstance(spec, str) else "the cost model"
    raise ValueError(
        f"cost model {name!r} was measured for hidden {shape[0]} x FFN {shape[1]}, but the layer is "
        f"{hidden} x {ffn}; calibrate this shape (micromoe calibrate --hidden {hidden} --ffn {ffn} "
        "--out FILE) or pass the model of this shape"
    )


def resolve_cost_model(
    spec: CostSpec,
    *,
    hidden: int,
    ffn: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
    num_slots: int,
) -> CostModel | None:
    """The model for `spec` (module docstring), checked against the layer's `hidden` x `ffn`.
    "auto" and "bundled" are collective over `group` (every rank of it must call this together);
    the other specs are local."""
    model = _resolve(spec, hidden=hidden, ffn=ffn, device=device, group=group, num_slots=num_slots)
    check_layer_shape(model, hidden=hidden, ffn=ffn, spec=spec)
    return model


def _resolve(
    spec: CostSpec,
    *,
    hidden: int,
    ffn: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
    num_slots: int,
) -> CostModel | None:
    if spec == "bundled":
        if device.type != "cuda":
            raise ValueError("cost_model='bundled' picks the model of this GPU; the layer is not on a GPU")
        # resolved on the first rank only: in a mixed cluster the GPU names could differ
        return _from_first_rank(
            spec,
            lambda: cost_models.load(
                cost_models.bundled_name(torch.cuda.get_device_name(device), hidden, ffn)
            ),
            group,
            device,
        )
    if spec == "auto":
        return _from_first_rank(
            spec,
            lambda: calibrate_cost_model(hidden, ffn, device, budget_s=AUTO_BUDGET_S, num_slots=num_slots),
            group,
            device,
        )
    return load_cost_spec(spec)


def _from_first_rank(
    spec: str, make: Callable[[], CostModel], group: dist.ProcessGroup | None, device: torch.device
) -> CostModel:
    """`make()` on the group's first rank, its model (or its failure) broadcast to every rank."""
    first = group is None or dist.get_rank(group) == 0
    box: list[dict | None] = [None]
    failure: Exception | None = None
    if first:
        try:
            box[0] = make().to_json()
        except Exception as exc:  # the others wait in the broadcast: tell them, then raise
            failure = exc
            box[0] = {"error": f"{type(exc).__name__}: {exc}"}
    if group is not None:
        src = dist.get_global_rank(group, 0)
        # collective (MicroEP group): the first rank's model (or its failure) to every rank
        dist.broadcast_object_list(
            box, src=src, group=group, device=device if device.type == "cuda" else None
        )
    if failure is not None:
        raise failure
    if isinstance(box[0], dict) and "error" in box[0]:
        raise ValueError(f"cost_model={spec!r} failed on the group's first rank: {box[0]['error']}")
    where = f"cost_model={spec!r} from the group's first rank"
    return CostModel.from_json(box[0], where=where).check_plannable(where=where)
