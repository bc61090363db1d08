"""Input checks shared by the public functions: each error names the argument, the shape or dtype it got, and what
was expected (which backend runs: `dispatch`).

Value checks (lengths within capacity, node and layer indices in range) raise `ValueError` on concrete arrays. A
traced value cannot be checked while tracing, so everything stays `jax.jit`-able: every backend then treats it as
clamped to its range (lengths to [0, capacity], indices to [0, N - 1]) where it is used, in the kernels' own index
arithmetic (no read outside the arrays, no extra work). With `checked=True` the public functions add
`jax.experimental.checkify` checks on traced values instead, which report the argument, the position and the value
(the caller wraps the function in `checkify.checkify` and calls `err.throw()`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from hydragen_jax import reference


def _concrete(x) -> np.ndarray | None:
  """The value of x if it is known now (not traced under jit), else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_rank(name: str, x, rank: int, layout: str) -> None:
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):  # a list, a scalar: not an array
    raise ValueError(f"{name} must be an array of rank {rank} ({layout}); got {type(x).__name__}.")
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must have rank {rank} ({layout}); got shape {jnp.shape(x)}.")


def static_hint(name: str) -> str:
  """What to do with argument `name` given to a jitted call as an ordinary (traced) argument, where it decides the
  program's shape."""
  return (f"It decides the program's shape: pass it as a static argument (e.g. jax.jit(fn, "
          f"static_argnames={name!r}), or functools.partial(fn, {name}=...) before jitting).")


def check_flag(name: str, x) -> None:
  if not isinstance(x, (bool, np.bool_)):
    traced = isinstance(x, jax.core.Tracer)  # a flag given to a jitted call as an ordinary (traced) argument
    raise ValueError(f"{name} must be a bool, got {x!r}." + (f" {static_hint(name)}" if traced else ""))


def check_same(name_a: str, a, name_b: str, b) -> None:
  """k and v must agree in shape and dtype (`name_a`'s rank checked before)."""
  if not (hasattr(b, "shape") and hasattr(b, "dtype")):  # a list, a scalar: not an array
    raise ValueError(f"{name_b} must be an array of {name_a}'s shape {a.shape}; got {type(b).__name__}.")
  if a.shape != b.shape:
    raise ValueError(f"{name_a} and {name_b} must have the same shape; got {a.shape} and {b.shape}.")
  if dtype_of(a) != dtype_of(b):
    raise ValueError(f"dtype mismatch between {name_a} ({a.dtype}) and {name_b} ({b.dtype}).")


def dtype_of(x) -> np.dtype:
  """The dtype JAX computes `x` in: a numpy float64 array is float32 without `jax_enable_x64` (as jnp.asarray
  makes it), so that it is taken, and checked, alike on every backend."""
  return jax.dtypes.canonicalize_dtype(x.dtype)


