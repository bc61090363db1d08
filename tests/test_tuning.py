"""Per-device tuning (`hydragen_jax.tuning`): selection by device kind, the fallback, the override, the data files'
format and provenance, the H100 data reproducing the choices the kernels made when they were constants (441eec3),
and the device sweep (`scripts/tuning/sweep_device.py`): its picking and its dry run."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import threading
import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hydragen_jax as hj
from hydragen_jax import dispatch, tuning
from hydragen_jax.kernels import hopper, ops
from scripts.tuning import sweep_device

H100 = "NVIDIA H100 80GB HBM3"
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _h100() -> tuning.Tuning:
  return tuning.for_device_kind(H100)


def _one_setting(t: tuning.Tuning) -> tuning.Tuning:
  """`t` with one Hopper setting for every T·g and prefix (`t`'s for T·g = 9, the H100's first setting) and no
  long-prefix settings."""
  return dataclasses.replace(t, hopper=((1, t.hopper_for(9)),), hopper_long_prefix=0, hopper_long=())


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
  """Data files read from tmp_path (with a copy of the H100's, the fallback), the file cache cleared."""
  (tmp_path / "nvidia-h100-80gb-hbm3.json").write_text(tuning.data_file(H100).read_text())
  monkeypatch.setattr(tuning, "data_file", lambda kind: tmp_path / f"{tuning.slug(kind)}.json")
  tuning.file_for.cache_clear()
  yield tmp_path
  tuning.file_for.cache_clear()


def _write(directory: pathlib.Path, kind: str, tune: tuning.Tuning, **provenance) -> None:
  prov = dict(measured_on=kind, command="test", date="2026-11-30", commit="none", note="test") | provenance
  tuning.write(directory / f"{tuning.slug(kind)}.json", tuning.TuningFile(kind, tune, prov))


# --- selection and fallback ---

def test_each_shipped_device_kind_gets_its_own_file():
  assert {H100, "NVIDIA H200"} <= set(tuning.known_kinds())
  for kind in tuning.known_kinds():
    assert tuning.file_for(kind).device_kind == kind


@pytest.mark.filterwarnings("ignore:hydragen_jax. no tuning file")
@pytest.mark.parametrize("kind", ["cpu", "NVIDIA B200", "NVIDIA H100 PCIe", "TPU v5 lite"])
def test_unknown_devices_and_cpu_take_the_h100_tuning(kind):
  assert tuning.FALLBACK_KIND == H100
  assert tuning.file_for(kind).device_kind == H100
  assert tuning.for_device_kind(kind) == _h100()


@pytest.mark.filterwarnings("ignore:hydragen_jax. no tuning file")
def test_current_follows_the_device_kind(data_dir, monkeypatch):
  fast = dataclasses.replace(_h100(), hopper_min_work=1, hopper_min_fill=0.0, max_rows_shared=32)
  _write(data_dir, "Test GPU", fast)
  monkeypatch.setattr(tuning, "device_kind", lambda: "Test GPU")
  assert tuning.current() == fast
  # the kernels read it: 32-row shared tiles, the Hopper threshold
  assert ops.choose_block(4096, 4096, 1, 8, 4096, 128).block_m == 32
  monkeypatch.setattr(dispatch, "on_hopper", lambda: True)
  assert dispatch.hopper_pays(jnp.zeros((1, 1, 8, 64)), 2, 1)  # g = 4
  assert dispatch.hopper_pays(jnp.zeros((1, 1, 8, 64)), 8, 1)  # MHA decode, T·g = 1
  monkeypatch.setattr(tuning, "device_kind", lambda: "Other GPU")
  assert tuning.current() == _h100()
  assert ops.choose_block(4096, 4096, 1, 8, 4096, 128).block_m == 64
  assert not dispatch.hopper_pays(jnp.zeros((1, 1, 8, 64)), 2, 1)


def test_a_variant_of_a_known_kind_takes_its_file_with_a_warning():
  """A kind whose name extends a known one's by whole words (the same chip on another board) takes that file, the
  longest such; a name that merely starts with the same letters does not."""
  assert tuning.variant_of("NVIDIA H200 NVL") == "NVIDIA H200"
  assert tuning.variant_of("NVIDIA H200") is None  # its own file: nothing to extend
  assert tuning.variant_of("NVIDIA H2000") is None
  assert tuning.variant_of("NVIDIA H100 PCIe") is None  # the H100's file names "80GB HBM3"
  tuning.file_for.cache_clear()
  try:
    with pytest.warns(UserWarning, match=r"no tuning file for device kind 'NVIDIA H200 NVL' .*the NVIDIA H200's "
                                         r"choices, a kind its name extends"):
      assert tuning.file_for("NVIDIA H200 NVL").device_kind == "NVIDIA H200"
    assert tuning.for_device_kind("NVIDIA H200 NVL") == tuning.for_device_kind("NVIDIA H200")
    with pytest.warns(UserWarning, match="the NVIDIA H100 80GB HBM3's choices, which may not suit it"):
      assert tuning.file_for("NVIDIA H2000").device_kind == H100
  finally:
    tuning.file_for.cache_clear()


def test_a_kind_spelt_otherwise_takes_its_file():
  """A kind differing from a shipped file's only in case, spaces or punctuation (its slug the same) loads that file
  (it raised "nvidia-h200.json names device kind 'NVIDIA H200', not 'nvidia h200'" on every kernel call)."""
  tuning.file_for.cache_clear()
  try:
    for kind in ("nvidia h200", "NVIDIA  H200", "NVIDIA-H200"):
      assert tuning.file_for(kind).device_kind == "NVIDIA H200"
  finally:
    tuning.file_for.cache_clear()


def test_a_file_must_serve_the_kind_it_is_named_for(data_dir):
  _write(data_dir, "Test GPU", _h100())
  (data_dir / "other-gpu.json").write_text((data_dir / "test-gpu.json").read_text())
  with pytest.raises(ValueError, match="other-gpu.json names device kind 'Test GPU', not 'Other GPU'"):
    tuning.file_for("Other GPU")


# --- override ---

def test_override_is_scoped_and_an_explicit_tuning_wins():
  base = tuning.current()
  a = dataclasses.replace(base, interleave_rows=64, max_rows_shared=32)
  b = dataclasses.replace(base, interleave_rows=4096)
  with tuning.override(a):
    assert tuning.current() is a
    assert ops.auto_launch([64]) == "interleaved"
    assert ops.choose_block(4096, 4096, 1, 8, 4096, 128).block_m == 32
    with tuning.override(b):
      assert tuning.current() is b and ops.auto_launch([2048]) == "fused"
    assert tuning.current() is a
    assert ops.choose_block(4096, 4096, 1, 8, 4096, 128, tuning=base).block_m == 64  # explicit beats override
    assert ops.auto_launch([64], base) == "fused"
  assert tuning.current() == base
  with pytest.raises(TypeError, match="override takes a Tuning; got dict"):
    with tuning.override({}):
      pass


def test_override_retraces_a_function_jitted_before():
  """A jitted function traced under one tuning is traced again inside an override (the kernels read the tuning
  when traced): a tuning A/B in one process must not time the first tuning twice."""

  @jax.jit
  def f(x):
    return x + tuning.current().interleave_lead

  x = jnp.zeros(())
  base = float(f(x))
  with tuning.override(dataclasses.replace(tuning.current(), interleave_lead=base / 2)):
    assert float(f(x)) == base / 2
    assert float(jax.jit(lambda y: f(y) * 2)(x)) == base  # nested in another jit
  assert float(f(x)) == base


def test_run_takes_launch_and_lead_from_the_tuning(monkeypatch):
  """`ops.run`'s "auto" launch and its interleaving lead come from the tuning."""
  seen = []
  monkeypatch.setattr(ops, "fused_levels", lambda q, works, *, specs, scale, interpret, lead, merge:
                      seen.append(lead) or ([], None))
  q = jnp.zeros((4, 1, 8, 64), jnp.bfloat16)
  kv = jnp.zeros((1, 32, 2, 64), jnp.bfloat16)
  plan = ops.batched(q, kv, kv, jnp.array([32]), np.zeros(4, np.int32), max_group=None, causal=False)  # 16 rows
  for rows, lead, want in [(16, 0.5, 0.5), (17, 0.5, 0.0), (16, 0.9, 0.9)]:
    ops.run(q, [plan], scale=1.0, interpret=True, tuning=dataclasses.replace(_h100(), interleave_rows=rows,
                                                                              interleave_lead=lead))
    assert seen.pop() == want
  with tuning.override(dataclasses.replace(_h100(), interleave_lead=0.25)):
    ops.run(q, [plan], scale=1.0, interpret=True, launch="interleaved")
  assert seen.pop() == 0.25


# --- the H100 data: today's choices ---

def test_h100_data_holds_the_constants_the_kernels_had():
  t = _h100()
  assert (t.hopper_min_work, t.max_keys_per_program, t.balanced_keys, t.balanced_programs_per_core,
          t.interleave_rows, t.interleave_lead, t.max_rows_alone, t.max_rows_shared, t.num_cores) == (
              2048 * 4096, 4096, 2048, 4, 512, 0.75, 128, 64, 132)
  # 3 + 2 stages, 208 / 88 registers, ping-pong: for every T·g above 8 below hopper_long_prefix; T·g 1 and 4 take
  # the H200's settings (short and long: measured on an H100 in session 49), and from hopper_long_prefix every T·g up
  # to 8 takes the H200's long settings (T·g 2-3 and 5-8: measured on an H100 in session 51); below it T·g 2-3 and
  # 5-8 have their own (swept on an H100 in session 52)
  assert [hopper.tuned_config(t, rows=r, prefix=p) for r in (9, 16) for p in (0, 8191)] == [
      hopper.HopperConfig()] * 4
  few = dataclasses.replace(t.hopper_for(9), prefix_stages=2, prefix_keys=128, q_registers=True)  # from the first
  assert [t.hopper_for(r, 8191) for r in (2, 3)] == [dataclasses.replace(
      few, suffix_pack=True, suffix_box=True, suffix_late_sum=True, prefix_fill=0.75)] * 2
  assert [t.hopper_for(r, 8191) for r in (5, 8)] == [dataclasses.replace(
      few, suffix_lookahead=True, suffix_trim=True)] * 2
  h200 = tuning.for_device_kind("NVIDIA H200")
  assert [t.hopper_for(r, p) for r in (1, 4) for p in (0, 8191, 8192)] == [
      h200.hopper_for(r, p) for r in (1, 4) for p in (0, 8191, 8192)]
  assert [t.hopper_for(r, p) for r in (2, 3, 5, 8) for p in (8192, 1 << 20)] == [
      h200.hopper_for(r, p) for r in (2, 3, 5, 8) for p in (8192, 1 << 20)]
  assert (ops.auto_launch([511], t), ops.auto_launch([16, 512], t)) == ("fused", "interleaved")


def test_h100_data_reproduces_the_tiles_and_splits_chosen_before():
  """choose_block under the H100 data against its choices at 441eec3 (fixture: 1350 shapes: the seed configs'
  levels at T = 1, 2, alone or sharing a launch, and a grid of small ones over D = 64/128/256, 16/32-bit)."""
  data = json.loads((FIXTURES / "h100_block_choices.json").read_text())
  for t in (_h100(), tuning.for_device_kind("cpu")):
    for *args, shared, itemsize, want in data["rows"]:
      blk = ops.choose_block(*args, shared_launch=shared, itemsize=itemsize, tuning=t)
      assert [blk.block_m, blk.block_k, blk.splits, blk.num_warps, blk.num_stages, blk.heads] == want, args


# --- the file format ---

def test_round_trip(tmp_path):
  t = dataclasses.replace(_h100(), interleave_lead=0.5, tiles=_h100().tiles + ((256, tuning.Tile(32, 8, 2)),))
  assert tuning.from_dict(json.loads(json.dumps(tuning.to_dict(t)))) == t
  file = tuning.TuningFile("Test GPU", t, dict(measured_on=None, command="c", date="d", commit="x", note="n"))
  tuning.write(tmp_path / "t.json", file)
  assert tuning.load(tmp_path / "t.json") == file
  assert not file.measured


def test_shipped_files_are_canonical_and_say_where_their_numbers_come_from():
  for kind in tuning.known_kinds():
    path = tuning.data_file(kind)
    file = tuning.load(path)
    assert tuning.dumps(file) == path.read_text()
    assert all(file.provenance[k] for k in ("command", "date", "commit", "note"))
    assert file.measured or "NOT MEASURED" in file.provenance["note"]
  assert tuning.file_for(H100).measured


def test_hopper_settings_go_by_query_rows():
  """`Tuning.hopper`: an entry holds from its T·g rows up to the next entry's; `with_hopper` sets a range and merges
  equal neighbours; the kernel takes the entry of its shape's rows; a file's single settings object (the form
  before the rows) holds for every row count."""
  t = _one_setting(_h100())
  base = t.hopper_for(1)
  wide = dataclasses.replace(base, prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128)
  mha = dataclasses.replace(base, prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True)
  t2 = t.with_hopper(2, 8, wide).with_hopper(1, 1, mha)
  assert t2.hopper == ((1, mha), (2, wide), (9, base))
  assert [t2.hopper_for(r) for r in (1, 2, 8, 9, 64)] == [mha, wide, wide, base, base]
  assert t2.with_hopper(1, 8, base).hopper == ((1, base),)  # equal neighbours merge
  assert tuning.from_dict(json.loads(json.dumps(tuning.to_dict(t2)))) == t2
  old_form = dict(tuning.to_dict(t), hopper=dataclasses.asdict(base))
  assert tuning.from_dict(old_form).hopper == ((1, base),)
  # options added after a file was written take their defaults (off); the measured settings stay required
  for drop in ("suffix_trim", "suffix_keys", "prefix_keys"):
    del old_form["hopper"][drop]
  assert tuning.from_dict(old_form).hopper == ((1, base),)
  del old_form["hopper"]["pair_registers"]
  with pytest.raises(ValueError, match=r"tuning.hopper: missing \['pair_registers'\]"):
    tuning.from_dict(old_form)
  assert t2.hopper_for(np.int64(4)) == wide
  fewer_q_heads = jax.ShapeDtypeStruct((2, 1, 1, 64), jnp.bfloat16)  # Hq < Hkv: no entry to look up, a reason
  assert "under one a KV head" in hopper.supported(fewer_q_heads, jax.ShapeDtypeStruct((16, 2, 64), jnp.bfloat16),
                                                   jax.ShapeDtypeStruct((2, 16, 2, 64), jnp.bfloat16))
  with pytest.raises(ValueError, match="rows must be an int >= 1"):
    t2.hopper_for(0)
  with pytest.raises(ValueError, match=r"got rows='4'"):  # the value given, not what it was taken for
    t2.hopper_for("4")
  assert hopper.query_rows((8, 3, 32, 128), 8) == 12
  assert hopper.tuned_config(t2, rows=4) == hopper.HopperConfig(**dataclasses.asdict(wide))
  # the kernel's own choice (config None) follows the tuning in force and the step's rows: T·g = 4 fits the wide
  # settings' shared memory, a T·g = 1 step the MHA settings'
  q4, q1 = (jax.ShapeDtypeStruct((8, 1, h, 128), jnp.bfloat16) for h in (8, 2))
  kv, skv = jax.ShapeDtypeStruct((256, 2, 128), jnp.bfloat16), jax.ShapeDtypeStruct((8, 64, 2, 128), jnp.bfloat16)
  with tuning.override(t2):
    assert hopper.supported(q4, kv, skv) is None and hopper.supported(q1, kv, skv) is None
    with tuning.override(t2.with_hopper(2, 8, dataclasses.replace(wide, prefix_stages=3))):  # too large for an SM
      assert "shared memory" in hopper.supported(q4, kv, skv) and hopper.supported(q1, kv, skv) is None
    traced = jax.jit(lambda *a: hopper.prefix_suffix_attention(*a, scale=0.1)).trace(
        q4, kv, kv, jax.ShapeDtypeStruct((), jnp.int32), skv, skv, jax.ShapeDtypeStruct((8,), jnp.int32))
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("balanced_keys"), r"missing \['balanced_keys'\]"),
    (lambda d: d.update(block_size=1), r"unknown \['block_size'\]"),
    (lambda d: d["tiles"].pop("32"), r"row tiles 16, 32, 64, ... .*got \[16, 64, 128\]"),
    (lambda d: d["tiles"].pop("128"), r"up to max_rows_alone=128 .*got \[16, 32, 64\]"),
    (lambda d: d["tiles"]["16"].update(block_k=48), r"tiles\[16\].block_k must be a power of two >= 16; got 48"),
    (lambda d: d["tiles"]["16"].update(num_stages=2.5), r"tiles\[16\].num_stages must be an int in \[1, 8\]; got 2.5"),
    (lambda d: d["tiles"]["16"].update(num_warps=True), r"tiles\[16\].num_warps must be one of .*; got True"),
    (lambda d: d["tiles"]["16"].update(num_stages="3"), r"tiles\[16\].num_stages must be an int in \[1, 8\]; got '3'"),
    (lambda d: d["hopper"]["1"].update(pingpong="false"), r"HopperTuning.pingpong must be true or false; got 'false'"),
    (lambda d: d["hopper"]["1"].update(suffix_pack=0.5), r"HopperTuning.suffix_pack must be true or false; got 0.5"),
    (lambda d: d["hopper"]["1"].update(prefix_keys=64.0), r"HopperTuning.prefix_keys must be 64 or 128; got 64.0"),
    (lambda d: d["hopper"]["1"].update(cluster=True), r"HopperTuning.cluster must be 1 or 2; got True"),
    (lambda d: d["gemm"].update(num_warps=4.0), r"GemmTuning.num_warps must be one of .*; got 4.0"),
    (lambda d: d.update(interleave_lead="0.75"), r"interleave_lead must be a number in \[0, 1\]; got '0.75'"),
    (lambda d: d.update(interleave_lead=None), r"interleave_lead must be a number in \[0, 1\]; got None"),
    (lambda d: d["hopper"]["1"].pop("pingpong"), r"tuning.hopper\[1\]: missing \['pingpong'\]"),
    (lambda d: d.update(hopper={"2": d["hopper"]["1"]}), r"Tuning.hopper must give .* from rows 1 up.*got rows \[2\]"),
    (lambda d: d.update(balanced_keys=8192), "balanced_keys=8192 exceeds max_keys_per_program=4096"),
    (lambda d: d.update(interleave_lead=1.5), r"interleave_lead must be a number in \[0, 1\]; got 1.5"),
    (lambda d: d.update(hopper_min_work=8.0e6), "hopper_min_work must be a positive int; got 8000000.0"),
    (lambda d: d.update(hopper_min_fill=-0.5), "hopper_min_fill must be a finite number >= 0; got -0.5"),
    (lambda d: d.update(hopper_min_fill="0.75"), "hopper_min_fill must be a finite number >= 0; got '0.75'"),
    (lambda d: d.pop("hopper_min_fill"), r"missing \['hopper_min_fill'\]"),
    (lambda d: d.update(hopper_min_seq_work=-1), "hopper_min_seq_work must be an int >= 0; got -1"),
    (lambda d: d.pop("hopper_min_seq_work"), r"missing \['hopper_min_seq_work'\]"),
    (lambda d: d["gemm"].update(block_n=48), "GemmTuning.block_n must be a power of two >= 16; got 48"),
    (lambda d: d["gemm"].update(max_rows=256), r"GemmTuning.max_rows must be an int in \[0, 128\]; got 256"),
    (lambda d: d["gemm"].update(min_rows=0), r"GemmTuning.min_rows must be an int in \[1, 128\]; got 0"),
    (lambda d: d["gemm"].update(min_rows=65, max_rows=64),
     r"GemmTuning.min_rows \(65\) must be at most max_rows \(64\)"),
    (lambda d: d["gemm"].pop("num_stages"), r"tuning.gemm: missing \['num_stages'\]"),
    (lambda d: d["gemm"].update(programs_per_core=-1), "GemmTuning.programs_per_core must be an int >= 0; got -1"),
    (lambda d: d.update(split_min_fill=0.0), r"Tuning.split_min_fill must be a number in \(0, 1\]; got 0.0"),
    (lambda d: d.update(split_min_fill=1.5), r"Tuning.split_min_fill must be a number in \(0, 1\]; got 1.5"),
    (lambda d: d.update(split_min_fill=True), r"Tuning.split_min_fill must be a number in \(0, 1\]; got True"),
    (lambda d: d.update(split_min_fill="0.9"), r"Tuning.split_min_fill must be a number in \(0, 1\]; got '0.9'"),
    (lambda d: d.update(split_min_fill=float("nan")), r"Tuning.split_min_fill must be a number in \(0, 1\]; got nan"),
    (lambda d: d.update(split_fill_max_keys=0), "split_fill_max_keys must be a positive int; got 0"),
    (lambda d: d.update(split_fill_max_keys=2048.0), "split_fill_max_keys must be a positive int; got 2048.0"),
    # each was accepted (a bool taken for 1, a wrong type for "none") or crashed without naming the field:
    (lambda d: d.update(tiles={}), r"Tuning.tiles must give a Tile for the row tiles 16, .*; got \[\]"),  # IndexError
    # int() took "+16", " 16", "1_6" (and other scripts' digits) as 16: tile keys as strict as the hopper rows'
    *[(lambda d, k=k: d.update(tiles={k if r == "16" else r: t for r, t in d["tiles"].items()}),
       rf"tuning.tiles: keys must be row counts .*; got \[{re.escape(repr(k))}\]") for k in ("+16", " 16", "1_6", "016", 16)],
    (lambda d: d.update(merge_rows=True), "Tuning.merge_rows must be a power of two; got True"),
    (lambda d: d["tiles"]["16"].update(num_stages=2**70), r"Tuning.tiles\[16\].num_stages must be an int in \[1, 8\]"),
    (lambda d: d["gemm"].update(num_stages=9), r"GemmTuning.num_stages must be at most 8; got 9"),  # (a hang)
    (lambda d: d.update(merge_warps=True), "Tuning.merge_warps must be a power of two up to 32; got True"),
    (lambda d: d.update(hopper_long=False, hopper_long_prefix=0), r"tuning.hopper_long: expected an object .*got bool"),
    (lambda d: d.update(hopper_long=[], hopper_long_prefix=0), r"tuning.hopper_long: expected an object .*got list"),
    (lambda d: d.update(hopper={"1": d["hopper"]["1"], "x": d["hopper"]["1"]}),
     r"tuning.hopper: keys must be row counts .*; got \['x'\]"),  # was "missing [prefix_stages, ...]"
    (lambda d: d.update(hopper={"1": d["hopper"]["1"], "²": d["hopper"]["1"]}),
     r"tuning.hopper: keys must be row counts .*; got \['²'\]"),  # was int()'s error, naming nothing
    (lambda d: d["hopper"]["1"].update(prefix_stages="2", pair_suffix_cost=1.0),
     r"tuning.hopper\[1\]: HopperTuning.prefix_stages must be a positive int; got '2'"),  # was a TypeError
    (lambda d: d["hopper"]["4"].update(cluster=3), r"tuning.hopper\[4\]: HopperTuning.cluster must be 1 or 2; got 3"),
])
def test_bad_tuning_data_is_refused_by_name(edit, message):
  data = tuning.to_dict(_h100())
  edit(data)
  with pytest.raises(ValueError, match=message):
    tuning.from_dict(data)


