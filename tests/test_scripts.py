"""The GPU-side tools run on CPU with tiny shapes, so that a device call never finds them broken: the decode-step
profile (`scripts/profile_decode.py`) and the tensor-parallel probe (`scripts/tuning/probe_tp.py`, on 2 host
devices). Their numbers mean nothing here (no GPU kernels to time); their plumbing is what is checked."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
import re
import pathlib
import shutil
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
  environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  environ.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env)
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                        timeout=300)


def test_profile_decode_runs_each_mode_and_refuses_demo_with_tp(monkeypatch, capsys, tmp_path):
  hlo = tmp_path / "not" / "yet"  # --hlo makes its folder
  p = _run(["scripts.profile_decode", "--tiny", "--layers", "2", "--batch", "4", "--prefix", "16", "--generate", "8",
            "--at", "2", "--steps", "2", "--modes", "hydragen,none",
            "--tuning", "default,hydragen_jax/tuning/nvidia-h100-80gb-hbm3.json", "--hlo", str(hlo)])
  assert p.returncode == 0, p.stderr[-2000:]
  assert sorted(f.name for f in hlo.iterdir()) == [
      "decode-hydragen-nvidia-h100-80gb-hbm3-tp1-B4.hlo.gz", "decode-hydragen-tp1-B4.hlo.gz",
      "decode-none-nvidia-h100-80gb-hbm3-tp1-B4.hlo.gz", "decode-none-tp1-B4.hlo.gz"], list(hlo.iterdir())
  lines = [line for line in p.stdout.splitlines() if line.startswith("[")]
  assert [line.split("]")[0] for line in lines] == ["[hydragen", "[hydragen @ nvidia-h100-80gb-hbm3", "[none",
                                                    "[none @ nvidia-h100-80gb-hbm3"], p.stdout
  assert all("merge" in line and "all-reduce" in line and "compile" in line for line in lines)
  assert p.stdout.count("GPU idle between kernels") == 4, p.stdout
  from scripts import profile_decode  # noqa: PLC0415 (the refusal comes before any work: no process needed)

  monkeypatch.setattr(sys, "argv", ["profile_decode", "--demo", "2", "--tp", "2"])
  with pytest.raises(SystemExit) as exit_:
    profile_decode.main()
  assert exit_.value.code == 2 and "--demo profiles the demo's model on one device" in capsys.readouterr().err


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_profile_decode_reads_the_levels_as_the_model_does():
  """The attention-alone timing builds each layer's levels inside its jitted step from the cache, so the shared
  levels' node maps stay numpy (the kernels bound a node's readers on the host); passed as traced arguments they
  sized every node's rows for the whole batch (twice the model's programs on the demo's second level)."""
  import models  # noqa: PLC0415
  from models.config import LlamaConfig  # noqa: PLC0415
  from scripts.profile_decode import cache_levels  # noqa: PLC0415

  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
  state = models.prefill(models.init_random(cfg, jnp.float32, 0), [[1, 2, 3, 4], [1, 2, 3, 5], [1, 6, 7], [1, 6, 8]],
                         2, mode="hydragen", backend="xla")
  seen = []

  @jax.jit
  def step(cache):
    levels = cache_levels(cache)
    seen.append([(type(level.seq_to_node), level.k.shape) for level in levels[1]])
    return levels[1][-1].k

  step(state.cache)
  shared = state.cache.shared
  assert len(seen[0]) == len(shared) + 1 >= 3  # the root, the two branches, the suffixes
  assert all(kind is np.ndarray for kind, _ in seen[0][:-1]), seen
  assert [shape for _, shape in seen[0][:-1]] == [lc.k[1].shape for lc in shared]


def test_profile_decode_write_profiles_each_cache_write(tmp_path):
  """`--write 0,8`: the decode step with XLA's scatters, then with the cache-write kernel (its compiled step holds
  the kernel, the other's not)."""
  hlo = tmp_path / "hlo"
  p = _run(["scripts.profile_decode", "--tiny", "--layers", "2", "--batch", "4", "--prefix", "16", "--generate", "8",
            "--at", "2", "--steps", "2", "--modes", "hydragen", "--backend", "interpret", "--write", "0,8",
            "--hlo", str(hlo)])
  assert p.returncode == 0, p.stderr[-2000:]
  lines = [line.split("]")[0] for line in p.stdout.splitlines() if line.startswith("[")]
  assert lines == ["[hydragen @ default write<=0", "[hydragen @ default write<=8"], p.stdout
  holds = {f.name: "kv_write" in gzip.open(f, "rt").read() for f in hlo.iterdir()}
  assert holds == {"decode-hydragen-default-write-0-tp1-B4.hlo.gz": False,
                   "decode-hydragen-default-write-8-tp1-B4.hlo.gz": True}, holds


def test_with_field_sets_a_scalar_tuning_field_by_its_type():
  """`--field NAME=V`: the value read as the field's type; other fields, bad values and values the Tuning refuses
  named."""
  from hydragen_jax import tuning as tuning_lib  # noqa: PLC0415
  from scripts.profile_decode import with_field  # noqa: PLC0415

  base = tuning_lib.for_device_kind("NVIDIA H100 80GB HBM3")
  assert with_field(base, "pair_write", "false").pair_write is False
  assert with_field(base, "pair_write", "1").pair_write is True
  assert with_field(base, "merge_rows", "4").merge_rows == 4
  assert with_field(base, "hopper_min_fill", "0.5").hopper_min_fill == 0.5
  assert with_field(base, "merge_rows", "4") != base and with_field(base, "merge_rows", "4").merge_max_rows == \
      base.merge_max_rows
  for name, text, match in (("pair_write", "yes", "expected true, false"), ("merge_rows", "1.5", "expected a value of type int"),
                            ("hopper", "1", "not a scalar field"), ("nope", "1", "not a scalar field"),
                            ("merge_rows", "3", "merge_rows")):
    with pytest.raises(ValueError, match=match):
      with_field(base, name, text)


def test_profile_decode_field_profiles_each_value():
  """`--field merge_rows=2,1`: the step profiled once with each value (labelled by it); a field that is not a
  scalar of the tuning is a usage error."""
  args = ["scripts.profile_decode", "--tiny", "--layers", "1", "--batch", "2", "--prefix", "8", "--generate", "4",
          "--at", "1", "--steps", "1", "--modes", "none"]
  p = _run(args + ["--field", "merge_rows=2,1"])
  assert p.returncode == 0, p.stderr[-2000:]
  assert [line.split("]")[0] for line in p.stdout.splitlines() if line.startswith("[")] == [
      "[none @ default merge_rows=2", "[none @ default merge_rows=1"], p.stdout
  p = _run(args + ["--field", "tiles=1"])
  assert p.returncode == 2 and "not a scalar field" in p.stderr, p.stderr[-2000:]


_TINY_PROFILE = ["--tiny", "--layers", "1", "--batch", "1", "--prefix", "8", "--generate", "4", "--at", "1",
                 "--steps", "1", "--modes", "none"]


@pytest.mark.parametrize("extra, message", [
    (["--batch", "0"], "--batch 0: expected an integer >= 1"),
    (["--layers", "0"], "--layers 0: expected an integer >= 1"),
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),  # was a ZeroDivisionError after the profile
    (["--steps", "-1"], "--steps -1: expected an integer >= 1"),  # was a run that printed negative times
    (["--at", "-1"], "--at -1: expected an integer >= 0"),
    (["--at", "3", "--steps", "2"], "expected --at + --steps <= --generate"),  # the loop ran 1 step, divided by 2
    (["--modes", "bogus"], "--modes 'bogus': unknown ['bogus']; expected some of hydragen"),
    (["--modes", "none,none"], "--modes 'none,none': a value given twice"),
    (["--modes", "none,"], "--modes 'none,': expected comma-separated values; got ''"),
    (["--tuning", "no/such.json"], "--tuning 'no/such.json': expected a tuning file"),
    (["--tuning", "default,default"], "--tuning 'default,default': a value given twice"),
    (["--gemm", "a"], "--gemm 'a': expected comma-separated integers >= 0; got 'a'"),
    (["--gemm", "0,0"], "--gemm '0,0': a value given twice"),
    (["--gemm", "1000"], "--gemm 1000: GemmTuning.max_rows must be an int in [0, 128]"),
    (["--write", "-5"], "--write '-5': expected comma-separated integers >= 0"),
    (["--field", "merge_rows"], "--field 'merge_rows': expected NAME=V1[,V2...]"),
    (["--field", "merge_rows=2,2"], "--field merge_rows '2,2': a value given twice"),
    (["--field", "merge_rows=1", "--field", "merge_rows=2"], "--field: a field given twice"),
    (["--field", "merge_rows=3"], "--field merge_rows=3: Tuning.merge_rows must be a power of two"),
    (["--top", "-1"], "--top -1: expected an integer >= 0"),
    (["--tp", "0"], "--tp 0: expected an integer >= 1"),
    (["--tp", str(len(jax.devices()) + 1)], f"--tp {len(jax.devices()) + 1}: make_mesh: devices must be"),
    (["--demo", "-1"], "--demo -1: expected an integer >= 0"),
    (["--hlo", __file__], "expected a folder (made if missing); got a file"),
])
def test_profile_decode_refuses_bad_option_values(monkeypatch, capsys, extra, message):
  """A value the profile cannot take is a usage error naming the option, the value and what is expected (exit 2),
  before any model is built: not a traceback, and not a run that divides by steps it did not take."""
  from scripts import profile_decode  # noqa: PLC0415

  monkeypatch.setattr(sys, "argv", ["profile_decode", *_TINY_PROFILE, *extra])
  with pytest.raises(SystemExit) as exit_:
    profile_decode.main()
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and message in err.splitlines()[-1], err


def test_profile_decode_refuses_gpu_backends_on_a_cpu():
  p = _run(["scripts.profile_decode", *_TINY_PROFILE, "--backend", "pallas"])
  assert p.returncode == 2 and "--backend pallas: compiles GPU kernels, and this machine has no GPU (cpu)" in \
      p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("argv, message", [
    (["--configs", "9"], "--configs '9': expected indices of the seed configs, 0 to 8; got ['9']"),
    (["--configs", "-1"], "got ['-1']"),  # was config 8, silently
    (["--configs", "0,0"], "--configs '0,0': a value given twice"),
    (["--variants", "hydragen,bogus"], "--variants 'hydragen,bogus': unknown ['bogus']"),  # was timed as hydragen
    (["--variants", "reference,reference"], "a value given twice"),
    (["--configs", "0"], "quick_bench: times compiled GPU kernels, and this machine has no GPU (cpu)"),
])
def test_quick_bench_refuses_bad_options_and_a_cpu(argv, message):
  """Bad --configs / --variants are usage errors (they were an IndexError after minutes of machine_rates, or an
  unknown variant timed as hydragen); on a CPU it says it needs a GPU (it ran a 1 GiB copy and 8K x 8K matmuls for
  minutes, then failed every variant)."""
  p = _run(["scripts.quick_bench", *argv])
  assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]


