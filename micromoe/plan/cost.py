"""Expert-GEMM cost model: predicted forward+backward expert time of one GPU from its slots' rows.

Legend: G GPUs, S local slots per GPU, N timing samples. Times are microseconds.

Grouped-GEMM time is not linear in rows: each non-empty slot costs whole row tiles of the kernel
and a group's setup, and the weight-gradient GEMMs (long K = rows) of the largest slot form a tail.
The model is

    t(rows[0..S)) = fixed_us + c_slot * S + sum_s f(rows[s]) + max_row_us * max_s rows[s]
    f(n) = c_row * n + c_tile * ceil(n / tile) + c_active * [n > 0] + c_nlogn * n * log2(n)
           + c_half_tile * ceil(n / (tile / 2)) + c_head * min(n, tile) + c_big * max(0, n - 4 tile)

with every coefficient >= 0, so f(0) == 0 and f is non-decreasing: the planner may treat a GPU's
time as separable over slots plus one max term. `c_slot * S` is a per-GPU constant for a given
placement (S local slots, used or not: an empty slot still gets its weight gradient written).
The convex n log n term prices uneven slots: on an H200 a GPU whose rows are spread unevenly over
its slots is slower than the linear and tile terms alone say (files without it read as 0). The
three *shape terms* (a second, half-size tile, the first tile's rows, rows past four tiles) make f
piecewise linear over tile multiples; they are fitted only when asked (`fit_cost_model(...,
shape_terms=True)`, used for the bundled models that have emulated-layer timings) and read as 0
from files without them. Fitted by non-negative least squares on relative error
(`fit_cost_model`); measured by `micromoe.runtime.calibrate`; stored as JSON (`save`, `load`);
H200 models for common shapes ship in `micromoe/data/cost_models/<name>.json`.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import IntArray

FloatArray = npt.NDArray[np.float64]

ROW_ALIGN = 8  # the dispatchers pad each slot's rows to this; models are measured at padded rows
FORMAT = "micromoe-cost-model"
VERSION = 1
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data" / "cost_models"
# coefficient fields of the JSON, all floats >= 0 (tile is an int >= 1)
_COEF_KEYS = (
    "fixed_us",
    "max_row_us",
    "c_slot",
    "c_row",
    "c_tile",
    "c_active",
    "c_nlogn",
    "c_half_tile",
    "c_head",
    "c_big",
)
_OPTIONAL_KEYS = ("c_nlogn", "c_half_tile", "c_head", "c_big")  # added after the first files; absent = 0
_SHAPE_KEYS = ("c_half_tile", "c_head", "c_big")  # fitted only with shape_terms=True
BIG_TILES = 4  # c_big prices rows past this many tiles of a slot
# `check_plannable`: more rows than a micro-batch gives a GPU, and a time whose sums over slots stay
# inside the planners' int64 units of 1e-6 us (9.2e12 us)
CHECK_ROWS = 1 << 20
PLANNABLE_US = 1e12


@dataclass(frozen=True)
class CostModel:
    """Predicted expert time (us, forward+backward) of one GPU from the rows of its local slots.

    Attributes:
        fixed_us: per-GPU constant (kernel launches, the non-grouped ops).
        max_row_us: coefficient on max_s rows[s] (the long-K weight-gradient tail); >= 0.
        tile: row tile of the GEMM kernel (e.g. 128); >= 1.
        c_slot: per local slot of the GPU, used or not (a per-GPU constant for a placement); >= 0.
        c_row, c_tile, c_active, c_nlogn, c_half_tile, c_head, c_big: coefficients of the
            per-slot cost f(n) (module docstring); >= 0.
        meta: free-form provenance: gpu, versions, hidden, ffn, dtype, fit error, samples.
    """

    fixed_us: float
    max_row_us: float
    tile: int
    c_slot: float = 0.0
    c_row: float = 0.0
    c_tile: float = 0.0
    c_active: float = 0.0
    c_nlogn: float = 0.0
    c_half_tile: float = 0.0
    c_head: float = 0.0
    c_big: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check_fields(self.to_json(), where="CostModel")

    # ----------------------------------------------------------------------------------------
    # prediction
    def slot_cost(self, rows: npt.ArrayLike) -> FloatArray:
        """f(n) elementwise: float64 of rows' shape; rows are non-negative integers."""
        n = np.asarray(rows)
        if n.size and (not np.issubdtype(n.dtype, np.integer) or n.min() < 0):
            raise ValueError(f"rows must be non-negative integers, got dtype {n.dtype} min {n.min()}")
        n = n.astype(np.int64)
        return _slot_features(n, self.tile) @ self.coefficients()[3:]

    def predict(self, rows_GS: npt.ArrayLike) -> FloatArray:
        """rows_GS int [G, S] (rows of each local slot of each GPU) -> predicted time float64 [G].

        = fixed_us + c_slot * S + sum_s f(rows[g, s]) + max_row_us * max_s rows[g, s].
        """
        rows = np.asarray(rows_GS)
        if rows.ndim != 2:
            raise ValueError(f"rows_GS must be 2-D [gpus, slots], got shape {rows.shape}")
        per_slot = self.slot_cost(rows).sum(axis=1)
        top = rows.max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
        const = self.fixed_us + self.c_slot * rows.shape[1]
        return const + per_slot + self.max_row_us * top.astype(np.float64)

    def slot_cost_table(self, max_rows: int) -> FloatArray:
        """f(0..max_rows) as float64 [max_rows + 1], for compiled planners."""
        if max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, got {max_rows}")
        return self.slot_cost(np.arange(max_rows + 1, dtype=np.int64))

    def convex_slot_cost_table(self, max_rows: int) -> FloatArray:
        """The convex part of f, c(n) = c_nlogn n log2 n + c_big max(0, n - 4 tile), for n = 0..max_rows
        (float64 [max_rows + 1]). f - c is subadditive (f(a + b) <= f(a) + f(b)); c is not: splitting
        a slot lowers it, which a lower bound on any plan's time must allow for."""
        convex_only = replace(self, c_row=0.0, c_tile=0.0, c_active=0.0, c_half_tile=0.0, c_head=0.0, meta={})
        return convex_only.slot_cost_table(max_rows)

    def slot_cost_table_int(self, max_rows: int, units_per_us: float) -> IntArray:
        """f(0..max_rows) as int64 [max_rows + 1] in units of 1 / `units_per_us` us, bit-identical
        on every machine: each coefficient is rounded to an integer once, the features are integers
        and n log2 n uses an integer logarithm, so no BLAS sum order or libm variant can change a
        value (the planner's search compares these, and every rank must plan identically).
        Within 1e-3 us of `slot_cost_table(n)` up to a million rows."""
        if max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, got {max_rows}")
        if max_rows >= _MAX_INT_TABLE:
            raise ValueError(
                f"slot cost tables stop at {_MAX_INT_TABLE - 1} rows per slot, asked for {max_rows}"
            )
        n = np.arange(max_rows + 1, dtype=np.int64)
        half = max(self.tile // 2, 1)
        features = {
            "c_row": n,
            "c_tile": (n + (self.tile - 1)) // self.tile,
            "c_active": (n > 0).astype(np.int64),
            "c_half_tile": (n + (half - 1)) // half,
            "c_head": np.minimum(n, self.tile),
            "c_big": np.maximum(n - BIG_TILES * self.tile, 0),
        }
        # coefficients as integers with 20 extra bits, so their rounding stays below one unit
        scale = 1 << _COEF_BITS
        out = np.zeros(n.size, dtype=object)  # exact Python-int sums: no int64 overflow to reason about
        for key, feature in features.items():
            q = round(getattr(self, key) * units_per_us * scale)
            if q:
                out += feature.astype(object) * q
        q = round(self.c_nlogn * units_per_us * scale)
        if q:
            out += n.astype(object) * _log2_fixed(n).astype(object) * q >> _LOG_BITS
        out = out >> _COEF_BITS
        return out.astype(np.int64)

    def check_plannable(self, *, where: str = "cost model") -> CostModel:
        """The model itself if a planner can use it, else ValueError naming `where`: its time must
        grow with rows (an all-zero model cannot tell plans apart) and stay below PLANNABLE_US for
        a GPU of CHECK_ROWS rows (1e300 coefficients would overflow the planners' integer time)."""
        if not any(getattr(self, k) for k in _COEF_KEYS if k not in ("fixed_us", "c_slot")):
            raise ValueError(
                f"{where} predicts the same time whatever the rows (every row coefficient is 0), so it "
                "cannot guide a plan; re-run `micromoe calibrate` for this GPU and shape"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            top = float(self.predict(np.array([[CHECK_ROWS]], dtype=np.int64))[0])
        if not top < PLANNABLE_US:
            raise ValueError(
                f"{where} predicts {top:.3g} us for a GPU of {CHECK_ROWS} rows, beyond the {PLANNABLE_US:.0e} "
                "us the planners' integer arithmetic holds: not a GPU's coefficients; re-run `micromoe calibrate`"
            )
        return self

    def coefficients(self) -> FloatArray:
        """float64 [10] in the column order of `design_matrix` (`_COEF_KEYS`)."""
        return np.array([getattr(self, k) for k in _COEF_KEYS], dtype=np.float64)

    # ----------------------------------------------------------------------------------------
    # files
    def to_json(self) -> dict[str, Any]:
        """The JSON object `from_json` reads (format tag, version, coefficients, meta)."""
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "tile": self.tile}
        out.update({k: getattr(self, k) for k in _COEF_KEYS})
        out["meta"] = self.meta
        return out

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "cost model") -> CostModel:
        """Validate and build from a parsed JSON object; ValueError names `where` and the problem."""
        _check_fields(obj, where=where)
        coefs = {k: float(obj.get(k, 0.0)) for k in _COEF_KEYS}
        return cls(tile=int(obj["tile"]), meta=dict(obj.get("meta", {})), **coefs)

    def save(self, path: str | Path) -> None:
        """Write the model as indented JSON (parent folders must exist)."""
        Path(path).write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")


