"""Easy-to-hard curriculum: how much of its data a device uses in a round, and which samples
(method.md, Part 1, "Pacing").

Round convention: rounds are numbered from 1, and round r of T uses t = r - 1 in the pacing
formulas, so round 1 trains on exactly the start fraction λ0 and the full data is reached at
t = β·T, i.e. from round β·T + 1 on (round 9 of 10 with β = 0.8).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

# g(t, T, λ0, β, **options) -> fraction of the data; see `pacing_fraction`.
PacingFn = Callable[..., float]
PACING: dict[str, PacingFn] = {}

# Pacing fractions like 0.2 + 0.8·4/8 are 0.6000000000000001 in floating point; without this
# slack the pool would be ceil(6.000000000000001) = 7 samples out of 10 instead of 6.
_EPS = 1e-9

PoolOrder = Literal["easy_first", "hard_first", "random"]
_ORDERS = ("easy_first", "hard_first", "random")


def register_pacing(name: str) -> Callable[[PacingFn], PacingFn]:
    """Decorator adding a pacing function g(t, total_rounds, start_fraction, full_at, **kw) to PACING."""

    def register(fn: PacingFn) -> PacingFn:
        if name in PACING:
            raise ValueError(f"pacing function {name!r} is already registered")
        PACING[name] = fn
        return fn

    return register


def _progress(t: int, total_rounds: int, full_at: float) -> float:
    """t / (β·T): 0 in the first round, 1 when the full data is due."""
    return t / (full_at * total_rounds)


@register_pacing("linear")
def linear_pacing(t: int, total_rounds: int, start_fraction: float, full_at: float) -> float:
    """g(t) = min(1, λ0 + (1-λ0)·t/(β·T)), method.md's default."""
    return min(1.0, start_fraction + (1.0 - start_fraction) * _progress(t, total_rounds, full_at))


@register_pacing("root")
def root_pacing(t: int, total_rounds: int, start_fraction: float, full_at: float) -> float:
    """g(t) = min(1, sqrt(λ0² + (1-λ0²)·t/(β·T))) (Platanios et al. 2019): fast growth early."""
    squared = start_fraction**2
    return min(1.0, math.sqrt(squared + (1.0 - squared) * _progress(t, total_rounds, full_at)))


@register_pacing("step")
def step_pacing(t: int, total_rounds: int, start_fraction: float, full_at: float, steps: int = 4) -> float:
    """g(t) = min(1, λ0 + (1-λ0)·floor(t/(β·T/S))/S): S equal jumps, the last at t = β·T."""
    if steps < 1:
        raise ValueError(f"step pacing needs steps >= 1, got {steps}")
    reached = math.floor(_progress(t, total_rounds, full_at) * steps + _EPS)
    return min(1.0, start_fraction + (1.0 - start_fraction) * reached / steps)


@register_pacing("none")
def no_pacing(t: int, total_rounds: int, start_fraction: float, full_at: float) -> float:
    """All data in every round (the no-curriculum ablation)."""
    return 1.0


def pacing_fraction(
    name: str,
    round_num: int,
    total_rounds: int,
    start_fraction: float = 0.2,
    full_at: float = 0.8,
    **kw: float,
) -> float:
    """Share of a device's data to train on in round `round_num` (1-based) of `total_rounds`.

    start_fraction is λ0, the share in round 1; full_at is β, the part of the rounds after which
    all data is used. Extra keywords go to the pacing function (step: `steps`, default 4).
    Returns a value in [start_fraction, 1] (1 for "none").
    """
    if name not in PACING:
        raise ValueError(f"unknown pacing function {name!r}; choose one of {sorted(PACING)}")
    problems = []
    if total_rounds < 1:
        problems.append(f"total_rounds must be >= 1, got {total_rounds}")
    if not 1 <= round_num:
        problems.append(f"round_num counts from 1, got {round_num}")
    if not 0.0 < start_fraction <= 1.0:
        problems.append(f"start_fraction must be in (0, 1], got {start_fraction}")
    if not full_at > 0.0:
        problems.append(f"full_at must be > 0, got {full_at}")
    if problems:
        raise ValueError("; ".join(problems))
    fraction = PACING[name](round_num - 1, total_rounds, start_fraction, full_at, **kw)
    if fraction >= 1.0 - _EPS:
        return 1.0
    return max(start_fraction, fraction)