def test_same_hlo_refuses_bad_arguments_and_names_a_tree_that_cannot_dump(monkeypatch, capsys):
  """An unknown revision or family is a usage error (was a CalledProcessError traceback, exit 1: the status of
  "different"); a tree whose dump fails (a base revision without the family) is one line naming it, exit 2."""
  from scripts import same_hlo  # noqa: PLC0415

  for argv, message in ((["no-such-revision"], "base 'no-such-revision': not a revision of this repository"),
                        (["HEAD", "--families", "bogus"], "--families 'bogus': unknown ['bogus']"),
                        (["HEAD", "--families", "llama,llama"], "--families 'llama,llama': a family given twice")):
    with pytest.raises(SystemExit) as exit_:
      same_hlo.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
  monkeypatch.setattr(same_hlo, "DUMP", "raise SystemExit('ValueError: no llama here')")
  assert same_hlo.main(["HEAD", "--families", "llama"]) == 2
  assert capsys.readouterr().err.strip() == \
      "same_hlo: the llama programs of HEAD could not be made: ValueError: no llama here"


@pytest.mark.slow
def test_same_hlo_dumps_this_tree():
  """The dump runs on the current code (it called a private helper whose signature changed, and every comparison
  failed with "could not be made"): programs of every mode, lowered and compiled."""
  from scripts import same_hlo  # noqa: PLC0415

  text = same_hlo.programs(same_hlo.ROOT, "llama")
  assert sum(line.startswith("module @jit__prefill") for line in text) == 8, [l for l in text if "module @" in l]


def test_gpu_check_runs_in_its_repository_from_anywhere_and_fails_with_its_tests(tmp_path):
  """`bash scripts/gpu_check.sh` from another folder (the repository's path with a space) runs pytest and the quick
  benchmark in the repository with it on PYTHONPATH, writes to a relative OUT of the caller's folder, and exits
  with the tests' status (it was the benchmark's: 0 with failing tests). nvidia-smi and python3 are stubs here."""
  repo, stubs, elsewhere = tmp_path / "a repo", tmp_path / "stubs", tmp_path / "elsewhere"
  for d in (repo / "scripts", stubs, elsewhere):
    d.mkdir(parents=True)
  (repo / "scripts" / "gpu_check.sh").write_text((ROOT / "scripts" / "gpu_check.sh").read_text())
  (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100, 80 GiB'\n")
  (stubs / "python3").write_text('#!/bin/sh\necho "ran in $PWD with $PYTHONPATH: $*" >> "$LOG"\n'
                                 'case "$*" in *pytest*) exit 3;; esac\n')
  for stub in stubs.iterdir():
    stub.chmod(0o755)
  log = tmp_path / "log"
  env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", LOG=str(log), OUT="out")
  p = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh")], cwd=elsewhere, env=env, capture_output=True,
                     text=True, timeout=60)
  lines = log.read_text().splitlines()
  assert [line.split(": ")[1].split()[:3] for line in lines] == [["-c", "import", "jax;"], ["-m", "pytest", "-q"],
                                                                  ["-m", "scripts.quick_bench"]], lines
  assert all(line.startswith(f"ran in {repo} with {repo}:") for line in lines), lines
  assert p.returncode == 3, (p.returncode, p.stderr)
  assert (elsewhere / "out" / "device.txt").read_text().startswith("NVIDIA H100")
  # the set-up's .venv where it imports jax (it ran python3, which may have no jax); OUT by default in the repository
  venv = repo / ".venv" / "bin" / "python"
  venv.parent.mkdir(parents=True)
  venv.write_text('#!/bin/sh\necho "venv: $*" >> "$LOG"\n')
  venv.chmod(0o755)
  log.unlink()
  env.pop("OUT")
  subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh")], cwd=elsewhere, env=env, capture_output=True,
                 text=True, timeout=60)
  assert [line.split()[:2] for line in log.read_text().splitlines()] == [
      ["venv:", "-c"], ["venv:", "-c"], ["venv:", "-m"], ["venv:", "-m"]], log.read_text()
  assert (repo / "gpu_check_out" / "device.txt").exists()


def _stub(path: pathlib.Path, body: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


def test_setup_remakes_a_venv_of_an_older_python_and_refuses_a_bad_python(tmp_path):
  """A .venv made with Python 3.11 is made again with --clear (venv without it kept the old interpreter, so every
  later set-up failed the same way); PYTHON that is not a Python >= 3.12 is refused by name (it was passed over).
  Stubs stand in for the interpreters and pip."""
  repo = tmp_path / "repo"
  (repo / "scripts").mkdir(parents=True)
  shutil.copy(ROOT / "scripts" / "setup_env.sh", repo / "scripts")
  log = tmp_path / "log"
  _stub(repo / ".venv" / "bin" / "python", 'case "$*" in --version) echo "Python 3.11.7"; exit 0;; esac\nexit 1\n')
  good_venv = 'echo "venv python $*" >> "$LOG"; exit 0'  # imports, pip: all succeed
  _stub(tmp_path / "py312", f'echo "base $*" >> "$LOG"\ncase "$*" in *venv*)\n'
        f"  mkdir -p .venv/bin; printf '#!/usr/bin/env bash\\n{good_venv}\\n' > .venv/bin/python\n"
        "  chmod +x .venv/bin/python;;\nesac\nexit 0\n")
  env = dict(os.environ, PYTHON=str(tmp_path / "py312"), LOG=str(log))
  p = subprocess.run(["bash", "-c", "source scripts/setup_env.sh"], cwd=repo, env=env, capture_output=True, text=True,
                     timeout=60)
  assert p.returncode == 0, p.stderr
  assert "setup_env: .venv is not a Python >= 3.12 (Python 3.11.7): made again with" in p.stderr, p.stderr
  assert "base -m venv --clear .venv" in log.read_text(), log.read_text()
  shutil.rmtree(repo / ".venv")
  p = subprocess.run(["bash", "-c", "source scripts/setup_env.sh"], cwd=repo, capture_output=True, text=True,
                     timeout=60, env=dict(env, PYTHON="/no/such/python3.12"))
  assert p.returncode != 0 and "setup_env: PYTHON=/no/such/python3.12 is not found or not a Python >= 3.12" in \
      p.stderr, p.stderr
  (repo / "sub").mkdir()  # a relative PYTHON is the caller's (it was looked up after the set-up's cd)
  p = subprocess.run(["bash", "-c", "source ../scripts/setup_env.sh"], cwd=repo / "sub", capture_output=True,
                     text=True, timeout=60, env=dict(env, PYTHON="../../py312"))
  assert p.returncode == 0 and (repo / ".venv" / "bin" / "python").exists(), p.stderr


def test_setup_installs_the_cuda_build_into_a_cpu_venv_when_asked(tmp_path):
  """HYDRAGEN_JAX_CUDA=1 on a ready .venv without JAX's CUDA plugin installs jax[cuda13] (it kept the CPU build);
  without the variable, or with the plugin there, nothing is installed. A stub stands in for the venv's Python."""
  repo = tmp_path / "repo"
  (repo / "scripts").mkdir(parents=True)
  shutil.copy(ROOT / "scripts" / "setup_env.sh", repo / "scripts")
  log = tmp_path / "log"
  for plugin, cuda, installs in ((False, "1", True), (False, "0", False), (True, "1", False)):
    _stub(repo / ".venv" / "bin" / "python", 'echo "$*" >> "$LOG"\n'
          + ("" if plugin else 'case "$*" in *jax-cuda13-plugin*) exit 1;; esac\n') + "exit 0\n")
    log.write_text("")
    p = subprocess.run(["bash", "-c", "source scripts/setup_env.sh"], cwd=repo, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, LOG=str(log), HYDRAGEN_JAX_CUDA=cuda))
    assert p.returncode == 0, p.stderr
    assert ("-m pip install -q jax[cuda13]==0.11.2 jaxlib==0.11.2" in log.read_text()) == installs, log.read_text()
    assert ("HYDRAGEN_JAX_CUDA=1 and .venv has JAX's CPU build" in p.stderr) == installs, p.stderr


def test_test_sh_takes_paths_relative_to_where_it_is_called():
  """`bash ../scripts/test.sh test_readme.py ...` from tests/ runs that file (pytest runs in the repository's folder,
  where the caller's relative path named nothing: "file or directory not found"); --deselect's test id is the
  caller's too; -k's expression is left as it is, though it names a file there."""
  p = subprocess.run(["bash", "../scripts/test.sh", "test_readme.py", "-k", "test_readme.py", "--deselect",
                      "test_readme.py::test_generate_example_runs_on_a_saved_checkpoint", "-n", "0"],
                     cwd=ROOT / "tests", capture_output=True, text=True, timeout=300)
  assert p.returncode == 0 and "1 passed, 1 deselected" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]


def test_alone_text_compares_the_models_attention_with_it_alone():
  """The profile line's ratio: the model's attention kernels, merge and cache write against the attention alone."""
  from scripts.profile_decode import alone_text  # noqa: PLC0415

  parts = {"gemm": 100.0, "attention": 36.0, "merge": 3.0, "cache write": 4.0, "rest": 20.0}
  assert alone_text(parts, 40e-6) == "attention alone 40.0 us (in the model with merge and write 43.0: 1.07x)"
  assert alone_text(parts, 0.0) == "attention alone n/a"


def test_idle_gaps_between_kernels():
  """The profile's idle time: the stretches with no kernel running (overlapping kernels of two streams are one busy
  stretch), split into short and long gaps per step."""
  from scripts.profile_decode import idle_line  # noqa: PLC0415
  from scripts.tuning.profile_step import idle_gaps, per_kernel  # noqa: PLC0415

  events = [(0, 10_000, "a"), (12_000, 20_000, "b"), (15_000, 30_000, "c"), (16_000, 18_000, "e"),
            (31_000, 40_000, "a"), (100_000, 101_000, "d")]  # c overlaps b, e lies inside c (other streams)
  gaps = idle_gaps(events)
  assert gaps == [(2_000, "b"), (1_000, "a"), (60_000, "d")]
  assert per_kernel(events) == ({"a": 19_000, "b": 8_000, "c": 15_000, "e": 2_000, "d": 1_000},
                                {"a": 2, "b": 1, "c": 1, "e": 1, "d": 1})
  line = idle_line(gaps, steps=1, calls=1)
  assert line.startswith("GPU idle between kernels 63 us a step: 2 gaps under 20 us a step (3 us, median 2.0 us); "
                         "1 over 20 us in 1 traced call (60 us)")
  assert line.endswith("largest 60 us before d")
  assert idle_gaps([]) == [] and "0 gaps under" in idle_line([], steps=4, calls=2)


