"""The Flower runtime against the in-process simulator: Flower's simulation runtime (Ray), real
ServerApp and ClientApps, a tiny model, 400 real tweets, two devices, two rounds."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402

from fibecfed.config import load_config  # noqa: E402
from fibecfed.simulator import CHECKPOINT, Simulation  # noqa: E402
from tests.conftest import tiny_run_overrides  # noqa: E402

pytestmark = pytest.mark.flower


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_close(a, b, what):
    assert set(a) == set(b), what
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6, equal_nan=True), f"{what}: {key}"


@pytest.mark.parametrize("method", ["fedavg", "fibecfed"])
def test_flower_simulation_matches_inprocess(tiny_encoder_dir, tmp_path, method):
    from fibecfed.flower.simulation import run_flower_simulation

    overrides = tiny_run_overrides(tiny_encoder_dir, rounds=2) + ["partition.num_devices=2", f"method={method}"]
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
    checkpoint = torch.load(tmp_path / "inprocess" / CHECKPOINT, weights_only=False)
    assert set(checkpoint["device_states"]) == {0, 1}
    for device, expected in checkpoint["device_states"].items():
        node = torch.load(tmp_path / "node-states" / f"device-{device}.pt", weights_only=False)
        assert node["participations"] == expected["participations"] == 2
        _assert_close(expected["personal"], node["personal"], f"device {device} personal")
        assert set(node["extra"]) == set(expected["extra"])
        for key, value in expected["extra"].items():
            if isinstance(value, torch.Tensor):
                _assert_close({key: value}, {key: node["extra"][key]}, f"device {device} extra")
            elif isinstance(value, dict):
                _assert_close(value, node["extra"][key], f"device {device} extra {key}")
            else:
                assert node["extra"][key] == value
    if method == "fibecfed":
        assert checkpoint["device_states"][0]["personal"]  # layers that are not aggregated stay on the device

    # The same metrics, bytes aside (measured on Flower's messages, which also carry the round's settings).
    rows_a, rows_b = _rows(tmp_path / "inprocess" / "metrics.jsonl"), _rows(tmp_path / "flower" / "metrics.jsonl")
    assert [r["round"] for r in rows_b] == [0, 1, 2]
    for a, b in zip(rows_a, rows_b):
        for key in ("devices", "failed_devices", "aggregated_layers", "curriculum_fraction", "trained_personal"):
            assert a.get(key) == b.get(key), key
        for key in ("accuracy", "personalized_accuracy", "sampled_personalized_accuracy", "loss", "layer_scores"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-6), key
    for a, b in zip(rows_a[1:], rows_b[1:]):
        # Per device: the adapter entries exchanged plus a few kB of settings (config JSON, keys).
        for (_, down_a, up_a, _), (_, down_b, up_b, _) in zip(a["device_costs"], b["device_costs"]):
            assert abs(down_b - down_a) <= 20_000 and abs(up_b - up_a) <= 10_000
    assert rows_b[-1]["bytes_saved_vs_fedavg"] == 0 if method == "fedavg" else rows_b[-1]["bytes_saved_vs_fedavg"] > 0
    for name in ("config.json", "summary.json", "accuracy.png", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "flower" / name).is_file(), name
    assert summary["final_accuracy"] == rows_b[-1]["accuracy"]
