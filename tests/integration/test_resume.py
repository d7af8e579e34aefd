"""A killed run, started again, ends bit-identical to one that never stopped (CPU): the global
adapter, every device file (personal layers, difficulty scores, Fisher sums, participations) and
the server's FibecFed state (layer choice), for a kill between the checkpoint and the device
files, a kill during the checkpoint write, a format-1 checkpoint, and a real SIGKILL of the CLI.

Tiny BERT (4 layers, hidden 16) on 400 real tweets; each run takes a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fibecfed
from fibecfed import outputs
from fibecfed.config import load_config
from fibecfed.device_store import DeviceStore, state_to_payload
from fibecfed.simulator import CHECKPOINT, DEVICES, Simulation, read_device_states
from tests.conftest import tiny_run_overrides

pytestmark = pytest.mark.integration

ROUNDS = 4
METHODS = {
    "fedavg": ["method=fedavg"],
    # Layer choice refreshed mid-run, sparse masks from Fisher sums, curriculum with rescoring,
    # and FedAdam's moments on the server (restarted for layers that join).
    "fibecfed": ["method=fibecfed", "method.layers.share=0.5", "method.layers.refresh_every=2",
                 "method.curriculum.rescore_every=2", "federation.server_opt.kind=adam"],
}
# Fields of a metrics row that do not depend on timing.
STABLE = ("round", "devices", "accuracy", "f1", "mcc", "test_loss", "loss", "personalized_accuracy",
          "sampled_personalized_accuracy", "aggregated_layers", "layer_scores", "curriculum_fraction",
          "failed_devices", "rejected", "upload_bytes", "download_bytes")


def overrides(model_dir: Path, method: str) -> list[str]:
    # 6 devices, 2 a round: devices join over the rounds, so the store grows and some files stay old.
    return tiny_run_overrides(model_dir, ROUNDS) + ["partition.num_devices=6", *METHODS[method]]


def run(model_dir: Path, out: Path, method: str, extra: tuple[str, ...] = ()) -> None:
    Simulation(load_config(None, overrides(model_dir, method) + list(extra)), out).run()


def assert_equal_values(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            assert_equal_values(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_values(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(expected: Path, actual: Path) -> None:
    """Global adapter, server state, every device file and the metrics: bit-identical."""
    ck_a, ck_b = outputs.load_checkpoint(expected / CHECKPOINT), outputs.load_checkpoint(actual / CHECKPOINT)
    assert ck_a["round"] == ck_b["round"] == ROUNDS
    assert_equal_values(ck_a["global_state"], ck_b["global_state"], "global_state")
    assert_equal_values(ck_a["server"], ck_b["server"], "server")  # layer choice and its scores
    assert_equal_values(ck_a.get("server_moments"), ck_b.get("server_moments"), "server_moments")
    assert_equal_values(ck_a["changed_devices"], ck_b["changed_devices"], "changed_devices")
    files_a = dict(DeviceStore(expected / DEVICES, cache_size=0).states())
    files_b = dict(DeviceStore(actual / DEVICES, cache_size=0).states())
    assert files_a and set(files_a) == set(files_b)
    for device in files_a:
        assert_equal_values(state_to_payload(files_a[device]), state_to_payload(files_b[device]), f"device {device}")
    rows_a, rows_b = outputs.read_metrics(expected / "metrics.jsonl"), outputs.read_metrics(actual / "metrics.jsonl")
    assert [{k: r.get(k) for k in STABLE} for r in rows_a] == [{k: r.get(k) for k in STABLE} for r in rows_b]


@pytest.fixture(scope="module")
def uninterrupted(tiny_encoder_dir, tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for method in METHODS:
        folders[method] = tmp_path_factory.mktemp(f"full-{method}")
        run(tiny_encoder_dir, folders[method], method)
    return folders


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing in the run catches it."""


@pytest.mark.parametrize("method", list(METHODS))
def test_kill_between_checkpoint_and_device_files(tiny_encoder_dir, uninterrupted, tmp_path, monkeypatch, method):
    original = DeviceStore.commit
    calls = {"n": 0}

    def commit_then_die_in_round_2(self):
        calls["n"] += 1
        if calls["n"] == 2:  # round 2's checkpoint is on disk, its device files are not
            raise Killed
        return original(self)

    monkeypatch.setattr(DeviceStore, "commit", commit_then_die_in_round_2)
    with pytest.raises(Killed):
        run(tiny_encoder_dir, tmp_path, method)
    checkpoint = outputs.load_checkpoint(tmp_path / CHECKPOINT)
    assert checkpoint["round"] == 2 and checkpoint["format"] == 2
    # The round's devices are in the checkpoint and not (all) in the files: resume must re-apply them.
    files = dict(DeviceStore(tmp_path / DEVICES, cache_size=0).states())
    changed = checkpoint["changed_devices"]
    assert changed and any(d not in files or files[d].participations < changed[d]["participations"] for d in changed)
    monkeypatch.setattr(DeviceStore, "commit", original)
    run(tiny_encoder_dir, tmp_path, method)
    assert_same_run(uninterrupted[method], tmp_path)


