"""Debug (development tool): the Hopper kernel's prefix and suffix parts against the jnp reference, compiled (a
Hopper GPU): `python -m scripts.tuning.debug_hopper`."""
import argparse

import jax, jax.numpy as jnp, numpy as np
from hydragen_jax import reference
from hydragen_jax.kernels import hopper

def case(b, t, hq, hkv, d, p, s, lens, cfg, plen=None):
  ks = jax.random.split(jax.random.key(b + p + s), 5)
  q = jax.random.normal(ks[0], (b, t, hq, d), jnp.bfloat16)
  pk, pv = (jax.random.normal(k, (p, hkv, d), jnp.bfloat16) for k in ks[1:3])
  sk, sv = (jax.random.normal(k, (b, s, hkv, d), jnp.bfloat16) for k in ks[3:5])
  plen = jnp.int32(p if plen is None else plen)
  lens = jnp.asarray(lens, jnp.int32)
  *pre, (os_, ls) = jax.jit(lambda *a: hopper.prefix_suffix_attention(*a, scale=d**-0.5, config=cfg))(q, pk, pv, plen, sk, sv, lens)
  op, lp = reference.merge_states(pre)  # one part a key split of the prefix
  rp, rlp = reference.shared_attention(q, pk, pv, plen, scale=d**-0.5)
  rs, rls = reference.attention(q, sk, sv, lens, causal=True, scale=d**-0.5)
  f = lambda x: np.asarray(x, np.float32)
  out = []
  for name, o, r, l, rl in (("pre", op, rp, lp, rlp), ("suf", os_, rs, ls, rls)):
    e = np.abs(f(o) - f(r)).max(axis=-1)  # [B, T, Hq]
    bad = np.argwhere(e > 0.02 + 0.02 * np.abs(f(r)).max())
    le = np.abs(np.where(np.isfinite(f(l)), f(l), -99) - np.where(np.isfinite(f(rl)), f(rl), -99))
    out.append(f"{name} out {e.max():.4f} lse {le.max():.3f} bad {len(bad)}/{e.size} first {bad[:4].tolist()}")
  print(f"{(b, t, hq, hkv, d, p, s)} {cfg} plen {int(plen)} lens[:4] {np.asarray(lens)[:4]}: " + "; ".join(out), flush=True)

def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m scripts.tuning.debug_hopper", description=__doc__)
  parser.parse_args(argv)
  if jax.default_backend() != "gpu":
    parser.exit(2, f"debug_hopper: runs the compiled Hopper kernel, and this machine has no GPU "
                   f"({jax.default_backend()})\n")
  H = hopper.HopperConfig
  for cfg in (H(num_ctas=1), H(num_ctas=132), H(num_ctas=4, prefix_stages=2, suffix_stages=1)):
    try:
      case(64, 1, 32, 8, 128, 1024, 64, np.full(64, 64), cfg)
      case(64, 1, 32, 8, 128, 1024, 64, np.full(64, 0), cfg)
      case(64, 1, 32, 8, 128, 1024, 64, np.arange(64), cfg, plen=0)
      case(16, 1, 32, 8, 128, 1000, 136, np.full(16, 136), cfg, plen=997)
      case(5, 3, 8, 2, 64, 136, 64, np.arange(5) * 13, cfg)
    except Exception as e:
      print(cfg, type(e).__name__, str(e)[:800], flush=True)


if __name__ == "__main__":
  main()
