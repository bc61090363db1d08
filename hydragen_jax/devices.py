"""The default device: the one that jitted calls of uncommitted arrays run on. It decides the default backend
(`dispatch.default_backend`), the kernels' limits (shared memory a block, SMs: `kernels.ops`) and the tuning file
(`tuning.device_kind`), so that `with jax.default_device(d):` moves all of them to `d`'s kind together."""

from __future__ import annotations

import jax


def default_device() -> jax.Device:
  """`jax.default_device`'s device where one is set (a device, or a platform's name: that platform's first device),
  else the first device of the default backend (`jax.devices()[0]`)."""
  device = jax.config.jax_default_device
  if device is None:
    return jax.devices()[0]
  return jax.devices(device)[0] if isinstance(device, str) else device


def default_platform() -> str:
  """The default device's platform: "gpu", "cpu", "tpu"."""
  return default_device().platform
