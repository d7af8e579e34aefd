"""Predictions and classification metrics (accuracy, binary F1, Matthews correlation)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch


@torch.no_grad()
def predict(
    logits_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    make_batch: Callable[[Sequence[int]], Mapping[str, torch.Tensor]],
    indices: Sequence[int],
    batch_size: int,
) -> tuple[torch.Tensor, float]:
    """Predicted class per index, shape (N,), and the mean cross-entropy loss."""
    preds, loss_sum = [], 0.0
    for start in range(0, len(indices), batch_size):
        batch = make_batch(indices[start : start + batch_size])
        logits = logits_fn(batch)  # (B, C)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        preds.append(logits.argmax(dim=-1).cpu())
    if not preds:
        return torch.empty(0, dtype=torch.long), float("nan")
    return torch.cat(preds), loss_sum / len(indices)


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """accuracy; f1 of class 1 (binary tasks) or macro-F1; Matthews correlation (multiclass form)."""
    preds = preds.long().cpu()
    labels = labels.long().cpu()
    n = labels.numel()
    if n == 0:
        return {"accuracy": float("nan"), "f1": float("nan"), "mcc": float("nan")}
    confusion = torch.zeros((num_classes, num_classes), dtype=torch.float64)  # rows: truth, cols: prediction
    confusion.index_put_((labels, preds), torch.ones(n, dtype=torch.float64), accumulate=True)
    correct = confusion.diag()
    accuracy = float(correct.sum() / n)

    def f1_of(c: int) -> float:
        tp = correct[c]
        denom = confusion[:, c].sum() + confusion[c, :].sum()
        return float(2 * tp / denom) if denom > 0 else 0.0

    f1 = f1_of(1) if num_classes == 2 else sum(f1_of(c) for c in range(num_classes)) / num_classes
    # Gorodkin's multiclass MCC; equals the usual binary formula for two classes.
    t = confusion.sum(dim=1)  # true count per class
    p = confusion.sum(dim=0)  # predicted count per class
    c = float(correct.sum())
    s = float(n)
    numerator = c * s - float((t * p).sum())
    denominator = math.sqrt(s * s - float((p * p).sum())) * math.sqrt(s * s - float((t * t).sum()))
    mcc = numerator / denominator if denominator > 0 else 0.0
    return {"accuracy": accuracy, "f1": f1, "mcc": mcc}
