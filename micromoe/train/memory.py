"""The memory plan: what one rank holds while training, and whether it fits the device.

Counted per rank, from the model's exact parameter counts (a meta-device model) and the layout:
- master weights and optimizer state: dense parameters sharded over all W ranks (FSDP), experts
  owned once per MicroEP group (at most ceil(E / G) per layer per rank); AdamW keeps two moments;
- gradients: the dense shard and the owned experts, in the master dtype;
- working copies: FSDP's gathered dense weights (the root's embedding and head for the whole step,
  two blocks at a time: the current one and the prefetched next), the gathered expert slots (S per
  layer; kept from forward to backward for every layer without activation checkpointing, for two
  layers at a time with it, for every layer and the whole step with `--expert-gather step`, which
  also keeps their summed gradients), and the transient gradient buffers of one layer;
- activations for one micro-batch (B sequences of T tokens): per block the tensors autograd keeps
  (residual inputs, q/k/v, attention output, the MoE layer's dispatched rows, its grouped-GEMM
  intermediates); with `--ac full` only each block's input plus one block recomputed, with
  `--ac moe` the attention's and the MoE layer's input; the logits and their float32 loss;
- a fixed runtime reserve (CUDA context, NCCL buffers, allocator slack).

The rule a run follows: it starts only if the total is at most the device's memory (GPU memory on
CUDA; the host's memory shared by the local ranks on CPU), unless `--force`. `micromoe train
--dry-run` prints this plan and starts nothing.
Legend: W ranks, G GPUs of a MicroEP group, E experts, S local slots, L blocks, H hidden, F expert
FFN hidden, K top-k, B micro-batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from micromoe.model import ModelConfig, MoETransformer
from micromoe.model.transformer import Block
from micromoe.runtime import MoELayer, ParallelLayout
from micromoe.train.config import TrainConfig
from micromoe.train.precision import PrecisionPlan

GIB = 1024**3
RUNTIME_RESERVE = {"cuda": 2 * GIB, "cpu": GIB // 2}  # CUDA context + NCCL; a CPU process
ROW_MARGIN = 1.10  # rows per rank above the even share (MicroEP keeps max/mean near 1)


@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: int
    note: str


@dataclass(frozen=True)
class MemoryPlan:
    """One rank's memory: `items` (bytes each), their `total`, the device's `capacity`."""

    items: tuple[MemoryItem, ...]
    capacity: int
    where: str
    precision: PrecisionPlan

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def headroom(self) -> float:
        """Share of the capacity left (negative when it does not fit)."""
        return 1.0 - self.total / self.capacity

    def largest(self, n: int = 2) -> list[MemoryItem]:
        return sorted(self.items, key=lambda i: -i.bytes)[:n]

    def verdict(self) -> str:
        """The last line of the plan: fits or does not fit, with the headroom (and why)."""
        t, c = self.total / GIB, self.capacity / GIB
        if self.fits:
            return (
                f"fits: {t:.1f} of {c:.1f} GiB per rank ({100 * self.headroom:.0f}% headroom) on {self.where}"
            )
        why = ", ".join(f"{i.name} {i.bytes / GIB:.1f} GiB" for i in self.largest())
        return f"does not fit: {t:.1f} GiB per rank needed, {c:.1f} GiB on {self.where} (largest: {why}); {self._hint()}"

    def _hint(self) -> str:
        top = self.largest(1)[0].name
        if top in ("master weights", "optimizer state", "gradients"):
            return "use more GPUs or a larger --ep (experts are owned once per MicroEP group of d*EP GPUs)"
        if top == "activations":
            return "use --ac full or moe, a smaller --micro-batch or --seq-len"
        if top == "expert slots":
            return "use --expert-gather micro, --ac moe or full, or more GPUs"
        return "use more GPUs or a smaller model"

    def table(self) -> str:
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 1024**2)
        width = max(len(i.name) for i in self.items)
        lines = [f"{'per rank':<{width}}  {unit:>8}  what"]
        lines += [f"{i.name:<{width}}  {i.bytes / scale:>8.2f}  {i.note}" for i in self.items]
        lines.append(f"{'total':<{width}}  {self.total / scale:>8.2f}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Counts:
    """Parameter counts of the unsharded model."""

    root: int  # embedding, head, final norm (a tied head counted once)
    block_dense: list[int]  # per block: everything but the routed experts
    per_expert: int  # 3 * H * F


def _counts(model_cfg: ModelConfig) -> _Counts:
    """Counted on meta-device modules (no memory): one model of one block for the root, one
    block of each kind (dense, MoE) for the rest, so a model of any depth costs the same."""
    one = dataclasses.replace(model_cfg, num_layers=1, num_dense_layers=0)
    with torch.device("meta"):
        small = MoETransformer(one)
        kinds = {moe: Block(model_cfg, moe=moe) for moe in {False, True}}
    block_ids = {id(p) for b in small.blocks for p in b.parameters()}
    root = sum(p.numel() for p in small.parameters() if id(p) not in block_ids)

    def dense_part(block: Block) -> int:
        experts = set(map(id, block.ffn.experts.parameters())) if isinstance(block.ffn, MoELayer) else set()
        return sum(p.numel() for p in block.parameters() if id(p) not in experts)

    per_kind = {moe: dense_part(b) for moe, b in kinds.items()}
    blocks = [per_kind[i >= model_cfg.num_dense_layers] for i in range(model_cfg.num_layers)]
    return _Counts(root, blocks, 3 * model_cfg.hidden * model_cfg.ffn_hidden)


def plan_memory(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    precision: PrecisionPlan,
    *,
    world: int,
    layout: ParallelLayout | None,
    capacity: int,
    device: str,
    where: str,
) -> MemoryPlan:
    """The memory plan of one rank (the busiest: the most owned experts) on a `device` ("cuda" or
    "cpu") of `capacity` bytes, described as `where`: its items at the peak (module doc)."""
    n = _counts(model_cfg)
    m, c = precision.master.itemsize, precision.compute.itemsize
    e, num_moe = model_cfg.num_experts, model_cfg.num_moe_layers
    g = layout.microep_size if layout is not None else 1
    slots = e * (layout.merge if layout is not None else 1) // g
    owned = math.ceil(e / g) * num_moe * n.per_expert
    dense = n.root + sum(n.block_dense)
    masters = (math.ceil(dense / world) + owned) * m
    sharded = world > 1 or precision.casts  # FSDP runs (one rank too, for mixed precision)
    block = max(n.block_dense, default=0)
    working = (n.root + 2 * block) * c if sharded else 0  # gathered root for the step, 2 blocks
    early_grads = n.root * (m + (c if sharded else 0))  # the head's and embedding's, first in the backward
    kept = _slots_kept(
        cfg, n, slots, num_moe, c, copies=layout is not None or precision.casts, owned=layout is not None
    )
    slot_grads = slots * n.per_expert * (c + 4 + (4 if layout is not None else 0))  # one layer's return
    acts = _activations(model_cfg, cfg, c, rows_margin=ROW_MARGIN if g > 1 else 1.0)
    logits = cfg.micro_batch * model_cfg.seq_len * model_cfg.vocab_size * (c + 12)
    loss_peak = working + kept + acts + logits  # the loss's backward: every activation still kept
    moe_peak = working + kept + acts + early_grads + slot_grads  # an MoE layer's backward
    compute = max(loss_peak, moe_peak)
    accumulating = cfg.grad_accum > 1  # earlier micro-batches' gradients stay through the next ones
    foreach_temp = math.ceil(dense / world) * m  # AdamW's multi-tensor step on the FSDP shards
    items = [
        MemoryItem(
            "master weights",
            masters,
            f"{_bn(dense)} dense / {world} rank{'s' if world > 1 else ''} + owned experts",
        ),
        MemoryItem("optimizer state", 2 * masters, "AdamW moments, same dtype"),
    ]
    if masters + foreach_temp >= compute + (masters if accumulating else 0):  # the optimizer step
        items.append(MemoryItem("gradients", masters, "dense shard + owned experts"))
        items.append(
            MemoryItem("optimizer step", foreach_temp, "the peak: AdamW's temporaries on the dense shard")
        )
    else:
        if accumulating:
            items.append(MemoryItem("gradients", masters, "kept over the micro-batches of a step"))
        what = "logits and loss" if loss_peak >= moe_peak else "gradients returning"
        items += [
            MemoryItem("working weights", working, "FSDP-gathered root + 2 blocks" if sharded else "none"),
            MemoryItem(
                "expert slots",
                kept,
                _slot_note(cfg, slots, layout is not None or precision.casts, layout is not None),
            ),
            MemoryItem(
                "activations", acts, f"micro-batch {cfg.micro_batch} x {model_cfg.seq_len}, --ac {cfg.ac}"
            ),
            MemoryItem(what, compute - working - kept - acts, _peak_note(loss_peak >= moe_peak)),
        ]
    items.append(MemoryItem("runtime reserve", RUNTIME_RESERVE[device], "context, communication buffers"))
    return MemoryPlan(tuple(items), capacity, where, precision)


def _bn(x: int) -> str:
    return f"{x / 1e9:.2f}B" if x >= 1e8 else f"{x / 1e6:.1f}M"


def _slots_kept(
    cfg: TrainConfig, n: _Counts, slots: int, num_moe: int, c: int, *, copies: bool, owned: bool
) -> int:
    """Gathered slot copies alive at the peak (none when the experts compute in their masters'
    dtype on one process: no copy is made). `--expert-gather step` applies to owned experts only
    (one process casts its experts per micro-batch)."""
    if not copies:
        return 0
    one = slots * n.per_expert * c
    if cfg.expert_gather == "step" and owned:
        return num_moe * (one + slots * n.per_expert * 4)  # copies and their summed gradients
    return num_moe * one if cfg.ac == "none" else one


def _slot_note(cfg: TrainConfig, slots: int, copies: bool, owned: bool) -> str:
    if not copies:
        return "none: the experts compute in their masters' dtype"
    if cfg.expert_gather == "step" and owned:
        return f"{slots} slots x every layer, kept for the step, with summed gradients"
    return f"{slots} slots x {'every layer' if cfg.ac == 'none' else 'the recomputed layer'}"


def _peak_note(loss: bool) -> str:
    if loss:
        return "the peak: bf16 logits and three float32 [tokens, V] arrays in the loss's backward"
    return "the peak: early gradients and one layer's slot gradients on their way to the owners"


def _activations(mc: ModelConfig, cfg: TrainConfig, c: int, *, rows_margin: float) -> int:
    """Bytes autograd keeps for one micro-batch (module doc), the logits excluded."""
    tokens = cfg.micro_batch * mc.seq_len
    h, hd, nh, nkv = mc.hidden, mc.dim_head, mc.num_heads, mc.kv_heads
    attn = tokens * (2 * h + (2 * nh + 3 * nkv) * hd + nh * hd) * c + tokens * nh * 4
    rows = int(tokens * mc.top_k * rows_margin)
    # router input and probabilities; per dispatched row its input and output (H each), the
    # gate/up output (2F) and the activation (F)
    moe = tokens * h * c + tokens * mc.num_experts * 4 + rows * (2 * h + 3 * mc.ffn_hidden) * c
    dense_f = mc.dense_ffn_hidden or mc.top_k * mc.ffn_hidden
    dense = tokens * (h + 3 * dense_f) * c
    per_block = [attn + (moe if i >= mc.num_dense_layers else dense) for i in range(mc.num_layers)]
    if cfg.ac == "full":
        return mc.num_layers * tokens * h * c + max(per_block)
    if cfg.ac == "moe":
        kept = [
            attn + tokens * h * c if i >= mc.num_dense_layers else attn + dense for i in range(mc.num_layers)
        ]
        return sum(kept) + moe
    return sum(per_block)


def device_capacity(device: torch.device, local_ranks: int) -> tuple[int, str]:
    """(bytes one rank may use, a description): the GPU's memory, or the host's shared by the
    local ranks."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total, f"{torch.cuda.get_device_name(device)} ({total / GIB:.0f} GiB)"
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(1, local_ranks), f"CPU ({total / GIB:.0f} GiB RAM / {local_ranks} ranks)"
