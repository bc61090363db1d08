#!/usr/bin/env bash
# Full (GPU-sized) experiments, one part per call, each meant to finish within ~9 minutes on one H100.
#
#   bash experiments/gpu_full.sh PART
#
# PART:
#   bench        bench_attention.toml: 9 seed configs x 3 suffix lengths x 8 variants    (~7-9 min)
#   bench-mha    bench rows 0-4 (Hq = Hkv = 32)  } one command each, < 10 min each: use these two rather than
#   bench-gqa    bench rows 5-8 (32/8)           } `bench` (its anchors add ~1 min of FlashInfer JIT compile)
#   anchors      (run on THIS machine, not the GPU one) extract FlashInfer's tarball into .anchors/ (git-ignored);
#                then name .anchors in the GPU call's carry: the bench parts put it on PYTHONPATH
#   long-doc     long_document.toml: B=256, prefix 1K..32K, 6 prefills             (~7 min with a cold compile
#                cache: 416 s on an H200 on 2026-12-04, ~3.5 min of it compiles, since prefill compiles the model
#                once whatever the number of chunks; before, it ran out of 555 s)
#   long-doc1    the same, prefixes 1K, 16K, 4K  } one call each (~3-4 min), where a call has less time: the report
#   long-doc2    the same, prefixes 32K, 2K, 8K  } takes each prefix's row from the newest run that has it
#   tree         tree_apps.toml: 4 variants of one APPS-like tree                   (~2-4 min)
#   e2e-part1    e2e_throughput.toml, prefix 1K x batches 512, 64, 8                (~3-5 min)
#   e2e-part2    e2e_throughput.toml, prefix 4K x batches 512, 64, 8                (~3-5 min)
#   e2e-part3    e2e_throughput.toml, prefix 16K x batches 512, 64, 8               (~3-5 min)
#   smoke        the [smoke] variant of every single-device config (e2e_tp's: tp-smoke; ~1-2 min)
# Tensor parallel (e2e_tp.toml; two GPUs, the nvidia-h200-x2 machine; TP = 1 and 2 in the same run):
#   tp-smoke     e2e_tp's [smoke] variant on 2 GPUs, then every 2-device case of tests/tp_cases.py      (~3-6 min)
#   tp-7b-1k     7B shape, prefix 1K, B = 512, 1024, 2048, 3072                                        (~4-6 min)
#   tp-7b-16k    7B shape, prefix 16K, the same batches                                                (~4-6 min)
#   tp-13b       CodeLlama-13b shape (40 layers, hidden 5120, 40/40 heads), B = 1024, prefix 1K and 16K (~3-5 min)
# Each config has time_budget_s (<= 500 s): points left when it is spent are recorded as "skipped". Exit status: 0, or
# the first failing experiment's (killed at LIMIT, or a config error from EXTRA), once every result is archived.
# Times are estimates (compile times of the 32-layer model on GPU were not measured before): watch the
# "[e2e] ... (prefill compile X s ...; decode compile Y s ...)" lines of the first call.
#
# Results: experiments/results/NAME-DEVICE-STAMP.{jsonl,md,*.png}, and with $OUT set (the device tool's) one archive
# per part, $OUT/NAME-DEVICE-STAMP.tgz (a call returns at most 8 files; unpack with
# `tar xzf FILE.tgz -C experiments/results`). Environment: GPU_PYTHON (the interpreter that runs the parts: default .venv/bin/python where it imports jax, else
# python3; not PYTHON, which names the interpreter scripts/setup_env.sh makes .venv with), EXTRA (extra
# arguments for `python -m experiments`, split as the shell would, e.g. EXTRA="--set timing.repeats=9" or EXTRA='--set "grid.prefixes=[1024, 4096]"'; after the part's own, so an EXTRA
# `--set` of a key the part sets, e.g. grid.prefixes with long-doc1, wins), TAG (appended to the result's NAME:
# give a run restricted by EXTRA, e.g. EXTRA="--set grid.batches=[64]" TAG=b64, a NAME of its own, so that the report
# takes its rows from it and the others from the part's full run; with the part's own NAME it would replace that run
# whole), ANCHORS_DIR (default .anchors),
# HYDRAGEN_JAX_COMMIT (the commit the records name, where this tree's .git is not the code's: the device machine;
# without it the records name .git's HEAD, marked `-dirty` where the tree's tracked files differ from it),
# ROWS (bench parts: the seed rows to run instead of the part's, e.g. ROWS=4 TAG=row4 bash experiments/gpu_full.sh
# bench-mha; the report takes each bench row from the newest file that has it).
#
# Outside anchors (bench parts): the variants torch_hydragen and flashinfer_cascade run where GPU_PYTHON imports torch
# with CUDA (and FlashInfer from $ANCHORS_DIR); otherwise they are recorded as skipped with the reason. JAX then takes
# a smaller share of the GPU (XLA_CLIENT_MEM_FRACTION 0.80) so that torch has room for FlashInfer's paged cache.
set -euo pipefail
export PYTHONUNBUFFERED=1
# a relative OUT from the caller's folder (the archives are written from inside the results folder below)
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); fi
cd "$(dirname "$0")/.."
if [[ $# -lt 1 ]]; then  # a usage error, as an unknown part's (exit 2)
  echo "usage: bash experiments/gpu_full.sh PART (bench|bench-mha|bench-gqa|long-doc|long-doc1|long-doc2|tree|e2e-part1|e2e-part2|e2e-part3|smoke|anchors|tp-smoke|tp-7b-1k|tp-7b-16k|tp-13b)" >&2
  exit 2
fi
PART=$1
ANCHORS_DIR=${ANCHORS_DIR:-.anchors}
PARTS=" bench bench-mha bench-gqa anchors long-doc long-doc1 long-doc2 tree e2e-part1 e2e-part2 e2e-part3 smoke tp-smoke tp-7b-1k tp-7b-16k tp-13b "
if [[ "$PARTS" != *" $PART "* ]]; then  # before anything else: a typo is named as one, on any machine
  echo "unknown part $PART (one of:$PARTS)" >&2; exit 2
fi
if [[ "$PART" == anchors ]]; then  # local set-up: FlashInfer's source tree, for the GPU call's carry
  TARBALL=${ANCHORS_TARBALL:-../shared/anchors/flashinfer-0.2.14.post1-jit.tar.gz}
  [[ -f "$TARBALL" ]] || { echo "[gpu_full] anchors: no tarball at $TARBALL (set ANCHORS_TARBALL)" >&2; exit 2; }
  mkdir -p "$ANCHORS_DIR" && tar -xzf "$TARBALL" -C "$ANCHORS_DIR"
  if [[ "$ANCHORS_DIR" == /* ]]; then  # outside the tree: nothing to exclude from git, nothing the device tool carries
    du -sh "$ANCHORS_DIR"; echo "[gpu_full] extracted into $ANCHORS_DIR (the bench parts read it as ANCHORS_DIR)"; exit 0
  fi
  grep -qxF "/$ANCHORS_DIR/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$ANCHORS_DIR/" >> .git/info/exclude; }
  du -sh "$ANCHORS_DIR"; echo "[gpu_full] now carry '$ANCHORS_DIR' to the GPU machine with the bench parts"; exit 0
fi
if [[ "$PART" == tp-* ]]; then  # several GPUs: NCCL's NVLink multicast stays off (the machines' rule)
  export NCCL_NVLS_ENABLE=0
fi
if [[ "$PART" == bench* ]]; then
  export XLA_CLIENT_MEM_FRACTION=${XLA_CLIENT_MEM_FRACTION:-${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.80}}
  if [[ -d "$ANCHORS_DIR/flashinfer" ]]; then
    anchors_path=$ANCHORS_DIR; [[ "$anchors_path" == /* ]] || anchors_path="$PWD/$anchors_path"
    export PYTHONPATH="$anchors_path${PYTHONPATH:+:$PYTHONPATH}"
    export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fiws} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    export MAX_JOBS=${MAX_JOBS:-32}
  fi
fi
# JAX preallocates 75% of the GPU by default; the largest points need more (estimates: python -m experiments plan).
# (jaxlib 0.11 refuses XLA_PYTHON_CLIENT_MEM_FRACTION together with XLA_CLIENT_MEM_FRACTION: set only the latter.)
export XLA_CLIENT_MEM_FRACTION=${XLA_CLIENT_MEM_FRACTION:-${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}}
unset XLA_PYTHON_CLIENT_MEM_FRACTION
# A persistent compilation cache makes a re-run of a part (e.g. after a timeout) skip the compiles already done on
# this machine; compile_s of a cache hit is small, and the records name the cache directory.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/hydragen_jax_compile_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}

PYTHON=${GPU_PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  # the set-up's venv where it is whole; one a failed (offline) set-up left without jax would fail every part
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import jax' 2>/dev/null; then PYTHON=.venv/bin/python
  else
    [[ -e .venv ]] && echo "[gpu_full] .venv has no jax (a set-up that did not finish?): using python3" >&2
    PYTHON=python3
  fi
fi
LIMIT=${LIMIT:-560}   # seconds for the experiment itself; the whole device call is killed at 600
# EXTRA's words as the shell would split them (a quoted value keeps its spaces: --set "grid.prefixes=[1024, 4096]"),
# without globbing ([64] is not a file pattern here)
EXTRA_ARGS=()
if [[ -n "${EXTRA:-}" ]]; then set -f; eval "EXTRA_ARGS=($EXTRA)"; set +f; fi
FAILED=0  # the first failing experiment's status: the script's own, once every part's results are archived
STAMP=$(date -u +%Y%m%d-%H%M%S)
# the platform, and the device as the results' names spell it (records.device_slug: the tuning files' slug)
probe=$("$PYTHON" -c 'import jax; from experiments import records; print(jax.devices()[0].platform, records.device_slug())') \
  || { echo "[gpu_full] $PYTHON cannot run JAX (above; set GPU_PYTHON to one that can)" >&2; exit 2; }
read -r PLATFORM DEVICE <<<"$probe"
RESULTS=experiments/results
mkdir -p "$RESULTS"
if [[ "$PLATFORM" != gpu && "$PART" != smoke && -z "${FORCE:-}" ]]; then
  echo "[gpu_full] platform is $PLATFORM: full parts are GPU-sized (set FORCE=1 to run anyway)" >&2; exit 2
fi
echo "[gpu_full] part=$PART platform=$PLATFORM device=$DEVICE python=$PYTHON stamp=$STAMP"
if [[ "$PART" == bench* ]]; then  # which anchors will run (the bench records the reasons of those that do not)
  "$PYTHON" -c 'from experiments import anchors
for name in anchors.ANCHORS: print("[gpu_full] anchor", name + ":", anchors.skip_reason(name) or "runs")' || true
fi

run() {  # run NAME CONFIG [ARGS...]: one experiment, then plots, then copies to $OUT
  local name=$1${TAG:+-$TAG} config=$2; shift 2
  local base="$RESULTS/$name-$DEVICE-$STAMP"
  local start=$SECONDS
  local status=0
  timeout --signal=INT "$LIMIT" "$PYTHON" -m experiments run "$config" --out "$base.jsonl" --no-progress \
    "$@" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} || status=$?  # (an empty array under set -u: bash <= 4.3)
  if (( status != 0 )); then
    echo "[gpu_full] $name exited with status $status (partial results kept)"
    (( FAILED != 0 )) || FAILED=$status
  fi
  echo "[gpu_full] $name took $((SECONDS - start)) s"
  if [[ -s "$base.jsonl" ]]; then
    [[ -s "$base.md" ]] || "$PYTHON" -m experiments report "$base.jsonl" || echo "[gpu_full] report of $name failed"
    "$PYTHON" -m experiments plot "$base.jsonl" --out "$RESULTS" || echo "[gpu_full] plotting $name failed"
    if [[ -n "${OUT:-}" ]]; then  # one archive a part (jsonl, md, PNGs): several parts fit a call's 8 files
      mkdir -p "$OUT"
      (shopt -s nullglob; cd "$RESULTS" && tar czf "$OUT/${base##*/}.tgz" "${base##*/}".* "${base##*/}"-*.png) \
        || echo "[gpu_full] archiving $name into \$OUT failed"
    fi
  fi
}

rows() {  # rows LIST: the --set assignment that keeps bench_attention's seed rows LIST (e.g. "0,1,2,3,4"); a bad
  # LIST ends the script (exit 2) with select_rows' message, not a run with an empty --set
  "$PYTHON" -c 'import sys
from experiments.__main__ import select_rows
from experiments.config import ConfigError
try:
    print(select_rows("bench_attention", False, sys.argv[1], []))
except ConfigError as e:
    sys.exit(f"[gpu_full] ROWS={sys.argv[1]}: {e}")' "$1" || exit 2
}

case "$PART" in
  bench)     if [[ -n "${ROWS:-}" ]]; then sel=$(rows "$ROWS"); run bench_attention bench_attention --set "$sel"
             else run bench_attention bench_attention; fi ;;
  bench-mha) sel=$(rows "${ROWS:-0,1,2,3,4}"); run bench_attention-mha bench_attention --set "$sel" ;;
  bench-gqa) sel=$(rows "${ROWS:-5,6,7,8}"); run bench_attention-gqa bench_attention --set "$sel" ;;
  e2e-part1) run e2e_throughput-part1 e2e_throughput --set "grid.prefixes=[1024]" ;;
  e2e-part2) run e2e_throughput-part2 e2e_throughput --set "grid.prefixes=[4096]" ;;
  e2e-part3) run e2e_throughput-part3 e2e_throughput --set "grid.prefixes=[16384]" ;;
  tp-smoke)
    LIMIT=240
    run e2e_tp-smoke e2e_tp --smoke
    timeout --signal=INT 420 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/tp_cases.py \
      || echo "[gpu_full] tests/tp_cases.py failed or timed out" ;;
  tp-7b-1k)  run e2e_tp-7b-1k e2e_tp --set "grid.prefixes=[1024]" ;;
  tp-7b-16k) run e2e_tp-7b-16k e2e_tp --set "grid.prefixes=[16384]" ;;
  tp-13b)    run e2e_tp-13b e2e_tp --set "grid.batches=[1024]" --set model.shape.vocab_size=32016 \
               --set model.shape.hidden_size=5120 --set model.shape.intermediate_size=13824 \
               --set model.shape.num_hidden_layers=40 --set model.shape.num_attention_heads=40 \
               --set model.shape.num_key_value_heads=40 ;;
  long-doc)  run long_document long_document ;;
  long-doc1) run long_document-part1 long_document --set "grid.prefixes=[1024, 16384, 4096]" ;;
  long-doc2) run long_document-part2 long_document --set "grid.prefixes=[32768, 2048, 8192]" ;;
  tree)      run tree_apps tree_apps ;;
  smoke)
    LIMIT=120
    for c in bench_attention e2e_throughput long_document tree_apps; do run "$c-smoke" "$c" --smoke; done ;;
  *) echo "unknown part $PART" >&2; exit 2 ;;
esac
ls -la "$RESULTS" | tail -n 12
exit "$FAILED"
