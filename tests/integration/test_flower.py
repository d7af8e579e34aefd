"""The Flower runtime against the in-process simulator: Flower's simulation runtime (Ray), real
ServerApp and ClientApps, a tiny model, 400 real tweets, two devices, two to four rounds."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402

from fibecfed.config import load_config  # noqa: E402
from fibecfed.device_store import state_to_payload  # noqa: E402
from fibecfed.simulator import Simulation, read_device_states  # noqa: E402
from tests.conftest import tiny_run_overrides  # noqa: E402

pytestmark = pytest.mark.flower


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_close(a, b, what):
    assert set(a) == set(b), what
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6, equal_nan=True), f"{what}: {key}"


# FibecFed with the layers chosen anew after every round: a layer that leaves the aggregated ones
# reaches a device that lacks its global value, which the server then sends (the "stale" keys).
REFRESH = ["method.layers.refresh_every=1", "method.layers.share=0.5"]


# FibecFed under FedAdam: the server's moments live in the ServerApp's strategy there, in the
# simulator's Server here. Three rounds: the warm-up moves the head, round 2 gives the chosen
# layer its first (fresh) average, round 3 is its first Adam step.
FEDADAM = ["federation.server_opt.kind=adam", "federation.server_opt.lr=0.01"]


# FibecFed with the server's plain average: the "layers-leave" case. FedAvg against the
# in-process run: test_cli_runs_fedavg_on_flower_as_inprocess (through the CLI).
@pytest.mark.parametrize(("extra", "rounds"), [(REFRESH, 4), (FEDADAM, 3)], ids=["fibecfed-layers-leave", "fibecfed-fedadam"])
def test_flower_simulation_matches_inprocess(tiny_encoder_dir, tmp_path, extra, rounds):
    from fibecfed.flower.simulation import run_flower_simulation

    overrides = tiny_run_overrides(tiny_encoder_dir, rounds) + ["partition.num_devices=2", "method=fibecfed", *extra]
    Simulation(load_config(None, overrides), tmp_path / "inprocess").run()
    flower_config = load_config(None, overrides + ["federation.runtime=flower"])
    summary = run_flower_simulation(flower_config, tmp_path / "flower", state_dir=tmp_path / "node-states")

    # The same global adapter (compute timings differ; states do not).
    _assert_close(
        load_file(tmp_path / "inprocess" / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "flower" / "adapter" / "adapter_model.safetensors"),
        "global adapter",
    )
    # The same private state on every device: personal entries, Fisher momentum, difficulty scores.
    checkpoint = {"device_states": {d: state_to_payload(s) for d, s in read_device_states(tmp_path / "inprocess").items()}}
    assert set(checkpoint["device_states"]) == {0, 1}
    for device, expected in checkpoint["device_states"].items():
        node = torch.load(tmp_path / "node-states" / f"device-{device}.pt", weights_only=False)
        assert node["participations"] == expected["participations"] == rounds
        _assert_close(expected["personal"], node["personal"], f"device {device} personal")
        assert set(node["extra"]) == set(expected["extra"])
        for key, value in expected["extra"].items():
            if isinstance(value, torch.Tensor):
                _assert_close({key: value}, {key: node["extra"][key]}, f"device {device} extra")
            elif isinstance(value, dict):
                _assert_close(value, node["extra"][key], f"device {device} extra {key}")
            else:
                assert node["extra"][key] == value
    assert checkpoint["device_states"][0]["personal"]  # layers that are not aggregated stay on the device
    if extra == FEDADAM:
        # Adam did run (in-process; the Flower run's adapter matches it): the head's moments and
        # step count, and the chosen layer's after its first Adam step in round 3.
        moments = torch.load(tmp_path / "inprocess" / "checkpoint.pt", weights_only=False)["server_moments"]
        assert any(key.startswith("t/") and float(value) == 3 for key, value in moments.items())
        assert any(key.startswith("t/") and float(value) == 1 for key, value in moments.items())

    rows_b = _assert_same_rows(tmp_path / "inprocess", tmp_path / "flower", rounds)
    if extra == REFRESH:
        layers = [set(r["aggregated_layers"] or []) for r in rows_b[2:]]
        assert any(before - after for before, after in zip(layers, layers[1:])), "no layer left the aggregated ones"
    assert rows_b[-1]["bytes_saved_vs_fedavg"] > 0
    assert summary["final_accuracy"] == rows_b[-1]["accuracy"]


def _assert_same_rows(inprocess, flower, rounds):
    """The same metrics rows in both runtimes, bytes aside (measured on Flower's messages, which
    also carry the round's settings), and the Flower run's files; returns the Flower rows."""
    rows_a, rows_b = _rows(inprocess / "metrics.jsonl"), _rows(flower / "metrics.jsonl")
    assert [r["round"] for r in rows_a] == [r["round"] for r in rows_b] == list(range(rounds + 1))
    for a, b in zip(rows_a, rows_b):
        for key in ("devices", "failed_devices", "aggregated_layers", "curriculum_fraction", "trained_personal",
                    "personalized_devices"):
            assert a.get(key) == b.get(key), key
        for key in ("accuracy", "personalized_accuracy", "sampled_personalized_accuracy", "loss", "layer_scores"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-6), key
    for a, b in zip(rows_a[1:], rows_b[1:]):
        # Per device: the adapter entries exchanged plus a few kB of settings (config JSON, keys).
        for (_, down_a, up_a, _), (_, down_b, up_b, _) in zip(a["device_costs"], b["device_costs"]):
            assert abs(down_b - down_a) <= 20_000 and abs(up_b - up_a) <= 10_000
    for name in ("config.json", "summary.json", "accuracy.png", "adapter/adapter_model.safetensors"):
        assert (flower / name).is_file(), name
    return rows_b


def _client_app(state_dir, failing_train=None, failing_evaluation=None, losing_reply=None):
    """fibecfed's ClientApp, nodes saving their states in `state_dir`, except that:
    - failing_train=(device, round): that node raises in that round's training, before it
      trains (a real failure on a real node);
    - failing_evaluation=(device, round): that node raises in that round's evaluation;
    - losing_reply=(device, round): that node trains that round and keeps its state as usual,
      and its reply then speaks for another device, so the server counts no update from it: to
      the node, a round the server did not count, as with a reply that came after the deadline."""
    import dataclasses

    from flwr.app import Message
    from flwr.clientapp import ClientApp

    from fibecfed.flower import client_app, records

    def this(context, msg, which):
        return which == (client_app.partition_id(context), msg.content.config_records["round"]["round"])

    app = ClientApp()
    app.query()(client_app.identify)

    @app.evaluate()
    def evaluate(msg, context):
        if this(context, msg, failing_evaluation):
            raise RuntimeError("this node breaks down in its evaluation")
        return client_app.evaluate(msg, context, state_dir)

    @app.train()
    def train(msg, context):
        if this(context, msg, failing_train):
            raise RuntimeError("this node breaks down before it trains")
        reply = client_app.train(msg, context, state_dir)
        if this(context, msg, losing_reply):
            update = records.read_update_content(reply.content)
            return Message(records.update_content(dataclasses.replace(update, device=update.device + 1)), reply_to=msg)
        return reply

    return app


@pytest.fixture(scope="module")
def failing_and_lost_runs(tiny_encoder_dir, tmp_path_factory):
    """Two 3-round FibecFed runs on Flower, two devices, in both of which device 1's node fails
    round 3's evaluation: in "failed", device 0's node raises in round 2 before it trains; in
    "lost", it trains round 2 and keeps the result beside round 1's, but the server drops its
    reply. Returns the folder holding failed/, lost/ (runs) and failed-states/, lost-states/."""
    from fibecfed.flower.simulation import run_flower_simulation

    folder = tmp_path_factory.mktemp("failing-and-lost")
    overrides = tiny_run_overrides(tiny_encoder_dir, rounds=3) + ["partition.num_devices=2", "method=fibecfed"]
    config = load_config(None, overrides + ["federation.runtime=flower"])
    for name, fault in (("failed", {"failing_train": (0, 2)}), ("lost", {"losing_reply": (0, 2)})):
        app = _client_app(folder / f"{name}-states", failing_evaluation=(1, 3), **fault)
        run_flower_simulation(config, folder / name, client_app=app)
    return folder


def test_a_failing_node_is_counted_and_the_run_completes(failing_and_lost_runs):
    run = failing_and_lost_runs / "failed"
    rows = _rows(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["failed_devices"] for r in rows[1:]] == [[], [0], []]
    # Device 1's node failed round 3's evaluation: that round's personalised score pools device 0
    # alone, and says so (rounds 1 and 2 pooled both).
    assert [r["personalized_devices"] for r in rows[1:]] == [2, 2, 1]
    assert all(r["personalized_accuracy"] is not None for r in rows[1:])
    # The failed device downloaded but sent nothing: one upload in round 2, two in rounds 1 and 3.
    assert [len(r["device_costs"]) for r in rows[1:]] == [2, 1, 2]
    round_2_download = rows[2]["download_bytes"] - rows[1]["download_bytes"]
    assert round_2_download > rows[2]["device_costs"][0][1] and rows[3]["accuracy"] is not None
    assert json.loads((run / "summary.json").read_text())["rounds"] == 3


def test_a_round_the_server_did_not_count_is_redone_from_its_start_on_the_node(failing_and_lost_runs):
    """In "lost", device 0's node kept round 2's result, but the server dropped its reply: in
    round 3 the node must train from round 1's state (the one round 2 started from), as if round
    2 had failed on it before training ("failed"): the same rounds and the same final states of
    both devices, on disk."""
    failed, lost = (_rows(failing_and_lost_runs / name / "metrics.jsonl") for name in ("failed", "lost"))
    assert len(failed) == len(lost) == 4
    assert failed[2]["failed_devices"] == lost[2]["failed_devices"] == [0]
    for row_failed, row_lost in zip(failed, lost):
        for key in ("accuracy", "loss", "personalized_accuracy", "personalized_devices"):
            assert row_failed.get(key) == pytest.approx(row_lost.get(key), abs=1e-6), (row_failed["round"], key)
    for device in (0, 1):
        a = torch.load(failing_and_lost_runs / "failed-states" / f"device-{device}.pt", weights_only=False)
        b = torch.load(failing_and_lost_runs / "lost-states" / f"device-{device}.pt", weights_only=False)
        assert a["participations"] == b["participations"] == (2 if device == 0 else 3)
        _assert_close(a["personal"], b["personal"], f"device {device} personal")


def test_cli_runs_fedavg_on_flower_as_inprocess(tiny_encoder_dir, tmp_path):
    """`fibecfed run federation.runtime=flower`, as a user runs it: FedAvg on Flower's simulation
    runtime gives the in-process run's global adapter and metrics."""
    import subprocess
    import sys

    overrides = [*tiny_run_overrides(tiny_encoder_dir, rounds=2), "partition.num_devices=2", "method=fedavg"]
    Simulation(load_config(None, overrides), tmp_path / "inprocess").run()
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "fibecfed.cli", "run", "--out", str(out), *overrides,
                             "federation.runtime=flower"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "flower runtime" in result.stderr
    _assert_close(
        load_file(tmp_path / "inprocess" / "adapter" / "adapter_model.safetensors"),
        load_file(out / "adapter" / "adapter_model.safetensors"),
        "global adapter",
    )
    rows = _assert_same_rows(tmp_path / "inprocess", out, rounds=2)
    assert rows[2]["upload_bytes"] > rows[1]["upload_bytes"] > 0 and rows[-1]["bytes_saved_vs_fedavg"] == 0
    # The CLI's virtual nodes keep their states in out/node-states: both trained both rounds, as in-process.
    states = read_device_states(tmp_path / "inprocess")
    assert set(states) == {0, 1}
    for device, expected in states.items():
        node = torch.load(out / "node-states" / f"device-{device}.pt", weights_only=False)
        assert node["participations"] == expected.participations == 2
        _assert_close(expected.personal, node["personal"], f"device {device} personal")


# Seed 41, two devices, 60% faulty: round 1, device 1 raises; round 2, device 0 raises and device 1
# sends a mis-shaped tensor (no valid update: the global adapter stays); round 3, device 1 hangs.
FAULTY = ["seed=41", "federation.faults.share=0.6", "federation.device_timeout_s=30"]


def test_injected_faults_on_flower_match_the_inprocess_run(tiny_encoder_dir, tmp_path):
    from fibecfed.flower.simulation import run_flower_simulation

    overrides = tiny_run_overrides(tiny_encoder_dir, 3) + ["partition.num_devices=2", "method=fibecfed", *FAULTY]
    Simulation(load_config(None, overrides), tmp_path / "inprocess").run()
    run_flower_simulation(load_config(None, overrides + ["federation.runtime=flower"]), tmp_path / "flower",
                          state_dir=tmp_path / "node-states")
    rows_a, rows_b = _rows(tmp_path / "inprocess" / "metrics.jsonl"), _rows(tmp_path / "flower" / "metrics.jsonl")
    assert [r["rejected"] for r in rows_b[1:]] == [
        {"timeout": 0, "error": 1, "unknown_key": 0, "missing_key": 0, "shape": 0, "dtype": 0, "non_finite": 0},
        {"timeout": 0, "error": 1, "unknown_key": 0, "missing_key": 0, "shape": 1, "dtype": 0, "non_finite": 0},
        {"timeout": 1, "error": 0, "unknown_key": 0, "missing_key": 0, "shape": 0, "dtype": 0, "non_finite": 0},
    ]
    for a, b in zip(rows_a, rows_b):
        for key in ("devices", "failed_devices", "rejected"):
            assert a[key] == b[key], (a["round"], key)
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)
    # The server waited for the hung node until the deadline, in both runtimes' simulated time.
    assert rows_b[3]["sim_time_s"] - rows_b[2]["sim_time_s"] >= 30.0
    _assert_close(
        load_file(tmp_path / "inprocess" / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "flower" / "adapter" / "adapter_model.safetensors"),
        "global adapter",
    )
    # A node whose round failed or was rejected kept its state from before that round: device 1
    # never finished a round, device 0 finished rounds 1 and 3.
    states = {d: state_to_payload(s) for d, s in read_device_states(tmp_path / "inprocess").items()}
    assert 1 not in states and not (tmp_path / "node-states" / "device-1.pt").exists()
    node = torch.load(tmp_path / "node-states" / "device-0.pt", weights_only=False)
    assert node["participations"] == states[0]["participations"] == 2
    _assert_close(states[0]["personal"], node["personal"], "device 0 personal")


