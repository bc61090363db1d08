"""Where one decode step of the model spends its GPU time, per layer: GEMMs / attention kernels / the merge of their
parts / cache writes / the rest, in microseconds, next to the same attention timed alone (its kernels and their
merge, over every layer's caches in turn, so that, as in the model, no layer's KV is still in L2 from the step before).

A random Llama of the 7B shape (fewer layers: `--layers`) decodes B sequences that share a P-token prefix; the
decode loop (one jitted `lax.while_loop`) runs `--steps` steps from suffix length `--at` under `jax.profiler.trace`,
and each GPU kernel is classified by its name, or, for XLA's fusions of the merge (`merge_states`: named by what they
compute, e.g. `loop_convert_fusion_7`), by the op the compiled module says it came from. The GPU's idle time between
kernels is split into short gaps (kernel to kernel) and long ones (the host dispatching or waiting), the largest
named. The standalone attention step is
`hydragen_attention` (or, for `standard`, per-sequence attention) over caches of the same shape and lengths.
`--tuning` profiles each given tuning file in turn in one process: an A/B of the kernels' settings inside the model.

`--gemm 0,64` profiles XLA's GEMMs and the decode GEMM kernel (`models.gemm`, up to 64 rows) in turn; `--write
0,4096` XLA's cache-write scatters and the cache-write kernel (`models.kv_write`, steps of up to 4096 slots);
`--field pair_write=false,true` each value of a scalar tuning field (repeated: every combination), so that an A/B
needs no tuning file of its own.

Usage: python -m scripts.profile_decode [--batch 512] [--prefix 1024] [--layers 4] [--modes hydragen,none,standard]
       [--backend mosaic] [--tp 2] [--hlo DIR] [--tuning default,hydragen_jax/tuning/nvidia-h100-80gb-hbm3.json]
       [--gemm 0,64] [--write 0,4096] [--field merge_rows=2,1]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gzip
import pathlib
import re
import time

import jax
import jax.numpy as jnp

import hydragen_jax as hj
from hydragen_jax import tuning as tuning_lib
import models
from experiments import model_api
from scripts import cli
from scripts.tuning.profile_step import gpu_kernel_ns, idle_gaps, kernel_events, per_kernel

SHAPE_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=65536)
# --tiny: a model small enough for a CPU check that a script runs
TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
            head_dim=16)


def model_shape(layers: int, tiny: bool) -> dict:
  """The 7B shape with `layers` layers (LlamaConfig fields), or the tiny one."""
  return dict(SHAPE_7B, num_hidden_layers=layers, **(TINY if tiny else {}))


def mode_state(model, tree, generate: int, mode: str, backend: str | None):
  """The decode state of `mode` after prefilling `tree` (for `none`: derived from a `hydragen` prefill, as the e2e
  experiment does), and its origin (`model_api.at_step` returns to any step from it)."""
  state, _ = model_api.prefill(model, tree, generate, "hydragen" if mode == "none" else mode, backend, 2048,
                               max_calls=1)
  org = model_api.origin(state)
  if mode == "none":
    state, org = model_api.derive_mode(state, mode, org)
  return state, org


def with_gemm_rows(tune: tuning_lib.Tuning, rows: int) -> tuning_lib.Tuning:
  """`tune` with the decode GEMM kernel (`models.gemm`) taking products of 1 to `rows` rows (0: XLA's GEMMs)."""
  return dataclasses.replace(tune, gemm=dataclasses.replace(tune.gemm, min_rows=1, max_rows=rows))


def with_write_rows(tune: tuning_lib.Tuning, rows: int) -> tuning_lib.Tuning:
  """`tune` with the cache-write kernel (`models.kv_write`) for steps of up to `rows` slots (0: XLA's scatters)."""
  return dataclasses.replace(tune, write_max_rows=rows)


def with_field(tune: tuning_lib.Tuning, name: str, text: str) -> tuning_lib.Tuning:
  """`tune` with its scalar field `name` (a bool, int or float: e.g. `pair_write`, `merge_rows`) set to `text`,
  read as that field's type (a bool as true / false / 1 / 0). ValueError for another field or a bad value."""
  fields = {f.name for f in dataclasses.fields(tune)}
  current = getattr(tune, name) if name in fields else None
  if not isinstance(current, (bool, int, float)):
    scalars = sorted(f for f in fields if isinstance(getattr(tune, f), (bool, int, float)))
    raise ValueError(f"--field: {name!r} is not a scalar field of the tuning; expected one of {', '.join(scalars)}")
  if isinstance(current, bool):
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower())
    if value is None:
      raise ValueError(f"--field {name}={text!r}: expected true, false, 1 or 0")
  else:
    try:
      value = type(current)(text)
    except ValueError:
      raise ValueError(f"--field {name}={text!r}: expected a value of type {type(current).__name__}") from None
  return dataclasses.replace(tune, **{name: value})  # the Tuning checks the value itself


