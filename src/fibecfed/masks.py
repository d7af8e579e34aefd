"""Sparse local update of the non-GAL layers: Fisher neuron importance, its momentum, the masks.

method.md, Part 2: the LoRA parameters of layers outside the global aggregation layers stay on
the device and only their most important neurons are updated. Importance is a neuron-wise sum of
the diagonal Fisher (squared gradients), smoothed across rounds with momentum
F_t = γ·F_{t-1} + (1-γ)·F̃_t; the mask keeps a share ρ of the neurons of each matrix.

A "neuron" is a row of a parameter, i.e. one output unit of the matrix as a linear map
(weights have shape (out, in)). For lora_A (r, in) a neuron is one of the r rank components; for
lora_B (out_features, r) it is one output feature of the adapted linear layer. A 1-D parameter
(a bias) has one neuron per entry. Masks are bool tensors of the parameter's shape (True = may
change), the format `training.local_train(update_masks=...)` takes.

A device keeps its Fisher momentum as the sums the masks need, not the full diagonal
(`fisher_sums`): a row sum per neuron of every matrix, and for lora_B also its column sums
(key + COLUMNS; lora_A's rank importance reads them). The momentum is linear, so the momentum of
the sums is the sum of the momentum (up to float rounding); for MiniLM (r=8, in=384) that is
about 16x fewer numbers per LoRA pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch


def neuron_importance(fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Neuron-wise sum of a diagonal Fisher: (out, in, ...) -> (out,) by summing each row.

    `fisher[key]` has the parameter's shape (e.g. squared gradients accumulated over samples).
    """
    importance = {}
    for key, values in fisher.items():
        if values.ndim == 0:
            raise ValueError(f"Fisher of {key} is a scalar; a neuron needs at least one dimension")
        importance[key] = values.reshape(values.shape[0], -1).sum(dim=1)  # (out,)
    return importance


COLUMNS = "#columns"  # suffix of the key of a lora_B matrix's column sums in `fisher_sums`


def base_key(key: str) -> str:
    """The parameter key of a `fisher_sums` entry ("...lora_B...weight#columns" -> "...lora_B...weight")."""
    return key[: -len(COLUMNS)] if key.endswith(COLUMNS) else key


