"""README.md's Python examples run as written (on the CPU: the reference backend), so that they cannot go stale."""

import pathlib
import re

import jax.numpy as jnp
import pytest
from jax.experimental import checkify

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_usage_and_checked_mode_examples_run():
    """The Usage example (its output's shape) and the checked mode's, whose comment quotes the error it raises."""
    usage, checked = _blocks()[:2]
    assert "hydragen_attention" in usage and "checkify" in checked
    scope: dict = {}
    exec(usage, scope)  # noqa: S102 (the README's own code)
    assert scope["out"].shape == (64, 1, 32, 128)
    quoted = re.search(r"# JaxRuntimeError: (.*)$", checked, re.M).group(1)
    with pytest.raises(checkify.JaxRuntimeError, match=re.escape(quoted)):
        exec(checked, scope)  # noqa: S102


def test_generate_example_runs_on_a_saved_checkpoint(tmp_path):
    """The models example, its path a tiny checkpoint saved here with a tokenizer (tests/fixtures/hf_tokenizer),
    `few_shot` / `problems` what it leaves to the user."""
    pytest.importorskip("tokenizers", reason="optional 'tokenizers' package not installed: pip install -e '.[demo]'")
    import shutil  # noqa: PLC0415

    from models import LlamaConfig, init_random, save_checkpoint  # noqa: PLC0415

    example = next(b for b in _blocks() if "load_checkpoint" in b and "generate(" in b and "mesh" not in b)
    fixture = pathlib.Path(__file__).parent / "fixtures" / "hf_tokenizer"
    config = LlamaConfig(vocab_size=389, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512)
    save_checkpoint(init_random(config, jnp.float32, seed=0), tmp_path / "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture / name, tmp_path / "llama")
    scope = {"few_shot": "def add(a, b):\n    return a + b\n\n", "problems": ["def f(x):", "def g(y):"]}
    exec(example.replace("path/to/llama", str(tmp_path / "llama")).replace("max_new_tokens=256", "max_new_tokens=4"),
         scope)  # noqa: S102
    assert scope["out"].tokens.shape == (16, 4) and len(scope["out"].texts) == 16
