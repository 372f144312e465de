"""Inputs of the wrong type are named as such: integer (or bool, complex) input to `MoELayer` is a
dtype error, not a matmul error, and unsigned counts beyond int64 are "too large", never negative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.plan import Placement, schedule
from micromoe.runtime import MoEConfig, MoELayer

LAYER = MoELayer(MoEConfig(hidden=16, ffn_hidden=16, num_experts=8, top_k=2))
NON_FLOAT = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]


@pytest.mark.parametrize("dtype", NON_FLOAT)
def test_non_float_input_is_a_dtype_error(dtype):
    x = torch.ones(4, 16, dtype=dtype)
    with pytest.raises(ValueError, match=f"input must be floating-point hidden states .* got dtype {dtype}"):
        LAYER(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_another_float_dtype_than_the_weights_is_named(dtype):
    with pytest.raises(ValueError, match=f"input dtype {dtype} != the layer's torch.float32"):
        LAYER(torch.ones(4, 16, dtype=dtype))


def test_the_weights_dtype_is_accepted():
    assert LAYER(torch.randn(4, 16)).shape == (4, 16)


@settings(max_examples=60, deadline=None)
@given(
    value=st.integers(2**53, 2**64 - 1),
    where=st.tuples(st.integers(0, 3), st.integers(0, 7)),
)
def test_uint64_counts_beyond_the_supported_total_are_too_large_not_negative(value, where):
    counts = np.ones((4, 8), dtype=np.uint64)
    counts[where] = value
    with pytest.raises(ValueError) as err:
        schedule(counts, Placement.symmetric(4, 8, 2))
    text = str(err.value)
    assert "too large" in text and "2**53 - 1" in text and "= -" not in text and ">= 0" not in text
    assert f"counts[{where[0]}, {where[1]}] = {value}" in text


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2**20), min_size=32, max_size=32))
def test_small_unsigned_counts_plan_like_signed_ones(values):
    counts = np.array(values, dtype=np.uint64).reshape(4, 8)
    p = Placement.symmetric(4, 8, 2)
    assert schedule(counts, p).max_load == schedule(counts.astype(np.int64), p).max_load
