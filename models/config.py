"""Llama-family model configuration, read from a Hugging Face ``config.json``.

Supported: ``LlamaForCausalLM`` checkpoints (Llama 2, CodeLlama, Llama 3, 3.1, 3.2, 3.3): RMSNorm, RoPE with
any theta and optional ``llama3`` or ``linear`` frequency scaling, grouped-query attention, SwiGLU MLP, tied or
untied embeddings. Anything else (other architectures, attention/MLP biases, sliding windows, other RoPE
scalings, other activations) is refused with a ``ValueError`` that names the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type``: "llama3" (Llama 3.1+) or "linear" (positions / factor)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static model hyper-parameters (hashable: usable as a ``jax.jit`` static argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"config: rope_theta must be positive, got {self.rope_theta}")

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Build from the dict of a HF ``config.json``; raises ``ValueError`` for what is not supported."""
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if bad:
            raise ValueError(f"config: unsupported architecture {bad[0]!r} (supported: {SUPPORTED_ARCHITECTURES})")
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config: unsupported model_type {model_type!r} (only 'llama')")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config: unsupported hidden_act {act!r} (only 'silu', i.e. SwiGLU)")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag, False):
                raise ValueError(f"config: {flag}=true is not supported")
        if d.get("sliding_window") not in (None, 0):
            raise ValueError(f"config: sliding_window={d['sliding_window']!r} is not supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"config: missing required key {missing[0]!r}")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        eos = d.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=_parse_rope_scaling(d.get("rope_scaling")),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LlamaConfig":
        """Read ``path`` (a ``config.json`` file or a checkpoint directory containing one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config: {path} not found")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """HF-style ``config.json`` dict (round-trips through ``from_dict``)."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dataclasses.asdict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
        }
        return d


def _parse_rope_scaling(rs: dict[str, Any] | None) -> RopeScaling | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"config: rope_scaling must be a dict or null, got {rs!r}")
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config: unsupported rope_scaling type {rope_type!r} (supported: {SUPPORTED_ROPE_TYPES})")
    if rope_type == "default":
        return None
    factor = float(rs.get("factor", 1.0))
    if factor <= 0:
        raise ValueError(f"config: rope_scaling factor must be positive, got {factor}")
    if rope_type == "linear":
        return RopeScaling("linear", factor)
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in rs:
            raise ValueError(f"config: rope_scaling of type 'llama3' needs {key!r}")
    low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    if not high > low:
        raise ValueError(f"config: rope_scaling high_freq_factor ({high}) must exceed low_freq_factor ({low})")
    return RopeScaling("llama3", factor, low, high, int(rs["original_max_position_embeddings"]))
