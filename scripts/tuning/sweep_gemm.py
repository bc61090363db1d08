"""Per-device sweep of the decode GEMM kernel (`models.gemm`): its tiles, and the rows where it beats XLA's GEMMs.

  python -m scripts.tuning.sweep_gemm                     # on the GPU: writes the `gemm` field of the device's file
  python -m scripts.tuning.sweep_gemm --tiny --interpret  # anywhere: the plumbing (times mean nothing)

A candidate is timed where the kernel runs: the decode step of a 7B-shaped model of `--layers` layers in mode
`none` (every GEMM of the step, its norms, RoPE and residuals, no attention), `--steps` steps in one call of the
compiled decode loop, B = the row count, XLA's GEMMs or the kernel chosen by the tuning (`ModelTimer`; the GEMMs
timed alone measured differently, see there). Its products are checked against XLA's on one layer of GEMMs (beyond
bf16 rounding: refused). Greedy, one field at a time from the device's current tiles: each candidate is timed at
every `--rows`, and the best geometric mean takes the field's place if at least `--min-gain` faster; another pass
over the fields (`--passes`) where the last one moved one. Then, with the tiles picked, the model's step with XLA's
GEMMs and with the kernel is timed at 1, 8, 16, 32, 64 and 128 rows: `min_rows` / `max_rows` span the longest run of
those counts at which the kernel is faster (`kernel_rows`; max_rows 0: nowhere, XLA's GEMMs stay). The device's
tuning file gets the new `gemm` field and its provenance (`fields.gemm`: command, date, commit, the times); --out
writes elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import model_api
from hydragen_jax import tuning as tuning_lib
from hydragen_jax.tuning import GemmTuning
from models import gemm
from scripts import cli, profile_decode
from scripts.tuning import field_sweep, probe_weight_layout

CANDIDATES = dict(block_n=(32, 64, 128, 256), block_k=(64, 128, 256), num_warps=(4, 8), num_stages=(2, 3, 4, 5, 6),
                  programs_per_core=(0, 1, 2, 4))
ROW_COUNTS = (1, 8, 16, 32, 64, 128)
TIMING = dict(warmup=2, repeats=5)
PREFIX = 64  # tokens of the timed model's prompts (mode `none` reads no cache: only the batch matters)


def kernel_rows(versus: dict[int, tuple[float, float]], min_gain: float) -> tuple[int, int]:
  """(min_rows, max_rows) of the kernel from {rows: (XLA's time, the kernel's)}: the first and last count of the
  longest run of consecutive timed row counts where the kernel is at least `min_gain` faster (ties: the smaller
  rows); nothing untimed is claimed (a run from 8 rows on starts at 8, even where 8 is the least count timed);
  (1, 0), off, where it wins nowhere."""
  counts = sorted(versus)
  runs, run = [], []
  for m in counts:
    if versus[m][1] * (1 + min_gain) <= versus[m][0]:
      run.append(m)
    elif run:
      runs.append(run)
      run = []
  if run:
    runs.append(run)
  if not runs:
    return 1, 0
  best = max(runs, key=len)  # max keeps the first of equal lengths: the smaller rows
  return best[0], best[-1]


def descend(g, score, candidates: dict[str, tuple], passes: int, min_gain: float):
  """Coordinate descent from the dataclass `g`: each field of `candidates` in turn takes the value of the least
  `score` (seconds; called once per value tried, memoise it to re-time nothing) if that is at least `min_gain`
  faster than the current best; another pass over the fields (at most `passes`) while the last one moved a field, as
  a field's best can move when another moved. (g, its score, {field: {value: us}} of every pass)."""
  best = score(g)
  notes = {}
  for sweep in range(1, passes + 1):
    moved = False
    for field, values in candidates.items():
      print(f"{field} (pass {sweep}):", flush=True)
      tried = {getattr(g, field): best}
      for value in values:
        if value not in tried:
          tried[value] = score(dataclasses.replace(g, **{field: value}))
      value = min(tried, key=tried.get)
      if value != getattr(g, field) and tried[value] * (1 + min_gain) <= best:
        g, best, moved = dataclasses.replace(g, **{field: value}), tried[value], True
      notes[field if sweep == 1 else f"{field} (pass {sweep})"] = {str(v): round(t * 1e6, 1) for v, t in tried.items()}
    if not moved:
      break
  return g, best, notes