def test_profile_parts_of_kernel_names():
  """Kernel names (XLA fusions, cuBLAS, Pallas, collectives) -> the profile's parts; XLA's own all-reduce kernels
  are named after the psum (`psum_64_0_fusion_1` in the TP = 2 profile), not "all-reduce"."""
  from scripts.profile_decode import classify  # noqa: PLC0415

  assert [classify(n) for n in ("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT", "gemm_fusion_dot_453",
                                "_lambda__mosaic_gpu_kernel", "hydragen_fused_levels", "input_scatter_fusion_32",
                                "psum_64_0_fusion_1", "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "all-reduce-start",
                                "loop_multiply_fusion_31", "hydragen_kv_write", "hydragen_merge")] == [
      "gemm", "gemm", "attention", "attention", "cache write", "all-reduce", "all-reduce", "all-reduce", "rest",
      "cache write", "merge"]


def test_profile_names_xla_merge_fusions_by_their_op():
  """XLA's fusions of `merge_states` are named after what they compute (`loop_convert_fusion_7`): the compiled
  module's metadata says they are the merge (the profile's kernel name is the instruction's, "." as "_"); other
  fusions keep their part by name. (Lines as the H100's compiled 7B decode loop writes them, 2026-12-06.)"""
  from scripts.profile_decode import classify, kernel_ops  # noqa: PLC0415

  hlo = """
  %loop_select_fusion.8 = f32[64,1,32]{2,1,0} fusion(%a, %b), kind=kLoop, calls=%fused_select.8, metadata={op_name="jit(_decode_impl)/while/body/jit(merge_states)/jit(_where)/select_n" deduplicated_name="loop_select_fusion.1"}
  %loop_convert_fusion.7 = bf16[64,1,32,128]{3,2,1,0} fusion(%c, %d), kind=kLoop, calls=%fused_convert.7, metadata={op_name="jit(_decode_impl)/while/body/jit(merge_states)/convert_element_type"}
  %input_scatter_fusion.7 = (bf16[64,144,32,128]{3,2,1,0}) fusion(%e), kind=kInput, metadata={op_name="jit(_decode_impl)/while/body/kv_pair_scatter"}
  ROOT %loop_select_fusion = bf16[64,1,4096]{2,1,0} fusion(%f), kind=kLoop, metadata={op_name="jit(_decode_impl)/while/body/jit(_where)/select_n"}
  %bitcast.1 = bf16[2048,128]{1,0} bitcast(%g)
"""
  ops = kernel_ops(hlo)
  assert ops == {"loop_select_fusion_8": "jit(_decode_impl)/while/body/jit(merge_states)/jit(_where)/select_n",
                 "loop_convert_fusion_7": "jit(_decode_impl)/while/body/jit(merge_states)/convert_element_type",
                 "input_scatter_fusion_7": "jit(_decode_impl)/while/body/kv_pair_scatter",
                 "loop_select_fusion": "jit(_decode_impl)/while/body/jit(_where)/select_n"}
  names = ("loop_select_fusion_8", "loop_convert_fusion_7", "input_scatter_fusion_7", "loop_select_fusion",
           "hydragen_fused_levels", "bitcast_1")
  assert [classify(n, ops) for n in names] == ["merge", "merge", "cache write", "rest", "attention", "rest"]
  assert [classify(n) for n in names[:2]] == ["rest", "rest"]  # by name alone they are not the merge


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_call_fits_per_call_and_per_step_costs():
  p = _run(["scripts.tuning.probe_call", "--tiny", "--layers", "2", "--batch", "4", "--prefix", "16", "--at", "2",
            "--steps", "1,3", "--repeats", "2", "--modes", "none,hydragen", "--gemm", "0,16"])
  assert p.returncode == 0, p.stderr[-2000:]
  fits = [line for line in p.stdout.splitlines() if "fit: per call" in line]
  assert [line.split("]")[0] for line in fits] == ["[none gemm<=0", "[none gemm<=16", "[hydragen gemm<=0",
                                                   "[hydragen gemm<=16"], p.stdout
  walls = [line for line in p.stdout.splitlines() if "] wall" in line]
  assert all("k=1:" in line and "k=3:" in line for line in walls)
  assert [line.split("(gemm rows ")[1] for line in walls] == ["1..0)", "1..16)", "1..0)", "1..16)"]  # the override


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_call_makes_each_kind_of_state():
  """`--reset`: each kind timed in turn; every call takes its k steps (the probe checks: `chain` moves on a call at
  a time, so the generation must leave room for all of them); an unknown kind is refused by name."""
  p = _run(["scripts.tuning.probe_call", "--tiny", "--layers", "2", "--batch", "4", "--prefix", "16", "--at", "2",
            "--steps", "1,3", "--repeats", "2", "--modes", "hydragen", "--reset", "fresh,inplace,chain"])
  assert p.returncode == 0, p.stderr[-2000:]
  fits = [line.split("]")[0] for line in p.stdout.splitlines() if "fit: per call" in line]
  assert fits == ["[hydragen fresh", "[hydragen inplace", "[hydragen chain"], p.stdout
  p = _run(["scripts.tuning.probe_call", "--tiny", "--reset", "fresh,again"])
  assert p.returncode == 2 and "--reset 'fresh,again': unknown ['again']" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_host_times_each_loop_kind_and_reads_the_host_events():
  p = _run(["scripts.tuning.probe_host", "--tiny", "--layers", "2", "--batch", "4", "--prefix", "16", "--at", "2",
            "--steps", "3", "--modes", "none", "--loops", "while,fixed", "--calls", "1", "--untraced", "2"])
  assert p.returncode == 0, p.stderr[-2000:]
  ab = [line for line in p.stdout.splitlines() if "untraced, alternated" in line]
  assert len(ab) == 1 and all(f"{loop} " in ab[0] for loop in ("while", "fixed")), p.stdout
  calls = [line for line in p.stdout.splitlines() if line.strip().startswith("call 0:")]
  assert len(calls) == 2 and all("host events" in line for line in calls), p.stdout
  assert "host events by name" in p.stdout


def test_probe_flags_settings_are_flags_this_xla_knows():
  """XLA aborts a process on an unknown flag or enum value: every setting of probe_flags must parse."""
  from scripts.tuning.probe_flags import SETTINGS  # noqa: PLC0415

  _assert_xla_takes(dict.fromkeys(f for flag in SETTINGS.values() for f in flag.split()))


