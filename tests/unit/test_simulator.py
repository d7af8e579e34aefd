"""The in-process runner end to end, on a tiny model saved as a local folder and 400 real tweets."""

from __future__ import annotations

import json

import pytest
import torch

from fibecfed import server as server_module
from fibecfed import simulator as sim_module
from fibecfed.accounting import serialized_nbytes
from fibecfed.adapters import layer_of_key
from fibecfed.config import load_config
from fibecfed.curriculum import pacing_fraction
from fibecfed.device_store import state_to_payload
from fibecfed.masks import base_key
from fibecfed.simulator import CHECKPOINT, Simulation, read_device_states
from tests.conftest import tiny_run_overrides


def _run(model_dir, out, extra=(), rounds=2):
    config = load_config(None, tiny_run_overrides(model_dir, rounds) + list(extra))
    summary = Simulation(config, out).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checkpoint = torch.load(out / CHECKPOINT, weights_only=False)
    # Every device's latest state (device files + the last checkpoint's), as plain dicts.
    checkpoint["device_states"] = {d: state_to_payload(s) for d, s in read_device_states(out).items()}
    return summary, rows, checkpoint


def test_fedavg_run_writes_outputs(tiny_encoder_dir, tmp_path):
    summary, rows, checkpoint = _run(tiny_encoder_dir, tmp_path)
    for name in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png", "adapter/adapter_model.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key in ("accuracy", "personalized_accuracy", "loss", "wall_time_s", "sim_time_s", "upload_bytes", "download_bytes"):
        assert key in rows[-1]
    # Every sampled device uploads the full adapter: 2 devices x 2 rounds.
    full = serialized_nbytes(checkpoint["global_state"])
    assert rows[1]["round_upload_bytes"] == 2 * full
    assert rows[-1]["upload_bytes"] == 4 * full
    assert rows[-1]["download_bytes"] == 4 * full
    assert rows[2]["sim_time_s"] > rows[1]["sim_time_s"] > 0
    assert summary["final_accuracy"] == rows[-1]["accuracy"]


def test_the_summary_keeps_the_last_personalised_score_any_device_answered(tiny_encoder_dir, tmp_path):
    summary, rows, checkpoint = _run(tiny_encoder_dir, tmp_path / "run")
    assert rows[1]["personalized_accuracy"] is not None and rows[2]["personalized_accuracy"] is not None
    assert summary["final_personalized_accuracy"] == rows[2]["personalized_accuracy"]
    assert summary["final_personalized_round"] == 2
    # On Flower a round's evaluation can get no answer: the summary then keeps round 1's score,
    # as `compare` does, rather than none.
    history = [*rows[:2], {**rows[2], "personalized_accuracy": None, "personalized_devices": 0}]
    config = load_config(None, tiny_run_overrides(tiny_encoder_dir, 2))
    again = sim_module.write_run_outputs(config, tmp_path / "again", sim_module.prepare(config),
                                         checkpoint["global_state"], history)
    assert again["final_personalized_accuracy"] == rows[1]["personalized_accuracy"]
    assert again["final_personalized_round"] == 1


