"""The transport-free server: plans, aggregation, layer choice and accounting on hand-made tensors."""

from __future__ import annotations

import io

import pytest
import torch

from fibecfed.accounting import serialized_nbytes
from fibecfed.config import LayerSelectionConfig
from fibecfed.federated import DeviceUpdate
from fibecfed.errors import FibecfedError
from fibecfed.server import LayerProbe, MeasuredTransfer, Server, ServerSettings, probe_problem, sample_devices

HEAD = "base_model.model.classifier.weight"


def layer_key(layer: int) -> str:
    return f"base_model.model.bert.encoder.layer.{layer}.attention.self.query.lora_A.weight"


def global_state() -> dict[str, torch.Tensor]:
    """Four layers with one (1, 2) LoRA matrix each, and a (2,) head."""
    state = {layer_key(i): torch.full((1, 2), float(i)) for i in range(4)}
    state[HEAD] = torch.tensor([10.0, 20.0])
    return state


def settings(layers: LayerSelectionConfig | None = None, **overrides) -> ServerSettings:
    values = dict(seed=0, rounds=5, num_devices=4, devices_per_round=2, eval_every=1, bandwidth_mbps=8.0,
                  num_layers=4, layers=layers, sparse=None)
    values.update(overrides)
    return ServerSettings(**values)


def selection_config(**overrides) -> LayerSelectionConfig:
    values = dict(enabled=True, share=0.5, policy="sensitivity", select_after=1, refresh_every=0)
    values.update(overrides)
    return LayerSelectionConfig(**values)


def update(device: int, state: dict[str, torch.Tensor], num_samples: int, **fields) -> DeviceUpdate:
    values = dict(loss=1.0, compute_seconds=1.0, steps=1)
    values.update(fields)
    return DeviceUpdate(device=device, state=state, num_samples=num_samples, **values)


def server_with_layers(layers: list[int]) -> Server:
    """A server whose aggregation layers were chosen before round 2 (no refresh)."""
    chosen = {"layers": layers, "layers_round": 1, "layer_scores": [0.0] * 4, "joined": []}
    return Server(settings(selection_config()), global_state(), round_num=1, selection=chosen)


def test_finish_round_averages_the_exchanged_keys_by_data_size():
    server = server_with_layers([0])
    previous = global_state()
    plan = server.plan_round(2)
    assert plan.devices == sample_devices(0, 2, 4, 2)
    assert plan.exchanged_keys == [layer_key(0), HEAD]
    assert set(plan.state) == {layer_key(0), HEAD} and plan.probe is None and plan.own_start_keys == []
    a, b = plan.devices
    updates = [
        update(a, {layer_key(0): torch.tensor([[1.0, 2.0]]), HEAD: torch.tensor([0.0, 4.0])}, 1, loss=0.5, compute_seconds=1.0),
        update(b, {layer_key(0): torch.tensor([[5.0, 6.0]]), HEAD: torch.tensor([4.0, 8.0])}, 3, loss=1.0, compute_seconds=2.0),
    ]
    result = server.finish_round(plan, updates, [])
    # (1 * a + 3 * b) / 4, key by key.
    assert torch.equal(server.global_state[layer_key(0)], torch.tensor([[4.0, 5.0]]))
    assert torch.equal(server.global_state[HEAD], torch.tensor([3.0, 7.0]))
    for layer in (1, 2, 3):  # not exchanged: the previous global values
        assert torch.equal(server.global_state[layer_key(layer)], previous[layer_key(layer)])
    assert list(server.global_state) == list(previous)
    assert result.dropped == [] and result.evaluate

    row = server.record_round(result, {"accuracy": 0.75}, wall_seconds=0.5)
    assert row["loss"] == pytest.approx((1 * 0.5 + 3 * 1.0) / 4)
    assert row["failed_devices"] == [] and row["aggregated_layers"] == [0] and "layer_scores" not in row
    down = serialized_nbytes({k: previous[k] for k in (layer_key(0), HEAD)})
    up = serialized_nbytes(updates[0].state)
    full = serialized_nbytes(previous)
    assert row["device_costs"] == [[1.0, down, up, 0.0], [2.0, down, up, 0.0]]
    assert row["round_upload_bytes"] == row["upload_bytes"] == 2 * up
    assert row["download_bytes"] == 2 * down
    assert row["bytes_saved_vs_fedavg"] == 2 * full * 2 - 2 * up - 2 * down
    # 8 Mbit/s moves a byte in 1e-6 s; the slower device sets the round's time.
    assert row["sim_time_s"] == round(max(1.0, 2.0) + (down + up) * 1e-6, 3)
    assert row["wall_time_s"] == 0.5 and row["accuracy"] == 0.75 and row["round"] == 2
    assert server.round == 2 and server.history == [row]