def _check_fields(obj: Any, *, where: str) -> None:
    """Raise ValueError naming `where` and the first problem of a cost-model JSON object."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("format") != FORMAT:
        raise ValueError(f"{where}: 'format' must be {FORMAT!r}, got {obj.get('format')!r}")
    if obj.get("version") != VERSION:
        raise ValueError(
            f"{where}: unsupported version {obj.get('version')!r} (this micromoe reads version {VERSION}); "
            "re-run `micromoe calibrate` to write a current file"
        )
    missing = [k for k in (*_COEF_KEYS, "tile") if k not in obj and k not in _OPTIONAL_KEYS]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    for key in (k for k in _COEF_KEYS if k in obj):
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where}: {key!r} must be a number, got {type(v).__name__} {v!r}")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}: {key!r} must be finite and >= 0, got {v!r}")
    tile = obj["tile"]
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"{where}: 'tile' must be an integer >= 1, got {tile!r}")
    if not isinstance(obj.get("meta", {}), dict):
        raise ValueError(f"{where}: 'meta' must be an object, got {type(obj['meta']).__name__}")


def _nlogn(n: np.ndarray) -> np.ndarray:
    """n * log2(n) for int n >= 0 (0 at n = 0 and 1): float64, non-decreasing."""
    return n * np.log2(np.maximum(n, 1))


_LOG_BITS = 30  # fractional bits of `_log2_fixed` (its mantissa is Q30)
_COEF_BITS = 20  # extra bits of the integer coefficients in `slot_cost_table_int`
_MAX_INT_TABLE = 1 << 32  # n << 30 in `_log2_fixed` stays inside int64 below 2**33


def _log2_fixed(n: np.ndarray) -> IntArray:
    """floor-like log2(max(n, 1)) * 2**30 for int64 n, by integers only (exact frexp for the
    integer part, then bit-by-bit squaring of the mantissa in Q30): non-decreasing in n and the
    same on every machine."""
    n = np.maximum(np.asarray(n, dtype=np.int64), 1)
    k = (np.frexp(n.astype(np.float64))[1] - 1).astype(np.int64)  # exact for n < 2**53
    m = (n << 30) >> k  # mantissa in [2**30, 2**31)
    frac = np.zeros_like(n)
    for _ in range(_LOG_BITS):
        m = (m * m) >> 30
        bit = m >= (1 << 31)
        frac = (frac << 1) | bit
        m = np.where(bit, m >> 1, m)
    return (k << _LOG_BITS) + frac


def _slot_features(n: np.ndarray, tile: int) -> FloatArray:
    """Per-slot features of f (coefficients c_row .. c_big): int64 n [...] -> float64 [..., 7].

    Each is 0 at n = 0 and non-decreasing, so any non-negative combination is a valid f.
    """
    half = max(tile // 2, 1)
    cols = [
        n,
        (n + (tile - 1)) // tile,
        n > 0,
        _nlogn(n),
        (n + (half - 1)) // half,
        np.minimum(n, tile),
        np.maximum(n - BIG_TILES * tile, 0),
    ]
    return np.stack([np.asarray(c, dtype=np.float64) for c in cols], axis=-1)


# --------------------------------------------------------------------------------------------
# loading by name or path
def bundled_models() -> list[str]:
    """Names of the cost models shipped with micromoe (e.g. 'h200-4096x1536')."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.json"))


