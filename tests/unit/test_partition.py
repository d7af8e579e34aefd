"""Partition schemes: hand-computed sizes, every index once, label skew that follows alpha."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from fibecfed.config import PartitionConfig
from fibecfed.data.partition import (
    apportion,
    device_sizes,
    dirichlet_label_partition,
    dirichlet_label_partition_with,
    dirichlet_quantity_partition,
    draw_label_skew,
    iid_partition,
    natural_partition,
    partition_task,
    split_by_shares,
)
from fibecfed.data.types import TaskData, TextDataset
from fibecfed.errors import DataError


def _dataset(labels: list[int], num_classes: int, groups: list[str] | None = None) -> TextDataset:
    return TextDataset(
        texts=[f"sample {i}" for i in range(len(labels))],
        labels=list(labels),
        label_names=[str(c) for c in range(num_classes)],
        groups=groups,
    )


def _task(
    train_labels: list[int],
    test_labels: list[int],
    num_classes: int,
    train_groups: list[str] | None = None,
    test_groups: list[str] | None = None,
) -> TaskData:
    return TaskData(
        name="synthetic",
        train=_dataset(train_labels, num_classes, train_groups),
        test=_dataset(test_labels, num_classes, test_groups),
    )


def _balanced_labels(per_class: int, num_classes: int) -> list[int]:
    return [c for _ in range(per_class) for c in range(num_classes)]


def _assert_exact_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n)), "every index must be on exactly one device"


def _class_shares(part: list[int], labels: list[int], num_classes: int) -> np.ndarray:
    counts = np.bincount([labels[i] for i in part], minlength=num_classes)
    return counts / max(1, counts.sum())


# ---------------------------------------------------------------------------------------------
# Sizes.


def test_apportion_largest_remainder_by_hand() -> None:
    assert apportion(10, [1, 1, 1]).tolist() == [4, 3, 3]
    # exact 3.5, 1.75, 1.75 -> floors 3, 1, 1 -> the two .75 remainders get the 2 left over
    assert apportion(7, [0.5, 0.25, 0.25]).tolist() == [3, 2, 2]
    assert apportion(0, [0.2, 0.8]).tolist() == [0, 0]


def test_device_sizes_give_every_device_one_sample_when_possible() -> None:
    # 1 each, then the other 7 split 6.86 / 0.07 / 0.07 -> 7 / 0 / 0
    assert device_sizes(10, [0.98, 0.01, 0.01]).tolist() == [8, 1, 1]
    # fewer samples than devices: someone gets none
    assert device_sizes(5, [1.0] * 6).tolist() == [1, 1, 1, 1, 1, 0]


def test_iid_partition_sizes_differ_by_at_most_one() -> None:
    parts = iid_partition(103, 10, np.random.default_rng(0))
    _assert_exact_cover(parts, 103)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(sizes) == [10] * 7 + [11] * 3


def test_same_seed_same_partition_and_other_seed_differs() -> None:
    first = iid_partition(50, 5, np.random.default_rng(7))
    assert first == iid_partition(50, 5, np.random.default_rng(7))
    assert first != iid_partition(50, 5, np.random.default_rng(8))
    labels = _balanced_labels(50, 4)
    args = (labels, 6, 0.5, 5.0)
    a = dirichlet_label_partition(*args, np.random.default_rng(3), num_classes=4)
    b = dirichlet_label_partition(*args, np.random.default_rng(3), num_classes=4)
    assert a == b


def test_split_by_shares_follows_device_sizes() -> None:
    shares = np.array([0.5, 0.3, 0.2])
    parts = split_by_shares(20, shares, np.random.default_rng(0))
    _assert_exact_cover(parts, 20)
    assert [len(p) for p in parts] == device_sizes(20, shares).tolist() == [10, 6, 4]


def test_dirichlet_quantity_small_alpha_gives_unequal_sizes() -> None:
    parts = dirichlet_quantity_partition(1000, 10, 0.1, np.random.default_rng(0))
    _assert_exact_cover(parts, 1000)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] >= 1
    assert sizes[-1] > 5 * 100  # one device holds most of the data under alpha=0.1


# ---------------------------------------------------------------------------------------------
# Label skew.


def test_one_hot_priors_give_each_device_exactly_its_class() -> None:
    labels = _balanced_labels(30, 3)  # 0, 1, 2, 0, 1, 2, ...
    parts = dirichlet_label_partition_with(
        labels, np.ones(3) / 3, np.eye(3), np.random.default_rng(0)
    )
    assert parts == [list(range(c, 90, 3)) for c in range(3)]


def test_exhausted_classes_fall_back_to_what_is_left() -> None:
    # Both devices only want class 0, but there are 10 of each class for 20 slots.
    labels = [0] * 10 + [1] * 10
    priors = np.array([[1.0, 0.0], [1.0, 0.0]])
    parts = dirichlet_label_partition_with(
        labels, np.array([0.5, 0.5]), priors, np.random.default_rng(0)
    )
    _assert_exact_cover(parts, 20)
    assert [len(p) for p in parts] == [10, 10]


def test_draw_label_skew_shapes_and_concentration() -> None:
    shares, priors = draw_label_skew(8, 4, alpha=0.01, size_alpha=5.0, rng=np.random.default_rng(0))
    assert shares.shape == (8,) and priors.shape == (8, 4)
    assert np.isclose(shares.sum(), 1.0) and np.allclose(priors.sum(axis=1), 1.0)
    assert (priors.max(axis=1) > 0.9).mean() >= 0.75  # small alpha: one class per device
    _, flat = draw_label_skew(8, 4, alpha=1000.0, size_alpha=5.0, rng=np.random.default_rng(0))
    assert np.abs(flat - 0.25).max() < 0.05  # large alpha: the uniform mix


def _mean_dominant_share(labels: list[int], alpha: float, seed: int) -> float:
    parts = dirichlet_label_partition(
        labels, 20, alpha, 5.0, np.random.default_rng(seed), num_classes=4
    )
    _assert_exact_cover(parts, len(labels))
    return float(np.mean([_class_shares(p, labels, 4).max() for p in parts]))


def test_small_alpha_makes_devices_dominated_by_one_class() -> None:
    # Devices compete for a class's finite supply, so purity is high but not total.
    labels = _balanced_labels(1000, 4)
    skewed = np.mean([_mean_dominant_share(labels, 0.01, seed) for seed in range(5)])
    mixed = np.mean([_mean_dominant_share(labels, 1000.0, seed) for seed in range(5)])
    assert skewed > 0.65
    assert mixed < 0.35  # close to the global 0.25


def test_large_alpha_keeps_the_global_class_mix() -> None:
    labels = [0] * 2000 + [1] * 1000 + [2] * 1000  # global mix 0.5, 0.25, 0.25
    parts = dirichlet_label_partition(
        labels, 5, 1000.0, 5.0, np.random.default_rng(0), num_classes=3
    )
    _assert_exact_cover(parts, len(labels))
    for part in parts:
        assert len(part) > 200
        assert np.abs(_class_shares(part, labels, 3) - [0.5, 0.25, 0.25]).max() < 0.1


# ---------------------------------------------------------------------------------------------
# Natural groups.


def test_natural_partition_one_device_per_sorted_group() -> None:
    parts, names = natural_partition(["bob", "amy", "bob", "cy"])
    assert names == ["amy", "bob", "cy"]
    assert parts == [[1], [0, 2], [3]]


# ---------------------------------------------------------------------------------------------
# partition_task: train and test together.


@pytest.mark.parametrize("scheme", ["iid", "dirichlet_label", "dirichlet_quantity"])
def test_partition_task_assigns_every_index_once(scheme: str) -> None:
    task = _task(_balanced_labels(100, 3), _balanced_labels(20, 3), 3)
    cfg = PartitionConfig(scheme=scheme, num_devices=6, alpha=1.0)
    train, test = partition_task(task, cfg, seed=0, group_column_set=False)
    assert len(train) == len(test) == 6
    _assert_exact_cover(train, 300)
    _assert_exact_cover(test, 60)
    assert (train, test) == partition_task(task, cfg, seed=0, group_column_set=False)
    assert train != partition_task(task, cfg, seed=1, group_column_set=False)[0]


def test_quantity_skew_divides_test_with_the_same_shares() -> None:
    task = _task(_balanced_labels(500, 2), _balanced_labels(100, 2), 2)
    cfg = PartitionConfig(scheme="dirichlet_quantity", num_devices=5, alpha=0.5)
    train, test = partition_task(task, cfg, seed=0, group_column_set=False)
    train_shares = np.array([len(p) for p in train]) / 1000
    test_shares = np.array([len(p) for p in test]) / 200
    assert np.abs(train_shares - test_shares).max() < 0.02


def test_test_split_follows_the_train_priors() -> None:
    task = _task(_balanced_labels(1000, 4), _balanced_labels(250, 4), 4)
    cfg = PartitionConfig(scheme="dirichlet_label", num_devices=8, alpha=0.01)
    agree = []
    for seed in range(5):
        train, test = partition_task(task, cfg, seed=seed, group_column_set=False)
        _assert_exact_cover(test, 1000)
        agree += [
            _class_shares(tr, task.train.labels, 4).argmax()
            == _class_shares(te, task.test.labels, 4).argmax()
            for tr, te in zip(train, test, strict=True)
            if len(te) > 0
        ]
    assert np.mean(agree) >= 0.85


def test_natural_scheme_aligns_test_devices_by_group(caplog: pytest.LogCaptureFixture) -> None:
    task = _task(
        [0, 1, 0, 1],
        [1, 0, 1],
        2,
        train_groups=["b", "a", "b", "c"],
        test_groups=["a", "b", "zz"],
    )
    cfg = PartitionConfig(scheme="natural", num_devices=20)
    with caplog.at_level(logging.WARNING, logger="fibecfed.data.partition"):
        train, test = partition_task(task, cfg, seed=0, group_column_set=True)
    assert train == [[1], [0, 2], [3]]  # devices a, b, c
    assert test == [[0], [1], []]  # c has no test sample; "zz" has no device
    assert "3 groups" in caplog.text and "partition.num_devices=20 is ignored" in caplog.text
    assert "1 test samples are left out" in caplog.text


def test_natural_scheme_needs_a_group_column() -> None:
    task = _task([0, 1], [0], 2)
    with pytest.raises(DataError, match=r"partition\.scheme=natural needs data\.group_column"):
        partition_task(task, PartitionConfig(scheme="natural"), seed=0, group_column_set=False)


def test_too_many_devices_is_an_error_that_says_what_to_change() -> None:
    task = _task([0, 1, 0, 1, 0], [0, 1], 2)
    cfg = PartitionConfig(scheme="dirichlet_label", num_devices=10, alpha=0.05)
    with pytest.raises(DataError) as error:
        partition_task(task, cfg, seed=0, group_column_set=False)
    # 5 samples cannot fill 10 devices whatever the skew: the message says so, not "raise alpha".
    assert str(error.value) == (
        "5 training samples cannot give each of partition.num_devices=10 devices "
        "partition.min_samples=1; set partition.num_devices=5 or fewer, or use more data"
    )


def test_an_unlucky_skew_names_the_device_and_the_knob() -> None:
    # 12 samples could give 5 devices 2 each, but a tiny alpha leaves some with 1.
    task = _task([0, 1] * 6, [0, 1], 2)
    cfg = PartitionConfig(scheme="dirichlet_quantity", num_devices=5, alpha=0.01, min_samples=2)
    with pytest.raises(DataError) as error:
        partition_task(task, cfg, seed=0, group_column_set=False)
    message = str(error.value)
    assert re.match(r"device \d+ got 1 training samples", message)
    assert "dirichlet_quantity partition with alpha=0.01" in message
    assert "partition.num_devices" in message


def test_min_samples_is_enforced() -> None:
    task = _task(_balanced_labels(10, 2), [0, 1], 2)
    cfg = PartitionConfig(scheme="iid", num_devices=2, min_samples=10)
    partition_task(task, cfg, seed=0, group_column_set=False)  # 10 + 10: just enough
    cfg = PartitionConfig(scheme="iid", num_devices=4, min_samples=6)
    # 20 // 6 = 3 devices could each get 6 samples.
    with pytest.raises(DataError, match=r"^20 training samples .*min_samples=6; set partition.num_devices=3 or fewer"):
        partition_task(task, cfg, seed=0, group_column_set=False)