def test_a_finished_run_started_again_does_nothing_and_keeps_its_files(tiny_encoder_dir, tmp_path):
    summary, rows, _ = _run(tiny_encoder_dir, tmp_path)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    adapter = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    again, rows_again, _ = _run(tiny_encoder_dir, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics and rows_again == rows
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert again["final_accuracy"] == summary["final_accuracy"] and again["rounds"] == 2


def test_adapter_loads_with_peft(tiny_encoder_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    _, _, checkpoint = _run(tiny_encoder_dir, tmp_path, rounds=1)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_encoder_dir, num_labels=3, ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(model)
    for key, value in checkpoint["global_state"].items():
        assert torch.equal(loaded[key], value), key


def test_fibecfed_with_every_switch_off_is_fedavg(tiny_encoder_dir, tmp_path):
    off = ["method.curriculum.enabled=false", "method.layers.enabled=false", "method.sparse.enabled=false"]
    _, rows_a, ck_a = _run(tiny_encoder_dir, tmp_path / "fedavg", ["method=fedavg"])
    _, rows_b, ck_b = _run(tiny_encoder_dir, tmp_path / "fibecfed", ["method=fibecfed", *off])
    for key in ck_a["global_state"]:
        assert torch.equal(ck_a["global_state"][key], ck_b["global_state"][key]), key
    assert [r["accuracy"] for r in rows_a] == [r["accuracy"] for r in rows_b]
    assert [r["upload_bytes"] for r in rows_a] == [r["upload_bytes"] for r in rows_b]


def test_fibecfed_exchanges_only_selected_layers(tiny_encoder_dir, tmp_path):
    _, fedavg_rows, fedavg_ck = _run(tiny_encoder_dir, tmp_path / "a", ["method=fedavg"], rounds=3)
    _, rows, ck = _run(tiny_encoder_dir, tmp_path / "b", ["method=fibecfed", "method.layers.share=0.5"], rounds=3)
    # Round 1 is the warm-up (method.layers.select_after=1): only the head travels, every layer
    # trains on the device, and the devices probe their trained models at its end.
    assert rows[1]["aggregated_layers"] is None and rows[1]["layer_scores"] is not None
    head_bytes = sum(c[2] for c in rows[1]["device_costs"])
    assert head_bytes < 0.2 * fedavg_rows[1]["round_upload_bytes"]
    layers = rows[2]["aggregated_layers"]
    assert len(layers) == 2 and rows[3]["aggregated_layers"] == layers  # half of the 4 layers
    # The server's choice is the top half of the scores it reports.
    scores = rows[1]["layer_scores"]
    assert layers == sorted(sorted(range(4), key=lambda i: -scores[i])[:2])
    # Keys of non-aggregated layers never change on the server.
    for key, value in ck["global_state"].items():
        layer = layer_of_key(key)
        if layer is not None and layer not in layers and ".lora_B." in key:
            assert torch.count_nonzero(value) == 0, key  # LoRA B starts at zero and was never aggregated
    # ... and stay on the devices, personalised.
    personal = [s["personal"] for s in ck["device_states"].values()]
    assert all(personal)
    # A device that trained after the warm-up keeps a Fisher momentum over exactly the LoRA
    # entries of the layers that are not aggregated.
    local = {k for k in ck["global_state"] if layer_of_key(k) is not None and layer_of_key(k) not in layers}
    after_warmup = {d for r in rows[2:] for d in r["devices"]}
    for device, state in ck["device_states"].items():
        assert len(state["extra"]["scores"]) > 0
        if device in after_warmup:
            assert {base_key(k) for k in state["extra"]["fisher"]} == local
    # Uploads carry only the selected layers (+ head): fewer bytes than FedAvg, every round.
    for a, b in zip(fedavg_rows[2:], rows[2:]):
        assert b["round_upload_bytes"] < 0.7 * a["round_upload_bytes"]
    assert rows[-1]["bytes_saved_vs_fedavg"] > 0
    # The curriculum share follows the pacing function (every device uses the same g(t)).
    for r in rows[1:]:
        assert r["curriculum_fraction"] == pytest.approx(pacing_fraction("linear", r["round"], 3))


def test_killed_run_resumes_to_the_same_result(tiny_encoder_dir, tmp_path, monkeypatch):
    _, rows_full, ck_full = _run(tiny_encoder_dir, tmp_path / "full", ["method=fibecfed"], rounds=3)

    original = server_module.sample_devices

    def crash_in_round_3(seed, round_num, num_devices, per_round):
        if round_num == 3:
            raise KeyboardInterrupt
        return original(seed, round_num, num_devices, per_round)

    monkeypatch.setattr(server_module, "sample_devices", crash_in_round_3)
    config = load_config(None, tiny_run_overrides(tiny_encoder_dir, 3) + ["method=fibecfed"])
    with pytest.raises(KeyboardInterrupt):
        Simulation(config, tmp_path / "killed").run()
    assert torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=False)["round"] == 2
    monkeypatch.setattr(server_module, "sample_devices", original)
    _, rows, ck = _run(tiny_encoder_dir, tmp_path / "killed", ["method=fibecfed"], rounds=3)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for key in ck_full["global_state"]:
        assert torch.equal(ck_full["global_state"][key], ck["global_state"][key]), key
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in rows_full]


def test_resume_refuses_a_different_config(tiny_encoder_dir, tmp_path):
    from fibecfed.errors import ConfigError

    _run(tiny_encoder_dir, tmp_path, rounds=1)
    config = load_config(None, tiny_run_overrides(tiny_encoder_dir, 1) + ["train.lr=0.5"])
    with pytest.raises(ConfigError, match="different config"):
        Simulation(config, tmp_path).run()


def test_nan_update_is_dropped(tiny_encoder_dir, tmp_path, monkeypatch):
    original = sim_module.device_round

    def poisoned(*args, **kwargs):
        update = original(*args, **kwargs)
        if update.device == 0 or args[1] == 0:
            key = next(iter(update.state))
            update.state[key] = torch.full_like(update.state[key], float("nan"))
        return update

    monkeypatch.setattr(sim_module, "device_round", poisoned)
    _, rows, ck = _run(tiny_encoder_dir, tmp_path, ["partition.num_devices=2"], rounds=2)
    assert all(r["failed_devices"] == [0] for r in rows[1:])
    assert all(torch.isfinite(v).all() for v in ck["global_state"].values())


