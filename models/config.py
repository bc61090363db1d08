"""Decoder configuration of the Llama, Mistral, Qwen2, Qwen3, SmolLM3, Granite, OLMo 2, Phi-3 and Gemma families, read
from a Hugging Face ``config.json``.

All nine share one decoder (RMSNorm, RoPE, grouped-query attention, gated MLP, tied or untied embeddings); a
``Family`` records what a family adds: q/k/v biases (Qwen2), RMSNorm of q and k over ``head_dim`` (Qwen3), layers
without RoPE (SmolLM3), multipliers of the embeddings, logit scale, residual branches and logits (Granite), norms of
the attention's and MLP's outputs instead of their inputs and of q and k over all heads (OLMo 2), checkpoint tensors
of q/k/v and of gate/up fused (Phi-3), embeddings scaled by sqrt(hidden_size), norm weights stored as offsets from 1
and a GELU-gated MLP (Gemma).
Supported RoPE: any theta, ``llama3``, ``linear``, ``yarn`` or ``longrope`` frequency scaling (longrope, Phi-3's on
any family as transformers runs it: its short factors within its pretraining context, its long ones past it:
``LlamaConfig.with_long_rope``), and Phi-3's ``partial_rotary_factor`` (Phi-4-mini's 0.75: RoPE on the first 96 of
128 dimensions). Both ``config.json`` layouts are read: transformers 4 (top-level ``rope_theta`` and ``rope_scaling``) and transformers 5 (``rope_parameters``, one
flat dict); they give the same config for the same model.

Nothing that changes the model's output is ignored: an unsupported value (RoPE type, biases, a sliding window in
effect, partial rotary outside Phi-3, another activation) or a key this module does not know raises
``CheckpointError`` naming the key and its value. ``HARMLESS_KEYS`` lists the keys known not to change the logits
(``HARMLESS_WHEN_EMPTY`` those that change nothing at their empty value; any key named ``hydragen_...``, this
project's metadata, ``OWN_PREFIX``).
A key that config.json leaves out takes the default of the family's transformers config class (``Family``): what
transformers itself would use for that file (e.g. Mistral's 4096-token sliding window, which then caps the sequences).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint (config or tensors) is unsupported, incomplete or inconsistent."""


def is_int(x: Any) -> bool:
    """Whether ``x`` is an integer and not a bool (which Python counts as one): a JSON or GGUF integer value."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_integer(x: Any) -> bool:
    """Whether ``x`` is an integer given at run time: a Python or numpy integer, or a 0-d integer array (numpy or
    jax); not a bool."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, numbers.Integral):
        return True
    dtype = getattr(x, "dtype", None)
    try:
        return dtype is not None and getattr(x, "ndim", None) == 0 and np.issubdtype(dtype, np.integer)
    except TypeError:  # a dtype numpy cannot read (a typed PRNG key's, another library's): not an integer
        return False


@dataclasses.dataclass(frozen=True)
class Family:
    """What one HF model family adds to the plain Llama decoder."""

    architecture: str
    qkv_bias: bool = False  # q/k/v projections carry biases (o_proj does not)
    qk_norm: bool = False  # RMSNorm over head_dim of each q and k head, before RoPE
    nope_layers: bool = False  # some layers skip RoPE (SmolLM3's no_rope_layers; by default every 4th)
    multipliers: bool = False  # Granite's embedding / attention / residual multipliers and logits scaling
    post_norms: bool = False  # OLMo 2: RMSNorm of the attention's and the MLP's outputs (none of their inputs), and
    # of q and k over all heads' width (q_proj's and k_proj's outputs), each norm's weight applied in float32
    fused_projections: bool = False  # Phi-3: q/k/v in one checkpoint tensor (qkv_proj), gate/up in one (gate_up_proj)
    longrope: bool = False  # Phi-3: RoPE scaling is longrope only (its configs' "su" and "yarn" read as longrope),
    # its pretraining context the top-level original_max_position_embeddings (default 4096); the other families read
    # a longrope dict as it is (its own original_max_position_embeddings, else max_position_embeddings)
    partial_rotary: bool = False  # Phi-3 / Phi-4-mini: partial_rotary_factor, RoPE on the first part of head_dim only
    scaled_embeddings: bool = False  # Gemma: the embeddings times sqrt(hidden_size), rounded to their dtype first
    unit_offset_norms: bool = False  # Gemma: every RMSNorm weight stored as its offset from 1 (x times 1 + weight),
    # applied in float32
    # hidden_act values the family's MLP runs (models.llama.ACTIVATIONS); the first is its config class's default
    hidden_acts: tuple[str, ...] = ("silu",)
    keys: frozenset[str] = frozenset()  # config keys of this family beyond the common ones
    window_flag: bool = False  # a sliding window applies only with use_sliding_window and to "sliding" layers
    # transformers' defaults for the family's config class where config.json leaves a key out
    default_max_positions: int = 2048
    default_window: int | None = None  # sliding_window (None: no window; a given one is still checked)
    # bos / eos / pad token ids where config.json leaves them out: transformers' defaults for the family's config
    # class (which it omits when saving a config whose value equals them): 1 / 2 / none for Llama and Mistral, none
    # for Qwen, 2 / 1 / 0 for Gemma
    default_bos: int | None = 1
    default_eos: int | None = 2
    default_pad: int | None = None
    # num_key_value_heads / head_dim where config.json leaves the key out (None: num_attention_heads /
    # hidden_size // num_attention_heads); a key given as null takes those in every family, as transformers' Llama
    # does (5.17's Qwen3, Gemma, Phi-3, OLMo 2 config classes refuse a null head_dim, Mistral's and Gemma's a null
    # num_key_value_heads: save_checkpoint never writes one)
    default_kv_heads: int | None = None
    default_head_dim: int | None = None
    default_tie: bool = False  # tie_word_embeddings
    default_eps: float = 1e-6  # rms_norm_eps
    default_theta: float = 10000.0  # rope_theta


