"""Hugging Face interop, in one place: config.json -> `ModelConfig`, tensor names and layouts both
ways, safetensors streaming, the fast tokenizer. The model itself never imports `transformers`;
neither does this package (it reads config.json as JSON and the weights with `safetensors`).

Bottom to top: `config` (architectures, refusals, both directions of the config), `names`
(logical <-> HF tensors), `reader` (one tensor at a time from a folder), `tokenizer`,
`source` (`hf_source`, `load_into_model`), `writer` (safetensors shards with an index).
"""

from micromoe.model.hf.config import REFUSED, SUPPORTED, architecture, hf_config, model_config, read_config
from micromoe.model.hf.names import EXPERT_NAME, Rule, hf_tensors, logical_rules, split_experts
from micromoe.model.hf.reader import SafetensorsFolder
from micromoe.model.hf.source import HFSource, hf_source, load_into_model
from micromoe.model.hf.tokenizer import TOKENIZER_FILES, HFTokenizer, load_tokenizer
from micromoe.model.hf.writer import write_shards

__all__ = [
    "EXPERT_NAME",
    "REFUSED",
    "SUPPORTED",
    "TOKENIZER_FILES",
    "HFSource",
    "HFTokenizer",
    "Rule",
    "architecture",
    "SafetensorsFolder",
    "hf_config",
    "hf_source",
    "hf_tensors",
    "load_into_model",
    "load_tokenizer",
    "logical_rules",
    "model_config",
    "read_config",
    "split_experts",
    "write_shards",
]
