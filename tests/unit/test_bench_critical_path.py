"""bench/critical_path.py: time to the target without the background wait or the probes, by hand."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import critical_path  # noqa: E402

MB = 1_250_000  # bytes that take 1 s at 10 Mbit/s


def write_run(folder: Path, method: str, seed: int, rows: list[dict]) -> None:
    run = folder / method / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_wait_and_probe_taken_out_by_hand(tmp_path, capsys):
    # FibecFed, two devices a round; costs are [compute s, download B, upload B, background s].
    ours = [
        {"round": 0, "accuracy": 0.1, "personalized_accuracy": 0.1},
        # Round 1: device 0 waits 3 s for its scoring, device 1 none; probes 2 s summed (1 s each).
        # As run: max(1 + 2 + 3, 2 + 2) = 6 s; no wait: max(3, 4) = 4; no probe: max(5, 3) = 5;
        # neither: max(2, 3) = 3.
        {"round": 1, "accuracy": 0.9, "personalized_accuracy": 0.9, "probe_seconds": 2.0,
         "device_costs": [[1.0, MB, MB, 3.0], [2.0, MB, MB, 0.0]]},
        # Round 2: the background (3 s) is done by then (elapsed 6 s as run, 4 without the wait);
        # no probe: 2 + 1 = 3 s in every variant.
        {"round": 2, "accuracy": 0.9, "personalized_accuracy": 0.9, "probe_seconds": 0.0,
         "device_costs": [[2.0, MB / 2, MB / 2, 3.0], [1.0, MB / 2, MB / 2, 0.0]]},
    ]
    # FedAvg: 10 s a round; its smoothed score (trailing mean of 3, round 0 included) reaches the
    # target 0.5 at round 2 (0.1, 0.3, 0.5), ours at round 1 (0.1, 0.5).
    theirs = [
        {"round": 0, "accuracy": 0.1, "personalized_accuracy": 0.1},
        {"round": 1, "accuracy": 0.5, "personalized_accuracy": 0.3, "device_costs": [[8.0, MB, MB]]},
        {"round": 2, "accuracy": 0.9, "personalized_accuracy": 0.9, "device_costs": [[8.0, MB, MB]]},
    ]
    write_run(tmp_path, "fibecfed", 0, ours)
    write_run(tmp_path, "fedavg", 0, theirs)
    (tmp_path / "comparison.json").write_text(json.dumps({
        "run_bandwidth_mbps": {"fibecfed": 10.0, "fedavg": 10.0}, "metric": "accuracy",
        "target": 0.5, "personalized_target": 0.6,
    }))
    rows = critical_path.read_runs(tmp_path, "fibecfed", "accuracy")[0]
    assert critical_path.time_to_target(rows, 0.5, "accuracy", 10.0) == pytest.approx(6.0)
    assert critical_path.time_to_target(rows, 0.5, "accuracy", 10.0, critical_path.without_wait) == pytest.approx(4.0)
    assert critical_path.time_to_target(rows, 0.5, "accuracy", 10.0, critical_path.without_probe) == pytest.approx(5.0)
    # Personalised target 0.6: smoothed 0.5 at round 1, 0.633 at round 2: as run 6 + 3 = 9 s.
    assert critical_path.time_to_target(rows, 0.6, "personalized_accuracy", 10.0) == pytest.approx(9.0)

    assert critical_path.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # Over FedAvg's 20 s: 6/20, 4/20, 5/20, 3/20.
    assert "| global | 0 | 6.00 | 4.00 | 5.00 | 3.00 | 0.30 | 0.20 | 0.25 | 0.15 |" in out
    # FedAvg's personalised score smooths to 0.1, 0.2, 0.433: it never reaches 0.6, so no ratio.
    assert "| personalised | 0 | 9.00 | 7.00 | 8.00 | 6.00 | — | — | — | — |" in out


def test_runs_without_probe_records_give_no_probe_figure(tmp_path):
    rows = [
        {"round": 0, "accuracy": 0.1},
        {"round": 1, "accuracy": 0.9, "device_costs": [[1.0, 0, 0, 2.0]]},  # made before probe_seconds
    ]
    assert critical_path.time_to_target(rows, 0.4, "accuracy", 10.0) == pytest.approx(3.0)
    assert critical_path.time_to_target(rows, 0.4, "accuracy", 10.0, critical_path.without_probe) is None
