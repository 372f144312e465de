"""Deterministic initialization by parameter name, whatever the sharding.

A training run builds its model on the meta device, shards it (experts owned once, dense
parameters under FSDP), and only then allocates and initializes what each rank keeps. So that
every layout starts from the same numbers, each tensor is drawn from its own generator, seeded by
(seed, its name) and, for experts, by the expert id: rank r initializes expert e exactly as a
single process would. `materialize` does this for a whole model.

Rules (by name): norm weights 1, biases 0, router and expert matrices normal with std 1/sqrt(fan
in), other matrices and embeddings normal with `init_std`, residual output projections (`proj`,
`down`) scaled by 1/sqrt(2 * num_layers).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from micromoe.model.transformer import ModelConfig, MoETransformer
from micromoe.runtime import GroupedSwiGLU, OwnedExperts


def _generator(seed: int, name: str, expert: int = -1) -> torch.Generator:
    key = zlib.crc32(name.encode()) + (expert + 1) * 0x1_0000_0000
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + key) % (2**63))


def init_tensor(
    name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int, *, expert: int = -1
) -> torch.Tensor:
    """float32 CPU tensor of `shape` for parameter `name` (one expert's slice when `expert` >= 0:
    `name` is then the layer's expert parameter, `.w_gate_up` [H, 2F] or `.w_down` [F, H])."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape)
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape)
    if leaf in ("w_gate_up", "w_down"):
        std = 1.0 / math.sqrt(shape[0])  # fan in: H for gate_up, F for down
    elif name.endswith("router.weight"):
        std = 1.0 / math.sqrt(shape[-1])
    else:
        std = cfg.init_std
        if name.endswith(("proj.weight", "down.weight")):
            std /= math.sqrt(2 * cfg.num_layers)
    return torch.randn(shape, generator=_generator(seed, name, expert)) * std


@torch.no_grad()
def materialize(model: MoETransformer, device: torch.device, seed: int) -> MoETransformer:
    """Allocate `model` (built on the meta device, possibly sharded) on `device` and initialize
    every parameter by `init_tensor`, every buffer as the model builds it. In place; returns it.
    Parameters keep their dtype (a bf16 model gets the float32 values rounded)."""
    tied = _tied_parameters(model)
    model.to_empty(device=device)
    for places in tied:  # to_empty makes new parameters off the meta device: tie them again
        first_mod, first_name = places[0]
        for mod, name in places[1:]:
            setattr(mod, name, getattr(first_mod, first_name))
    experts = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (OwnedExperts, GroupedSwiGLU)):
            ids = mod.owned if isinstance(mod, OwnedExperts) else tuple(range(mod.num_slots))
            experts.update({id(p): (f"{mod_name}.{n}", ids) for n, p in mod.named_parameters()})
    for name, p in model.named_parameters():
        if id(p) in experts:
            base, ids = experts[id(p)]
            for row, e in enumerate(ids):
                p[row].copy_(init_tensor(base, tuple(p.shape[1:]), model.cfg, seed, expert=e))
        elif isinstance(p, DTensor):
            full = init_tensor(name, tuple(p.shape), model.cfg, seed).to(device)
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(init_tensor(name, tuple(p.shape), model.cfg, seed))
    model.reset_buffers()
    return model


def _tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Every parameter held by more than one (module, attribute), e.g. a tied LM head."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            places.setdefault(id(p), []).append((mod, name))
    return [v for v in places.values() if len(v) > 1]
