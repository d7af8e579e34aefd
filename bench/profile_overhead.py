"""What a FibecFed round costs beyond its FLOPs: one piece of the device round switched off at a time.

    python bench/profile_overhead.py --config bench-decoder --dataset tweets [--layers 0,1,2,11,29] [--repeats 3]

bench/profile_round.py found a full-pool FibecFed round on the decoder 1.15-1.18 times FedAvg's
round in process CPU time, although with layer 0 aggregated both run the same forward and
backward passes. This times one device's full-pool round (the last round, every layer training,
`method.sparse.every=1`) with each of FibecFed's per-step extras removed in turn, against
FedAvg's round on the same samples, so the difference says what each extra costs:

- fibecfed: as configured (curriculum with online refresh, sparse masks, Fisher every m-th step);
- no online refresh: the loss from `runner.loss` instead of the head output and its Fisher trace;
- no Fisher collection: `fisher_every` past the round's steps, so only the first step collects
  it (the masks still come from the device's Fisher momentum);
- no sparse update: the non-aggregated layers train densely (no masks, no Fisher);
- no curriculum, no sparse: only the exchange differs from FedAvg's.

Process CPU seconds, one torch thread, median over the devices x repeats; the device states are
taken after one FibecFed participation (scores and Fisher in place).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import sys
import time

from profile_round import prepare_fibecfed, profile_parser  # bench/ is on the path when run as a script

from fibecfed.federated import DeviceState, device_round
from fibecfed.layers import aggregation_keys
from fibecfed.server import sparse_settings
from fibecfed.simulator import curriculum_settings, train_settings


def main(argv: list[str] | None = None) -> int:
    parser = profile_parser(__doc__, dataset="tweets", config="bench-decoder")
    parser.add_argument("--layers", default="0,1,2,11,29", help="the aggregated layers (default: the decoder's gain choice)")
    args = parser.parse_args(argv)
    config, prepared = prepare_fibecfed(args)
    runner, train = prepared.runner, prepared.train
    settings = train_settings(config)
    curriculum = curriculum_settings(config)
    sparse = dataclasses.replace(sparse_settings(config), every=1)
    initial = runner.state()
    exchanged = aggregation_keys(runner.keys, [int(x) for x in args.layers.split(",")])
    last = config.federation.rounds
    variants = {
        "fedavg round": dict(keys=None, cur=None, sp=None),
        "fibecfed": dict(keys=exchanged, cur=curriculum, sp=sparse),
        "fibecfed, no online refresh": dict(keys=exchanged, cur=dataclasses.replace(curriculum, online_refresh=False), sp=sparse),
        "fibecfed, Fisher at step 0 only": dict(keys=exchanged, cur=curriculum, sp=dataclasses.replace(sparse, fisher_every=10**6)),
        "fibecfed, no sparse update": dict(keys=exchanged, cur=curriculum, sp=None),
        "fibecfed, no curriculum, no sparse update": dict(keys=exchanged, cur=None, sp=None),
    }
    pieces: dict[str, list[float]] = {name: [] for name in variants}
    steps: dict[str, int] = {}
    for device in [int(d) for d in args.devices.split(",")]:
        idx = prepared.train_parts[device]
        warm = DeviceState()
        # One participation first: the difficulty scores and the Fisher momentum exist.
        device_round(runner, device, 2, config.seed, initial, warm, train, idx, settings, exchanged_keys=exchanged,
                     curriculum=curriculum, sparse=sparse, initial_state=initial)
        for _ in range(args.repeats):
            for name, v in variants.items():
                state = copy.deepcopy(warm) if v["keys"] is not None else DeviceState()
                started = time.process_time()
                update = device_round(runner, device, last, config.seed, initial, state, train, idx, settings,
                                      exchanged_keys=v["keys"], curriculum=v["cur"], sparse=v["sp"], initial_state=initial)
                pieces[name].append(time.process_time() - started)
                steps[name] = update.steps
        print(f"device {device}: {len(idx)} samples", file=sys.stderr, flush=True)
    base = statistics.median(pieces["fedavg round"])
    print(f"\n{args.dataset}, {args.config} preset {' '.join(args.overrides)}, aggregated layers {args.layers}; "
          f"process CPU seconds, median of {len(pieces['fedavg round'])} (devices {args.devices} x {args.repeats}), one torch thread\n")
    print("| round | CPU s | share of FedAvg's | local steps |")
    print("|---|---|---|---|")
    for name, values in pieces.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / base:.2f} | {steps[name]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
