"""bench/finals.py: seed-by-seed final scores and paired differences, by hand."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import finals  # noqa: E402


def write_run(folder: Path, method: str, seed: int, accuracy: float, personalised: float | None) -> None:
    run = folder / method / f"seed{seed}"
    run.mkdir(parents=True)
    summary = {"final_accuracy": accuracy, "final_personalized_accuracy": personalised, "wall_time_s": 1.0}
    (run / "summary.json").write_text(json.dumps(summary))


def test_paired_differences_and_counts(tmp_path, capsys):
    new, old = tmp_path / "new", tmp_path / "old"
    write_run(new, "fedavg", 0, 0.70, 0.60)
    write_run(new, "fedavg", 1, 0.50, 0.40)
    write_run(new, "fibecfed", 0, 0.65, 0.70)
    write_run(new, "fibecfed", 1, 0.55, None)  # no personalised score: left out of that table
    write_run(old, "fibecfed", 1, 0.45, 0.30)  # only seed 1 at the other commit
    read = finals.read_finals(new)
    assert read["fibecfed"][1] == {"final_accuracy": 0.55}
    # fibecfed - fedavg, seed by seed: -0.05 and +0.05
    assert finals.paired(read["fibecfed"], read["fedavg"], "final_accuracy") == pytest.approx([-0.05, 0.05])
    assert finals.paired(read["fibecfed"], read["fedavg"], "final_personalized_accuracy") == pytest.approx([0.10])
    assert finals.main([str(new), "--against", str(old)]) == 0
    out = capsys.readouterr().out
    # mean 0.60, population spread 0.05; mean difference 0; lower on one seed of two
    assert "| fibecfed | 0.650 (-0.050) | 0.550 (+0.050) | 0.600 ± 0.050 | +0.000 | 1 of 2 |" in out
    assert "| fibecfed@old | — | 0.450 (-0.050) | 0.450 ± 0.000 | -0.050 | 1 of 1 |" in out
    assert "| fibecfed | 0.700 (+0.100) | — | 0.700 ± 0.000 | +0.100 | 0 of 1 |" in out


def test_empty_folder_and_unknown_reference_are_refused(tmp_path, capsys):
    assert finals.main([str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err
    write_run(tmp_path, "fedavg", 0, 0.5, 0.5)
    assert finals.main([str(tmp_path), "--reference", "fedprox"]) == 1
    assert "fedprox" in capsys.readouterr().err


def test_mean_over_the_last_evaluations(tmp_path, capsys):
    for method, accuracies in (("fedavg", [0.5, 0.7, 0.9, 0.8]), ("fibecfed", [0.6, 0.8, None, 0.6])):
        write_run(tmp_path, method, 0, accuracies[-1], None)
        rows = [{"round": 0, "accuracy": 0.1}] + [{"round": r + 1, "accuracy": a} for r, a in enumerate(accuracies)]
        (tmp_path / method / "seed0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = finals.read_finals(tmp_path, last=2)
    # fedavg: mean(0.9, 0.8) = 0.85; fibecfed: its last two evaluated rounds, 0.8 and 0.6 (round 3 not evaluated): 0.7
    assert read["fedavg"][0]["final_accuracy"] == pytest.approx(0.85)
    assert read["fibecfed"][0]["final_accuracy"] == pytest.approx(0.70)
    assert "final_personalized_accuracy" not in read["fibecfed"][0]  # never recorded
    assert finals.main([str(tmp_path), "--last", "2"]) == 0
    out = capsys.readouterr().out
    assert "Mean global score over the last 2 evaluations" in out
    assert "| fibecfed | 0.700 (-0.150) | 0.700 ± 0.000 | -0.150 | 1 of 1 |" in out
