"""Reading Hugging Face folders: refusals with one-line errors that name the file, multi-shard
folders, and the memory an import takes (one shard at a time)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from _hf_models import save_hf, tiny_tokenizer

from micromoe.model import ModelConfig, MoETransformer
from micromoe.model.hf import (
    hf_config,
    hf_source,
    hf_tensors,
    load_into_model,
    load_tokenizer,
    logical_rules,
    model_config,
    write_shards,
)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("arch", "feature"),
    [
        ("DeepseekV3ForCausalLM", "multi-head latent attention"),
        ("GptOssForCausalLM", "attention sinks"),
        ("LlamaForCausalLM", "not supported"),
    ],
)
def test_unsupported_architectures_are_refused_naming_the_file(tmp_path, arch, feature):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch], "num_hidden_layers": 2}))
    message = _error(hf_source, tmp_path)
    assert str(tmp_path / "config.json") in message and arch in message and feature in message


@pytest.mark.parametrize(
    ("arch", "changes", "feature"),
    [
        ("MixtralForCausalLM", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling"),
        ("MixtralForCausalLM", {"sliding_window": 8}, "sliding-window attention"),
        ("MixtralForCausalLM", {"hidden_act": "gelu"}, "activation"),
        ("MixtralForCausalLM", {"router_jitter_noise": 0.1}, "jitter"),
        ("Qwen2MoeForCausalLM", {"mlp_only_layers": [], "decoder_sparse_step": 2}, "not the first blocks"),
        ("OlmoeForCausalLM", {"clip_qkv": 8.0}, "clip_qkv"),
        ("Qwen3MoeForCausalLM", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling"),
    ],
)
def test_features_we_lack_are_refused(tmp_path, arch, changes, feature):
    save_hf(arch, tmp_path, tokenizer=False)
    _edit_config(tmp_path, **changes)
    message = _error(hf_source, tmp_path, seq_len=16)
    assert str(tmp_path / "config.json") in message and feature in message


def test_a_sliding_window_covering_the_sequence_is_plain_attention(tmp_path):
    save_hf("MixtralForCausalLM", tmp_path, tokenizer=False)
    _edit_config(tmp_path, sliding_window=16)
    assert hf_source(tmp_path, seq_len=16).config.seq_len == 16
    assert "--seq-len 16" in _error(hf_source, tmp_path, seq_len=32)


def test_multi_shard_folder_loads_and_a_missing_shard_is_named(tmp_path):
    theirs = save_hf("Qwen2MoeForCausalLM", tmp_path, tokenizer=False)
    theirs.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    source = hf_source(tmp_path, seq_len=16)
    ours = MoETransformer(source.config).eval()
    load_into_model(ours, source)
    idx = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, rtol=1e-4, atol=1e-4)
    shards[1].unlink()
    message = _error(hf_source, tmp_path)
    assert str(shards[1]) in message and "missing" in message


def test_shapes_that_disagree_with_config_json_are_named(tmp_path):
    save_hf("MixtralForCausalLM", tmp_path, tokenizer=False)
    _edit_config(tmp_path, intermediate_size=48)
    message = _error(hf_source, tmp_path, seq_len=16)
    assert str(tmp_path / "model.safetensors") in message and "w1.weight" in message and "[48, 32]" in message


def test_a_missing_tensor_and_a_missing_folder_are_named(tmp_path):
    save_hf("OlmoeForCausalLM", tmp_path, tokenizer=False)
    _edit_config(tmp_path, num_hidden_layers=3)
    message = _error(hf_source, tmp_path, seq_len=16)
    assert str(tmp_path / "model.safetensors") in message and "model.layers.2." in message
    message = _error(hf_source, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "config.json") in message


def test_missing_tokenizer_is_named(tmp_path):
    save_hf("MixtralForCausalLM", tmp_path, tokenizer=False)
    message = _error(load_tokenizer, tmp_path)
    assert str(tmp_path / "tokenizer.json") in message
    tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == 1 and tok.vocab_size == 96


def test_plain_model_config_round_trips_through_a_mixtral_config():
    cfg = ModelConfig(vocab_size=300, seq_len=32, num_layers=2, hidden=32, num_heads=4, num_kv_heads=2)
    hf = hf_config(cfg)
    assert hf["architectures"] == ["MixtralForCausalLM"]
    assert model_config(hf, seq_len=32) == dataclasses.replace(cfg, head_dim=8)
    with pytest.raises(ValueError, match="cannot be written as MixtralForCausalLM"):
        hf_config(ModelConfig(num_layers=2, num_dense_layers=1))
    with pytest.raises(ValueError, match="expert-bias"):
        hf_config(ModelConfig(expert_bias_rate=1e-3))


PEAK = textwrap.dedent(
    """
    import json, resource, sys, torch
    from micromoe.model.hf import hf_source
    torch.set_num_threads(1)
    source = hf_source(sys.argv[1])                 # headers only
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    for name in source.names()[:12]:                # page in the library code the reads run
        source.tensor(name).sum()
    source.files.close()
    open("/proc/self/clear_refs", "w").write("5")   # reset the peak RSS to the current RSS
    base = status("VmRSS:")
    cap = status("VmSize:") + int(sys.argv[2])     # address space for far less than the model
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    total = 0.0
    for name in source.names():                      # every tensor once, as a rank would its own
        total += float(source.tensor(name).sum(dtype=torch.float64))
    source.files.close()
    print(json.dumps({"peak": status("VmHWM:") - base, "sum": total}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_import_streams_one_shard_at_a_time(tmp_path):
    """A generated model of 7 shards of 16 MiB: reading every tensor keeps the peak RSS increase
    below the largest shard (the target: twice), under an address-space cap of two shards."""
    cfg = ModelConfig(
        vocab_size=512, seq_len=32, num_layers=4, hidden=256, num_heads=4, ffn_hidden=1024, num_experts=8
    )
    arch = "MixtralForCausalLM"
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg)))
    gen = torch.Generator().manual_seed(0)
    rules = logical_rules(cfg, arch)
    pieces = hf_tensors(rules, lambda name: torch.randn(rules[name].shape, generator=gen))
    shards = write_shards(tmp_path, pieces, max_shard_bytes=16 * 2**20)
    largest = max(s.stat().st_size for s in shards)
    total = sum(s.stat().st_size for s in shards)
    assert len(shards) >= 6 and total > 5 * largest
    cap = 2 * largest  # the whole model (over 6 shards) could not even be mapped
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(tmp_path), str(cap)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peak = json.loads(out.stdout)["peak"]
    assert peak < 2 * largest, (peak, largest)  # the target
    assert peak < largest, (peak, largest)  # what the reader promises: one tensor, never a shard (~7 MB)