def test_a_file_that_leaves_out_fields_says_which_defaults_apply(tmp_path):
  """A file written before some fields existed loads with their defaults (the behaviour before them), and says so:
  a field deleted by hand (the H200's hopper_seq_max_suffix 256 -> 0, any suffix) changed the kernels silently."""
  data = json.loads(tuning.data_file("NVIDIA H200").read_text())
  del data["tuning"]["hopper_seq_max_suffix"], data["tuning"]["split_min_fill"]
  required = json.loads(json.dumps(data))
  del required["tuning"]["hopper_min_work"]  # no default: refused, not warned about as defaulted
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    with pytest.raises(ValueError, match=r"missing \['hopper_min_work'\]"):
      tuning.loads(json.dumps(required), "x.json")
  assert not [w for w in seen if "hopper_min_work" in str(w.message)], [str(w.message) for w in seen]
  with pytest.warns(UserWarning, match=r"x.json: the tuning leaves out \['split_min_fill', 'hopper_seq_max_suffix'\]|"
                                       r"x.json: the tuning leaves out \['hopper_seq_max_suffix', 'split_min_fill'\]"):
    old = tuning.loads(json.dumps(data), "x.json")
  assert old.tuning.hopper_seq_max_suffix == 0 and old.tuning.split_min_fill == 1.0
  for kind in tuning.known_kinds():  # the package's own files name every field: no warning
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      tuning.load(pathlib.Path(str(tuning.data_file(kind))))


