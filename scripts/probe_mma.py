"""Which tensor-core instructions the compiled prefix kernel uses (run with XLA_FLAGS=--xla_dump_to=DIR on the GPU).

Compiles the prefix half of the largest seed config (B=1024, P=8192, 32/8 heads, D=128) with the given tilings,
then counts wgmma (Hopper warp-group MMA) and mma.sync (Ampere-style MMA) instructions in the dumped PTX.
Usage: XLA_FLAGS=--xla_dump_to=/tmp/dump python scripts/probe_mma.py /tmp/dump
"""

from __future__ import annotations

import pathlib
import re
import sys

import jax
import jax.numpy as jnp

from hydragen_jax.kernels import ops
from hydragen_jax.kernels.flash import BlockConfig

b, p, hq, hkv, d = 1024, 8192, 32, 8, 128
q = jnp.zeros((b, 1, hq, d), jnp.bfloat16)
k = jnp.zeros((1, p, hkv, d), jnp.bfloat16)
for blk in (BlockConfig(64, 64, 1, 4, 3), BlockConfig(128, 128, 1, 8, 3)):
  fn = lambda q, k, v, blk=blk: ops.run(q, [ops.batched(q, k, v, jnp.array([p]), jnp.zeros((b,), jnp.int32),
                                                       max_group=None, causal=False, block=blk)],
                                        scale=d**-0.5, interpret=False)
  jax.jit(fn).lower(q, k, k).compile()
dump = pathlib.Path(sys.argv[1])
files = [f for f in sorted(dump.rglob("*")) if f.is_file()]
print(f"{len(files)} dumped files; suffixes: {sorted({f.suffix for f in files})}")
for f in files:
  if f.stat().st_size < 200_000_000:
    text = f.read_text(errors="ignore")
    counts = {name: len(re.findall(pattern, text)) for name, pattern in
              [("wgmma", r"wgmma\.mma_async"), ("mma.sync", r"mma\.sync"), ("cp.async", r"cp\.async\.(?:cg|ca)"),
               ("tma", r"cp\.async\.bulk\.tensor")]}
    if any(counts.values()):
      print(f.name[:90], counts)