def test_failed_device_keeps_its_previous_state(tiny_encoder_dir, tmp_path, monkeypatch):
    import fibecfed.federated as federated
    from fibecfed.training import NonFiniteLossError

    original = federated.local_train
    calls = {"n": 0}

    def fail_first(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the first device of round 1, after it scored its data
            raise NonFiniteLossError("loss became nan")
        return original(*args, **kwargs)

    monkeypatch.setattr(federated, "local_train", fail_first)
    _, rows, ck = _run(tiny_encoder_dir, tmp_path, ["method=fibecfed", "partition.num_devices=2"], rounds=1)
    failed = rows[1]["failed_devices"]
    assert len(failed) == 1
    # It never completed a round: it has no state at all.
    assert failed[0] not in ck["device_states"]


@pytest.mark.parametrize("head", ["verbalizer", "classifier"])
def test_decoder_heads_run_fibecfed(tiny_decoder_dir, tmp_path, head):
    _, rows, ck = _run(tiny_decoder_dir, tmp_path, ["method=fibecfed", "method.layers.share=0.5", f"model.head={head}"], rounds=2)
    assert len(rows[2]["aggregated_layers"]) == 2
    keys = list(ck["global_state"])
    assert all(".layers." in k for k in keys if ".lora_" in k)
    has_head = any(k.endswith("score.weight") for k in keys)
    assert has_head == (head == "classifier")  # the verbalizer adds no parameters


def test_config_comparison_ignores_keys_a_run_predates():
    from fibecfed.simulator import same_config

    assert same_config({"a": 1, "m": {"x": 2}}, {"a": 1, "m": {"x": 2, "new": False}})
    assert not same_config({"a": 1, "m": {"x": 2}}, {"a": 1, "m": {"x": 3, "new": False}})
    assert not same_config({"a": 1, "gone": 0}, {"a": 1})
    # A key the saved run predates counts only at its default: the old run ran as if it were.
    defaults = {"a": 0, "m": {"x": 0, "new": False}}
    assert same_config({"a": 1, "m": {"x": 2}}, {"a": 1, "m": {"x": 2, "new": False}}, defaults)
    assert not same_config({"a": 1, "m": {"x": 2}}, {"a": 1, "m": {"x": 2, "new": True}}, defaults)


def test_resume_refuses_a_run_made_before_a_switch_that_is_now_on(tiny_decoder_dir, tmp_path):
    from fibecfed.errors import ConfigError

    _run(tiny_decoder_dir, tmp_path, ["model.head=verbalizer"], rounds=1)
    saved = json.loads((tmp_path / "config.json").read_text())
    checkpoint = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    # As if the run predated model.train_label_words.
    del checkpoint["config"]["model"]["train_label_words"]
    torch.save(checkpoint, tmp_path / CHECKPOINT)
    assert "train_label_words" in saved["model"]
    with pytest.raises(ConfigError, match="different config"):
        _run(tiny_decoder_dir, tmp_path, ["model.head=verbalizer", "model.train_label_words=true"], rounds=1)
    _, rows, _ = _run(tiny_decoder_dir, tmp_path, ["model.head=verbalizer"], rounds=1)  # at its default: the same run
    assert [r["round"] for r in rows] == [0, 1]


@pytest.mark.parametrize("wrt", ["embeddings", "logits", "head", "adapters"])
def test_fibecfed_scores_difficulty_with_each_target(tiny_encoder_dir, tmp_path, wrt):
    extra = ["method=fibecfed", f"method.curriculum.score_wrt={wrt}", "method.curriculum.score_at=first_participation",
             "method.layers.select_after=0"]
    _, rows, ck = _run(tiny_encoder_dir, tmp_path, extra, rounds=2)
    assert rows[1]["curriculum_fraction"] < 1.0 and rows[1]["scoring_seconds"] > 0
    trained = [s for s in ck["device_states"].values() if s["participations"]]
    assert trained
    for state in trained:
        scores = state["extra"]["scores"]
        assert scores.dim() == 1 and len(scores) > 0 and bool(scores.ge(0).all())
        # The first Fisher of the sparse update comes from the scoring pass (adapters) or from
        # the first training step (the others): no device trains personal layers without one.
        assert state["extra"]["fisher"]


def test_personalized_evaluation_pools_every_devices_own_model(tiny_encoder_dir):
    """Two devices with personal layers and one without: each is scored with its own model on its
    own test indices, and the accuracy is of the pooled predictions (not a mean of means)."""
    from fibecfed.evaluation import classification_metrics
    from fibecfed.simulator import personalized_metrics, prepare

    config = load_config(None, tiny_run_overrides(tiny_encoder_dir) + ["partition.num_devices=3"])
    prepared = prepare(config)
    runner, test = prepared.runner, prepared.test
    global_state = runner.state()
    generator = torch.Generator().manual_seed(1)
    personal = {}
    for device in (0, 2):  # device 1 never trained: it uses the global model
        personal[device] = {
            k: torch.randn(v.shape, generator=generator) for k, v in global_state.items() if layer_of_key(k) in (0, 1)
        }
    parts = [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9]]
    correct, total = 0, 0
    preds_all, labels_all = [], []
    for device, part in enumerate(parts):
        runner.load_state(global_state)
        if device in personal:
            runner.load_state(personal[device], strict=False)
        logits = runner.logits(runner.batch(test, part))
        preds = logits.argmax(dim=-1)
        labels = test.labels[part]
        correct += int((preds == labels).sum())
        total += len(part)
        preds_all.append(preds)
        labels_all.append(labels)
    pooled = personalized_metrics(runner, test, parts, global_state, personal, 4, 3)
    assert pooled["accuracy"] == pytest.approx(correct / total)
    assert {k: v for k, v in pooled.items() if k != "devices"} == pytest.approx(
        classification_metrics(torch.cat(preds_all), torch.cat(labels_all), 3))
    assert pooled["devices"] == 3  # how many devices' test parts went into the pool
    # A device with no test part adds nothing to the pool and is not counted.
    assert personalized_metrics(runner, test, [[0, 1], [], [2]], global_state, personal, 4, 3)["devices"] == 2
    # The runner is left with the global state.
    assert all(torch.equal(v, global_state[k]) for k, v in runner.state().items())