# Kernel names (XLA instruction names, cuBLAS / CUTLASS kernels, Pallas kernels) -> part of the step.
PARTS = (
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_|triton_gemm|matmul", re.I)),
    ("cache write", re.compile(r"kv_write", re.I)),  # our Pallas cache write, before "hydragen" takes it
    ("merge", re.compile(r"hydragen_merge", re.I)),  # the merge kernel (`kernels/merge.py`), likewise
    ("attention", re.compile(r"hydragen|mosaic|pallas|prefix_suffix|attention", re.I)),
    ("cache write", re.compile(r"scatter|dynamic.update.slice", re.I)),
    ("all-reduce", re.compile(r"nccl|all.reduce|allreduce|collective|psum", re.I)),  # psum: XLA's own kernels
)
SHOWN = ("gemm", "attention", "merge", "cache write", "all-reduce", "rest")  # the per-layer line's parts, in order
# An instruction of a compiled module's text, and the op it came from (its metadata's op_name).
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?op_name="([^"]*)"', re.M)


def kernel_ops(hlo_text: str) -> dict[str, str]:
  """Each instruction of a compiled module's text (`compiled.as_text()`) -> the op_name of its metadata, keyed by
  the name its GPU kernel has in a profile (the instruction's, "." written "_": `%loop_convert_fusion.7` runs as
  `loop_convert_fusion_7`)."""
  return {name.replace(".", "_"): op for name, op in _INSTRUCTION.findall(hlo_text)}


def classify(name: str, ops: dict[str, str] | None = None) -> str:
  """The part of the step a GPU kernel belongs to, by its name, or, where `ops` (`kernel_ops`) says it came from
  `merge_states` (XLA's merge, named after what its fusion computes), "merge"."""
  if ops and "merge_states" in ops.get(name, ""):
    return "merge"
  for part, pattern in PARTS:
    if pattern.search(name):
      return part
  return "rest"


def attention_alone(state, mode: str, steps: int, num_q_heads: int, backend: str | None = None) -> float:
  """Seconds per layer and step of the attention of `state`'s caches alone (its kernels and their merge): `steps`
  steps chained, each over every layer's caches in turn, as the model reads them. (One layer's caches over and over
  would stay in L2 from one call to the next where they fit: a B = 8, P = 1K layer's 26 MB in the H100's 50 MB,
  which the model's GEMMs evict between its layers.)"""
  cache = state.cache
  q = jax.random.normal(jax.random.key(0), (cache.lengths.shape[0], 1, num_q_heads, cache.k[0].shape[-1]),
                        cache.k[0].dtype)

  @jax.jit
  def chained(q, cache):
    def body(_, q):
      for levels in cache_levels(cache):
        q = hj.tree_attention(q, levels, batch_shared=mode == "hydragen", backend=backend).astype(q.dtype)
      return q
    return jax.lax.fori_loop(0, steps, body, q)

  jax.block_until_ready(chained(q, cache))
  total, _, _ = gpu_kernel_ns(lambda: chained(q, cache), 3)
  return sum(total.values()) / 3 / steps / len(cache.k) / 1e9