def bundled_name(gpu_name: str, hidden: int, ffn: int) -> str:
    """The bundled-model name for a GPU and shape: ('NVIDIA H200', 4096, 1536) -> 'h200-4096x1536'."""
    words = gpu_name.lower().replace("nvidia", "").split()
    return f"{words[0] if words else 'gpu'}-{hidden}x{ffn}"


def load(name_or_path: str | Path) -> CostModel:
    """A bundled model by name ('h200-4096x1536') or a JSON file by path; ValueError if bad."""
    path = Path(name_or_path)
    if not path.is_file():
        bundled = BUNDLED_DIR / f"{name_or_path}.json"
        if str(name_or_path).endswith(".json") or not bundled.is_file():
            raise ValueError(
                f"cost model {str(name_or_path)!r} is neither a file nor a bundled name; "
                f"bundled: {', '.join(bundled_models()) or '(none)'}"
            )
        path = bundled
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cost model file {path}: not readable JSON ({exc})") from exc
    return CostModel.from_json(obj, where=f"cost model file {path}").check_plannable(
        where=f"cost model file {path}"
    )


# --------------------------------------------------------------------------------------------
# fitting
def design_matrix(rows_NS: npt.ArrayLike, tile: int, num_slots_N: npt.ArrayLike | None = None) -> FloatArray:
    """Feature columns (in `_COEF_KEYS` order) of each sample: float64 [N, 10].

    Args:
        rows_NS: int [N, S]: rows per local slot of each sample, zero-padded on the right.
        tile: the GEMM row tile.
        num_slots_N: int [N]: each timed GPU's slot count (used or not); default S for all.
    """
    rows = np.asarray(rows_NS, dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] < 1:
        raise ValueError(f"rows_NS must be 2-D [samples, slots] with >= 1 slot, got shape {rows.shape}")
    if rows.size and rows.min() < 0:
        raise ValueError("rows_NS must be >= 0 (pad samples with fewer slots with zeros)")
    slots = np.full(rows.shape[0], rows.shape[1]) if num_slots_N is None else np.asarray(num_slots_N)
    if slots.shape != (rows.shape[0],):
        raise ValueError(f"num_slots_N must have one entry per sample, got shape {slots.shape}")
    head = np.stack([np.ones(rows.shape[0]), rows.max(axis=1), slots], axis=1).astype(np.float64)
    return np.concatenate([head, _slot_features(rows, tile).sum(axis=1)], axis=1)