def test_a_tuning_file_in_the_package_is_named_after_its_kind(tmp_path, monkeypatch):
  """A sweep's --out in the package's folder under another name (an H200 NVL's sweep written as nvidia-h200.json,
  as the docstring's example reads) made every H200 process fail, or an H100 PCIe's file go unused: refused."""
  file = tuning.file_for(H100)
  misnamed = pathlib.Path(str(tuning.data_file(H100))).parent / "nvidia-h200-test-misnamed.json"  # no device's
  nvl = tuning.TuningFile("NVIDIA H200 NVL", file.tuning, file.provenance)
  try:
    with pytest.raises(ValueError, match=r"misnamed.json: a tuning file in the package's folder is named after its "
                                         r"device kind, nvidia-h200-nvl.json for 'NVIDIA H200 NVL'"):
      tuning.write(misnamed, nvl)
  finally:
    misnamed.unlink(missing_ok=True)  # (written where the check is missing)
  tuning.write(tmp_path / "nvidia-h200.json", nvl)  # elsewhere any name (a --base, $HYDRAGEN_JAX_TUNING)


def test_a_file_without_the_split_fill_fields_keeps_a_program_per_sm():
  """Files written before `split_min_fill` and `split_fill_max_keys` load with the rule off (1.0: a program per
  SM, as before), and the fields round-trip."""
  data = tuning.to_dict(_h100())
  del data["split_min_fill"], data["split_fill_max_keys"]
  old = tuning.from_dict(data)
  assert (old.split_min_fill, old.split_fill_max_keys) == (1.0, 2048)
  tune = dataclasses.replace(_h100(), split_min_fill=0.9, split_fill_max_keys=4096)
  assert tuning.from_dict(tuning.to_dict(tune)) == tune


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["tuning"]["hopper"]["2"].update(pingpong="false"),
     r"^x.json: tuning.hopper\[2\]: HopperTuning.pingpong must be true or false; got 'false'"),  # named no file
    (lambda d: d.update(device_kind=["NVIDIA H200"]), r"^x.json: device_kind must be a device kind's name .*got \["),
    (lambda d: d.update(device_kind=None), r"^x.json: device_kind must be a device kind's name .*got None"),
])
def test_bad_file_data_is_refused_naming_the_file(edit, message):
  data = json.loads(tuning.dumps(tuning.file_for(H100)))
  edit(data)
  with pytest.raises(ValueError, match=message):
    tuning.loads(json.dumps(data), "x.json")


def test_a_tuning_file_of_bad_kind_or_encoding_is_named(monkeypatch, tmp_path):
  """HYDRAGEN_JAX_TUNING naming a file whose device_kind is not a name (a TypeError in the warning's cache before), or
  a file that is not UTF-8 (`load` named no file)."""
  data = json.loads(tuning.dumps(tuning.file_for(H100)))
  data["device_kind"] = ["NVIDIA H100 80GB HBM3"]
  (tmp_path / "list.json").write_text(json.dumps(data))
  monkeypatch.setenv(tuning.TUNING_ENV, str(tmp_path / "list.json"))
  with pytest.raises(ValueError, match=r"HYDRAGEN_JAX_TUNING='.*list.json': .*list.json: device_kind must be"):
    tuning.current()
  (tmp_path / "latin.json").write_bytes(b'{"device_kind": "caf\xe9"}')
  with pytest.raises(ValueError, match=r"latin.json: not UTF-8 text"):
    tuning.load(tmp_path / "latin.json")
  monkeypatch.setenv(tuning.TUNING_ENV, str(tmp_path))
  with pytest.raises(ValueError, match=r"HYDRAGEN_JAX_TUNING='.*': .*Is a directory"):
    tuning.current()


