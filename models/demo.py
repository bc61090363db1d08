"""The main job: many completions of prompts that share a prefix, and Hydragen vs the baselines.

    python -m models [--samples 8] [--max-new-tokens 96] [--modes hydragen,standard,shared_storage,none]

Loads the embedded default model (a tiny byte-level Llama trained on Python's standard library by
``python -m models.train_default``) through the HF checkpoint loader, builds a few-shot prompt (shared by
all) followed by several function headers (each shared by its samples), generates with Hydragen showing
progress per chunk of decode steps, prints a few completions, then times the decode loop of every mode on the
same prompts and prints a table. On a GPU the same command runs the Pallas kernels (bf16).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import jax
import jax.numpy as jnp

from models.cache import cache_bytes
from models.checkpoint import load_checkpoint
from models.generate import generate, prefill
from models.sharing import build_sharing_tree, expand_samples
from models.tokenizer import ByteTokenizer

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "default_model")

FEW_SHOT = '''\
import os
import re


def count_words(text):
    """Return the number of words in text."""
    return len(text.split())


def read_lines(path):
    """Return the lines of the file at path, without newlines."""
    with open(path) as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    """A counter that remembers how often each key was added."""

    def __init__(self):
        self.counts = {}

    def add(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]

    def most_common(self):
        return sorted(self.counts.items(), key=lambda item: item[1], reverse=True)


def find_files(root, suffix):
    """Yield the paths under root whose name ends with suffix."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(suffix):
                yield os.path.join(dirpath, name)


def strip_comments(source):
    """Remove the comments from Python source code."""
    result = []
    for line in source.splitlines():
        result.append(re.sub(r"#.*$", "", line))
    return "\\n".join(result)


'''

PROBLEMS = [
    'def is_palindrome(text):\n    """Return True if text reads the same backwards."""\n',
    'def parse_header(line):\n    """Split a "name: value" header line into a tuple."""\n',
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n',
    'def flatten(items):\n    """Return a flat list of the items of nested lists."""\n',
]


def load_default_model(dtype=None, path: str = DEFAULT_MODEL_DIR):
    """The embedded default model (fp32 on CPU, bf16 on GPU unless ``dtype`` is given)."""
    if dtype is None:
        dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"default model not found at {path}; train it with `python -m models.train_default`")
    return load_checkpoint(path, dtype=dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL_DIR, help="HF-format Llama directory (default: embedded)")
    ap.add_argument("--samples", type=int, default=8, help="samples per problem (4 problems)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--modes", default="hydragen,standard,shared_storage,none",
                    help="modes to time (comma-separated)")
    ap.add_argument("--backend", default=None, help="pallas | interpret | xla (default: pallas on GPU, else xla)")
    ap.add_argument("--show", type=int, default=4, help="completions to print")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    tok = ByteTokenizer()
    model = load_default_model(path=args.model)
    c = model.config
    print(f"model: {args.model} ({c.num_hidden_layers} layers, d_model {c.hidden_size}, "
          f"{c.num_attention_heads}/{c.num_key_value_heads} q/kv heads, {model.dtype.name}); "
          f"device: {jax.default_backend()}")
    prompts = [FEW_SHOT + p for p in PROBLEMS]
    tree = build_sharing_tree(expand_samples([tok.encode(p) for p in prompts], args.samples))
    print(f"sharing tree: {tree.describe()}")
    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    common = dict(num_samples=args.samples, max_new_tokens=args.max_new_tokens, sampling=sampling,
                  tokenizer=tok, seed=args.seed, backend=args.backend, tree=tree, progress=True)

    g = generate(model, prompts, mode="hydragen", progress_desc="hydragen: generating", **common)
    for b in range(0, tree.num_sequences, max(1, tree.num_sequences // max(args.show, 1)))[:args.show]:
        head = PROBLEMS[b // args.samples]
        print(f"\n--- sample {b} (problem {b // args.samples}, {g.lengths[b]} tokens) ---")
        print(textwrap.indent(head + g.texts[b], "  |"))
    print()

    rows = [("hydragen", g.stats)]
    for mode in [m for m in args.modes.split(",") if m and m != "hydragen"]:
        rows.append((mode, generate(model, prompts, mode=mode, progress_desc=f"{mode}: timing", **common).stats))
    mem = {}
    for mode, _ in rows:
        mem[mode] = cache_bytes(prefill(model, tree, args.max_new_tokens, mode=mode, backend=args.backend).cache)
    base = dict(rows).get("standard", g.stats)["decode_tokens_per_s"]
    print(f"\n{tree.num_sequences} sequences x {args.max_new_tokens} new tokens, prompt "
          f"{len(tok.encode(prompts[0]))} tokens ({len(tree.levels[0].nodes[0]) if tree.levels else 0} shared by all)")
    print(f"{'mode':<16}{'decode tok/s':>14}{'vs standard':>13}{'compile s':>11}{'KV cache MB':>13}")
    for mode, s in rows:
        print(f"{mode:<16}{s['decode_tokens_per_s']:>14,.0f}{s['decode_tokens_per_s'] / base:>12.2f}x"
              f"{s['compile_s']:>11.1f}{mem[mode] / 2**20:>13.1f}")
    if "none" in dict(rows):
        print("(none = attention skipped: an upper bound, its text is meaningless)")
    if (args.backend or jax.default_backend()) == "interpret":
        print("(interpret = the Pallas kernels interpreted on CPU: a correctness check, its timings mean nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
