"""Peak resident memory of a phase of a benchmark, from the Linux kernel's own counters.

``reset_peak()`` sets the high-water mark (VmHWM) back to the current RSS; reading
``status_mib("VmHWM")`` after the phase gives its peak. Works for numpy, torch and h5py
allocations alike, which tracemalloc cannot see.
"""
from __future__ import annotations

from pathlib import Path


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def status_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not available")