def test_a_file_that_is_not_json_is_named():
  with pytest.raises(ValueError, match=r"x.json: not valid JSON: Expecting"):
    tuning.loads('{"device_kind": "cpu", oops}', "x.json")


def test_resolve_takes_a_tuning_or_none():
  assert tuning.resolve(None) == tuning.current()
  with pytest.raises(TypeError, match=r"tuning must be a hydragen_jax.tuning.Tuning or None; got TuningFile"):
    tuning.resolve(tuning.file_for(H100))


def test_a_gpu_without_a_file_is_warned_about_and_an_env_var_names_a_file(monkeypatch, tmp_path):
  """An unknown GPU gets the H100's tuning with a warning (once a kind; CPU runs silently); HYDRAGEN_JAX_TUNING
  names a file to use on any device."""
  tuning.file_for.cache_clear()
  with pytest.warns(UserWarning, match=r"no tuning file for device kind 'NVIDIA A100-SXM4-80GB' .*"
                                       r"NVIDIA H100 80GB HBM3's choices.*HYDRAGEN_JAX_TUNING"):
    assert tuning.file_for("NVIDIA A100-SXM4-80GB").device_kind == H100
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tuning.file_for("cpu")
    tuning.file_for("TPU v5 lite")  # not a GPU: no tuning to miss
    tuning.file_for("NVIDIA A100-SXM4-80GB")  # once a kind
  mine = dataclasses.replace(_h100(), max_rows_shared=32)
  path = tmp_path / "mine.json"
  tuning.write(path, tuning.TuningFile("NVIDIA A100-SXM4-80GB", mine, dict(
      measured_on=None, command="test", date="2026-12-02", commit="none", note="test")))
  monkeypatch.setenv(tuning.TUNING_ENV, str(path))
  assert tuning.current() == mine
  with tuning.override(_h100()):  # an override still wins
    assert tuning.current() == _h100()
  monkeypatch.setenv(tuning.TUNING_ENV, str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match=r"HYDRAGEN_JAX_TUNING='.*missing.json': .*No such file"):
    tuning.current()


def test_an_env_file_of_another_gpu_kind_is_used_with_a_warning(monkeypatch, tmp_path):
  """The file HYDRAGEN_JAX_TUNING names is used on any device; on a GPU of another kind than the file's, with a
  warning (once); on its own kind and off a GPU (interpreted runs), silently."""
  path = tmp_path / "h200.json"
  path.write_text(tuning.data_file("NVIDIA H200").read_text())
  monkeypatch.setenv(tuning.TUNING_ENV, str(path))
  h200 = tuning.for_device_kind("NVIDIA H200")
  for kind in ("cpu", "NVIDIA H200"):
    monkeypatch.setattr(tuning, "device_kind", lambda kind=kind: kind)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      assert tuning.current() == h200
  monkeypatch.setattr(tuning, "device_kind", lambda: "NVIDIA L40S")
  with pytest.warns(UserWarning, match=r"HYDRAGEN_JAX_TUNING='.*h200.json' is the tuning of device kind 'NVIDIA H200', "
                                       r"and this device is 'NVIDIA L40S'"):
    assert tuning.current() == h200
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert tuning.current() == h200  # once


def test_the_env_file_is_read_again_when_it_changes(monkeypatch, tmp_path):
  """An edit of the file HYDRAGEN_JAX_TUNING names is seen by the next `current()` (the first reading was kept for
  the rest of the process), as is a relative path after a chdir (another file then)."""
  base = tuning.file_for(H100)
  for name, rows in (("a", 111), ("b", 222)):
    (tmp_path / name).mkdir()
    tuning.write(tmp_path / name / "t.json",
                 dataclasses.replace(base, tuning=dataclasses.replace(base.tuning, interleave_rows=rows)))
  monkeypatch.chdir(tmp_path / "a")
  monkeypatch.setenv(tuning.TUNING_ENV, "t.json")
  assert tuning.current().interleave_rows == 111
  monkeypatch.chdir(tmp_path / "b")
  assert tuning.current().interleave_rows == 222
  edited = dataclasses.replace(base, tuning=dataclasses.replace(base.tuning, interleave_rows=3333))
  tuning.write(tmp_path / "b" / "t.json", edited)  # another size: seen even within the clock's resolution
  assert tuning.current().interleave_rows == 3333


def test_a_key_given_twice_is_refused_and_errors_name_their_field_once():
  """json.loads keeps the last of a repeated key silently: refused, naming it. A bad `gemm` entry's error named
  the file twice."""
  text = tuning.dumps(tuning.file_for(H100))
  twice = text.replace('"hopper_min_fill": ', '"hopper_min_fill": 5.0, "hopper_min_fill": ', 1)
  assert twice != text
  with pytest.raises(ValueError, match=r"mine: the key 'hopper_min_fill' is given twice in one object"):
    tuning.loads(twice, "mine")
  data = json.loads(text)
  data["tuning"]["gemm"]["foo"] = 1
  with pytest.raises(ValueError) as e:
    tuning.loads(json.dumps(data), "mine.json")
  assert str(e.value).count("mine.json") == 1 and "mine.json: tuning.gemm: unknown ['foo']" in str(e.value)


def test_a_file_without_provenance_is_refused():
  text = tuning.dumps(tuning.file_for(H100))
  data = json.loads(text)
  del data["provenance"]["commit"]
  with pytest.raises(ValueError, match=r"provenance must record .*missing \['commit'\]"):
    tuning.loads(json.dumps(data), "x.json")


# --- the sweep ---

class _FakeSweep:
  """Steps whose time is a function of the tuning's interleave_lead per config (None: over budget)."""

  configs = [(1,), (2,), (3,)]

  def __init__(self, seconds):
    self._seconds = seconds  # (config, lead) -> seconds

  def signature(self, i, tune, kernel):
    return (i, tune.interleave_lead if i < 2 else None)  # config 2 does not interleave: unchanged by the lead

  def time(self, i, tune, kernel):
    return self._seconds.get((i, tune.interleave_lead), 1.0)


def test_sweep_picks_the_fastest_candidate_above_the_minimum_gain():
  choice = sweep_device.field_choice("interleave_lead", "triton", "gqa", (0.5, 0.75, 0.9))
  base = dataclasses.replace(_h100(), interleave_lead=0.75)
  # 0.5: 1.25x on config 0, 0.8x on config 1 -> geometric mean 1.0: kept out; 0.9: 1.05x on both
  fake = _FakeSweep({(0, 0.5): 0.8, (1, 0.5): 1.25, (0, 0.9): 1 / 1.05, (1, 0.9): 1 / 1.05, (2, 0.9): 100.0})
  tune, record = sweep_device.run_choice(fake, choice, base, (0, 1, 2), min_gain=0.02)
  assert tune.interleave_lead == 0.9 and record["status"] == "picked"
  assert [c["changed"] for c in record["candidates"]] == [[(1,), (2,)], [(1,), (2,)]]  # config 2: same step
  assert [c["speedup"] for c in record["candidates"]] == [1.0, 1.05]
  tune, record = sweep_device.run_choice(fake, choice, base, (0, 1, 2), min_gain=0.06)
  assert tune == base and record["status"] == "kept"
  fake._seconds[(1, 0.9)] = None  # the budget ran out before this step
  tune, record = sweep_device.run_choice(fake, choice, base, (0, 1, 2), min_gain=0.02)
  assert tune == base and record["untimed"] == 1
  assert sweep_device.speedup([1.0, 1.0], [0.5, math.inf]) == 0.0


def test_sweep_replaces_a_base_setting_whose_step_fails():
  """A base value whose step fails (a compile error, a wrong output: inf) was kept, "not measured", and the file
  written as a measurement; now the fastest candidate that runs every config replaces it, whatever the gain, and
  where every candidate fails too the choice says so."""
  choice = sweep_device.field_choice("interleave_lead", "triton", "gqa", (0.5, 0.75, 0.9))
  base = dataclasses.replace(_h100(), interleave_lead=0.75)
  fake = _FakeSweep({(1, 0.75): math.inf, (0, 0.5): 2.0, (1, 0.5): 1.0, (0, 0.9): 1.5, (1, 0.9): math.inf})
  tune, record = sweep_device.run_choice(fake, choice, base, (0, 1, 2), min_gain=0.02)
  assert tune.interleave_lead == 0.5 and record["status"] == "picked" and record["base_fails_on"] == [(2,)]
  assert record["candidates"][1]["status"] == "leaves a config the base fails on failing"  # 0.9
  notes = sweep_device.field_notes([record], 0.02)
  assert "fails on [(2,)]" in notes["interleave_lead"] and "0.5 runs every config" in notes["interleave_lead"]
  fake._seconds[(1, 0.5)] = math.inf
  tune, record = sweep_device.run_choice(fake, choice, base, (0, 1, 2), min_gain=0.02)
  assert tune == base and record["status"] == "not measured: the base step fails, and every candidate too"


