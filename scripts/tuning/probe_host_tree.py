"""A batched shared level of one reader a node, on the GPU (development tool): its `seq_to_node` as a numpy array
(a tree known when tracing: the kernel's groups sized by its most-read node, one sequence) against the same tree as
a jnp array (traced: groups sized for all B sequences, as every host tree was before session 63) and against
reading the level per sequence. Queries `[B, 1, Hq, D]` bf16 over B nodes of `--keys` keys, then each sequence's
own 64-key suffix; jitted calls timed from the host, median of `--repeats`; the outputs compared.

  python -m scripts.tuning.probe_host_tree [--batch 512] [--keys 1024] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import hydragen_jax as hj


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m scripts.tuning.probe_host_tree", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=512, help="sequences, one node each (default 512)")
  parser.add_argument("--keys", type=int, default=1024, help="keys a node (default 1024)")
  parser.add_argument("--repeats", type=int, default=20, help="timed calls a variant (default 20)")
  args = parser.parse_args(argv)
  if min(args.batch, args.keys, args.repeats) < 1:
    parser.error("--batch, --keys and --repeats must be >= 1")
  if jax.default_backend() != "gpu":
    parser.exit(2, f"probe_host_tree: times compiled GPU kernels, and this machine has no GPU "
                   f"({jax.default_backend()})\n")
  b, hq, hkv, d, suffix = args.batch, 32, 8, 128, 64
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, 1, hq, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, args.keys, hkv, d), jnp.bfloat16)
  sk = jax.random.normal(ks[2], (b, suffix, hkv, d), jnp.bfloat16)
  lengths, suffix_lengths = jnp.full((b,), args.keys), jnp.full((b,), suffix)
  nodes = np.random.default_rng(0).permutation(b).astype(np.int32)

  def step(seq_to_node, batched: bool):
    return jax.jit(lambda q, k, sk: hj.tree_attention(
        q, [hj.Level(k, k, lengths, seq_to_node), hj.Level(sk, sk, suffix_lengths)], batch_shared=[batched]))

  variants = {"numpy seq_to_node (host groups)": step(nodes, True),
              "jnp seq_to_node (groups for B)": step(jnp.asarray(nodes), True),
              "per sequence": step(nodes, False)}
  outs = {}
  for name, fn in variants.items():
    outs[name] = np.asarray(fn(q, k, sk).block_until_ready(), np.float32)
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      fn(q, k, sk).block_until_ready()
      times.append(time.perf_counter() - start)
    print(f"{name:34s} median {np.median(times) * 1e6:8.1f} us  (min {min(times) * 1e6:.1f})", flush=True)
  for name, out in outs.items():
    print(f"{name:34s} max |diff| against per sequence {float(np.abs(out - outs['per sequence']).max()):.3g}")


if __name__ == "__main__":
  main()
