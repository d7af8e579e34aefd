"""What a round costs: bytes on the wire, measured from the serialized tensors, and simulated time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import save


def serialize_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """The bytes a device or the server actually sends: a safetensors blob of the named tensors."""
    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def serialized_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return len(serialize_state(state)) if state else 0


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