def test_sweep_times_the_hopper_thresholds_on_every_config():
  """The thresholds between the Hopper kernel and Triton decide for any shape: one choice sets both (a shape takes
  the Hopper kernel only where both allow it), timed on every config, and for each config some candidate puts it on
  the Hopper kernel and some on Triton, so each is timed on both (the B = 64 MHA configs sit below both thresholds:
  two choices of one threshold each never moved them)."""
  configs = sweep_device.CONFIGS
  [choice] = [c for c in sweep_device.choices(configs, sweep_device.GROUPS) if c.field.startswith("hopper_min_w")]
  assert choice.field == "+".join(sweep_device.THRESHOLDS) == "hopper_min_work+hopper_min_fill"
  assert sweep_device.GROUPS[choice.group] == tuple(range(len(configs)))
  # hopper_max_rows off: that cap (8 on both devices) keeps the T·g = 16 config on Triton whatever the thresholds
  base, cores = dataclasses.replace(_h100(), hopper_max_rows=0), ops.num_cores()
  for b, p, _, hq, hkv in configs:
    takes = {dispatch.pays_on_hopper((b, 1, hq), hkv, p, choice.apply(base, value), cores)
             for value in choice.candidates}
    assert takes == {True, False}, (b, p, hq, hkv)
  assert choice.read(choice.apply(base, (7, 0.25))) == (7, 0.25)


def test_sweep_times_the_split_fill_rule_where_it_changes_the_splits():
  """`split_min_fill` and its key bound are one choice, timed on every config with the rule off among its
  candidates, and on the MHA decode layer (B = 64, P = 4K: 32 prefix programs) some candidate changes the splits
  (8 at a program per SM, 4 where 128 programs may fill 96 % of 132 SMs): the sweep can tell them apart."""
  configs = sweep_device.CONFIGS
  [choice] = [c for c in sweep_device.choices(configs, sweep_device.GROUPS) if c.field.startswith("split_min")]
  assert choice.field == "split_min_fill+split_fill_max_keys" and (1.0, 2048) in choice.candidates
  assert sweep_device.GROUPS[choice.group] == tuple(range(len(configs)))
  base = _h100()
  with mock.patch.object(ops, "num_cores", lambda t=None: 132):
    splits = {ops.choose_block(64, 64, 1, 32, 4096, 128, tuning=choice.apply(base, v)).splits
              for v in choice.candidates}
  assert splits == {4, 8}
  assert choice.read(choice.apply(base, (0.9, 1024))) == (0.9, 1024)


