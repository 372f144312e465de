"""`micromoe tokenize` and token files: a model's tokenizer, EOS between documents, JSON lines,
uint32 ids for vocabularies over 65,536, and `load_tokens` reading every format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _hf_models import save_hf, tiny_tokenizer

from micromoe.cli import main
from micromoe.train import tokenize
from micromoe.train.data import BatchSpec, TokenData, load_tokens
from micromoe.train.token_file import HEADER, MAGIC, TokenWriter, read_token_file


def _model(tmp_path, vocab: int = 96):
    """A model folder whose tokenizer maps 'w{i}' to id i + 3 (EOS '</s>' = 1)."""
    folder = tmp_path / "model"
    folder.mkdir()
    save_hf("MixtralForCausalLM", folder, tokenizer=False, vocab_size=vocab)
    tiny_tokenizer(vocab).save(str(folder / "tokenizer.json"))
    return folder


def test_text_jsonl_and_folder_documents_end_with_eos(tmp_path):
    folder = _model(tmp_path)
    (tmp_path / "a.txt").write_text("w0 w1\nw2")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "w5"}) + "\n\n" + json.dumps({"text": "w6 w7", "id": 2}) + "\n"
    )
    assert (
        main(
            [
                "tokenize",
                "--hf",
                str(folder),
                "--data",
                str(tmp_path / "a.txt"),
                "--out",
                str(tmp_path / "a.bin"),
            ]
        )
        == 0
    )
    ids, vocab = load_tokens(tmp_path / "a.bin")
    assert ids.tolist() == [3, 4, 5, 1] and vocab == 96 and ids.dtype == np.uint16
    ids, _ = load_tokens(tmp_path / "b.jsonl", hf=folder)
    assert ids.tolist() == [8, 1, 9, 10, 1]
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a.txt", "b.jsonl"):
        (docs / name).write_text((tmp_path / name).read_text())
    ids, vocab = load_tokens(docs, hf=folder)
    assert ids.tolist() == [3, 4, 5, 1, 8, 1, 9, 10, 1] and vocab == 96


def test_large_vocabulary_writes_uint32_with_a_header(tmp_path):
    folder = _model(tmp_path, vocab=70_000)
    (tmp_path / "big.txt").write_text("w69996 w0 w65533")
    out = tmp_path / "big.bin"
    assert (
        main(["tokenize", "--hf", str(folder), "--data", str(tmp_path / "big.txt"), "--out", str(out)]) == 0
    )
    raw = out.read_bytes()
    assert raw[:8] == MAGIC and HEADER.unpack(raw[: HEADER.size])[2:] == (4, 70_000, 4)
    ids, vocab = load_tokens(out)
    assert ids.dtype == np.uint32 and ids.tolist() == [69_999, 3, 65_536, 1] and vocab == 70_000
    x, _ = TokenData(np.concatenate([ids] * 20), vocab).batch(
        "train", 0, 0, 0, BatchSpec(seq_len=8, micro_batch=4, grad_accum=1, world=1)
    )
    assert int(x.max()) == 69_999  # ids above 65,535 survive batching


def test_headerless_uint16_files_still_read(tmp_path):
    np.array([4, 65_535, 2], dtype="<u2").tofile(tmp_path / "old.bin")
    ids, vocab = load_tokens(tmp_path / "old.bin")
    assert ids.tolist() == [4, 65_535, 2] and vocab == 65_536


def test_token_file_errors_name_the_file(tmp_path):
    with TokenWriter(tmp_path / "t.bin", 10) as w:
        w.write([1, 2, 3])
    raw = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="cut.bin: header says 3 ids"):
        read_token_file(tmp_path / "cut.bin")
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"), TokenWriter(tmp_path / "bad.bin", 10) as w:
        w.write([10])
    assert not list(tmp_path.glob("bad.bin*"))  # nothing half-written is left


def test_bad_json_line_and_missing_tokenizer_are_named(tmp_path):
    folder = _model(tmp_path)
    (tmp_path / "x.jsonl").write_text('{"text": "w1"}\n{"body": "w2"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not a JSON object with a 'text' string"):
        load_tokens(tmp_path / "x.jsonl", hf=folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json: not found"):
        load_tokens(tmp_path / "x.jsonl", hf=folder)


def test_long_text_is_cut_into_pieces_that_join_back(monkeypatch):
    monkeypatch.setattr(tokenize, "PIECE_BYTES", 50)
    text = "".join(f"line {i}\n  indented\n\n" for i in range(40))
    pieces = list(tokenize._pieces(text))
    assert len(pieces) > 5 and "".join(pieces) == text
    assert all(
        p.endswith("\n") and not text[len("".join(pieces[: i + 1]))].isspace()
        for i, p in enumerate(pieces[:-1])
    )
