"""Split a task's samples across simulated devices: iid, label skew, quantity skew, natural groups.

Every function returns `list[list[int]]`: for each device, the sorted indices of its samples.
Each index lands on exactly one device. Randomness comes only from the `numpy.random.Generator`
passed in.

The test split is divided the same way as the train split (same device size shares and, under
label skew, the same per-device class priors), so a device's test data looks like its train data
and personalised evaluation is meaningful.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from fibecfed.config import PartitionConfig
from fibecfed.data.types import TaskData
from fibecfed.errors import DataError

logger = logging.getLogger(__name__)

Parts = list[list[int]]

# Independent random streams of one seed, so that e.g. the test split's partition does not
# shift when the train split changes size.
_SKEW_STREAM, _TRAIN_STREAM, _TEST_STREAM = 201, 202, 203


def apportion(total: int, shares: Sequence[float] | np.ndarray) -> np.ndarray:
    """Split `total` into non-negative integers proportional to `shares` (largest remainder).

    The result sums to `total` exactly; ties in the remainders go to the earlier entry.
    """
    weights = np.asarray(shares, dtype=float)
    assert weights.ndim == 1 and weights.size > 0 and weights.sum() > 0, "shares must be positive"
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(int)
    shortfall = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:shortfall]] += 1
    return counts


def device_sizes(n_samples: int, size_shares: Sequence[float] | np.ndarray) -> np.ndarray:
    """Number of samples per device, proportional to `size_shares`, summing to `n_samples`.

    When there are at least as many samples as devices, every device gets at least one.
    """
    num_devices = len(size_shares)
    if n_samples >= num_devices:
        return 1 + apportion(n_samples - num_devices, size_shares)
    return apportion(n_samples, size_shares)


def _sorted_parts(parts: Sequence[Sequence[int] | np.ndarray]) -> Parts:
    return [sorted(int(i) for i in part) for part in parts]


def iid_partition(n_samples: int, num_devices: int, rng: np.random.Generator) -> Parts:
    """Shuffle the samples and deal them out evenly: device sizes differ by at most one."""
    return _sorted_parts(np.array_split(rng.permutation(n_samples), num_devices))


def split_by_shares(
    n_samples: int, size_shares: Sequence[float] | np.ndarray, rng: np.random.Generator
) -> Parts:
    """Random samples per device; device sizes follow `size_shares` (see `device_sizes`)."""
    sizes = device_sizes(n_samples, size_shares)
    boundaries = np.cumsum(sizes)[:-1]
    return _sorted_parts(np.split(rng.permutation(n_samples), boundaries))


def dirichlet_quantity_partition(
    n_samples: int, num_devices: int, alpha: float, rng: np.random.Generator
) -> Parts:
    """Quantity skew: device sizes proportional to a draw from Dirichlet(alpha * ones(K))."""
    size_shares = rng.dirichlet(alpha * np.ones(num_devices))
    return split_by_shares(n_samples, size_shares, rng)


def draw_label_skew(
    num_devices: int, num_classes: int, alpha: float, size_alpha: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the label-skew parameters (FedPepTAO's non-IID split).

    Returns `size_shares` of shape (K,), a draw from Dirichlet(size_alpha * ones(K)), and
    `class_priors` of shape (K, C), one Dirichlet(alpha * ones(C)) draw per device. A small
    `alpha` gives each device few classes; a large one gives every device the global class mix.
    """
    size_shares = rng.dirichlet(size_alpha * np.ones(num_devices))
    class_priors = rng.dirichlet(alpha * np.ones(num_classes), size=num_devices)
    return size_shares, class_priors


def _pick_class(weights: np.ndarray, uniform: float) -> int:
    """Inverse-CDF draw of a class index from non-negative `weights` with a U[0, 1) number."""
    cumulative = np.cumsum(weights)
    picked = int(np.searchsorted(cumulative, uniform * cumulative[-1], side="right"))
    # Floating-point rounding could step past the last class with weight; never pick a zero one.
    return min(picked, int(np.flatnonzero(weights)[-1]))


