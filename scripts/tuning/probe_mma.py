"""Which tensor-core instructions the prefix kernels execute (development tool; GPU with Nsight Compute).

The XLA dump of JAX 0.11.2 holds no PTX for Pallas kernels, so this runs the kernels under `ncu` and reads the
instruction counts of the tensor pipes: `gmma` (Hopper warp-group MMA, wgmma) and `hmma` (mma.sync, the pre-Hopper
MMA). Runs once each: the prefix product of B=1024 P=8192 (32/8 heads, D=128) with the light (64x64, 4 warps) and
heavy (128x128, 8 warps) Triton tiles, and JAX's Mosaic GPU attention kernel in float16 as a control that must
show gmma. Usage (see scripts/tuning/device_round.sh, PROBE=1):

  ncu --metrics sm__inst_executed_pipe_tensor_op_gmma.sum,sm__inst_executed_pipe_tensor_op_hmma.sum \
      python -m scripts.tuning.probe_mma
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from hydragen_jax.kernels.flash import BlockConfig
from scripts.quick_bench import prefix_plan, run_plans
from scripts.tuning.sweep_kernels import inputs

def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m scripts.tuning.probe_mma", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.parse_args(argv)
  if jax.default_backend() != "gpu":
    parser.exit(2, f"probe_mma: runs compiled GPU kernels, and this machine has no GPU ({jax.default_backend()})\n")
  q, k, v, _, _ = inputs(8)  # seed config 8: B=1024, P=8192, 32/8 heads, D=128
  b, _, hq, d = q.shape
  for blk in (BlockConfig(64, 64, 1, 4, 3), BlockConfig(128, 128, 1, 8, 3)):
    print(f"[probe_mma] Triton prefix tile {blk}", flush=True)
    fn = jax.jit(lambda q, k, v, blk=blk: run_plans(q, [prefix_plan(q, k, v, block=blk)]))
    jax.block_until_ready(fn(q, k, v))
  try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am  # noqa: PLC0415
    print("[probe_mma] control: jax attention_mgpu (float16)", flush=True)
    cfg = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
    f16 = lambda x: x.astype(jnp.float16)  # noqa: E731
    jax.block_until_ready(am.attention(f16(q).reshape(1, b, hq, d), f16(k), f16(v), cfg))
  except Exception as e:  # noqa: BLE001 - the control is optional
    print(f"[probe_mma] control failed: {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
  main()
