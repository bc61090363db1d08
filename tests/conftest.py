"""Shared test base: every implementation (backend) runs the same tests.

"xla" is the pure-jnp reference path, "interpret" / "interpret-mosaic" run the Triton / Hopper Pallas kernels in
their interpreters (CPU, CI), "pallas" / "mosaic" compile them for the GPU and are skipped, with the reason, where
there is none. Cases outside the Hopper kernel's (float32, odd capacities, ...) run on the Triton kernels under
"interpret-mosaic" / "mosaic" too, so those backends also check the fallback.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

# Several test processes (`pytest -n 6`) share one GPU: none may preallocate most of its memory (JAX's default).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

ON_GPU = jax.default_backend() == "gpu"
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU: the compiled Pallas (Triton) kernels run only there")

BACKEND_PARAMS = [
    pytest.param("xla", id="xla"),
    pytest.param("interpret", id="interpret"),
    pytest.param("interpret-mosaic", id="interpret-mosaic"),
    pytest.param("pallas", id="pallas", marks=[pytest.mark.gpu, requires_gpu]),
    pytest.param("mosaic", id="mosaic", marks=[pytest.mark.gpu, requires_gpu]),
]
KERNEL_BACKENDS = [BACKEND_PARAMS[1], BACKEND_PARAMS[3]]  # the Triton kernels (ops.run): interpreted, compiled


def grid(*axes: list, ids: list | None = None, ci: tuple[str, ...] | None = None) -> list:
  """Every combination of the axes' values, as pytest params, with a covering subset in the default (CI) tier and
  the rest marked slow (run by `scripts/test.sh --all`; on the GPU, `-m gpu` runs every compiled combination).

  The subset: for j < max(len(axes[0]), the product of the other axes' lengths), the case of value j mod n_0 of the
  first axis and, of each other axis k, value (j + (j // n_k)·(k - 1)) mod n_k (n_k: an axis's length), duplicates
  once: every value of every axis is in it, and every pair of values of two 2-value axes. ids: one function per
  axis, a value's id (a case's id joins them with "-"), or None (pytest's own). ci: the ids of the cases CI runs
  instead of that subset (where each costs too much CI time for the whole subset), each one of the grid's."""
  n = [len(a) for a in axes]
  subset = set()
  for j in range(max(n[0], math.prod(n[1:]))):
    subset.add((j % n[0], *((j + (j // m) * (k - 1)) % m for k, m in enumerate(n[1:], start=1))))
  cases = []
  for index in itertools.product(*(range(m) for m in n)):
    values = tuple(a[i] for a, i in zip(axes, index))
    case_id = None if ids is None else "-".join(f(v) for f, v in zip(ids, values))
    in_ci = index in subset if ci is None else case_id in ci
    cases.append(pytest.param(*values, id=case_id, marks=() if in_ci else pytest.mark.slow))
  assert ci is None or set(ci) <= {c.id for c in cases}, set(ci) - {c.id for c in cases}
  return cases


def shipped(field: str) -> bool:
  """Whether a shipped tuning file (of any known device kind) sets the kernels' option `field` other than its
  default: a field of `Tuning` (e.g. `launch_merge_max_rows`, `write_max_rows` above 0), or of a Hopper setting
  (`HopperTuning`: an entry of `hopper` or `hopper_long` with a switch on, clusters of 2, a pair suffix cost
  above 0)."""
  from hydragen_jax import tuning  # noqa: PLC0415

  top = {f.name: f.default for f in dataclasses.fields(tuning.Tuning)}
  default = top.get(field, {f.name: f.default for f in dataclasses.fields(tuning.HopperTuning)}.get(
      field, dataclasses.MISSING))
  if default is dataclasses.MISSING:  # a measured value every file has, or a typo
    raise ValueError(f"shipped: {field!r} is not an option of Tuning or HopperTuning with a default (off)")
  files = [tuning.file_for(kind).tuning for kind in tuning.known_kinds()]
  values = ([getattr(t, field) for t in files] if field in top else
            [getattr(setting, field) for t in files for entries in (t.hopper, t.hopper_long) for _, setting in entries])
  return any(value != default for value in values)


def ci_if_shipped(field: str) -> pytest.MarkDecorator:
  """The mark of a test (or a case) of the kernels' option `field` (see `shipped`): `shipped(field)` where a shipped
  tuning file sets the option (CI runs it), else slow (CI time: an option no device runs is tested by `scripts/test.sh
  --all`, and its compiled cases on the GPU with -m gpu; a test that only lowers for CUDA runs with --all only). A
  tuning file that turns the option on brings its tests into CI."""
  return pytest.mark.shipped(field) if shipped(field) else pytest.mark.slow


def _float32(value) -> bool:
  try:
    return isinstance(value, (type, np.dtype)) and np.dtype(value) == np.float32
  except TypeError:
    return False


def pytest_collection_modifyitems(items):
  """A case of the "interpret-mosaic" backend that runs the Triton kernels "interpret" runs is a duplicate in CI:
  slow tier (CI time; compiled on the GPU as "mosaic"). Such are its float32 cases (the Hopper kernel takes 16-bit
  inputs only) and those of a test marked `mosaic_falls_back` (its shapes or levels are not the Hopper kernel's),
  unless marked `mosaic_falls_back(ci=True)`: the fallback is what it tests. The `backend` fixture checks the mark."""
  for item in items:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("backend") != "interpret-mosaic":
      continue
    mark = item.get_closest_marker("mosaic_falls_back")
    if any(map(_float32, params.values())) or (mark is not None and not mark.kwargs.get("ci", False)):
      item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  """Each phase's report on its item (`rep_call`...): the `backend` fixture checks only a case that passed."""
  report = yield
  setattr(item, f"rep_{report.when}", report)
  return report


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request, monkeypatch):
  """Every implementation of the op. An "interpret-mosaic" case must reach the Hopper kernel unless its test is
  marked `mosaic_falls_back` (then it must not, float32 cases aside: they never can): a case would otherwise run
  the Triton kernels unnoticed, twice in CI, or keep a mark that no longer holds. jit's caches are cleared first so
  that the case traces its own calls."""
  if request.param != "interpret-mosaic":
    yield request.param
    return
  from hydragen_jax.kernels import hopper  # noqa: PLC0415

  jax.clear_caches()
  calls, real = [], hopper.prefix_suffix_attention
  monkeypatch.setattr(hopper, "prefix_suffix_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
  yield request.param
  report = getattr(request.node, "rep_call", None)
  if report is None or not report.passed:  # skipped or failed: its own outcome says what happened
    return
  params = request.node.callspec.params
  falls_back = request.node.get_closest_marker("mosaic_falls_back") is not None
  if calls and falls_back:
    pytest.fail("this interpret-mosaic case reaches the Hopper kernel: its test's mosaic_falls_back mark is wrong")
  if not calls and not falls_back and not any(map(_float32, params.values())):
    pytest.fail("this interpret-mosaic case never reaches the Hopper kernel (the Triton kernels ran, as under "
                "\"interpret\"): mark its test mosaic_falls_back, or give it the Hopper kernel's shapes")


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request) -> str:
  """The Pallas kernels: interpreted on CPU, compiled on GPU."""
  return request.param


def record_batch_shared(monkeypatch) -> list:
    """The `batch_shared` argument of every `hydragen_jax.tree_attention` call made from now on (the models call it
    through the module, so the spy sees the choice each step or prefill traced), in a list that grows as they come.
    jit's caches are cleared first: a step another test compiled with the same arguments would not trace again."""
    import hydragen_jax  # noqa: PLC0415

    jax.clear_caches()

    seen, real = [], hydragen_jax.tree_attention

    def spy(q, levels, **kw):
        seen.append(kw.get("batch_shared"))
        return real(q, levels, **kw)

    monkeypatch.setattr(hydragen_jax, "tree_attention", spy)
    return seen