# use_mrope: Qwen2.5's configs carry `"use_mrope": false`; only false is accepted (multimodal RoPE is Qwen2-VL's)
_QWEN_KEYS = frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "use_mrope"})
FAMILIES = {  # model_type -> Family
    "llama": Family("LlamaForCausalLM", keys=frozenset({"sliding_window"})),
    "mistral": Family("MistralForCausalLM", keys=frozenset({"sliding_window"}), default_max_positions=4096 * 32,
                      default_window=4096, default_kv_heads=8),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, keys=_QWEN_KEYS, window_flag=True,
                    default_bos=None, default_eos=None, default_max_positions=32768, default_window=4096,
                    default_kv_heads=32),
    "qwen3": Family("Qwen3ForCausalLM", qk_norm=True, keys=_QWEN_KEYS, window_flag=True,
                    default_bos=None, default_eos=None, default_max_positions=32768, default_window=4096,
                    default_kv_heads=32, default_head_dim=128),
    # SmolLM3: Llama with RoPE left out of every 4th layer (NoPE); its window, where in effect, on those layers
    "smollm3": Family("SmolLM3ForCausalLM", nope_layers=True, window_flag=True,
                      keys=frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
                                      "no_rope_layers", "no_rope_layer_interval"}),
                      default_bos=128000, default_eos=128001, default_max_positions=32768, default_kv_heads=4,
                      default_tie=True, default_theta=2e6),
    # Granite (IBM Granite 3.x): Llama with four scalars (MULTIPLIERS)
    "granite": Family("GraniteForCausalLM", multipliers=True, keys=frozenset(
        {"embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"})),
    # OLMo 2 (AllenAI's open models): norms after the attention and the MLP, q/k norms over all heads
    "olmo2": Family("Olmo2ForCausalLM", post_norms=True, default_bos=None, default_eos=50279, default_eps=1e-5),
    # Phi-3 / Phi-4: Llama's decoder with fused projection tensors; its window applies to every layer (Phi-3-mini-4k's
    # 2047: sequences up to that); residual / embedding dropout (training only)
    # (Phi-4-mini's config.json also holds full_attn_mod, interpolate_factor and lm_head_bias, which transformers'
    # Phi-3 does not read: accepted at the values that change nothing, PHI4_MINI_KEYS)
    "phi3": Family("Phi3ForCausalLM", fused_projections=True, longrope=True, partial_rotary=True, default_eos=32000,
                   default_max_positions=4096, default_eps=1e-5,
                   keys=frozenset({"sliding_window", "original_max_position_embeddings", "resid_pdrop", "embd_pdrop",
                                   "full_attn_mod", "interpolate_factor", "lm_head_bias"})),
    # Gemma (Gemma 2B / 7B, Gemma 1.1, CodeGemma): the embeddings scaled, norm weights offsets from 1, GELU(gate) * up;
    # head_dim 256 whatever hidden_size / heads. transformers 5 reads hidden_act only (4.42 read hidden_activation,
    # tanh GELU where absent): hidden_activation is not read here either, and hidden_act "gelu" is exact GELU
    "gemma": Family("GemmaForCausalLM", scaled_embeddings=True, unit_offset_norms=True,
                    hidden_acts=("gelu_pytorch_tanh", "gelu"), keys=frozenset({"hidden_activation",
                                                                               "use_bidirectional_attention"}),
                    default_bos=2, default_eos=1, default_pad=0, default_max_positions=8192, default_kv_heads=16,
                    default_head_dim=256, default_tie=True),
}
MAX_LAYERS = 1 << 16  # the most num_hidden_layers a config may say (the largest open models have ~100-200)

# model types that are refused with the reason (a family of the same name whose math differs)
UNSUPPORTED_FAMILIES = {
    "gemma2": "Gemma 2 soft-caps its attention scores and final logits (tanh), scales q by query_pre_attn_scalar, "
              "has a sliding window on every other layer and norms after the attention and the MLP",
    "gemma3_text": "Gemma 3 has Gemma 2's layers (q scaled by query_pre_attn_scalar, norms after the attention and the "
                   "MLP) with q/k norms, a sliding window on five layers of six and another RoPE theta on those",
}
UNSUPPORTED_FAMILIES["gemma3"] = UNSUPPORTED_FAMILIES["gemma3_text"] + "; and a vision tower"
# Granite's scalars, transformers' defaults where config.json leaves them out (attention_multiplier is the logit
# scale itself: 1.0 by default, not 1/sqrt(head_dim))
MULTIPLIERS = {"embedding_multiplier": 1.0, "attention_multiplier": 1.0, "residual_multiplier": 1.0,
               "logits_scaling": 1.0}
# Phi-4-mini's keys that transformers' Phi-3 does not read, and the one value each may take here: every layer full
# attention (full_attn_mod 1: no layer of a sliding pattern), no interpolation, no bias of the LM head (which
# transformers would not load)
PHI4_MINI_KEYS = {"full_attn_mod": 1, "interpolate_factor": 1, "lm_head_bias": False}
SUPPORTED_ARCHITECTURES = tuple(f.architecture for f in FAMILIES.values())
# rope type -> the keys its dict may hold besides rope_type / type / partial_rotary_factor
_ROPE_KEYS = {
    "default": {"rope_theta"},
    "linear": {"rope_theta", "factor"},
    "llama3": {"rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    # dynamic NTK: the base grows only past max_position_embeddings, which no sequence here reaches (max_length):
    # read as default RoPE (transformers' `_compute_dynamic_ntk_parameters` leaves the base as it is up to there)
    "dynamic": {"rope_theta", "factor"},
    "yarn": {"rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
             "mscale", "mscale_all_dim", "truncate"},
    "longrope": {"rope_theta", "factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                 "long_factor"},
}
SUPPORTED_ROPE_TYPES = tuple(_ROPE_KEYS)
LAYER_TYPES = ("full_attention", "sliding_attention")

# Keys read by ``from_dict`` for every family (values checked there).
_COMMON_KEYS = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "hidden_act", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "rope_interleaved"})
# Keys known not to change the logits, whatever their value.
# defaults of transformers' generate(), not of the model (read from a config.json; not written by save_checkpoint's
# extra_config, as transformers' generate would apply them to the saved checkpoint: generation_config.json's place)
GENERATE_KEYS = frozenset({
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})
# how transformers runs the model, not its math (read from a config.json; not written by save_checkpoint's
# extra_config: transformers 5.17 refuses use_return_dict and unknown problem_type values, fails every forward with
# return_dict false and generate() with is_encoder_decoder true, and an _attn_implementation it lacks; with
# output_attentions / output_hidden_states its generate() returns an output object, not the tokens)
RUNTIME_KEYS = frozenset({"return_dict", "use_return_dict", "problem_type", "is_encoder_decoder",
                          "_attn_implementation", "output_attentions", "output_hidden_states"})
