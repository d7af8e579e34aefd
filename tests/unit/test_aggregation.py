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


# Server optimisers -----------------------------------------------------------------------------

from fibecfed.aggregation import ServerOptimizer, server_step  # noqa: E402


def test_fedadam_steps_by_hand():
    adam = ServerOptimizer(kind="adam", lr=0.1, beta1=0.9, beta2=0.99, tau=0.05)
    previous = {"w": torch.tensor([1.0]), "other": torch.tensor([7.0])}
    # Round 1: Δ = 1.5 - 1 = 0.5; m = 0.1*0.5 = 0.05, m̂ = 0.05/0.1 = 0.5; v = 0.01*0.25 = 0.0025,
    # v̂ = 0.0025/0.01 = 0.25, √v̂ = 0.5; x = 1 + 0.1 * 0.5 / (0.5 + 0.05) = 1.0909091.
    state, moments = server_step(previous, {"w": torch.tensor([1.5])}, {}, adam)
    assert state["w"].item() == pytest.approx(1.0909091, abs=1e-6)
    assert state["other"] is previous["other"]  # not aggregated: untouched
    assert moments["m/w"].item() == pytest.approx(0.05) and moments["v/w"].item() == pytest.approx(0.0025)
    assert moments["t/w"].item() == 1
    # Round 2: Δ = 1.25 - 1.0909091 = 0.1590909; m = 0.9*0.05 + 0.1*0.1590909 = 0.0609091,
    # m̂ = m/0.19 = 0.3205742; v = 0.99*0.0025 + 0.01*0.1590909² = 0.0027281, v̂ = v/0.0199 = 0.1370904,
    # √v̂ = 0.3702573; x = 1.0909091 + 0.1 * 0.3205742 / 0.4202573 = 1.1671896.
    state, moments = server_step(state, {"w": torch.tensor([1.25])}, moments, adam)
    assert state["w"].item() == pytest.approx(1.1671896, abs=1e-6)
    assert moments["m/w"].item() == pytest.approx(0.0609091) and moments["v/w"].item() == pytest.approx(0.0027281, abs=1e-7)
    assert moments["t/w"].item() == 2


def test_fedavgm_steps_by_hand():
    momentum = ServerOptimizer(kind="momentum", lr=1.0, beta1=0.5)
    # Round 1: Δ = 1, m = 1, x = 0 + 1 = 1. Round 2: Δ = 1.5 - 1 = 0.5, m = 0.5*1 + 0.5 = 1, x = 2.
    state, moments = server_step({"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, {}, momentum)
    assert state["w"].item() == 1.0 and "v/w" not in moments
    state, moments = server_step(state, {"w": torch.tensor([1.5])}, moments, momentum)
    assert state["w"].item() == 2.0 and moments["m/w"].item() == 1.0


def test_avg_is_the_merge_bit_for_bit_and_keeps_moments():
    previous = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    average = {"a": torch.randn(3, 2)}
    moments = {"m/b": torch.ones(4)}
    state, kept = server_step(previous, average, moments, ServerOptimizer())
    assert torch.equal(state["a"], average["a"]) and state["b"] is previous["b"]
    assert kept == moments


def test_fresh_keys_take_the_average_and_restart_their_moments():
    adam = ServerOptimizer(kind="adam", lr=0.1)
    previous = {"old": torch.tensor([1.0]), "new": torch.tensor([0.0])}
    moments = {"m/old": torch.tensor([0.2]), "v/old": torch.tensor([0.04]), "t/old": torch.tensor(1),
               "m/new": torch.tensor([9.0]), "v/new": torch.tensor([9.0]), "t/new": torch.tensor(5)}
    before = {k: v.clone() for k, v in moments.items()}
    state, after = server_step(previous, {"old": torch.tensor([1.0]), "new": torch.tensor([3.0])}, moments, adam, fresh=["new"])
    assert state["new"].item() == 3.0 and not [k for k in after if k.endswith("/new")]
    # "old", its step 2: Δ = 0, so m = 0.9*0.2 = 0.18, m̂ = 0.18/0.19 = 0.947368;
    # v = 0.99*0.04 = 0.0396, v̂ = 0.0396/0.0199 = 1.989950, √v̂ = 1.410656; x = 1 + 0.1*0.947368/1.411656 = 1.067110.
    assert after["m/old"].item() == pytest.approx(0.18) and after["v/old"].item() == pytest.approx(0.0396)
    assert state["old"].item() == pytest.approx(1.067110, abs=1e-6)
    assert all(torch.equal(moments[k], before[k]) for k in before)  # the inputs are not changed


def test_server_step_keeps_each_dtype():
    previous = {"w": torch.zeros(2, dtype=torch.bfloat16)}
    state, moments = server_step(previous, {"w": torch.ones(2, dtype=torch.bfloat16)}, {}, ServerOptimizer(kind="adam"))
    assert state["w"].dtype == torch.bfloat16 and moments["m/w"].dtype == torch.float32