def _assert_xla_takes(flags) -> None:
  """A process with all of `flags` in XLA_FLAGS runs a jitted op (XLA aborts on a flag or value it does not know)."""
  code = "import jax.numpy as jnp; print(float((jnp.ones(2) + 1).sum()))"
  environ = dict(os.environ)
  environ.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
  q = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120)
  assert q.returncode == 0 and q.stdout.strip() == "4.0", q.stderr[-2000:]


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_flags_times_each_setting_in_a_process_of_its_own():
  p = _run(["scripts.tuning.probe_flags", "--tiny", "--layers", "2", "--batches", "4", "--calls", "1", "--steps", "2",
            "--modes", "none", "--settings", "base,concurrent,mine=--xla_gpu_enable_pdl=true"])
  assert p.returncode == 0, p.stderr[-2000:]
  runs = [line for line in p.stdout.splitlines() if line.startswith("== B=4")]
  assert [line.split()[4] for line in runs] == ["base", "concurrent", "mine"], p.stdout
  assert all("rc=0" in line and "none " in line for line in runs), p.stdout
  [table] = [line for line in p.stdout.splitlines() if line.strip().startswith("B=4 none:")]
  assert "base" in table and "concurrent" in table and "mine" in table and "(1.000)" in table, p.stdout


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_tp_writes_a_row_per_measurement(tmp_path):
  out = tmp_path / "probe.jsonl"
  p = _run(["scripts.tuning.probe_tp", "--small", "--settings", "base", "--batches", "8", "--steps", "2", "--nopsum",
            "--out", str(out)], XLA_FLAGS="--xla_force_host_platform_device_count=2")
  assert p.returncode == 0, p.stderr[-2000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  got = {(r["setting"], r["what"], r.get("variant")) for r in rows}
  assert got == {("tp1", "allreduce", None), ("tp1", "stack", "psum"), ("base", "allreduce", None),
                 ("base", "stack", "psum"), ("base", "stack", "psum_halves"), ("base", "stack", "nopsum")}
  stack = {r["variant"]: r for r in rows if r["setting"] == "base" and r["what"] == "stack"}
  assert stack["psum"]["all_reduce_ops"] > 0 and stack["nopsum"]["all_reduce_ops"] == 0
  assert all(r["step_ms"] > 0 for r in stack.values())


def test_probe_tp_settings_are_flags_this_xla_knows():
  """XLA aborts a process on an unknown flag: every setting the probe offers must parse (one process, all flags)."""
  from scripts.tuning.probe_tp import SETTINGS  # noqa: PLC0415

  _assert_xla_takes(dict.fromkeys(f for flag, _ in SETTINGS.values() for f in flag.split()))


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_the_field_sweeps_start_from_the_tuning_in_force(monkeypatch, tmp_path):
  """`sweep_gemm`, `sweep_levels` and `sweep_device` start from --base, else the file HYDRAGEN_JAX_TUNING names,
  else the device's: started from the device's file, a sweep wrote the package's values over a user's own file's
  other fields."""
  import dataclasses  # noqa: PLC0415

  from hydragen_jax import tuning  # noqa: PLC0415
  from scripts.tuning import field_sweep  # noqa: PLC0415

  kind = tuning.device_kind()
  base = tuning.file_for(kind)
  mine = dataclasses.replace(base, tuning=dataclasses.replace(base.tuning, interleave_rows=777))
  tuning.write(tmp_path / "mine.json", mine)
  monkeypatch.delenv(tuning.TUNING_ENV, raising=False)
  assert field_sweep.base_file(None, kind) == base
  assert field_sweep.base_file(str(tmp_path / "mine.json"), kind) == mine
  monkeypatch.setenv(tuning.TUNING_ENV, str(tmp_path / "mine.json"))
  assert field_sweep.Run.begin("sweep_gemm", []).base == mine
  tuning.write(tmp_path / "base.json", base)
  assert field_sweep.Run.begin("sweep_gemm", [], base=str(tmp_path / "base.json")).base == base


def test_sweep_gemm_writes_the_gemm_field(tmp_path):
  """The decode GEMM sweep's plumbing (tiny shapes; on CPU the timed model runs XLA's GEMMs either way and the
  kernel only runs, interpreted, in the products' check: the times mean nothing): every field's candidates timed,
  XLA and the kernel compared in the model's step, the device's file written with the picked `gemm` and
  provenance."""
  out, log = tmp_path / "t.json", tmp_path / "t.jsonl"
  p = _run(["scripts.tuning.sweep_gemm", "--tiny", "--interpret", "--layers", "1", "--steps", "1", "--rows", "8",
            "--compare", "1,8", "--out", str(out), "--log", str(log)])
  assert p.returncode == 0, p.stderr[-2000:]
  from hydragen_jax import tuning  # noqa: PLC0415

  file = tuning.load(out)
  assert file.device_kind == "cpu" and not file.measured  # the device's kind; the fallback's fields not measured
  assert "NOT MEASURED on cpu except the field gemm" in file.provenance["note"]
  note = file.provenance["fields"]["gemm"]
  assert "NOT A MEASUREMENT" in note and "a layer of the decode step in mode none" in note
  rows = [json.loads(line) for line in log.read_text().splitlines()]
  from scripts.tuning.sweep_gemm import kernel_rows  # noqa: PLC0415

  last = {(r["rows"], r["backend"]): r["us_per_layer"] for r in rows[-4:]}  # the comparison: XLA, kernel at 1 and 8
  want = kernel_rows({m: (last[(m, "xla")], last[(m, "interpret")]) for m in (1, 8)}, 0.02)
  assert (file.tuning.gemm.min_rows, file.tuning.gemm.max_rows) == want
  assert {r["gemm"]["max_rows"] for r in rows if r["backend"] == "xla"} == {0}  # the tuning timed, not the tiles'
  assert {r["gemm"]["max_rows"] for r in rows if r["backend"] != "xla"} == {128}
  assert {r["backend"] for r in rows} == {"interpret", "xla"} and {r["rows"] for r in rows} == {1, 8}
  assert dataclasses.replace(file.tuning, gemm=tuning.current().gemm) == tuning.current()  # nothing else changed


H200_GEMMS = {1: (127.1, 137.1), 8: (118.4, 133.0), 16: (122.2, 136.0), 32: (129.2, 140.9), 64: (150.3, 145.4),
              128: (154.4, 178.4)}  # us a layer, XLA / kernel: the H200's sweep of session 11


@pytest.mark.parametrize("versus, want", [
    ({1: 90, 8: 90, 64: 90}, (1, 64)),  # faster everywhere: from 1 row
    (H200_GEMMS, (64, 64)),  # faster at 64 rows alone
    ({1: 90, 8: 110, 64: 90}, (1, 1)),  # two runs of one count: the smaller rows
    ({1: 90, 8: 110, 16: 90, 64: 90}, (16, 64)),  # the longest run
    ({1: 99, 8: 90}, (8, 8)),  # 1 % faster is under min_gain
    ({1: 110, 8: 110}, (1, 0)),  # slower everywhere: off
    ({8: 90, 64: 90}, (8, 64)),  # 1 row not timed: not claimed
])
def test_sweep_gemm_kernel_rows_span_the_longest_winning_run(versus, want):
  from scripts.tuning.sweep_gemm import kernel_rows  # noqa: PLC0415

  versus = {m: t if isinstance(t, tuple) else (100.0, t) for m, t in versus.items()}  # XLA 100 us unless given
  assert kernel_rows(versus, 0.02) == want


def test_sweep_gemm_descent_takes_a_second_pass_and_never_rescores_the_current_tiling():
  """Coupled fields: b only pays once a moved (a second pass finds it); each pass scores every field's other values
  but never the current one (its score is known); the sweep memoises `score`, so nothing is timed twice."""
  from scripts.tuning.sweep_gemm import descend  # noqa: PLC0415

  @dataclasses.dataclass(frozen=True)
  class Tiles:
    a: int
    b: int

  cost = {(0, 0): 10.0, (1, 0): 8.0, (0, 1): 12.0, (1, 1): 5.0, (2, 0): 9.0, (2, 1): 9.5, (0, 2): 11, (1, 2): 8.1}
  calls = []

  def score(g):  # not memoised: every call counts
    calls.append(g)
    return cost[(g.a, g.b)]

  g, best, notes = descend(Tiles(0, 0), score, {"b": (0, 1, 2), "a": (0, 1, 2)}, passes=3, min_gain=0.02)
  assert (g, best) == (Tiles(1, 1), 5.0)  # pass 1: b stays (12, 11 > 10), a -> 1; pass 2: b -> 1; pass 3: nothing
  assert set(notes) == {"b", "a", "b (pass 2)", "a (pass 2)", "b (pass 3)", "a (pass 3)"}
  assert len(calls) == 1 + 3 * 4  # the start, then two other values of each of two fields in each of three passes
  calls.clear()
  g1, _, notes1 = descend(Tiles(0, 0), score, {"b": (0, 1, 2), "a": (0, 1, 2)}, passes=1, min_gain=0.02)
  assert g1 == Tiles(1, 0) and set(notes1) == {"b", "a"} and len(calls) == 5  # one pass: b not reached
  # Tiles that cannot run (inf) move nowhere and stop after one pass.
  calls.clear()
  g2, best2, notes2 = descend(Tiles(0, 0), lambda g: calls.append(g) or float("inf"), {"b": (0, 1)}, 3, 0.02)
  assert g2 == Tiles(0, 0) and best2 == float("inf") and set(notes2) == {"b"} and len(calls) == 2


@pytest.mark.slow  # a tuning tool's argument checks (CI time)
@pytest.mark.parametrize("option, value", [("--compare", "1,256"), ("--rows", "0"), ("--compare", "8,x")])
def test_sweep_gemm_refuses_row_counts_out_of_range(option, value):
  p = _run(["scripts.tuning.sweep_gemm", "--tiny", "--interpret", option, value])
  assert p.returncode == 2 and f"{option} '{value}': expected comma-separated integers in [1, 128]" in p.stderr


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_sweep_levels_writes_the_cost_model(tmp_path):
  """The levels sweep's plumbing (tiny shapes on CPU: its times mean nothing): both readings timed and compared,
  the fitted rule written to both fields with the times in the provenance."""
  out = tmp_path / "t.json"
  p = _run(["scripts.tuning.sweep_levels", "--tiny", "--out", str(out)])
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.count("batched") >= 2 and "per sequence" in p.stdout and "MB saved" in p.stdout
  from hydragen_jax import tuning  # noqa: PLC0415

  file = tuning.load(out)
  note = file.provenance["fields"]["batch_min_readers"]
  pointer = "measured with batch_min_readers, in one run: see its note"
  assert file.provenance["fields"]["batch_min_saved_bytes"] == pointer
  assert "NOT A MEASUREMENT" in note and "N=2 R=2 L=16" in note and "N=2 R=3 L=16" in note and "N=1 R=4 L=24" in note
  r, s = file.tuning.batch_min_readers, file.tuning.batch_min_saved_bytes
  assert f"rule: batched from {r} readers a node and {s / 1e6:.3f} MB saved" in note and r in (2, 3, 4)
  no_out = _run(["scripts.tuning.sweep_levels", "--tiny"])
  assert no_out.returncode == 2 and "--out FILE is needed" in no_out.stderr


def _level(readers, saved, batched_us, per_sequence_us):
  from scripts.tuning.sweep_levels import Measured  # noqa: PLC0415

  return Measured(readers, saved, batched_us * 1e-6, per_sequence_us * 1e-6)


@pytest.mark.parametrize("points, want", [
    ([(2, 10, 5, 9), (8, 100, 5, 20)], (2, 0)),  # batched faster everywhere: every level
    ([(2, 10, 12, 9), (2, 100, 8, 20), (8, 50, 9, 10)], (2, 50)),  # small saves lose: a bytes bound
    ([(2, 100, 12, 9), (8, 10, 8, 20), (4, 50, 9, 10)], (4, 0)),  # few readers lose: a readers bound
    ([(2, 10, 12, 9), (8, 10, 12, 9)], (2, 11)),  # slower everywhere: no measured level batched
    ([(2, 10, 9, 9), (2, 100, 9, 9), (8, 50, 9, 9)], (2, 0)),  # all ties: the rule batching most
    ([(2, 10, 9, 9), (8, 100, 5, 20)], (2, 0)),  # a tie: the rule that batches more
])
def test_sweep_levels_fits_the_rule_of_least_total_time(points, want):
  from scripts.tuning.sweep_levels import fit_rule, rule_report  # noqa: PLC0415

  levels = [_level(*p) for p in points]
  assert fit_rule(levels) == want
  report = rule_report({f"L{i}": p for i, p in enumerate(levels)}, want)
  assert report.startswith(f"rule: batched from {want[0]} readers a node and {want[1] / 1e6:.3f} MB saved")
  wrong = [i for i, (r, saved, b, q) in enumerate(points) if (b > q if r >= want[0] and saved >= want[1] else b < q)]
  assert report.count("x)") == len(wrong), report  # only the levels read the strictly slower way (ties are not)


def test_sweep_levels_fit_needs_levels():
  from scripts.tuning.sweep_levels import fit_rule  # noqa: PLC0415

  with pytest.raises(ValueError, match="at least one measured level"):
    fit_rule([])


def test_sweep_levels_keeps_the_node_map_static():
  """The step the sweep times groups the sequences on the host, as the models do: no device sort in its HLO."""
  from scripts.tuning.sweep_levels import make_step, step_inputs  # noqa: PLC0415

  import re  # noqa: PLC0415

  import hydragen_jax as hj  # noqa: PLC0415

  q, levels = step_inputs(4, 3, 16, (4, 2, 16), 8, jnp.float32)
  assert isinstance(levels[0].seq_to_node, np.ndarray)
  for batched in (True, False):
    step, arrays = make_step(levels, batched, "interpret")
    jaxpr = str(jax.make_jaxpr(step)(q, arrays))
    assert not re.search(r"\bsort\[", jaxpr) and "pallas_call" in jaxpr
  # the control: the same level with its node map traced sorts the sequences in the step
  traced = jax.make_jaxpr(lambda x, lv: hj.tree_attention(x, lv, batch_shared=[True], backend="interpret"))(q, levels)
  assert re.search(r"\bsort\[", str(traced))


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_weight_layout_times_every_layout_of_the_same_product(tmp_path):
  """`probe_weight_layout`: a row per (row count, layout); `fused_nk` weights are the `fused` ones transposed (its
  product, contracting w's second axis, is `x @ w`), `separate` ones are slices of them, and a step gives the same
  output in every layout."""
  from scripts.tuning import probe_weight_layout as pw  # noqa: PLC0415

  kn, nk, sep = (pw.layer_weights(pw.SHAPE_TINY, 1, jnp.float32, layout)[0] for layout in pw.LAYOUTS)
  assert kn["down"].shape == nk["down"].shape[::-1] == (96, 64)
  assert sep["k"].shape == (64, 32) and sep["up"].shape == (64, 96) and "qkv" not in sep
  np.testing.assert_array_equal(jnp.concatenate([sep["q"], sep["k"], sep["v"]], axis=1), kn["qkv"])
  np.testing.assert_array_equal(jnp.concatenate([sep["gate"], sep["up"]], axis=1), kn["gate_up"])
  x = jax.random.normal(jax.random.key(0), (3, 96), jnp.float32)
  np.testing.assert_allclose(pw.matmul(x, kn["down"], False), pw.matmul(x, nk["down"], True), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pw.matmul(x, kn["down"], False), x @ kn["down"], rtol=1e-5, atol=1e-5)
  h = jax.random.normal(jax.random.key(1), (3, 64), jnp.float32)
  steps = [pw.layers_step(pw.SHAPE_TINY, layout)(h, [w]) for layout, w in zip(pw.LAYOUTS, (kn, nk, sep))]
  for other in steps[1:]:
    np.testing.assert_allclose(other, steps[0], rtol=1e-5, atol=1e-5)
  for name in ("k", "v", "gate"):  # every GEMM feeds the output (none is dead code XLA could drop)
    changed = pw.layers_step(pw.SHAPE_TINY, "separate")(h, [{**sep, name: 2 * sep[name]}])
    assert not np.allclose(changed, steps[2], rtol=1e-3, atol=1e-3), name
  with pytest.raises(ValueError, match="not a multiple"):
    pw.mix(h[:, :6], h[:, :4], h[:, :4])
  with pytest.raises(ValueError, match="layout: 'kn'"):
    pw.layer_weights(pw.SHAPE_TINY, 1, jnp.float32, "kn")
  out = tmp_path / "layout.jsonl"
  pw.main(["--tiny", "--rows", "1,8", "--steps", "2", "--layouts", "fused,separate", "--out", str(out)])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["rows"], r["layout"]) for r in rows] == [(1, "fused"), (1, "separate"), (8, "fused"), (8, "separate")]
  assert all(r["us_per_layer"] > 0 and r["tflop_per_s"] > 0 and r["fraction"] is None for r in rows)


