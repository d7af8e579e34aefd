"""`fibecfed export`: each device's own model from an in-process run folder, as a peft adapter.

A run's `adapter/` is the global adapter. Under FibecFed it holds the aggregated layers and the
head, with every other layer at its initial value: a model no device uses. A device's own model
is its personal layers over the global ones, the model the personalised score evaluates (and
what a real device would deploy). This writes that model for each device, in peft's format.
"""

from __future__ import annotations

import logging
import shutil
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
    round, where only the keys outside the layers travel and a device keeps every layer)."""
    exchanged = set(aggregation_keys(global_state, aggregated_layers or []))
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


def export_device_adapters(run_dir: str | Path, devices: str = "all", out_dir: str | Path | None = None) -> dict:
    """Write each listed device's own model after the run's last completed round as a peft
    adapter, `out_dir/device-<d>/` (default `run_dir/device-adapters`). Returns the round, its
    pooled personalised accuracy (None if that round was not evaluated) and, per device, its
    folder, how many entries are its own and whether it ever trained."""
    from fibecfed.device_store import DeviceStore
    from fibecfed.simulator import CHECKPOINT, DEVICES, check_same_data, checkpoint_device_states, data_fingerprint, prepare

    run_dir = Path(run_dir)
    checkpoint = outputs.load_checkpoint(run_dir / CHECKPOINT)
    if checkpoint is None:
        raise ConfigError(f"{run_dir} holds no run (no checkpoint.pt): give the folder a run wrote")
    if checkpoint.get("runtime") == "flower":
        raise ConfigError(f"{run_dir} is a run of the Flower runtime, whose nodes keep their own layers: export reads "
                          "in-process runs")
    try:
        # The config the checkpoint was made with (config.json says the same, unless edited).
        config = config_from_dict(checkpoint["config"])
    except ConfigError as exc:
        raise ConfigError(f"{run_dir} holds a run of another fibecfed version: {exc}") from None
    prepared = prepare(config)
    check_same_data(checkpoint, data_fingerprint(prepared), run_dir, "export needs the data the run trained on")
    chosen = parse_devices(devices, len(prepared.train_parts))
    # One device at a time from disk (the last round's changed devices are in the checkpoint,
    # and newer than their files if the run was killed between the two).
    store, changed = DeviceStore(run_dir / DEVICES, cache_size=0), checkpoint_device_states(checkpoint)
    last = checkpoint["history"][-1]
    out = Path(out_dir) if out_dir is not None else run_dir / "device-adapters"
    runner = prepared.runner
    written = {}
    for device in chosen:
        trained = device in changed or device in store.devices()
        personal = (changed[device] if device in changed else store.checkout(device)).personal
        state = device_model_state(checkpoint["global_state"], personal, last.get("aggregated_layers"))
        own = sum(1 for k in state if k in personal and state[k] is personal[k])
        runner.load_state(state)
        folder = out / f"device-{device}"
        shutil.rmtree(folder, ignore_errors=True)  # nothing of an earlier export left beside it
        # peft's own format, like the run's adapter/: PeftModel.from_pretrained(base_model, folder).
        runner.loaded.model.save_pretrained(folder)
        runner.loaded.tokenizer.save_pretrained(folder)
        written[device] = {"folder": folder, "own_entries": own, "trained": trained}
        logger.info("device %d: %d own entries -> %s", device, own, folder)
    return {"round": checkpoint["round"], "personalized_accuracy": last.get("personalized_accuracy"), "devices": written}