def check_kernel_backend(backend: str, **inputs) -> None:
  """Where the kernel backends cannot run a call, a `ValueError` that says what to take instead (an error of JAX's or
  Pallas' own, or a poisoned process, otherwise). `inputs`: the call's arguments by name (pytrees of arrays, q
  first: its dtype is the call's, the others were checked against it).

  The kernels take 16- and 32-bit floats (float64, with `jax_enable_x64`, only on "xla"); they trace as 32-bit under
  `jax_enable_x64` (`api._attend`). "interpret-mosaic" refuses the mode: Mosaic GPU's interpreter evaluates the
  kernel when the step runs, in a callback, where the mode set by `jax.enable_x64(True)` makes its loops' 32-bit
  counters fail to type-check (set globally it ran; the refusal does not depend on how it was set). Inside
  `jax.shard_map` with `check_vma=True` (JAX 0.11): Pallas needs every output's varying mesh axes, which the kernels
  do not give, and its interpreter fails even where they are given. Inputs sharded over Explicit mesh axes: the
  kernels' indexing fails; Pallas' interpreter fails with any Explicit axis (an input's type, replicated, or the mesh
  set in context). "interpret-mosaic" on several devices: `check_mesh_backend`."""
  if backend == "xla":
    return
  name, q = next(iter(inputs.items()))
  if dtype_of(q) not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"backend={backend!r} runs the Pallas kernels, which take float32, bfloat16 or float16; got "
                     f"{name} {q.dtype} (backend='xla' takes float64 too).")
  if backend == "interpret-mosaic" and jax.config.jax_enable_x64:
    raise ValueError("backend='interpret-mosaic' does not run with jax_enable_x64 on (Mosaic GPU's interpreter "
                     "evaluates the kernel at run time, where the mode breaks its 32-bit loops); on a CPU use "
                     "'interpret' (the Triton kernels interpreted) or 'xla', on a Hopper GPU 'mosaic'.")
  if jax.config.check_vma:  # what Pallas asks of its outputs (set inside shard_map by check_vma=True)
    raise ValueError(f"backend={backend!r} runs Pallas kernels, which do not run inside jax.shard_map with "
                     "check_vma=True (the default): pass check_vma=False to jax.shard_map (each device runs the "
                     "kernels on its own shard), or take backend='xla'.")
  arrays = [(key + jax.tree_util.keystr(path), x) for key, value in inputs.items()
            for path, x in jax.tree_util.tree_flatten_with_path(value)[0] if isinstance(x, jax.Array)]
  mesh = jax.sharding.get_abstract_mesh()
  typed = [(f"{name} {jax.typeof(x).str_short()}", jax.typeof(x).sharding) for name, x in arrays]
  instead = ("call it inside jax.shard_map(..., check_vma=False), where each device runs the kernels on its own "
             "shard, or on a mesh of Auto axes, or take backend='xla'.")
  for what, sharding in typed:
    if any(axis is not None for axis in sharding.spec):
      raise ValueError(f"backend={backend!r} runs Pallas kernels, which take no input sharded over Explicit mesh "
                       f"axes; got {what} ({sharding.spec}): {instead}")
  if backend.startswith("interpret"):  # the interpreter fails on Explicit axes unsharded too (compiled Triton runs)
    for what, on in [(what, sharding.mesh) for what, sharding in typed] + [
        ("the mesh set in context (jax.set_mesh)", mesh)]:
      if on.explicit_axes:
        raise ValueError(f"backend={backend!r} runs Pallas' interpreter, which does not run with Explicit mesh axes "
                         f"(replicated inputs included); got {what} with Explicit axes {on.explicit_axes}: {instead}")
  check_mesh_backend(backend, max([1 if mesh.empty else mesh.size] + [
      len(x.sharding.device_set) for _, x in arrays if not isinstance(x, jax.core.Tracer)]))


def check_mesh_backend(backend: str | None, devices: int) -> None:
  """`ValueError` for backend "interpret-mosaic" run on several `devices` (a mesh's, or those its inputs span): JAX's
  Mosaic GPU interpreter (0.11) keeps one state for all devices, and a kernel ending on one device finds another
  device's barriers still allocated (an AssertionError mid-run, and every later interpreted Mosaic call of the
  process fails too). Under `jax.jit` without a mesh in context (`jax.set_mesh`, `jax.shard_map`), inputs sharded
  over Auto axes are not seen (their traced types do not say)."""
  if backend == "interpret-mosaic" and devices > 1:
    raise ValueError(f"backend='interpret-mosaic' does not run on a mesh of {devices} devices: JAX's Mosaic GPU "
                     "interpreter shares its state between the devices' kernels, which then fail ('Barrier remains "
                     "allocated'); take backend='interpret' (the Triton kernels interpreted) or 'xla' there, or one "
                     "device")


def check_heads(q_name: str, q, kv_name: str, kv) -> None:
  """q `[..., Hq, D]` against k `[..., Hkv, D]`: same D (at least 1), Hq a multiple of Hkv, same floating dtype."""
  hq, d = q.shape[-2:]
  hkv, dk = kv.shape[-2:]
  if not jnp.issubdtype(dtype_of(q), jnp.floating) or dtype_of(q).itemsize < 2:
    raise ValueError(f"{q_name} must have a floating dtype of 16 bits or more (float32, bfloat16, float16; float64 "
                     f"on backend='xla'); got {q.dtype}.")
  if d < 1:
    raise ValueError(f"head dim of {q_name} {q.shape} must be at least 1; got D={d}.")
  if d != dk:
    raise ValueError(f"head dim of {q_name} {q.shape} (D={d}) differs from {kv_name} {kv.shape} (D={dk}).")
  if hkv == 0:
    raise ValueError(f"{kv_name} {kv.shape} has no KV heads (Hkv=0); expected at least one.")
  if hq % hkv:
    raise ValueError(f"query heads of {q_name} {q.shape} (Hq={hq}) must be a multiple of the KV heads of "
                     f"{kv_name} {kv.shape} (Hkv={hkv}).")
  if dtype_of(q) != dtype_of(kv):
    raise ValueError(f"dtype mismatch between {q_name} ({q.dtype}) and {kv_name} ({kv.dtype}).")


