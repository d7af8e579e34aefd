"""Where a device round's compute goes: FibecFed's pieces against FedAvg's local epoch.

    python bench/profile_round.py --dataset sst2 [--devices 0,1,2] [--repeats 3] [--sizes-only] [key=value ...]

Each piece runs on the same device's real data with the bench preset's model and settings (plus
any overrides), timed as process CPU time (the clock behind the simulated federated time), and
the table gives the median over devices x repeats in seconds and as a share of FedAvg's round:

- fedavg round: one local epoch over all the device's data, every layer exchanged and trained.
- fibecfed rounds at 100% and 60% of the data, with the aggregation layers that the warm-up
  round's probes of the devices' trained models chose: once with the non-aggregated layers
  training sparsely (a round where they train), once with those below the lowest aggregated
  layer frozen (the other rounds with method.sparse.every > 1: the backward stops there); and
  the mean over one cycle of `every` rounds.
- the initialisation-phase difficulty score (head Fisher, a forward pass; in the background),
  the per-sample-gradient score over adapters + head, and the layer-sensitivity probe.
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

from fibecfed.cli import quiet_libraries
from fibecfed.config import load_config
from fibecfed.curriculum import pacing_fraction
from fibecfed.federated import DeviceState, device_round, difficulty_of_device, probe_layers
from fibecfed.layers import aggregation_keys, combine_layer_scores, select_aggregation_layers
from fibecfed.server import probe_settings, sparse_settings
from fibecfed.simulator import curriculum_settings, prepare, train_settings

REPO = Path(__file__).resolve().parents[1]
FEDAVG = "fedavg round (all data, all layers)"


def _round_at_fraction(fraction: float, start: float, full_at: float, rounds: int) -> int:
    """The first round whose linear pacing fraction reaches `fraction`."""
    for r in range(1, rounds + 1):
        if pacing_fraction("linear", r, rounds, start_fraction=start, full_at=full_at) >= fraction - 1e-9:
            return r
    return rounds


def profile_parser(description: str, dataset: str = "sst2", config: str = "bench") -> argparse.ArgumentParser:
    """The options every round profile takes (this one and bench/profile_overhead.py)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=dataset)
    parser.add_argument("--config", default=config)
    parser.add_argument("--devices", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def prepare_fibecfed(args: argparse.Namespace):
    """The run config (method=fibecfed plus the overrides) and its prepared data and model, on one torch thread."""
    quiet_libraries()
    torch.set_num_threads(1)
    config = load_config(args.config, [*dataset_overrides(args.dataset, args.shared), "method=fibecfed", *args.overrides])
    return config, prepare(config)


def main(argv: list[str] | None = None) -> int:
    parser = profile_parser(__doc__)
    parser.add_argument("--sizes-only", action="store_true", help="print the devices' training samples and stop")
    args = parser.parse_args(argv)
    config, prepared = prepare_fibecfed(args)
    runner, train = prepared.runner, prepared.train
    settings = train_settings(config)
    curriculum = curriculum_settings(config)
    sparse = sparse_settings(config)
    every = sparse.every
    initial = runner.state()
    later = _round_at_fraction(0.6, curriculum.start_fraction, curriculum.full_at, config.federation.rounds)
    full = config.federation.rounds
    clock = time.process_time

    def timed(fn) -> float:
        started = clock()
        fn()
        return clock() - started

    pieces: dict[str, list[float]] = {}
    devices = [int(d) for d in args.devices.split(",")]
    sizes = ", ".join(str(len(prepared.train_parts[d])) for d in devices)
    if args.sizes_only:
        print(f"{args.dataset}, {args.config} preset: devices {args.devices} hold {sizes} training samples")
        return 0
    # The warm-up round (every layer trains locally, only the head travels); the probes of the
    # devices' trained models, combined as the server does, pick the aggregation layers.
    warmed, probes = {}, []
    for device in devices:
        idx = prepared.train_parts[device]
        warmed[device] = DeviceState()
        device_round(runner, device, 1, config.seed, initial, warmed[device], train, idx, settings,
                     exchanged_keys=aggregation_keys(runner.keys, []), curriculum=curriculum, initial_state=initial)
        probes.append(probe_layers(runner, train, idx, probe_settings(config.method.layers), config.seed, 1, device))
    combined = combine_layer_scores(probes, [len(prepared.train_parts[d]) for d in devices])
    layers = select_aggregation_layers(combined, config.method.layers.share, config.method.layers.policy)
    for device in devices:
        idx = prepared.train_parts[device]
        warm = warmed[device]
        exchanged = aggregation_keys(runner.keys, layers)
        # A device state after one FibecFed participation: scores, Fisher and personal layers in place.
        trained = copy.deepcopy(warm)
        device_round(runner, device, 2, config.seed, initial, trained, train, idx, settings,
                     exchanged_keys=exchanged, curriculum=curriculum, sparse=sparse, initial_state=initial)
        sparse_on = dataclasses.replace(sparse, every=1)
        # A round trains the personal layers when round % every == 0 (federated.device_round):
        # every=1 always does, an `every` above the run's rounds never does. (every=2, used here
        # before, froze them only in odd rounds: right for the bench preset's rounds 15 and 7,
        # wrong for the decoder preset's round 10.)
        sparse_off = dataclasses.replace(sparse, every=full + 1)
        odd = even = trained

        def run(round_num, state, sp, keys=exchanged, cur=curriculum):
            return lambda: device_round(
                runner, device, round_num, config.seed, initial, copy.deepcopy(state), train, idx, settings,
                exchanged_keys=keys, curriculum=cur, sparse=sp, initial_state=initial,
            )

        by_adapters = dataclasses.replace(curriculum, score_wrt="adapters", score_samples=None)
        by_head = dataclasses.replace(curriculum, score_wrt="head")
        cases = {
            FEDAVG: run(full, DeviceState(), None, None, None),
            f"fibecfed round {full} (100% pool), personal layers train sparsely": run(full, even, sparse_on),
            f"fibecfed round {full} (100% pool), personal layers frozen": run(full, odd, sparse_off),
            f"fibecfed round {later} (60% pool), personal layers train sparsely": run(later, even, sparse_on),
            f"fibecfed round {later} (60% pool), personal layers frozen": run(later, odd, sparse_off),
            "initialisation-phase score (head Fisher, forward only; background)": lambda: difficulty_of_device(runner, train, idx, by_head, torch_rng()),
            "difficulty score over adapters + head (per-sample gradients)": lambda: difficulty_of_device(runner, train, idx, by_adapters),
            "layer-sensitivity probe": lambda: probe_layers(runner, train, idx, probe_settings(config.method.layers), config.seed, 1, device),
        }
        for _ in range(args.repeats):
            for name, fn in cases.items():
                pieces.setdefault(name, []).append(timed(fn))
        print(f"device {device}: {len(idx)} samples", file=sys.stderr, flush=True)

    base = statistics.median(pieces[FEDAVG])
    medians = {name: statistics.median(values) for name, values in pieces.items()}
    on = medians[f"fibecfed round {full} (100% pool), personal layers train sparsely"]
    off = medians[f"fibecfed round {full} (100% pool), personal layers frozen"]
    cycle = (on + (every - 1) * off) / every
    print(f"\n{args.dataset}, {args.config} preset {' '.join(args.overrides)}, process CPU seconds, median of "
          f"{len(pieces[FEDAVG])} (devices {args.devices} of {sizes} training samples x {args.repeats} repeats), one torch thread; "
          f"aggregation layers chosen from the devices' combined probes: {layers}\n")
    print("| piece | CPU s | share of a FedAvg round |")
    print("|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median:.2f} | {median / base:.2f} |")
    print(f"| fibecfed round at 100% pool, mean over a cycle of method.sparse.every={every} rounds | {cycle:.2f} | {cycle / base:.2f} |")
    return 0


def torch_rng():
    import numpy as np

    return np.random.default_rng(0)


if __name__ == "__main__":
    sys.exit(main())