# keys of this name are this project's metadata, read by no model (transformers keeps them as config attributes):
# e.g. save_checkpoint(extra_config={"hydragen_provenance": ...})
OWN_PREFIX = "hydragen_"
HARMLESS_KEYS = GENERATE_KEYS | RUNTIME_KEYS | frozenset({
    # bookkeeping written by transformers or the hub
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "id2label", "label2id",
    "is_decoder", "tokenizer_class", "_attn_implementation_autoset",
    "torchscript", "use_bfloat16", "finetuning_task", "task_specific_params", "prefix", "sep_token_id",
    "decoder_start_token_id", "tf_legacy_loss", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder",
    # this project's own metadata (models.train_default's training record)
    "hydragen_default_model",
    # remote-code classes (Phi-3-mini's configuration_phi3.Phi3Config, ...): transformers builds its own class for
    # the model_type unless trust_remote_code, which this loader, like that default, does not follow
    "auto_map",
    # written by other tools, read by none of these models (nanotron's SmolLM2 configs, early Llama conversions;
    # transformers.js's ONNX run-time settings, e.g. its KV cache dtype, in hub repos that also ship ONNX files)
    "is_llama_config", "max_sequence_length", "transformers.js_config",
    # Unsloth's exports (a large share of hub fine-tunes): its version, and its mark that it fixed the tokenizer or
    # chat template (files this loader reads as they are)
    "unsloth_version", "unsloth_fixed",
    # training only: dropout is off at inference
    "attention_dropout",
    # the same products, split differently (tensor-parallel slices of pretraining, chunks of the MLP)
    "pretraining_tp", "chunk_size_feed_forward",
})
# Keys that change nothing at their empty value ({}, [] or null), which full config dumps write: other values are
# refused like any unknown key (pruned heads remove heads the loader's shapes would still expect).
HARMLESS_WHEN_EMPTY = frozenset({"pruned_heads"})


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type``: "llama3" (Llama 3.1+), "linear" (positions / factor) or "yarn" (YaRN,
    the long-context setting of Qwen2.5 / Qwen3 model cards: frequencies blended between interpolated and original
    over a band of dimensions set by ``beta_fast`` / ``beta_slow``, and cos / sin multiplied by
    ``attention_factor``, by default 0.1·ln(factor) + 1) or "longrope" (Phi-3.5, Phi-3-mini-128k: each frequency
    divided by its ``short_factor`` entry, cos / sin multiplied by ``attention_factor``, by default
    sqrt(1 + ln(factor) / ln(original_max_position_embeddings)); give longrope its context, an integer, as its
    checkpoint's config.json does). ``long_factor`` is what transformers computes with, from the first token, where a
    call's sequences are longer than that context: ``use_long`` True selects it, a choice made per call
    (``LlamaConfig.with_long_rope``: ``models.generate.prefill`` and the dense forward make it), not a key of the
    checkpoint (``to_dict`` leaves it out). "dynamic" (dynamic NTK) is default RoPE up to max_position_embeddings,
    the longest sequence this model takes (its base grows only past it), kept so that a checkpoint saves as it was
    read. The fields a type does not use keep their defaults."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | float = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    use_long: bool = False

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3", "yarn", "longrope", "dynamic"):  # default: rope_scaling=None
            raise ValueError(f"config: rope_scaling.rope_type must be 'linear', 'llama3', 'yarn', 'longrope' or "
                             f"'dynamic' (no scaling: rope_scaling=None), got {self.rope_type!r}")
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if (self.rope_type == "longrope") != (value is not None):
                raise ValueError(f"config: rope_scaling.{name} is longrope's and needed by it; rope_type "
                                 f"{self.rope_type!r}, got {value!r}")
            if value is not None and not (isinstance(value, tuple) and value and all(map(_positive_finite, value))):
                raise ValueError(f"config: rope_scaling.{name} must be a non-empty tuple of positive finite "
                                 f"numbers, got {value!r}")
        if self.rope_type == "longrope" and not is_int(self.original_max_position_embeddings):
            raise ValueError(f"config: rope_scaling.original_max_position_embeddings must be an integer for longrope "
                             f"(the longest sequence), got {self.original_max_position_embeddings!r}")
        names = ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
                 "beta_slow"] + (["attention_factor"] if self.attention_factor is not None else [])
        for name in names:
            value = getattr(self, name)
            if not _positive_finite(value):
                raise ValueError(f"config: rope_scaling.{name} must be a positive finite number, got {value!r}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"config: rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed "
                             f"low_freq_factor ({self.low_freq_factor})")
        if not isinstance(self.truncate, bool):
            raise ValueError(f"config: rope_scaling.truncate must be True or False, got {self.truncate!r}")
        if not isinstance(self.use_long, bool) or (self.use_long and self.rope_type != "longrope"):
            raise ValueError(f"config: rope_scaling.use_long (the long factors) is longrope's, True or False; "
                             f"rope_type {self.rope_type!r}, got {self.use_long!r}")

    @property
    def cos_sin_factor(self) -> float:
        """What cos and sin are multiplied by (YaRN's and longrope's attention factor: the scores grow by its
        square); 1 but for yarn and longrope."""
        if self.rope_type not in ("yarn", "longrope"):
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.rope_type == "yarn":
            return _yarn_mscale(self.factor)
        original = self.original_max_position_embeddings
        return 1.0 if self.factor <= 1 else math.sqrt(1 + math.log(self.factor) / math.log(original))


