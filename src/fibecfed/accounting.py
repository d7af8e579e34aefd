"""What a round costs: bytes on the wire, measured from the serialized tensors, and simulated time."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from safetensors.torch import save


def serialize_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """The bytes a device or the server actually sends: a safetensors blob of the named tensors."""
    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def serialized_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return len(serialize_state(state)) if state else 0


def compute_clock(kind: str, device: torch.device) -> Callable[[], float]:
    """The clock that times a device's local work.

    "process" is this process's CPU time: programs sharing the cores inflate it far less than
    wall time (2-18% on a whole run in BENCHMARKS.md's tweets timings, through shared caches), so
    time ratios between methods measured on a busy machine roughly hold. It misses GPU kernels,
    which run outside the CPU clock, so "auto" takes wall time on CUDA.
    """
    if kind == "auto":
        kind = "wall" if device.type == "cuda" else "process"
    if kind == "process":
        return time.process_time
    if kind == "wall":
        return time.perf_counter
    raise ValueError(f"unknown compute clock {kind!r}: use auto, process or wall")


def transfer_seconds(nbytes: int, bandwidth_mbps: float) -> float:
    """Seconds to move `nbytes` over a link of `bandwidth_mbps` megabits per second."""
    return nbytes * 8.0 / (bandwidth_mbps * 1e6)


def simulated_round_seconds(
    compute_seconds: Sequence[float],
    download_bytes: Sequence[int],
    upload_bytes: Sequence[int],
    bandwidth_mbps: float,
) -> float:
    """Devices train in parallel: the round lasts as long as its slowest device.

    Each device's time is its download, its local compute and its upload, one after another.
    """
    if not compute_seconds:
        return 0.0
    per_device = [
        transfer_seconds(down, bandwidth_mbps) + compute + transfer_seconds(up, bandwidth_mbps)
        for compute, down, up in zip(compute_seconds, download_bytes, upload_bytes)
    ]
    return max(per_device)
