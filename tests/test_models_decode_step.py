"""The compiled decode step, read from its optimized HLO: the GEMMs that must be there are there, and no layer
weight is copied before its GEMM. Runs on CPU (XLA's CPU compiler) and, with the GPU marker, on the GPU."""

from __future__ import annotations

import collections
import re

import jax.numpy as jnp
import pytest

import models
from models.config import LlamaConfig
from tests.conftest import ON_GPU

# Widths chosen so that every GEMM's output width names its weight: q 40, k and v 20, o and down 24 (hidden),
# gate and up 56, LM head 72.
CONFIG = LlamaConfig(vocab_size=72, hidden_size=24, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=10, max_position_embeddings=256)
LAYERS = CONFIG.num_hidden_layers
WEIGHT_SHAPES = {(24, 40), (24, 20), (40, 24), (24, 56), (56, 24)}  # [in, out] of wq, wk/wv, wo, gate/up, down

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\][^ ]* (\S+?)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


def _computations(hlo: str) -> dict[str, list[str]]:
  """Instruction lines of each computation of an HLO module's text."""
  out, name = {}, None
  for line in hlo.splitlines():
    match = _COMPUTATION.match(line)
    if match and line.rstrip().endswith("{"):
      name = match.group(1)
      out[name] = []
    elif name is not None and line.startswith("  "):
      out[name].append(line)
  return out


def _shape(dims: str) -> tuple[int, ...]:
  return tuple(int(d) for d in dims.split(",") if d)


def gemm_widths(hlo: str) -> collections.Counter:
  """Output widths (last dimension) of every GEMM call site: dots outside fusions, fusions whose computation holds a
  dot, cuBLAS custom calls."""
  comps = _computations(hlo)
  dot_widths = {name: [_shape(m.group(3))[-1] for m in map(_INSTRUCTION.match, lines) if m and m.group(4) == "dot"]
                for name, lines in comps.items()}
  fused = {c for lines in comps.values() for line in lines if " fusion(" in line for c in _CALLS.findall(line)}
  widths = collections.Counter()
  for name, lines in comps.items():
    if name in fused:
      continue
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      if match.group(4) == "dot" or "__cublas$" in line:
        widths[_shape(match.group(3))[-1]] += 1
      elif match.group(4) == "fusion":
        for called in _CALLS.findall(line):
          widths.update(dot_widths.get(called, []))
  return widths


def weight_copies(hlo: str) -> list[str]:
  """Instructions outside fusions that produce a new buffer of a layer weight's shape (copies, slices, fusions)."""
  comps = _computations(hlo)
  fused = {c for lines in comps.values() for line in lines if " fusion(" in line for c in _CALLS.findall(line)}
  found = []
  for name, lines in comps.items():
    if name in fused:
      continue
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match and _shape(match.group(3)) in WEIGHT_SHAPES and match.group(4) not in (
          "parameter", "get-tuple-element", "bitcast", "tuple", "constant"):
        found.append(line.strip()[:160])
  return found


def _compiled_decode(mode: str, dtype, backend) -> str:
  model = models.init_random(CONFIG, dtype=dtype, seed=0)
  state = models.prefill(model, [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9]], 4, mode=mode, backend=backend)
  fn, _ = models.compile_decode(model, state, backend=backend)
  return fn.as_text()


def _cases():
  cases = [pytest.param(jnp.float32, "xla", id="cpu-f32")]
  if ON_GPU:
    cases.append(pytest.param(jnp.bfloat16, "pallas", id="gpu-bf16", marks=pytest.mark.gpu))
  return cases


@pytest.mark.parametrize("dtype,backend", _cases())
def test_none_mode_keeps_the_qkv_projections(dtype, backend):
  """The paper's "No Attention": only the attention and the cache writes are skipped, the q/k/v/o projections run."""
  widths = gemm_widths(_compiled_decode("none", dtype, backend))
  merged = widths[80]  # XLA may merge q, k and v (one LHS) into one GEMM of width 40 + 20 + 20
  assert widths[40] + merged == LAYERS, widths  # q
  assert widths[20] + 2 * merged == 2 * LAYERS, widths  # k, v
  assert widths[72] == 1, widths  # LM head


@pytest.mark.parametrize("mode", ["hydragen", "none"])
@pytest.mark.parametrize("dtype,backend", _cases())
def test_decode_step_reads_layer_weights_in_place(mode, dtype, backend):
  """No layer weight is copied or sliced into a new buffer before its GEMM (as a lax.scan over stacked [L, ...]
  weights made XLA do, every step)."""
  assert weight_copies(_compiled_decode(mode, dtype, backend)) == []
