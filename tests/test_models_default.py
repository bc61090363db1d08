"""The embedded default model, its training script and the demo (python -m models)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

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
    assert main(["--samples", "2", "--max-new-tokens", "8", "--modes", "hydragen,standard", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "decode tok/s" in out and "standard" in out and "sharing tree" in out


@pytest.mark.slow
def test_training_script_smoke(tmp_path):
    curve = train(minutes=0.05, out=str(tmp_path / "m"), batch=2, seq=32, log_every=1000)
    assert np.isfinite(curve[-1][2])
    model = load_checkpoint(tmp_path / "m")
    assert model.config.vocab_size == 259
