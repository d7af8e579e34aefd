"""The real CLI, as a user runs it, on the packaged real model and data and on a shared GLUE file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATASETS

pytestmark = pytest.mark.integration

SMALL = [
    "data.max_train_samples=240",
    "data.max_test_samples=120",
    "partition.num_devices=4",
    "federation.devices_per_round=2",
    "federation.rounds=2",
    "federation.device_eval_samples=20",
    "train.batch_size=8",
    "train.local_steps=2",
]


def fibecfed(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fibecfed.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_on_packaged_model_and_tweets(tmp_path):
    out = tmp_path / "run"
    result = fibecfed("run", "--out", str(out), *SMALL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accuracy" in result.stdout and "majority class" in result.stdout
    rows = read_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key in ("accuracy", "personalized_accuracy", "loss", "wall_time_s", "sim_time_s", "upload_bytes", "download_bytes"):
        assert rows[-1][key] is not None, key
    assert 0.0 <= rows[-1]["accuracy"] <= 1.0
    assert rows[-1]["upload_bytes"] > rows[1]["upload_bytes"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_names"] == ["negative", "neutral", "positive"]
    assert summary["trainable_parameters"] == 339_075  # LoRA r=8 on every linear of MiniLM + pooler + head
    config = json.loads((out / "config.json").read_text())
    assert config["federation"]["rounds"] == 2
    assert (out / "accuracy.png").stat().st_size > 10_000

    # The adapter is in peft's format: PeftModel.from_pretrained loads it onto the base model.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fibecfed.models import resolve_model_path

    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=3)
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    # A finished run started again: tests/unit/test_simulator.py (the same code, a tiny model).


@pytest.mark.skipif(not (SHARED_DATASETS / "sst-2").is_dir(), reason="shared GLUE data not present")
def test_fibecfed_on_shared_glue_file(tmp_path):
    out = tmp_path / "sst2"
    result = fibecfed(
        "run", "--out", str(out), "method=fibecfed", "method.layers.share=0.5", "data.name=sst2", f"data.path={SHARED_DATASETS / 'sst-2'}", *SMALL
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_rows(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_names"] == ["0", "1"] and summary["method"] == "fibecfed"
    # Round 1 is the warm-up; from round 2 half of MiniLM's 6 layers, chosen by the probe of the
    # devices' trained models at the end of round 1.
    assert rows[1]["aggregated_layers"] is None and len(rows[1]["layer_scores"]) == 6
    assert len(rows[2]["aggregated_layers"]) == 3
    assert rows[1]["curriculum_fraction"] == pytest.approx(0.2)
    assert rows[-1]["bytes_saved_vs_fedavg"] > 0


def test_bad_data_file_gives_one_line_error(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("sentence\tscore\nfine movie\t1\n")
    result = fibecfed(
        "run", "--out", str(tmp_path / "out"), "data.name=files", f"data.train_file={bad}", "data.text_column=sentence", *SMALL
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "column `label` not found" in result.stderr and "sentence, score" in result.stderr


def test_unknown_test_label_gives_one_line_error(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\ngood\tpos\nbad\tneg\n")
    (tmp_path / "test.tsv").write_text("text\tlabel\nmeh\tneutral\n")
    result = fibecfed(
        "run", "--out", str(tmp_path / "out"), "data.name=files",
        f"data.train_file={tmp_path / 'train.tsv'}", f"data.test_file={tmp_path / 'test.tsv'}",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown label `neutral`" in result.stderr


def test_empty_partition_gives_one_line_error(tmp_path):
    result = fibecfed(
        "run", "--out", str(tmp_path / "out"), "data.max_train_samples=30", "partition.num_devices=20",
        "partition.alpha=0.01", "partition.min_samples=2",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "training samples" in result.stderr and "partition." in result.stderr


def test_config_typo_gives_one_line_error(tmp_path):
    result = fibecfed("run", "--out", str(tmp_path / "out"), "federation.roundz=3")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "federation.roundz" in result.stderr and "federation.rounds" in result.stderr


def test_missing_file_gives_one_line_error(tmp_path):
    result = fibecfed("run", "--out", str(tmp_path / "out"), "data.name=files", f"data.train_file={tmp_path / 'nope.tsv'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "nope.tsv" in result.stderr


def test_decoder_through_label_words(tmp_path):
    """The packaged SmolLM2-135M (GGUF, converted once) classifies tweets through its LM head."""
    out = tmp_path / "smol"
    result = fibecfed(
        "run", "--out", str(out), "model.name=smollm2", "model.prompt_template={text}\nSentiment:",
        "data.max_train_samples=60", "data.max_test_samples=24", "partition.num_devices=2",
        "federation.devices_per_round=1", "federation.rounds=1", "federation.device_eval_samples=8",
        "train.batch_size=4", "train.local_steps=1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_parameters"] == 921_600  # LoRA r=8 on q/k/v/o of 30 layers, no head
    rows = read_rows(out)
    assert rows[0]["accuracy"] is not None and rows[1]["accuracy"] is not None
