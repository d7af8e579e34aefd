"""Local training on one device: the single loop behind FedAvg, FedProx and FibecFed.

The methods differ only in what is passed in: which samples the batches come from (curriculum),
a proximal anchor (FedProx), and per-parameter update masks (sparse local update).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fibecfed.adapters import is_lora_key


class NonFiniteLossError(RuntimeError):
    """Local training produced a NaN or infinite loss; the device's update must be discarded."""


@dataclass(frozen=True)
class LocalResult:
    mean_loss: float
    steps: int
    samples: int


def num_local_steps(pool_size: int, batch_size: int, local_steps: int | None, local_epochs: float | None) -> int:
    """Steps per round: `local_steps` if set, else enough batches for `local_epochs` passes."""
    if local_steps is not None:
        return local_steps
    assert local_epochs is not None
    return max(1, math.ceil(local_epochs * pool_size / batch_size))


def sample_batches(pool: Sequence[int], batch_size: int, num_steps: int, rng: np.random.Generator) -> list[list[int]]:
    """`num_steps` mini-batches drawn at random from `pool`, without replacement within a pass.

    Passes over the pool are concatenated shuffles, so every sample is seen once before any is
    seen twice. A batch that straddles two passes holds distinct samples: the next pass's first
    samples are the first of its shuffle that the batch does not hold yet (the others follow in
    shuffle order). A pool smaller than the batch gives batches of the whole pool.
    """
    if len(pool) == 0:
        raise ValueError("cannot draw batches from an empty pool")
    pool_arr = np.asarray(pool)
    size = min(batch_size, len(pool_arr))
    order: list[int] = []
    batches = []
    for _ in range(num_steps):
        if len(order) < size:
            order.extend(_next_pass(pool_arr[rng.permutation(len(pool_arr))].tolist(), order, size - len(order)))
        batches.append(order[:size])
        del order[:size]
    return batches


def _next_pass(shuffled: list[int], held: Sequence[int], needed: int) -> list[int]:
    """`shuffled` reordered so its first `needed` samples are not in `held` (the rest of the
    previous pass, fewer than a batch): the batch that joins the two passes then has no sample
    twice. Both passes stay whole shuffles; only the joining batch's draw changes."""
    if not held:
        return shuffled
    taken = set(held)
    first = [j for j, i in enumerate(shuffled) if i not in taken][:needed]  # positions
    chosen = set(first)
    return [shuffled[j] for j in first] + [i for j, i in enumerate(shuffled) if j not in chosen]


def _param_groups(params: Mapping[str, nn.Parameter], lr: float, head_lr: float | None, weight_decay: float) -> list[dict]:
    lora = [p for k, p in params.items() if is_lora_key(k)]
    head = [p for k, p in params.items() if not is_lora_key(k)]
    groups = []
    if lora:
        groups.append({"params": lora, "lr": lr, "weight_decay": weight_decay})
    if head:
        groups.append({"params": head, "lr": head_lr if head_lr is not None else lr, "weight_decay": weight_decay})
    return groups


def local_train(
    params: Mapping[str, nn.Parameter],
    loss_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    batches: Iterable[Mapping[str, torch.Tensor]],
    lr: float,
    head_lr: float | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    prox_mu: float = 0.0,
    prox_anchor: Mapping[str, torch.Tensor] | None = None,
    update_masks: Mapping[str, torch.Tensor] | None = None,
    frozen_keys: Iterable[str] = (),
    masks_after_first_backward: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> LocalResult:
    """Train `params` in place with AdamW over `batches`; return the mean loss.

    prox_mu > 0 adds FedProx's (mu/2)·||w - w_anchor||² over the parameters in `prox_anchor`.
    `update_masks[key]` (bool, the parameter's shape) lets only True entries change: their
    gradients are zeroed elsewhere, so AdamW's moments stay exactly zero there and its step is
    exactly zero; with weight decay, which would still shrink them, the masked entries are also
    restored after each step.

    Compute is saved where a parameter does not train at all: `frozen_keys`, and any parameter
    whose mask is all False, get requires_grad=False for the loop (restored afterwards). The
    backbone is frozen, so autograd then stops at the lowest layer that still has a trainable
    parameter: no backward through the layers below it (the FLOP saving of a sparse update).
    `masks_after_first_backward`, when no `update_masks` are given, is called once after the
    first backward pass (e.g. to build masks from that step's Fisher) and its masks apply from
    that first step on.
    """
    frozen = set(frozen_keys)
    masks = dict(update_masks or {})
    frozen |= {k for k, m in masks.items() if not bool(m.any())}
    trainable = {k: p for k, p in params.items() if k not in frozen}
    optimizer = torch.optim.AdamW(_param_groups(trainable, lr, head_lr, weight_decay))
    anchor = {k: v.to(params[k].device) for k, v in (prox_anchor or {}).items()} if prox_mu > 0 else {}
    was_trainable = {k: p.requires_grad for k, p in params.items()}

    def keep_masks(current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The mask lives on the parameter's device; ~mask marks what must stay as it was.
        return {k: ~current[k].to(p.device) for k, p in trainable.items() if k in current}

    keep = keep_masks(masks)
    total_loss, steps, samples = 0.0, 0, 0
    try:
        for key, param in params.items():
            param.requires_grad_(key in trainable)
        for batch in batches:
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                # The message starts "loss became": flower.strategy tells a device fault by it.
                raise NonFiniteLossError(f"loss became {loss.item()} at local step {steps}")
            objective = loss
            if anchor:
                prox = sum(((trainable[k] - a) ** 2).sum() for k, a in anchor.items() if k in trainable)
                objective = loss + 0.5 * prox_mu * prox
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if steps == 0 and masks_after_first_backward is not None and not masks:
                masks = dict(masks_after_first_backward())
                keep = keep_masks(masks)
                for key, mask in masks.items():
                    if key in trainable and not bool(mask.any()):
                        # From the next step on, no backward into it (its grad is zeroed now).
                        trainable[key].requires_grad_(False)
            for key, keep_mask in keep.items():
                grad = trainable[key].grad
                if grad is not None:
                    grad.masked_fill_(keep_mask, 0.0)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in trainable.values() if p.grad is not None], max_grad_norm)
            restore = weight_decay > 0 and keep
            before = {k: trainable[k].detach().clone() for k in keep} if restore else {}
            optimizer.step()
            if restore:
                with torch.no_grad():
                    for key, keep_mask in keep.items():
                        trainable[key].copy_(torch.where(keep_mask, before[key], trainable[key]))
            total_loss += float(loss.detach())
            steps += 1
            samples += int(batch["labels"].shape[0])
    finally:
        for key, param in params.items():
            param.requires_grad_(was_trainable[key])
    return LocalResult(mean_loss=total_loss / max(steps, 1), steps=steps, samples=samples)
