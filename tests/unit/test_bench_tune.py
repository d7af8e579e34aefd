"""bench/tune.py's criterion: the area under a score's curve, by hand."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import tune  # noqa: E402


def test_area_under_curve_of_either_score():
    rows = [
        {"round": 0, "accuracy": 0.5, "personalized_accuracy": 0.4},  # round 0 is left out
        {"round": 1, "accuracy": 0.6, "personalized_accuracy": None},  # not evaluated: left out
        {"round": 2, "accuracy": 0.8, "personalized_accuracy": 0.7},
        {"round": 3, "accuracy": None, "personalized_accuracy": 0.9},
    ]
    assert tune.area_under_curve(rows) == pytest.approx((0.6 + 0.8) / 2)
    assert tune.area_under_curve(rows, tune.SCORES["personalised"]) == pytest.approx((0.7 + 0.9) / 2)
    with pytest.raises(ValueError, match="personalized_accuracy"):
        tune.area_under_curve(rows[:2], "personalized_accuracy")


def test_sparse_grid_keeps_fedavg_as_a_reference_row():
    assert tune.GRIDS["sparse"]["fedavg"] == [[]]
    assert ["method.sparse.share=1.0"] in tune.GRIDS["sparse"]["fibecfed"]
