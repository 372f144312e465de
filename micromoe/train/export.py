"""`micromoe export`: a training run's checkpoint -> a Hugging Face folder `from_pretrained` loads.

    micromoe export --checkpoint RUN_OUT --hf EXPORT_DIR [--step N] [--dtype bfloat16] [--shard-size 5GB]

Reads the checkpoint by logical names (every expert by its id, whatever placement, EP, d or world
size wrote it) one tensor at a time on one CPU process, and writes config.json (the source
model's, updated for the layers and vocabulary the run kept; a Mixtral config for a run that did
not start from `--hf`), the weights as safetensors shards with an index, and the tokenizer files
of the run's `--hf` folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from micromoe.model import ModelConfig
from micromoe.model.hf import TOKENIZER_FILES, hf_config, hf_tensors, logical_rules, read_config, write_shards
from micromoe.train import checkpoint as ckpt

log = logging.getLogger("micromoe.export")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (decimal units, binary with 'i')."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"--shard-size {text!r}: expected a size such as 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return max(1, int(float(m.group(1)) * scale))


def source_of(meta: dict[str, Any]) -> tuple[dict[str, Any] | None, Path | None]:
    """(the source folder's config.json, the folder) a run was started from with `--hf`; (None,
    None) without. Reads meta["hf"] = {"config": ..., "path": ...}, else the `hf` training option."""
    hf = meta.get("hf")
    if isinstance(hf, dict) and isinstance(hf.get("config"), dict):
        return hf["config"], Path(hf["path"]) if hf.get("path") else None
    path = (meta.get("train") or {}).get("hf")
    if path:
        return read_config(Path(path)), Path(path)
    return None, None


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--hf {out}: exists and is not an empty folder; remove it or choose another")


def export_model(
    cfg: ModelConfig,
    tensor: Callable[[str], torch.Tensor],
    out: Path,
    *,
    base: dict[str, Any] | None = None,
    source: Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
) -> Path:
    """Write the model whose logical tensors `tensor(name)` returns as a Hugging Face folder.

    Args:
        cfg: the model's config.
        tensor: logical name -> tensor (read when asked, one at a time).
        out: the folder to create (must not exist or be empty).
        base: the source model's config.json (None: a Mixtral config).
        source: the source model folder, whose tokenizer files are copied (None: none).
        dtype: "float32", "bfloat16" or "float16" (None: the base's dtype, else float32).
        max_shard_bytes: largest shard.

    Returns `out`.
    """
    out = Path(out)
    _check_out(out)
    config = hf_config(cfg, base)
    dtype = dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    rules = logical_rules(cfg, config["architectures"][0])
    out.mkdir(parents=True, exist_ok=True)
    pieces = ((name, t.to(DTYPES[dtype])) for name, t in hf_tensors(rules, tensor))
    shards = write_shards(out, pieces, max_shard_bytes=max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = _copy_tokenizer(source, out) if source is not None else []
    log.info(
        "exported %s (%d layers, %s) to %s: %d shard(s), tokenizer files: %s",
        config["architectures"][0],
        cfg.num_layers,
        dtype,
        out,
        len(shards),
        ", ".join(copied) or "none",
    )
    return out


def _copy_tokenizer(source: Path, out: Path) -> list[str]:
    if not source.is_dir():
        log.warning("the run's --hf folder %s is gone: the export has no tokenizer files", source)
        return []
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, out / name)
    return copied


def export_checkpoint(
    run_out: Path,
    out: Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
) -> Path:
    """`export_model` for the checkpoint of `step` (default: the latest) of the run folder `run_out`."""
    _check_out(Path(out))
    open_checkpoint = getattr(ckpt, "open_checkpoint", None)
    if open_checkpoint is None:
        raise ValueError("this build of micromoe cannot read checkpoints by logical name yet")
    reader = open_checkpoint(Path(run_out), step)
    cfg = ModelConfig(**reader.meta["model"])
    base, source = source_of(reader.meta)
    rules = logical_rules(cfg, hf_config(cfg, base)["architectures"][0])
    missing = sorted(
        set(rules) - set(reader.tensor_names()) - ({"head.weight"} if cfg.tie_embeddings else set())
    )
    if missing:
        raise ValueError(
            f"checkpoint under {run_out} lacks {len(missing)} model tensors, e.g. {missing[0]!r}"
        )
    return export_model(
        cfg, reader.tensor, out, base=base, source=source, dtype=dtype, max_shard_bytes=max_shard_bytes
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN_OUT", help="a training run's --out folder")
    p.add_argument("--hf", required=True, metavar="EXPORT_DIR", help="the Hugging Face folder to write")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    p.add_argument(
        "--dtype", choices=list(DTYPES), help="weights' dtype (default: the source model's, else float32)"
    )
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    export_checkpoint(
        Path(args.checkpoint),
        Path(args.hf),
        step=args.step,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.shard_size),
    )
    return 0
