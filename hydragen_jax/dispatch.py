"""Backend choice: which implementation runs a step, and where the kernels' batching pays.

`default_backend` / `resolve_backend`: "pallas" (the GPU kernels) where the default device is a GPU, "xla" (the
pure-jnp reference) elsewhere; a compiled backend named off a GPU is refused unless tracing inside
`lowering_for_gpu`. The cost models are per-device data (`hydragen_jax.tuning`, measured by the sweeps of
`scripts/tuning/`): `hopper_pays` / `pays_on_hopper` decide where "pallas" takes the Hopper kernel, `batching_pays`
where a shared level is read batched (Hydragen) rather than per sequence."""

from __future__ import annotations

import contextlib
import contextvars

from hydragen_jax import tuning as tuning_lib
from hydragen_jax.devices import default_platform
from hydragen_jax.kernels import hopper, ops

BACKENDS = ("pallas", "triton", "mosaic", "interpret", "interpret-mosaic", "xla")
COMPILED_BACKENDS = ("pallas", "triton", "mosaic")  # the compiled GPU kernels: they run on a GPU only
_LOWERING_FOR_GPU = contextvars.ContextVar("hydragen_jax_lowering_for_gpu", default=False)


@contextlib.contextmanager
def lowering_for_gpu():
  """Lets the compiled GPU backends be traced off a GPU, to lower the function for CUDA from a CPU machine:

      with hydragen_jax.lowering_for_gpu():
        traced = jax.jit(f).trace(*args)        # f calls hydragen_attention(..., backend="mosaic")
      text = traced.lower(lowering_platforms=("cuda",)).as_text()

  The Hopper kernel ("mosaic") lowers so as it is; the Triton kernels' lowering also needs a GPU named, trace and
  lower both under `jax.sharding.use_abstract_mesh(AbstractMesh(..., abstract_device=AbstractDevice(...)))` (as
  tests/test_kernels.py does); "pallas" chooses between the two by the tracing machine (no Hopper there: Triton).
  Trace a fresh `jax.jit` inside the block, in the same thread: jit's cache does not see the flag, so a function
  traced inside it is not traced again, nor refused, outside; and the flag is a context variable, which threads
  started inside the block do not inherit. Outside it, a compiled backend named where the default device is not a GPU
  is refused (`resolve_backend`): it could only fail later, inside Pallas' lowering."""
  token = _LOWERING_FOR_GPU.set(True)
  try:
    yield
  finally:
    _LOWERING_FOR_GPU.reset(token)


def default_backend() -> str:
  """The backend used when none is given: "pallas" where the default device is a GPU, "xla" (the pure-jnp reference)
  elsewhere (a CPU, or `with jax.default_device(cpu)` on a GPU machine)."""
  return "pallas" if default_platform() == "gpu" else "xla"


def gpu_without_hopper() -> bool:
  """Whether the default device is a GPU other than a Hopper (an A100, an RTX card, a Blackwell), where the Hopper
  kernel cannot run. (Off a GPU, code may still be lowered for one: `lowering_platforms=("cuda",)`.)"""
  return ops.gpu_capability() is not None and not on_hopper()


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x: H100, H200), where the Hopper kernel runs."""
  return ops.is_hopper(ops.gpu_capability())


def prefix_work(q_shape: tuple[int, ...], num_kv_heads: int, prefix_capacity: int) -> int:
  """Size of the prefix product of queries `[B, T, Hq, D]`: (stacked query rows per KV head, B·T·g) × (prefix
  capacity)."""
  return q_shape[0] * q_shape[1] * q_shape[2] // num_kv_heads * prefix_capacity


def hopper_pays(q, num_kv_heads: int, prefix_capacity: int, suffix_capacity: int | None = None) -> bool:
  """Whether "pallas" takes the Hopper kernel for queries q `[B, T, Hq, D]` over `num_kv_heads` KV heads, a prefix
  of `prefix_capacity` keys and suffixes of `suffix_capacity` (where the levels are its case): on a Hopper GPU,
  where `pays_on_hopper` under the tuning in force."""
  return on_hopper() and pays_on_hopper(q.shape, num_kv_heads, prefix_capacity, suffix_capacity=suffix_capacity)


def prefix_fill(q_shape: tuple[int, ...], num_kv_heads: int, num_cores: int) -> float:
  """The Hopper kernel's prefix items (`kernels.hopper.prefix_items`) per SM of a device of `num_cores` SMs."""
  return hopper.prefix_items(q_shape, num_kv_heads) / num_cores


