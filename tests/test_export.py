"""`micromoe export`: our model's tensors -> a folder `transformers` loads with `from_pretrained`,
with the same logits, for every supported architecture, a truncated model, a model without a
source folder (Mixtral), bf16 and several shards."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from _hf_models import ARCHS, save_hf, transformers

from micromoe.cli import main
from micromoe.model import ModelConfig, MoETransformer
from micromoe.model.hf import hf_source, load_into_model, read_config, split_experts
from micromoe.train import checkpoint as ckpt
from micromoe.train.export import export_model, parse_size

SEQ = 16


def _trained(arch, folder, num_layers=None):
    """Our model loaded from a tiny HF folder, then changed as training would change it."""
    save_hf(arch, folder)
    source = hf_source(folder, num_layers=num_layers, seq_len=SEQ)
    model = MoETransformer(source.config)
    load_into_model(model, source)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval(), source


def _load(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _same_logits(ours, theirs, tol=1e-4):
    idx = torch.randint(0, ours.cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = theirs(idx).logits, ours(idx)[0]
    assert float((got - want).abs().max() / want.abs().max()) < tol


def _export(model, out, **kwargs):
    return export_model(model.cfg, split_experts(model.state_dict()).__getitem__, out, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_transformers_with_the_same_logits(arch, tmp_path):
    ours, source = _trained(arch, tmp_path / "src")
    _export(ours, tmp_path / "out", base=source.hf_config, source=source.folder)
    _same_logits(ours, _load(tmp_path / "out"))
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (
        tmp_path / "out" / "tokenizer_config.json"
    ).is_file()
    again = hf_source(tmp_path / "out", seq_len=SEQ)  # and it reads back as the same model
    assert again.config == ours.cfg


def test_a_truncated_model_exports_its_layers_only(tmp_path):
    ours, source = _trained("Qwen2MoeForCausalLM", tmp_path / "src", num_layers=2)
    _export(ours, tmp_path / "out", base=source.hf_config, source=source.folder)
    config = read_config(tmp_path / "out")
    assert config["num_hidden_layers"] == 2 and len(config["layer_types"]) == 2
    _same_logits(ours, _load(tmp_path / "out"))


def test_a_model_without_a_source_exports_as_mixtral_in_bf16_shards(tmp_path):
    cfg = ModelConfig(vocab_size=256, seq_len=SEQ, num_layers=2, hidden=32, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    ours = MoETransformer(cfg).eval()
    _export(ours, tmp_path / "out", dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and "lm_head.weight" not in index["weight_map"]  # tied
    config = read_config(tmp_path / "out")
    assert config["architectures"] == ["MixtralForCausalLM"] and config["dtype"] == "bfloat16"
    theirs = _load(tmp_path / "out").float()
    for p in ours.parameters():  # compare against the rounded weights the folder holds
        p.data = p.data.to(torch.bfloat16).float()
    _same_logits(ours, theirs)


def test_export_refuses_a_non_empty_folder_and_bad_sizes(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    ours = MoETransformer(ModelConfig(num_layers=1))
    with pytest.raises(ValueError, match="not an empty folder"):
        _export(ours, tmp_path / "out")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("100") == 100
    with pytest.raises(ValueError, match="--shard-size"):
        parse_size("five")


class _FakeReader:
    """The checkpoint reader's interface (meta, tensor_names, tensor) over a model's state dict."""

    def __init__(self, model, meta):
        self.state, self.meta = split_experts(model.state_dict()), meta

    def tensor_names(self):
        return sorted(self.state)

    def tensor(self, name):
        return self.state[name].float().clone()


@pytest.mark.parametrize("meta_kind", ["hf", "train"])
def test_export_command_reads_the_checkpoint_and_its_source(tmp_path, monkeypatch, meta_kind):
    ours, source = _trained("Qwen3MoeForCausalLM", tmp_path / "src")
    meta = {"model": dataclasses.asdict(ours.cfg), "step": 3, "train": {"hf": None}}
    if meta_kind == "hf":  # the source's config.json stored in the checkpoint
        meta["hf"] = {"config": source.hf_config, "path": str(source.folder)}
    else:  # only the training option: config.json is read from the folder
        meta["train"]["hf"] = str(source.folder)
    asked = []

    def fake_open(run_out, step=None):
        asked.append((run_out, step))
        return _FakeReader(ours, meta)

    monkeypatch.setattr(ckpt, "open_checkpoint", fake_open, raising=False)
    argv = ["export", "--checkpoint", str(tmp_path / "run"), "--hf", str(tmp_path / "out"), "--step", "3"]
    assert main([*argv, "--dtype", "float32", "--shard-size", "30KB"]) == 0
    assert asked == [(tmp_path / "run", 3)]
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    _same_logits(ours, _load(tmp_path / "out"))
