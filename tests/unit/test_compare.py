import json

import pytest

from fibecfed.compare import first_reaching, markdown_table, parse_methods, smoothed, summarise
from fibecfed.errors import ConfigError


def rows(accs, sim_step=10.0, up_step=100):
    return [
        {"round": i, "accuracy": a, "sim_time_s": i * sim_step, "wall_time_s": i * 2.0, "upload_bytes": i * up_step,
         "personalized_accuracy": None if i == 0 else 0.5}
        for i, a in enumerate(accs)
    ]


def test_smoothed_is_trailing_mean_of_three():
    assert smoothed([0.3, 0.6, 0.9, 0.0]) == pytest.approx([0.3, 0.45, 0.6, 0.5])
    assert smoothed([0.3, None, 0.6]) == [0.3, None, pytest.approx(0.45)]


def test_a_lucky_round_does_not_reach_the_target():
    # round 2 spikes to 0.9 but the mean of rounds 0..2 is 0.5: the target 0.6 is not reached there
    accs = [0.3, 0.3, 0.9, 0.5, 0.6, 0.7]
    hit = first_reaching(rows(accs), 0.6)
    # smoothed: 0.3, 0.3, 0.5, 0.567, 0.667 -> round 4
    assert hit["round"] == 4
    assert first_reaching(rows(accs), 0.95) is None


def test_summarise_ratios_by_hand():
    runs = {
        "fedavg": [rows([0.3, 0.5, 0.6, 0.7, 0.7])],  # smoothed: .3 .4 .467 .6 .667 -> reaches 0.6 at round 3
        "fast": [rows([0.3, 0.7, 0.7, 0.7, 0.7], sim_step=5.0, up_step=25)],  # .3 .5 .567 .7 -> round 3
    }
    table = summarise(runs, 0.6, "fedavg")
    assert table["fedavg"]["round_to_target"] == 3
    assert table["fedavg"]["sim_time_to_target_s"] == 30.0
    assert table["fast"]["sim_time_to_target_s"] == 15.0
    assert table["fast"]["sim_time_to_target_s_ratio"] == pytest.approx(0.5)
    assert table["fast"]["upload_bytes_to_target_ratio"] == pytest.approx(0.25)
    assert table["fast"]["final_accuracy_ratio"] == pytest.approx(1.0)
    md = markdown_table(table, 0.6, "fedavg")
    assert "| fast |" in md and "0.50" in md


def test_paired_ratios_use_the_seeds_both_reached():
    runs = {
        # seed 0: reference reaches at round 3 (30 s), seed 1: never; "m" reaches in both.
        "fedavg": [rows([0.3, 0.5, 0.6, 0.7, 0.7]), rows([0.3, 0.3, 0.3, 0.3, 0.3])],
        "m": [rows([0.3, 0.7, 0.7, 0.7, 0.7], sim_step=5.0, up_step=25), rows([0.3, 0.7, 0.7, 0.7, 0.7])],
    }
    table = summarise(runs, 0.6, "fedavg")
    assert table["m"]["sim_time_to_target_s_ratio"] is None  # not every seed of the reference reached
    assert table["m"]["sim_time_to_target_s_paired_ratios"] == [pytest.approx(0.5)]  # 15 s / 30 s, seed 0 only
    assert table["m"]["upload_bytes_to_target_paired_ratios"] == [pytest.approx(0.25)]
    assert table["fedavg"]["sim_time_to_target_s_paired_ratios"] == [pytest.approx(1.0)]


def test_mean_and_spread_over_seeds():
    runs = {"m": [rows([0.3, 0.6]), rows([0.3, 0.8])]}
    entry = summarise(runs, 0.99, "m")["m"]
    assert entry["final_accuracy"] == pytest.approx(0.7)
    assert entry["final_accuracy_std"] == pytest.approx(0.1)
    assert entry["reached"] == 0 and entry["sim_time_to_target_s"] is None


def test_parse_methods():
    specs = parse_methods("fedavg,fibecfed[method.layers.share=0.33;method.sparse.share=0.2],fibecfed-no-curriculum")
    assert [s.label for s in specs][0] == "fedavg"
    assert specs[1].overrides[-2:] == ["method.layers.share=0.33", "method.sparse.share=0.2"]
    assert "method.curriculum.enabled=false" in specs[2].overrides
    with pytest.raises(ConfigError, match="unknown method"):
        parse_methods("fedsgd")
    with pytest.raises(ConfigError, match="twice"):
        parse_methods("fedavg,fedavg")


def test_compare_end_to_end_on_tiny_model(tiny_encoder_dir, tmp_path):
    from fibecfed.compare import compare
    from tests.conftest import tiny_run_overrides

    result = compare(
        parse_methods("fedavg,fibecfed"), [0, 1], tmp_path, overrides=tiny_run_overrides(tiny_encoder_dir, 2), target=0.0
    )
    for name in ("comparison.json", "comparison.md", "comparison.png", "fedavg/seed0/metrics.jsonl", "fibecfed/seed1/summary.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["methods"]["fedavg"]["seeds"] == 2
    assert saved["methods"]["fedavg"]["upload_bytes_to_target_ratio"] == pytest.approx(1.0)
    # FibecFed sends half the layers: less than FedAvg to reach the same (trivial) target.
    assert result["methods"]["fibecfed"]["upload_bytes_to_target_ratio"] < 0.7


def test_round_breakdown_by_hand():
    from fibecfed.compare import round_breakdown

    # Two devices per round; each round moves 2.5 MB down and 2.5 MB up in total, i.e. 2.5 MB
    # per device = 2.0 s at 10 Mbps; rounds last 5 s and 7 s, so compute is 3 s and 5 s.
    base = {"devices": [0, 1], "failed_devices": []}
    history = [
        {"round": 0, "sim_time_s": 0.0, "upload_bytes": 0, "download_bytes": 0},
        {**base, "round": 1, "sim_time_s": 5.0, "upload_bytes": 2_500_000 // 2, "download_bytes": 2_500_000 // 2 * 3,
         "scoring_seconds": 1.0, "curriculum_fraction": 0.2},
        {**base, "round": 2, "sim_time_s": 12.0, "upload_bytes": 2_500_000, "download_bytes": 7_500_000,
         "scoring_seconds": 0.0, "curriculum_fraction": 0.6},
    ]
    b = round_breakdown(history, 10.0)
    assert b["round_sim_s"] == pytest.approx(6.0)
    assert b["round_transfer_s"] == pytest.approx(2.0)
    assert b["round_compute_s"] == pytest.approx(4.0)
    assert b["round_scoring_s"] == pytest.approx(0.25)  # (1.0 / 2 devices + 0) / 2 rounds
    assert b["round_device_upload_bytes"] == pytest.approx(625_000)
    assert b["round_curriculum_fraction"] == pytest.approx(0.4)
    assert round_breakdown(history[:1], 10.0) == {}
