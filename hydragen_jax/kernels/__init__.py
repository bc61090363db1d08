"""The Pallas GPU kernels: `flash` (Triton: every level of a step in one launch), `ops` (plans and tilings per
level), `hopper` (Mosaic GPU: one prefix and every suffix in one persistent launch), `merge` (the parts' merge)."""

# Pallas' interpreter module registers a config option when it is first imported (JAX 0.11:
# `pallas_fuser_disable_nested_fuse`), and every option is part of jit's cache key: imported at the first
# interpreted kernel call, it made every function jitted before that call compile again at its next call. Imported
# with the kernels instead. (A private module: where a JAX version has none, nothing to do.)
try:
  import jax._src.pallas.mosaic.interpret.interpret_pallas_call  # noqa: F401
except ImportError:
  pass
