"""The packaged real model still learns when a share of the devices is faulty every round."""

from __future__ import annotations

import json
import math

import pytest

from tests.integration.test_cli import fibecfed, read_rows

pytestmark = pytest.mark.integration


def test_the_real_model_learns_with_30_percent_faulty_devices(tmp_path):
    # About a minute of CPU: 4 rounds of 4 of 8 IID devices, 2,000 tweets of 32 tokens; every kind of fault.
    out = tmp_path / "run"
    result = fibecfed(
        "run", "--no-progress", "--out", str(out), "seed=1", "model.max_length=32", "data.max_train_samples=2000",
        "data.max_test_samples=200", "partition.scheme=iid", "partition.num_devices=8", "federation.devices_per_round=4",
        "federation.rounds=4", "federation.personalized_eval=false", "train.lr=0.005", "federation.faults.share=0.3",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_rows(out)
    summary = json.loads((out / "summary.json").read_text())
    rejected = sum(summary["rejected"].values())
    assert "updates left out (devices x rounds), by reason: " in result.stdout
    assert rejected == sum(len(r["failed_devices"]) for r in rows) >= 3
    assert all(r["accuracy"] is not None and math.isfinite(r["test_loss"]) for r in rows)
    assert summary["final_accuracy"] > summary["majority_rate"] + 0.05
