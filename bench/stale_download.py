"""How much the stale-value download changes a finished comparison's time ratios.

    python bench/stale_download.py bench/results/tweets-alone [--method fibecfed] [--reference fedavg] [--config PRESET]

Until commit ed3fd49 the in-process runtime did not count one download that Flower counts: a
device that lacks its own value of a non-exchanged key (a layer that was aggregated in its
earlier rounds, or while it had not yet taken part) downloads that key's global value when it is
no longer the initial one (`server.Server.stale_values`). This replays each run's rows (sampled
devices, failed devices, aggregated layers) to find those downloads, sizes them from the run's
checkpoint (per layer, `accounting.serialized_nbytes`), adds them to the rows' `device_costs`,
and recomputes the simulated time to the comparison's targets at the run's link speed. It prints
the time ratio to the reference method before and after, seed by seed. Runs need their
checkpoint.pt (the folders on the machine that ran them; they are not committed), or, for
committed folders without it, `--config PRESET`: the per-layer sizes then come from the run's
model and LoRA built afresh (a key's serialized size depends only on its shape and dtype, which
the run's training does not change). The comparison's own overrides are applied to the preset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fibecfed.accounting import serialized_nbytes
from fibecfed.adapters import layer_of_key
from fibecfed.compare import GLOBAL, first_reaching_index, sim_time_at_bandwidth

PERSONAL = "personalized_accuracy"


def layer_bytes(checkpoint: Path) -> dict[int, int]:
    """Serialized bytes of each layer's adapter keys, from a run's checkpoint."""
    return bytes_by_layer(torch.load(checkpoint, map_location="cpu", weights_only=False)["global_state"])


def bytes_by_layer(state: dict[str, torch.Tensor]) -> dict[int, int]:
    """Serialized bytes of each transformer layer's keys in `state` (keys outside the layers left out)."""
    layers = sorted({layer_of_key(k) for k in state} - {None})
    return {layer: serialized_nbytes({k: v for k, v in state.items() if layer_of_key(k) == layer}) for layer in layers}


def model_layer_bytes(preset: str, overrides: list[str]) -> dict[int, int]:
    """Serialized bytes of each layer's adapter keys, from the preset's model built afresh (the
    same shapes and dtypes as any checkpoint of a run of it)."""
    from fibecfed.adapters import get_state, trainable_parameters
    from fibecfed.config import load_config
    from fibecfed.models import load_model

    config = load_config(preset, overrides)
    loaded = load_model(
        config.model.name, num_labels=2, head=config.model.head, label_words=config.model.label_words or ["no", "yes"],
        lora_r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules, device="cpu", cache_dir=config.model.cache_dir,
    )
    return bytes_by_layer(get_state(trainable_parameters(loaded.model)))


def with_stale_downloads(rows: list[dict], sizes: dict[int, int]) -> tuple[list[dict], int]:
    """The rows with each device's stale-value download added to its cost; and the bytes added."""
    all_layers = set(sizes)
    held: dict[int, set[int]] = {}
    trained: set[int] = set()  # layers whose global value is no longer the initial one
    added, out = 0, []
    for row in rows:
        costs = row.get("device_costs")
        if row["round"] == 0 or costs is None:
            out.append(row)
            continue
        aggregated = set(row.get("aggregated_layers") or [])
        failed = set(row.get("failed_devices") or [])
        finished = [d for d in row["devices"] if d not in failed]
        if len(finished) != len(costs):
            raise ValueError(f"round {row['round']}: {len(costs)} costs for devices {finished}; rows with rejected updates are not replayed")
        new_costs = []
        for device, cost in zip(finished, costs):
            stale = (trained - aggregated) - held.get(device, set())
            extra = sum(sizes[layer] for layer in stale)
            added += extra
            new_costs.append([cost[0], cost[1] + extra, *cost[2:]])
        for device in finished:
            held[device] = all_layers - aggregated
        if finished:
            trained |= aggregated
        out.append({**row, "device_costs": new_costs})
    return out, added


def time_to(rows: list[dict], target: float, key: str, mbps: float) -> float | None:
    index = first_reaching_index(rows, target, key)
    series = sim_time_at_bandwidth(rows, mbps)
    return None if index is None or series is None else series[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--method", default="fibecfed")
    parser.add_argument("--reference", default="fedavg")
    parser.add_argument("--config", help="the preset the comparison ran with; sizes the layers when a run's checkpoint.pt is gone")
    args = parser.parse_args(argv)
    comparison = json.loads((args.folder / "comparison.json").read_text())
    speeds = comparison["run_bandwidth_mbps"]  # by method
    if speeds[args.method] != speeds[args.reference]:
        raise SystemExit(f"the two methods ran at different link speeds: {speeds}")
    mbps = speeds[args.method]
    targets = {"global": (comparison["target"], GLOBAL), "personalised": (comparison["personalized_target"], PERSONAL)}
    print(f"{args.folder}: {args.method} against {args.reference} at {mbps} Mbit/s\n")
    model_sizes = None
    print("| seed | score | bytes added (MB) | time ratio before | time ratio after |")
    print("|---|---|---|---|---|")
    for seed in comparison["seeds"]:
        run = args.folder / args.method / f"seed{seed}"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        reference = [json.loads(line) for line in (args.folder / args.reference / f"seed{seed}" / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if (run / "checkpoint.pt").is_file():
            sizes = layer_bytes(run / "checkpoint.pt")
        elif args.config is not None:
            if model_sizes is None:
                model_sizes = model_layer_bytes(args.config, [*comparison["overrides"], *comparison["methods"][args.method]["overrides"]])
            sizes = model_sizes
        else:
            raise SystemExit(f"{run} has no checkpoint.pt: name the preset it ran with (--config) to size its layers from the model")
        fixed, added = with_stale_downloads(rows, sizes)
        for score, (target, key) in targets.items():
            base = time_to(reference, target, key, mbps)
            before, after = time_to(rows, target, key, mbps), time_to(fixed, target, key, mbps)
            ratio = [f"{t / base:.3f}" if t is not None and base else "—" for t in (before, after)]
            print(f"| {seed} | {score} | {added / 1e6:.2f} | {ratio[0]} | {ratio[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
