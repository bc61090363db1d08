"""Device memory: capacity, a pre-allocation estimate check, and recognising out-of-memory errors."""

from __future__ import annotations

import gc

import jax

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


class EstimatedOOM(Exception):
    """Raised before allocating when an estimate exceeds the usable device memory."""

    def __init__(self, needed: int, usable: int):
        super().__init__(f"estimated {needed / 2**30:.2f} GiB exceeds usable {usable / 2**30:.2f} GiB")
        self.needed = needed
        self.usable = usable


def is_oom(error: BaseException) -> bool:
    """True for XLA's RESOURCE_EXHAUSTED runtime errors (and our own estimate failures)."""
    if isinstance(error, EstimatedOOM):
        return True
    text = str(error)
    return any(marker in text for marker in OOM_MARKERS)


def device_capacity(device_table: dict | None = None) -> int | None:
    """Bytes the device can hold: the config's override, else the runtime's `bytes_limit`, else None (unknown)."""
    device_table = device_table or {}
    if "memory_capacity_bytes" in device_table:
        return int(device_table["memory_capacity_bytes"])
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


MEMORY_FRACTION = 0.92  # of a device's capacity that a point may plan to use, unless the config's device table says


def usable_bytes(capacity: float, device_table: dict | None = None) -> int:
    """Bytes a point may plan to use on a device of `capacity` bytes: the device table's `memory_fraction` of it."""
    return int(capacity * (device_table or {}).get("memory_fraction", MEMORY_FRACTION))


def fits(needed_bytes: int, device_table: dict | None = None) -> bool:
    """Whether `needed_bytes` is within memory_fraction * capacity (True if the capacity is unknown)."""
    capacity = device_capacity(device_table)
    return capacity is None or needed_bytes <= usable_bytes(capacity, device_table)


def check_fits(needed_bytes: int, device_table: dict | None = None) -> None:
    """Raise EstimatedOOM if `needed_bytes` exceeds memory_fraction * capacity (no-op if capacity is unknown)."""
    capacity = device_capacity(device_table)
    if capacity is None:
        return
    usable = usable_bytes(capacity, device_table)
    if needed_bytes > usable:
        raise EstimatedOOM(needed_bytes, usable)


def bytes_in_use() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use")


def peak_bytes_in_use() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def release() -> None:
    """Drop unreachable device buffers (after a variant's inputs were deleted or after an OOM)."""
    gc.collect()