def test_probe_spills_attributes_each_compile_to_its_setting_and_window(capsys):
  """`probe_spills`: T·g rows become (T, g) with g ≤ 8, a header line names each setting and window before its
  compile, and a setting the kernel does not take is reported with the kernel's reason (not compiled)."""
  from scripts.tuning import probe_spills  # noqa: PLC0415

  q, prefix, suffix = probe_spills.shapes(24)
  assert q.shape == (64, 3, 64, 128) and prefix.shape == (1024, 8, 128) and suffix.shape == (64, 256, 8, 128)
  assert probe_spills.shapes(4)[0].shape[1:3] == (1, 32)
  with pytest.raises(ValueError, match="--rows 12"):
    probe_spills.shapes(12)
  probe_spills.main(["--variants", "s128q", "--rows", "24,64"])
  out = capsys.readouterr().out
  assert "== s128q rows=24 window=24" in out and "== s128q rows=64 window=64" in out
  assert "not compiled: shared memory" in out  # a 64-row window with 128-key suffix tiles does not fit


def test_probe_hopper_variant_names_take_overrides():
  """`probe_hopper.resolve`: a base (a VARIANTS name, `tuned` of a config or of T·g rows, `auto`), `-ek` to take
  prefix_early_keys off, then `+ek` / `+FIELD=VALUE` overrides applied in order and checked by HopperConfig; bad
  names and values are refused with the override named."""
  import dataclasses  # noqa: PLC0415

  from hydragen_jax.kernels import hopper  # noqa: PLC0415
  from scripts.tuning import probe_hopper  # noqa: PLC0415

  cfg = (1024, 8192, 512, 32, 8)
  tuned = hopper.tuned_config(rows=4, prefix=8192)
  assert probe_hopper.resolve("tuned", cfg) == tuned
  assert probe_hopper.resolve("tuned+ek", cfg) == dataclasses.replace(tuned, prefix_early_keys=True)
  assert probe_hopper.resolve("tuned-ek", cfg) == dataclasses.replace(tuned, prefix_early_keys=False)
  assert probe_hopper.resolve("tuned", rows=4) == hopper.tuned_config(rows=4)
  both = probe_hopper.resolve("t1+prefix_keys=128+pair_registers=224+suffix_registers=56+prefix_fill=0.5", cfg)
  assert both == dataclasses.replace(probe_hopper.VARIANTS["t1"], prefix_keys=128, pair_registers=224,
                                     suffix_registers=56, prefix_fill=0.5)
  assert probe_hopper.resolve("t1+pingpong=false", cfg).pingpong is False
  costs = probe_hopper.resolve("tuned+pair_suffix_cost=1.5+pair_prefix_cost=0.75", cfg)  # the float fields
  assert (costs.pair_suffix_cost, costs.pair_prefix_cost) == (1.5, 0.75)
  assert probe_hopper.resolve("auto", cfg) == "auto"
  for name, match in [("t1+stages=2", "FIELD=VALUE"), ("t1+prefix_keys", "FIELD=VALUE"),
                      ("t1+prefix_keys=x", "a number"), ("auto+ek", "no overrides"),
                      ("t1+pair_prefix_cost=0", "pair_prefix_cost must be > 0"),
                      ("t1+prefix_keys=96", "prefix_keys must be 64 or 128"),
                      ("t1+ek+prefix_overlap=true", "exclusive")]:
    with pytest.raises(ValueError, match=match):
      probe_hopper.resolve(name, cfg)
  with pytest.raises(KeyError):
    probe_hopper.resolve("nosuch", cfg)


@pytest.mark.parametrize("m,k,n,block_n,stages,ctas", [
    (8, 256, 192, 64, 3, 4),  # K split in 4 (8 units on 4 CTAs: the ring runs across units)
    # a tuning probe's kernel (CI time): these two in the slow tier
    pytest.param(3, 128, 128, 64, 2, 2, marks=pytest.mark.slow),  # fewer rows than a row tile of x; one K tile a unit
    pytest.param(20, 192, 128, 128, 2, 3, marks=pytest.mark.slow),  # 24 rows of x; K tiles 3: a split of one tile,
    # a ring shorter than a unit
])
def test_probe_gemm_hopper_kernel_matches_xla(m, k, n, block_n, stages, ctas):
  """The Mosaic GPU decode-GEMM kernel of the probe (interpreted) against jnp.matmul, within bf16 rounding."""
  from scripts.tuning import probe_gemm_hopper as probe  # noqa: PLC0415
  config = probe.HopperGemmConfig(block_n=block_n, block_k=64, stages=stages)
  kx, kw = jax.random.split(jax.random.PRNGKey(m))
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (k, n), jnp.float32).astype(jnp.bfloat16)
  got = probe.matmul(x, w, config=config, num_ctas=ctas, interpret=True)
  want = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32))
  assert got.shape == (m, n) and got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2 * float(
      jnp.abs(want).max()))


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_gemm_hopper_plans_whole_waves_and_refuses_what_it_cannot_take():
  from scripts.tuning import probe_gemm_hopper as probe  # noqa: PLC0415
  config = probe.HopperGemmConfig()  # 128 × 128 tiles, balance 0.9
  # q/k/v (96 column blocks, 32 K tiles) on 132 SMs: 4 splits, 384 units = 2.9 waves (2 splits: 192 = 1.45)
  assert probe.plan(12288, 4096, config, 132) == (4, 8)
  assert probe.plan(4096, 11008, config, 132) == (8, 11)  # down: 86 K tiles, 11 a split (the last 9): 256 units
  assert probe.stages_that_fit(64, config) < probe.stages_that_fit(8, config) == config.stages
  with pytest.raises(ValueError, match="65 rows: the kernel is for decode steps"):
    probe.matmul(jnp.zeros((65, 128), jnp.bfloat16), jnp.zeros((128, 128), jnp.bfloat16), num_ctas=1)
  with pytest.raises(ValueError, match="dtype float32"):
    probe.matmul(jnp.zeros((8, 128)), jnp.zeros((128, 128)), num_ctas=1)