def fisher_sums(fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compact Fisher a device keeps: key -> (rows,) row sums of the diagonal Fisher, and for
    a lora_B key also key+COLUMNS -> (r,) its column sums.

    Idempotent: an entry that is already a sum (1-D, or a COLUMNS key) is kept as it is, so
    old device states holding the full diagonal (rows, in) convert on load and new ones pass
    through. The sums are taken exactly as `neuron_importance` and `rank_importance` take them,
    so masks from a fresh full Fisher and from its sums are bit-identical.
    """
    sums: dict[str, torch.Tensor] = {}
    for key, values in fisher.items():
        if key.endswith(COLUMNS) or values.ndim <= 1:
            sums.setdefault(key, values)
            continue
        flat = values.reshape(values.shape[0], -1)  # (rows, in)
        sums[key] = flat.sum(dim=1)  # (rows,)
        if ".lora_B." in key:
            sums[key + COLUMNS] = flat.sum(dim=0)  # (r,): one per rank component
    return sums


def importance_from_sums(
    sums: Mapping[str, torch.Tensor], keys: Iterable[str], lora_a_by_rank: bool
) -> dict[str, torch.Tensor]:
    """Neuron importance (rows,) of each of `keys` from `fisher_sums`: its row sums, plus for a
    lora_A key (lora_a_by_rank) its lora_B partner's column sums (see `rank_importance`)."""
    importance = {}
    for key in keys:
        own = sums[key]
        partner = lora_partner(key)
        if lora_a_by_rank and partner is not None and partner + COLUMNS in sums:
            component = sums[partner + COLUMNS]
            if component.shape != own.shape:
                raise ValueError(f"{partner} has {component.shape[0]} columns but {key} has {own.shape[0]} rows")
            own = own + component.to(own.dtype)
        importance[key] = own
    return importance


def lora_partner(key: str) -> str | None:
    """The lora_B key of a lora_A key (the two halves of one low-rank update), else None."""
    return key.replace(".lora_A.", ".lora_B.") if ".lora_A." in key else None


def rank_importance(fisher: Mapping[str, torch.Tensor], importance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Importance of each lora_A row as the importance of its rank component.

    Row j of lora_A (r, in) and column j of lora_B (out, r) form rank component j of the update
    B·A. While B = 0 (peft's initialisation, so at every device's first participation) the
    gradient of A is exactly zero: ∂L/∂A = Bᵀ·(∂L/∂y)·xᵀ. Ranking A's rows by their own Fisher
    then ranks all-zero rows, and the mask is a tie-break (row 0). The Fisher of B's column j,
    Σ_o F_B[o, j], measures how much component j could reduce the loss, and is non-zero from
    the start (∂L/∂B = (∂L/∂y)·(A x)ᵀ with A random). So A row j scores
    Σ_i F_A[j, i] + Σ_o F_B[o, j]: its own importance plus its component's. Keys without a
    lora_B partner in `fisher` keep their own importance.
    """
    result = dict(importance)
    for key in importance:
        partner = lora_partner(key)
        if partner is None or partner not in fisher:
            continue
        component = fisher[partner].reshape(fisher[partner].shape[0], -1).sum(dim=0)  # (r,): column sums of B
        if component.shape != importance[key].shape:
            raise ValueError(f"{partner} has {component.shape[0]} columns but {key} has {importance[key].shape[0]} rows")
        result[key] = importance[key] + component.to(importance[key].dtype)
    return result


def update_fisher_momentum(
    previous: Mapping[str, torch.Tensor] | None, current: Mapping[str, torch.Tensor], gamma: float
) -> dict[str, torch.Tensor]:
    """F_t = γ·F_{t-1} + (1-γ)·F̃_t per key (method.md, γ = 0.9 by default).

    With no previous value (a device's first participation) F_t = F̃_t: starting from F_0 = 0 would
    shrink the first estimate to (1-γ)·F̃_1, biased toward zero (which only matters if importances
    of different rounds are compared, but costs nothing to avoid). A key of `current` missing from
    `previous` (a layer that just left the GAL) starts the same way; keys only in `previous` are
    dropped: the result has exactly `current`'s keys.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"Fisher momentum gamma must be in [0, 1], got {gamma}")
    previous = previous or {}
    updated = {}
    for key, now in current.items():
        before = previous.get(key)
        if before is None:
            updated[key] = now.clone()
            continue
        if before.shape != now.shape:
            raise ValueError(f"Fisher of {key} changed shape: {tuple(before.shape)} before, {tuple(now.shape)} now")
        updated[key] = gamma * before.to(now.device, now.dtype) + (1.0 - gamma) * now
    return updated


def _rows_kept(share: float, rows: int) -> int:
    """ceil(share·rows), at least 1 when share > 0; 0 when share is 0.

    A small tolerance keeps float products exact (0.7·10 = 7.000000000000001 must give 7, not 8).
    """
    if share <= 0.0:
        return 0
    return min(rows, max(1, math.ceil(share * rows - 1e-9)))


def neuron_masks(
    importance: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], share: float
) -> dict[str, torch.Tensor]:
    """Update masks keeping the top share of rows of each parameter by importance.

    importance[key]: (rows,) from `neuron_importance`; shapes[key]: the parameter's shape, rows =
    shape[0]. Per parameter the ceil(share·rows) most important rows (at least 1) are True over
    the whole row, the others False; ties go to the lower row index. share=1 gives all True,
    share=0 all False (the parameter is frozen). The masks live on the importance's device.
    """
    if not 0.0 <= share <= 1.0 or math.isnan(share):
        raise ValueError(f"share of updated neurons must be in [0, 1], got {share}")
    if set(importance) != set(shapes):
        missing, extra = sorted(set(shapes) - set(importance)), sorted(set(importance) - set(shapes))
        raise KeyError(f"importance and shapes disagree: no importance for {missing[:3]}, no shape for {extra[:3]}")
    masks = {}
    for key, shape in shapes.items():
        shape = torch.Size(shape)
        scores = importance[key]
        rows = shape[0] if len(shape) else 0
        if scores.shape != (rows,):
            raise ValueError(f"importance of {key} has shape {tuple(scores.shape)}, expected ({rows},) for {tuple(shape)}")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"importance of {key} is not finite")
        kept = _rows_kept(share, rows)
        # Stable descending sort: equal importances keep their order, so the lower row wins.
        order = torch.sort(scores, descending=True, stable=True).indices[:kept]
        row_mask = torch.zeros(rows, dtype=torch.bool, device=scores.device)
        row_mask[order] = True
        masks[key] = row_mask.reshape(rows, *([1] * (len(shape) - 1))).expand(shape).clone()
    return masks