def _as_array(name: str, x) -> jax.Array | np.ndarray:
  """`x` as an array: a jax or numpy array as it is; Python values (ints, lists) as a jax array, as `jnp.asarray`
  makes them, unless they could not be one faithfully: past int32 (jnp would overflow on 2**40, or wrap it before its
  range is checked) or not integers (strings, floats); those stay numpy, for the checks that name them."""
  if isinstance(x, (np.ndarray, jax.Array)):
    return x
  try:
    host = np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return jnp.asarray(x)  # a list of traced values
  if host.dtype == object:  # past int64, or not numbers at all
    raise ValueError(f"{name} must be integer; got {host.tolist()!r}.")
  if host.dtype.kind not in "iu" or (host.size and (host.min() < -2**31 or host.max() > 2**31 - 1)):
    return host  # refused by the dtype or range check, which names it
  return jnp.asarray(host)


def _int_vector(name: str, x, count: int, what: str) -> tuple[jax.Array | np.ndarray, np.ndarray | None]:
  """`x` as an integer `[count]` array (of its own integer type: `_int32` casts it once it is range-checked), and
  its value if concrete (else None). A numpy array stays numpy (its value is known even under jit: a constant of the
  step)."""
  x = _as_array(name, x)
  if x.shape != (count,):
    raise ValueError(f"{name} must have shape ({count},){what}; got {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be integer; got dtype {x.dtype}.")
  value = _concrete(x)
  return x, (value if value is not None and value.size else None)


def _int32(x, value: np.ndarray | None):
  """Integer `x` as int32. A traced value of a wider type is clipped to int32's range first
  (`reference.saturate_int32`: 2^32 + 3 must not wrap to 3). A concrete value was range-checked (`_check_range`)
  before it is used."""
  if isinstance(x, np.ndarray):  # a constant (its value checked): stays numpy
    return x.astype(np.int32)
  return reference.saturate_int32(x) if value is None else x.astype(np.int32)


def _check_range(name: str, x: jax.Array, value: np.ndarray | None, hi: int, bounds: str, what: str,
                 checked: bool, scalar: bool = False) -> None:
  """Values of `x` must lie in [0, hi] (shown as `bounds`): a concrete `value` raises ValueError now; a traced one
  (value None) is checked by checkify if `checked`, else left to be clamped where it is used. `scalar` (or a 0-d
  `x`): the argument is one number, whose checkify message names no index."""
  message = f"{name} must lie in {bounds} {what}; got"
  if value is not None:
    if value.min() < 0 or value.max() > hi:
      got = f"{value.item()}" if value.size == 1 else f"min {value.min()}, max {value.max()}"
      raise ValueError(f"{message} {got}.")
  elif checked and x.size:
    flat = jnp.reshape(x, (-1,))
    # compared in the argument's own type only where `hi` fits it (an int8 beside a capacity of 300 saw 44: valid
    # lengths refused); where it does not, no value of the type exceeds it
    over = flat > jnp.asarray(hi, flat.dtype) if hi < jnp.iinfo(flat.dtype).max else jnp.zeros(flat.shape, bool)
    bad = (flat < 0) | over
    first = jnp.argmax(bad)
    if scalar or jnp.ndim(x) == 0:
      checkify.check(~jnp.any(bad), message + " {}.", flat[0])
    else:
      checkify.check(~jnp.any(bad), message + " {} at index {}.", flat[first], first)


def lengths_or_full(name: str, lengths, count: int, capacity: int, checked: bool = False,
                    what: str = "(the KV capacity)", scalar: bool = False) -> jax.Array | np.ndarray:
  """Validates `lengths` `[count]` of valid keys (<= capacity, which `what` names in errors); None means all
  `capacity` keys are valid. `scalar`: `lengths` is one number reshaped to `[1]` (its errors name no index). int32,
  numpy where known now (None, a numpy input: constants the kernels' plans read on the host)."""
  if lengths is None:
    return np.full((count,), capacity, np.int32)  # a constant: no device work
  lengths, value = _int_vector(name, lengths, count, "")
  _check_range(name, lengths, value, capacity, f"[0, {capacity}]", what, checked, scalar)
  return _int32(lengths, value)