def test_grid_keeps_every_value_in_the_default_tier():
  """tests/conftest.grid: every combination as a param, the ones outside the covering subset marked slow; the
  subset holds every value of every axis and every pair of two 2-value axes, whatever the axes' lengths."""
  from tests.conftest import grid  # noqa: PLC0415

  axes = ([1, 2, 3, 4, 5], ["a", "b"], [True, False])
  cases = grid(*axes, ids=[str, str, lambda c: "yes" if c else "no"])
  ci = [c.values for c in cases if not c.marks]
  assert len(cases) == 20 and len(ci) == 5
  assert {c.values for c in cases} == {(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]}
  assert all([m.name for m in c.marks] == ["slow"] for c in cases if c.marks)
  assert {c.id for c in cases if not c.marks} >= {"1-a-yes", "2-b-no"}
  for short in (axes, ([1], [1, 2], ["x", "y", "z"]), ([1, 2], [3, 4, 5, 6, 7], [8])):
    ci = [c.values for c in grid(*short) if not c.marks]
    for k, values in enumerate(short):
      assert {c[k] for c in ci} == set(values), (short, k)
  ci = [c.values for c in grid([0], [1, 2], [3, 4]) if not c.marks]
  assert {c[1:] for c in ci} == {(1, 3), (1, 4), (2, 3), (2, 4)}


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path):
  """scripts/test.sh runs `pytest -n 2 --dist loadgroup` so that the tests sharing an expensive fixture (the smoke
  bench, SmolLM2) run on one worker; with pytest 9.2 and pytest-xdist 3.8 the groups were silently ignored (hence
  pytest < 9.2 in pyproject.toml)."""
  (tmp_path / "test_groups.py").write_text(
      "import os, time, pytest\n"
      + "".join(f"@pytest.mark.xdist_group('g')\ndef test_grouped_{i}():\n"
                f"    time.sleep(0.3); open('{tmp_path}/w{i}', 'w').write(os.environ['PYTEST_XDIST_WORKER'])\n"
                for i in range(4))
      + "".join(f"def test_free_{i}():\n    time.sleep(0.3)\n" for i in range(4)))
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                         "loadgroup", str(tmp_path / "test_groups.py")], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stdout[-2000:]
  assert len({(tmp_path / f"w{i}").read_text() for i in range(4)}) == 1


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_gemm_hopper_times_each_backend_on_the_chained_layers(capsys):
  from scripts.tuning import probe_gemm_hopper as probe  # noqa: PLC0415
  probe.main(["--tiny", "--interpret", "--rows", "8", "--layers", "1", "--repeats", "1", "--configs", "64x64x2",
              "--chain-only"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("[probe_gemm_hopper] ") and len(lines) == 2, lines
  assert lines[1].startswith("M=  8 layer ") and " xla " in lines[1] and " hopper64x64x2 " in lines[1], lines


def test_probe_gemm_mgpu_checks_jax_hopper_matmul_against_xla(capsys):
  """The probe of JAX's own Hopper matmul (interpreted, tiny): its product matches XLA's; a config whose CTA tile
  does not divide the product is left out, not failed."""
  from scripts.tuning import probe_gemm_mgpu as probe  # noqa: PLC0415
  assert probe.fits("m64n64M", 256, 192, 128) and not probe.fits("m128n128N", 256, 192, 128)  # CTA 128 × 256
  recs = probe.main(["--tiny", "--interpret", "--rows", "128", "--layers", "1", "--products", "down",
                     "--configs", "m64n64M,m128n128N"])
  assert [r["config"] for r in recs] == ["xla", "m64n64M"], recs
  assert recs[1]["max_err"] <= 0.05 and "us" not in recs[1], recs  # bf16 rounding of |y| <~ 4; untimed
  assert '"config": "m64n64M"' in capsys.readouterr().out


@pytest.mark.parametrize("script", ["sweep_device", "sweep_gemm", "sweep_levels"])
def test_the_sweeps_refuse_bad_paths_before_they_start(tmp_path, capsys, script):
  """--out or --log a directory or in a missing folder, --base missing or not a tuning file: usage errors naming the
  option at once (tracebacks before, --out's after the sweep had run, leaving a temporary file beside it)."""
  import importlib  # noqa: PLC0415

  main = importlib.import_module(f"scripts.tuning.{script}").main
  quick = {"sweep_device": ["--dry-run"], "sweep_gemm": ["--tiny"], "sweep_levels": ["--tiny"]}[script]
  (tmp_path / "not.json").write_text("{")
  cases = [(["--out", str(tmp_path)], "--out .*a directory"),
           (["--out", str(tmp_path / "no" / "t.json")], "--out .*its folder does not exist"),
           (["--out", str(tmp_path / "t.json"), "--base", str(tmp_path / "missing.json")],
            "--base .*not a readable tuning file"),
           (["--out", str(tmp_path / "t.json"), "--base", str(tmp_path / "not.json")],
            "--base .*not a readable tuning file: .*not valid JSON")]
  if script != "sweep_levels":
    cases.append((["--out", str(tmp_path / "t.json"), "--log", str(tmp_path / "no" / "x.jsonl")],
                  "--log .*its folder does not exist"))
  else:  # its attention backend: an unknown name, or compiled kernels off a GPU
    cases.append((["--out", str(tmp_path / "t.json"), "--backend", "foo"], "--backend: backend='foo' is not one of"))
    if jax.default_backend() != "gpu":
      cases.append((["--out", str(tmp_path / "t.json"), "--backend", "pallas"], "--backend: .*compiled GPU kernels"))
  for args, match in cases:
    with pytest.raises(SystemExit) as e:
      main(quick + args)
    assert e.value.code == 2 and re.search(match, capsys.readouterr().err), args
  assert sorted(p.name for p in tmp_path.iterdir()) == ["not.json"]  # nothing written, no temporary file


def test_tuning_write_refuses_a_directory_and_leaves_no_temporary_file(tmp_path):
  from hydragen_jax import tuning  # noqa: PLC0415

  file = tuning.file_for("cpu")
  with pytest.raises(ValueError, match="a directory"):
    tuning.write(tmp_path, file)
  with pytest.raises(ValueError, match="its folder does not exist"):
    tuning.write(tmp_path / "no" / "t.json", file)
  assert list(tmp_path.iterdir()) == []
  tuning.write(tmp_path / "t.json", file)
  assert [p.name for p in tmp_path.iterdir()] == ["t.json"] and tuning.load(tmp_path / "t.json") == file


def test_device_round_exits_with_a_failing_steps_status(tmp_path):
  """A step that fails (here the sweep: an unknown field) gives the script its status, once every step has run (it
  exited 0 whatever failed). `python3` is this interpreter (the device machine's has jax)."""
  shim = tmp_path / "bin"
  shim.mkdir()
  (shim / "python3").write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
  (shim / "python3").chmod(0o755)
  env = dict(os.environ, OUT=str(tmp_path / "out"), PATH=f"{shim}:{os.environ['PATH']}", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(["bash", "scripts/tuning/device_round.sh", "none", "--dry-run", "--fields", "nosuch"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, (done.returncode, done.stdout[-1500:], done.stderr[-1500:])
  assert "nosuch" in (tmp_path / "out" / "sweep.log").read_text()


def test_gpu_full_names_an_unknown_part_first():
    """A mistyped part is named as such on any machine (it was reported as "platform is cpu" off a GPU)."""
    done = subprocess.run(["bash", "experiments/gpu_full.sh", "bench-mh"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown part bench-mh (one of: bench bench-mha" in done.stderr, done.stderr
    done = subprocess.run(["bash", "experiments/gpu_full.sh"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: bash experiments/gpu_full.sh PART (bench|" in done.stderr, done.stderr


def test_gpu_full_names_a_bad_rows_list_and_a_python_without_jax():
    """ROWS that select_rows refuses ends the script (exit 2) naming it (a traceback, then a run with an empty
    --set); an interpreter that cannot run JAX is named (its failed device probe went on as "platform is ")."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "GPU_PYTHON")}
    done = subprocess.run(["bash", "experiments/gpu_full.sh", "bench-mha"], capture_output=True, text=True,
                          timeout=120, env=dict(env, ROWS="9", FORCE="1", GPU_PYTHON=sys.executable))
    assert done.returncode == 2 and "[gpu_full] ROWS=9: --select '9': indexes must be in 0..8" in done.stderr, \
        done.stderr
    assert "Traceback" not in done.stderr and "started" not in done.stdout
    done = subprocess.run(["bash", "experiments/gpu_full.sh", "tree"], capture_output=True, text=True, timeout=60,
                          env=dict(env, GPU_PYTHON="/no/such/python"))
    assert done.returncode == 2 and "[gpu_full] /no/such/python cannot run JAX" in done.stderr, done.stderr


def test_gpu_full_passes_over_a_venv_without_jax(tmp_path):
    """A .venv that a set-up left without jax (offline, as on the GPU machine after `scripts/demo.sh`) is not taken
    for the experiments' Python: gpu_full.sh says so and runs python3 (it used the .venv and every part failed with
    "No module named 'jax'")."""
    (tmp_path / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / "gpu_full.sh", tmp_path / "experiments")
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"#!/usr/bin/env bash\n[[ \"$*\" == *'import jax'* ]] && exit 1\ntouch {tmp_path}/used\nexit 1\n")
    fake.chmod(0o755)
    # PYTHON (the set-up's interpreter, README: "set PYTHON=/path/to/python3.12") does not choose it
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("GPU_PYTHON", None)
    done = subprocess.run(["bash", "experiments/gpu_full.sh", "bench-mha"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=env)
    assert "[gpu_full] .venv has no jax (a set-up that did not finish?): using python3" in done.stderr, done.stderr
    assert not (tmp_path / "used").exists()


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_smem_runs_each_tile_and_prints_its_count(monkeypatch, capsys):
  """The shared-memory probe (run under Nsight Compute on a GPU): each tile launched, checked against the
  reference and printed with `ops.tile_shared_memory`'s count; a tile that fails is printed with its error."""
  from scripts.tuning import probe_smem  # noqa: PLC0415
  monkeypatch.setattr(probe_smem, "TINY", probe_smem.TINY + [("bfloat16", 32, 16, 16, 2, 3)])  # 3 heads: refused
  monkeypatch.setattr("sys.argv", ["probe_smem", "--tiny"])
  probe_smem.main()
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert rows[0] == {"device": "cpu", "limit": None}
  assert [r["ok"] for r in rows[1:]] == [True, True, False] and "error" in rows[3]
  assert rows[1]["estimate"] == 2 * 2 * 16 * 64 * 4 + 16 * 64 * 4 and rows[1]["max_error"] < 1e-5


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_rope_profiles_each_variant_and_they_agree():
  """Each RoPE variant profiled in turn (its own compile: the jitted step is not reused), and the two forms give
  the same rotation (bf16 bit for bit; float32 to rounding: XLA may contract either into FMAs)."""
  from scripts.tuning import probe_rope  # noqa: PLC0415
  p = _run(["scripts.tuning.probe_rope", "--variants", "concat,flip", "--", "--tiny", "--layers", "2", "--batch",
            "4", "--prefix", "16", "--generate", "8", "--at", "2", "--steps", "2", "--modes", "none"])
  assert p.returncode == 0, p.stderr
  assert p.stdout.count("=== rope") == 2 and p.stdout.count("[none] step") == 2
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 64))
  positions = jnp.array([[0, 1], [7, 8], [60000, 60001]])
  inv = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
  for (dtype, atol), factor in itertools.product(((jnp.bfloat16, 0.0), (jnp.float32, 1e-6)), (1.0, 1.2)):
    a, b = (f(x.astype(dtype), positions, inv, factor)  # factor: YaRN's attention factor on cos and sin
            for f in (probe_rope.VARIANTS["concat"], probe_rope.VARIANTS["flip"]))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=atol)


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier runs it
def test_probe_rope_soak_times_each_variant_every_round():
  p = _run(["scripts.tuning.probe_rope", "--soak", "0.2", "--rounds", "2", "--tiny", "--layers", "2", "--batch", "4"])
  assert p.returncode == 0, p.stderr
  ends = [line.split() for line in p.stdout.splitlines() if line.startswith("MARK end")]
  assert [(e[2], e[3]) for e in ends] == [("concat", "0"), ("flip", "0"), ("concat", "1"), ("flip", "1")]
  assert all(float(e[7]) > 0 for e in ends)  # "median N us a step"


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_ab_kernel_swaps_the_kernel_body_of_another_file_and_restores_it(tmp_path):
  """`ab_kernel` runs another revision's `_attend` (here a marked copy of the current file) inside the block: the
  interpreted launch calls it, and the current body is back afterwards."""
  import hydragen_jax as hj  # noqa: PLC0415
  from hydragen_jax.kernels import flash  # noqa: PLC0415
  from scripts.tuning import ab_kernel  # noqa: PLC0415
  source = pathlib.Path(flash.__file__).read_text()
  path = tmp_path / "other_flash.py"
  path.write_text(source + "\nCALLS = []\n_current_attend = _attend\n"
                  "def _attend(*args, **kw):\n  CALLS.append(1)\n  return _current_attend(*args, **kw)\n")
  other = ab_kernel.load_kernel_module(str(path), "ab_kernel_test_other")
  current = flash._attend
  q = jnp.ones((2, 1, 2, 16), jnp.float32)
  k = jnp.ones((2, 8, 2, 16), jnp.float32)
  with ab_kernel.kernel_body(other._attend):
    assert flash._attend is other._attend
    out, _ = hj.attention(q, k, k, kv_lengths=jnp.array([8, 3]), backend="interpret")
  assert other.CALLS and flash._attend is current
  np.testing.assert_allclose(np.asarray(out), 1.0)


@pytest.mark.parametrize("device", ["nvidia-h200", "nvidia-h100-80gb-hbm3"])
def test_sweep_kernels_variants_make_valid_tiles(device):
  """Every entry of sweep_kernels' variant table builds its prefix and suffix tiles under each device's tuning, on
  an MHA decode shape (B = 64, one query row a KV head) and a GQA seed row, and the overrides reach the tiles (a
  typo'd field would be refused or ignored only on the GPU, in the middle of a timed call)."""
  from hydragen_jax import tuning  # noqa: PLC0415
  from hydragen_jax.kernels import ops  # noqa: PLC0415
  from scripts.tuning import sweep_kernels  # noqa: PLC0415

  tune = tuning.load(str(ROOT / "hydragen_jax" / "tuning" / f"{device}.json")).tuning
  # the keys step_fn and variant_tuning read: a misspelt one would be ignored, not refused
  keys = {"launch", "prefix", "suffix", "merge", "merge_rows", "merge_warps", "max_keys", "balanced_keys", "lead",
          "split_fill", "split_fill_keys"}
  for name, variant in sweep_kernels.VARIANTS.items():
    assert set(variant) <= keys and variant["launch"] in ops.LAUNCHES, (name, variant)
  for cfg in [(64, 1024, 128, 32, 32), (512, 4096, 512, 32, 8)]:
    for name, variant in sweep_kernels.VARIANTS.items():
      _, (pb, sb) = sweep_kernels.step_fn(cfg, variant, tune)
      for block, over in ((pb, variant.get("prefix")), (sb, variant.get("suffix"))):
        for field, value in (over.items() if isinstance(over, dict) else ()):
          assert getattr(block, field) == value, (device, cfg, name, field)
  # the tuning fields reach the tiles: the split rule off / on at B = 64 MHA, P = 4K (32 prefix programs: 8 / 4
  # splits on 132 SMs); and the launch's part of it (ops.launch_fill): at P = 16K the prefix is split for its keys
  # (8 ways), so the suffix keeps a program per SM (2 splits of 128 programs) where at P = 4K it takes one
  with mock.patch.object(ops, "num_cores", lambda t=None: 132):
    splits = {name: sweep_kernels.step_fn((64, 4096, 128, 32, 32), sweep_kernels.VARIANTS[name], tune)[1][0].splits
              for name in ("auto_fill100", "auto_fill96k4")}
    fill = sweep_kernels.VARIANTS["auto_fill96k4"]
    both = {p: tuple(b.splits for b in sweep_kernels.step_fn((64, p, 128, 32, 32), fill, tune)[1])
            for p in (4096, 16384)}
  assert splits == {"auto_fill100": 8, "auto_fill96k4": 4}, (device, splits)
  assert both == {4096: (4, 1), 16384: (8, 2)}, (device, both)


def test_probe_switch_takes_the_prefix_bound_setting_below_the_ratio(monkeypatch):
  """`probe_switch.switched`: setting b where the suffixes' bytes at the bandwidth take less than `ratio` times the
  prefix product's FLOPs at the matmul rate, setting a elsewhere, chosen at run time from the traced lengths."""
  from scripts.tuning import probe_switch  # noqa: PLC0415

  monkeypatch.setattr(probe_switch, "step", lambda name: lambda q, *rest: jnp.full_like(q, name))
  cfg = (4, 1024, 64, 8, 2)  # B, P, out, Hq, Hkv: the prefix 4·B·Hq·P·D FLOPs, a suffix key Hkv·D·4 bytes
  rates = dict(matmul_flops_per_s=1e12, bandwidth_bytes_per_s=1e12)
  fn = jax.jit(probe_switch.switched(cfg, 1.0, 2.0, ratio=1.0, rates=rates))
  q, kv = jnp.zeros((4, 1, 8, 128)), jnp.zeros((1,))
  # equal times where the lengths sum to 4·B·Hq·P / (Hkv·4) = 16384 keys (D cancels): 4096 a sequence
  assert float(fn(q, kv, kv, kv, kv, jnp.full((4,), 4095, jnp.int32))[0, 0, 0, 0]) == 2.0
  assert float(fn(q, kv, kv, kv, kv, jnp.full((4,), 4096, jnp.int32))[0, 0, 0, 0]) == 1.0


@pytest.mark.slow  # a tuning tool's plumbing (CI time, ~13 s): the slow tier runs it
def test_probe_choice_checks_the_api_path_and_refuses_bad_arguments(capsys):
  """`probe_choice`: a shape's choice of kernel and each backend's error against the jnp reference and time, through
  `hydragen_attention` (interpreted here: no Hopper GPU, so no Hopper kernel); unknown backends and malformed shapes
  are refused, naming what was given."""
  from scripts.tuning import probe_choice  # noqa: PLC0415

  row = probe_choice.check((2, 16, 8, 8, 2), ["interpret"], dict(warmup=0, repeats=1))
  assert row["hopper"] is False and row["interpret_err"] < 2e-2
  assert row["interpret_s"] > 0 and row["interpret_call_s"] > 0  # a step chained, a call
  with pytest.raises(SystemExit):
    probe_choice.main(["--backends", "xla"])
  assert "--backends 'xla': unknown ['xla']; expected some of pallas" in capsys.readouterr().err
  for bad in ("2x16x8", "2x16x8x8x0", "2x16xax8x2"):
    with pytest.raises(ValueError, match=f"expected BxPxOUTxHQxHKV of positive ints; got '{bad}'"):
      probe_choice.parse_shape(bad)


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_kv_write_times_each_write_and_profiles_the_model_with_each():
  """`probe_kv_write`: a line per (batch, variant) and the writes' cost over `skip`; with `--`, the models' step
  profiled once with the tuning's pair_write off and once on (`profile_decode --field`)."""
  p = _run(["scripts.tuning.probe_kv_write", "--tiny", "--batches", "4", "--repeats", "1"])
  assert p.returncode == 0, p.stderr[-2000:]
  assert [line.split(":")[0].split()[-1] for line in p.stdout.splitlines() if "us a layer" in line
          and "over skip" not in line] == ["two", "pair", "one", "skip"], p.stdout
  assert "writes over skip (us a layer): two " in p.stdout
  p = _run(["scripts.tuning.probe_kv_write", "--variants", "two,pair", "--", "--tiny", "--modes", "hydragen",
            "--steps", "2", "--at", "2", "--layers", "2"])
  assert p.returncode == 0, p.stderr[-2000:]
  assert re.findall(r"\[hydragen @ default pair_write=(\w+)\]", p.stdout) == ["false", "true"], p.stdout


@pytest.mark.slow  # a tuning tool's plumbing (CI time): the slow tier, `bash scripts/test.sh --all`, runs it
def test_probe_pair_abort_runs_each_case_in_a_process_of_its_own():
  """`probe_pair_abort`: a line per case with its exit code (0 on a CPU: the pair's writes are right there); a
  decode case compares the loop with the pair off and on (the same tokens, the caches' layouts)."""
  p = _run(["scripts.tuning.probe_pair_abort", "--cases", "alone-fresh-T3,alone-params-T1,prefill,decode-flat"])
  assert p.returncode == 0, p.stderr[-2000:]
  assert re.findall(r"== ([\w-]+): exit (\d+)", p.stdout) == [("alone-fresh-T3", "0"), ("alone-params-T1", "0"),
                                                               ("prefill", "0"), ("decode-flat", "0")], p.stdout
  assert "sums [(192.0, -192.0), (384.0, -192.0)]" in p.stdout  # each layer's k and v its own update
  off, on = re.findall(r"pair (False|True): tokens (\[.*?\]\]); caches (\[.*?\]);", p.stdout)
  assert (off[0], on[0]) == ("False", "True") and off[1] == on[1] and "{3,2,1,0}" in on[2], p.stdout


# A Triton pass dump as XLA writes one (`--xla_dump_emitter_re=triton`), cut down: what `probe_triton_ir` reads.
_TRITON_DUMP = """// -----// IR Dump Before TritonGPUPipeline: tritongpu-pipeline ('builtin.module' operation: @hydragen_fused_levels) //----- //
  %5 = "tt.load"(%4) : (tensor<64x128x!tt.ptr<bf16>>) -> tensor<64x128xbf16>
  %6 = "tt.dot"(%1, %5, %2) : (tensor<64x128xbf16>, tensor<128x64xbf16>, tensor<64x64xf32>) -> tensor<64x64xf32>
// -----// IR Dump Before SCFToControlFlowPass: convert-scf-to-cf ('builtin.module' operation: @hydragen_fused_levels) //----- //
  %7:3 = "scf.for"(%1, %2, %3) ({
  %8:3 = "scf.for"(%1, %2, %3) ({
// -----// IR Dump Before ConvertTritonGPUToLLVM: convert-triton-gpu-to-llvm{compute-capability=90} ('builtin.module' operation: @hydragen_fused_levels) //----- //
  "ttg.async_copy_global_to_local"(%186, %187, %188) <{cache = 1 : i32}> : (tensor<64x128x!tt.ptr<bf16>>) -> !ttg.async.token
  "ttg.async_copy_global_to_local"(%191, %192, %188) <{cache = 1 : i32}> : (tensor<64x128x!tt.ptr<bf16>>) -> !ttg.async.token
  %200 = "ttg.async_wait"(%199) <{num = 2 : i32}> : (!ttg.async.token) -> !ttg.async.token
  %233 = "ttng.warp_group_dot"(%141, %232, %12) <{isAsync = true}> : (!ttg.memdesc<64x128xbf16>) -> tensor<64x64xf32>
  %758 = "tt.dot"(%757, %756, %13) : (tensor<16x128xbf16>, tensor<128x64xbf16>) -> tensor<16x64xf32>
  %98 = "tt.load"(%arg1) <{cache = 1 : i32}> : (!tt.ptr<i32>) -> i32
  %99 = "ttg.local_load"(%98) : (!ttg.memdesc<64x128xbf16>) -> tensor<64x128xbf16>
  "tt.store"(%1, %2) : (tensor<64x128x!tt.ptr<bf16>>, tensor<64x128xbf16>) -> ()
}) {"ttg.num-ctas" = 1 : i32, "ttg.num-warps" = 4 : i32, ttg.shared = 114688 : i32, ttg.target = "cuda:90"} : () -> ()
// -----// IR Dump Before StripDebugInfoPass: strip-debuginfo ('builtin.module' operation: @hydragen_fused_levels) //----- //
  llvm.func @hydragen_fused_levels() { "tt.load" "ttg.async_copy_global_to_local" }
"""


def test_probe_triton_ir_reads_a_kernels_pipeline_products_and_shared_memory():
  """`probe_triton_ir`'s reading of XLA's Triton pass dump: the operations of the IR the LLVM lowering takes (not
  of earlier or later sections), the loops before they become branches, warps and shared memory, and the programs
  an SM holds by it; the dumps picked by kernel name."""
  from scripts.tuning import probe_triton_ir as probe  # noqa: PLC0415

  assert list(probe.sections(_TRITON_DUMP)) == ["TritonGPUPipeline", "SCFToControlFlowPass", "ConvertTritonGPUToLLVM",
                                                "StripDebugInfoPass"]
  counts = probe.read_kernel(_TRITON_DUMP)
  assert counts == {"async copies": 2, "async waits": 1, "TMA copies": 0, "wgmma dots": 1, "mma dots": 1,
                    "direct loads": 1, "shared loads": 1, "stores": 1, "loops": 2, "warps": 4, "shared bytes": 114688}
  assert probe.pipelined(counts)
  before = _TRITON_DUMP.split("// -----// IR Dump Before ConvertTritonGPUToLLVM")[0]
  with pytest.raises(ValueError, match="ConvertTritonGPUToLLVM"):
    probe.read_kernel(before)
  unpiped = _TRITON_DUMP.replace('"ttg.async_copy_global_to_local"', '"tt.load"').replace("ttg.shared = 114688", "")
  other = probe.read_kernel(unpiped)
  assert not probe.pipelined(other) and other["direct loads"] == 3 and other["shared bytes"] is None
  assert probe.programs_per_sm(114688, "9.0") == 2 and probe.programs_per_sm(73728, "9.0") == 3
  assert probe.programs_per_sm(114688, "7.5") is None and probe.programs_per_sm(None, "9.0") is None
  line = probe.summary("hydragen_fused_levels", counts, "9.0")
  assert line.startswith("  hydragen_fused_levels: pipelined (async copies 2,") and line.endswith(
      "2 programs an SM by shared memory (sm_9.0)")
  assert "NOT pipelined" in probe.summary("k", other, "9.0") and "programs an SM" not in probe.summary("k", other, "9.0")
  paths = [pathlib.Path(f"/d/{n}") for n in ("jit_fn.hydragen_fused_levels.triton-to-llvm.txt",
                                              "jit_fn.loop_add_fusion.triton-to-llvm.txt", "module_0001.jit_fn.txt")]
  assert probe.kernel_dumps(paths) == {"hydragen_fused_levels": paths[0]}


def test_probe_triton_ir_needs_a_gpu():
  p = _run(["scripts.tuning.probe_triton_ir"])
  assert p.returncode == 2 and "no GPU here" in p.stderr, (p.returncode, p.stderr[-2000:])


TOOLS = sorted(p.stem for p in (ROOT / "scripts" / "tuning").glob("*.py")
               if p.stem not in ("__init__", "field_sweep"))  # field_sweep: the sweeps' shared library


@pytest.mark.parametrize("name", ["scripts.profile_decode", "scripts.quick_bench", "scripts.same_hlo"]
                         + [f"scripts.tuning.{t}" for t in TOOLS])
def test_every_tool_answers_help_without_running(name, monkeypatch, capsys):
  """`python -m NAME --help` prints its usage and exits 0 before any work (scripts/tuning/README.md sends readers
  to it): no tool runs, or fails, on --help."""
  import importlib  # noqa: PLC0415

  module = importlib.import_module(name)
  monkeypatch.setattr(sys, "argv", [name, "--help"])
  with pytest.raises(SystemExit) as exit_:
    module.main()
  assert exit_.value.code in (0, None)
  assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("module, argv, message", [
    ("scripts.tuning.ab_kernel", ["--old", "x", "--configs", "9"], "--configs '9': expected indices of the seed "
     "configs, 0 to 8; got ['9']"),
    ("scripts.tuning.probe_call", ["--steps", "4,x"], "--steps '4,x': expected comma-separated integers >= 1; got 'x'"),
    ("scripts.tuning.probe_call", ["--modes", "none,bogus"], "--modes 'none,bogus': unknown ['bogus']; expected "
     "some of hydragen"),
    ("scripts.tuning.probe_call", ["--gemm", "500"], "--gemm '500': expected comma-separated integers in [0, 128]"),
    ("scripts.tuning.probe_call", ["--layers", "0"], "--layers 0: expected a number >= 1"),
    ("scripts.tuning.probe_choice", ["--shapes", "2x3"], "--shapes '2x3': a shape: expected BxPxOUTxHQxHKV"),
    ("scripts.tuning.probe_cudnn_prefix", ["--configs", "-1"], "got ['-1']"),  # was config 8, silently
    ("scripts.tuning.probe_dispatch", ["--configs", "a"], "got ['a']"),
    ("scripts.tuning.probe_flags", ["--settings", "nosuch"], "--settings 'nosuch': unknown setting 'nosuch'"),
    ("scripts.tuning.probe_flags", ["--batches", "8,8"], "--batches '8,8': a value given twice"),
    ("scripts.tuning.probe_gemm_hopper", ["--configs", "128x"], "expected BLOCK_NxBLOCK_KxSTAGES, e.g. 128x128x6"),
    ("scripts.tuning.probe_gemm_mgpu", ["--products", "qkv,nope"], "--products 'qkv,nope': unknown ['nope']"),
    ("scripts.tuning.probe_hopper", ["--variants", "tuned,nosuch+prefix_keys=128"], "unknown variant 'nosuch'"),
    ("scripts.tuning.probe_host", ["--loops", "while,nope"], "--loops 'while,nope': unknown ['nope']"),
    ("scripts.tuning.probe_kv_write", ["--batches", "x"], "--batches 'x': expected comma-separated integers >= 1"),
    ("scripts.tuning.probe_ncu_step", ["--lengths", "1,999"], "--lengths '1,999': expected comma-separated "
     "integers in [0, 128]"),  # the shape's suffix capacity
    ("scripts.tuning.probe_pair_abort", ["--cases", "nope"], "--cases 'nope': unknown ['nope']"),
    ("scripts.tuning.probe_rope", ["--variants", "concat,"], "--variants 'concat,': expected comma-separated "
     "values; got ''"),
    ("scripts.tuning.probe_spills", ["--rows", "x"], "--rows 'x': expected comma-separated integers >= 1"),
    ("scripts.tuning.probe_streams", ["--configs", "12"], "got ['12']"),
    ("scripts.tuning.probe_switch", ["--ratios", "x"], "--ratios 'x': expected comma-separated numbers >= 0"),
    ("scripts.tuning.probe_switch", ["--b", "nope"], "--b 'nope': unknown variant 'nope'"),
    ("scripts.tuning.probe_tp", ["--settings", "nope"], "--settings 'nope': unknown ['nope']"),
    ("scripts.tuning.probe_triton_ir", ["--variants", "nope"], "--variants 'nope': unknown ['nope']"),
    ("scripts.tuning.probe_weight_layout", ["--rows", "-3"], "--rows '-3': expected comma-separated integers >= 1"),
    ("scripts.tuning.profile_step", ["--configs", "9"], "got ['9']"),
    ("scripts.tuning.sweep_kernels", ["--parts", "step,nope"], "--parts 'step,nope': unknown ['nope']"),
    ("scripts.tuning.sweep_kernels", ["--shapes", "1x1x1"], "--shapes '1x1x1': a shape: expected BxPxOUTxHQxHKV"),
])
def test_tuning_tools_refuse_bad_option_values(monkeypatch, capsys, module, argv, message):
  """A list option's bad value is a usage error naming the option, its text and what it takes (exit 2), before any
  work (`scripts.cli`): they were tracebacks (`int('x')`, an IndexError after minutes of measuring the device's
  rates), an unknown name timed or skipped per config, or a negative index taken from the end."""
  import importlib  # noqa: PLC0415

  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # probe_triton_ir adds its dump flags
  monkeypatch.setattr(sys, "argv", [module.rsplit(".", 1)[1], *argv])
  with pytest.raises(SystemExit) as exit_:
    importlib.import_module(module).main()
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and message in err.splitlines()[-1], err


def test_sweep_kernels_merges_with_the_swept_tuning(monkeypatch):
  """A step of sweep_kernels with the merge kernel takes the merge rows and warps of the tuning it sweeps (it read
  the device's in-force tuning: under --base or $HYDRAGEN_JAX_TUNING the merge was timed with other values); a
  variant's own values still win."""
  from hydragen_jax.kernels import merge as merge_kernel  # noqa: PLC0415
  from hydragen_jax.kernels import ops  # noqa: PLC0415
  from scripts.tuning import sweep_kernels  # noqa: PLC0415
  seen = []
  monkeypatch.setattr(ops, "run", lambda q, plans, **kw: [(jnp.zeros((2, *q.shape)), jnp.zeros((2, *q.shape[:-1])))])
  monkeypatch.setattr(merge_kernel, "merge_stacks", lambda stacks, **kw: seen.append(kw) or stacks[0])
  from hydragen_jax import tuning  # noqa: PLC0415
  tune = dataclasses.replace(tuning.for_device_kind("NVIDIA H100 80GB HBM3"), merge_rows=8, merge_warps=2)
  cfg = (4, 64, 16, 8, 2)
  q = jnp.zeros((4, 1, 8, sweep_kernels.D), jnp.bfloat16)
  pk = jnp.zeros((1, 64, 2, sweep_kernels.D), jnp.bfloat16)
  sk = jnp.zeros((4, 16, 2, sweep_kernels.D), jnp.bfloat16)
  for variant, want in ((dict(launch="auto", merge="pallas"), (8, 2)),
                        (sweep_kernels.VARIANTS["auto_pmerge4w8"], (4, 8))):
    fn, _ = sweep_kernels.step_fn(cfg, variant, tune)
    fn(q, pk, pk, sk, sk, jnp.full((4,), 16, jnp.int32))
    assert (seen[-1]["rows"], seen[-1]["num_warps"]) == want


def test_sweeps_chain_over_copies_of_the_kv():
  """sweep_kernels.kv_copies / chain_args (the sweeps' chained steps over the bench's l2_copies): each copy in fresh
  buffers with the same values, the lengths after each, and a chain over them gives the one-copy chain's output."""
  from experiments import timing  # noqa: PLC0415
  from scripts.tuning import sweep_kernels  # noqa: PLC0415

  data = tuple(jnp.full((2, 3), float(i)) for i in range(5))
  q, kv = sweep_kernels.kv_copies(data, 4)
  assert len(kv) == 4 and all(len(c) == 4 for c in kv) and kv[0][0] is data[1] and kv[1][0] is not data[1]
  lengths = jnp.array([1, 2])
  args = sweep_kernels.chain_args(q, kv, lengths)
  assert len(args) == 1 + 4 * 5 and args[5] is lengths and args[10] is lengths

  def fn(q, pk, pv, sk, sv, n):
    return q + pk + pv + sk + sv + n[:, None]

  one = jax.jit(timing.chain_steps(fn, 8))(*sweep_kernels.chain_args(q, kv[:1], lengths))
  np.testing.assert_array_equal(jax.jit(timing.chain_steps(fn, 8, 4))(*args), one)
  assert sweep_kernels.l2_copies((64, 1024, 512, 32, 32), 16) == 8  # the bench's rule for row 0 at s = 1
