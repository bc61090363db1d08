"""Benchmarks and end-to-end experiments of hydragen-jax (see experiments/README.md)."""
