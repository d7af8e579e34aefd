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


# ---------------------------------------------------------------------------------------------
# Server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization"): the weighted average
# of the uploads gives a pseudo-gradient Δ = average − global, and the server takes a step along it
# instead of jumping to the average. "avg" is FedAvg's jump (x ← x + Δ).


@dataclass(frozen=True)
class ServerOptimizer:
    """`kind`: "avg" (x ← x + Δ), "momentum" (FedAvgM: m ← β1·m + Δ; x ← x + lr·m) or "adam"
    (FedAdam, Reddi et al.'s Algorithm 2 with Adam's bias correction, as Flower's FedAdam does:
    m ← β1·m + (1−β1)·Δ; v ← β2·v + (1−β2)·Δ²; x ← x + lr·m̂ / (√v̂ + τ) with m̂ = m/(1−β1^t),
    v̂ = v/(1−β2^t), t the key's own step count. Without the correction the first rounds' steps
    are a tenth of lr or less, and our runs are 8 to 20 rounds long)."""

    kind: str = "avg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


def server_step(
    previous: Mapping[str, torch.Tensor],
    average: Mapping[str, torch.Tensor],
    moments: Mapping[str, torch.Tensor],
    optimizer: ServerOptimizer,
    fresh: Sequence[str] = (),
) -> tuple[AdapterState, dict[str, torch.Tensor]]:
    """The new global state and the optimiser's moments after one round (pure: inputs unchanged).

    previous: the global state (every key); average: the weighted average of this round's uploads
    (the aggregated keys only; the others keep their values and moments). moments: "m/<key>" and,
    for adam, "v/<key>" (the key's shape, float32) and "t/<key>" (its step count, 0-d).
    fresh: keys whose global value is not a point to step from (layers that just joined the aggregated ones, whose average of the devices'
    own values becomes their global value, as with "avg"): they take the average, and their
    moments restart from zero.
    """
    merged = merge_state(previous, average)
    if optimizer.kind == "avg":
        return merged, dict(moments)
    if optimizer.kind not in ("momentum", "adam"):
        raise ValueError(f"unknown server optimiser {optimizer.kind!r}")
    fresh_keys = set(fresh)
    new_moments = {k: v for k, v in moments.items() if k.split("/", 1)[1] not in fresh_keys}
    for key, avg in average.items():
        if key in fresh_keys:
            continue
        # float64 for the step, like the average, so tiny pseudo-gradients are not rounded away.
        x = previous[key].to(torch.float64)
        delta = avg.to(torch.float64) - x
        m = new_moments.get("m/" + key, torch.zeros_like(delta)).to(torch.float64)
        if optimizer.kind == "momentum":
            m = optimizer.beta1 * m + delta
            step = optimizer.lr * m
        else:
            v = new_moments.get("v/" + key, torch.zeros_like(delta)).to(torch.float64)
            t = int(new_moments.get("t/" + key, torch.tensor(0)).item()) + 1
            m = optimizer.beta1 * m + (1.0 - optimizer.beta1) * delta
            v = optimizer.beta2 * v + (1.0 - optimizer.beta2) * delta * delta
            new_moments["v/" + key] = v.to(torch.float32)
            new_moments["t/" + key] = torch.tensor(t)
            m_hat = m / (1.0 - optimizer.beta1**t)
            v_hat = v / (1.0 - optimizer.beta2**t)
            step = optimizer.lr * m_hat / (v_hat.sqrt() + optimizer.tau)
        new_moments["m/" + key] = m.to(torch.float32)
        merged[key] = (x + step).to(previous[key].dtype)
    return merged, new_moments