def scalar_length(name: str, length, capacity: int, checked: bool = False) -> jax.Array | np.ndarray:
  """A single valid-key count (or None: all `capacity` keys), as an int32 `[1]` (a one-node level's lengths;
  numpy where known now)."""
  if length is None:
    return np.full((1,), capacity, np.int32)
  length = _as_array(name, length)
  if length.ndim != 0:
    raise ValueError(f"{name} must be a scalar; got shape {length.shape}.")
  return lengths_or_full(name, length.reshape((1,)), 1, capacity, checked, scalar=True)


def node_index(name: str, seq_to_node, batch: int, num_nodes: int, checked: bool = False,
               reads: bool = True) -> jax.Array | np.ndarray:
  """Validates `seq_to_node` `[batch]` with values in [0, num_nodes). A numpy array stays one (a static tree: the
  kernels group its sequences on the host, no device work per step)."""
  seq_to_node, value = _int_vector(name, seq_to_node, batch, " (one node per sequence of q)")
  if num_nodes == 0 and batch and reads and value is None:  # no traced value can be clamped into an empty range
    # (`reads`: q has queries; with none, nothing is read and the outputs are empty, as the contract says)
    raise ValueError(f"{name} must lie in [0, 0) (the level has 0 nodes): no value does, and {batch} sequences "
                     "read the level; give it a node or leave it out.")
  _check_range(name, seq_to_node, value, num_nodes - 1, f"[0, {num_nodes})", f"(the level has {num_nodes} nodes)",
               checked)
  return _int32(seq_to_node, value)


def layer_index(name: str, layer, num_layers: int, checked: bool = False, reads: bool = True
                ) -> jax.Array | np.ndarray:
  """Validates a scalar integer layer index in [0, num_layers)."""
  layer = _as_array(name, layer)
  if layer.ndim != 0 or not jnp.issubdtype(layer.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer scalar; got shape {layer.shape}, dtype {layer.dtype}.")
  value = _concrete(layer)
  if num_layers == 0 and reads and value is None:  # no traced value can be clamped into an empty range (`reads`: as
    # node_index's)
    raise ValueError(f"{name} must lie in [0, 0) (the layer axis of k is empty): no value does.")
  _check_range(name, layer, value, num_layers - 1, f"[0, {num_layers})", "(the layer axis of k)", checked)
  return _int32(layer, value)


def max_group(name: str, bound, seq_to_node, num_nodes: int, checked: bool = False) -> int | None:
  """`Level.max_group`: None, or an int >= 1 that bounds the sequences reading any one node of `seq_to_node`
  (None: sequence b reads node b, one reader each). Checked now where seq_to_node is concrete, by checkify where
  it is traced and `checked`; the kernels give each node rows for `bound` sequences only. Returns the bound as a
  Python int (a numpy integer, as `np.bincount(...).max()` gives, is taken), or None."""
  if bound is None:
    return None
  if isinstance(bound, (bool, np.bool_)) or not isinstance(bound, (int, np.integer)) or bound < 1:
    raise ValueError(f"{name} must be None or an integer >= 1 (a bound on the sequences reading one node); "
                     f"got {bound!r}.")
  bound = int(bound)
  if seq_to_node is None or not seq_to_node.size:
    return bound
  value = _concrete(seq_to_node)
  if value is not None:
    counts = np.bincount(value, minlength=num_nodes)
    if counts.max() > bound:
      raise ValueError(f"{name}={bound}, but node {int(counts.argmax())} is read by {int(counts.max())} "
                       f"sequences (seq_to_node); it must bound the readers of every node (None: the batch).")
  elif checked:
    counts = jnp.bincount(seq_to_node, length=num_nodes)
    checkify.check(jnp.max(counts) <= bound, name + f"={bound}, but node {{}} is read by {{}} sequences "
                   "(seq_to_node); it must bound the readers of every node.", jnp.argmax(counts), jnp.max(counts))
  return bound
