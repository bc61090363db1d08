"""Do two revisions compile the single-device model to the same programs? (Issue 16: tensor parallelism must leave
the mesh=None path as it was.)

    python -m scripts.same_hlo BASE_REV [--families llama,qwen2,qwen3]

Checks out BASE_REV (git archive into a temporary directory), and in both it and this working tree lowers and
compiles, for a tiny model of each family, the prefill and the decode loop of every mode, in float32 and bfloat16,
greedy and with sampling; compares the StableHLO and the optimized HLO with source locations left out. Prints one
line per family and exits 1 where they differ (the first differing lines shown; 2 where a tree cannot make them).
The default families are three of `models.config.FAMILIES` (llama; qwen2: q/k/v biases; qwen3: q/k norms); name
others with --families. CPU, one to four minutes a family (two trees, every mode, two dtypes).
"""

from __future__ import annotations

import argparse
import difflib
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Run in each tree (its own `models` on sys.path): print every program of the family's tiny model.
DUMP = r'''
import importlib, sys
import jax, jax.numpy as jnp
import models
from models.config import LlamaConfig
from models.sharing import build_sharing_tree
g = importlib.import_module("models.generate")
cfg = LlamaConfig(vocab_size=72, hidden_size=24, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=10, max_position_embeddings=256, model_type=sys.argv[1])
prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9], [1, 2, 3, 4, 5, 7]]
for mode in ("hydragen", "shared_storage", "standard", "none"):
    for dtype in (jnp.float32, jnp.bfloat16):
        model = models.init_random(cfg, dtype, 0)
        try:
            plan, arrays = g._host_arrays(build_sharing_tree(prompts, 3), 4, 16, 2048, dense=mode == "standard")
        except TypeError:  # a revision before 2026-12-04, whose plan carried the dense capacity in every mode
            plan, arrays = g._host_arrays(build_sharing_tree(prompts, 3), 4, 16, 2048)
        print(g._prefill_jit.lower(model.params(), jax.tree.map(jnp.asarray, arrays), config=cfg, plan=plan,
                                   mode=mode, backend="xla").as_text())
        state = models.prefill(model, prompts, 4, mode=mode, backend="xla")
        for sampling in (None, {"temperature": 0.7, "top_p": 0.9}):
            s = g.SamplingConfig.make(sampling)
            if hasattr(s, "static"):  # since 2026-12-07: temperature and top_p traced arguments
                lowered = g._decode_jit.lower(model.params(), state, jnp.int32(1), s.temperature, s.top_p,
                                              config=cfg, sampling=s.static(), backend="xla")
            else:
                lowered = g._decode_jit.lower(model.params(), state, jnp.int32(1), config=cfg, sampling=s,
                                              backend="xla")
            print(lowered.as_text())
            print(lowered.compile().as_text())
'''

_NOISE = re.compile(r'^(\d+ [{"]|#loc|FileNames|FunctionNames|FileLocations|StackFrames|\s*$)')


def programs(tree: pathlib.Path, family: str) -> list[str]:
    """The program texts of `tree`'s code, without source locations (file paths and line numbers differ)."""
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", DUMP, family], cwd=tree, env=env, capture_output=True, text=True)
    if run.returncode:  # e.g. a base revision without the family: its error's last line, not a traceback of ours
        last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(last)
    text = run.stdout
    text = re.sub(r" loc\(#loc\d*\)", "", re.sub(r", metadata=\{[^}]*\}", "", text))
    return [line for line in text.splitlines() if not _NOISE.match(line)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the revision to compare with (e.g. main, a27360f)")
    parser.add_argument("--families", default="llama,qwen2,qwen3")
    args = parser.parse_args(argv)
    from models.config import FAMILIES  # noqa: PLC0415 (this tree's families: jax only once the arguments parse)

    families = args.families.split(",")
    if bad := [f for f in families if f not in FAMILIES]:
        parser.error(f"--families {args.families!r}: unknown {bad}; expected some of {', '.join(FAMILIES)}")
    if len(set(families)) < len(families):
        parser.error(f"--families {args.families!r}: a family given twice")
    if subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}"], cwd=ROOT,
                      capture_output=True).returncode:
        parser.error(f"base {args.base!r}: not a revision of this repository ({ROOT}); expected e.g. main or a27360f")
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        for family in families:
            made = []
            for name, tree in ((args.base, pathlib.Path(tmp)), ("the working tree", ROOT)):
                try:
                    made.append(programs(tree, family))
                except RuntimeError as e:
                    print(f"same_hlo: the {family} programs of {name} could not be made: {e}", file=sys.stderr)
                    return 2
            base, here = made
            diff = list(difflib.unified_diff(base, here, args.base, "working tree", lineterm="", n=0))
            print(f"{family}: {len(here)} lines of programs, {'the same' if not diff else 'DIFFERENT'}")
            if diff:
                print("\n".join(diff[:40]))
                same = False
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
