"""`micromoe train --hf DIR`: the model config from the folder, text tokenized with its tokenizer,
clear errors for flags that would change the shape; and the round trip HF folder -> train on 4
gloo ranks -> export -> `transformers` gives our logits."""

from __future__ import annotations

import json

import pytest
import torch
from _hf_models import save_hf, transformers

from micromoe.cli import build_parser, main
from micromoe.model import ModelConfig, MoETransformer
from micromoe.model.hf import hf_source, split_experts
from micromoe.train import checkpoint as ckpt
from micromoe.train.data import load_tokens
from micromoe.train.preflight import resolve_configs


def _args(*argv: str):
    return build_parser().parse_args(["train", *argv])


def test_model_config_comes_from_the_folder(tmp_path):
    save_hf("Qwen3MoeForCausalLM", tmp_path)
    args = _args("--hf", str(tmp_path), "--layers", "2", "--seq-len", "16", "--aux-loss", "0.01")
    _, model_cfg = resolve_configs(args, 1, 96)
    assert model_cfg.num_layers == 2 and model_cfg.seq_len == 16 and model_cfg.aux_loss_coef == 0.01
    assert model_cfg.qk_norm == "head" and model_cfg.num_dense_layers == 1 and model_cfg.vocab_size == 96
    with pytest.raises(ValueError, match="drop --hidden, --experts"):
        resolve_configs(_args("--hf", str(tmp_path), "--hidden", "64", "--experts", "4"), 1, 96)
    with pytest.raises(ValueError, match="--layers 9"):
        resolve_configs(_args("--hf", str(tmp_path), "--layers", "9"), 1, 96)


def test_an_unsupported_model_is_named_before_its_data_is_read(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GptOssForCausalLM"]}))
    assert main(["train", "--hf", str(tmp_path), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "GptOssForCausalLM is not supported" in err and "attention sinks" in err


def test_text_data_is_tokenized_with_the_models_tokenizer(tmp_path):
    save_hf("MixtralForCausalLM", tmp_path)
    (tmp_path / "d.txt").write_text("w0 w1 w2 w90")
    tokens, vocab = load_tokens(tmp_path / "d.txt", hf=tmp_path)
    assert tokens.tolist() == [3, 4, 5, 93, 1] and vocab == 96


def test_a_short_single_process_run_from_a_folder(tmp_path, capsys):
    save_hf("OlmoeForCausalLM", tmp_path / "model")
    (tmp_path / "d.txt").write_text(" ".join(f"w{i % 90}" for i in range(3000)))
    argv = ["--hf", str(tmp_path / "model"), "--data", str(tmp_path / "d.txt"), "--seq-len", "16"]
    argv += ["--max-steps", "2", "--micro-batch", "2", "--out", str(tmp_path / "run"), "--no-report"]
    assert main(["train", *argv]) == 0, capsys.readouterr().err
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["model"]["qk_norm"] == "full" and resolved["train"]["hf"] == str(tmp_path / "model")


@pytest.mark.parametrize("dispatcher", ["microep", "ep"])
def test_round_trip_train_on_four_ranks_then_export(tmp_path, dispatcher):
    save_hf("Qwen2MoeForCausalLM", tmp_path / "model", num_experts=8)
    (tmp_path / "d.txt").write_text(" ".join(f"w{i % 90}" for i in range(4000)))
    argv = ["train", "--hf", str(tmp_path / "model"), "--data", str(tmp_path / "d.txt"), "--seq-len", "16"]
    argv += ["--nproc", "4", "--dispatcher", dispatcher, "--max-steps", "3", "--micro-batch", "2"]
    argv += ["--out", str(tmp_path / "run"), "--no-report"]
    assert main(argv) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--hf", str(tmp_path / "out")]) == 0
    reader = ckpt.open_checkpoint(tmp_path / "run")
    ours = MoETransformer(ModelConfig(**reader.meta["model"])).eval()
    state = split_experts(ours.state_dict())
    with torch.no_grad():
        for name in reader.tensor_names():
            if name in state:
                state[name].copy_(reader.tensor(name))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = theirs(idx).logits, ours(idx)[0]
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_training_starts_from_the_folders_weights(tmp_path):
    """4 ranks (MicroEP): each rank loads its owned experts and its dense shards from the folder;
    after one step with a negligible learning rate the checkpoint holds the folder's tensors."""
    save_hf("Qwen3MoeForCausalLM", tmp_path / "model", num_experts=8)
    (tmp_path / "d.txt").write_text(" ".join(f"w{i % 90}" for i in range(4000)))
    argv = ["train", "--hf", str(tmp_path / "model"), "--data", str(tmp_path / "d.txt"), "--seq-len", "16"]
    argv += ["--nproc", "4", "--max-steps", "1", "--micro-batch", "2", "--lr", "1e-9", "--min-lr", "0"]
    argv += ["--out", str(tmp_path / "run"), "--no-report", "--eval-interval", "0"]
    assert main(argv) == 0
    reader = ckpt.open_checkpoint(tmp_path / "run")
    source = hf_source(tmp_path / "model")
    names = set(reader.tensor_names())
    assert set(source.names()) <= names | {"head.weight"}
    for name in source.names():
        if name in names:
            torch.testing.assert_close(reader.tensor(name), source.tensor(name), rtol=1e-5, atol=1e-6)
