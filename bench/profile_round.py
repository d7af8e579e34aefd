"""Where a device round's compute goes: FibecFed's pieces against FedAvg's local epoch.

    python bench/profile_round.py --dataset sst2 [--devices 0,1,2] [--repeats 3]

Each piece runs on the same device's real data with the bench preset's model and settings, timed
as process CPU time (the clock behind the simulated federated time), and the table gives the
median over devices x repeats in seconds and as a share of FedAvg's round:

- fedavg round: one local epoch over all the device's data, every layer exchanged.
- fibecfed first round: scoring every sample + a 20% pool epoch + Fisher collected on the way.
- fibecfed later round: a 60% pool epoch (the middle of the pacing), Fisher collected, masks.
- the same without the sparse update (its Fisher and masks): what those cost.
- the same at 100% of the data: the round without the curriculum's saving.
- difficulty scoring alone (per-sample gradients over adapters+head), and over the class scores.
- the layer-sensitivity probe (once per run and device in round 1).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import dataset_overrides  # bench/ is on the path when run as a script

from fibecfed.adapters import layer_of_key
from fibecfed.cli import quiet_libraries
from fibecfed.config import load_config
from fibecfed.curriculum import pacing_fraction
from fibecfed.federated import DeviceState, device_layer_scores, device_round, difficulty_of_device
from fibecfed.layers import aggregation_keys
from fibecfed.simulator import curriculum_settings, prepare, sparse_settings, train_settings

REPO = Path(__file__).resolve().parents[1]


def _round_at_fraction(fraction: float, start: float, full_at: float, rounds: int) -> int:
    """The first round whose linear pacing fraction reaches `fraction`."""
    for r in range(1, rounds + 1):
        if pacing_fraction("linear", r, rounds, start_fraction=start, full_at=full_at) >= fraction - 1e-9:
            return r
    return rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--devices", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(1)
    config = load_config("bench", [*dataset_overrides(args.dataset, args.shared), "method=fibecfed", *args.overrides])
    prepared = prepare(config)
    runner, train = prepared.runner, prepared.train
    settings = train_settings(config)
    curriculum = curriculum_settings(config)
    sparse = sparse_settings(config)
    layers_cfg = config.method.layers
    num_layers = 1 + max(n for n in map(layer_of_key, runner.keys) if n is not None)
    keep = max(1, round(layers_cfg.share * num_layers))
    global_state = runner.state()
    later = _round_at_fraction(0.6, curriculum.start_fraction, curriculum.full_at, config.federation.rounds)
    full = config.federation.rounds
    clock = time.process_time

    def timed(fn) -> float:
        started = clock()
        fn()
        return clock() - started

    pieces: dict[str, list[float]] = {}
    for device in [int(d) for d in args.devices.split(",")]:
        idx = prepared.train_parts[device]
        layer_scores, _ = device_layer_scores(
            runner, train, idx, global_state, layers_cfg.probe_samples, layers_cfg.noise_scale, layers_cfg.measure,
            config.seed, 1, device, clock=clock,
        )
        chosen = sorted(torch.argsort(layer_scores, descending=True)[:keep].tolist())
        exchanged = aggregation_keys(runner.keys, chosen)
        # A device state as after its first participation: scores and Fisher in place.
        scored = DeviceState()
        device_round(runner, device, 1, config.seed, global_state, scored, train, idx, settings,
                     exchanged_keys=exchanged, curriculum=curriculum, sparse=sparse)

        by_logits = dataclasses.replace(curriculum, score_wrt="logits")

        def run(round_num, state, use_curriculum=True, use_sparse=True, keys=exchanged, cur=curriculum):
            return lambda: device_round(
                runner, device, round_num, config.seed, global_state, copy.deepcopy(state), train, idx, settings,
                exchanged_keys=keys, curriculum=cur if use_curriculum else None,
                sparse=sparse if use_sparse else None,
            )

        cases = {
            "fedavg round (all data, all layers)": run(later, DeviceState(), False, False, None),
            "fibecfed first round (scoring + 20% pool)": run(1, DeviceState()),
            "  same, difficulty over the class scores (+ a Fisher probe)": run(1, DeviceState(), cur=by_logits),
            f"fibecfed later round (round {later}, 60% pool)": run(later, scored),
            "  same, without the sparse update's Fisher and masks": run(later, scored, use_sparse=False),
            f"  same, 100% pool (round {full})": run(full, scored),
            "difficulty scoring alone (adapters + head)": lambda: difficulty_of_device(runner, train, idx, curriculum),
            "difficulty scoring alone (class scores)": lambda: difficulty_of_device(runner, train, idx, by_logits),
            "layer-sensitivity probe": lambda: device_layer_scores(
                runner, train, idx, global_state, layers_cfg.probe_samples, layers_cfg.noise_scale, layers_cfg.measure,
                config.seed, 1, device,
            ),
        }
        for _ in range(args.repeats):
            for name, fn in cases.items():
                pieces.setdefault(name, []).append(timed(fn))
        print(f"device {device}: {len(idx)} samples", file=sys.stderr, flush=True)

    base = statistics.median(pieces["fedavg round (all data, all layers)"])
    print(f"\n{args.dataset}, bench preset, process CPU seconds, median of {len(pieces[next(iter(pieces))])} "
          f"(devices {args.devices} x {args.repeats} repeats), one torch thread\n")
    print("| piece | CPU s | share of a FedAvg round |")
    print("|---|---|---|")
    for name, values in pieces.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