def pool_size(fraction: float, n: int) -> int:
    """⌈fraction·n⌉ samples, at least 1 when n > 0 (floating-point noise does not round up)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"curriculum fraction must be in (0, 1], got {fraction}")
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(fraction * n - _EPS)))


def curriculum_pool(
    indices: Sequence[int],
    scores: Sequence[float] | torch.Tensor,
    fraction: float,
    order: PoolOrder = "easy_first",
    rng: np.random.Generator | None = None,
) -> list[int]:
    """The ⌈fraction·n⌉ samples of `indices` to train on this round (method.md Part 1).

    easy_first: the lowest difficulty scores, easiest first; hard_first: the highest, hardest
    first (ablation); random: a random subset drawn with `rng` (ablation, scores unused). Equal
    scores are ordered by index, so the pool does not depend on the order of `indices`.
    A NaN score marks a sample not scored (a device may score only a subsample): unscored
    samples rank after every scored one, in an order drawn with `rng` (by index without one),
    so they join the pool once the scored ones are all in.
    """
    return _easiest(indices, scores, pool_size(fraction, len(indices)), order, rng)


def _easiest(
    indices: Sequence[int],
    scores: Sequence[float] | torch.Tensor,
    size: int,
    order: PoolOrder,
    rng: np.random.Generator | None,
) -> list[int]:
    """The first `size` samples of `indices` in curriculum order (see curriculum_pool)."""
    if order not in _ORDERS:
        raise ValueError(f"unknown curriculum order {order!r}; choose one of {list(_ORDERS)}")
    score_list = [float(s) for s in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
    if len(score_list) != len(indices):
        raise ValueError(f"{len(indices)} indices but {len(score_list)} scores")
    items = [(s, int(i)) for s, i in zip(score_list, indices)]
    if order == "random":
        if rng is None:
            raise ValueError("order='random' needs an rng (numpy.random.Generator)")
        return [items[j][1] for j in rng.permutation(len(items))[:size]]
    scored = [item for item in items if not math.isnan(item[0])]
    unscored = sorted(index for s, index in items if math.isnan(s))
    sign = 1.0 if order == "easy_first" else -1.0
    ranked = [index for _, index in sorted(scored, key=lambda item: (sign * item[0], item[1]))]
    if len(ranked) < size and unscored:
        if rng is not None:
            unscored = [unscored[j] for j in rng.permutation(len(unscored))]
        ranked += unscored
    return ranked[:size]


def class_balanced_pool(
    indices: Sequence[int],
    scores: Sequence[float] | torch.Tensor,
    labels: Sequence[int],
    fraction: float,
    order: PoolOrder = "easy_first",
    rng: np.random.Generator | None = None,
) -> list[int]:
    """The same share of every class's samples, each class ranked on its own.

    Why: a sample is "easy" when the current model already predicts its label, so with a fresh
    classification head the easiest share of a device's data is mostly the one class the head
    happens to favour; training on that pool only reinforces the bias (measured: FibecFed's
    global accuracy then stays at the majority rate for the early rounds). Ranking within each
    class keeps the easy-to-hard order and the device's class mix. Our choice, not the paper's.

    The pool holds ⌈fraction·n⌉ samples, as an unbalanced pool does, shared out over the classes
    in proportion to their sizes, every class at least one once the pool has room (`class_counts`).
    (Rounding each class up on its own gave up to C − 1 samples more than the fraction the round
    reports.)
    """
    score_list = scores.tolist() if isinstance(scores, torch.Tensor) else list(scores)
    if not (len(score_list) == len(indices) == len(labels)):
        raise ValueError(f"{len(indices)} indices, {len(score_list)} scores, {len(labels)} labels")
    by_class: dict[int, tuple[list[int], list[float]]] = {}
    for index, score, label in zip(indices, score_list, labels):
        members = by_class.setdefault(int(label), ([], []))
        members[0].append(int(index))
        members[1].append(float(score))
    labels_sorted = sorted(by_class)
    counts = class_counts(pool_size(fraction, len(indices)), [len(by_class[label][0]) for label in labels_sorted])
    pool: list[int] = []
    for label, count in zip(labels_sorted, counts):
        members, member_scores = by_class[label]
        pool.extend(_easiest(members, member_scores, count, order, rng))
    return pool


def class_counts(total: int, sizes: Sequence[int]) -> list[int]:
    """`total` pool samples shared over classes of `sizes`, in proportion, each at most its size.

    Handed out one at a time, each to the class with the most samples per pool place so far
    (the largest size_c / count_c; a class with none first; ties: the larger class, then the
    earlier one): Adams's divisor method. So every class of the device is in the pool as soon as
    the pool has room for one of each, and a class never loses a place when the pool grows
    (largest remainder can take the one sample of a small class out of a larger pool).
    """
    n = sum(sizes)
    if not 0 <= total <= n:
        raise ValueError(f"cannot take {total} samples from classes of {list(sizes)} ({n} in all)")
    counts = [0] * len(sizes)
    for _ in range(total):
        open_classes = [c for c in range(len(sizes)) if counts[c] < sizes[c]]
        # size/count compared as size_c * count_d > size_d * count_c: exact, no division by zero.
        best = open_classes[0]
        for c in open_classes[1:]:
            ahead = sizes[c] * counts[best] - sizes[best] * counts[c]
            if ahead > 0 or (ahead == 0 and sizes[c] > sizes[best]):
                best = c
        counts[best] += 1
    return counts
