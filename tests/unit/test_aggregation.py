import pytest
import torch

from fibecfed.aggregation import has_non_finite, merge_state, weighted_average
from fibecfed.federated import aggregate_updates


def test_weighted_average_by_hand():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[0.0]])}
    b = {"x": torch.tensor([3.0, 6.0]), "y": torch.tensor([[4.0]])}
    # weights 1 and 3: x = (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0]; y = 3*4/4 = 3
    avg = weighted_average([a, b], [1, 3])
    assert torch.equal(avg["x"], torch.tensor([2.5, 5.0]))
    assert torch.equal(avg["y"], torch.tensor([[3.0]]))


def test_average_is_order_independent():
    states = [{"w": torch.randn(5, generator=torch.Generator().manual_seed(i))} for i in range(4)]
    weights = [3, 1, 7, 2]
    forward = weighted_average(states, weights)["w"]
    backward = weighted_average(states[::-1], weights[::-1])["w"]
    assert torch.equal(forward, backward)


def test_mismatched_keys_are_an_error():
    with pytest.raises(ValueError, match="different keys"):
        weighted_average([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])


def test_zero_weights_and_empty():
    with pytest.raises(ValueError):
        weighted_average([{"a": torch.zeros(1)}], [0])
    with pytest.raises(ValueError):
        weighted_average([], [])


def test_merge_keeps_unsent_keys():
    previous = {"a": torch.tensor([1.0]), "b": torch.tensor([2.0])}
    merged = merge_state(previous, {"b": torch.tensor([5.0])})
    assert merged["a"] is previous["a"] and torch.equal(merged["b"], torch.tensor([5.0]))
    with pytest.raises(KeyError):
        merge_state(previous, {"c": torch.tensor([0.0])})


def test_aggregate_updates_selected_keys_only():
    previous = {"l0": torch.tensor([1.0]), "l1": torch.tensor([1.0])}
    new = aggregate_updates(previous, [{"l1": torch.tensor([2.0])}, {"l1": torch.tensor([4.0])}], [1, 1])
    assert torch.equal(new["l0"], torch.tensor([1.0]))
    assert torch.equal(new["l1"], torch.tensor([3.0]))
    assert aggregate_updates(previous, [], []) == previous


def test_non_finite_detection():
    assert has_non_finite({"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(2)}) == ["a"]
    assert has_non_finite({"a": torch.ones(1)}) == []


def test_update_problem_names_the_first_problem_in_order():
    from fibecfed.aggregation import update_problem

    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert update_problem({"a": torch.ones(2, 3), "b": torch.ones(4)}, expected) is None
    cases = {
        # An extra key beats everything else wrong with the same update.
        "unknown_key": {"a": torch.ones(2, 3), "b": torch.full((4,), float("nan")), "c": torch.ones(1)},
        "missing_key": {"a": torch.ones(2, 3)},
        "shape": {"a": torch.ones(3, 2), "b": torch.ones(4)},
        "dtype": {"a": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(4)},
        "non_finite": {"a": torch.ones(2, 3), "b": torch.tensor([0.0, float("-inf"), 0.0, 0.0])},
    }
    for reason, state in cases.items():
        problem = update_problem(state, expected)
        assert problem is not None and problem.reason == reason, reason
    assert "shape (3, 2), expected (2, 3)" in update_problem(cases["shape"], expected).detail
    assert update_problem({"a": [1.0], "b": torch.ones(4)}, {"a": torch.zeros(1), "b": torch.zeros(4)}).reason == "dtype"


def test_no_update_leaves_the_global_state_as_it_was():
    previous = {"a": torch.tensor([1.0, float("-0.0")]), "b": torch.ones(3)}
    kept = aggregate_updates(previous, [], [])
    assert kept == previous and all(kept[k] is previous[k] for k in previous)  # the very tensors, bit for bit