def cache_levels(cache) -> list[list[hj.Level]]:
  """Each layer's levels of a mode's cache, as the model's attention reads them: the shared levels' node maps
  numpy (static in the cache's pytree: the kernels group a node's readers on the host), then the per-sequence
  level."""
  return [[hj.Level(lc.k[i], lc.v[i], lc.lengths, lc.nodes) for lc in getattr(cache, "shared", ())]
          + [hj.Level(cache.k[i], cache.v[i], cache.lengths)] for i in range(len(cache.k))]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--prefix", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--generate", type=int, default=128)
  parser.add_argument("--at", type=int, default=64, help="suffix length where the profiled steps start")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--modes", default="hydragen,none,standard")
  parser.add_argument("--top", type=int, default=12, help="kernels listed per mode")
  parser.add_argument("--hlo", default=None, metavar="DIR", help="write each mode's compiled decode loop (gzip) here")
  parser.add_argument("--tp", type=int, default=1, help="tensor parallel over this many GPUs (GPU 0's kernels shown)")
  parser.add_argument("--backend", default=None, choices=hj.BACKENDS,
                      help="attention backend (default: chosen per device; e.g. mosaic)")
  parser.add_argument("--tuning", default="default", metavar="FILE[,FILE...]",
                      help="tuning files (hydragen_jax/tuning/*.json), each profiled in turn in this process; "
                           "'default': the device's")
  parser.add_argument("--gemm", default=None, metavar="ROWS[,ROWS...]",
                      help="the decode GEMM kernel (models.gemm) for products of 1 to ROWS rows, each profiled in turn "
                           "(0: XLA's GEMMs); "
                           "default: the tuning's")
  parser.add_argument("--write", default=None, metavar="ROWS[,ROWS...]",
                      help="the cache-write kernel (models.kv_write) for steps of up to ROWS slots (B·T), each "
                           "profiled in turn (0: XLA's scatters); default: the tuning's")
  parser.add_argument("--field", action="append", default=[], metavar="NAME=V1[,V2...]",
                      help="a scalar tuning field (e.g. pair_write=false,true or merge_rows=2,1), each value profiled "
                           "in turn with each tuning; repeated: every combination")
  parser.add_argument("--tiny", action="store_true", help="a tiny model (a CPU check that the script runs; give "
                      "it a small --batch and --prefix too, e.g. --batch 4 --prefix 32)")
  parser.add_argument("--demo", type=int, default=0, metavar="SAMPLES",
                      help="profile the demo's byte-level model on its few-shot prompts, SAMPLES samples each")
  args = parser.parse_args()
  check_args(parser, args)
  if args.demo and args.tp != 1:
    parser.error("--demo profiles the demo's model on one device; --tp applies to the 7B shape")
  tunings = []
  for name in cli.listed(parser, "--tuning", args.tuning):
    try:
      tunings.append((None, None) if name == "default" else (pathlib.Path(name).stem, tuning_lib.load(name).tuning))
    except (OSError, ValueError) as e:
      parser.error(f"--tuning {name!r}: expected a tuning file (hydragen_jax/tuning/*.json) or 'default'; {e}")
  if len({name for name, _ in tunings}) < len(tunings):
    parser.error(f"--tuning {args.tuning!r}: two files of one name (each is labelled by its name)")
  # each tuning with each of the GEMM kernel's row limits and the cache-write kernel's slot limits
  for option, values, label, change in (("--gemm", args.gemm, "gemm<=", with_gemm_rows),
                                        ("--write", args.write, "write<=", with_write_rows)):
    if values is not None:
      rows = cli.listed(parser, option, values, int)
      try:
        tunings = [(f"{name or 'default'} {label}{v}", change(t or tuning_lib.current(), v))
                   for name, t in tunings for v in rows]
      except ValueError as e:  # the Tuning's own range
        parser.error(f"{option} {values}: {e}")
  fields = [field.partition("=")[0] for field in args.field]
  if bad := [field for field in args.field if "=" not in field]:
    parser.error(f"--field {bad[0]!r}: expected NAME=V1[,V2...]")
  if len(set(fields)) < len(fields):
    parser.error(f"--field: a field given twice ({', '.join(args.field)}); give its values in one --field")
  for field in args.field:  # each tuning with each value of each --field
    name, _, values = field.partition("=")
    try:
      tunings = [(f"{label or 'default'} {name}={v}", with_field(t or tuning_lib.current(), name, v))
                 for label, t in tunings for v in cli.listed(parser, f"--field {name}", values)]
    except ValueError as e:  # with_field's own, or the Tuning's (which names the field, not the option)
      parser.error(str(e) if str(e).startswith("--field") else f"--field {field}: {e}")
  if args.demo:  # the demo's model and tree (models.demo, --model default)
    from models import demo  # noqa: PLC0415
    from models.sharing import build_sharing_tree, expand_samples  # noqa: PLC0415
    model = demo.load_default_model(jnp.bfloat16)
    tok = models.ByteTokenizer()
    tree = build_sharing_tree(expand_samples([tok.encode(demo.FEW_SHOT + p) for p in demo.PROBLEMS], args.demo))
    print(f"demo model, {tree.describe()}", flush=True)
  else:
    shape = model_shape(args.layers, args.tiny)
    try:
      model, _ = model_api.build_model(shape, "bfloat16", seed=0, tp=args.tp)
    except ValueError as e:  # the other options are checked: the devices or the heads do not take --tp
      parser.error(f"--tp {args.tp}: {e}")
    tree = model_api.synthetic_tree(args.batch, args.prefix, 1, shape["vocab_size"], seed=0)
    print(f"{'tiny' if args.tiny else '7B'} shape, {args.layers} layers, B={args.batch} P={args.prefix}, tp={args.tp}, "
          f"backend={args.backend or 'default'}", flush=True)
  print(f"steps {args.at}..{args.at + args.steps}", flush=True)
  for mode in args.modes.split(","):
    state, org = mode_state(model, tree, args.generate, mode, args.backend)
    for name, tune in tunings:  # the override is part of jit's cache key: each tuning is traced and compiled anew
      with tuning_lib.override(tune) if tune else contextlib.nullcontext():
        alone = (attention_alone(model_api.at_step(state, org, args.at), mode, args.steps,
                                 model.config.num_attention_heads, args.backend)
                 if mode != "none" and args.tp == 1 else 0.0)
        label = mode if tune is None else f"{mode} @ {name}"
        state = profile(model, label, state, org, alone, args)
    del state, org


