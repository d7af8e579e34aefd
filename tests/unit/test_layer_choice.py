"""The aggregated layers are the top share of the layer scores (method.md Part 2a): the rule on
hand-made scores, and every round of short FibecFed runs checked against what the server reported
in metrics.jsonl (tiny BERT with 4 layers, 400 real tweets)."""

from __future__ import annotations

import json

import pytest
import torch

from fibecfed.config import load_config
from fibecfed.federated import device_layer_scores
from fibecfed.layers import select_aggregation_layers
from fibecfed.server import sample_devices
from fibecfed.simulator import Simulation, prepare
from tests.conftest import tiny_run_overrides

#                       layer:  0    1    2    3    4    5
SCORES = torch.tensor([0.3, 1.7, 0.9, 2.4, 0.1, 1.1])  # most sensitive first: 3, 1, 5, 2, 0, 4


def top(scores: list[float], n: int) -> list[int]:
    """The n highest-scoring layers, sorted; ties to the lower layer."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n])


def test_the_number_of_layers_is_the_share_of_the_layers_rounded():
    # N = max(1, round(share · L)), Python's round (halves to even); ceil would take one more in most rows.
    assert select_aggregation_layers(SCORES, 0.17, "sensitivity") == [3]  # 1.02 -> 1 (MiniLM's default share)
    assert select_aggregation_layers(SCORES, 0.25, "sensitivity") == [1, 3]  # 1.5 -> 2
    assert select_aggregation_layers(SCORES, 0.4, "sensitivity") == [1, 3]  # 2.4 -> 2
    assert select_aggregation_layers(SCORES, 0.5, "sensitivity") == [1, 3, 5]  # 3
    assert select_aggregation_layers(SCORES, 0.75, "sensitivity") == [1, 2, 3, 5]  # 4.5 -> 4
    assert select_aggregation_layers(SCORES, 0.9, "sensitivity") == [0, 1, 2, 3, 5]  # 5.4 -> 5
    assert select_aggregation_layers(SCORES, 0.05, "sensitivity") == [3]  # 0.3 -> 0, at least 1
    assert select_aggregation_layers(SCORES, 0.4, "reverse") == [0, 4]  # the least sensitive two


def read_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_rounds_layers_are_the_top_share_of_the_scores_reported_before_it(tiny_encoder_dir, tmp_path):
    """select_after=2: rounds 1 and 2 warm up and round 2's devices probe their trained models;
    that choice holds from round 3. refresh_every=3: after 3 rounds of it (3, 4, 5) round 5 probes
    again, and its choice holds from round 6. share 0.6 of 4 layers: round(2.4) = 2 layers."""
    extra = ["method=fibecfed", "method.layers.share=0.6", "method.layers.select_after=2", "method.layers.refresh_every=3"]
    config = load_config(None, tiny_run_overrides(tiny_encoder_dir, rounds=6) + extra)
    Simulation(config, tmp_path).run()
    rows = {r["round"]: r for r in read_rows(tmp_path)}
    probing = [t for t in range(1, 7) if rows[t].get("layer_scores") is not None]
    assert probing == [2, 5]
    assert rows[1]["aggregated_layers"] is None and rows[2]["aggregated_layers"] is None
    for t in (3, 4, 5):
        assert rows[t]["aggregated_layers"] == top(rows[2]["layer_scores"], 2), t
    assert rows[6]["aggregated_layers"] == top(rows[5]["layer_scores"], 2)
    for t in probing:
        assert len(rows[t]["layer_scores"]) == 4 and all(s > 0 for s in rows[t]["layer_scores"])


SELECT_BEFORE = ["method=fibecfed", "method.layers.share=0.5", "method.layers.select_after=0", "method.layers.refresh_every=0"]


def test_a_choice_before_round_1_is_the_top_share_of_the_probes_of_the_initial_model(tiny_encoder_dir, tmp_path):
    """select_after=0: before round 1 the sampled devices probe the initial global model; the
    server averages their scores weighted by data size and takes the top half."""
    config = load_config(None, tiny_run_overrides(tiny_encoder_dir, rounds=1) + SELECT_BEFORE)
    Simulation(config, tmp_path).run()
    chosen = read_rows(tmp_path)[1]["aggregated_layers"]

    prepared = prepare(config)
    runner = prepared.runner
    initial = runner.state()
    layers = config.method.layers
    weighted, total = torch.zeros(4, dtype=torch.float64), 0
    for device in sample_devices(config.seed, 1, config.partition.num_devices, config.federation.devices_per_round):
        part = prepared.train_parts[device]
        scores, _ = device_layer_scores(runner, prepared.train, part, initial, layers.probe_samples, layers.noise_scale,
                                        layers.measure, config.seed, 1, device)
        weighted += len(part) * scores.double()
        total += len(part)
    expected = top((weighted / total).tolist(), 2)
    assert chosen == expected


def test_a_choice_before_a_round_reports_the_scores_it_was_made_from(tiny_encoder_dir, tmp_path):
    config = load_config(None, tiny_run_overrides(tiny_encoder_dir, rounds=1) + SELECT_BEFORE)
    Simulation(config, tmp_path).run()
    row = read_rows(tmp_path)[1]
    assert row.get("layer_scores") is not None
    assert row["aggregated_layers"] == top(row["layer_scores"], 2)