def test_round_steps_follow_the_pool():
    from fibecfed.federated import LocalTrainSettings, round_steps

    steps = LocalTrainSettings(lr=1, head_lr=None, weight_decay=0, batch_size=16, local_steps=4, local_epochs=None,
                               max_grad_norm=None, eval_batch_size=8)
    epochs = LocalTrainSettings(lr=1, head_lr=None, weight_decay=0, batch_size=16, local_steps=None, local_epochs=1.0,
                                max_grad_norm=None, eval_batch_size=8)
    assert round_steps(100, 0.2, steps, scale_steps=True) == 1  # ceil(4 * 0.2)
    assert round_steps(100, 0.6, steps, scale_steps=True) == 3  # ceil(2.4)
    assert round_steps(100, 0.2, steps, scale_steps=False) == 4
    assert round_steps(20, 0.2, epochs, scale_steps=True) == 2  # one epoch over a pool of 20: ceil(20/16)


def test_background_scoring_delays_only_what_did_not_fit(tiny_encoder_dir, tmp_path):
    """Init-phase scoring runs from the start of the run: a device first sampled later only adds
    the part of it that was not done by then. The round's time is recomputed from its costs."""
    from fibecfed.accounting import simulated_round_seconds

    _, rows, _ = _run(tiny_encoder_dir, tmp_path, ["method=fibecfed", "federation.rounds=3",
                                                   "method.curriculum.first_round_pool=scored"], rounds=3)
    elapsed = 0.0
    for row in rows[1:]:
        costs = row["device_costs"]
        assert len(costs) == len(row["devices"])
        expected = simulated_round_seconds(
            [c + max(0.0, bg - elapsed) for c, _, _, bg in costs], [d for _, d, _, _ in costs], [u for _, _, u, _ in costs], 10.0
        )
        assert row["sim_time_s"] == pytest.approx(elapsed + expected, abs=2e-3)
        elapsed = row["sim_time_s"]
    assert rows[1]["device_costs"][0][3] > 0  # round 1's devices scored in the initialisation phase