def _positive_finite(value: Any) -> bool:
    """Whether ``value`` is a positive finite real number (not a bool, which Python counts as one)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and 0 < value < math.inf


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor for a context ``factor`` times the original (transformers' ``get_mscale``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static model hyper-parameters (hashable: usable as a ``jax.jit`` static argument).

    ``model_type`` names the family (``FAMILIES``): "llama" (Llama 2 / 3 / 3.x, CodeLlama), "mistral", "qwen2"
    (Qwen2, Qwen2.5: q/k/v biases), "qwen3" (q/k RMSNorm), "smollm3" (RoPE in the layers ``rope_layers`` marks only),
    "granite" (the multipliers below), "olmo2" (norms after the attention and the MLP; q/k norms over all heads),
    "phi3" (Phi-3 / Phi-4: the checkpoint's q/k/v and gate/up tensors fused; default RoPE or longrope), "gemma"
    (Gemma 1, CodeGemma: embeddings times sqrt(hidden_size), RMSNorm weights as offsets from 1, a GELU-gated MLP).
    ``rope_layers``: whether each layer applies RoPE (None: all; SmolLM3's ``no_rope_layers``, its family only).
    ``sliding_window``: W, where every layer's query sees only the last W keys (Mistral-7B-v0.1's 4096, Phi-3-mini's
    2047; Llama, Mistral and Phi-3 only): sequences of at most W tokens are what the window does not change, and
    longer ones are refused (``max_length``); None: no window below max_position_embeddings.
    ``hidden_act``: the MLP's activation, act(gate) * up: "silu" (every family but Gemma), Gemma's "gelu_pytorch_tanh"
    (tanh-approximated GELU) or "gelu" (exact, erf); None: the family's default (its first).
    Granite's scalars (other families keep the defaults, which change nothing): the embeddings times
    ``embedding_multiplier``; the attention's logit scale ``attention_multiplier`` (None: 1/sqrt(head_dim)); each
    layer's attention and MLP outputs times ``residual_multiplier`` before they join the residual; the logits divided
    by ``logits_scaling``.
    """

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
    model_type: str = "llama"
    rope_layers: tuple[bool, ...] | None = None
    sliding_window: int | None = None
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    hidden_act: str | None = None
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"config: rope_theta must be a positive finite number, got {self.rope_theta}")
        if not (self.rms_norm_eps >= 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"config: rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps}")
        if self.model_type not in FAMILIES:
            raise ValueError(f"config: model_type must be one of {tuple(FAMILIES)}, got {self.model_type!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"config: rope_scaling must be a models.RopeScaling or None, got "
                             f"{type(self.rope_scaling).__name__} {self.rope_scaling!r} (a transformers-style dict: "
                             "LlamaConfig.from_dict reads those)")
        f = self.partial_rotary_factor
        if not _positive_finite(f) or f > 1:
            raise ValueError(f"config: partial_rotary_factor must be a number in (0, 1] (the part of head_dim RoPE "
                             f"rotates), got {f!r}")
        if f != 1:
            if not self.family.partial_rotary:
                raise ValueError(f"config: partial_rotary_factor is read for model_type 'phi3' only (transformers' "
                                 f"other families rotate all of head_dim), got {f!r} for model_type "
                                 f"{self.model_type!r}")
            if self.rotary_dim < 2 or self.rotary_dim % 2:
                raise ValueError(f"config: partial_rotary_factor {f!r} of head_dim {self.head_dim} gives "
                                 f"int({self.head_dim} * {f!r}) = {self.rotary_dim} rotated dimensions; RoPE needs an "
                                 "even number of at least 2")
        if self.longrope_context is not None:
            for name in ("short_factor", "long_factor"):
                if len(getattr(self.rope_scaling, name)) != self.rotary_dim // 2:
                    raise ValueError(f"config: rope_scaling.{name} must have rotary_dim / 2 = {self.rotary_dim // 2} "
                                     f"entries (one a frequency), got {len(getattr(self.rope_scaling, name))}")
        if isinstance(self.eos_token_ids, list):  # hashable as a jit static argument: a tuple
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if not isinstance(self.eos_token_ids, tuple) or not all(is_int(i) for i in self.eos_token_ids):
            raise ValueError(f"config: eos_token_ids must be a tuple of integer token ids, got {self.eos_token_ids!r}")
        if outside := [int(i) for i in self.eos_token_ids if not 0 <= i < self.vocab_size]:
            # accepted, as transformers accepts them (its generate warns for a negative one): the model's logits
            # never reach such an id, so decoding runs to max_new_tokens
            warnings.warn(f"config: eos_token_ids {outside} outside the vocabulary [0, {self.vocab_size}): generation "
                          "never stops on them", stacklevel=3)
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and -2**31 <= value < 2**31):  # the models' token arrays
                raise ValueError(f"config: {name} must be an integer token id (int32) or None, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"config: tie_word_embeddings must be True or False, got {self.tie_word_embeddings!r}")
        if self.rope_layers is not None:
            if isinstance(self.rope_layers, list):  # hashable: a tuple
                object.__setattr__(self, "rope_layers", tuple(self.rope_layers))
            if not self.family.nope_layers:
                raise ValueError(f"config: rope_layers is for model_type 'smollm3' (no_rope_layers); model_type "
                                 f"{self.model_type!r} applies RoPE in every layer, got {self.rope_layers!r}")
            if (not isinstance(self.rope_layers, tuple) or len(self.rope_layers) != self.num_hidden_layers
                    or not all(isinstance(b, bool) for b in self.rope_layers)):
                raise ValueError(f"config: rope_layers must be a tuple of {self.num_hidden_layers} bools (one a layer: "
                                 f"whether it applies RoPE) or None, got {self.rope_layers!r}")
        if self.sliding_window is not None:
            if not is_int(self.sliding_window) or self.sliding_window <= 0:
                raise ValueError(f"config: sliding_window must be a positive integer or None, got "
                                 f"{self.sliding_window!r}")
            if self.family.window_flag:
                raise ValueError(f"config: sliding_window is for the families whose window covers every layer "
                                 f"(llama, mistral, phi3); model_type {self.model_type!r} applies it to some layers "
                                 f"only, which is not supported; got {self.sliding_window!r}")
        self._canonicalise()
        if self.hidden_act is None:  # the family's default
            object.__setattr__(self, "hidden_act", self.family.hidden_acts[0])
        if self.hidden_act not in self.family.hidden_acts:
            raise ValueError(f"config: hidden_act must be one of {self.family.hidden_acts} for model_type "
                             f"{self.model_type!r}, got {self.hidden_act!r}")
        for name in MULTIPLIERS:
            value = getattr(self, name)
            if value is None and name == "attention_multiplier":
                continue
            if not _positive_finite(value):
                raise ValueError(f"config: {name} must be a positive finite number, got {value!r}")
            if not self.family.multipliers and value != (1.0 if name != "attention_multiplier" else None):
                raise ValueError(f"config: {name} is Granite's (model_type 'granite'); model_type "
                                 f"{self.model_type!r} has none, got {value!r}")

    def _canonicalise(self):
        """One spelling for each model, so that a config equals (and hashes as, for jit) itself after a save and
        load: RoPE in every layer of ``rope_layers`` and an ``attention_multiplier`` of exactly 1/sqrt(head_dim) are
        None. (A sliding window >= the context stays as given: ``from_dict`` reads one as none, but a model built
        with one still refuses longer inputs in a call, as transformers would window them.)"""
        if self.rope_layers is not None and all(self.rope_layers):
            object.__setattr__(self, "rope_layers", None)
        if self.attention_multiplier is not None and self.attention_multiplier == 1 / math.sqrt(self.head_dim):
            object.__setattr__(self, "attention_multiplier", None)

    @property
    def max_length(self) -> int:
        """The longest sequence (prompt + new tokens) this model computes as transformers does: its
        max_position_embeddings (with YaRN, the context YaRN stretches it to where that is longer:
        ``yarn_context``), or its sliding window where that is shorter, or with longrope's short factors its
        original_max_position_embeddings (past it transformers switches every position to the long factors:
        ``with_long_rope``)."""
        context = max(self.max_position_embeddings, self.yarn_context or 0)
        limits = [context, self.sliding_window or context]
        short = self.longrope_context is not None and not self.rope_scaling.use_long
        return min(limits + ([self.longrope_context] if short else []))

    @property
    def yarn_context(self) -> int | None:
        """With YaRN, the context it stretches the model to: original_max_position_embeddings × factor (Qwen2.5's
        and Qwen3's model cards add factor 4 over 32768 for 131072 tokens, leaving max_position_embeddings at 32768 /
        40960; transformers sets no bound, vLLM takes this one); None without YaRN."""
        return _yarn_context(self.rope_scaling)

    def with_long_rope(self, long: bool) -> "LlamaConfig":
        """This config computing with longrope's long factors (``long``) or its short ones; itself without
        longrope. transformers takes the long factors for every position of a call whose longest sequence
        (its largest position + 1) exceeds original_max_position_embeddings, the short ones otherwise."""
        if self.longrope_context is None or self.rope_scaling.use_long == long:
            return self
        return dataclasses.replace(self, rope_scaling=dataclasses.replace(self.rope_scaling, use_long=long))

    @property
    def rotary_dim(self) -> int:
        """How many of head_dim's dimensions RoPE rotates (the first ones): head_dim, or int(head_dim *
        partial_rotary_factor) as transformers' Phi-3 computes it (Phi-4-mini: 96 of 128)."""
        return self.head_dim if self.partial_rotary_factor == 1 else int(self.head_dim * self.partial_rotary_factor)

    @property
    def longrope_context(self) -> int | None:
        """With longrope, its pretraining context (original_max_position_embeddings, where transformers switches to
        the long factors); None with any other RoPE."""
        rs = self.rope_scaling
        return rs.original_max_position_embeddings if rs is not None and rs.rope_type == "longrope" else None

    @property
    def query_scale(self) -> float:
        """What q is multiplied by so that the attention's default logit scale 1/sqrt(head_dim) gives
        ``attention_multiplier`` (1 where it is None)."""
        if self.attention_multiplier is None:
            return 1.0
        return float(self.attention_multiplier) * math.sqrt(self.head_dim)

    def uses_rope(self, layer: int) -> bool:
        """Whether layer ``layer`` rotates its q and k."""
        return self.rope_layers is None or self.rope_layers[layer]

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        return self.family.qkv_bias

    @property
    def qk_norm(self) -> bool:
        return self.family.qk_norm

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Build from the dict of a HF ``config.json``; raises ``CheckpointError`` for what is not supported."""
        model_type = d.get("model_type", "llama")
        if not isinstance(model_type, str):
            raise CheckpointError(f"config: model_type must be a string (one of {tuple(FAMILIES)}), got "
                                  f"{model_type!r}")
        if model_type in UNSUPPORTED_FAMILIES:
            raise CheckpointError(f"config: model_type {model_type!r} is not supported: "
                                  f"{UNSUPPORTED_FAMILIES[model_type]} (supported: {tuple(FAMILIES)})")
        if model_type not in FAMILIES:
            raise CheckpointError(f"config: unsupported model_type {model_type!r} (supported: {tuple(FAMILIES)})")
        family = FAMILIES[model_type]
        archs = d.get("architectures") or [family.architecture]
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise CheckpointError(f"config: architectures must be a list of class names, got {archs!r}")
        # the base model's class too ("LlamaModel": its checkpoint's names lack "model.", `load_checkpoint` adds it;
        # transformers' AutoModelForCausalLM picks the class by model_type and loads it the same)
        bad = [a for a in archs if a not in (family.architecture, family.architecture.replace("ForCausalLM", "Model"))]
        if bad:
            missing = "" if "model_type" in d else " (config.json has no model_type, read as 'llama')"
            raise CheckpointError(f"config: unsupported architecture {bad[0]!r} for model_type {model_type!r}"
                                  f"{missing} (supported: {SUPPORTED_ARCHITECTURES}, one per model_type)")
        unknown = [k for k in d if k not in _COMMON_KEYS | family.keys | HARMLESS_KEYS
                   and not k.startswith(OWN_PREFIX)  # this project's metadata (save_checkpoint's extra_config)
                   and not (k in HARMLESS_WHEN_EMPTY and d[k] in ({}, [], None))
                   # every layer full attention: what a family without layer_types computes anyway
                   and not (k == "layer_types" and isinstance(d[k], list)
                            and d[k] == ["full_attention"] * len(d[k]) and len(d[k]) == d.get("num_hidden_layers"))]
        if unknown:
            raise CheckpointError(f"config: key {unknown[0]!r} = {d[unknown[0]]!r} is not known to this loader for "
                                  f"model_type {model_type!r}; it may change the model's output")
        act = d.get("hidden_act", family.hidden_acts[0])
        if act == "swish" and "silu" in family.hidden_acts:  # transformers' ACT2FN: the same SiLU
            act = "silu"
        if act not in family.hidden_acts:
            raise CheckpointError(f"config: unsupported hidden_act {act!r} for model_type {model_type!r} (supported: "
                                  f"{', '.join(map(repr, family.hidden_acts))})")
        for flag in ("attention_bias", "mlp_bias"):
            if flag == "attention_bias" and family.qkv_bias:  # Qwen2's q/k/v have biases and o none, whatever it says
                continue
            if d.get(flag, False):
                raise CheckpointError(f"config: {flag}={d[flag]!r} is not supported (no such biases are loaded)")
        if d.get("use_mrope", False):
            raise CheckpointError(f"config: use_mrope={d['use_mrope']!r} is not supported (multimodal RoPE; "
                                  "only the text models' RoPE is)")
        if d.get("use_bidirectional_attention", False):
            raise CheckpointError(f"config: use_bidirectional_attention={d['use_bidirectional_attention']!r} is not "
                                  "supported (every token attends to every other: not a causal decoder)")
        if d.get("rope_interleaved", False):
            raise CheckpointError(f"config: rope_interleaved={d['rope_interleaved']!r} is not supported (RoPE "
                                  "rotates the two halves of each head, as transformers does)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise CheckpointError(f"config: missing required key {missing[0]!r}")
        for key in (*required, "num_key_value_heads", "head_dim"):
            if d.get(key) is not None or key in required:
                _positive_int(d[key], key)
        layers, heads, hidden = d["num_hidden_layers"], d["num_attention_heads"], d["hidden_size"]
        if layers > MAX_LAYERS:  # before anything is built per layer (a corrupted count ran out of memory)
            raise CheckpointError(f"config: num_hidden_layers={layers} is more than {MAX_LAYERS} (no decoder has that "
                                  "many; a corrupted config?)")
        head_dim = d.get("head_dim", family.default_head_dim)
        if head_dim is None:
            if hidden % heads:
                raise CheckpointError(f"config: no head_dim, and hidden_size ({hidden}) is not a multiple of "
                                      f"num_attention_heads ({heads})")
            head_dim = hidden // heads
        max_pos = _positive_int(d.get("max_position_embeddings", family.default_max_positions),
                                "max_position_embeddings")
        rope_layers = _rope_layers(d, layers) if family.nope_layers else None
        layer_types = _layer_types(d, family, layers, rope_layers)
        theta, scaling = _parse_rope(d, max_pos, family)
        # the longest sequence the model takes, for the window: YaRN's context where longer (``max_length``)
        window = _check_sliding_window(d, family, layer_types, max(max_pos, _yarn_context(scaling) or 0))
        partial = _partial_rotary_factor(d, family)
        for key, value in PHI4_MINI_KEYS.items():
            if key in d and not (d[key] == value and isinstance(d[key], bool) == isinstance(value, bool)):
                raise CheckpointError(f"config: {key}={d[key]!r} is not supported (transformers' Phi-3 does not read "
                                      f"it; only {value!r}, which changes nothing, is accepted)")
        if family.longrope and scaling is not None and scaling.rope_type == "longrope" and head_dim * heads != hidden:
            raise CheckpointError(f"config: head_dim {head_dim} with longrope: transformers' Phi3Config checks the "
                                  f"factor lists against hidden_size / num_attention_heads = {hidden / heads:g}, "
                                  "and computes RoPE over head_dim: a config where they differ does not load there")
        eos = d.get("eos_token_id", family.default_eos)
        eos_ids = _id_tuple(eos)
        for key, ids in (("eos_token_id", eos_ids), ("bos_token_id", (d.get("bos_token_id"),)),
                         ("pad_token_id", (d.get("pad_token_id"),))):
            if any(i is not None and not is_int(i) for i in ids):
                raise CheckpointError(f"config: {key} must be an integer token id (or a list of them for eos, or "
                                      f"null); got {d.get(key)!r}")
        scalars = {k: _number(d.get(k, v), k) for k, v in MULTIPLIERS.items()} if family.multipliers else {}
        tied = d.get("tie_word_embeddings", family.default_tie)
        if not isinstance(tied, bool):
            raise CheckpointError(f"config: tie_word_embeddings must be true or false; got {tied!r}")
        try:
            return cls(
                vocab_size=d["vocab_size"], hidden_size=hidden, intermediate_size=d["intermediate_size"],
                num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=_or(d.get("num_key_value_heads", family.default_kv_heads), heads),
                head_dim=head_dim,
                max_position_embeddings=max_pos,
                rms_norm_eps=_number(d.get("rms_norm_eps", family.default_eps), "rms_norm_eps"),
                rope_theta=theta, rope_scaling=scaling,
                tie_word_embeddings=tied,
                bos_token_id=d.get("bos_token_id", family.default_bos), eos_token_ids=eos_ids,
                pad_token_id=d.get("pad_token_id", family.default_pad), model_type=model_type,
                rope_layers=rope_layers, sliding_window=window, hidden_act=act, partial_rotary_factor=partial,
                **scalars)
        except ValueError as e:
            raise CheckpointError(str(e)) from e

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LlamaConfig":
        """Read ``path`` (a ``config.json`` file or a checkpoint directory containing one). A
        ``generation_config.json`` beside it gives the stop ids instead of config.json's, as in transformers'
        ``generate``, which reads that file alone (Llama 3 Instruct lists <|end_of_text|> and <|eot_id|> there; one
        without an ``eos_token_id``, or null, stops on none: a warning says so)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config: {path} not found")
        d = _json_object(path)
        try:
            config = cls.from_dict(d)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
        if os.path.basename(os.fspath(path)) != "config.json":  # a config file of another name: itself alone
            return config
        eos = _generation_eos(os.path.join(os.path.dirname(os.fspath(path)), "generation_config.json"))
        if eos == () and config.eos_token_ids:
            warnings.warn(f"config: {os.path.dirname(os.fspath(path)) or '.'}/generation_config.json names no "
                          f"eos_token_id: generation does not stop on config.json's {list(config.eos_token_ids)} "
                          "(transformers' generate reads that file alone, the same); pass eos_ids= to stop",
                          stacklevel=2)
        return config if eos is None else dataclasses.replace(config, eos_token_ids=eos)

    def to_dict(self) -> dict[str, Any]:
        """HF-style ``config.json`` dict, transformers-4 layout (round-trips through ``from_dict``)."""
        d = {
            "architectures": [self.family.architecture],
            "model_type": self.model_type,
            "hidden_act": self.hidden_act,
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
            "rope_scaling": _rope_scaling_dict(self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
        }
        if self.longrope_context is not None and self.family.longrope:  # where Phi3Config reads it (the others:
            d["original_max_position_embeddings"] = self.longrope_context  # the rope_scaling dict's, written there)
        if self.partial_rotary_factor != 1:
            d["partial_rotary_factor"] = self.partial_rotary_factor
        if self.family.nope_layers:
            d["no_rope_layers"] = [int(self.uses_rope(i)) for i in range(self.num_hidden_layers)]
        if self.family.multipliers:
            d.update({k: getattr(self, k) for k in MULTIPLIERS})
            if self.attention_multiplier is None:  # built by hand: Llama's scale, written as the number it is
                d["attention_multiplier"] = 1 / math.sqrt(self.head_dim)
        if self.family.window_flag:
            d["use_sliding_window"] = False
        elif self.sliding_window is not None or self.family.default_window is not None:
            d["sliding_window"] = self.sliding_window  # null, not left out, for Mistral: its default is 4096
        return d


def _id_tuple(value) -> tuple:
    """A JSON token-id field (an id, a list of ids, or null) as a tuple of its entries (unchecked)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (() if value is None else (value,))


def _json_object(path: str | os.PathLike) -> dict:
    """The JSON object in the file ``path``; ``CheckpointError`` naming it where it is not one."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; expected a JSON file")
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        except RecursionError as e:  # arrays or objects nested thousands deep
            raise CheckpointError(f"{path}: not valid JSON (nested too deep for Python's parser)") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _generation_eos(path: str) -> tuple[int, ...] | None:
    """The ``eos_token_id`` (an id or a list of ids) of the ``generation_config.json`` at ``path``; None where there
    is no such file, () where it names none (or null: transformers' generate then stops on no id, config.json's
    not read). Integer ids outside the vocabulary (e.g. -1) are taken as config.json's are: the config warns that
    generation never stops on them."""
    if not os.path.exists(path):
        return None
    eos = _json_object(path).get("eos_token_id")
    if eos is None:
        return ()
    ids = _id_tuple(eos)
    if not all(is_int(i) for i in ids):
        raise CheckpointError(f"{path}: eos_token_id must be an integer token id or a list of them (or null); got "
                              f"{eos!r}")
    return ids


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _number(value: Any, where: str) -> float:
    """A finite JSON number of the config as a float; ``CheckpointError`` naming the key otherwise (a string, a
    bool, null, NaN or an infinity: Python's json reads the last two)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"config: {where} must be a finite number; got {value!r}")
    return float(value)


def _positive_int(value: Any, where: str) -> int:
    """A positive JSON integer of the config; ``CheckpointError`` naming the key otherwise (a bool, a float, null)."""
    if not is_int(value) or value <= 0:
        raise CheckpointError(f"config: {where} must be a positive integer, got {value!r}")
    return value


def _rope_scaling_dict(rs: RopeScaling | None) -> dict[str, Any] | None:
    """``rs`` as a transformers-4 ``rope_scaling`` dict, with the keys of its type only."""
    if rs is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(rs).items()
            if (k == "rope_type" or k in _ROPE_KEYS[rs.rope_type]) and v is not None}


def _rope_layers(d: dict[str, Any], layers: int) -> tuple[bool, ...]:
    """SmolLM3's layers with RoPE: ``no_rope_layers`` (1: RoPE, 0: none; transformers reads the first
    num_hidden_layers entries), else every layer but each ``no_rope_layer_interval``-th (default 4)."""
    said = d.get("no_rope_layers")
    if said is None:
        interval = d.get("no_rope_layer_interval", 4)
        if not is_int(interval) or interval <= 0:
            raise CheckpointError(f"config: no_rope_layer_interval must be a positive integer; got {interval!r}")
        return tuple((i + 1) % interval != 0 for i in range(layers))
    if not isinstance(said, list) or len(said) < layers or not all(is_int(x) and x in (0, 1) for x in said):
        raise CheckpointError(f"config: no_rope_layers must list 1 (RoPE) or 0 (none) for each of the {layers} "
                              f"layers; got {said!r}")
    return tuple(bool(x) for x in said[:layers])


def _layer_types(d: dict[str, Any], family: Family, layers: int,
                 rope_layers: tuple[bool, ...] | None = None) -> list[str]:
    """The attention type of every layer: ``layer_types`` if given, else as transformers derives it (Qwen: the
    window from ``max_window_layers`` on; SmolLM3: the window on the layers without RoPE)."""
    if not family.window_flag:
        return ["full_attention"] * layers
    types = d.get("layer_types")
    if types is None and family.nope_layers:
        window = d.get("use_sliding_window", False) and d.get("sliding_window") is not None
        return ["sliding_attention" if window and not rope_layers[i] else "full_attention" for i in range(layers)]
    if types is None:
        window = _window(d, family) if d.get("use_sliding_window", False) else None
        first = d.get("max_window_layers", 28)
        if window is not None and not is_int(first):
            raise CheckpointError(f"config: max_window_layers must be an integer (the first layer with the sliding "
                                  f"window); got {first!r}")
        return ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise CheckpointError(f"config: layer_types={types!r} must list one of {LAYER_TYPES} for each of the "
                              f"{layers} layers")
    return types


def _window(d: dict[str, Any], family: Family) -> Any:
    """The config's sliding_window: its value (null: none), or the family's default where the key is left out."""
    return d["sliding_window"] if "sliding_window" in d else family.default_window


def _yarn_context(scaling: "RopeScaling | None") -> int | None:
    """YaRN's context, original_max_position_embeddings × factor; None for other scalings (``yarn_context``)."""
    if scaling is None or scaling.rope_type != "yarn":
        return None
    return int(scaling.original_max_position_embeddings * scaling.factor)


