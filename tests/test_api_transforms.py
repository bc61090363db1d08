"""The public API under JAX's transforms and meshes on the kernel backends: each case either runs or is refused by
name before anything runs (it failed with JAX's or Pallas' own errors, or poisoned the process): `jax.shard_map` with
its default `check_vma=True`, Explicit mesh axes, "interpret-mosaic" on several devices, `jax.vmap` over an axis of
size 0. The multi-device case runs in a subprocess with 2 CPU host devices (XLA_FLAGS must be set before JAX
starts)."""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import hydragen_jax as hj

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ["interpret", "interpret-mosaic"]


def _inputs(*batch, b=2, t=1, hq=4, hkv=1, d=64, s=16, dtype=jnp.bfloat16, seed=0):
  """q `[*batch, B, T, Hq, D]` and k, v `[*batch, B, S, Hkv, D]` (the Hopper kernel's shapes in bf16)."""
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((*batch, b, n, h, d)), dtype) for n, h in ((t, hq), (s, hkv), (s, hkv)))
  return q, k, v


def _one_device_mesh(axis_type):
  return jax.make_mesh((1,), ("x",), axis_types=(axis_type,))


@pytest.mark.parametrize("backend", KERNELS)
def test_shard_map_with_vma_checks_is_refused_by_name(backend):
  """Pallas needs each output's varying mesh axes under `check_vma=True` (shard_map's default), which the kernels do
  not give (and its interpreter fails even where they are given): a ValueError saying to pass check_vma=False
  (was Pallas' own, about `manual_axis_type` of a ShapeDtypeStruct); with it, or on "xla", the call runs."""
  q, k, v = _inputs(s=8)
  mesh = _one_device_mesh(AxisType.Auto)
  run = lambda backend, **kw: jax.jit(jax.shard_map(functools.partial(hj.attention, backend=backend), mesh=mesh,
                                                    in_specs=P("x"), out_specs=P("x"), **kw))(q, k, v)
  with pytest.raises(ValueError, match=rf"backend='{backend}' runs Pallas kernels, which do not run inside "
                                       r"jax.shard_map with check_vma=True .*pass check_vma=False"):
    run(backend)
  want = run("xla")
  got = run(backend, check_vma=False)
  np.testing.assert_allclose(np.float32(got[0]), np.float32(want[0]), atol=2e-2)


@pytest.mark.parametrize("spec", [P("x"), P()], ids=["sharded", "replicated"])
@pytest.mark.parametrize("backend", KERNELS)
def test_explicit_mesh_axes_are_refused_by_name(backend, spec):
  """Under `jax.jit`, inputs typed on a mesh of Explicit axes, sharded (the kernels' indexing fails, compiled too)
  or, on the interpreted backends, replicated or such a mesh set in context (Pallas' interpreter fails): a
  ValueError naming the input and the axes (was JAX's 'sharded ref can only be indexed by slices' or a sharding
  mismatch inside Pallas' interpreter); "xla" runs."""
  q, k, v = _inputs()
  mesh = _one_device_mesh(AxisType.Explicit)
  typed = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
  fn = lambda backend: jax.jit(functools.partial(hj.attention, backend=backend))
  got = (r"Pallas kernels, which take no input sharded over Explicit mesh axes; got q bfloat16\[2@x,1,4,64\] "
         r"\(P\('x', None, None, None\)\)" if spec == P("x") else
         r"Pallas' interpreter, which does not run with Explicit mesh axes .*got q bfloat16\[2,1,4,64\] with Explicit "
         r"axes \('x',\)")
  with pytest.raises(ValueError, match=rf"backend='{backend}' runs {got}: call it inside jax.shard_map\(..., "
                                       r"check_vma=False\)"):
    fn(backend)(*typed)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"got the mesh set in context \(jax.set_mesh\) with "
                                                           r"Explicit axes \('x',\)"):
    fn(backend)(q, k, v)  # uncommitted inputs, the mesh in context
  np.testing.assert_allclose(np.float32(fn("xla")(*typed)[0]), np.float32(fn("xla")(q, k, v)[0]), atol=2e-2)


_SEVERAL_DEVICES = """
import functools
import jax, jax.numpy as jnp, numpy as np, pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import hydragen_jax as hj
from tests.test_api_transforms import _inputs

assert jax.device_count() == 2, jax.devices()
q, k, v = _inputs(b=4)
mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Auto,))
refused = (r"backend='interpret-mosaic' does not run on a mesh of 2 devices: JAX's Mosaic GPU interpreter shares "
           r".*take backend='interpret'")
attend = lambda q, k, v, backend="interpret-mosaic": hj.hydragen_attention(q, k[0], v[0], k, v, backend=backend)
with pytest.raises(ValueError, match=refused):  # each device's kernels under shard_map
    jax.jit(jax.shard_map(attend, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False))(q, k, v)
with jax.set_mesh(mesh), pytest.raises(ValueError, match=refused):  # a mesh in context
    jax.jit(attend)(q, k, v)
with pytest.raises(ValueError, match=refused):  # inputs spanning both devices
    attend(*(jax.device_put(x, NamedSharding(mesh, P("x"))) for x in (q, k, v)))
want = attend(q, k, v, backend="xla")
np.testing.assert_allclose(np.float32(jax.jit(attend)(q, k, v)), np.float32(want), atol=2e-2)  # one device runs
print("OK")
"""