def dirichlet_label_partition_with(
    labels: Sequence[int] | np.ndarray,
    size_shares: np.ndarray,
    class_priors: np.ndarray,
    rng: np.random.Generator,
) -> Parts:
    """Label skew with given parameters (see `draw_label_skew`); used for train and test alike.

    Device sizes follow `size_shares`. Samples are handed out one at a time to devices in a random
    order of their free slots; the receiving device draws a class from its prior renormalised over
    the classes that still have unassigned samples, and gets a random unassigned sample of that
    class. If its prior is zero on every class left, it draws in proportion to what is left.
    """
    labels = np.asarray(labels, dtype=int)
    num_devices, num_classes = class_priors.shape
    assert len(size_shares) == num_devices, "size_shares and class_priors disagree on devices"
    assert labels.size == 0 or (labels.min() >= 0 and labels.max() < num_classes), (
        "label out of range"
    )
    sizes = device_sizes(labels.size, size_shares)
    # The device that receives each next sample: every device appears once per free slot.
    receivers = rng.permutation(np.repeat(np.arange(num_devices), sizes))
    # Unassigned samples per class, shuffled, so popping from the end takes a random one.
    pools = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in range(num_classes)]
    remaining = np.array([len(pool) for pool in pools], dtype=float)
    uniforms = rng.random(labels.size)
    parts: Parts = [[] for _ in range(num_devices)]
    for device, uniform in zip(receivers, uniforms, strict=True):
        weights = class_priors[device] * (remaining > 0)
        if weights.sum() <= 0:
            weights = remaining
        label = _pick_class(weights, uniform)
        parts[device].append(pools[label].pop())
        remaining[label] -= 1
    return _sorted_parts(parts)


def dirichlet_label_partition(
    labels: Sequence[int] | np.ndarray,
    num_devices: int,
    alpha: float,
    size_alpha: float,
    rng: np.random.Generator,
    num_classes: int,
) -> Parts:
    """Label skew (FedPepTAO): draw the parameters with `draw_label_skew`, then assign samples."""
    size_shares, class_priors = draw_label_skew(num_devices, num_classes, alpha, size_alpha, rng)
    return dirichlet_label_partition_with(labels, size_shares, class_priors, rng)


def natural_partition(groups: Sequence[str]) -> tuple[Parts, list[str]]:
    """One device per distinct group value, in sorted order of the values."""
    group_names = sorted(set(groups))
    device_of = {name: device for device, name in enumerate(group_names)}
    parts: Parts = [[] for _ in group_names]
    for index, group in enumerate(groups):
        parts[device_of[group]].append(index)
    return parts, group_names


# ---------------------------------------------------------------------------------------------
# Partitioning a task's train and test splits together.


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _iid_scheme(task: TaskData, cfg: PartitionConfig, seed: int) -> tuple[Parts, Parts]:
    train = iid_partition(len(task.train), cfg.num_devices, _rng(seed, _TRAIN_STREAM))
    test = iid_partition(len(task.test), cfg.num_devices, _rng(seed, _TEST_STREAM))
    return train, test


def _quantity_scheme(task: TaskData, cfg: PartitionConfig, seed: int) -> tuple[Parts, Parts]:
    size_shares = _rng(seed, _SKEW_STREAM).dirichlet(cfg.alpha * np.ones(cfg.num_devices))
    train = split_by_shares(len(task.train), size_shares, _rng(seed, _TRAIN_STREAM))
    test = split_by_shares(len(task.test), size_shares, _rng(seed, _TEST_STREAM))
    return train, test


def _label_scheme(task: TaskData, cfg: PartitionConfig, seed: int) -> tuple[Parts, Parts]:
    num_classes = len(task.label_names)
    size_shares, class_priors = draw_label_skew(
        cfg.num_devices, num_classes, cfg.alpha, cfg.size_alpha, _rng(seed, _SKEW_STREAM)
    )
    train = dirichlet_label_partition_with(
        task.train.labels, size_shares, class_priors, _rng(seed, _TRAIN_STREAM)
    )
    test = dirichlet_label_partition_with(
        task.test.labels, size_shares, class_priors, _rng(seed, _TEST_STREAM)
    )
    return train, test


