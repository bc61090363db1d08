"""Llama-family models on top of hydragen_jax: config, checkpoints, prefix-sharing generation, default model."""
