"""The decode GEMM kernel (`models.gemm`): exact against ``jnp.matmul`` (interpreted on CPU, compiled on the GPU),
its split of K, its dispatch (the device's tuning), and the model's logits with it against XLA's GEMMs."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from hydragen_jax import tuning
from models import gemm
from models.config import LlamaConfig
from tests.conftest import ON_GPU

SMALL = dataclasses.replace(tuning.current().gemm, min_rows=1, max_rows=64, block_n=16, block_k=16)


def _operands(m, k, n, dtype, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  return x, (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)


def _expected(x, w):
  return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("m,k,n,cores", [
    (1, 64, 16, 4),  # one row, K split 4 ways (a tile each)
    (8, 128, 128, 1),  # q/k/v-like packed width, no split
    (17, 48, 32, 8),  # odd rows (padded to 32), 3 K tiles over 3 splits
    (64, 160, 64, 12),  # 64 rows, 10 K tiles in splits of 4, 4 and 2
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernel_matches_matmul(m, k, n, cores, dtype):
  x, w = _operands(m, k, n, dtype)
  out = gemm.skinny_matmul(x, w, gemm=SMALL, cores=cores, interpret=True)
  assert out.shape == (m, n) and out.dtype == dtype
  chex.assert_trees_all_close(out.astype(jnp.float32), _expected(x, w), rtol=1e-2, atol=1e-2)


def test_plans_of_the_kernel_cases():
  """The cases above cover one split, splits of one tile, and uneven splits of several tiles."""
  assert [gemm.plan_splits(k, n // SMALL.block_n, SMALL, cores)
          for k, n, cores in [(64, 16, 4), (128, 128, 1), (48, 32, 8), (160, 64, 12)]] == [
              (4, 1), (1, 8), (3, 1), (3, 4)]


def test_k_is_split_until_the_launch_fills_the_sms():
  g = dataclasses.replace(SMALL, block_k=128, programs_per_core=2)
  assert gemm.plan_splits(4096, 64, g, 132) == (5, 7)  # 32 tiles: 5 splits of <= 7 (64 * 5 >= 264 programs)
  assert gemm.plan_splits(4096, 300, g, 132) == (1, 32)  # enough column blocks already
  assert gemm.plan_splits(256, 1, g, 132) == (2, 1)  # never more splits than tiles
  assert gemm.plan_splits(4096, 64, dataclasses.replace(g, programs_per_core=0), 132) == (1, 32)  # 0: no split
  for k, blocks, cores in [(4096, 64, 132), (11008, 64, 132), (4096, 172, 132), (384, 5, 7)]:
    splits, per = gemm.plan_splits(k, blocks, g, cores)
    tiles = k // g.block_k
    assert (splits - 1) * per < tiles <= splits * per  # every split has tiles, together all of them


def test_linear_dispatch(monkeypatch):
  x, w = _operands(2 * 3, 32, 48, jnp.bfloat16)
  x3 = x.reshape(2, 3, 32)
  with tuning.override(dataclasses.replace(tuning.current(), gemm=SMALL)):
    assert gemm.default_backend(6) == ("pallas" if jax.default_backend() == "gpu" else "xla")
    assert gemm.default_backend(65) == "xla"
    kernel = jax.make_jaxpr(lambda x: gemm.linear(x, w, backend="interpret"))(x3)
    assert "pallas_call" in str(kernel)
    out = gemm.linear(x3, w, backend="interpret")
    assert out.shape == (2, 3, 48)
    chex.assert_trees_all_close(out.astype(jnp.float32), _expected(x, w).reshape(2, 3, -1), rtol=1e-2, atol=1e-2)
    # where the kernel does not apply: jnp.matmul (float32 at full precision; K not a multiple of the tile)
    xf, wf = _operands(4, 24, 16, jnp.float32)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: gemm.linear(x, wf, backend="interpret"))(xf))
    np.testing.assert_allclose(gemm.linear(xf, wf, backend="interpret"), _expected(xf, wf), rtol=1e-6)
    assert gemm.supported(xf, wf, SMALL).startswith("dtypes")
    assert "not a multiple of the tiles" in gemm.supported(*_operands(4, 24, 16, jnp.bfloat16), SMALL)
    assert "does not have K = 32 rows" in gemm.supported(x, w.T, SMALL)
    # empty products: XLA's (the kernel's plan divided by zero)
    for k, n in ((0, 16), (16, 0)):
      xe, we = _operands(2, k, n, jnp.bfloat16)
      assert "an empty product" in gemm.supported(xe, we, SMALL)
      assert gemm.linear(xe, we, backend="interpret").shape == (2, n)
  ranged = dataclasses.replace(SMALL, min_rows=8, max_rows=64)  # a range, as the H200's (64 to 64 rows)
  assert [ranged.covers(m) for m in (1, 7, 8, 64, 65)] == [False, False, True, True, False]
  assert not dataclasses.replace(ranged, max_rows=0).covers(8)  # max_rows 0: off whatever min_rows says
  with monkeypatch.context() as m:  # the GPU's rule, so that the range decides (on CPU it is always "xla")
    m.setattr(gemm, "default_platform", lambda: "gpu")
    chosen = [gemm.default_backend(r, dataclasses.replace(tuning.current(), gemm=ranged)) for r in (7, 8, 64, 65)]
    assert chosen == ["xla", "pallas", "pallas", "xla"]
    off = dataclasses.replace(tuning.current(), gemm=dataclasses.replace(SMALL, max_rows=0))
    assert gemm.default_backend(6, off) == "xla"  # off: the H100 file's value until measured
  with pytest.raises(ValueError, match="backend='cuda' is not one of"):
    gemm.linear(x, w, backend="cuda")


def test_kernel_lowers_to_triton_for_an_h200(monkeypatch):
  """The kernel's Pallas -> Triton lowering at the 7B decode shapes, without a GPU (the GPU's info stubbed)."""
  from jax._src.pallas.triton import gpu_info  # noqa: PLC0415

  monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
  g = tuning.for_device_kind("NVIDIA H200").gemm
  s = jax.ShapeDtypeStruct
  for m, k, n in [(8, 4096, 6144), (64, 4096, 22016), (64, 11008, 4096)]:  # 7B's packed q/k/v, gate/up; down
    text = jax.jit(lambda x, w: gemm.skinny_matmul(x, w, gemm=g, cores=132)).trace(
        s((m, k), jnp.bfloat16), s((k, n), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
    assert "decode_gemm" in text


@pytest.mark.slow  # the decode GEMM kernel is off in every shipped tuning (CI time); its unit tests stay in CI
def test_model_with_the_kernel_matches_xla_gemms(monkeypatch):
  """Decode logits of a bf16 model whose GEMMs run on the kernel (interpreted) against XLA's GEMMs."""
  config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
  model = models.init_random(config, jnp.bfloat16, seed=1)
  prompts = [[3, 5, 7, 9, 11, 2], [3, 5, 7, 9, 4]]
  seen = []

  def interpreted(rows, tuning_=None):  # the GPU's rule, the kernel interpreted: on where the tuning enables it
    backend = "interpret" if tuning.resolve(tuning_).gemm.covers(rows) else "xla"
    seen.append(backend)
    return backend

  monkeypatch.setattr(gemm, "default_backend", interpreted)

  def run(max_rows):  # each tuning is its own jit cache entry (the override is part of the key)
    with tuning.override(dataclasses.replace(tuning.current(), gemm=dataclasses.replace(SMALL, max_rows=max_rows))):
      return models.generate(model, prompts, max_new_tokens=3, mode="hydragen")

  xla = run(0)
  assert set(seen) == {"xla"}
  kernel = run(64)
  assert "interpret" in seen
  chex.assert_trees_all_close(kernel.logits, xla.logits, rtol=3e-2, atol=3e-2)
  np.testing.assert_array_equal(kernel.tokens[:, :1], xla.tokens[:, :1])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("m", [1, 8, 64])
def test_kernel_compiled_matches_matmul_at_7b_shapes(m):
  g = dataclasses.replace(tuning.current().gemm, max_rows=64)
  x, w = _operands(m, 4096, 6144, jnp.bfloat16)
  out = gemm.linear(x, w, backend="pallas", tuning=dataclasses.replace(tuning.current(), gemm=g))
  chex.assert_trees_all_close(out.astype(jnp.float32), _expected(x, w), rtol=2e-2, atol=2e-2)
  x, w = _operands(m, 11008, 4096, jnp.bfloat16, seed=1)
  out = gemm.skinny_matmul(x, w, gemm=g, cores=132)
  chex.assert_trees_all_close(out.astype(jnp.float32), _expected(x, w), rtol=2e-2, atol=2e-2)