def _check_sliding_window(d: dict[str, Any], family: Family, layer_types: list[str], context: int) -> int | None:
    """The sliding window in effect on every layer (Mistral, Phi-3; Llama, whose forward ignores the key but whose
    ``generate`` in transformers keeps only the last W keys in its cache), None where none is; raise for one in
    effect on some layers only (Qwen's, SmolLM3's "sliding_attention" layers). A window of W keys (query i sees keys
    i-W < j <= i) changes nothing while sequences hold at most W tokens: none is in effect when W >= `context`, the
    longest sequence the model takes (max_position_embeddings, or YaRN's context where longer), and a model with one
    refuses longer sequences (``LlamaConfig.max_length``)."""
    window = _window(d, family)
    if family.window_flag and not family.nope_layers and not d.get("use_sliding_window", False):
        window = None  # what transformers does for Qwen: the window is dropped (SmolLM3's config keeps it, and its
        # attention masks the layers typed sliding_attention with it whatever use_sliding_window says)
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if family.window_flag and sliding and window is None:
        raise CheckpointError(f"config: layer_types marks layers {sliding} sliding_attention but no sliding window "
                              f"applies (sliding_window={d.get('sliding_window')!r}, use_sliding_window="
                              f"{d.get('use_sliding_window')!r}); transformers cannot run such a config")
    if window is None or (family.window_flag and not sliding):
        return None
    if not is_int(window) or window <= 0:
        raise CheckpointError(f"config: sliding_window must be a positive integer (keys a query sees) or null; got "
                              f"{window!r}")
    if window >= context:
        return None
    if family.window_flag:
        raise CheckpointError(f"config: sliding_window={window!r} (layers {sliding}) is in effect (below the "
                              f"longest sequence, {context} tokens); a window on some layers only is not supported")
    return window