def test_round_one_does_not_wait_with_a_random_first_pool(tiny_encoder_dir, tmp_path):
    """first_round_pool=random, end to end (the device files carry when the scores were done):
    round 1 charges no wait, and a round-1 device sampled again carries its round-1 compute plus
    its scoring, which the round's time takes only in part or not at all."""
    from fibecfed.accounting import simulated_round_seconds

    extra = ["method=fibecfed", "partition.num_devices=3"]  # first_round_pool=random, the default
    _, rows, _ = _run(tiny_encoder_dir, tmp_path, extra, rounds=3)
    assert all(cost[3] == 0.0 for cost in rows[1]["device_costs"])
    elapsed, again = 0.0, 0
    for row in rows[1:]:
        costs = row["device_costs"]
        expected = simulated_round_seconds(
            [c + max(0.0, bg - elapsed) for c, _, _, bg in costs], [d for _, d, _, _ in costs], [u for _, _, u, _ in costs], 10.0
        )
        assert row["sim_time_s"] == pytest.approx(elapsed + expected, abs=2e-3)
        if row["round"] > 1:
            for device, cost in zip(row["devices"], costs):
                if device in rows[1]["devices"] and not any(device in r["devices"] for r in rows[2:row["round"]]):
                    round_one = rows[1]["device_costs"][rows[1]["devices"].index(device)][0]
                    assert cost[3] > round_one  # its round-1 compute plus the scoring after it
                    again += 1
        elapsed = row["sim_time_s"]
    assert again > 0  # with 2 of 3 devices a round, some round-1 device comes back


def test_personal_layers_below_the_aggregated_one_train_every_kth_participation(tiny_encoder_dir):
    """method.sparse.every=2 with layer 2 aggregated: on a device's second participation layers
    0 and 1 stay as they were (no backward reaches them), layer 3 (above) trains on its masked
    rows only, layer 2 and the head train densely."""
    import copy

    from fibecfed.federated import DeviceState, device_round
    from fibecfed.layers import aggregation_keys
    from fibecfed.server import sparse_settings
    from fibecfed.simulator import curriculum_settings, prepare, train_settings

    config = load_config(None, tiny_run_overrides(tiny_encoder_dir) + ["method=fibecfed", "method.sparse.every=2"])
    prepared = prepare(config)
    runner = prepared.runner
    initial = runner.state()
    exchanged = aggregation_keys(runner.keys, [2])
    state = DeviceState()
    args = (prepared.train, prepared.train_parts[0], train_settings(config))
    kwargs = dict(exchanged_keys=exchanged, curriculum=curriculum_settings(config), sparse=sparse_settings(config), initial_state=initial)
    first = device_round(runner, 0, 2, 0, initial, state, *args, **kwargs)
    assert first.trained_personal
    personal_before = copy.deepcopy(state.personal)
    fisher = state.extra["fisher"]
    second = device_round(runner, 0, 3, 0, initial, state, *args, **kwargs)
    assert not second.trained_personal
    for key, before in personal_before.items():
        after = state.personal[key]
        if layer_of_key(key) in (0, 1):
            assert torch.equal(before, after), key
        else:  # layer 3: only the rows of the mask built from the Fisher kept after the first round
            from fibecfed.federated import masks_from_fisher

            mask = masks_from_fisher(fisher, {key: before.shape}, sparse_settings(config))[key]
            changed = (before != after).any(dim=1)
            assert bool(changed.any()), key
            assert not bool((changed & ~mask[:, 0]).any()), key
    # The Fisher of the frozen layers is kept for their next training round.
    assert set(state.extra["fisher"]) == set(fisher)
    for key in exchanged:
        assert not torch.equal(second.state[key], initial[key]) or ".lora_B." not in key


def test_refreshed_layers_rows_and_personal_state(tiny_encoder_dir, tmp_path):
    """Refresh every 2 rounds: each row reports the layers that round aggregated, the choice of a
    probing round holds from the next one, and every device keeps personal values of exactly the
    layers that were not aggregated in its last round."""
    extra = ["method=fibecfed", "method.layers.share=0.5", "method.layers.refresh_every=2", "partition.num_devices=4"]
    _, rows, ck = _run(tiny_encoder_dir, tmp_path, extra, rounds=6)
    assert rows[1]["aggregated_layers"] is None  # the warm-up round
    probing = [r["round"] for r in rows[1:] if r.get("layer_scores") is not None]
    assert probing == [1, 3, 5]  # the warm-up, then every 2 rounds of a choice
    for r in probing[:-1]:
        scores = rows[r]["layer_scores"]
        chosen = sorted(sorted(range(4), key=lambda i: (-scores[i], i))[:2])
        assert rows[r + 1]["aggregated_layers"] == chosen and rows[r + 2]["aggregated_layers"] == chosen
    last_round = {}
    for r in rows[1:]:
        for d in r["devices"]:
            last_round[d] = r["aggregated_layers"]
    for device, state in ck["device_states"].items():
        layers = last_round[int(device)] or []
        expected = {k for k in ck["global_state"] if layer_of_key(k) is not None and layer_of_key(k) not in layers}
        assert set(state["personal"]) == expected, device