def test_a_device_downloads_the_trained_global_values_of_a_layer_that_left_the_aggregated_ones():
    # Layer 0 is aggregated in round 2, then the choice moves to layer 1. A device that holds no
    # value of layer 0 of its own (it exchanged layer 0 in its rounds, or never took part) must
    # download layer 0's global value, which is no longer the initial one it could rebuild; Flower
    # sends it (strategy), and the simulator's byte count must include it too.
    server = server_with_layers([0])
    plan = server.plan_round(2)
    a, b = plan.devices
    assert plan.extra_download == {a: 0, b: 0}  # every non-exchanged global value is still the initial one
    trained = {layer_key(0): torch.tensor([[7.0, 7.0]]), HEAD: torch.tensor([1.0, 1.0])}
    server.finish_round(plan, [update(a, dict(trained), 1)], {b: "timeout"})
    assert server.held == {a: {layer_key(1), layer_key(2), layer_key(3)}}
    server.selection = {**server.selection, "layers": [1], "layers_round": 3, "joined": [1]}
    plan = server.plan_round(3)
    stale = serialized_nbytes({layer_key(0): server.global_state[layer_key(0)]})
    for device in plan.devices:  # whoever is sampled lacks layer 0's trained value
        assert plan.extra_download[device] == stale
        assert set(server.stale_values(device, plan.exchanged_keys)) == {layer_key(0)}
    result = server.finish_round(plan, [update(d, dict(plan.state), 1) for d in plan.devices], [])
    assert [cost[1] for cost in result.fields["device_costs"]] == [plan.download_bytes + stale] * len(plan.devices)
    # Afterwards they hold layer 0 (now theirs): nothing more to download for it.
    assert all(server.stale_values(d, plan.exchanged_keys) == {} for d in plan.devices)
    # The holdings survive a checkpoint.
    resumed = Server.from_checkpoint(server.settings, server.to_checkpoint(), initial_state=global_state())
    assert resumed.held == server.held
    assert all(resumed.stale_values(d, plan.exchanged_keys) == {} for d in plan.devices)


def test_joined_layers_start_from_the_devices_own_values_until_a_round_aggregates_them():
    server = server_with_layers([0])
    server.finish_round(server.plan_round(2), [], [])
    server.selection = {**server.selection, "layers": [1], "layers_round": 3, "joined": [1]}
    plan = server.plan_round(3)
    assert plan.own_start_keys == [layer_key(1)]
    server.finish_round(plan, [], {d: "timeout" for d in plan.devices})  # nobody came back
    plan = server.plan_round(4)
    assert plan.own_start_keys == [layer_key(1)]  # still the devices' own values, not the stale global one
    server.finish_round(plan, [update(plan.devices[0], dict(plan.state), 1)], [])
    assert server.plan_round(5).own_start_keys == []


def test_a_new_choice_carries_over_joined_layers_that_no_round_aggregated():
    from fibecfed.server import joined_layers

    failed = {"layers": [1], "joined": [1], "joined_unaggregated": True}
    assert joined_layers(failed, [1, 2]) == [1, 2]  # 1 joined, nobody aggregated it yet: still the devices' own
    assert joined_layers({**failed, "joined_unaggregated": False}, [1, 2]) == [2]
    assert joined_layers(failed, [2, 3]) == [2, 3]  # 1 left the aggregated ones: nothing to carry