def _natural_scheme(task: TaskData, cfg: PartitionConfig, seed: int) -> tuple[Parts, Parts]:
    assert task.train.groups is not None and task.test.groups is not None
    train, group_names = natural_partition(task.train.groups)
    if len(group_names) != cfg.num_devices:
        logger.warning(
            "partition.scheme=natural: %d groups in the train split make %d devices "
            "(partition.num_devices=%d is ignored)",
            len(group_names),
            len(group_names),
            cfg.num_devices,
        )
    device_of = {name: device for device, name in enumerate(group_names)}
    test: Parts = [[] for _ in group_names]
    orphans: set[str] = set()
    for index, group in enumerate(task.test.groups):
        if group in device_of:
            test[device_of[group]].append(index)
        else:
            orphans.add(group)
    if orphans:
        left_out = sum(1 for group in task.test.groups if group in orphans)
        logger.warning(
            "%d test samples are left out: their groups have no train samples, so no device "
            "owns them (%s)",
            left_out,
            ", ".join(sorted(orphans)[:5]) + (", ..." if len(orphans) > 5 else ""),
        )
    return train, test


_SCHEMES: dict[str, Callable[[TaskData, PartitionConfig, int], tuple[Parts, Parts]]] = {
    "iid": _iid_scheme,
    "dirichlet_label": _label_scheme,
    "dirichlet_quantity": _quantity_scheme,
    "natural": _natural_scheme,
}


def _how_to_fix(cfg: PartitionConfig) -> str:
    fixes = {
        "iid": (
            f"under iid partition; use fewer devices (partition.num_devices={cfg.num_devices}) "
            "or more data"
        ),
        "dirichlet_label": (
            f"under dirichlet_label partition with alpha={cfg.alpha}, size_alpha={cfg.size_alpha}; "
            "use fewer devices (partition.num_devices) or a larger partition.size_alpha"
        ),
        "dirichlet_quantity": (
            f"under dirichlet_quantity partition with alpha={cfg.alpha}; "
            "use fewer devices (partition.num_devices) or a larger partition.alpha"
        ),
        "natural": "under natural partition (one device per group); lower partition.min_samples",
    }
    return fixes[cfg.scheme]


def _check_min_samples(train_parts: Parts, cfg: PartitionConfig) -> None:
    small = [device for device, part in enumerate(train_parts) if len(part) < cfg.min_samples]
    if not small:
        return
    total = sum(len(part) for part in train_parts)
    if cfg.scheme != "natural" and total < len(train_parts) * cfg.min_samples:
        # No draw of the skew could fix this: say so instead of blaming alpha.
        raise DataError(
            f"{total} training samples cannot give each of partition.num_devices={len(train_parts)} "
            f"devices partition.min_samples={cfg.min_samples}; set partition.num_devices="
            f"{total // cfg.min_samples} or fewer, or use more data"
        )
    first = small[0]
    more = (
        f" ({len(small) - 1} more devices below partition.min_samples={cfg.min_samples})"
        if len(small) > 1
        else ""
    )
    raise DataError(
        f"device {first} got {len(train_parts[first])} training samples{more} {_how_to_fix(cfg)}"
    )


def partition_task(
    task: TaskData, cfg: PartitionConfig, seed: int, group_column_set: bool
) -> tuple[Parts, Parts]:
    """Partition the train split by `cfg.scheme`, and the test split the same way.

    iid and dirichlet_quantity divide the test split with the same size shares as the train
    split; dirichlet_label also reuses the per-device class priors; natural aligns devices by group
    name (a group absent from the test split gets an empty test part, and test samples of a group
    with no train samples are left out with a warning). Under natural, the number of groups is the
    number of devices. Raises DataError when a device gets fewer than `cfg.min_samples` train
    samples, or when scheme=natural has no group column.
    """
    if cfg.scheme == "natural" and (not group_column_set or task.train.groups is None):
        raise DataError("partition.scheme=natural needs data.group_column")
    train_parts, test_parts = _SCHEMES[cfg.scheme](task, cfg, seed)
    _check_min_samples(train_parts, cfg)
    logger.debug("train samples per device: %s", [len(part) for part in train_parts])
    return train_parts, test_parts