def _parse_rope(d: dict[str, Any], max_pos: int, family: Family) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either layout. transformers 4: top-level ``rope_theta`` + ``rope_scaling`` dict;
    transformers 5: ``rope_parameters`` (with ``rope_theta`` inside; one flat dict: a dict per layer type is refused,
    as transformers does not read it for these families). Read as transformers 5 reads them: ``rope_scaling`` where
    it is given and not empty, else ``rope_parameters`` (a warning where the one left out says otherwise); the dict's
    ``rope_theta``, else the top-level one (a warning where they differ), else the family's ``default_theta``."""
    top_theta = d.get("rope_theta")
    legacy = d.get("rope_scaling")
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):  # (transformers' config class refuses it too)
        raise CheckpointError(f"config: rope_parameters must be a dict or null, got {params!r}")
    keyed = [k for k in params or () if k in LAYER_TYPES]  # (_layer_types admits no other type)
    # transformers 5.17 fails to load these families' configs in that layout (or, without layer_types, reads the dict
    # as flat and ignores the inner ones): no transformers writes it for them
    keyed_error = keyed and (f"config: rope_parameters keyed by layer type ({keyed[0]!r} = {params[keyed[0]]!r}) is "
                             f"not a layout transformers reads for model_type {d.get('model_type', 'llama')!r}; "
                             "write one flat RoPE dict")
    # transformers 5 (`convert_rope_params_to_dict`): `rope_scaling or rope_parameters` (an empty dict is none), its
    # rope_theta first (`setdefault`), then the top-level one, then the family's default
    where, rs = ("rope_scaling", legacy) if legacy else ("rope_parameters", params)
    if where == "rope_parameters" and keyed_error:
        raise CheckpointError(keyed_error)
    if not rs:
        return (family.default_theta if top_theta is None else _number(top_theta, "rope_theta")), None
    value = _parse_rope_dict(rs, where, top_theta, max_pos, family, d)
    if where == "rope_scaling" and params:  # not read, as transformers does not read it then: a warning if it differs
        other = f"({keyed_error})"
        if not keyed_error:
            try:
                with warnings.catch_warnings():  # (its unread keys: the warning below names it)
                    warnings.simplefilter("ignore")
                    other = _parse_rope_dict(params, "rope_parameters", top_theta, max_pos, family, d)
            except CheckpointError as e:
                other = f"({e})"
        if other != value:
            warnings.warn(f"config: rope_scaling gives RoPE {value} and rope_parameters {other} (theta, scaling): "
                          "rope_scaling read, rope_parameters left out, as transformers does", stacklevel=2)
    if isinstance(rs, dict) and rs.get("rope_theta") is not None and top_theta is not None and \
            _number(top_theta, "rope_theta") != value[0]:
        warnings.warn(f"config: rope_theta {top_theta} beside {where}'s rope_theta {rs['rope_theta']}: the dict's "
                      "read, as transformers does", stacklevel=2)
    return value