def test_a_killed_flower_run_resumes_and_matches_the_inprocess_run(tiny_encoder_dir, tmp_path, monkeypatch):
    """The ServerApp dies in round 3 after the nodes trained and saved that round, before the
    server saved it; started again, it goes on after round 2 and the nodes train round 3 again
    from their states after round 2 (kept beside the newer ones), not from the newer ones."""
    from fibecfed.flower.simulation import run_flower_simulation
    from fibecfed.flower.strategy import FibecFedStrategy

    overrides = tiny_run_overrides(tiny_encoder_dir, 3) + ["partition.num_devices=2", "method=fibecfed", *REFRESH]
    Simulation(load_config(None, overrides), tmp_path / "inprocess").run()
    config = load_config(None, overrides + ["federation.runtime=flower"])
    aggregate = FibecFedStrategy.aggregate_train

    def dies_in_round_three(self, server_round, replies):
        if server_round + self.offset == 3:
            raise RuntimeError("the ServerApp's machine goes down")
        return aggregate(self, server_round, replies)

    monkeypatch.setattr(FibecFedStrategy, "aggregate_train", dies_in_round_three)
    with pytest.raises(RuntimeError, match="machine goes down"):  # run_simulation re-raises the ServerApp's error
        run_flower_simulation(config, tmp_path / "flower", state_dir=tmp_path / "node-states")
    assert [r["round"] for r in _rows(tmp_path / "flower" / "metrics.jsonl")] == [0, 1, 2]
    for device in (0, 1):  # both trained round 3 and kept it, and round 2's state beside it
        latest = torch.load(tmp_path / "node-states" / f"device-{device}.pt", weights_only=False)
        previous = torch.load(tmp_path / "node-states" / f"device-{device}.prev.pt", weights_only=False)
        assert (latest["participations"], previous["participations"]) == (3, 2)
    monkeypatch.setattr(FibecFedStrategy, "aggregate_train", aggregate)
    run_flower_simulation(config, tmp_path / "flower", state_dir=tmp_path / "node-states")

    rows_a, rows_b = _rows(tmp_path / "inprocess" / "metrics.jsonl"), _rows(tmp_path / "flower" / "metrics.jsonl")
    assert [r["round"] for r in rows_b] == [0, 1, 2, 3]
    for a, b in zip(rows_a, rows_b):
        assert a["devices"] == b["devices"] and a["aggregated_layers"] == b["aggregated_layers"]
        for key in ("accuracy", "personalized_accuracy", "loss"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-6), (a["round"], key)
    _assert_close(
        load_file(tmp_path / "inprocess" / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "flower" / "adapter" / "adapter_model.safetensors"),
        "global adapter",
    )
    for device, expected in read_device_states(tmp_path / "inprocess").items():
        node = torch.load(tmp_path / "node-states" / f"device-{device}.pt", weights_only=False)
        assert node["participations"] == expected.participations == 3
        _assert_close(expected.personal, node["personal"], f"device {device} personal")

