"""Regression tests for findings of the atheris fuzz harness (tests/fuzz_harness.py)."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native.reference import convolution as ref_conv


def test_conv2d_empty_spatial_dimension_with_padding_is_rejected():
    """Padding used to turn an empty image into a (zero) output; PyTorch and the reference
    reject it."""
    x = np.zeros((3, 1, 0))  # (C, H, W) with W == 0
    w = np.ones((2, 3, 2, 1))
    with pytest.raises(ValueError):
        ref_conv.conv2d(x, w, padding=2)
    with pytest.raises(ValueError):
        mn.conv2d(x, w, padding=2)  # returned an array of shape (2, 4, 4)


@pytest.mark.parametrize("fn", ["attention", "attention_backward"])
def test_attention_causal_none_is_rejected_like_the_reference(fn):
    """The package took causal=None as False while the reference refused it; None could mean
    either, so both refuse it now (PyTorch's is_causal is a bool too)."""
    from mlmath_native.reference import transformer_attention as ref_att

    q = np.ones((2, 3, 4))
    out, lse = mn.attention(q, q, q, return_lse=True)
    args = (q, q, q) if fn == "attention" else (q, q, q, out, lse, np.ones_like(out))
    for module in (mn, ref_att):
        with pytest.raises(ValueError, match="causal"):
            getattr(module, fn)(*args, causal=None)