def test_sweep_sets_the_mha_settings_by_prefix_length():
  """T·g = 1's Hopper settings: the long prefixes' (`hopper_long`) timed on the 16K layers, starting from `hopper`'s
  where a tuning has none and bringing `hopper_long_prefix` down to their prefix; the short ones' on the 4K layer
  (the configs then take different settings); the threshold on every MHA and GQA config (T·g 1 and 4), 0 dropping
  the long settings, 8192 among its candidates; and `hopper_min_seq_work` among 0 and the configs' shares, on every
  config."""
  configs, groups = sweep_device.CONFIGS, sweep_device.GROUPS
  picks = {c.field: c for c in sweep_device.choices(configs, groups)}
  long, short, prefix = picks["hopper_long[1]"], picks["hopper[1]"], picks["hopper_long_prefix"]
  assert all(configs[i][1] >= sweep_device.LONG_PREFIX for i in groups[long.group])
  assert all(configs[i][1] < sweep_device.LONG_PREFIX for i in groups[short.group])
  assert {configs[i][3] // configs[i][4] for i in groups[prefix.group]} == {1, 4}
  assert set(groups["mha"]) <= set(groups[prefix.group]) and 8192 in prefix.candidates
  base = _one_setting(_h100())
  a, b = sweep_device.HOPPER_CONFIGS[:2]
  t = short.apply(long.apply(base, b), a)
  assert t.hopper_long_prefix == sweep_device.LONG_PREFIX and long.read(t) == b and short.read(t) == a
  assert t.hopper_for(4, 1 << 20) == base.hopper_for(4)  # other rows: as hopper
  assert long.apply(dataclasses.replace(t, hopper_long_prefix=65536), b).hopper_long_prefix == sweep_device.LONG_PREFIX
  assert 0 in prefix.candidates and sweep_device.LONG_PREFIX in prefix.candidates
  assert prefix.apply(t, 0).hopper_long == () and prefix.apply(t, 0).hopper_for(1, 1 << 20) == a
  assert prefix.apply(t, 4096).hopper_for(1, 4096) == b
  seq = picks["hopper_min_seq_work"]
  assert seq.kernel == "pallas" and groups[seq.group] == tuple(range(len(configs))) and seq.candidates[0] == 0
  assert 4096 in seq.candidates and seq.read(seq.apply(base, 4096)) == 4096


def test_hopper_seq_max_suffix_bounds_the_per_sequence_path_by_suffix_capacity(monkeypatch):
  """`hopper_seq_max_suffix`: below hopper_min_work, one sequence's share takes the Hopper kernel only up to this
  suffix capacity (the H200's 256: MHA, B = 256, P = 4K ran 0.92x Triton at 1024, bench row 4); above
  hopper_min_work, and with no suffix capacity given or the field 0, it bounds nothing. The API passes the suffix
  level's capacity; the sweep times 0 and the configs' capacities; the H100's file leaves it off."""
  h200 = tuning.load(tuning.data_file("NVIDIA H200")).tuning
  assert h200.hopper_seq_max_suffix == 256 and _h100().hopper_seq_max_suffix == 0
  mha = lambda b: (b, 1, 32, 128)  # noqa: E731
  takes = lambda shape, hkv, p, s, t=h200: dispatch.pays_on_hopper(  # noqa: E731
      shape, hkv, p, t, num_cores=132, suffix_capacity=s)
  assert dispatch.prefix_work(mha(256), 32, 4096) < h200.hopper_min_work
  assert [takes(mha(256), 32, 4096, s) for s in (128, 256, 512, 1024, None)] == [True, True, False, False, True]
  assert not takes(mha(512), 32, 4096, 1024)
  assert all(takes(mha(256), 32, 4096, s, dataclasses.replace(h200, hopper_seq_max_suffix=0)) for s in (512, 1024))
  gqa = (512, 1, 32, 128)  # bench row 6, 512 / 2K / 512 GQA 32/8: above hopper_min_work, no bound
  assert dispatch.prefix_work(gqa, 8, 2048) >= h200.hopper_min_work and takes(gqa, 8, 2048, 4096)
  with pytest.raises(ValueError, match="hopper_seq_max_suffix"):
    dataclasses.replace(h200, hopper_seq_max_suffix=-1)
  shipped = tuning.load(tuning.data_file("NVIDIA H200"))
  assert tuning.loads(tuning.dumps(shipped), "x") == shipped
  # the API asks with the suffix level's capacity
  monkeypatch.setattr(dispatch, "on_hopper", lambda: True)
  monkeypatch.setattr(tuning, "current", lambda: h200)
  monkeypatch.setattr(ops, "num_cores", lambda *a: 132)
  q = jnp.zeros(mha(256), jnp.bfloat16)
  prefix = hj.Level(jnp.zeros((1, 4096, 32, 128), jnp.bfloat16), jnp.zeros((1, 4096, 32, 128), jnp.bfloat16),
                    jnp.array([4096]))
  runs = {s: hj.api._hopper_runs(q, [prefix, hj.Level(*(2 * [jnp.zeros((256, s, 32, 128), jnp.bfloat16)]),
                                                      jnp.full((256,), 1))],
                                 causal=[False, True], batched=[True, False], backend="pallas") for s in (256, 1024)}
  assert runs == {256: True, 1024: False}
  choice = {c.field: c for c in sweep_device.choices(sweep_device.CONFIGS, sweep_device.GROUPS)}[
      "hopper_seq_max_suffix"]
  assert choice.kernel == "pallas" and choice.candidates[0] == 0
  assert set(choice.candidates[1:]) == {out for _, _, out, _, _ in sweep_device.CONFIGS}
  assert choice.read(choice.apply(h200, 1024)) == 1024


def _takes_hopper(tune: tuning.Tuning, configs) -> list[bool]:
  """For each sweep config (B, P, out, Hq, Hkv): whether "pallas" takes the Hopper kernel under `tune` (132 SMs)."""
  return [dispatch.pays_on_hopper((b, 1, hq, 128), hkv, p, tune, num_cores=132) for b, p, _, hq, hkv in configs]


def test_sweep_times_hopper_max_rows_on_a_wide_window_the_rule_sends_to_the_kernel():
  """`hopper_max_rows` (0 first: no bound) is timed on the API's choice of kernel over configs of more than 8 T·g
  rows that the rest of the rule sends to the Hopper kernel, so that 8 moves them to Triton and 0 or 16 do not."""
  configs, groups = sweep_device.CONFIGS, sweep_device.GROUPS
  choice = {c.field: c for c in sweep_device.choices(configs, groups)}["hopper_max_rows"]
  assert choice.kernel == "pallas" and choice.candidates == (0, 8, 16)
  wide = [configs[i] for i in groups[choice.group]]
  assert wide and all(hq // hkv > 8 for _, _, _, hq, hkv in wide)
  base = tuning.load(tuning.data_file("NVIDIA H200")).tuning
  takes = lambda v: _takes_hopper(choice.apply(base, v), wide)  # noqa: E731
  assert all(takes(0)) and all(takes(16)) and not any(takes(8))
  assert choice.read(choice.apply(base, 16)) == 16


def test_sweep_sets_the_gqa_long_prefix_settings_and_where_splits_count():
  """GQA's long-prefix settings (`hopper_long` rows 4-8) are timed on T·g = 4 configs of at least LONG_PREFIX keys,
  leaving the short settings, T·g = 1's long ones and the other rows as they are; `hopper_split_min_rows` (0: off
  first) on the API's choice of kernel, over configs of T·g 4, 2 and 1 that reach `hopper_min_work` with items that
  fill the SMs only with their keys split, so that each candidate moves a different set of them."""
  configs, groups = sweep_device.CONFIGS, sweep_device.GROUPS
  picks = {c.field: c for c in sweep_device.choices(configs, groups)}
  long = picks["hopper_long[4-8]"]
  assert long.kernel == "hopper" and groups[long.group]
  assert all(configs[i][3] // configs[i][4] == 4 and configs[i][1] >= sweep_device.LONG_PREFIX
             for i in groups[long.group])
  base = tuning.load(tuning.data_file("NVIDIA H200")).tuning
  pick = next(c for c in sweep_device.HOPPER_CONFIGS if c != base.hopper_for(4, 1 << 20))  # one that moves it
  t = long.apply(base, pick)
  assert long.read(t) == pick and t.hopper_for(4, 1 << 20) == t.hopper_for(8, 1 << 20) == pick
  for rows in (1, 2, 3, 9, 16):  # the other rows, and every row of short prefixes, keep theirs
    assert t.hopper_for(rows, 1 << 20) == base.hopper_for(rows, 1 << 20)
  short = base.hopper_long_prefix - 1
  assert all(t.hopper_for(rows, short) == base.hopper_for(rows, short) for rows in (1, 2, 4, 8, 9))
  split = picks["hopper_split_min_rows"]
  assert split.kernel == "pallas" and split.candidates[0] == 0 and 4 in split.candidates
  few = [configs[i] for i in groups[split.group]]
  assert sorted(hq // hkv for _, _, _, hq, hkv in few) == [1, 2, 4]
  assert all(dispatch.prefix_work((b, 1, hq), hkv, p) >= base.hopper_min_work and
             dispatch.prefix_fill((b, 1, hq), hkv, 132) < base.hopper_min_fill for b, p, _, hq, hkv in few)
  takes = lambda v: _takes_hopper(split.apply(base, v), few)  # noqa: E731
  assert len({tuple(takes(v)) for v in split.candidates}) == 4  # 0 (or 8), 4, 2, 1: each moves another config
  assert split.read(split.apply(base, 2)) == 2


@pytest.mark.parametrize("first,last,rows", [(2, 3, 2), (5, 8, 8)])
def test_sweep_sets_the_other_few_row_windows_on_configs_of_their_own(first, last, rows):
  """T·g = 2-3 and 5-8 have choices of their own, short and long prefixes (`hopper[..]`, `hopper_long[..]`), timed
  on configs of that T·g below and from LONG_PREFIX keys, after the T·g = 4 choice (which sets rows 4-8 first); a
  pick changes its rows and prefix lengths only."""
  configs, groups = sweep_device.CONFIGS, sweep_device.GROUPS
  order = [c.field for c in sweep_device.choices(configs, groups)]
  name = f"[{first}-{last}]"
  assert order.index("hopper[4-8]") < order.index(f"hopper{name}")
  picks = {c.field: c for c in sweep_device.choices(configs, groups)}
  short, long = picks[f"hopper{name}"], picks[f"hopper_long{name}"]
  assert short.kernel == long.kernel == "hopper"
  for choice, is_long in ((short, False), (long, True)):
    cfgs = [configs[i] for i in groups[choice.group]]
    assert cfgs and all(hq // hkv == rows and (p >= sweep_device.LONG_PREFIX) == is_long
                        for _, p, _, hq, hkv in cfgs)
  base = tuning.load(tuning.data_file("NVIDIA H200")).tuning
  long_keys, short_keys = 1 << 20, base.hopper_long_prefix - 1
  for choice, keys, other in ((short, short_keys, long_keys), (long, long_keys, short_keys)):
    pick = next(c for c in sweep_device.HOPPER_CONFIGS if c != choice.read(base))  # one that moves it
    t = choice.apply(base, pick)
    assert choice.read(t) == pick and t.hopper_for(first, keys) == t.hopper_for(last, keys) == pick
    for r in {1, 2, 3, 4, 5, 8, 9, 16} - set(range(first, last + 1)):  # the other rows keep theirs
      assert t.hopper_for(r, keys) == base.hopper_for(r, keys), r
    assert all(t.hopper_for(r, other) == base.hopper_for(r, other) for r in (1, 2, 3, 4, 5, 8, 9))


@pytest.mark.parametrize("argv,message", [
    (["--dry-run"], r"--out FILE is needed with --dry-run"),
    pytest.param(["--budget-s", "100"], r"--out FILE is needed with off a GPU",
                 marks=pytest.mark.skipif(jax.default_backend() == "gpu", reason="the rule off a GPU")),
    (["--dry-run", "--out", "x.json", "--step-timeout-s", "0"], r"--step-timeout-s must be > 0; got 0.0"),
    (["--dry-run", "--out", "x.json", "--budget-s", "-5"], r"--budget-s must be > 0; got -5.0"),
    (["--dry-run", "--out", "x.json", "--final-s", "-1"], r"--final-s must be >= 0 and below --budget-s .*; got -1.0"),
    # the final check's reserve would leave the choices no time: nothing measured (a review's finding)
    (["--dry-run", "--out", "x.json", "--budget-s", "60"], r"--final-s must be >= 0 and below --budget-s \(60: the "
                                                           r"choices get the rest\); got 60.0"),
    (["--dry-run", "--out", "x.json", "--min-gain", "-0.5"], r"--min-gain must be >= 0 .*; got -0.5"),
])
def test_sweep_options_are_checked_before_anything_runs(argv, message, capsys):
  """A dry run (or a run off a GPU) must name its --out (the default is the device's own file, for measurements
  only); times and gains out of range are named."""
  with pytest.raises(SystemExit):
    sweep_device.main(argv)
  assert re.search(message, capsys.readouterr().err)


@pytest.mark.filterwarnings("ignore:hydragen_jax. no tuning file")
def test_a_sweep_that_timed_nothing_is_not_a_measurement(data_dir, tmp_path, monkeypatch):
  """A sweep whose budget timed no step writes measured_on null, unless its base is this device's measured file
  (whose values it keeps)."""
  def sweep(out):
    sweep_device.main(["--out", str(out), "--budget-s", "0.001", "--final-s", "0", "--fields", "interleave_lead"])
    file = tuning.load(out)
    assert file.provenance["steps_timed"] == 0
    return file.provenance["measured_on"]

  monkeypatch.setattr(tuning, "device_kind", lambda: "Test GPU")
  assert sweep(tmp_path / "a.json") is None  # the base is the H100's (no file for this kind)
  _write(data_dir, "Test GPU", _h100())
  tuning.file_for.cache_clear()
  assert sweep(tmp_path / "b.json") == "Test GPU"  # its own measured file: still its measurement


@pytest.mark.slow  # the sweep's plumbing in full (CI time; test_sweep_of_some_fields_... dry-runs one field)
def test_sweep_dry_run_writes_a_valid_file(tmp_path):
  """The sweep on the seed configs, every step traced but not run (stand-in times): a valid file that says it
  is a dry run and what each choice did."""
  out = tmp_path / "dry.json"
  sweep_device.main(["--dry-run", "--out", str(out), "--log", str(tmp_path / "steps.jsonl")])
  file = tuning.load(out)
  assert file.device_kind == tuning.device_kind() and not file.measured
  assert file.provenance["note"].startswith("DRY RUN")
  fields = [c.field for c in sweep_device.choices(sweep_device.CONFIGS, sweep_device.GROUPS)]
  assert sorted(file.provenance["fields"]) == sorted(fields)
  assert all(r["status"] in ("picked", "kept") for r in file.provenance["choices"])
  assert not file.provenance["final_check"]["status"].startswith("not run")  # the final write, after the choices
  steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
  assert len(steps) == file.provenance["steps_timed"] > 0 and not any(s["error"] for s in steps)
  assert {s["signature"].split("'")[1] for s in steps} == {"triton", "hopper", "alone"}


def test_sweep_of_some_fields_keeps_the_notes_of_the_others(tmp_path):
  """A sweep of one field from this device's own file keeps the provenance notes of the fields it leaves alone
  (e.g. the decode GEMM's, written by sweep_gemm.py) and their choice records (a full sweep's, before it), and
  replaces the note and the record of the field it measures."""
  base = tuning.with_measured_field(tuning.file_for(H100), tuning.device_kind(), _h100(), "gemm", "gemm's note",
                                    command="c", date="d", commit="x")
  base = tuning.with_measured_field(base, tuning.device_kind(), _h100(), "interleave_rows", "old note",
                                    command="c", date="d", commit="x")
  earlier = [dict(field="interleave_lead", status="kept", mark=1), dict(field="interleave_rows", status="kept", mark=2)]
  base = dataclasses.replace(base, provenance=dict(base.provenance, choices=earlier))
  tuning.write(tmp_path / "base.json", base)
  out = tmp_path / "out.json"
  sweep_device.main(["--dry-run", "--base", str(tmp_path / "base.json"), "--out", str(out), "--fields",
                     "interleave_rows"])
  fields = tuning.load(out).provenance["fields"]
  assert fields["gemm"] == "gemm's note"
  assert fields["interleave_rows"].startswith("measured: ")
  choices = tuning.load(out).provenance["choices"]
  assert [c["field"] for c in choices] == ["interleave_lead", "interleave_rows"] and choices[0]["mark"] == 1
  assert "mark" not in choices[1] and choices[1]["status"] in ("picked", "kept")  # this sweep's record
  joint = [dict(field="a+b", candidates=[], status="kept", base=[1, 2])]
  assert sweep_device.field_notes(joint, 0.02, {"a": "a's note", "c": "c's"}) == {
      "a+b": "measured: [1, 2] kept, no candidate 1.02x as fast. Before, a alone: a's note", "c": "c's"}
  unmeasured = [dict(field="x", candidates=[], status="not measured (time budget)")]
  assert sweep_device.field_notes(unmeasured, 0.02, {"x": "its note"}) == {
      "x": "not measured (time budget): kept from the base (its note)"}


def test_fields_measured_together_share_one_note():
  """Several fields of one run (sweep_levels: batch_min_readers and batch_min_saved_bytes): the note once, under the
  first; the others point to it; a fallback's file names them all as the fields measured here."""
  tune = dataclasses.replace(_h100(), batch_min_readers=3, batch_min_saved_bytes=10)
  pair = ("batch_min_readers", "batch_min_saved_bytes")
  own = tuning.with_measured_field(tuning.file_for(H100), H100, tune, pair, "the note", command="c", date="d",
                                   commit="x")
  assert own.tuning == tune and own.provenance["fields"]["batch_min_readers"] == "the note"
  pointer = "measured with batch_min_readers, in one run: see its note"
  assert own.provenance["fields"]["batch_min_saved_bytes"] == pointer
  other = tuning.with_measured_field(tuning.file_for(H100), "NVIDIA B200", tune, pair, "n", command="c", date="d",
                                     commit="x")
  assert other.provenance["note"].startswith("NOT MEASURED on NVIDIA B200 except the fields batch_min_readers and "
                                             "batch_min_saved_bytes:")
  single = tuning.with_measured_field(tuning.file_for(H100), "NVIDIA B200", tune, "gemm", "n", command="c", date="d",
                                      commit="x")
  assert single.provenance["note"].startswith("NOT MEASURED on NVIDIA B200 except the field gemm:")
  # the device's own file under another spelling of its kind (`file_for` matches them by slug): still its own
  spelt = tuning.with_measured_field(tuning.file_for(H100), H100.lower(), tune, pair, "the note", command="c",
                                     date="d", commit="x")
  assert spelt.provenance == own.provenance


@pytest.mark.slow  # a tuning tool's robustness (CI time)
def test_sweep_stopped_from_outside_keeps_its_choices(tmp_path, monkeypatch):
  """A sweep killed during a choice (a device call's time limit) leaves the file with the choices made so far, and
  the log with every step timed so far."""
  out, log = tmp_path / "partial.json", tmp_path / "steps.jsonl"
  real = sweep_device.run_choice

  def stop_at_the_second(sweep, choice, *a, **kw):
    if choice.field == "interleave_lead":
      assert log.read_text().count("\n") == sweep.timed > 0  # flushed as it goes
      raise KeyboardInterrupt
    return real(sweep, choice, *a, **kw)

  monkeypatch.setattr(sweep_device, "run_choice", stop_at_the_second)
  with pytest.raises(KeyboardInterrupt):
    sweep_device.main(["--dry-run", "--out", str(out), "--log", str(log), "--fields",
                       "hopper_min_fill,interleave_lead"])  # a field of the joint threshold choice picks it
  file = tuning.load(out)
  assert [r["field"] for r in file.provenance["choices"]] == ["hopper_min_work+hopper_min_fill"]
  assert file.provenance["final_check"]["status"].startswith(
      "not run: written after the choice hopper_min_work+hopper_min_fill")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.json", "steps.jsonl"]  # no temporary file left


def test_a_pick_the_final_check_finds_slower_is_not_written(tmp_path, monkeypatch):
  """A choice picked on its own configs (their noise) that the final check over every config finds slower than the
  base was written all the same; now the base's tuning is kept and the check says why. A failed step's ratio is
  written as null (JSON has no Infinity)."""
  out = tmp_path / "slower.json"
  base = tuning.current()

  def picks_lead_09(sweep, choice, tune, configs, min_gain):
    return dataclasses.replace(tune, interleave_lead=0.9), dict(field=choice.field, kernel=choice.kernel,
                                                                  configs=[], base=0.75, untimed=0, picked=0.9,
                                                                  status="picked", candidates=[dict(
                                                                      value=0.9, changed=[], speedup=1.1)])

  slow = lambda self, i, tune, kernel: (math.inf if i == 0 else 2e-4) if tune.interleave_lead == 0.9 else 1e-4  # noqa: E731
  monkeypatch.setattr(sweep_device, "run_choice", picks_lead_09)
  monkeypatch.setattr(sweep_device.Sweep, "time", slow)
  sweep_device.main(["--dry-run", "--out", str(out), "--fields", "interleave_lead"])
  file = tuning.load(out)
  final = file.provenance["final_check"]
  assert final["status"].endswith("slower than the base: the base's tuning kept") and final["speedup"] is None
  assert file.tuning.interleave_lead == base.interleave_lead and None in final["speedups"].values()
  # the notes say the pick was reverted (they said "measured: 0.9 is 1.100x ..." of a file holding 0.75)
  assert file.provenance["choices"][-1]["status"] == "not measured: picked, then reverted by the final check"
  assert file.provenance["fields"]["interleave_lead"].startswith("not measured: picked, then reverted")
  json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the file"))


def test_hopper_config_num_ctas_is_checked():
  """num_ctas=0 gave NaN outputs without an error; -4, 2.5, "8" were accepted."""
  for bad in (0, -4, 2.5, "8", True):
    with pytest.raises(ValueError, match=r"HopperConfig.num_ctas must be None or a positive int"):
      hopper.HopperConfig(num_ctas=bad)
  assert hopper.HopperConfig(num_ctas=132, cluster=2).num_ctas == 132  # (a multiple of the cluster: checked at the call)


@pytest.mark.slow  # a tuning tool's robustness (CI time)
def test_sweep_ends_at_a_step_that_does_not_return(tmp_path, monkeypatch):
  """A step still running after --step-timeout-s (a kernel that never ends: an H100 Hopper candidate did on the
  H200) ends the sweep from the watchdog: the log names the step, the file keeps the choices made before it."""
  out, log = tmp_path / "hung.json", tmp_path / "steps.jsonl"
  real, calls, seen, aborted = sweep_device.Sweep._measure, [], {}, threading.Event()

  def measure(self, i, fn, signature):
    if signature[0] == "triton" and signature[5] == 0.5 and not calls:  # interleave_lead's first candidate
      assert aborted.wait(60)  # "hangs" until the watchdog has acted
    return real(self, i, fn, signature)

  def abort(status):  # the real one ends the process; here the sweep goes on once the file is read
    calls.append(status)
    seen["file"] = tuning.load(out)  # what a stopped process leaves
    aborted.set()

  monkeypatch.setattr(sweep_device.Sweep, "_measure", measure)
  monkeypatch.setattr(sweep_device, "_abort", abort)
  sweep_device.main(["--dry-run", "--out", str(out), "--log", str(log), "--fields", "hopper_min_work,interleave_lead",
                     "--step-timeout-s", "3"])
  assert calls == [3]
  assert [r["field"] for r in seen["file"].provenance["choices"]] == ["hopper_min_work+hopper_min_fill"]
  assert seen["file"].provenance["final_check"]["status"].startswith(
      "not run: the sweep stopped in the choice interleave_lead, whose step did not return within 3 s")
  steps = [json.loads(line) for line in log.read_text().splitlines()]
  assert [s["error"] for s in steps if s["error"]] == ["hung: no result after 3 s"]


class _LogFailingOnce:
  """A log whose first write fails (the watchdog's: it comes before the late step's own)."""

  def __init__(self):
    self.lines = []

  def write(self, line):
    if not self.lines:
      self.lines.append(None)
      raise OSError("disk full")
    self.lines.append(line)

  def flush(self):
    pass


def test_watchdog_ends_the_process_when_its_log_write_fails(monkeypatch):
  """The watchdog's own failure (here: writing its log line) must not leave a stuck sweep running: on_hang, which
  ends the process, still runs."""
  ended, log = threading.Event(), _LogFailingOnce()
  sweep = sweep_device.Sweep(sweep_device.CONFIGS, dry_run=True, deadline=math.inf, log=log, step_timeout_s=0.5,
                             on_hang=ended.set)
  monkeypatch.setattr(sweep_device.Sweep, "_measure", lambda self, i, fn, sig: (ended.wait(60), ([1e-4] * 3, 0.0))[1])
  sweep.time(5, _h100(), "triton")
  assert ended.is_set() and log.lines[0] is None and "triton" in log.lines[1]  # the late step's own line after it


@pytest.mark.gpu
@pytest.mark.skipif(not dispatch.on_hopper(), reason="needs a Hopper GPU (the sweep times the Hopper kernel)")
def test_sweep_times_and_checks_real_steps_on_the_gpu(tmp_path):
  """One choice of the real sweep (the Hopper thresholds, picked by one of their fields: Hopper and Triton steps of
  the configs, each output checked against the first on its config) under a short budget: a measured file, steps
  timed without error."""
  out, log = tmp_path / "gpu.json", tmp_path / "steps.jsonl"
  sweep_device.main(["--out", str(out), "--log", str(log), "--fields", "hopper_min_work", "--budget-s", "90",
                     "--final-s", "20"])
  file = tuning.load(out)
  assert file.measured and file.device_kind == tuning.device_kind()
  steps = [json.loads(line) for line in log.read_text().splitlines()]
  assert steps and not any(s["error"] for s in steps)
  assert all(isinstance(s["seconds"], float) and s["max_err"] is not None for s in steps)
  assert {s["signature"].split("'")[1] for s in steps} == {"triton", "hopper"}


def test_long_prefixes_take_their_own_hopper_settings():
  """`hopper_long` holds (by T·g rows, as `hopper`) from `hopper_long_prefix` keys of prefix, `hopper` below it;
  without it (0, the default) `hopper` holds for every prefix; the JSON form keeps both; bad entries are named."""
  t = _one_setting(_h100())
  short = t.hopper_for(1)
  long = dataclasses.replace(short, prefix_keys=128, q_registers=True, prefix_stages=2, suffix_stages=2)
  assert t.hopper_for(1, 1 << 20) == short  # no long entries
  t2 = dataclasses.replace(t, hopper_long_prefix=8192, hopper_long=((1, long), (2, short)))
  assert [t2.hopper_for(1, p) for p in (0, 4096, 8191, 8192, 65536)] == [short, short, short, long, long]
  assert t2.hopper_for(4, 8192) == short
  assert hopper.tuned_config(t2, rows=1, prefix=16384) == hopper.HopperConfig(**dataclasses.asdict(long))
  assert tuning.from_dict(json.loads(json.dumps(tuning.to_dict(t2)))) == t2
  old_form = tuning.to_dict(t)
  del old_form["hopper_long_prefix"], old_form["hopper_long"]  # a file from before the field
  assert tuning.from_dict(old_form) == t
  with pytest.raises(ValueError, match="hopper_long is given but hopper_long_prefix is 0"):
    dataclasses.replace(t, hopper_long=((1, long),))
  with pytest.raises(ValueError, match=r"Tuning.hopper_long must give .* from rows 1 up.*got rows \[2\]"):
    dataclasses.replace(t, hopper_long_prefix=8192, hopper_long=((2, long),))
  with pytest.raises(ValueError, match="hopper_long_prefix must be an int >= 0"):
    dataclasses.replace(t, hopper_long_prefix=-1)
  with pytest.raises(ValueError, match=r"prefix an int >= 0 \(keys\); got rows=1, prefix=-5"):
    t2.hopper_for(1, -5)
  # a later change of `hopper` (a sweep of rows 2-8): the long rows that were copies follow, row 1's own stays
  wide = dataclasses.replace(short, suffix_keys=128, q_registers=True, prefix_stages=2, suffix_stages=2)
  t3 = t2.with_hopper(2, 8, wide)
  assert [t3.hopper_for(r, 1 << 20) for r in (1, 2, 8, 9)] == [long, wide, wide, short]
  assert [t3.hopper_for(r) for r in (1, 2, 8, 9)] == [short, wide, wide, short]
  assert t3.with_hopper(1, 1, wide).hopper_for(1, 1 << 20) == long  # row 1's long setting is its own
  with pytest.raises(ValueError, match="suffix_box needs suffix_pack"):
    dataclasses.replace(short, suffix_box=True)


@pytest.mark.parametrize("kind", tuning.known_kinds())
def test_shipped_long_settings_end_where_their_measurements_end(kind):
  """The long-prefix settings were measured up to T·g = 8: above it each shipped file takes its hopper[9] setting
  whatever the prefix (the H100 file's hopper_long[4] was open-ended: T·g 9-48 took the T·g = 4 long setting)."""
  t = tuning.file_for(kind).tuning
  for rows in (9, 16, 48):
    assert t.hopper_for(rows, t.hopper_long_prefix) == t.hopper_for(rows, 0) == t.hopper_for(9), (kind, rows)


def test_sweep_times_the_merge_as_the_api_merges():
  """The sweep's steps merge their parts as the API would under the candidate tuning: the Triton kernels' by the
  merge kernel up to `merge_max_rows` query rows (the signature says which), the Hopper kernel's by `merge_states`
  whatever the tuning (one signature); and `merge_max_rows` is one of its choices."""
  sweep = sweep_device.Sweep(sweep_device.CONFIGS, dry_run=True, deadline=math.inf)
  rows = sweep_device.CONFIGS[0][0] * sweep_device.CONFIGS[0][3]  # B·Hq of seed row 0 (T = 1)
  on, off = (dataclasses.replace(_h100(), merge_max_rows=m) for m in (rows, rows - 1))
  structs = (*sweep.structs(0), jax.ShapeDtypeStruct((rows // sweep_device.CONFIGS[0][3],), jnp.int32))
  sig_on, sig_off = sweep.signature(0, on, "triton"), sweep.signature(0, off, "triton")
  assert sig_on[-1] == "pallas" and sig_off[-1] == "xla" and sig_on[:-1] == sig_off[:-1]
  assert "hydragen_merge" in str(jax.make_jaxpr(sweep.step(sig_on, on))(*structs))
  assert "hydragen_merge" not in str(jax.make_jaxpr(sweep.step(sig_off, off))(*structs))
  sig_on, sig_off = sweep.signature(0, on, "hopper"), sweep.signature(0, off, "hopper")
  assert sig_on == sig_off and sig_on[0] == "hopper"
  assert "hydragen_merge" not in str(jax.make_jaxpr(sweep.step(sig_on, on))(*structs))
  fields = [c.field for c in sweep_device.choices(sweep_device.CONFIGS, sweep_device.GROUPS)]
  assert "merge_max_rows" in fields


BOOL_FIELDS = ("pair_write", "write_in_attention")  # the models' cache-write switches


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("bad", [1, 0, "true", None])
def test_a_switch_must_be_a_bool(field, bad):
  with pytest.raises(ValueError, match=rf"{field} must be true or false"):
    dataclasses.replace(tuning.current(), **{field: bad})


@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_a_switch_round_trips_and_defaults_to_off(field):
  tune = dataclasses.replace(tuning.current(), **{field: True})
  assert getattr(tuning.from_dict(tuning.to_dict(tune)), field) is True
  data = tuning.to_dict(tune)
  del data[field]  # a file written before the field: off
  assert getattr(tuning.from_dict(data), field) is False


def test_ci_runs_the_tests_of_the_options_a_shipped_file_sets(monkeypatch):
  """tests/conftest.ci_if_shipped: a kernel option (of `Tuning` or of a Hopper setting) that no shipped tuning file
  sets marks its tests slow (CI leaves them to --all and the GPU); a file that turns it on brings them back into
  CI (whatever today's files set: each direction from files made so)."""
  from tests.conftest import ci_if_shipped  # noqa: PLC0415

  real = tuning.file_for
  hopper_fields = {f.name for f in dataclasses.fields(tuning.HopperTuning)}

  def files(**change):
    hopper_change = {k: v for k, v in change.items() if k in hopper_fields}
    top = {k: v for k, v in change.items() if k not in hopper_fields}
    changed = lambda entries: tuple((rows, dataclasses.replace(s, **hopper_change)) for rows, s in entries)

    def file_for(kind):
      file = real(kind)
      t = file.tuning
      return dataclasses.replace(file, tuning=dataclasses.replace(t, hopper=changed(t.hopper),
                                                                  hopper_long=changed(t.hopper_long), **top))
    return file_for

  defaults = {f.name: f.default for cls in (tuning.HopperTuning, tuning.Tuning) for f in dataclasses.fields(cls)}
  for field, on in (("suffix_early_keys", True), ("cluster", 2), ("launch_merge_max_rows", 64), ("pair_write", True)):
    monkeypatch.setattr(tuning, "file_for", files(**{field: defaults[field]}))
    assert ci_if_shipped(field).name == "slow", field
    monkeypatch.setattr(tuning, "file_for", files(**{field: on}))
    assert ci_if_shipped(field).name == "shipped" and ci_if_shipped(field).args == (field,), field


@pytest.mark.filterwarnings("ignore:hydragen_jax. no tuning file")
def test_a_partial_sweep_from_another_devices_base_is_not_this_devices_measurement(tmp_path, monkeypatch):
  """A sweep of some choices on a base of another device kind (here the CPU's fallback, the H100's) wrote
  measured_on = this device, as if the whole file were measured here; now, as `with_measured_field` does, the file
  says which fields were measured here and is not marked measured."""
  monkeypatch.setattr(sweep_device.Sweep, "_measure", lambda self, i, fn, signature: ([1e-4] * 3, 0.0))
  out = tmp_path / "partial.json"
  sweep_device.main(["--out", str(out), "--fields", "interleave_lead", "--budget-s", "100", "--final-s", "10"])
  file = tuning.load(out)
  assert file.provenance["steps_timed"] > 0 and file.provenance["measured_on"] is None
  assert file.provenance["note"].startswith(f"NOT MEASURED on {tuning.device_kind()} except ['interleave_lead']")