def test_bytes_measured_by_a_transport_replace_the_estimates():
    server = server_with_layers([0])
    plan = server.plan_round(2)
    a, b = plan.devices
    c = next(d for d in range(4) if d not in plan.devices)  # not sampled: never asked
    updates = [update(a, {k: v + 1 for k, v in plan.state.items()}, 1, compute_seconds=1.0)]
    measured = MeasuredTransfer(download={a: 500, b: 700, c: 0}, upload={a: 300, b: 0, c: 0}, fedavg_bytes=5000)
    row = server.record_round(server.finish_round(plan, updates, [b], measured), None, wall_seconds=0.1)
    assert row["device_costs"] == [[1.0, 500, 300, 0.0]]
    assert row["download_bytes"] == 500 + 700  # the failed device downloaded too
    assert row["upload_bytes"] == row["round_upload_bytes"] == 300
    assert row["bytes_saved_vs_fedavg"] == 5000 - 300 - 500
    assert row["failed_devices"] == [b]


def test_non_finite_update_is_rejected():
    server = server_with_layers([0])
    plan = server.plan_round(2)
    a, b = plan.devices
    bad = {layer_key(0): torch.tensor([[float("nan"), 1.0]]), HEAD: torch.tensor([1.0, 1.0])}
    good = {layer_key(0): torch.tensor([[7.0, 8.0]]), HEAD: torch.tensor([1.0, 2.0])}
    result = server.finish_round(plan, [update(a, good, 1), update(b, bad, 3)], [])
    assert result.dropped == [b] and result.fields["failed_devices"] == [b]
    # Only the finite update counts: the average of one update is that update.
    assert torch.equal(server.global_state[layer_key(0)], good[layer_key(0)])
    assert torch.equal(server.global_state[HEAD], good[HEAD])

    # A round whose only update is non-finite keeps the previous global values.
    before = dict(server.global_state)
    plan = server.plan_round(3)
    result = server.finish_round(plan, [update(plan.devices[0], bad, 1)], [plan.devices[1]])
    assert result.fields["failed_devices"] == sorted(plan.devices) and result.fields["loss"] is None
    assert all(torch.equal(server.global_state[k], v) for k, v in before.items())


def test_warm_up_exchanges_the_head_and_the_probes_choose_the_layers():
    server = Server(settings(selection_config(refresh_every=2)), global_state())
    assert server.probe_request(1) is None  # select_after=1: the devices probe their trained models instead
    plan = server.plan_round(1)
    assert plan.warmup and plan.exchanged_keys == [HEAD] and plan.aggregated_layers is None
    assert plan.probe is not None and plan.sparse is None
    a, b = plan.devices
    updates = [
        update(a, {HEAD: torch.tensor([0.0, 0.0])}, 1, layer_scores=torch.tensor([1.0, 0.0, 0.0, 0.0]), probe_seconds=0.25),
        update(b, {HEAD: torch.tensor([0.0, 0.0])}, 3, layer_scores=torch.tensor([0.0, 0.0, 3.0, 1.0]), probe_seconds=0.5),
    ]
    result = server.finish_round(plan, updates, [])
    assert result.fields["probe_seconds"] == 0.75  # both devices' probes after training, summed
    # Scores averaged by data size: [0.25, 0, 2.25, 0.75]; the top half is layers 2 and 3.
    assert result.fields["layer_scores"] == [0.25, 0.0, 2.25, 0.75]
    assert server.selection["layers"] == [2, 3] and server.selection["layers_round"] == 2
    # The probes' (4,) float32 vectors travel up with the adapter.
    scores_bytes = serialized_nbytes({"layer_scores": updates[0].layer_scores})
    assert result.fields["device_costs"][0][2] == serialized_nbytes(updates[0].state) + scores_bytes
    server.record_round(result, None, 0.0)  # the runtime did not evaluate
    assert server.history[-1]["accuracy"] is None and server.history[-1]["personalized_accuracy"] is None

    nxt = server.plan_round(2)
    assert not nxt.warmup and nxt.aggregated_layers == [2, 3] and nxt.probe is None
    assert nxt.exchanged_keys == [layer_key(2), layer_key(3), HEAD]
    # Layers 2 and 3 just joined: the devices start them from their own values.
    assert nxt.own_start_keys == [layer_key(2), layer_key(3)]
    assert server.plan_round(3).probe is not None  # refresh_every=2: the chosen layers held 2 rounds