def nnls(a: FloatArray, b: FloatArray) -> FloatArray:
    """min ||a x - b||, x >= 0, exactly, by least squares on every support (few columns only).

    The optimum's support P satisfies the KKT conditions, so the unconstrained least squares on P
    is non-negative and attains it; every other non-negative support solution is feasible and no
    better. 2^k solves for k columns: fine for the 7 (or 10) of the cost model.
    """
    k = a.shape[1]
    assert k <= 10, "exhaustive NNLS is for a handful of columns"
    best, best_res = np.zeros(k), float(b @ b)
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(sol < 0):
                continue
            res = float(np.sum((a[:, cols] @ sol - b) ** 2))
            if res < best_res - 1e-12 * max(best_res, 1.0):
                best = np.zeros(k)
                best[cols] = sol
                best_res = res
    return best


def fit_cost_model(
    rows_NS: npt.ArrayLike,
    times_us_N: npt.ArrayLike,
    *,
    tile: int,
    meta: dict[str, Any] | None = None,
    num_slots_N: npt.ArrayLike | None = None,
    weights_N: npt.ArrayLike | None = None,
    shape_terms: bool = False,
) -> CostModel:
    """Fit the coefficients by non-negative least squares on relative error.

    Args:
        rows_NS: int [N, S]: each sample's rows per local slot (zeros for unused slots).
        times_us_N: float [N]: measured time of each sample (us), > 0.
        tile: the GEMM row tile used by the slot term ceil(n / tile).
        meta: provenance stored in the model; the fit's in-sample relative errors are added as
            meta['fit'] = {'samples', 'median_rel_err', 'p90_rel_err'}.
        num_slots_N: int [N]: each timed GPU's slot count when samples differ (default S).
        weights_N: float [N] >= 0: weight of each sample's relative error (default 1), e.g. to
            balance designed calibration samples against timings of real plans.
        shape_terms: also fit c_half_tile, c_head and c_big (else they are 0). Worth it only with
            plan-shaped samples: on designed splits alone they did not improve held-out error.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    a = design_matrix(rows_NS, tile, num_slots_N)
    free = [i for i, k in enumerate(_COEF_KEYS) if shape_terms or k not in _SHAPE_KEYS]
    t = np.asarray(times_us_N, dtype=np.float64)
    if t.shape != (a.shape[0],) or a.shape[0] < len(free):
        raise ValueError(
            f"need >= {len(free)} samples and one time per sample; got {t.shape} for {a.shape[0]}"
        )
    if not np.all(np.isfinite(t)) or t.min() <= 0:
        raise ValueError("times_us_N must be finite and > 0")
    sw = np.ones_like(t) if weights_N is None else np.asarray(weights_N, dtype=np.float64)
    if sw.shape != t.shape or not np.all(np.isfinite(sw)) or sw.min() < 0 or sw.max() <= 0:
        raise ValueError(
            f"weights_N must be finite, >= 0, not all 0 and one per sample; got shape {sw.shape}"
        )
    w = a[:, free] / t[:, None] * sw[:, None]  # relative error: each equation divided by its time
    scale = np.linalg.norm(w, axis=0)
    scale[scale == 0] = 1.0
    x = np.zeros(len(_COEF_KEYS))
    x[free] = nnls(w / scale, sw) / scale
    coefs = {k: float(v) for k, v in zip(_COEF_KEYS, x, strict=True)}
    rel = np.abs(a @ x - t) / t
    fit = {
        "samples": int(t.size),
        "median_rel_err": float(np.median(rel)),
        "p90_rel_err": float(np.quantile(rel, 0.9)),
    }
    return CostModel(tile=int(tile), meta={**(meta or {}), "fit": fit}, **coefs)


def relative_errors(
    model: CostModel,
    rows_NS: npt.ArrayLike,
    times_us_N: npt.ArrayLike,
    num_slots_N: npt.ArrayLike | None = None,
) -> FloatArray:
    """|predicted - measured| / measured per sample: float64 [N] (arguments as `fit_cost_model`)."""
    t = np.asarray(times_us_N, dtype=np.float64)
    pred = design_matrix(rows_NS, model.tile, num_slots_N) @ model.coefficients()
    return np.abs(pred - t) / t