def test_a_layer_that_joins_starts_from_the_devices_own_values(tiny_encoder_dir):
    import copy

    from fibecfed.federated import DeviceState, LocalTrainSettings, device_round
    from fibecfed.layers import aggregation_keys
    from fibecfed.simulator import prepare

    config = load_config(None, tiny_run_overrides(tiny_encoder_dir))
    prepared = prepare(config)
    runner = prepared.runner
    initial = runner.state()
    frozen = LocalTrainSettings(lr=1e-30, head_lr=1e-30, weight_decay=0, batch_size=8, local_steps=1, local_epochs=None,
                                max_grad_norm=None, eval_batch_size=8)
    state = DeviceState()
    mine = {k: v + 0.5 for k, v in initial.items() if layer_of_key(k) == 2}
    state.personal = copy.deepcopy(mine)
    exchanged = aggregation_keys(runner.keys, [2])
    joined = device_round(runner, 0, 2, 0, initial, copy.deepcopy(state), prepared.train, prepared.train_parts[0], frozen,
                          exchanged_keys=exchanged, own_start_keys=exchanged)
    plain = device_round(runner, 0, 2, 0, initial, copy.deepcopy(state), prepared.train, prepared.train_parts[0], frozen,
                         exchanged_keys=exchanged)
    for key, value in mine.items():
        assert torch.allclose(joined.state[key], value)  # started from its own copy
        assert torch.allclose(plain.state[key], initial[key])  # started from the global value


def test_online_refresh_rescores_exactly_the_trained_samples(tiny_encoder_dir):
    """The initialisation phase scores with the initial model; the round trains from another
    (global) state, and each trained sample's score becomes its head Fisher trace in that step's
    forward pass (one step: the global model's), on the same scale; the others keep their
    initial scores. The body's dropouts are off; the classifier's dropout is on at p = 0.5, and
    the refreshed score must still be the eval-mode one: it is taken before that dropout."""
    import dataclasses

    import numpy as np

    from fibecfed.federated import DeviceState, LocalTrainSettings, curriculum_round_pool, device_round, difficulty_of_device
    from fibecfed.simulator import curriculum_settings, prepare
    from fibecfed.training import sample_batches

    for normalize in (False, True):
        config = load_config(None, tiny_run_overrides(tiny_encoder_dir) + [
            "method=fibecfed", f"method.curriculum.normalize_by_length={str(normalize).lower()}"])
        prepared = prepare(config)
        runner = prepared.runner
        for name, module in runner.loaded.model.named_modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.5 if name == "base_model.model.dropout" else 0.0  # BERT's classifier dropout
        assert runner.loaded.model.base_model.model.dropout.p == 0.5
        initial = runner.state()
        moved = {k: v * 3.0 if ".lora_" not in k else v for k, v in initial.items()}  # a trained head
        curriculum = dataclasses.replace(curriculum_settings(config), score_samples=None)
        assert curriculum.online_refresh and curriculum.score_wrt == "head"
        settings = LocalTrainSettings(lr=1e-3, head_lr=1e-3, weight_decay=0, batch_size=8, local_steps=1, local_epochs=None,
                                      max_grad_norm=None, eval_batch_size=8)
        indices = prepared.train_parts[0]
        runner.load_state(moved)
        by_global, _ = difficulty_of_device(runner, prepared.train, indices, curriculum)
        runner.load_state(initial)
        by_initial, _ = difficulty_of_device(runner, prepared.train, indices, curriculum)
        state = DeviceState()
        device_round(runner, 0, 9, 0, moved, state, prepared.train, indices, settings, curriculum=curriculum, initial_state=initial)
        # The round's one batch, drawn as device_round draws it.
        rng = np.random.default_rng([0, 9, 0, 1])
        pool, _ = curriculum_round_pool(runner, prepared.train, indices, DeviceState(extra={"scores": by_initial.clone(), "scored_round": 0}),
                                        9, curriculum, rng, 0, 0)
        batch = set(sample_batches(pool, 8, 1, rng)[0])
        after = state.extra["scores"]
        for i, index in enumerate(indices):
            expected = by_global[i] if index in batch else by_initial[i]
            assert torch.isclose(after[i], expected, rtol=1e-4), (normalize, index)
        assert batch and not torch.allclose(by_global, by_initial)