def test_a_choice_before_the_round_waits_for_the_probes():
    server = Server(settings(selection_config(select_after=0)), global_state())
    request = server.probe_request(1)
    assert request is not None and request.devices == sample_devices(0, 1, 4, 2)
    with pytest.raises(FibecfedError, match="needs the sampled devices' layer probes, and none of the 2 sent a usable one"):
        server.plan_round(1)
    a, b = request.devices
    probes = {
        a: LayerProbe(torch.tensor([0.0, 4.0, 0.0, 0.0]), seconds=0.5, num_samples=1),
        b: LayerProbe(torch.tensor([0.0, 0.0, 0.0, 1.0]), seconds=0.25, num_samples=1),
    }
    plan = server.plan_round(1, probes)
    assert plan.aggregated_layers == [1, 3] and server.selection["layers_round"] == 1
    assert plan.own_start_keys == []  # the first choice: nobody has own values yet
    assert plan.probe_seconds == {a: 0.5, b: 0.25}
    assert plan.probe_upload[a] == serialized_nbytes({"layer_scores": probes[a].scores})
    # The probe request carried the whole global adapter to each sampled device (as on Flower).
    assert plan.extra_download == {a: plan.full_bytes, b: plan.full_bytes}
    result = server.finish_round(plan, [update(a, dict(plan.state), 1, compute_seconds=1.0)], [])
    assert result.fields["device_costs"][0][0] == 1.5  # training plus the probe before it
    assert result.fields["probe_seconds"] == 0.5  # only the device that sent an update counts


@pytest.mark.parametrize(
    "probe, problem",
    [
        (LayerProbe(torch.tensor([0.0, 1.0, 2.0, 3.0]), seconds=0.5, num_samples=3), None),
        (LayerProbe(torch.tensor([0.0, float("nan"), 0.0, 1.0]), seconds=0.5, num_samples=3), "finite and >= 0"),
        (LayerProbe(torch.tensor([0.0, -1.0, 0.0, 1.0]), seconds=0.5, num_samples=3), "finite and >= 0"),
        (LayerProbe(torch.tensor([0.0, 1.0]), seconds=0.5, num_samples=3), "shape (2,), expected (4,)"),
        (LayerProbe(torch.tensor([0, 1, 2, 3]), seconds=0.5, num_samples=3), "not a floating-point tensor"),
        (LayerProbe(torch.tensor([0.0, 1.0, 2.0, 3.0]), seconds=0.5, num_samples=0), "positive integer, got 0"),
        (LayerProbe(torch.tensor([0.0, 1.0, 2.0, 3.0]), seconds=float("inf"), num_samples=3), "probe time"),
    ],
)
def test_probe_problem_names_what_is_wrong(probe, problem):
    found = probe_problem(probe, num_layers=4)
    assert found is None if problem is None else problem in found