def _partial_rotary_factor(d: dict[str, Any], family: Family) -> float:
    """The part of head_dim RoPE rotates: ``partial_rotary_factor`` in the RoPE dict, else at the top level; 1 where
    neither gives one. The RoPE dict is the one transformers 5 reads: ``rope_scaling`` where it is given and not empty,
    else ``rope_parameters`` (the other is then not read, as there). Where the dict and the top level both give one
    the dict's is read, as transformers does (a warning where they differ). Another value than 1 is read for the families whose transformers
    class rotates part of head_dim (Phi-3) and refused for the others."""
    rope = d.get("rope_scaling") or d.get("rope_parameters")
    found = [(where, src["partial_rotary_factor"]) for where, src in
             (("partial_rotary_factor", d), ("rope_scaling" if d.get("rope_scaling") else "rope_parameters", rope))
             if isinstance(src, dict) and src.get("partial_rotary_factor") is not None]
    if not found:
        return 1.0
    values = [_number(v, f"{where} partial_rotary_factor" if where != "partial_rotary_factor" else where)
              for where, v in found]
    if any(v != values[-1] for v in values):  # transformers: the dict's (`setdefault` of the top-level one)
        warnings.warn(f"config: partial_rotary_factor is given as {found}: the RoPE dict's {values[-1]} read, as "
                      "transformers does", stacklevel=2)
        values = values[-1:]
    if values[0] != 1.0 and not family.partial_rotary:
        raise CheckpointError(f"config: partial_rotary_factor={found[-1][1]!r} is not supported for this model_type "
                              "(its transformers class rotates all of head_dim; Phi-3's reads the factor)")
    return values[0]