def check_args(parser, args) -> None:
  """Usage errors (exit 2) for option values the profile cannot take, before any work."""
  for option, value, low in (("--batch", args.batch, 1), ("--prefix", args.prefix, 0), ("--layers", args.layers, 1),
                             ("--generate", args.generate, 1), ("--at", args.at, 0), ("--steps", args.steps, 1),
                             ("--top", args.top, 0), ("--tp", args.tp, 1), ("--demo", args.demo, 0)):
    if value < low:
      parser.error(f"{option} {value}: expected an integer >= {low}")
  if args.at + args.steps > args.generate:
    parser.error(f"--at {args.at} --steps {args.steps}: the profiled steps must lie within --generate "
                 f"{args.generate} (expected --at + --steps <= --generate)")
  cli.listed(parser, "--modes", args.modes, choices=models.MODES)
  if args.hlo and pathlib.Path(args.hlo).exists() and not pathlib.Path(args.hlo).is_dir():
    parser.error(f"--hlo {args.hlo!r}: expected a folder (made if missing); got a file")
  if args.backend in ("pallas", "triton", "mosaic") and jax.default_backend() != "gpu":
    parser.error(f"--backend {args.backend}: compiles GPU kernels, and this machine has no GPU "
                 f"({jax.default_backend()}); on a CPU take interpret, interpret-mosaic or xla")