def gemm_shape(config: dict) -> dict:
  """The sizes of a layer's GEMMs of a model shape (LlamaConfig fields, `profile_decode.model_shape`)."""
  heads, kv_heads, head_dim = (config[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
  return dict(hidden=config["hidden_size"], intermediate=config["intermediate_size"], q=heads * head_dim,
              kv=kv_heads * head_dim)


def gemms(x, layers: list[dict], backend: str, tune: tuning_lib.Tuning):
  """The GEMMs of the layers in turn (attention and norms left out): x `[M, d]` -> `[M, d]`."""
  for p in layers:  # `probe_weight_layout.layer_weights`, "fused": the models' packed weights
    qkv = gemm.linear(x, p["qkv"], backend, tune)
    o = gemm.linear(qkv[:, :p["o"].shape[0]], p["o"], backend, tune)
    gate_up = gemm.linear(x + o, p["gate_up"], backend, tune)
    g, u = jnp.split(gate_up, 2, axis=-1)
    down = gemm.linear(g * u, p["down"], backend, tune)
    x = (x + o + down).astype(x.dtype)
  return x


def step_output(x, layers, backend: str, tune: tuning_lib.Tuning) -> jax.Array:
  """One step of `gemms`, compiled."""
  return jax.jit(functools.partial(gemms, backend=backend, tune=tune))(x, layers)


class ModelTimer:
  """Seconds a layer of the decode step of a model of shape `config` (`profile_decode.model_shape`), mode
  `none` (every GEMM of the step, no attention): `steps` steps in one call of the compiled decode loop, wall time,
  median of `TIMING`'s repeats, at B = rows under a tuning. The GEMMs are timed where they run, among the step's
  other fusions: alone they measured differently (session 12: XLA 147.6 against the kernel 144.1 us a layer at 64
  rows, where the model's step took 183 against 142 us a layer of GPU time). A call's fixed cost (~2-4 ms on the H200)
  is in both sides' wall time, spread over steps x layers."""

  def __init__(self, config: dict, steps: int):
    self.model, _ = model_api.build_model(config, "bfloat16", seed=0)
    self.vocab, self.layers, self.steps = config["vocab_size"], config["num_hidden_layers"], steps
    self.states: dict[int, tuple] = {}

  def __call__(self, rows: int, tune: tuning_lib.Tuning) -> float:
    if rows not in self.states:
      tree = model_api.synthetic_tree(rows, PREFIX, 1, self.vocab, seed=0)
      self.states[rows] = profile_decode.mode_state(self.model, tree, self.steps + 2, "none", None)
    state, org = self.states.pop(rows)  # back once timed: a call that fails may have consumed (donated) it
    with tuning_lib.override(tune):  # the GEMMs' backend is chosen when the step is traced
      fn, _ = model_api.compile_decode(self.model, state, None)
    params, walls = self.model.params(), []
    for _ in range(TIMING["warmup"] + TIMING["repeats"]):
      start_state = jax.block_until_ready(model_api.at_step(state, org, 1))
      start = time.perf_counter()
      state = jax.block_until_ready(fn(params, start_state, jnp.int32(self.steps)))  # donates its input
      walls.append(time.perf_counter() - start)
    self.states[rows] = (state, org)
    return float(np.median(walls[TIMING["warmup"]:])) / self.steps / self.layers


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  field_sweep.add_arguments(parser)
  parser.add_argument("--rows", default="8,64", help="row counts the tiles are picked on")
  parser.add_argument("--layers", type=int, default=8, help="layers of the timed model")
  parser.add_argument("--steps", type=int, default=32, help="decode steps in one timed call")
  parser.add_argument("--compare", default=",".join(map(str, ROW_COUNTS)),
                      help="row counts XLA and the kernel are compared at, each in [1, 128]: min_rows / max_rows span "
                           "the longest run of them where the kernel wins")
  parser.add_argument("--min-gain", type=float, default=0.02)
  parser.add_argument("--passes", type=int, default=2,
                      help="passes over the fields at most (another only where the last one moved a field)")
  parser.add_argument("--log", default=None, help="JSON-lines file of every timing")
  parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check)")
  parser.add_argument("--interpret", action="store_true",
                      help="the products' check runs the kernel in the Pallas interpreter (CPU; the timed model "
                           "runs XLA's GEMMs off a GPU either way: its times mean nothing there)")
  args = parser.parse_args(argv)
  for option in ("layers", "steps", "passes"):
    if getattr(args, option) < 1:
      parser.error(f"--{option} {getattr(args, option)}: must be at least 1")
  # row counts (the kernel is for decode steps of at most 128 rows)
  pick_rows = cli.listed(parser, "--rows", args.rows, int, low=1, high=128)
  compare = cli.listed(parser, "--compare", args.compare, int, low=1, high=128)
  not_measured = ("--tiny" if args.tiny else None) or ("--interpret" if args.interpret else None) \
      or field_sweep.off_gpu()
  field_sweep.check_out(parser, args, not_measured)
  run = field_sweep.Run.begin("sweep_gemm", argv, args.base)
  base_file = run.base
  config = profile_decode.model_shape(args.layers, args.tiny)
  shape, dtype = gemm_shape(config), jnp.bfloat16  # the timed model's GEMMs
  layers = probe_weight_layout.layer_weights(shape, 1, dtype, "fused")  # the candidates' products: one layer
  kernel = "interpret" if args.interpret else "pallas"
  log = open(args.log, "w") if args.log else None  # noqa: SIM115 - closed below
  xs = {m: jax.random.normal(jax.random.key(m), (m, shape["hidden"]), jnp.float32).astype(dtype)
        for m in sorted(set(pick_rows) | set(compare))}
  reference = {m: step_output(x, layers, "xla", base_file.tuning) for m, x in xs.items()}  # XLA's products

  timer = ModelTimer(config, args.steps)

  def timed(m: int, backend: str, g: GemmTuning) -> float:
    on = dataclasses.replace(g, min_rows=1, max_rows=0 if backend == "xla" else 128)
    tune = dataclasses.replace(base_file.tuning, gemm=on)
    try:
      seconds = timer(m, tune)
      once = None if backend == "xla" else step_output(xs[m], layers, backend, tune)
    except Exception as e:  # noqa: BLE001 - a candidate that does not compile (e.g. shared memory) is refused
      print(f"  rows={m:3d} {backend:9s} {on} -> failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
      seconds, once = math.inf, None
    if once is not None:  # the kernel's products must be XLA's, up to bf16 rounding
      ref = reference[m]
      err = float(jnp.max(jnp.abs(once.astype(jnp.float32) - ref.astype(jnp.float32))) /
                  (float(jnp.max(jnp.abs(ref.astype(jnp.float32)))) + 1e-30))
      if not err <= 3e-2:
        seconds = math.inf
    row = dict(rows=m, backend=backend, gemm=dataclasses.asdict(on), us_per_layer=seconds * 1e6)
    print(f"  rows={m:3d} {backend:9s} {on} -> {seconds * 1e6:9.1f} us a layer", flush=True)
    if log:
      log.write(json.dumps(row) + "\n")
      log.flush()
    return seconds

  groups = [(shape["hidden"], shape["q"] + 2 * shape["kv"]), (shape["q"], shape["hidden"]),  # (K, N) as packed
            (shape["hidden"], 2 * shape["intermediate"]), (shape["intermediate"], shape["hidden"])]

  def applies(g: GemmTuning) -> bool:  # tiles that divide every GEMM of the layer (else XLA's would be timed)
    sds = jax.ShapeDtypeStruct
    return all(gemm.supported(sds((8, k), dtype), sds((k, n), dtype), g) is None for k, n in groups)

  scores = {}  # tiles -> geometric mean over pick_rows (a later pass re-times nothing it has timed)

  def score(g: GemmTuning) -> float:
    if g in scores:
      return scores[g]
    if not applies(g):
      print(f"  {g}: tiles do not divide the layer's GEMMs", flush=True)
      scores[g] = math.inf
      return math.inf
    times = [timed(m, kernel, g) for m in pick_rows]
    scores[g] = math.exp(sum(math.log(t) for t in times) / len(times)) if all(map(math.isfinite, times)) else math.inf
    return scores[g]

  g = dataclasses.replace(base_file.tuning.gemm, max_rows=0)  # the rows are decided below; the tiles' key
  g, best, notes = descend(g, score, CANDIDATES, args.passes, args.min_gain)
  versus = {}
  for m in compare:
    versus[m] = (timed(m, "xla", g), timed(m, kernel, g))
  min_rows, max_rows = kernel_rows(versus, args.min_gain)
  g = dataclasses.replace(g, min_rows=min_rows, max_rows=max_rows)
  if log:
    log.close()
  summary = ", ".join(f"{m} rows: XLA {x * 1e6:.1f} / kernel {k * 1e6:.1f} us" for m, (x, k) in versus.items())
  measured = (f"a layer of the decode step in mode none ({shape}, bf16, {args.layers} layers, {args.steps} steps a "
              f"call), us a layer per "
              f"candidate at rows {pick_rows} (geometric mean): {json.dumps(notes)}; XLA against the kernel: "
              f"{summary}; rows {min_rows}..{max_rows}{' (off)' if not max_rows else ''}")
  out = run.write(args, "gemm", dataclasses.replace(base_file.tuning, gemm=g), measured, not_measured)
  print(f"wrote {out}: {g} ({time.time() - run.start:.0f} s)", flush=True)
  print(f"XLA against the kernel: {summary}", flush=True)


if __name__ == "__main__":
  main()
