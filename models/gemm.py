"""The decode step's GEMMs: a few rows of activations times the layers' weights (Pallas Triton kernel, or XLA's).

A decode step multiplies M = B·T rows (B sequences, T = 1 new token each) by every weight of every layer. At
M ≤ 64 the product is bound by reading the weights once (2·K·N bytes for 2·M·K·N FLOPs), so its floor is the weight
bytes over the memory bandwidth. `linear` computes ``x @ w`` in one launch (the model's q/k/v and gate/up weights
are packed, `models.llama.pack_layer`: one launch each):

* the grid runs over (block of `block_n` columns, split of the K rows); each program streams its
  `[block_k, block_n]` weight tiles through a `num_stages`-deep pipeline and multiplies them by the matching `[M',
  block_k]` slice of x (M' = M rounded up to a power of two, at least 16, the tensor cores' smallest tile; x is tiny
  and read from L2);
* K is split until the launch has `programs_per_core` programs per SM, so that enough tiles are in flight to reach
  the bandwidth when N is small (o, down); the splits' float32 partial sums are then added by XLA (one more small
  kernel). With one split the result is stored in x's dtype directly.

The kernel runs where the device's tuning enables it (`hydragen_jax.tuning`, field `gemm`: products of `min_rows` to
`max_rows` rows, the range where it measured faster than XLA's GEMMs on that device), for 16-bit operands whose K
and N are multiples of the tiles; everything else (prefill's many rows, float32, CPU) is ``jnp.matmul``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hydragen_jax import tuning as tuning_lib
from hydragen_jax.devices import default_platform
from hydragen_jax.kernels import ops

Array = jax.Array
BACKENDS = ("xla", "pallas", "interpret")
_MIN_ROWS = 16  # the tensor cores' smallest tile of rows (tl.dot)


def matmul_precision(dtype) -> lax.Precision | None:
  """``HIGHEST`` for float32 operands (exact fp32 products, not TF32), None (the default) otherwise."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def default_backend(rows: int, tuning: tuning_lib.Tuning | None = None) -> str:
  """"pallas" where the default device is a GPU (`hydragen_jax.devices.default_platform`) for products of the
  tuning's `gemm.min_rows` to `gemm.max_rows` rows, else "xla"."""
  covered = tuning_lib.resolve(tuning).gemm.covers(rows)
  return "pallas" if default_platform() == "gpu" and covered else "xla"


def supported(x: Array, w: Array, gemm: tuning_lib.GemmTuning) -> str | None:
  """None if the kernel computes x `[M, K]` @ w `[K, N]`, else why not."""
  m, k = x.shape
  if w.dtype != x.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtypes {x.dtype}/{w.dtype}: the kernel takes 16-bit operands, both the same"
  if m > 128:
    return f"{m} rows: the kernel is for decode steps (at most 128 rows)"
  if w.ndim != 2 or w.shape[0] != k:
    return f"weight {w.shape} does not have K = {k} rows"
  if k == 0 or w.shape[1] == 0:
    return f"an empty product (K = {k}, N = {w.shape[1]})"
  if k % gemm.block_k or w.shape[1] % gemm.block_n:
    return f"K = {k} or N = {w.shape[1]} not a multiple of the tiles ({gemm.block_k}, {gemm.block_n})"
  return None


def linear(x: Array, w: Array, backend: str | None = None, tuning: tuning_lib.Tuning | None = None) -> Array:
  """``x @ w`` for x `[..., K]` and w `[K, N]` of x's dtype: `[..., N]`.

  backend: "pallas" (the kernel, compiled), "interpret" (the kernel in the Pallas interpreter: CPU tests), "xla"
  (``jnp.matmul``), or None: `default_backend` for this many rows. The kernel falls back to ``jnp.matmul`` where it
  does not apply (`supported`). float32 operands multiply at full float32 precision either way.
  """
  lead, k = x.shape[:-1], x.shape[-1]
  rows = math.prod(lead)
  tuning = tuning_lib.resolve(tuning)
  backend = default_backend(rows, tuning) if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS} (or None for the default)")
  x2 = x.reshape(rows, k)
  if backend == "xla" or rows == 0 or supported(x2, w, tuning.gemm) is not None:
    return jnp.matmul(x, w, precision=matmul_precision(x.dtype))
  out = skinny_matmul(x2, w, gemm=tuning.gemm, cores=ops.num_cores(tuning), interpret=backend == "interpret")
  return out.reshape(*lead, w.shape[1])


def plan_splits(k: int, column_blocks: int, gemm: tuning_lib.GemmTuning, cores: int) -> tuple[int, int]:
  """(splits, K tiles per split): K's `k // block_k` tiles split until the launch has
  `programs_per_core · cores` programs (`column_blocks` of them per split), no split empty; not split where
  `programs_per_core` is 0."""
  tiles = k // gemm.block_k
  if gemm.programs_per_core == 0:
    return 1, tiles
  want = max(1, -(-gemm.programs_per_core * cores // column_blocks))
  per_split = -(-tiles // min(want, tiles))
  return -(-tiles // per_split), per_split


def _kernel(x_ref, w_ref, o_ref, *, splits: int, per_split: int, block_n: int, block_k: int, precision):
  """Program p: column block p // splits, split p % splits (the splits of a column block run side by side)."""
  pid = pl.program_id(0)
  nb, s = pid // splits, pid % splits
  cols = pl.ds(pl.multiple_of(nb * block_n, block_n), block_n)
  first = s * per_split
  last = jnp.minimum(first + per_split, x_ref.shape[1] // block_k)

  def step(t, acc):
    ks = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
    return acc + plgpu.dot(plgpu.load(x_ref.at[:, ks]), plgpu.load(w_ref.at[ks, cols]), precision=precision)

  acc = lax.fori_loop(first, last, step, jnp.zeros((x_ref.shape[0], block_n), jnp.float32))
  plgpu.store(o_ref.at[s, :, cols], acc.astype(o_ref.dtype))


@functools.partial(jax.jit, static_argnames=("gemm", "cores", "interpret"))
def skinny_matmul(x: Array, w: Array, *, gemm: tuning_lib.GemmTuning, cores: int, interpret: bool = False) -> Array:
  """x `[M, K]` @ w `[K, N]` (shapes as `supported` takes): `[M, N]` in x's dtype, accumulated in float32."""
  m, k = x.shape
  rows = max(_MIN_ROWS, pl.next_power_of_2(m))
  xp = jnp.pad(x, ((0, rows - m), (0, 0)))
  blocks = w.shape[1] // gemm.block_n
  splits, per_split = plan_splits(k, blocks, gemm, cores)
  kernel = functools.partial(_kernel, splits=splits, per_split=per_split, block_n=gemm.block_n,
                             block_k=gemm.block_k, precision=lax.Precision.DEFAULT)
  # One split: the program's sum is the result, stored in x's dtype. Several: float32 partials, added below.
  out_shape = jax.ShapeDtypeStruct((splits, rows, w.shape[1]), x.dtype if splits == 1 else jnp.float32)

  def whole(a):  # the kernel indexes inside the full arrays
    return pl.BlockSpec(a.shape, lambda *_: (0,) * len(a.shape))

  partials = pl.pallas_call(
      kernel,
      grid=(blocks * splits,),
      in_specs=[whole(xp), whole(w)],
      out_specs=whole(out_shape),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=gemm.num_warps, num_stages=gemm.num_stages),
      interpret=interpret,
      name="decode_gemm",
  )(xp, w)
  return (partials[0] if splits == 1 else partials.sum(axis=0))[:m].astype(x.dtype)