def test_resume_refuses_a_run_whose_data_file_changed(tiny_encoder_dir, tmp_path):
    """Same config, edited data file: the checkpoint's data fingerprint no longer matches, so the
    run is refused instead of going on (or crashing on a head of another shape) with other data."""
    from fibecfed.errors import ConfigError

    data = tmp_path / "train.tsv"
    rows = "".join(f"sentence number {i} is {'good' if i % 2 else 'bad'}\t{'pos' if i % 2 else 'neg'}\n" for i in range(40))
    data.write_text("text\tlabel\n" + rows)
    extra = ["data.name=files", f"data.train_file={data}", "partition.num_devices=2"]
    _run(tiny_encoder_dir, tmp_path / "run", extra, rounds=1)
    _run(tiny_encoder_dir, tmp_path / "run", extra, rounds=1)  # the same data: the finished run, again
    data.write_text("text\tlabel\n" + rows + "one more sentence\tpos\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"holds a run on other data: the data files, the model's tokenizer, the prompt or the partition \(which another numpy may draw differently\) changed since it started, under the same config; use another --out, or start over: --fresh"):
        _run(tiny_encoder_dir, tmp_path / "run", extra, rounds=1)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_a_fresh_run_replaces_the_checkpoint_only_once_its_model_loaded(tiny_encoder_dir, tmp_path, monkeypatch):
    _run(tiny_encoder_dir, tmp_path, rounds=1)
    old = torch.load(tmp_path / CHECKPOINT, weights_only=False)

    def fails(config):
        raise RuntimeError("the model does not load")

    with monkeypatch.context() as patch:
        patch.setattr(sim_module, "prepare", fails)
        with pytest.raises(RuntimeError, match="does not load"):
            Simulation(load_config(None, tiny_run_overrides(tiny_encoder_dir, 1) + ["train.lr=0.5"]), tmp_path, resume=False).run()
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["config"] == old["config"]
    assert json.loads((tmp_path / "config.json").read_text()) == old["config"]
    Simulation(load_config(None, tiny_run_overrides(tiny_encoder_dir, 1) + ["train.lr=0.5"]), tmp_path, resume=False).run()
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["config"]["train"]["lr"] == 0.5


def test_config_differences_name_the_keys():
    from fibecfed.simulator import config_differences

    saved = {"a": 1, "m": {"x": 2, "y": 3}, "gone": 0}
    assert config_differences(saved, {"a": 1, "m": {"x": 5, "y": 3, "new": True}}, {"a": 0, "m": {"x": 0, "y": 0, "new": False}}) == [
        "m.x", "m.new", "gone"]
    assert config_differences(saved, {"a": 1, "m": {"x": 2, "y": 3}, "gone": 0}) == []


def test_a_device_whose_layer_probe_raises_is_left_out_of_the_choice(monkeypatch):
    # As on Flower: one device's probe failing must not end the run; every device's failing is a bug.
    from types import SimpleNamespace

    from fibecfed.federated import ProbeSettings
    from fibecfed.server import LayerProbe, ProbeRequest

    broken: set[int] = {1}

    def probe_device(config, prepared, device, round_num, global_state, settings):
        if device in broken:
            raise OSError(f"device {device}: disk gone")
        return LayerProbe(torch.ones(2), seconds=0.1, num_samples=5)

    monkeypatch.setattr(sim_module, "probe_device", probe_device)
    simulation = SimpleNamespace(config=None)
    request = ProbeRequest(1, [0, 1, 2], ProbeSettings())
    assert sorted(sim_module.Simulation._probe_global_model(simulation, None, {}, request)) == [0, 2]
    broken.update({0, 2})
    with pytest.raises(OSError, match="device 0: disk gone"):
        sim_module.Simulation._probe_global_model(simulation, None, {}, request)


def test_round_one_trains_on_a_random_pool_and_scores_afterwards(tiny_encoder_dir, monkeypatch):
    """method.curriculum.first_round_pool=random: a device of round 1 does not wait for its
    initialisation phase. It trains on a random pool of the round's size, not the easiest share;
    it scores after training (the same scores: they come from the initial model), and its next
    participation carries when those were done: its round-1 compute plus the scoring, in seconds
    from the start of the run. A fake clock: training costs 0 s, the scoring 5 s."""
    import numpy as np

    import fibecfed.federated as federated
    from fibecfed.curriculum import class_balanced_pool
    from fibecfed.federated import DeviceState, device_round, random_round_pool
    from fibecfed.simulator import curriculum_settings, prepare, train_settings

    common = tiny_run_overrides(tiny_encoder_dir, 4) + ["method=fibecfed", "method.layers.enabled=false", "method.sparse.enabled=false"]
    config = load_config(None, common)  # first_round_pool=random, the default
    waits = curriculum_settings(load_config(None, common + ["method.curriculum.first_round_pool=scored"]))
    prepared = prepare(config)
    runner, initial = prepared.runner, prepared.runner.state()
    part, labels = list(prepared.train_parts[0]), prepared.train.labels[list(prepared.train_parts[0])].tolist()
    now = [0.0]
    scoring = federated.initial_difficulty
    pure = DeviceState()
    scoring(runner, prepared.train, part, pure, initial, waits, 0, 0)  # the scores, untouched by training

    def slow_scoring(*args, **kwargs):
        now[0] += 5.0
        return scoring(*args, **kwargs)

    monkeypatch.setattr(federated, "initial_difficulty", slow_scoring)
    args = (prepared.train, part, train_settings(config))
    kwargs = dict(curriculum=curriculum_settings(config), initial_state=initial, clock=lambda: now[0])

    waited = device_round(runner, 0, 1, 0, initial, DeviceState(), *args, **{**kwargs, "curriculum": waits})
    assert waited.background_seconds == 5.0 and waited.compute_seconds == 0.0  # the default waits

    runner.load_state(initial)
    state = DeviceState()
    first = device_round(runner, 0, 1, 0, initial, state, *args, **kwargs)
    assert first.background_seconds == 0.0 and first.compute_seconds == 0.0
    assert state.extra["scores_due_s"] == 5.0  # 0 s of training + 5 s of scoring
    fraction = pacing_fraction("linear", 1, 4)  # 0.2 + 0.8 * 1 / 3.2 = 0.45
    random_pool = random_round_pool(prepared.train, part, 1, kwargs["curriculum"], np.random.default_rng([0, 1, 0, 7]))[0]
    easiest = class_balanced_pool(part, pure.extra["scores"], labels, fraction)
    assert first.pool_size == len(random_pool) == len(easiest)
    assert set(random_pool) != set(easiest)
    # Online refresh rewrote the scores of the samples it trained on: those of the random pool.
    changed = {i for i, a, b in zip(part, state.extra["scores"].tolist(), pure.extra["scores"].tolist()) if a != b and a == a}
    assert changed and changed <= set(random_pool)

    second = device_round(runner, 0, 2, 0, initial, state, *args, **kwargs)
    assert second.background_seconds == 5.0  # done 5 s after the start; the server charges what the run's time did not cover
    assert "scores_due_s" not in state.extra
    assert now[0] == 10.0  # each device state scored once, never again


def test_first_round_pool_random_needs_init_scoring(tiny_encoder_dir):
    from fibecfed.errors import ConfigError

    # Left unset it follows score_at: random with the initialisation phase, scored without one.
    assert load_config(None, ["method=fibecfed"]).method.curriculum.first_round_pool == "random"
    late = load_config(None, ["method=fibecfed", "method.curriculum.score_at=first_participation"])
    assert late.method.curriculum.first_round_pool == "scored"

    with pytest.raises(ConfigError, match="first_round_pool=random .* needs method.curriculum.score_at=init"):
        load_config(None, tiny_run_overrides(tiny_encoder_dir) + [
            "method=fibecfed", "method.curriculum.first_round_pool=random", "method.curriculum.score_at=first_participation"])


def test_saved_configs_that_predate_a_changed_default_and_parts_that_are_off(tiny_encoder_dir):
    """A run saved before method.curriculum.first_round_pool existed ran with "scored", not with
    today's default; a method part that is off in both configs (FedAvg's curriculum) does not
    make two runs differ."""
    from fibecfed.config import config_to_dict
    from fibecfed.simulator import saved_config_differences

    fib = load_config(None, tiny_run_overrides(tiny_encoder_dir) + ["method=fibecfed"])
    old = config_to_dict(fib)
    del old["method"]["curriculum"]["first_round_pool"]
    assert saved_config_differences(old, fib) == ["method.curriculum.first_round_pool"]
    scored = load_config(None, tiny_run_overrides(tiny_encoder_dir) + ["method=fibecfed", "method.curriculum.first_round_pool=scored"])
    assert saved_config_differences(old, scored) == []

    avg = load_config(None, tiny_run_overrides(tiny_encoder_dir))
    saved = config_to_dict(avg)
    saved["method"]["curriculum"]["first_round_pool"] = "scored"
    saved["method"]["sparse"]["share"] = 0.5
    assert saved_config_differences(saved, avg) == []  # FedAvg: curriculum and sparse update off
    saved["method"]["curriculum"]["score_batch_size"] = 8  # the sparse update's probe reads it even so
    assert saved_config_differences(saved, avg) == ["method.curriculum.score_batch_size"]
    saved["method"]["curriculum"]["score_batch_size"] = avg.method.curriculum.score_batch_size
    saved["method"]["curriculum"]["enabled"] = True  # on in one of them: every key counts again
    assert saved_config_differences(saved, avg) == ["method.curriculum.enabled", "method.curriculum.first_round_pool"]
