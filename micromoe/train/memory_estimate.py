"""A lower bound on one rank's memory, to refuse up front a run that cannot fit.

Counted: the parameters the rank holds (the dense part and the embeddings on every rank, its
expert slots: E x d / (d x EP) = E / EP per MoE layer) times their weight, gradient and two AdamW
moments; one micro-batch's float32 logits and their gradient; on a CPU host, each process's text
data and the interpreter with torch loaded. Activations, the allocator's slack and communication
buffers are left out, so a run refused here cannot fit, while a run let through may still run out
of memory later. (A full memory plan would count those too.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from micromoe.model import ModelConfig
from micromoe.runtime.layout import ParallelLayout
from micromoe.train.config import TrainConfig

PROCESS_BYTES = 200 * 2**20  # a Python process with torch imported (measured: 300-400 MB)
GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank (lower bounds, see the module docstring)."""

    params: int  # parameters held by the rank
    state_bytes: int  # weights, gradients and AdamW moments of those
    logits_bytes: int  # one micro-batch's float32 logits and their gradient
    host_bytes: int  # per process on the host: interpreter and in-memory data (CPU runs)

    @property
    def total(self) -> int:
        return self.state_bytes + self.logits_bytes + self.host_bytes


def params_per_rank(model_cfg: ModelConfig, layout: ParallelLayout | None) -> int:
    """Parameters one rank holds: everything but the experts, plus its expert slots."""
    c = model_cfg
    h, hd = c.hidden, c.dim_head
    attn = h * (c.num_heads + 2 * c.kv_heads) * hd + c.num_heads * hd * h + 2 * h  # + the two norms
    dense_ffn = 3 * h * (c.dense_ffn_hidden or c.top_k * c.ffn_hidden)
    slots = c.num_experts if layout is None else c.num_experts * layout.merge // layout.microep_size
    moe = c.num_experts * h + slots * 3 * h * c.ffn_hidden  # router + local expert slots
    embed = c.vocab_size * h * (1 if c.tie_embeddings else 2)
    return embed + h + c.num_layers * attn + c.num_dense_layers * dense_ffn + c.num_moe_layers * moe


def estimate(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    layout: ParallelLayout | None,
    *,
    device_type: str,
    data_bytes: int = 0,
) -> MemoryEstimate:
    """One rank's lower bound (bf16 weights on a GPU when cfg.bf16, else float32)."""
    params = params_per_rank(model_cfg, layout)
    width = 2 if device_type == "cuda" and cfg.bf16 else 4
    logits = 2 * 4 * cfg.micro_batch * model_cfg.seq_len * model_cfg.vocab_size
    host = PROCESS_BYTES + data_bytes if device_type == "cpu" else 0
    return MemoryEstimate(params, 4 * width * params, logits, host)


def available_bytes(device_type: str) -> int:
    """Memory one rank may use: its GPU's, or the host's (the cgroup limit when lower)."""
    if device_type == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def check_fits(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    layout: ParallelLayout | None,
    *,
    device_type: str,
    ranks_here: int,
    data_bytes: int = 0,
) -> MemoryEstimate:
    """The estimate; ValueError when even this lower bound exceeds the memory (on a CPU host,
    `ranks_here` processes share it; on GPUs each rank has its own)."""
    est = estimate(model_cfg, cfg, layout, device_type=device_type, data_bytes=data_bytes)
    have = available_bytes(device_type)
    sharing = ranks_here if device_type == "cpu" else 1
    if est.total * sharing > have:
        where = "GPU" if device_type == "cuda" else f"host ({sharing} processes)"
        raise ValueError(
            f"this run needs at least {est.total / GiB:.1f} GiB per rank ({est.params:,} parameters x "
            f"{est.state_bytes // max(est.params, 1)} bytes for weights, gradients and AdamW moments, "
            f"{est.logits_bytes / GiB:.1f} GiB of logits per micro-batch) but the {where} has "
            f"{have / GiB:.1f} GiB; use smaller --layers, --hidden, --ffn-hidden, --experts, "
            "--vocab-size or --micro-batch, or more ranks (--ep)"
        )
    return est
