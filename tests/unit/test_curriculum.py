import math

import numpy as np
import pytest
import torch

from fibecfed.curriculum import PACING, curriculum_pool, pacing_fraction, pool_size, register_pacing


def test_linear_pacing_by_hand():
    # λ0 = 0.2, β = 0.8, T = 10: full data at t = β·T = 8, i.e. round 9.
    assert pacing_fraction("linear", 1, 10) == 0.2
    assert pacing_fraction("linear", 5, 10) == pytest.approx(0.2 + 0.8 * 4 / 8)  # 0.6
    assert pacing_fraction("linear", 8, 10) == pytest.approx(0.2 + 0.8 * 7 / 8)  # 0.9
    assert pacing_fraction("linear", 9, 10) == 1.0
    assert pacing_fraction("linear", 10, 10) == 1.0


def test_root_pacing_by_hand():
    assert pacing_fraction("root", 1, 10) == pytest.approx(0.2)
    assert pacing_fraction("root", 5, 10) == pytest.approx(math.sqrt(0.04 + 0.96 * 0.5))  # sqrt(0.52)
    assert pacing_fraction("root", 9, 10) == 1.0


def test_step_pacing_by_hand():
    # S = 4 steps of β·T/S = 2 rounds: 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1, 1.
    values = [pacing_fraction("step", r, 10) for r in range(1, 11)]
    assert values == pytest.approx([0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0, 1.0])
    # S = 2 steps of 4 rounds each.
    two_steps = [pacing_fraction("step", r, 10, steps=2) for r in (1, 4, 5, 8, 9)]
    assert two_steps == pytest.approx([0.2, 0.2, 0.6, 0.6, 1.0])


def test_step_pacing_reaches_a_step_despite_float_noise():
    # t/(β·T)·S = 55/(0.55·100)·4 is 3.9999999999999996 in floats; the last step is still due.
    assert pacing_fraction("step", 56, 100, full_at=0.55) == 1.0
    assert pacing_fraction("step", 55, 100, full_at=0.55) == pytest.approx(0.8)


def test_none_pacing_and_other_parameters():
    assert [pacing_fraction("none", r, 10) for r in (1, 5, 10)] == [1.0, 1.0, 1.0]
    assert pacing_fraction("linear", 1, 10, start_fraction=0.5) == 0.5
    assert pacing_fraction("linear", 3, 10, start_fraction=0.5, full_at=0.5) == pytest.approx(0.5 + 0.5 * 2 / 5)
    assert pacing_fraction("linear", 1, 1) == 0.2  # a single round trains on λ0


def test_pacing_rejects_bad_input():
    with pytest.raises(ValueError, match="linear"):  # the message lists the known names
        pacing_fraction("cosine", 1, 10)
    with pytest.raises(ValueError, match="round_num"):
        pacing_fraction("linear", 0, 10)
    with pytest.raises(ValueError, match="start_fraction"):
        pacing_fraction("linear", 1, 10, start_fraction=0.0)
    with pytest.raises(ValueError):
        register_pacing("linear")(lambda *a: 1.0)


def test_register_pacing_adds_to_registry():
    @register_pacing("test_half")
    def half(t, total_rounds, start_fraction, full_at):
        return 0.5

    try:
        assert pacing_fraction("test_half", 3, 10) == 0.5
        assert pacing_fraction("test_half", 3, 10, start_fraction=0.7) == 0.7  # never below λ0
    finally:
        del PACING["test_half"]


def test_curriculum_pool_by_hand():
    indices, scores = [10, 11, 12, 13], [5.0, 1.0, 4.0, 2.0]
    assert curriculum_pool(indices, scores, 0.5) == [11, 13]
    assert curriculum_pool(indices, scores, 0.5, order="hard_first") == [10, 12]
    assert curriculum_pool(indices, torch.tensor(scores), 0.5) == [11, 13]
    assert curriculum_pool(indices, scores, 1.0) == [11, 13, 12, 10]


def test_curriculum_pool_rounds_up_and_keeps_one():
    indices, scores = [10, 11, 12, 13], [5.0, 1.0, 4.0, 2.0]
    assert curriculum_pool(indices, scores, 0.3) == [11, 13]  # ceil(1.2) = 2
    assert curriculum_pool(indices, scores, 0.01) == [11]  # at least one sample
    assert curriculum_pool([], [], 0.5) == []
    # 0.2 + 0.8·4/8 is 0.6000000000000001 in floats: still 6 of 10 samples, not 7.
    assert len(curriculum_pool(list(range(10)), list(range(10)), pacing_fraction("linear", 5, 10))) == 6
    assert pool_size(0.6000000000000001, 10) == 6


