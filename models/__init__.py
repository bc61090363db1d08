"""Llama-family models on top of hydragen_jax: HF checkpoints, prefix-sharing generation, a default model.

Entry points (see models/README.md): ``load_checkpoint`` (and ``load_hf_tokenizer``), ``load_gguf`` /
``load_gguf_tokenizer`` / ``load_gguf_with_tokenizer`` (GGUF files; optional packages, ``pip install -e
'.[demo]'``), ``init_random``, ``generate``, ``prefill``, ``decode``, ``build_sharing_tree``, ``synthetic_tree``,
``load_default_model``; ``python -m models`` runs the demo.
"""

from models.cache import MODES, DenseCache, LevelCache, NoCache, TreeCache, cache_bytes
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.config import LlamaConfig, RopeScaling
from models.demo import DEFAULT_MODEL_DIR, load_default_model
from models.generate import (DecodeState, Generation, SamplingConfig, compile_decode, decode, generate, prefill,
                             sample)
from models.gguf import load_gguf, load_gguf_tokenizer, load_gguf_with_tokenizer, smollm2_path
from models.llama import COMPILER_OPTIONS, Llama, init_params, init_random
from models.sharing import SharedLevel, SharingTree, build_sharing_tree, expand_samples, synthetic_tree
from models.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, load_hf_tokenizer

__all__ = [
    "COMPILER_OPTIONS", "MODES", "BPETokenizer", "ByteTokenizer", "CheckpointError", "DEFAULT_MODEL_DIR",
    "DecodeState", "DenseCache", "Generation", "HFTokenizer", "LevelCache", "Llama", "LlamaConfig", "NoCache",
    "RopeScaling",
    "SamplingConfig", "SharedLevel",
    "SharingTree", "TreeCache", "build_sharing_tree", "cache_bytes", "compile_decode", "decode", "expand_samples",
    "generate", "init_params", "init_random", "load_checkpoint", "load_default_model", "load_gguf",
    "load_gguf_tokenizer", "load_gguf_with_tokenizer", "load_hf_tokenizer", "prefill", "sample", "save_checkpoint",
    "smollm2_path",
    "synthetic_tree",
]
