"""Injected device faults: the seeded draws, the corruptions, and runs that survive them."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch

from fibecfed import server as server_module
from fibecfed.aggregation import update_problem
from fibecfed.config import FAULT_KINDS, load_config
from fibecfed.errors import ConfigError
from fibecfed.faults import (
    CORRUPTIONS,
    RUNTIME_FAULTS,
    FailingRunner,
    InjectedFault,
    corrupt_update,
    device_fault,
    expected_reason,
    round_faults,
)
from fibecfed.server import REJECTION_REASONS
from fibecfed.device_store import state_to_payload
from fibecfed.simulator import CHECKPOINT, Simulation, read_device_states
from tests.conftest import tiny_run_overrides

KINDS = list(FAULT_KINDS)


def test_every_kind_has_an_effect_and_a_reason():
    assert set(CORRUPTIONS) | set(RUNTIME_FAULTS) == set(KINDS)
    assert not set(CORRUPTIONS) & set(RUNTIME_FAULTS)
    assert {expected_reason(k) for k in KINDS} <= set(REJECTION_REASONS)


def test_faults_are_off_by_default_and_their_keys_are_checked():
    config = load_config()
    assert config.federation.faults.share == 0.0
    assert set(config.federation.faults.kinds) == {"raise", "hang", "nan", "inf", "shape", "dtype", "unknown_key", "missing_key"}
    config = load_config(None, ["federation.faults.share=0.3", "federation.faults.kinds=[nan, hang]"])
    assert config.federation.faults.share == 0.3 and config.federation.faults.kinds == ["nan", "hang"]
    with pytest.raises(ConfigError, match="unknown config key federation.faults.rate.*known keys: federation.faults.share"):
        load_config(None, ["federation.faults.rate=1"])
    with pytest.raises(ConfigError) as error:
        load_config(None, ["federation.faults.share=1.5", "federation.faults.kinds=[nan, hnag]"])
    message = str(error.value)
    assert "federation.faults.share must be in [0, 1], got 1.5" in message
    assert "unknown fault kind 'hnag' (did you mean hang?)" in message
    with pytest.raises(ConfigError, match="at least one kind"):
        load_config(None, ["federation.faults.share=0.5", "federation.faults.kinds=[]"])


def test_which_devices_are_faulty_is_a_draw_from_seed_round_and_device():
    # Device 0 of round 1, seed 0: the stream [0, 1, 0, 9] draws 0.111 (< 0.3: faulty), then kind 2 (nan).
    rng = np.random.default_rng([0, 1, 0, 9])
    assert rng.random() < 0.3 and KINDS[int(rng.integers(len(KINDS)))] == "nan"
    assert device_fault(0, 1, 0, 0.3, KINDS) == "nan"
    # Pinned: a resumed run, or another version of fibecfed, must draw the same faults.
    assert round_faults(0, 1, range(10), 0.3, KINDS) == {0: "nan", 7: "hang"}
    assert round_faults(0, 2, range(10), 0.3, KINDS) == {0: "missing_key", 2: "unknown_key", 4: "raise", 9: "dtype"}
    # A device's fault does not depend on the other devices of its round.
    assert round_faults(0, 2, [4, 9], 0.3, KINDS) == {4: "raise", 9: "dtype"}
    assert round_faults(1, 2, range(10), 0.3, KINDS) != round_faults(0, 2, range(10), 0.3, KINDS)
    assert round_faults(0, 1, range(10), 0.0, KINDS) == {}
    assert set(round_faults(0, 1, range(10), 1.0, ["hang"]).values()) == {"hang"}
    assert len(round_faults(0, 1, range(10), 1.0, KINDS)) == 10


def test_the_share_and_the_kinds_hold_over_many_draws():
    draws = [device_fault(3, r, d, 0.3, KINDS) for r in range(1, 201) for d in range(20)]
    faulty = [k for k in draws if k is not None]
    assert len(faulty) / len(draws) == pytest.approx(0.3, abs=0.02)
    counts = collections.Counter(faulty)
    assert set(counts) == set(KINDS) and min(counts.values()) > len(faulty) / len(KINDS) * 0.75


def test_each_corruption_is_rejected_with_its_reason():
    sent = {"a.lora_A.weight": torch.zeros(2, 3), "classifier.weight": torch.zeros(3)}
    upload = {k: v + 1 for k, v in sent.items()}
    for kind in CORRUPTIONS:
        corrupted = corrupt_update(upload, kind)
        problem = update_problem(corrupted, sent)
        assert problem is not None and problem.reason == expected_reason(kind), kind
        assert all(torch.equal(v, torch.ones_like(v)) for v in upload.values()), f"{kind} changed its input"
    assert torch.isnan(corrupt_update(upload, "nan")["a.lora_A.weight"]).sum() == 1
    assert corrupt_update(upload, "inf")["a.lora_A.weight"][0, 0] == float("inf")
    assert corrupt_update(upload, "shape")["a.lora_A.weight"].shape == (7,)
    assert list(corrupt_update(upload, "missing_key")) == ["a.lora_A.weight"]
    with pytest.raises(ValueError, match="does not corrupt"):
        corrupt_update(upload, "hang")


def test_a_failing_runner_raises_at_its_second_batch(tiny_encoder_dir):
    from fibecfed.simulator import prepare

    config = load_config(None, tiny_run_overrides(tiny_encoder_dir))
    prepared = prepare(config)
    runner = FailingRunner(prepared.runner)
    assert runner.params is prepared.runner.params
    runner.batch(prepared.train, [0, 1])
    with pytest.raises(InjectedFault):
        runner.batch(prepared.train, [2, 3])


# Seed 3, 6 devices, 4 a round, 5 rounds, 30% faulty: 9 faults of 7 kinds (round 3: shape, raise, hang).
FAULTY = ["seed=3", "partition.num_devices=6", "federation.devices_per_round=4", "method=fibecfed",
          "federation.faults.share=0.3", "federation.device_timeout_s=100"]


def _faulty_run(model_dir, out, rounds=5):
    config = load_config(None, tiny_run_overrides(model_dir, rounds) + FAULTY)
    summary = Simulation(config, out).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checkpoint = torch.load(out / CHECKPOINT, weights_only=False)
    checkpoint["device_states"] = {d: state_to_payload(s) for d, s in read_device_states(out).items()}
    return summary, rows, checkpoint


def test_a_run_with_30_percent_faulty_devices_completes_and_counts_them(tiny_encoder_dir, tmp_path):
    summary, rows, checkpoint = _faulty_run(tiny_encoder_dir, tmp_path)
    assert [r["round"] for r in rows] == list(range(6))
    assert all(torch.isfinite(v).all() for v in checkpoint["global_state"].values())
    assert rows[0]["rejected"] == dict.fromkeys(REJECTION_REASONS, 0)
    injected_kinds = set()
    participations = collections.Counter()
    sim_time = 0.0
    for row in rows[1:]:
        injected = round_faults(3, row["round"], row["devices"], 0.3, KINDS)
        injected_kinds |= set(injected.values())
        expected = collections.Counter(expected_reason(k) for k in injected.values())
        assert row["rejected"] == {r: expected[r] for r in REJECTION_REASONS}, row["round"]
        assert row["failed_devices"] == sorted(injected), row["round"]
        participations.update(d for d in row["devices"] if d not in injected)
        # A round with a hang lasts until the deadline (100 s): far longer than the tiny model's rounds.
        round_time = row["sim_time_s"] - sim_time
        assert (round_time >= 100.0) == ("hang" in injected.values()), row["round"]
        sim_time = row["sim_time_s"]
    assert len(injected_kinds) >= 7 and {"raise", "hang"} <= injected_kinds
    # A faulty device's round did not count: its state is the one from before it.
    assert set(checkpoint["device_states"]) == {d for d, n in participations.items() if n}
    for device, state in checkpoint["device_states"].items():
        assert state["participations"] == participations[device], device
    totals = collections.Counter()
    for row in rows:
        totals.update(row["rejected"])
    assert summary["rejected"] == {r: totals[r] for r in REJECTION_REASONS} and sum(totals.values()) == 9
    assert rows[-1]["accuracy"] is not None


def test_a_killed_faulty_run_resumes_to_the_same_result(tiny_encoder_dir, tmp_path, monkeypatch):
    _, rows_full, ck_full = _faulty_run(tiny_encoder_dir, tmp_path / "full", rounds=4)
    original = server_module.sample_devices

    def crash_in_round_4(seed, round_num, num_devices, per_round):
        if round_num == 4:
            raise KeyboardInterrupt
        return original(seed, round_num, num_devices, per_round)

    monkeypatch.setattr(server_module, "sample_devices", crash_in_round_4)
    with pytest.raises(KeyboardInterrupt):
        _faulty_run(tiny_encoder_dir, tmp_path / "killed", rounds=4)
    monkeypatch.setattr(server_module, "sample_devices", original)
    _, rows, ck = _faulty_run(tiny_encoder_dir, tmp_path / "killed", rounds=4)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    for key, value in ck_full["global_state"].items():
        assert torch.equal(value, ck["global_state"][key]), key
    for name in ("rejected", "failed_devices", "accuracy", "loss"):
        assert [r[name] for r in rows] == [r[name] for r in rows_full], name


def test_an_exception_on_every_device_is_a_bug_not_a_fault(tiny_encoder_dir, tmp_path, monkeypatch):
    import fibecfed.federated as federated

    def broken(*args, **kwargs):
        raise TypeError("a bug in local training")

    monkeypatch.setattr(federated, "local_train", broken)
    config = load_config(None, tiny_run_overrides(tiny_encoder_dir, 1))
    with pytest.raises(TypeError, match="a bug"):
        Simulation(config, tmp_path).run()


def test_any_exception_of_one_device_is_logged_and_survived(tiny_encoder_dir, tmp_path, monkeypatch, caplog):
    import fibecfed.federated as federated

    original = federated.local_train
    calls = {"n": 0}

    def fail_first(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (pretend)")
        return original(*args, **kwargs)

    monkeypatch.setattr(federated, "local_train", fail_first)
    config = load_config(None, tiny_run_overrides(tiny_encoder_dir, 1) + ["partition.num_devices=2"])
    with caplog.at_level("WARNING", logger="fibecfed.simulator"):
        Simulation(config, tmp_path).run()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    failed = row["failed_devices"]
    assert len(failed) == 1 and row["rejected"]["error"] == 1
    assert f"device {failed[0]} failed in round 1 (RuntimeError: CUDA out of memory (pretend))" in caplog.text
    # It never completed a round: it has no state at all.
    assert failed[0] not in read_device_states(tmp_path)
