"""Workloads: the per-micro-batch routing counts a simulation replays.

Legend: M micro-batches, L layers, G source GPUs, E experts.

A workload is `counts[m, l, src, e]` (int64 [M, L, G, E]) plus `history[l, e]` (float64 [L, E]), the
long-run per-expert load that history-based placements (EPLB, LPLB's expert order) are built from.

Sampling model for aggregate traces and Zipf loads (`sample_counts`), per layer l with expert
distribution p_l (p_l = counts[l] / sum for a trace; Zipf: P(i-th most loaded) ~ i^-s):
- **drift** (shared by all GPUs of a micro-batch, correlated in time): log-weights
  z_m = rho * z_{m-1} + sqrt(1 - rho^2) * drift * N(0, 1) per expert, z_0 ~ drift * N(0, 1),
  rho = DRIFT_CORRELATION, so consecutive micro-batches differ a little and drift apart slowly,
  as expert popularity does during training;
- **per-source noise**: each source GPU's distribution is p_l * exp(z_m + noise * N(0, 1)),
  renormalized (different data on every GPU);
- **sampling**: the source's N * k selections (tokens per GPU x top-k) are a multinomial draw from
  that distribution. Selections are independent draws, so at extreme skew an expert may get more
  than N selections from one source; the balance problem only sees counts.
With drift = noise = 0 every micro-batch is a pure multinomial sample of p_l.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import MAX_TOTAL, FloatArray, IntArray, positive_int
from micromoe.sim.traces import AggregateTrace, RoutingTrace

DRIFT_CORRELATION = 0.9  # rho of the AR(1) drift between consecutive micro-batches


@dataclass(frozen=True)
class Workload:
    """Routing counts to replay. counts: int64 [M, L, G, E]; history: float64 [L, E] (>= 0).

    top_k: 0 for a replayed routing log (its counts already include every choice); layer_ids: the
    model's layer id of each row l (a routing log's own ids; None means 0..L-1).
    A *streamed* workload has counts=None and `stream`, a function that regenerates the same
    micro-batches (int64 [L, G, E] each, in order) on every call, and `stream_shape` (M, L, G, E):
    memory holds one micro-batch instead of all M. `micro_batches()` iterates either kind.
    """

    name: str
    counts: IntArray | None
    history: FloatArray
    top_k: int
    layer_ids: tuple[int, ...] | None = None
    stream: Callable[[], Iterator[IntArray]] | None = None
    stream_shape: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        streamed = self.stream is not None and self.stream_shape is not None
        assert (self.counts is None) == streamed, "a workload holds counts or streams them, not both"

    def micro_batches(self) -> Iterator[IntArray]:
        """The micro-batches in order: int64 [L, G, E] each (views of `counts`, or freshly sampled)."""
        if self.counts is not None:
            return iter(self.counts)
        assert self.stream is not None
        return self.stream()

    def first_micro_batch(self) -> IntArray:
        """int64 [L, G, E]: micro-batch 0."""
        return next(self.micro_batches())

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(M, L, G, E)."""
        if self.counts is not None:
            m, l, g, e = self.counts.shape
            return int(m), int(l), int(g), int(e)
        assert self.stream_shape is not None
        return self.stream_shape

    @property
    def num_micro_batches(self) -> int:
        return self.shape[0]

    @property
    def num_layers(self) -> int:
        return self.shape[1]

    @property
    def num_gpus(self) -> int:
        return self.shape[2]

    @property
    def num_experts(self) -> int:
        return self.shape[3]


def zipf_distribution(
    s: float, num_experts: int, num_layers: int, rng: np.random.Generator, *, shuffle: bool = True
) -> FloatArray:
    """float64 [L, E]: P(i-th most loaded expert) ~ i^-s.

    shuffle=True: each layer's hot experts sit at random expert ids; False: expert i is the
    (i+1)-th most loaded in every layer.
    """
    if not np.isfinite(s) or s < 0:
        raise ValueError(f"Zipf exponent must be finite and >= 0, got {s}")
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** -s
    weights /= weights.sum()
    out = np.empty((num_layers, num_experts))
    for layer in range(num_layers):
        out[layer, rng.permutation(num_experts) if shuffle else np.arange(num_experts)] = weights
    return out


def sample_counts(
    probs: npt.ArrayLike,
    *,
    num_micro_batches: int,
    num_gpus: int,
    tokens_per_gpu: int,
    top_k: int,
    noise: float,
    drift: float,
    rng: np.random.Generator,
) -> IntArray:
    """Sample int64 [M, L, G, E] counts from per-layer distributions probs [L, E] (see module doc)."""
    batches = iter_sampled_counts(
        probs,
        num_micro_batches=num_micro_batches,
        num_gpus=num_gpus,
        tokens_per_gpu=tokens_per_gpu,
        top_k=top_k,
        noise=noise,
        drift=drift,
        rng=rng,
    )
    return np.stack(list(batches))


def iter_sampled_counts(
    probs: npt.ArrayLike,
    *,
    num_micro_batches: int,
    num_gpus: int,
    tokens_per_gpu: int,
    top_k: int,
    noise: float,
    drift: float,
    rng: np.random.Generator,
) -> Iterator[IntArray]:
    """The micro-batches of `sample_counts` one at a time (int64 [L, G, E] each); checks the
    arguments now, samples lazily."""
    p = np.asarray(probs, dtype=np.float64)
    _check_sampling(p, num_micro_batches, num_gpus, tokens_per_gpu, top_k, noise, drift)
    return _sampled(
        p / p.sum(axis=1, keepdims=True),
        num_micro_batches,
        num_gpus,
        tokens_per_gpu * top_k,
        noise,
        drift,
        rng,
    )