def _parse_rope_dict(rs: Any, where: str, top_theta: Any, max_pos: int, family: Family,
                     d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    if not isinstance(rs, dict):
        raise CheckpointError(f"config: {where} must be a dict or null, got {rs!r}")
    if "rope_type" in rs and "type" in rs and rs["rope_type"] != rs["type"]:
        raise CheckpointError(f"config: {where} has rope_type {rs['rope_type']!r} and type {rs['type']!r}; they "
                              "must agree (transformers 4 reads `type`, 5 reads `rope_type`)")
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if not isinstance(rope_type, str):
        raise CheckpointError(f"config: {where} type must be a string (one of {SUPPORTED_ROPE_TYPES}), got "
                              f"{rope_type!r}")
    if family.longrope:  # transformers' Phi3Config: "su" and "yarn" are longrope, no other scaling
        # (an "su" dict without its own original_max_position_embeddings: transformers 5.0-5.21 failed to load it,
        # renaming "su" after filling the dict's context in; 5.22 on renames first and reads the top-level context,
        # as _parse_longrope does for every Phi-3 config)
        rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type
        if rope_type not in ("default", "longrope"):
            raise CheckpointError(f"config: {where} type {rope_type!r} for model_type {d.get('model_type')!r}: "
                                  "transformers' Phi-3 reads only default RoPE and longrope (its configs' 'yarn' and "
                                  "'su' are read as longrope)")
    if rope_type not in _ROPE_KEYS:
        raise CheckpointError(f"config: unsupported {where} type {rope_type!r} (supported: {SUPPORTED_ROPE_TYPES})")
    extra = [k for k in rs if k not in _ROPE_KEYS[rope_type] | {"rope_type", "type", "partial_rotary_factor"}]
    if extra:  # transformers' `_check_received_keys` warns and computes without them: the same here
        warnings.warn(f"config: {where} key {extra[0]!r} = {rs[extra[0]]!r} ({len(extra)} such in all) is not read "
                      f"by RoPE type {rope_type!r}: left out, as transformers leaves it out", stacklevel=2)
    theta = rs.get("rope_theta", top_theta if top_theta is not None else family.default_theta)
    theta = _number(theta, f"{where} rope_theta")
    if rope_type == "default":
        return theta, None
    if rope_type == "longrope":
        return theta, _parse_longrope(rs, where, max_pos, d, family)
    if "factor" not in rs:
        raise CheckpointError(f"config: {where} of type {rope_type!r} needs 'factor'")
    if rope_type == "yarn":
        return theta, _parse_yarn(rs, where, max_pos)
    factor = _number(rs["factor"], f"{where} factor")
    if factor <= 0:
        raise CheckpointError(f"config: {where} factor must be positive, got {factor}")
    if rope_type == "dynamic":  # default RoPE up to max_position_embeddings (_ROPE_KEYS), kept to be saved as read
        return theta, RopeScaling("dynamic", factor)
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    for key in ("low_freq_factor", "high_freq_factor"):
        if key not in rs:
            raise CheckpointError(f"config: {where} of type 'llama3' needs {key!r}")
    low, high = (_number(rs[k], f"{where} {k}") for k in ("low_freq_factor", "high_freq_factor"))
    if not high > low > 0:
        raise CheckpointError(f"config: {where} needs 0 < low_freq_factor < high_freq_factor; got {low} and {high}")
    return theta, RopeScaling("llama3", factor, low, high, _original_context(rs, where, max_pos))


def _original_context(rs: dict[str, Any], where: str, max_pos: int) -> int | float:
    """The pretraining context of a llama3 / yarn RoPE dict. transformers falls back to max_position_embeddings when
    it is not given, and uses the number as it is (an int in every real config; a float is kept, not truncated)."""
    original = rs.get("original_max_position_embeddings", max_pos)
    if _number(original, f"{where} original_max_position_embeddings") <= 0:
        raise CheckpointError(f"config: {where} original_max_position_embeddings must be positive, got {original}")
    return original


def _parse_longrope(rs: dict[str, Any], where: str, max_pos: int, d: dict[str, Any], family: Family) -> RopeScaling:
    """A longrope dict, read as transformers 5 reads it: the pretraining context is, for Phi-3, config.json's
    top-level ``original_max_position_embeddings`` (Phi3Config's 4096 where absent), whatever the dict holds; for the
    other families (whose config classes keep no such top-level key) the dict's, else max_position_embeddings; a
    missing or null ``factor`` is max_position_embeddings / that context; ``short_factor`` and ``long_factor`` lists
    of positive numbers (their length, rotary_dim / 2, is checked by the config); ``attention_factor`` given or
    derived (``RopeScaling.cos_sin_factor``)."""
    key = "original_max_position_embeddings"
    original, name = (d.get(key, 4096), key) if family.longrope else (rs.get(key, max_pos), f"{where} {key}")
    if not is_int(original) or original <= 0:
        raise CheckpointError(f"config: {name} must be a positive integer (longrope's pretraining context), got "
                              f"{original!r}")
    factor = max_pos / original if rs.get("factor") is None else _number(rs["factor"], f"{where} factor")
    attention_factor = rs.get("attention_factor")
    if attention_factor is not None:
        attention_factor = _number(attention_factor, f"{where} attention_factor")
    lists = {}
    for key in ("short_factor", "long_factor"):
        value = rs.get(key)
        if not (isinstance(value, list) and value and all(_positive_finite(x) for x in value)):
            raise CheckpointError(f"config: {where} of type 'longrope' needs {key!r}, a list of positive numbers; "
                                  f"got {value!r}")
        lists[key] = tuple(float(x) for x in value)
    for key, value in (("factor", factor), ("attention_factor", attention_factor)):
        if value is not None and not value > 0:
            raise CheckpointError(f"config: {where} {key} must be positive, got {value}")
    return RopeScaling("longrope", factor, original_max_position_embeddings=original,
                       attention_factor=attention_factor, **lists)


def _parse_yarn(rs: dict[str, Any], where: str, max_pos: int) -> RopeScaling:
    """A yarn RoPE dict, read as transformers 5's ``_compute_yarn_parameters`` reads it: a null ``factor`` is
    max_position_embeddings / original_max_position_embeddings (DeepSeek-V3's configs); a missing or null (or 0)
    beta_fast / beta_slow is 32 / 1; without ``attention_factor``, ``mscale`` and ``mscale_all_dim`` (both non-zero)
    give it as mscale(factor, mscale) / mscale(factor, mscale_all_dim), else it is mscale(factor)."""
    original = _original_context(rs, where, max_pos)
    factor = max_pos / original if rs["factor"] is None else _number(rs["factor"], f"{where} factor")
    if factor <= 0:
        raise CheckpointError(f"config: {where} factor must be positive, got {factor}")
    betas = {}
    for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        value = rs.get(key)
        betas[key] = _number(value, f"{where} {key}") if value else default
        if betas[key] <= 0:
            raise CheckpointError(f"config: {where} {key} must be positive, got {value}")
    attention_factor = rs.get("attention_factor")
    if attention_factor is not None:
        attention_factor = _number(attention_factor, f"{where} attention_factor")
        if attention_factor <= 0:
            raise CheckpointError(f"config: {where} attention_factor must be positive, got {attention_factor}")
    else:
        mscale, mscale_all_dim = (rs.get(k) for k in ("mscale", "mscale_all_dim"))
        for key, value in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)):
            if value is not None:
                _number(value, f"{where} {key}")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            if not attention_factor > 0:
                raise CheckpointError(f"config: {where} mscale={mscale!r} and mscale_all_dim={mscale_all_dim!r} "
                                      f"give the attention factor {attention_factor}; it must be positive")
    truncate = rs.get("truncate", True)
    if not isinstance(truncate, bool):
        raise CheckpointError(f"config: {where} truncate must be true or false; got {truncate!r}")
    return RopeScaling("yarn", factor, original_max_position_embeddings=original, attention_factor=attention_factor,
                       truncate=truncate, **betas)