def run_killed_at_third_checkpoint_rename(model_dir, out, method, monkeypatch) -> None:
    """Run until round 3's checkpoint is written to its temporary file, then die before the rename."""
    original = os.replace
    calls = {"n": 0}

    def die_on_the_third_checkpoint_rename(src, dst):
        if Path(dst).name == CHECKPOINT:
            calls["n"] += 1
            if calls["n"] == 3:
                raise Killed
        return original(src, dst)

    monkeypatch.setattr(os, "replace", die_on_the_third_checkpoint_rename)
    with pytest.raises(Killed):
        run(model_dir, out, method)
    monkeypatch.setattr(os, "replace", original)


@pytest.mark.parametrize("method", list(METHODS))
def test_kill_during_the_checkpoint_write(tiny_encoder_dir, uninterrupted, tmp_path, monkeypatch, method):
    run_killed_at_third_checkpoint_rename(tiny_encoder_dir, tmp_path, method, monkeypatch)
    assert outputs.load_checkpoint(tmp_path / CHECKPOINT)["round"] == 2  # the previous good one
    assert (tmp_path / (CHECKPOINT + ".tmp")).is_file()
    # No device file is ahead of the checkpoint: round 3's devices were never written.
    rows = outputs.read_metrics(tmp_path / "metrics.jsonl")
    trained_by_2 = {d for r in rows if 0 < r["round"] <= 2 for d in r["devices"] if d not in r["failed_devices"]}
    files = dict(DeviceStore(tmp_path / DEVICES, cache_size=0).states())
    assert set(files) == trained_by_2
    run(tiny_encoder_dir, tmp_path, method)
    assert_same_run(uninterrupted[method], tmp_path)


def test_a_format_1_checkpoint_resumes(tiny_encoder_dir, uninterrupted, tmp_path, monkeypatch):
    """An older fibecfed kept every device's state in the checkpoint and no device files."""
    method = "fibecfed"
    run_killed_at_third_checkpoint_rename(tiny_encoder_dir, tmp_path, method, monkeypatch)
    checkpoint = outputs.load_checkpoint(tmp_path / CHECKPOINT)
    states = read_device_states(tmp_path)
    old = {k: v for k, v in checkpoint.items() if k not in ("format", "changed_devices")}
    old["device_states"] = {d: state_to_payload(s) for d, s in states.items()}
    for path in (tmp_path / DEVICES).iterdir():
        path.unlink()
    torch.save(old, tmp_path / CHECKPOINT)
    run(tiny_encoder_dir, tmp_path, method)
    assert_same_run(uninterrupted[method], tmp_path)


def test_a_different_device_cache_still_resumes(tiny_encoder_dir, uninterrupted, tmp_path, monkeypatch):
    original = DeviceStore.commit
    calls = {"n": 0}

    def die_in_round_3(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return original(self)

    monkeypatch.setattr(DeviceStore, "commit", die_in_round_3)
    with pytest.raises(Killed):
        run(tiny_encoder_dir, tmp_path, "fibecfed")
    monkeypatch.setattr(DeviceStore, "commit", original)
    run(tiny_encoder_dir, tmp_path, "fibecfed", ("federation.device_cache=0",))
    assert_same_run(uninterrupted["fibecfed"], tmp_path)


def test_sigkill_of_the_cli_then_the_same_command_again(tiny_encoder_dir, uninterrupted, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fibecfed", "run", "--no-progress", "--out", str(out),
               *overrides(tiny_encoder_dir, "fibecfed")]
    # This checkout's fibecfed (not another installed one), on one thread like the in-process run.
    env = {**os.environ, "PYTHONPATH": str(Path(fibecfed.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            checkpoint = outputs.load_checkpoint(out / CHECKPOINT) if (out / CHECKPOINT).is_file() else None
            if checkpoint is not None and checkpoint["round"] >= 2:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert outputs.load_checkpoint(out / CHECKPOINT)["round"] < ROUNDS
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(uninterrupted["fibecfed"], out)
