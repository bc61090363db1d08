"""Probe (development tool): the Hopper (Mosaic GPU) kernel against the current Triton step on the GQA seed configs.

For each config, times a whole decode step (chained as in the benchmark) at s = 1, out/2, out with
`auto` (the Triton kernels, `ops.run`) and with `hopper.prefix_suffix_attention` under tilings, prints the floor
fraction of tok/s and the max error against `auto`; then a few odd shapes (T > 1, D = 64, lengths not a
multiple of the block) against the reference. Usage: python -m scripts.tuning.probe_hopper [--configs 5,6,7,8]
[--shapes BxPxOUTxHQxHKV,...] [--variants st2,st3]

A variant is a name of VARIANTS, or `tuned` (the device's tuning for the config's T·g and prefix: what `pallas`
runs), either followed by `-ek` for the same without `prefix_early_keys`, then by overrides, each `+ek` (with it)
or `+FIELD=VALUE` of HopperConfig (e.g. `--variants tuned,tuned+ek,tuned+prefix_keys=128+pair_registers=224+
suffix_registers=56`).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments import device_rates, floor, timing
from hydragen_jax import merge_states, reference
from hydragen_jax.kernels import hopper
from scripts import cli
from scripts.quick_bench import D, prefix_plan, run_plans, suffix_plan, print_fraction, time_at_lengths
from scripts.tuning.sweep_kernels import CONFIGS, SEED, add_shapes, floor_s, inputs

TIMING = dict(warmup=2, repeats=5, min_repeat_s=0.02, max_inner=10)
STEPS = 16
VARIANTS = {
    "hop": hopper.HopperConfig(),
    "nopp": hopper.HopperConfig(pingpong=False),
    "p2s3": hopper.HopperConfig(prefix_stages=2, suffix_stages=3),
    "r216": hopper.HopperConfig(pair_registers=216, suffix_registers=72),  # 504 registers: the pool (80 hung)
    "h200": hopper.HopperConfig(prefix_stages=2, suffix_stages=3),  # the H200's file (session 9)
    "p2s1": hopper.HopperConfig(prefix_stages=2, suffix_stages=1),  # k128's rings with 64-key tiles
    "k128": hopper.HopperConfig(prefix_stages=2, suffix_stages=1, prefix_keys=128),  # 128-key prefix tiles
    # q in registers: 64-key tiles with the H200's rings; 128-key tiles with 2 suffix stages (the room q freed),
    # with the pair's registers raised for q's 32
    "q64": hopper.HopperConfig(prefix_stages=2, suffix_stages=3, q_registers=True),
    "k128q": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True),
    # (224 / 64, 512 registers, hung on the H200 in session 13: over the pool, now refused)
    "k128q224": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True,
                                    pair_registers=224, suffix_registers=56),
    # 2-CTA clusters sharing each prefix tile by TMA multicast
    "c2": hopper.HopperConfig(prefix_stages=2, suffix_stages=3, cluster=2),
    "k128qc2": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True, cluster=2),
    # the suffix ring across items
    "la": hopper.HopperConfig(prefix_stages=2, suffix_stages=3, suffix_lookahead=True),
    "k128qla": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True,
                                   suffix_lookahead=True),
    # 128-key suffix tiles (2 stages need q in registers), with and without the lookahead
    "s128q": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128),
    "s128qla": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128,
                                   suffix_lookahead=True),
    # the H200's settings of T·g = 1 and of 2-8 (session 14), and both with the last suffix tile trimmed
    "k128qlat": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True,
                                    suffix_lookahead=True, suffix_trim=True),
    "s128qt": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128,
                                  suffix_trim=True),
    # the H200's settings of T·g = 2-8 and of T·g = 1 with the pair's value product issued with the next scores
    # (FlashAttention-3's intra-warpgroup pipelining, session 16), and the first without the ping-pong
    "s128qov": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128,
                                   prefix_overlap=True),
    "s128qov_nopp": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128,
                                        prefix_overlap=True, pingpong=False),
    "k128qlatov": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True,
                                      suffix_lookahead=True, suffix_trim=True, prefix_overlap=True),
    # T·g = 1's settings with the prefix keys split over CTAs (session 18: a B = 64 MHA step has 32 prefix items
    # for 132 SMs): by the fill rule (below fill × CTAs items, splits doubled until the items reach the CTAs; any
    # fill >= 1 splits the same shapes as 1), and 2 / 4 / 8 splits
    **{f"k128qlat_{name}": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True,
                                               suffix_lookahead=True, suffix_trim=True, **kw)
       for name, kw in [("f1", dict(prefix_fill=1.0)), ("f075", dict(prefix_fill=0.75)), ("s2", dict(prefix_splits=2)),
                        ("s4", dict(prefix_splits=4)), ("s8", dict(prefix_splits=8)),
                        ("f075p", dict(prefix_fill=0.75, suffix_pack=True))]},
    # the H200's settings of T·g = 2-8 with packed suffix items (the 8 / T·g sequences of a query window in one
    # item, session 19), and with the suffix ring across items too
    "s128qp": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128,
                                  suffix_pack=True),
    "s128qlap": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128,
                                    suffix_lookahead=True, suffix_pack=True),
    # suffix_box (session 28): a packed tile whose sequences all have its keys in one TMA copy of K and one of V
    # instead of 8 / T·g; T·g = 1's setting, and with 128-key suffix tiles (16 keys a sequence, half the tiles an
    # item; 64-key prefix tiles for the shared memory), and the GQA rows' setting
    "k128qlat_f075pb": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True,
                                           suffix_lookahead=True, suffix_trim=True, prefix_fill=0.75,
                                           suffix_pack=True, suffix_box=True),
    "s128qpb_f075": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128,
                                        prefix_fill=0.75, suffix_pack=True, suffix_box=True),
    "s128qpb": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128,
                                   suffix_pack=True, suffix_box=True),
    # session 37: the H200's T·g = 1 setting below hopper_long_prefix (its tuning file, hopper[1]) and two changes of it: 2-CTA clusters
    # multicasting each prefix tile (if the MHA layer re-reads its prefix once a 128-row block, this halves that),
    # and no key split of the prefix
    "t1": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128, prefix_fill=0.75,
                              suffix_pack=True, suffix_box=True),
    "t1c2": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128,
                                prefix_fill=0.75, suffix_pack=True, suffix_box=True, cluster=2),
    "t1f0": hopper.HopperConfig(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128,
                                suffix_pack=True, suffix_box=True),
}


def _override(item: str) -> tuple[str, object]:
  """One override of a variant's name as (field, value): `ek` (prefix_early_keys on) or FIELD=VALUE (an int, true or
  false; a float for the float fields: prefix_fill, pair_suffix_cost, pair_prefix_cost), e.g. `pair_registers=224`."""
  if item == "ek":
    return "prefix_early_keys", True
  field, eq, value = item.partition("=")
  fields = {f.name for f in dataclasses.fields(hopper.HopperConfig)}
  if not eq or field not in fields:
    raise ValueError(f"variant override {item!r}: expected `ek` or FIELD=VALUE with FIELD one of {sorted(fields)}")
  if value.lower() in ("true", "false"):
    return field, value.lower() == "true"
  try:
    return field, float(value) if field in _FLOAT_FIELDS else int(value)
  except ValueError:
    raise ValueError(f"variant override {item!r}: expected a number, true or false after '='") from None


_FLOAT_FIELDS = {f.name for f in dataclasses.fields(hopper.HopperConfig) if f.type in ("float", float)}


def resolve(name: str, cfg: tuple[int, ...] | None = None, rows: int | None = None) -> hopper.HopperConfig | str:
  """Variant `name` (module docstring) for config cfg = (B, P, out, Hq, Hkv), or for T·g `rows` and no prefix where
  cfg is None: "auto", or the HopperConfig it names."""
  base, *overrides = name.split("+")
  if base.endswith("-ek"):  # e.g. tuned-ek: the device's setting without prefix_early_keys
    base, overrides = base[:-3], ["prefix_early_keys=false", *overrides]
  if base == "auto":
    if overrides:
      raise ValueError(f"variant {name!r}: `auto` (the Triton kernels) takes no overrides")
    return base
  if base == "tuned":
    config = (hopper.tuned_config(rows=cfg[3] // cfg[4], prefix=cfg[1]) if cfg is not None
              else hopper.tuned_config(rows=rows or 1))
  else:
    config = VARIANTS[base]
  # all at once (a later one of the same field wins): HopperConfig checks the result (`tuning.check_hopper`), not
  # each step (224 pair registers alone overflow the pool that 224 with 56 for the suffix fits)
  return dataclasses.replace(config, **dict(_override(item) for item in overrides))


def known_variant(name: str) -> str:
  """`name` if its base (before any `+field=value` and `-ek`) is a variant `resolve` knows, else a ValueError."""
  base = name.split("+")[0].removesuffix("-ek")
  if base not in ("auto", "tuned", *VARIANTS):
    raise ValueError(f"unknown variant {base!r}; expected auto, tuned or one of {', '.join(VARIANTS)}, each with "
                     "optional +FIELD=VALUE overrides")
  return name


def step(name):
  """A whole step: "auto" (the Triton kernels), else the Hopper kernel with VARIANTS[name] or a HopperConfig; its
  parts merged by `merge_states` (as the API merges the Hopper kernel's)."""
  def fn(q, pk, pv, sk, sv, lengths):
    if name == "auto":  # the Triton kernels
      parts = run_plans(q, [prefix_plan(q, pk, pv), suffix_plan(q, sk, sv, lengths)])
    else:
      config = name if isinstance(name, hopper.HopperConfig) else VARIANTS[name]
      parts = hopper.prefix_suffix_attention(q, pk[0], pv[0], jnp.int32(pk.shape[1]), sk, sv, lengths,
                                             scale=D**-0.5, config=config)
    out, _ = merge_states(list(parts))
    return out.astype(q.dtype)
  return fn


def odd_shapes():
  rng = np.random.default_rng(0)
  for b, t, hq, hkv, d, p, s in [(5, 3, 8, 2, 64, 136, 64), (33, 1, 32, 8, 128, 1000, 136), (7, 2, 8, 1, 128, 64, 72),
                                 (64, 1, 8, 8, 128, 4096, 5)]:
    ks = jax.random.split(jax.random.key(b), 5)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.bfloat16)
    pk, pv = (jax.random.normal(k, (p, hkv, d), jnp.bfloat16) for k in ks[1:3])
    sk, sv = (jax.random.normal(k, (b, s, hkv, d), jnp.bfloat16) for k in ks[3:5])
    plen = jnp.int32(p - 3)
    lens = jnp.asarray(rng.integers(0, s + 1, b), jnp.int32)
    if (why := hopper.supported(q, pk, sk)) is not None:
      print(f"odd {(b, t, hq, hkv, d, p, s)}: not the kernel's case ({why})", flush=True)
      continue
    try:
      *prefix_parts, (os_, ls) = jax.jit(lambda *a: hopper.prefix_suffix_attention(*a, scale=d**-0.5))(
          q, pk, pv, plen, sk, sv, lens)
      op, lp = merge_states(prefix_parts)  # one part a key split of the prefix
      rp, rlp = reference.shared_attention(q, pk, pv, plen, scale=d**-0.5)
      rs, rls = reference.attention(q, sk, sv, lens, causal=True, scale=d**-0.5)
      f = lambda x: np.asarray(x, np.float32)
      fin = lambda x: np.where(np.isfinite(x), x, 0)
      print(f"odd {(b, t, hq, hkv, d, p, s)}: prefix out {np.abs(f(op) - f(rp)).max():.4f} lse "
            f"{np.abs(fin(f(lp)) - fin(f(rlp))).max():.2e}; suffix out {np.abs(f(os_) - f(rs)).max():.4f} lse "
            f"{np.abs(fin(f(ls)) - fin(f(rls))).max():.2e} (-inf agree: {bool((np.isinf(f(ls)) == np.isinf(f(rls))).all())})",
            flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"odd {(b, t, hq, hkv, d, p, s)}: {type(e).__name__}: {str(e)[:1500]}", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="5,6,7,8")
  parser.add_argument("--variants", default="hop")
  parser.add_argument("--shapes", default="", help="extra configs BxPxOUTxHQxHKV, comma-separated")
  parser.add_argument("--odd", type=int, default=1)
  args = parser.parse_args()
  configs = cli.seed_configs(parser, "--configs", args.configs, len(SEED)) + add_shapes(parser, args.shapes)
  variants = cli.listed(parser, "--variants", args.variants, known_variant)
  if args.odd:
    odd_shapes()
  rates = device_rates.measure(1 << 31, 8192, TIMING)
  print(f"bandwidth {rates['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s, matmul "
        f"{rates['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
  for i in configs:
    b, p, out, hq, hkv = CONFIGS[i]
    q, pk, pv, sk, sv = inputs(i)
    points = floor.simpson_points(out)
    floors = [floor_s(CONFIGS[i], s, rates) for s in points]
    print(f"[{i}] {CONFIGS[i]} floors " + " / ".join(f"{x * 1e6:.0f}" for x in floors) + " us", flush=True)
    lengths = [jnp.full((b,), s, jnp.int32) for s in points]
    auto = jax.jit(step("auto"))
    want = [auto(q, pk, pv, sk, sv, x).astype(jnp.float32) for x in lengths]  # tests check auto exactly
    for name in ["auto"] + [v for v in variants if v != "auto"]:
      try:
        config = resolve(name, CONFIGS[i])
        if isinstance(config, hopper.HopperConfig) and config.pair_suffix_cost > 0 and not hopper._shares(
            config, hq // hkv):
          # e.g. the H100's T·g = 4 setting packs no suffix items: the variant times the same kernel as without
          print(f"[{i}] {name}: note: the pair takes no suffix items here (`_shares`: items of whole 8-row windows "
                "need suffix_pack or T·g a multiple of 8)", flush=True)
        # Timed chained (as the benchmark); the error of one step against `auto`'s.
        compiled, _ = timing.compile_aot(timing.chain_steps(step(config), STEPS), (q, pk, pv, sk, sv, lengths[0]))
        steps, _ = time_at_lengths(compiled, (q, pk, pv, sk, sv), lengths, want, TIMING, STEPS)
        single = jax.jit(step(config)).lower(q, pk, pv, sk, sv, lengths[0]).compile()
        _, err = time_at_lengths(single, (q, pk, pv, sk, sv), lengths, want, dict(warmup=0, repeats=1))
        print_fraction(i, name, floors, steps, err)
      except Exception as e:  # noqa: BLE001
        print(f"[{i}] {name}: {type(e).__name__}: {str(e)[:1500]}", flush=True)


if __name__ == "__main__":
  main()