def _sampled(
    p: FloatArray,
    num_micro_batches: int,
    num_gpus: int,
    draws: int,
    noise: float,
    drift: float,
    rng: np.random.Generator,
) -> Iterator[IntArray]:
    num_layers, num_experts = p.shape
    rho = DRIFT_CORRELATION
    z = drift * rng.standard_normal((num_layers, num_experts))
    for m in range(num_micro_batches):
        if m:
            z = rho * z + np.sqrt(1 - rho**2) * drift * rng.standard_normal(z.shape)
        eps = noise * rng.standard_normal((num_layers, num_gpus, num_experts))
        logw = z[:, None, :] + eps
        logw -= logw.max(axis=2, keepdims=True)  # exp stays in range
        q = p[:, None, :] * np.exp(logw)
        q /= q.sum(axis=2, keepdims=True)
        yield rng.multinomial(draws, q)


def workload_from_aggregate(
    trace: AggregateTrace,
    *,
    num_micro_batches: int,
    num_gpus: int,
    tokens_per_gpu: int,
    top_k: int,
    noise: float,
    drift: float,
    seed: int,
    stream: bool = False,
) -> Workload:
    """Sample micro-batches from an aggregate trace; its counts are EPLB's history.

    stream=True: sample each micro-batch when the runner reaches it (the same numbers)."""
    sampling = dict(
        num_micro_batches=num_micro_batches,
        num_gpus=num_gpus,
        tokens_per_gpu=tokens_per_gpu,
        top_k=top_k,
        noise=noise,
        drift=drift,
    )

    def batches() -> Iterator[IntArray]:
        return iter_sampled_counts(trace.counts, rng=np.random.default_rng(seed), **sampling)

    history = trace.counts.astype(np.float64)
    return _sampled_workload(trace.name, batches, history, top_k, stream, num_micro_batches, num_gpus)


def workload_from_zipf(
    s: float,
    *,
    num_experts: int,
    num_layers: int,
    num_micro_batches: int,
    num_gpus: int,
    tokens_per_gpu: int,
    top_k: int,
    noise: float,
    drift: float,
    seed: int,
    shuffle: bool = True,
    stream: bool = False,
) -> Workload:
    """Synthetic Zipf(s) loads, the same hot experts on every GPU; history = the Zipf distribution.

    stream=True: sample each micro-batch when the runner reaches it (the same numbers)."""
    probs = zipf_distribution(s, num_experts, num_layers, np.random.default_rng(seed), shuffle=shuffle)
    sampling = dict(
        num_micro_batches=num_micro_batches,
        num_gpus=num_gpus,
        tokens_per_gpu=tokens_per_gpu,
        top_k=top_k,
        noise=noise,
        drift=drift,
    )

    def batches() -> Iterator[IntArray]:
        rng = np.random.default_rng(seed)
        zipf_distribution(s, num_experts, num_layers, rng, shuffle=shuffle)  # the same rng state
        return iter_sampled_counts(probs, rng=rng, **sampling)

    return _sampled_workload(f"zipf s={s:g}", batches, probs, top_k, stream, num_micro_batches, num_gpus)


def _sampled_workload(
    name: str,
    batches: Callable[[], Iterator[IntArray]],
    history: FloatArray,
    top_k: int,
    stream: bool,
    num_micro_batches: int,
    num_gpus: int,
) -> Workload:
    """Eager (counts held) or streamed; calling `batches` validates the sampling arguments."""
    first = batches()
    if not stream:
        return Workload(name, np.stack(list(first)), history, top_k)
    num_layers, num_experts = history.shape
    shape = (num_micro_batches, num_layers, num_gpus, num_experts)
    return Workload(name, None, history, top_k, stream=batches, stream_shape=shape)


def workload_from_routing(trace: RoutingTrace, *, num_gpus: int | None, top_k: int) -> Workload:
    """Replay a routing log as is; history = its total per-expert load (an offline EPLB's input)."""
    if num_gpus is not None and trace.counts.shape[2] != num_gpus:
        raise ValueError(
            f"{trace.name}: the routing log has {trace.counts.shape[2]} source GPUs but --gpus is {num_gpus}; "
            "pass --gpus matching the log (or leave it out)"
        )
    if not trace.counts.any():
        raise ValueError(
            f"{trace.name}: the routing log holds no tokens (every count is 0): nothing to balance"
        )
    history = trace.counts.sum(axis=(0, 2)).astype(np.float64)
    return Workload(trace.name, trace.counts, history, top_k, tuple(trace.layers))


def _check_sampling(p, num_micro_batches, num_gpus, tokens_per_gpu, top_k, noise, drift) -> None:
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"probs must be a non-empty [layers, experts] array, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p.sum(axis=1) <= 0):
        raise ValueError("probs must be finite, >= 0, with a positive sum in every layer")
    for name, v in (
        ("micro-batches", num_micro_batches),
        ("gpus", num_gpus),
        ("tokens-per-gpu", tokens_per_gpu),
        ("top-k", top_k),
    ):
        positive_int(v, f"--{name}")
    if top_k > p.shape[1]:
        raise ValueError(f"--top-k {top_k} exceeds the {p.shape[1]} experts")
    if tokens_per_gpu * top_k * num_gpus >= MAX_TOTAL:
        raise ValueError(
            f"--tokens-per-gpu {tokens_per_gpu} x --top-k {top_k} x {num_gpus} GPUs = "
            f"{tokens_per_gpu * top_k * num_gpus:.4g} selections per layer and micro-batch; the largest "
            "supported total is 2**53 - 1"
        )
    for name, v in (("noise", noise), ("drift", drift)):
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"--{name} must be finite and >= 0, got {v}")
