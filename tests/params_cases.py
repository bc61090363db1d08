"""Comparisons of parameter trees shared by the model tests (plain, GGUF and tensor-parallel loading)."""

from __future__ import annotations

import jax
import numpy as np


def assert_same_params(a, b) -> None:
  """Two parameter trees (or models) hold the same leaves at the same paths, bit for bit (a missing or extra leaf
  fails: a zip over the leaves alone would stop at the shorter tree)."""
  a, b = (t.params() if hasattr(t, "params") else t for t in (a, b))
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b], "the trees have different leaves"
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
