"""A Hugging Face model folder as a source of logical tensors, and loading it into our model.

`hf_source(folder)` reads `config.json` (-> `ModelConfig`) and the safetensors headers, and checks
that every tensor the model needs is there with the right shape before any data is read.
`source.tensor(name)` then reads one logical tensor (float32, CPU) on demand: a rank that keeps
experts 3 and 7 of a layer reads only those two experts' projections. `load_into_model` fills a
single-device `MoETransformer` (every expert local).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from micromoe.model.hf.config import architecture, model_config, read_config
from micromoe.model.hf.names import EXPERT_NAME, Rule, logical_rules
from micromoe.model.hf.reader import SafetensorsFolder
from micromoe.model.transformer import ModelConfig, MoETransformer


@dataclass
class HFSource:
    """Logical tensors of a Hugging Face model folder.

    Attributes:
        folder: the model folder.
        hf_config: its parsed config.json.
        arch: its architecture (`architectures[0]`).
        config: our ModelConfig for it (first `num_layers` blocks when asked).
        files: the safetensors reader.
        rules: {logical name: Rule} for `config`.
    """

    folder: Path
    hf_config: dict[str, Any]
    arch: str
    config: ModelConfig
    files: SafetensorsFolder
    rules: dict[str, Rule]

    def names(self) -> list[str]:
        """Logical names of every tensor (experts split per id), in state_dict order."""
        return list(self.rules)

    def tensor(self, name: str) -> torch.Tensor:
        """Logical tensor `name`, float32 on the CPU, read now (shapes as in `micromoe.model.hf.names`)."""
        if name not in self.rules:
            raise ValueError(f"{self.folder}: no logical tensor {name!r} in a {self.arch} with this config")
        rule = self.rules[name]
        parts = [self.files.get(n, s) for n, s in zip(rule.hf_names, rule.hf_shapes, strict=True)]
        return rule.to_logical(parts)

    def check(self) -> None:
        """ValueError naming the file for the first tensor that is missing or has the wrong shape
        (headers only: no tensor data is read)."""
        for rule in self.rules.values():
            for hf_name, shape in zip(rule.hf_names, rule.hf_shapes, strict=True):
                if hf_name not in self.files.weight_map:
                    raise ValueError(f"{self._where()}: has no tensor {hf_name!r}{self._fused_hint(hf_name)}")
                got = self.files.shape(hf_name)
                if got != shape:
                    raise ValueError(
                        f"{self.files.file_of(hf_name)}: tensor {hf_name!r} has shape {list(got)}, "
                        f"but {self.folder / 'config.json'} implies {list(shape)}"
                    )
        self.files.close()

    def _where(self) -> Path:
        """The file that lists the folder's tensors."""
        index = self.folder / "model.safetensors.index.json"
        return index if index.is_file() else self.folder / "model.safetensors"

    def _fused_hint(self, hf_name: str) -> str:
        """A hint when the folder stores an MoE layer's experts as one 3-D tensor per projection."""
        if ".experts." not in hf_name:
            return ""
        base = hf_name.split(".experts.")[0] + ".experts."
        fused = [
            n
            for n in self.files.weight_map
            if n.startswith(base) and not n[len(base) :].split(".")[0].isdigit()
        ]
        if not fused:
            return ""
        return f" (experts stored fused, e.g. {fused[0]}; micromoe reads the per-expert layout save_pretrained writes)"


def hf_source(folder: str | Path, *, num_layers: int | None = None, seq_len: int | None = None) -> HFSource:
    """Open a Hugging Face model folder as a source of logical tensors.

    Args:
        folder: holds config.json and model.safetensors (or an index and shards).
        num_layers: keep the first N blocks (None = all).
        seq_len: the training sequence length (None: see `micromoe.model.hf.config.model_config`).

    Raises ValueError (one line, naming the file) for an unsupported architecture or feature, a
    missing shard, a missing tensor or a shape that disagrees with config.json.
    """
    folder = Path(folder)
    hf = read_config(folder)
    where = str(folder / "config.json")
    arch = architecture(hf, where)
    cfg = model_config(hf, where=where, num_layers=num_layers, seq_len=seq_len)
    source = HFSource(folder, hf, arch, cfg, SafetensorsFolder(folder), logical_rules(cfg, arch))
    source.check()
    return source


@torch.no_grad()
def load_into_model(model: MoETransformer, source: HFSource) -> None:
    """Copy every tensor of `source` into a single-device `model` (all experts local), one tensor
    at a time. ValueError when the model's shapes differ from the source's."""
    params = model.state_dict(keep_vars=True)
    for name in source.names():
        match = EXPERT_NAME.match(name)
        if match:
            target = params[f"{match.group(1)}.{match.group(3)}"][int(match.group(2))]
        elif name in params:
            target = params[name]
        else:
            raise ValueError(f"the model has no tensor {name!r}; build it from source.config")
        value = source.tensor(name)
        if value.shape != target.shape:
            raise ValueError(
                f"{name}: the source has shape {list(value.shape)}, the model {list(target.shape)}"
            )
        target.copy_(value)
    source.files.close()
