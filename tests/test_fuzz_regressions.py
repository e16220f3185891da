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
