"""Data sources, the split, and deterministic, world-size-independent batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from micromoe.train.data import BatchSpec, TokenData, default_corpus, load_tokens


def test_bundled_corpus_is_bytes():
    tokens, vocab = load_tokens()
    assert vocab == 256 and tokens.dtype == np.uint8
    assert bytes(tokens[:40]) == default_corpus().read_bytes()[:40]


def test_text_file_folder_and_bin(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    sub = tmp_path / "docs"
    sub.mkdir()
    (sub / "b.md").write_text("world")
    (sub / "skip.json").write_text("{}")
    tokens, vocab = load_tokens(tmp_path / "a.txt")
    assert bytes(tokens) == b"hello" and vocab == 256
    tokens, _ = load_tokens(tmp_path)
    assert bytes(tokens) == b"hello\nworld"  # sorted paths, newline-joined, .json skipped
    ids = np.array([5, 1000, 60000, 7], dtype=np.uint16)
    ids.tofile(tmp_path / "t.bin")
    tokens, vocab = load_tokens(tmp_path / "t.bin")
    assert tokens.tolist() == ids.tolist() and vocab == 60001


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokens(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="holds no"):
        load_tokens(tmp_path)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="odd number of bytes"):
        load_tokens(tmp_path / "odd.bin")
    data = TokenData(np.arange(100, dtype=np.uint16), 100)
    with pytest.raises(ValueError, match="too few for sequences of 64"):
        data.check(64)


def test_split_is_disjoint_and_batches_shift_by_one():
    tokens = np.arange(1000, dtype=np.uint16)
    data = TokenData(tokens, 1000, val_fraction=0.2)
    assert len(data.splits["train"]) == 800 and data.splits["val"][0] == 800
    spec = BatchSpec(seq_len=16, micro_batch=3, grad_accum=2, world=2)
    x, y = data.batch("train", 5, 1, 1, spec)
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 800 and int(data.batch("val", 0, 0, 0, spec)[0].min()) >= 800


def test_batches_are_deterministic_and_world_size_independent():
    data = TokenData(np.arange(5000, dtype=np.uint16), 5000, seed=3)
    four = BatchSpec(seq_len=8, micro_batch=2, grad_accum=2, world=4)
    one = BatchSpec(seq_len=8, micro_batch=2, grad_accum=8, world=1)
    for step in (0, 7):
        dist_rows = [data.batch("train", step, m, r, four)[0] for m in range(2) for r in range(4)]
        single_rows = [data.batch("train", step, m, 0, one)[0] for m in range(8)]
        for a, b in zip(dist_rows, single_rows, strict=True):
            torch.testing.assert_close(a, b)
    same_seed = TokenData(np.arange(5000, dtype=np.uint16), 5000, seed=3)
    torch.testing.assert_close(
        data.batch("train", 3, 0, 0, one)[0], same_seed.batch("train", 3, 0, 0, one)[0]
    )
    assert not torch.equal(data.batch("train", 3, 0, 0, one)[0], data.batch("train", 4, 0, 0, one)[0])
    other_seed = TokenData(np.arange(5000, dtype=np.uint16), 5000, seed=4)
    assert not torch.equal(data.batch("train", 3, 0, 0, one)[0], other_seed.batch("train", 3, 0, 0, one)[0])
