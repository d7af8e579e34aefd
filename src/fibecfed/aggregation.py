"""Server-side aggregation of named adapter state dicts (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fibecfed.adapters import AdapterState


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> AdapterState:
    """FedAvg: sum_k w_k * state_k / sum_k w_k, key by key.

    Every state must carry the same keys: a device that sent a different set is a bug or a
    tampered update, so it is an error rather than silently averaged over fewer devices.
    """
    if not states:
        raise ValueError("nothing to aggregate: no device states")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to > 0, got {list(weights)}")
    keys = list(states[0].keys())
    for i, state in enumerate(states[1:], start=1):
        if set(state.keys()) != set(keys):
            diff = sorted(set(state.keys()) ^ set(keys))
            raise ValueError(f"device state {i} carries different keys than state 0: {diff[:3]}")
    result: AdapterState = {}
    for key in keys:
        # Accumulate in float64 so the average does not depend on the device order.
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, weight in zip(states, weights):
            acc += state[key].to(torch.float64) * (float(weight) / total)
        result[key] = acc.to(states[0][key].dtype)
    return result


def merge_state(previous: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> AdapterState:
    """The previous global state with the keys of `update` replaced (layer-selective aggregation)."""
    unknown = set(update) - set(previous)
    if unknown:
        raise KeyError(f"update has keys the global state lacks: {sorted(unknown)[:3]}")
    merged = dict(previous)
    merged.update(update)
    return merged


def has_non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys whose tensor holds a NaN or an infinity (an update to reject)."""
    return [k for k, v in state.items() if not torch.isfinite(v).all()]


# Why an update is left out of the aggregation, in the order `update_problem` checks: the first
# that applies is the one reported.
UPDATE_PROBLEMS = ("unknown_key", "missing_key", "shape", "dtype", "non_finite")


@dataclass(frozen=True)
class UpdateProblem:
    """Why an uploaded state cannot be aggregated: `reason` (one of UPDATE_PROBLEMS) and a
    human-readable `detail` naming the key."""

    reason: str
    detail: str


def update_problem(state: Mapping[str, object], expected: Mapping[str, torch.Tensor]) -> UpdateProblem | None:
    """None if `state` is exactly what the server asked for: the keys of `expected` (the global
    values it sent), each a tensor of the same shape and dtype, every value finite. Otherwise
    the first problem, in UPDATE_PROBLEMS order."""
    unknown = [k for k in state if k not in expected]
    if unknown:
        return UpdateProblem("unknown_key", f"{len(unknown)} key(s) the server did not ask for, e.g. {unknown[0]}")
    missing = [k for k in expected if k not in state]
    if missing:
        return UpdateProblem("missing_key", f"{len(missing)} key(s) missing, e.g. {missing[0]}")
    for key, want in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return UpdateProblem("dtype", f"{key} is a {type(value).__name__}, not a tensor")
        if value.shape != want.shape:
            return UpdateProblem("shape", f"{key} has shape {tuple(value.shape)}, expected {tuple(want.shape)}")
        if value.dtype != want.dtype:
            return UpdateProblem("dtype", f"{key} has dtype {value.dtype}, expected {want.dtype}")
    bad = has_non_finite(state)
    if bad:
        return UpdateProblem("non_finite", f"NaN or inf in {len(bad)} key(s), e.g. {bad[0]}")
    return None
