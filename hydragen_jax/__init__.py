"""hydragen-jax: exact attention for batches of sequences that share prefixes (Hydragen, arXiv 2402.05099).

Public API: `attention`, `merge_states`, `hydragen_attention`, `tree_attention`, `tree_attention_append`,
`append_in_launch`, `Level`, `default_backend`, `lowering_for_gpu`, `BACKENDS` (the backend names).
"""

from hydragen_jax.api import (Level, append_in_launch, attention, hydragen_attention, merge_states, tree_attention,
                              tree_attention_append)
from hydragen_jax.dispatch import BACKENDS, default_backend, lowering_for_gpu

__all__ = [
    "BACKENDS",
    "Level",
    "append_in_launch",
    "attention",
    "default_backend",
    "hydragen_attention",
    "lowering_for_gpu",
    "merge_states",
    "tree_attention",
    "tree_attention_append",
]
__version__ = "0.1.0"