def test_unusable_probes_are_left_out_and_a_refresh_nobody_measured_keeps_the_layers():
    server = Server(settings(selection_config(select_after=0, refresh_every=2)), global_state())
    a, b = server.probe_request(1).devices
    probes = {
        a: LayerProbe(torch.tensor([0.0, 4.0, 0.0, 1.0]), seconds=0.5, num_samples=1),
        # NaN scores: averaged in, they would make the choice raise and end the run.
        b: LayerProbe(torch.tensor([9.0, float("nan"), 9.0, 9.0]), seconds=0.25, num_samples=100),
    }
    plan = server.plan_round(1, probes)
    assert plan.aggregated_layers == [1, 3]  # device a's two most sensitive layers; b's left out
    assert plan.probe_seconds == {a: 0.5, b: 0.0}
    server.finish_round(plan, [], [])
    server.finish_round(server.plan_round(2), [], [])
    request = server.probe_request(3)  # the refresh is due
    assert request is not None
    bad = {d: LayerProbe(torch.tensor([1.0, 1.0]), seconds=0.1, num_samples=1) for d in request.devices}
    plan = server.plan_round(3, bad)
    assert plan.aggregated_layers == [1, 3] and server.selection["layers_round"] == 1  # kept; asked again next round
    assert plan.extra_download == {d: plan.full_bytes for d in request.devices}  # they did download for the probe
    result = server.finish_round(plan, [], [])
    assert "layer_scores" not in result.fields  # no choice was made this round
    assert server.probe_request(4) is not None


def test_checkpoint_round_trip_resumes_the_same_server(tmp_path):
    server = Server(settings(selection_config()), global_state())
    server.record_start({"accuracy": 0.5})
    plan = server.plan_round(1)
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0])
    updates = [update(d, {HEAD: torch.tensor([1.0, 1.0])}, 1, layer_scores=scores) for d in plan.devices]
    server.record_round(server.finish_round(plan, updates, []), {"accuracy": 0.6}, 0.1)
    buffer = io.BytesIO()
    torch.save(server.to_checkpoint(), buffer)
    buffer.seek(0)
    resumed = Server.from_checkpoint(settings(selection_config()), torch.load(buffer, weights_only=False))
    assert resumed.round == 1 and resumed.history == server.history and resumed.totals == server.totals
    assert resumed.selection == server.selection
    assert all(torch.equal(resumed.global_state[k], v) for k, v in server.global_state.items())
    a, b = server.plan_round(2), resumed.plan_round(2)
    for name in ("devices", "exchanged_keys", "own_start_keys", "aggregated_layers", "download_bytes"):
        assert getattr(a, name) == getattr(b, name), name


def test_each_bad_update_is_rejected_with_its_reason_and_counted():
    from fibecfed.faults import CORRUPTIONS, corrupt_update, expected_reason

    server = server_with_layers([0])
    plan = server.plan_round(2)
    a, b = plan.devices
    good = {layer_key(0): torch.tensor([[7.0, 8.0]]), HEAD: torch.tensor([1.0, 2.0])}
    for kind in CORRUPTIONS:
        server = server_with_layers([0])
        result = server.finish_round(plan, [update(a, good, 1), update(b, corrupt_update(good, kind), 3)], [])
        assert result.dropped == [b] and result.fields["failed_devices"] == [b], kind
        assert result.fields["rejected"][expected_reason(kind)] == 1 and sum(result.fields["rejected"].values()) == 1, kind
        # The average of the one valid update is that update.
        assert all(torch.equal(server.global_state[k], v) for k, v in good.items()), kind


def test_a_round_of_only_invalid_updates_keeps_the_global_state_bit_for_bit():
    from fibecfed.faults import corrupt_update
    from fibecfed.server import REJECTION_REASONS

    server = Server(settings(num_devices=6, devices_per_round=5), global_state())
    before = {k: v.clone() for k, v in server.global_state.items()}
    plan = server.plan_round(1)
    a, b, c, d, e = plan.devices
    sent = {k: v + 1 for k, v in plan.state.items()}
    updates = [update(a, corrupt_update(sent, "nan"), 1), update(b, corrupt_update(sent, "shape"), 1),
               update(c, corrupt_update(sent, "unknown_key"), 1)]
    result = server.finish_round(plan, updates, {d: "timeout", e: "error"})
    assert all(torch.equal(server.global_state[k], v) for k, v in before.items())
    assert result.dropped == [a, b, c] and result.fields["failed_devices"] == sorted(plan.devices)
    assert list(result.fields["rejected"]) == list(REJECTION_REASONS)
    assert result.fields["rejected"] == {"timeout": 1, "error": 1, "unknown_key": 1, "missing_key": 0, "shape": 1,
                                         "dtype": 0, "non_finite": 1}
    assert result.fields["loss"] is None
    row = server.record_round(result, None, 0.0)
    assert row["rejected"] == result.fields["rejected"]