def profile(model, label: str, state, org, alone: float, args):
  """Compile the decode loop, time it untraced (wall) and traced (GPU kernels), print the split per layer; returns
  the state the last run returned (each run donates its input)."""
  layers = model.config.num_hidden_layers
  fn, compile_s = model_api.compile_decode(model, state, args.backend)
  hlo = fn.as_text()
  ops = kernel_ops(hlo)
  if args.hlo:
    name = re.sub(r"[^A-Za-z0-9_.]+", "-", label)
    pathlib.Path(args.hlo).mkdir(parents=True, exist_ok=True)
    with gzip.open(f"{args.hlo}/decode-{name}-tp{args.tp}-B{args.batch}.hlo.gz", "wt") as f:
      f.write(hlo)
  held = [state]  # the decode call donates its state: each run starts from the state the last one returned

  def run():
    held[0] = fn(model.params(), model_api.at_step(held[0], org, args.at), jnp.int32(args.steps))
    return held[0]

  jax.block_until_ready(run())
  walls = []
  for _ in range(7):  # untraced: the profiler slows the host down
    start = time.perf_counter()
    jax.block_until_ready(run())
    walls.append(time.perf_counter() - start)
  wall = sorted(walls)[3]
  events, _ = kernel_events(run, 2, device="/device:GPU:0")
  total, launches = per_kernel(events)
  per_part = collections.Counter()
  for name, ns in total.items():
    per_part[classify(name, ops)] += ns / 2 / args.steps / layers / 1e3
  step_us = sum(total.values()) / 2 / args.steps / 1e3
  parts = ", ".join(f"{part} {per_part[part]:.1f}" for part in SHOWN)
  kernels = sum(launches.values()) / 2 / args.steps
  print(f"[{label}] step {step_us:.0f} us GPU ({wall / args.steps * 1e6:.0f} us wall, median of 7; {kernels:.0f} "
        f"kernels); per layer (us): {parts}; {alone_text(per_part, alone)}; compile {compile_s:.1f} s", flush=True)
  print(f"  {idle_line(idle_gaps(events), 2 * args.steps, 2)}; untraced wall - GPU "
        f"{(wall / args.steps - step_us / 1e6) * 1e6:.0f} us a step", flush=True)
  for name, ns in total.most_common(args.top):
    print(f"      {ns / 2 / args.steps / 1e3:8.1f} us/step  [{classify(name, ops)}] {name}", flush=True)
  return held[0]


def alone_text(per_part: dict[str, float], alone: float) -> str:
  """The profile line's comparison with the attention alone (issue 12: the model's attention, its merge and cache
  write included, within 1.2x of it): per_part, µs a layer by part; alone, seconds a layer (0: not timed)."""
  if not alone:
    return "attention alone n/a"
  model, alone_us = per_part["attention"] + per_part["merge"] + per_part["cache write"], alone * 1e6
  return f"attention alone {alone_us:.1f} us (in the model with merge and write {model:.1f}: {model / alone_us:.2f}x)"


def idle_line(gaps: list[tuple[int, str]], steps: int, calls: int, long_ns: int = 20_000, largest: int = 3) -> str:
  """The GPU's idle time between kernels over `calls` traced calls of `steps` steps in all: short gaps (kernel to
  kernel) a step, and long ones (the host dispatching or waiting: between the calls, a loop condition read) in all,
  the largest named by the kernel that ends them. Traced: the profiler itself adds to the host's time."""
  short = [ns for ns, _ in gaps if ns < long_ns]
  long = sorted((g for g in gaps if g[0] >= long_ns), reverse=True)
  median = sorted(short)[len(short) // 2] / 1e3 if short else 0.0
  text = (f"GPU idle between kernels {sum(ns for ns, _ in gaps) / steps / 1e3:.0f} us a step: "
          f"{len(short) / steps:.0f} gaps under {long_ns / 1e3:.0f} us a step ({sum(short) / steps / 1e3:.0f} us, "
          f"median {median:.1f} us); {len(long)} over {long_ns / 1e3:.0f} us in {calls} traced call"
          f"{'s' if calls > 1 else ''} ({sum(ns for ns, _ in long) / 1e3:.0f} us)")
  if long:
    text += "; largest " + ", ".join(f"{ns / 1e3:.0f} us before {name}" for ns, name in long[:largest])
  return text


if __name__ == "__main__":
  main()
