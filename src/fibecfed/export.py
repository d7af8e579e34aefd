"""`fibecfed export`: each device's own model from an in-process run folder, as a peft adapter.

A run's `adapter/` is the global adapter. Under FibecFed it holds the aggregated layers and the
head, with every other layer at its initial value: a model no device uses. A device's own model
is its personal layers over the global ones, the model the personalised score evaluates (and
what a real device would deploy). This writes that model for each device, in peft's format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from fibecfed import outputs
from fibecfed.config import config_from_dict
from fibecfed.errors import ConfigError
from fibecfed.layers import aggregation_keys

logger = logging.getLogger(__name__)


def device_model_state(
    global_state: Mapping[str, torch.Tensor], personal: Mapping[str, torch.Tensor], aggregated_layers: Sequence[int] | None
) -> dict[str, torch.Tensor]:
    """A device's own adapter state: its personal entries of the layers that the last round did
    not aggregate, over the global state (as `Simulation._evaluate` builds it).

    `aggregated_layers`: the last round's (its metrics row's `aggregated_layers`); None when it
    aggregated no chosen layers (FedAvg, where a device keeps nothing of its own, or a warm-up
    round, where a device keeps every layer)."""
    exchanged = set(aggregation_keys(global_state, aggregated_layers)) if aggregated_layers is not None else set()
    unknown = sorted(set(personal) - set(global_state))
    if unknown:
        raise ValueError(f"personal entries {unknown[:3]} are not adapter keys of the run")
    return {**global_state, **{k: v for k, v in personal.items() if k not in exchanged}}


def parse_devices(text: str, num_devices: int) -> list[int]:
    """`all`, or comma-separated device numbers in [0, num_devices)."""
    if text.strip() == "all":
        return list(range(num_devices))
    devices = []
    for item in text.split(","):
        try:
            device = int(item)
        except ValueError:
            raise ConfigError(f"--devices: {item.strip()!r} is not a device number; write e.g. 0,3 or all") from None
        if not 0 <= device < num_devices:
            raise ConfigError(f"--devices: device {device} does not exist; the run has devices 0 to {num_devices - 1}")
        devices.append(device)
    return sorted(set(devices))


def export_device_adapters(run_dir: str | Path, devices: str = "all", out_dir: str | Path | None = None) -> dict[int, dict]:
    """Write each listed device's own model as a peft adapter, `out_dir/device-<d>/` (default
    `run_dir/device-adapters`); return, per device, its folder and how many entries are its own."""
    from fibecfed.simulator import CHECKPOINT, check_same_data, data_fingerprint, prepare, read_device_states

    run_dir = Path(run_dir)
    checkpoint = outputs.load_checkpoint(run_dir / CHECKPOINT)
    if checkpoint is None or not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} holds no run (no checkpoint.pt and config.json): give the folder a run wrote")
    if checkpoint.get("runtime") == "flower":
        raise ConfigError(f"{run_dir} is a run of the Flower runtime, whose nodes keep their own layers: export reads "
                          "in-process runs")
    config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    prepared = prepare(config)
    check_same_data(checkpoint, data_fingerprint(prepared), run_dir, "export needs the data the run trained on")
    chosen = parse_devices(devices, len(prepared.train_parts))
    states = read_device_states(run_dir)
    aggregated = checkpoint["history"][-1].get("aggregated_layers")
    out = Path(out_dir) if out_dir is not None else run_dir / "device-adapters"
    runner = prepared.runner
    written = {}
    for device in chosen:
        personal = states[device].personal if device in states else {}
        state = device_model_state(checkpoint["global_state"], personal, aggregated)
        own = sum(1 for k in state if k in personal and state[k] is personal[k])
        runner.load_state(state)
        folder = out / f"device-{device}"
        # peft's own format, like the run's adapter/: PeftModel.from_pretrained(base_model, folder).
        runner.loaded.model.save_pretrained(folder)
        runner.loaded.tokenizer.save_pretrained(folder)
        written[device] = {"folder": folder, "own_entries": own, "trained": device in states}
        logger.info("device %d: %d own entries -> %s", device, own, folder)
    return written
