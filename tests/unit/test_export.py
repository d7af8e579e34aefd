"""`fibecfed export`: each device's own model as a peft adapter. The check is end to end: the
exported adapters, loaded onto the base model with peft's PeftModel.from_pretrained, predict each
device's test part as the run's personalised evaluation did, so their pooled accuracy is the last
metrics row's personalized_accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_run_overrides
from fibecfed import cli
from fibecfed.config import load_config
from fibecfed.encoding import collate
from fibecfed.export import device_model_state, parse_devices
from fibecfed.errors import ConfigError
from fibecfed.simulator import Simulation, prepare, read_device_states


def test_device_model_state_by_hand():
    g = {"base_model.model.layers.0.q.lora_A.weight": torch.zeros(2), "base_model.model.layers.1.q.lora_A.weight": torch.zeros(2),
         "base_model.model.classifier.weight": torch.zeros(2)}
    layer0, layer1, head = list(g)
    personal = {layer0: torch.ones(2), layer1: torch.ones(2)}
    # Layer 1 aggregated in the last round: the device's own layer 0 over the global layer 1 and head.
    state = device_model_state(g, personal, [1])
    assert state[layer0] is personal[layer0] and state[layer1] is g[layer1] and state[head] is g[head]
    # No layer chosen (a warm-up round): all its layers are its own; FedAvg: it has none.
    assert device_model_state(g, personal, None)[layer1] is personal[layer1]
    assert device_model_state(g, {}, None) == g
    with pytest.raises(ValueError, match="not adapter keys"):
        device_model_state(g, {"other.weight": torch.ones(1)}, None)


def test_parse_devices():
    assert parse_devices("all", 3) == [0, 1, 2]
    assert parse_devices("2,0,2", 3) == [0, 2]
    with pytest.raises(ConfigError, match="device 3 does not exist; the run has devices 0 to 2"):
        parse_devices("3", 3)
    with pytest.raises(ConfigError, match="'x' is not a device number"):
        parse_devices("0,x", 3)


def test_exported_adapters_give_the_runs_personalised_score(tiny_encoder_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    # Half of the 4 layers aggregated from round 2 (round 1 is the warm-up); 4 devices, 2 a round.
    overrides = tiny_run_overrides(tiny_encoder_dir, 3) + ["method=fibecfed", "method.layers.share=0.5"]
    out = tmp_path / "run"
    Simulation(load_config(None, overrides), out).run()
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["aggregated_layers"] is not None and len(last["aggregated_layers"]) == 2

    assert cli.main(["export", str(out), "--out", str(tmp_path / "adapters")]) == 0
    header, *printed = capsys.readouterr().out.splitlines()
    assert header == f"each device's own model after round 3 of {out} (pooled personalised accuracy {last['personalized_accuracy']:.3f})"
    trained = read_device_states(out)
    assert len(printed) == 4 and all(line.startswith(f"device {d}: ") for d, line in enumerate(printed))
    for device, line in enumerate(printed):
        assert ("never trained" in line) == (device not in trained)

    prepared = prepare(load_config(None, overrides))
    tokenizer_pad = int(prepared.runner.loaded.tokenizer.pad_token_id)
    correct, total = 0, 0
    for device, part in enumerate(prepared.device_eval_indices):
        folder = tmp_path / "adapters" / f"device-{device}"
        saved = load_file(folder / "adapter_model.safetensors")
        own = trained[device].personal if device in trained else {}
        # Its own layer entries differ from the global adapter's, the aggregated ones are the global's.
        global_saved = load_file(out / "adapter" / "adapter_model.safetensors")
        differs = {k for k in saved if not torch.equal(saved[k], global_saved[k])}
        assert bool(differs) == bool(own)
        assert all(f".layers.{layer}." not in k and f".layer.{layer}." not in k for k in differs for layer in last["aggregated_layers"])
        base = AutoModelForSequenceClassification.from_pretrained(tiny_encoder_dir, num_labels=3, ignore_mismatched_sizes=True)
        model = PeftModel.from_pretrained(base, folder).eval()
        batch = collate(prepared.test, part, tokenizer_pad, torch.device("cpu"))
        with torch.no_grad():
            preds = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(dim=-1)
        correct += int((preds == batch["labels"]).sum())
        total += len(part)
    assert correct / total == pytest.approx(last["personalized_accuracy"], abs=1e-12)


def test_export_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path} holds no run (no checkpoint.pt): give the folder a run wrote")