def test_curriculum_pool_breaks_ties_by_index():
    assert curriculum_pool([13, 10, 12, 11], [1.0, 1.0, 0.0, 1.0], 0.5) == [12, 10]
    assert curriculum_pool([13, 10, 12, 11], [1.0, 1.0, 2.0, 1.0], 0.5, order="hard_first") == [12, 10]


def test_curriculum_pool_random_order():
    indices, scores = list(range(20, 30)), list(range(10))
    pool = curriculum_pool(indices, scores, 0.3, order="random", rng=np.random.default_rng(0))
    assert len(pool) == 3 and set(pool) <= set(indices) and len(set(pool)) == 3
    assert pool == curriculum_pool(indices, scores, 0.3, order="random", rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        curriculum_pool(indices, scores, 0.3, order="random")


def test_curriculum_pool_rejects_bad_input():
    with pytest.raises(ValueError):
        curriculum_pool([1, 2], [0.5], 0.5)
    with pytest.raises(ValueError):
        curriculum_pool([1, 2], [0.5, 0.1], 0.0)
    with pytest.raises(ValueError, match="easy_first"):
        curriculum_pool([1, 2], [0.5, 0.1], 0.5, order="middle")


def test_class_balanced_pool_takes_the_easiest_share_of_each_class():
    from fibecfed.curriculum import class_balanced_pool

    indices = [10, 11, 12, 13, 14, 15]
    scores = [0.1, 0.2, 0.3, 5.0, 6.0, 7.0]  # class 0 is all easy, class 1 all hard
    labels = [0, 0, 0, 1, 1, 1]
    # a global pool at 1/3 would be [10, 11]: class 0 only
    assert class_balanced_pool(indices, scores, labels, 1 / 3) == [10, 13]
    assert class_balanced_pool(indices, scores, labels, 1 / 3, order="hard_first") == [12, 15]
    assert sorted(class_balanced_pool(indices, scores, labels, 1.0)) == indices


def test_class_balanced_pool_holds_the_fraction_not_one_per_class_more():
    from fibecfed.curriculum import class_counts, class_balanced_pool

    # 7 samples: class 0 has 4, class 1 has 2, class 2 has 1. At 0.3 the pool is ceil(2.1) = 3
    # samples. One at a time to the largest size/count (none first; ties to the larger class):
    # class 0 (all empty, largest), class 1 (2/0), class 2 (1/0): 1, 1, 1. Rounding each class
    # up on its own gave ceil(1.2) + ceil(0.6) + ceil(0.3) = 4.
    assert class_counts(3, [4, 2, 1]) == [1, 1, 1]
    assert class_counts(4, [4, 2, 1]) == [2, 1, 1]  # 4/1 against 2/1 and 1/1
    assert class_counts(5, [4, 2, 1]) == [3, 1, 1]  # 4/2 ties 2/1: the larger class
    indices = [10, 11, 12, 13, 14, 15, 16]
    labels = [0, 0, 0, 0, 1, 1, 2]
    scores = [0.4, 0.1, 0.3, 0.2, 0.9, 0.5, 0.0]
    assert class_balanced_pool(indices, scores, labels, 0.3) == [11, 15, 16]
    assert class_balanced_pool(indices, scores, labels, 0.5) == [11, 13, 15, 16]  # ceil(3.5) = 4
    assert class_counts(1, [2, 2]) == [1, 0]
    assert class_counts(1, [1, 3]) == [0, 1]
    assert class_counts(7, [4, 2, 1]) == [4, 2, 1]
    assert class_counts(0, []) == []
    # A class never loses a place as the pool grows (largest remainder gives [1, 1, 1] at 3 and
    # [0, 2, 2] at 4 for these sizes).
    assert [class_counts(t, [1, 3, 3]) for t in range(3, 8)] == [
        [1, 1, 1], [1, 2, 1], [1, 2, 2], [1, 3, 2], [1, 3, 3]]
    with pytest.raises(ValueError):
        class_counts(8, [4, 2, 1])


def test_unscored_samples_rank_after_the_scored_ones():
    nan = float("nan")
    indices = [10, 11, 12, 13, 14]
    scores = [0.5, nan, 0.1, nan, 0.9]
    # scored ranking easy-first: 12 (0.1), 10 (0.5), 14 (0.9); then unscored 11, 13 by index
    assert curriculum_pool(indices, scores, 0.4) == [12, 10]
    assert curriculum_pool(indices, scores, 0.8) == [12, 10, 14, 11]
    assert curriculum_pool(indices, scores, 0.8, order="hard_first") == [14, 10, 12, 11]
    # with an rng the unscored tail is shuffled, never ahead of a scored sample
    pool = curriculum_pool(indices, scores, 1.0, rng=np.random.default_rng(3))
    assert pool[:3] == [12, 10, 14] and sorted(pool[3:]) == [11, 13]