def pays_on_hopper(q_shape: tuple[int, ...], num_kv_heads: int, prefix_capacity: int,
                   tuning: tuning_lib.Tuning | None = None, num_cores: int | None = None, *,
                   suffix_capacity: int | None = None) -> bool:
  """Whether the Hopper kernel pays on a Hopper GPU (any machine may ask: the sweep does): for a prefix product of
  at least `tuning.hopper_min_work` (None: `tuning.current()`), or of at least `tuning.hopper_min_seq_work` a
  sequence (T·g rows × prefix capacity; 0: off) with suffixes of at most `tuning.hopper_seq_max_suffix` keys (0:
  any; `suffix_capacity` None: not bounded), whose items fill the grid, at least
  `tuning.hopper_min_fill` per SM (`num_cores` SMs; None: the device's, `kernels.ops.num_cores`). There the product
  is compute-bound and the kernel overlaps it with the suffix stream; below, the Triton kernels are as fast or faster
  (measured per device: `hydragen_jax/tuning`; the work threshold was measured on GQA rows, T·g = 4). Any T·g: MHA
  decode (T·g = 1) too, measured faster than Triton in the 7B model on the H200 at B = 512, P = 16K (128 items on
  132 SMs), and slower with the same layer's heads split over two GPUs (64 items: PERF_NOTES.md) until the kernel
  split its prefix keys (the tuning's Hopper `prefix_fill`). The items counted are those before any split, except
  from `tuning.hopper_split_min_rows` T·g rows on, where a product that reaches `hopper_min_work` counts the items
  after the key splits of the setting the kernel would run (measured faster than Triton there: GQA, T·g = 4, long
  prefixes at B = 32-128); and never above `tuning.hopper_max_rows` T·g rows (0: no bound)."""
  tuning = tuning_lib.resolve(tuning)
  cores = ops.num_cores(tuning) if num_cores is None else num_cores
  work = prefix_work(q_shape, num_kv_heads, prefix_capacity)
  rows = hopper.query_rows(q_shape, num_kv_heads)  # T·g: one sequence's query rows a KV head
  if 0 < tuning.hopper_max_rows < rows:
    return False
  bound = tuning.hopper_seq_max_suffix
  short = not bound or suffix_capacity is None or suffix_capacity <= bound
  enough = work >= tuning.hopper_min_work or (0 < tuning.hopper_min_seq_work <= rows * prefix_capacity and short)
  fill = prefix_fill(q_shape, num_kv_heads, cores)
  if 0 < tuning.hopper_split_min_rows <= rows and work >= tuning.hopper_min_work:
    setting = hopper.with_grid(q_shape, num_kv_heads, prefix_capacity,
                               hopper.tuned_config(tuning, rows=rows, prefix=prefix_capacity), cores)
    fill *= setting.prefix_splits
  return enough and fill >= tuning.hopper_min_fill


def batching_pays(batch: int, num_nodes: int, node_bytes: int, tuning: tuning_lib.Tuning | None = None) -> bool:
  """The cost model of a shared level of `num_nodes` nodes read by `batch` sequences, each node `node_bytes` of K
  and V a layer: whether stacking each node's queries and reading it once (Hydragen) pays over each sequence reading
  its node. Batched reads a node once instead of once per reader, so it saves ``(batch - num_nodes) · node_bytes``
  a layer; what it adds is the padding of each node's rows to whole tiles and a program per node and KV head. It
  pays where the nodes have at least `tuning.batch_min_readers` readers on average and the bytes saved are at least
  `tuning.batch_min_saved_bytes` (None: `tuning.current()`; both measured per device by
  `scripts/tuning/sweep_levels.py`)."""
  tuning = tuning_lib.resolve(tuning)
  return batching_rule(batch, num_nodes, batching_saves(batch, num_nodes, node_bytes), tuning.batch_min_readers,
                       tuning.batch_min_saved_bytes)


def batching_saves(batch: int, num_nodes: int, node_bytes: int) -> int:
  """Bytes of K and V a layer that reading a shared level batched does not read: each of its `num_nodes` nodes
  (`node_bytes` each) once, not once a reader (`batch` readers in all)."""
  return (batch - num_nodes) * node_bytes


def batching_rule(batch: int, num_nodes: int, saved_bytes: int, min_readers: int, min_saved_bytes: int) -> bool:
  """`batching_pays`'s rule with its two bounds given: at least `min_readers` readers a node on average and at
  least `min_saved_bytes` saved (the sweep fits the bounds with it: `scripts/tuning/sweep_levels.py`)."""
  return batch >= min_readers * num_nodes and saved_bytes >= min_saved_bytes


def resolve_backend(backend: str | None) -> str:
  """`backend`, checked: one of BACKENDS, a compiled one only where the default device is a GPU (or inside
  `lowering_for_gpu`); None gives `default_backend()`."""
  if backend is None:
    return default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS} (or None for the default).")
  platform = default_platform()
  if backend in COMPILED_BACKENDS and platform != "gpu" and not _LOWERING_FOR_GPU.get():
    raise ValueError(f"backend={backend!r} runs compiled GPU kernels, and the default device is {platform!r}: take "
                     f"'interpret' (the same kernels, interpreted) or 'xla' there (to lower for CUDA from this "
                     f"machine, trace inside hydragen_jax.lowering_for_gpu()).")
  return backend
