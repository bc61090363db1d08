"""Shared test base: every implementation (backend) runs the same tests.

"xla" is the pure-jnp reference path, "interpret" / "interpret-mosaic" run the Triton / Hopper Pallas kernels in
their interpreters (CPU, CI), "pallas" / "mosaic" compile them for the GPU and are skipped, with the reason, where
there is none. Cases outside the Hopper kernel's (float32, odd capacities, ...) run on the Triton kernels under
"interpret-mosaic" / "mosaic" too, so those backends also check the fallback.
"""

from __future__ import annotations

import os

# Several test processes (`pytest -n 6`) share one GPU: none may preallocate most of its memory (JAX's default).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
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


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request) -> str:
  """Every implementation of the op."""
  return request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request) -> str:
  """The Pallas kernels: interpreted on CPU, compiled on GPU."""
  return request.param


def record_batch_shared(monkeypatch) -> list:
    """The `batch_shared` argument of every `hydragen_jax.tree_attention` call made from now on (the models call it
    through the module, so the spy sees the choice each step or prefill traced), in a list that grows as they come."""
    import hydragen_jax  # noqa: PLC0415

    seen, real = [], hydragen_jax.tree_attention

    def spy(q, levels, **kw):
        seen.append(kw.get("batch_shared"))
        return real(q, levels, **kw)

    monkeypatch.setattr(hydragen_jax, "tree_attention", spy)
    return seen
