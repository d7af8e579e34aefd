"""Injected device faults (federation.faults): which device fails in a round, and how.

Pure functions of (seed, round, device) and of the tensors, called by every runtime's device
side, so a faulty run is reproducible, resumes like any other, and is the same in-process and
on Flower. A fault kind's effect, and the reason the server gives for the device's missing
contribution, are listed in config.FAULT_KINDS:

    raise        `train_device` runs the device's round on a runner whose second batch raises
                 InjectedFault: a real exception in the middle of the device's own code
    hang         the runtime's business (it cannot happen inside a function): the device does
                 not answer before federation.device_timeout_s
    nan ... missing_key   the device trains, then its upload is corrupted (`corrupt_update`)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from fibecfed.adapters import AdapterState
from fibecfed.config import FAULT_KINDS
from fibecfed.encoding import EncodedDataset
from fibecfed.federated import ModelRunner

# The stream of the fault draws among a device's per-round random streams (federated.py uses 1-4, 6).
FAULT_STREAM = 9

# The key an "unknown_key" update adds: no adapter has it.
UNKNOWN_KEY = "injected_fault.unknown_key"


class InjectedFault(RuntimeError):
    """The exception a device with fault kind "raise" throws in the middle of its round."""


def device_fault(seed: int, round_num: int, device: int, share: float, kinds: Sequence[str]) -> str | None:
    """The fault kind of `device` in `round_num`, or None: faulty with probability `share`, the
    kind drawn uniformly from `kinds`. A draw from (seed, round, device) alone, so a device's
    fault does not depend on which other devices train in the round (a Flower node decides its
    own without knowing them) and a resumed run draws the same."""
    if share <= 0.0 or not kinds:
        return None
    rng = np.random.default_rng([seed, round_num, device, FAULT_STREAM])
    faulty, index = rng.random() < share, int(rng.integers(len(kinds)))
    return kinds[index] if faulty else None


def round_faults(seed: int, round_num: int, devices: Sequence[int], share: float, kinds: Sequence[str]) -> dict[int, str]:
    """The faulty devices among `devices` in `round_num`, with their kinds (see `device_fault`)."""
    drawn = {d: device_fault(seed, round_num, d, share, kinds) for d in devices}
    return {d: kind for d, kind in drawn.items() if kind is not None}


def expected_reason(kind: str) -> str:
    """The reason the server gives for a device with this fault (server.REJECTION_REASONS)."""
    return FAULT_KINDS[kind]


def _first_value(state: Mapping[str, torch.Tensor], value: float) -> AdapterState:
    key = next(iter(state))
    flat = state[key].flatten().clone()
    flat[0] = value
    return {**state, key: flat.reshape(state[key].shape)}


def _wrong_shape(state: Mapping[str, torch.Tensor]) -> AdapterState:
    # Flattened, one element longer: a shape no tensor of the adapter can have been sent with.
    key = next(iter(state))
    return {**state, key: torch.cat([state[key].reshape(-1), state[key].new_zeros(1)])}


def _wrong_dtype(state: Mapping[str, torch.Tensor]) -> AdapterState:
    key = next(iter(state))
    return {**state, key: state[key].to(torch.float64)}


def _unknown_key(state: Mapping[str, torch.Tensor]) -> AdapterState:
    return {**state, UNKNOWN_KEY: torch.zeros(1)}


def _missing_key(state: Mapping[str, torch.Tensor]) -> AdapterState:
    last = list(state)[-1]
    return {k: v for k, v in state.items() if k != last}


# How each fault kind that still uploads corrupts the upload (a new dict; the input is untouched).
CORRUPTIONS: dict[str, Callable[[Mapping[str, torch.Tensor]], AdapterState]] = {
    "nan": lambda state: _first_value(state, float("nan")),
    "inf": lambda state: _first_value(state, float("inf")),
    "shape": _wrong_shape,
    "dtype": _wrong_dtype,
    "unknown_key": _unknown_key,
    "missing_key": _missing_key,
}
# The kinds that act before an upload exists (see the module docstring).
RUNTIME_FAULTS = ("raise", "hang")


def corrupt_update(state: Mapping[str, torch.Tensor], kind: str) -> AdapterState:
    """The upload of a device with fault `kind` (one of CORRUPTIONS) in place of `state`.

    The first key's tensor (in upload order) is the one corrupted (nan, inf: its first value;
    shape, dtype), the last key is the one dropped (missing_key). An empty state (a round that
    exchanges nothing) can only gain a key."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"fault kind {kind!r} does not corrupt an upload; those that do: {', '.join(CORRUPTIONS)}")
    if not state and kind != "unknown_key":
        return {}
    return CORRUPTIONS[kind](state)


class FailingRunner(ModelRunner):
    """The run's model runner, except that the `fail_at`-th batch it builds raises InjectedFault
    (the device's round stops there, its state half-updated: the runtime must restore it)."""

    def __init__(self, runner: ModelRunner, fail_at: int = 2):
        # Shares the one model and its parameters; only `batch` differs.
        self.loaded, self.params, self.pad_token_id = runner.loaded, runner.params, runner.pad_token_id
        self.fail_at = fail_at
        self.batches = 0

    def batch(self, encoded: EncodedDataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        self.batches += 1
        if self.batches >= self.fail_at:
            raise InjectedFault(f"injected fault: the device broke down at its batch {self.batches}")
        return super().batch(encoded, indices)


__all__ = [
    "CORRUPTIONS",
    "FailingRunner",
    "InjectedFault",
    "RUNTIME_FAULTS",
    "corrupt_update",
    "device_fault",
    "expected_reason",
    "round_faults",
]