def test_a_timed_out_device_makes_the_round_last_until_the_deadline():
    server = Server(settings(device_timeout_s=30.0), global_state())
    plan = server.plan_round(1)
    a, b = plan.devices
    answered = [update(a, {k: v + 1 for k, v in plan.state.items()}, 1, compute_seconds=2.0)]
    result = server.finish_round(plan, answered, {b: "timeout"})
    assert server.totals["sim_time_s"] == 30.0 and result.fields["rejected"]["timeout"] == 1
    # A device that failed fast (an error reply) does not hold the round up.
    plan = server.plan_round(2)
    a, b = plan.devices
    server.finish_round(plan, [update(a, {k: v + 1 for k, v in plan.state.items()}, 1, compute_seconds=2.0)], [b])
    assert 2.0 < server.totals["sim_time_s"] - 30.0 < 2.1


def test_layer_scores_are_checked_like_the_adapter():
    server = Server(settings(selection_config()), global_state())
    plan = server.plan_round(1)  # warm-up: the devices probe their trained models
    a, b = plan.devices
    sent = {HEAD: torch.tensor([1.0, 1.0])}
    updates = [update(a, sent, 1, layer_scores=torch.tensor([0.0, 1.0, 2.0, 3.0])),
               update(b, sent, 1, layer_scores=torch.tensor([float("nan"), 9.0, 9.0, 9.0]))]
    result = server.finish_round(plan, updates, [])
    assert result.dropped == [b] and result.fields["rejected"]["non_finite"] == 1
    assert server.selection["layers"] == [2, 3]  # from device a's scores alone
    plan = server.plan_round(2)  # no probe this round: scores are not asked for
    a, b = plan.devices
    sent = dict(plan.state)
    result = server.finish_round(plan, [update(a, sent, 1), update(b, sent, 1, layer_scores=torch.zeros(4))], [])
    assert result.dropped == [b] and result.fields["rejected"]["unknown_key"] == 1
    with pytest.raises(ValueError, match="did not sample"):
        server.finish_round(plan, [update(next(d for d in range(4) if d not in plan.devices), sent, 1)], [])


def test_a_server_optimiser_steps_and_its_moments_survive_a_checkpoint():
    from fibecfed.aggregation import ServerOptimizer

    adam = settings(server_opt=ServerOptimizer(kind="adam", lr=0.1, tau=0.05))
    server = Server(adam, global_state())
    plan = server.plan_round(1)
    # Both devices send head [10.5, 20.5] (Δ = 0.5 each): as in test_fedadam_steps_by_hand, x moves by 0.0909091.
    sent = {k: v + 0.5 for k, v in plan.state.items()}
    server.record_round(server.finish_round(plan, [update(d, sent, 1) for d in plan.devices], []), None, 0.1)
    assert torch.allclose(server.global_state[HEAD], torch.tensor([10.0909091, 20.0909091]))
    assert set(server.moments) == {f"{p}/{k}" for p in "mvt" for k in plan.exchanged_keys}
    buffer = io.BytesIO()
    torch.save(server.to_checkpoint(), buffer)
    buffer.seek(0)
    resumed = Server.from_checkpoint(adam, torch.load(buffer, weights_only=False))
    for s in (server, resumed):
        plan = s.plan_round(2)
        s.finish_round(plan, [update(d, {k: v + 0.2 for k, v in plan.state.items()}, 1) for d in plan.devices], [])
    assert all(torch.equal(server.global_state[k], resumed.global_state[k]) for k in server.global_state)
    assert all(torch.equal(server.moments[k], resumed.moments[k]) for k in server.moments)
