"""A FedAvg round of the in-process simulator leaves the global adapter at the data-size-weighted
average of what the devices uploaded, computed here by hand (tiny BERT, 400 real tweets)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from fibecfed.config import load_config
from fibecfed.federated import DeviceState, device_round
from fibecfed.simulator import Simulation, prepare, train_settings
from tests.conftest import tiny_run_overrides


def test_one_fedavg_round_is_the_weighted_average_of_the_uploads(tiny_encoder_dir, tmp_path):
    # Two devices, both sampled; Dirichlet label skew gives them different data sizes (212 and
    # 188 samples), so the weighted and the plain average differ.
    config = load_config(None, tiny_run_overrides(tiny_encoder_dir, rounds=1) + [
        "method=fedavg", "partition.num_devices=2", "federation.devices_per_round=2"])
    Simulation(config, tmp_path).run()
    global_state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")  # peft's file of the final global adapter

    # Each device's round as the simulator runs it: from the initial global state, with the run's seed.
    prepared = prepare(config)
    runner = prepared.runner
    initial = runner.state()
    assert set(global_state) == set(initial)
    uploads, sizes = [], []
    for device in (0, 1):
        part = prepared.train_parts[device]
        update = device_round(runner, device, 1, config.seed, initial, DeviceState(), prepared.train, part, train_settings(config))
        assert set(update.state) == set(initial)  # FedAvg exchanges every key
        uploads.append(update.state)
        sizes.append(len(part))
    n0, n1 = sizes
    assert n0 != n1

    differs_from_plain_mean = 0
    for key in initial:
        a, b = uploads[0][key].double(), uploads[1][key].double()
        expected = ((n0 * a + n1 * b) / (n0 + n1)).float()
        torch.testing.assert_close(global_state[key], expected, rtol=1e-6, atol=1e-9, msg=key)
        plain = ((a + b) / 2).float()
        differs_from_plain_mean += not torch.allclose(global_state[key], plain, rtol=1e-6, atol=1e-9)
    # The comparison can tell the weighted average from the plain one, and from no training.
    assert differs_from_plain_mean > len(initial) // 2
    assert all(not torch.equal(global_state[k], initial[k]) for k in initial)