def test_interpreted_mosaic_on_several_devices_is_refused_by_name():
  """backend "interpret-mosaic" on 2 devices (shard_map, a mesh in context, inputs spanning them): refused with the
  models' error (`validation.check_mesh_backend`), before JAX's Mosaic GPU interpreter, which keeps one state for
  all devices, fails mid-run ('Barrier remains allocated') and every later interpreted Mosaic call of the process
  with it; on one device of the same process it runs."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"]).strip())
  done = subprocess.run([sys.executable, "-c", textwrap.dedent(_SEVERAL_DEVICES)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout[-3000:] + done.stderr[-3000:]


def _calls(backend):
  """Each public function, of arrays `q [B, T, Hq, D]`, `k, v [B, S, Hkv, D]` (the Hopper kernel's case where
  interpreted Mosaic runs it: `hydragen_attention`), returning a tuple of arrays."""
  lengths = jnp.array([16, 5], jnp.int32)
  return {
      "attention": lambda q, k, v: hj.attention(q, k, v, kv_lengths=lengths, causal=True, backend=backend),
      "hydragen_attention": lambda q, k, v: (hj.hydragen_attention(q, k[0], v[0], k, v, suffix_lengths=lengths,
                                                                   backend=backend),),
      "tree_attention": lambda q, k, v: (hj.tree_attention(
          q, [hj.Level(k, v, lengths, seq_to_node=jnp.array([1, 1])), hj.Level(k, v, lengths)], backend=backend),),
      "tree_attention_append": lambda q, k, v: hj.tree_attention_append(
          q, [hj.Level(k, v, jnp.array([3, 4]))], k[:, :1], v[:, :1], backend=backend),
  }


@pytest.mark.parametrize("name", ["attention", "hydragen_attention", "tree_attention", "tree_attention_append"])
@pytest.mark.parametrize("backend", KERNELS)
def test_vmap_over_an_empty_axis_gives_empty_outputs(backend, name):
  """`jax.vmap` over an axis of size 0 (outer or inner of two, jitted or not): outputs of "xla"'s shapes and dtypes,
  empty along it (was Pallas' batching rule's TypeError, a block of one row sliced from the empty axis)."""
  fn, ref = _calls(backend)[name], _calls("xla")[name]
  for batch, wrap in [((0,), jax.vmap), ((0, 3), lambda f: jax.vmap(jax.vmap(f))),
                      ((3, 0), lambda f: jax.jit(jax.vmap(jax.vmap(f))))]:
    args = _inputs(*batch)
    got, want = wrap(fn)(*args), wrap(ref)(*args)
    assert [(x.shape, x.dtype) for x in got] == [(x.shape, x.dtype) for x in want], (batch, got, want)


@pytest.mark.parametrize("backend", KERNELS)
def test_vmap_over_nonempty_axes_is_unchanged(backend):
  """Beside the empty-axis rule, vmap is the kernels' own: the values of "xla" (q batched, k and v not)."""
  q, _, _ = _inputs(2)
  _, k, v = _inputs()
  fn = lambda backend: jax.vmap(_calls(backend)["hydragen_attention"], in_axes=(0, None, None))
  np.testing.assert_allclose(np.float32(fn(backend)(q, k, v)[0]), np.float32(fn("xla")(q, k, v)[0]), atol=2e-2)


def test_an_interpreted_call_does_not_recompile_what_was_jitted_before():
  """The first interpreted kernel call imported Pallas' interpreter, which registers a config option (part of every
  jit cache key): the function jitted just before compiled again at its next identical call. Run in a fresh process
  (the import is once a process)."""
  code = """
import functools, jax, jax.numpy as jnp
import hydragen_jax as hj
q = jnp.ones((2, 1, 4, 16)); pk = jnp.ones((8, 2, 16)); sk = jnp.ones((2, 4, 2, 16))
f = jax.jit(functools.partial(hj.hydragen_attention, backend="interpret"))
for _ in range(2):
  jax.block_until_ready(f(q, pk, pk, sk, sk))
print("compiled", f._cache_size())
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=pathlib.Path(__file__).resolve().parent.parent)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "compiled 1" in run.stdout, run.stdout
