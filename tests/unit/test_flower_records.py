"""The Flower wire format: fibecfed objects survive the trip through Flower records bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import RecordDict  # noqa: E402

from fibecfed.federated import DeviceState, DeviceUpdate  # noqa: E402
from fibecfed.flower import records  # noqa: E402


def test_device_state_round_trips_through_context_state():
    state = DeviceState(
        personal={"a.layer.0.lora_A.weight": torch.randn(2, 4)},
        participations=3,
        extra={"scores": torch.tensor([0.5, float("nan")]), "scored_round": 0,
               "fisher": {"a.layer.0.lora_A.weight": torch.rand(2, 4)}},
    )
    context_state = RecordDict()
    records.store_device_state(context_state, DeviceState(personal={"old": torch.zeros(1)}))
    records.store_device_state(context_state, state)
    back = records.device_state_from_records(context_state)
    assert back.participations == 3 and back.extra["scored_round"] == 0
    assert set(back.personal) == set(state.personal)
    assert torch.equal(back.personal["a.layer.0.lora_A.weight"], state.personal["a.layer.0.lora_A.weight"])
    assert torch.equal(back.extra["fisher"]["a.layer.0.lora_A.weight"], state.extra["fisher"]["a.layer.0.lora_A.weight"])
    assert torch.allclose(back.extra["scores"], state.extra["scores"], equal_nan=True)
    assert records.device_state_from_records(RecordDict()) == DeviceState()


def test_device_update_round_trips():
    update = DeviceUpdate(
        device=1, state={"h.weight": torch.randn(3, 2)}, num_samples=40, loss=0.7, compute_seconds=1.5, steps=2,
        personalized={"accuracy": 0.5, "f1": 0.4}, personalized_count=20, curriculum_fraction=0.6, pool_size=24,
        layer_scores=torch.tensor([1.0, 2.0]), trained_personal=True,
    )
    back = records.read_update_content(records.update_content(update))
    assert torch.equal(back.state["h.weight"], update.state["h.weight"])
    assert torch.equal(back.layer_scores, update.layer_scores)
    assert back.personalized == update.personalized
    assert (back.device, back.num_samples, back.steps, back.trained_personal) == (1, 40, 2, True)
    assert records.adapter_bytes(records.update_content(update)) < records.content_bytes(records.update_content(update))


def test_train_message_carries_the_plan_and_the_stale_keys():
    from types import SimpleNamespace

    from fibecfed.federated import SparseSettings

    plan = SimpleNamespace(
        round_num=3, state={"layer.0.lora_A.weight": torch.ones(2, 2)}, exchanged_keys=["layer.0.lora_A.weight"],
        own_start_keys=[], warmup=False, sparse=SparseSettings(share=0.2), probe=None,
    )
    stale = {"layer.1.lora_A.weight": torch.full((2, 2), 3.0)}
    fingerprint = records.state_fingerprint({**plan.state, **stale})
    content = records.train_content(plan, 2, '{"seed": 0}', stale, fingerprint)
    order = records.read_train_content(content)
    assert (order.round_num, order.device, order.exchanged_keys, order.own_start_keys) == (3, 2, plan.exchanged_keys, [])
    assert order.sparse == plan.sparse and order.probe is None and order.initial_fingerprint == fingerprint
    assert set(order.global_values) == {"layer.0.lora_A.weight", "layer.1.lora_A.weight"}
    assert torch.equal(order.global_values["layer.1.lora_A.weight"], stale["layer.1.lora_A.weight"])
    # Stale keys are adapter bytes too (counted as download).
    assert records.adapter_bytes(content) == sum(content.array_records[n].count_bytes() for n in (records.GLOBAL, records.STALE))
    assert records.state_fingerprint(plan.state) != fingerprint


def _context(state_dir=None):
    from flwr.app import Context

    node_config = {"partition-id": 0, **({"state-dir": str(state_dir)} if state_dir else {})}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _state(participations: int) -> DeviceState:
    return DeviceState(personal={"k": torch.full((2,), float(participations))}, participations=participations,
                       extra={"scored_round": participations})


def test_a_node_trains_from_the_state_the_server_counts(tmp_path):
    from fibecfed.flower.client_app import device_state, keep_device_state

    folder = tmp_path / "states"
    context = _context()
    keep_device_state(context, folder, 0, "run-a", _state(1), start=DeviceState())
    keep_device_state(context, folder, 0, "run-a", _state(2), start=_state(1))
    # In memory: the last kept round's state and the one that round started from.
    assert device_state(context, folder, 0, "run-a", 2).personal["k"].tolist() == [2.0, 2.0]
    assert device_state(context, None, 0, "run-a", 1).extra == {"scored_round": 1}
    assert device_state(context, None, 0, "run-a", 0).participations == 0  # before its first round: fresh
    assert device_state(context, folder, 0, "run-a", None).participations == 2  # a server that does not say: newest
    with pytest.raises(RuntimeError, match="counts 3 kept rounds of it, but this node holds its state after \\[1, 2\\] rounds"):
        device_state(context, folder, 0, "run-a", 3)
    # A restarted node (empty Context.state) finds both on disk ...
    restarted = _context()
    assert device_state(restarted, folder, 0, "run-a", 1).personal["k"].tolist() == [1.0, 1.0]
    assert device_state(restarted, folder, 0, "run-a", 2).participations == 2
    # ... but without its folder it cannot make up a state it lost,
    with pytest.raises(RuntimeError, match="no state folder"):
        device_state(restarted, None, 0, "run-a", 2)
    # and another run's states (another run id) are not this run's.
    assert device_state(restarted, folder, 0, "run-b", 0).participations == 0
    with pytest.raises(RuntimeError, match="holds its state after no rounds"):
        device_state(restarted, folder, 0, "run-b", 1)


@pytest.mark.parametrize("on_disk", [False, True])
def test_rounds_the_server_did_not_count_are_redone_from_their_start(tmp_path, on_disk):
    # A slow device: its replies of rounds 2 and 3 come after the deadline (it kept them, the
    # server did not count them), so rounds 3 and 4 start again from its state after round 1.
    from fibecfed.flower.client_app import device_state, keep_device_state

    folder = tmp_path / "states"
    context = _context()
    keep_device_state(context, folder, 0, "run", _state(1), start=DeviceState())  # counted: 1
    for _ in range(2):  # two uncounted rounds in a row
        node = _context() if on_disk else context
        start = device_state(node, folder, 0, "run", 1)
        assert start.participations == 1
        keep_device_state(node, folder, 0, "run", _state(2), start=start)
        context = node
    assert device_state(_context() if on_disk else context, folder, 0, "run", 1).personal["k"].tolist() == [1.0, 1.0]


def test_a_late_round_still_running_when_the_next_starts_does_not_replace_its_state(tmp_path):
    # Flower's simulation engine: round 2's message ran past the deadline (not counted); the
    # device is sampled again in round 3, whose message started from a copy of the node's
    # context taken before round 2 finished. Each writes its context back when it ends (round 2
    # first: the device lock makes round 3 wait). Round 3 is counted: its state must be the one
    # the node keeps, and on disk the state before it must be the one it started from.
    import copy

    from fibecfed.flower.client_app import device_state, keep_device_state

    folder = tmp_path / "states"
    node = _context()
    keep_device_state(node, folder, 0, "run", _state(1), start=DeviceState())  # counted: 1
    late, next_round = copy.deepcopy(node), copy.deepcopy(node)
    start = device_state(late, folder, 0, "run", 1)
    keep_device_state(late, folder, 0, "run", DeviceState(personal={"k": torch.full((2,), 20.0)}, participations=2), start)
    start = device_state(next_round, folder, 0, "run", 1)  # the server still counts 1
    assert start.personal["k"].tolist() == [1.0, 1.0]
    keep_device_state(next_round, folder, 0, "run", DeviceState(personal={"k": torch.full((2,), 30.0)}, participations=2), start)
    node = next_round  # the write-backs: the late round's, then this one's
    assert device_state(node, folder, 0, "run", 2).personal["k"].tolist() == [30.0, 30.0]
    restarted = _context()
    assert device_state(restarted, folder, 0, "run", 2).personal["k"].tolist() == [30.0, 30.0]
    # Not the late round's state, renamed as if this round had started from it.
    assert device_state(restarted, folder, 0, "run", 1).personal["k"].tolist() == [1.0, 1.0]


def test_a_context_written_back_out_of_order_does_not_pass_for_the_newest_state(tmp_path):
    # The late round finished first (the lock), but its Context was written back after the next
    # round's: memory then holds the late round's state, counted as the one the server counts.
    import copy

    from fibecfed.flower.client_app import device_state, keep_device_state

    folder = tmp_path / "states"
    node = _context()
    keep_device_state(node, folder, 0, "run", _state(1), start=DeviceState())
    late, next_round = copy.deepcopy(node), copy.deepcopy(node)
    keep_device_state(late, folder, 0, "run", DeviceState(personal={"k": torch.full((2,), 20.0)}, participations=2),
                      device_state(late, folder, 0, "run", 1))
    keep_device_state(next_round, folder, 0, "run", DeviceState(personal={"k": torch.full((2,), 30.0)}, participations=2),
                      device_state(next_round, folder, 0, "run", 1))
    node = late  # written back last
    assert device_state(node, folder, 0, "run", 2).personal["k"].tolist() == [30.0, 30.0]
    assert device_state(node, folder, 0, "run", 1).personal["k"].tolist() == [1.0, 1.0]


def test_the_device_lock_makes_a_second_round_of_the_same_device_wait(tmp_path):
    import threading
    import time

    from fibecfed.flower.client_app import device_lock

    events: list[str] = []
    holding = threading.Event()

    def first():
        with device_lock(tmp_path, 0):
            holding.set()
            time.sleep(1.0)  # long enough for the other threads to get there on a loaded machine
            events.append("first ends")

    def second():
        holding.wait()
        with device_lock(tmp_path, 0):
            events.append("second starts")

    def other_device():
        holding.wait()
        with device_lock(tmp_path, 1):
            events.append("device 1")

    threads = [threading.Thread(target=f) for f in (first, second, other_device)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert events == ["device 1", "first ends", "second starts"]


def test_a_flower_run_resumes_only_its_own_checkpoint(tmp_path):
    from fibecfed.config import config_to_dict, load_config
    from fibecfed.errors import ConfigError
    from fibecfed.flower.server_app import existing_checkpoint

    config = load_config(None, ["method=fibecfed", "federation.runtime=flower"])
    assert existing_checkpoint(config, tmp_path) is None  # nothing to resume: start
    torch.save({"runtime": "flower", "config": config_to_dict(config), "round": 2}, tmp_path / "checkpoint.pt")
    assert existing_checkpoint(config, tmp_path)["round"] == 2
    other = load_config(None, ["method=fibecfed", "federation.runtime=flower", "federation.rounds=7"])
    with pytest.raises(ConfigError, match="different config"):
        existing_checkpoint(other, tmp_path)
    inprocess = load_config(None, ["method=fibecfed"])
    torch.save({"config": config_to_dict(inprocess), "round": 2}, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match="in-process runtime"):
        existing_checkpoint(config, tmp_path)


def test_the_pooled_personalised_score_counts_the_devices_that_replied():
    """Device 0 got 2 of 3 right, device 1 (with an empty test part) sent nothing to pool, device
    2 got 1 of 1: pooled accuracy 3/4 over 2 devices. No reply with predictions: no score at all."""
    from fibecfed.flower.strategy import pool_predictions

    preds = [torch.tensor([1, 0, 1]), torch.zeros(0, dtype=torch.long), torch.tensor([0])]
    labels = [torch.tensor([1, 0, 0]), torch.zeros(0, dtype=torch.long), torch.tensor([0])]
    row = pool_predictions(preds, labels, 2)
    assert row["personalized_accuracy"] == pytest.approx(0.75)
    assert row["personalized_devices"] == 2
    assert pool_predictions([], [], 2) == {"personalized_accuracy": None, "personalized_f1": None,
                                           "personalized_mcc": None, "personalized_devices": 0}


def test_compare_names_the_rounds_whose_personalised_score_pooled_fewer_devices():
    from fibecfed.compare import short_personalized_rounds

    rows = [
        {"round": 0, "personalized_devices": 10},
        {"round": 1, "personalized_devices": 10},
        {"round": 2, "personalized_devices": 8},  # two nodes failed their evaluation
        {"round": 3, "personalized_accuracy": None},  # not evaluated
    ]
    assert short_personalized_rounds(rows) == [2]
    assert short_personalized_rounds([{"round": 1, "personalized_accuracy": 0.5}]) == []  # older runs


def _reply(**fields) -> DeviceUpdate:
    values = dict(device=2, state={}, num_samples=40, loss=0.7, compute_seconds=1.5, steps=5,
                  personalized={"accuracy": 0.5}, personalized_count=10)
    values.update(fields)
    return DeviceUpdate(**values)


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({}, None),
        ({"num_samples": 400}, "it reports 400 training samples, but its partition holds 40"),
        ({"num_samples": -3}, "it reports -3 training samples"),
        ({"loss": float("nan")}, "its loss is nan"),
        ({"compute_seconds": float("nan")}, "compute-seconds must be finite"),
        ({"background_seconds": -1.0}, "background-seconds must be finite and >= 0"),
        ({"curriculum_fraction": 1.5}, "curriculum-fraction must be in [0, 1]"),
        ({"personalized": {"accuracy": float("inf")}}, "personalised scores are not finite"),
    ],
)
def test_a_reply_with_numbers_the_server_cannot_use_is_refused(fields, problem):
    from fibecfed.flower.strategy import reply_problem

    update = _reply(**fields)
    # The aggregation weight must be the partition's size, which the server knows.
    expected = 40 if fields.get("num_samples", 40) > 0 else None
    found = reply_problem(update, expected)
    assert found is None if problem is None else problem in found


def test_flower_stops_when_every_sampled_device_raised_but_not_for_device_faults():
    from types import SimpleNamespace

    from fibecfed.config import load_config
    from fibecfed.errors import FibecfedError
    from fibecfed.faults import round_faults
    from fibecfed.flower.strategy import FibecFedStrategy

    stop = FibecFedStrategy._stop_if_broken_everywhere
    plain = SimpleNamespace(config=load_config(None, []))
    broken = "<class 'RuntimeError'>:<'device 0: this node's initial adapter differs from the server's'>"
    with pytest.raises(FibecfedError, match="every sampled device's ClientApp raised \\(2 of 2\\).*initial adapter differs"):
        stop(plain, 3, [0, 1], {0: broken, 1: broken})
    stop(plain, 3, [0, 1], {0: broken})  # device 1 trained, or timed out: the run goes on
    stop(plain, 3, [0, 1], {0: broken, 1: "ClientAppException: loss became nan at local step 2"})  # a NaN loss is the device's
    # Devices whose fault the server drew (federation.faults) raise by design.
    faulty = SimpleNamespace(config=load_config(None, ["federation.faults.share=1.0", "federation.faults.kinds=[raise]"]))
    assert round_faults(faulty.config.seed, 3, [0, 1], 1.0, ["raise"]) == {0: "raise", 1: "raise"}
    stop(faulty, 3, [0, 1], {0: broken, 1: broken})
