"""What FibecFed's time to the target would be without two pieces of its critical path, from the
recorded costs of finished runs (no rerun):

    python bench/critical_path.py bench/results/tweets-default [more comparison folders]

A round lasts as long as its slowest device's download + compute + upload, plus what that device
still waited for its initialisation-phase scoring (the difficulty scores, run in the background
from the start of the run: it delays the devices of the first round or two). Two pieces of it
could move off the critical path:

- wait: the part of a round spent waiting for the background scoring. Without it, each device's
  fourth cost (background seconds) is dropped.
- probe: the layer-sensitivity probes after the warm-up round and at each refresh. A row records
  them summed over its devices (`probe_seconds`, runs from d74e261 on), not per device, so each
  device's compute is lowered by the row's mean (the probes run on the same number of samples on
  every device); "—" where the runs do not record them.

For each seed: FibecFed's simulated time to the target at the runs' link speed as run, with each
piece taken out, and with both, over FedAvg's time on the same seed (the target stays the
comparison's; the rounds to it do not change). An upper bound on what moving those pieces off the
critical path would save: a design that does so may cost rounds or accuracy, which this cannot see.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fibecfed.compare import (
    GLOBAL,
    PERSONAL,
    folder_name,
    first_reaching_index,
    ratio_to_reference,
    score_rows,
    sim_time_at_bandwidth,
)

Row = dict[str, Any]
Costs = list[list[float]]


def without_wait(row: Row) -> Costs:
    """The row's device costs with the background seconds dropped."""
    return [list(cost[:3]) for cost in row["device_costs"]]


def without_probe(row: Row) -> Costs | None:
    """The row's device costs with each device's compute lowered by the row's mean probe seconds;
    None when the row does not record its probes."""
    if "probe_seconds" not in row:
        return None
    costs = row["device_costs"]
    share = row["probe_seconds"] / len(costs) if costs else 0.0
    return [[max(0.0, cost[0] - share), *cost[1:]] for cost in costs]


def time_to_target(
    rows: Sequence[Row], target: float, key: str, mbps: float, edit: Callable[[Row], Costs | None] | None = None
) -> float | None:
    """Simulated time at `mbps` to the first round whose smoothed `key` reaches `target`, with each
    row's device costs replaced by `edit(row)` (None from it: the time cannot be told)."""
    index = first_reaching_index(rows, target, key)
    if index is None:
        return None
    edited = []
    for row in rows[: index + 1]:
        if edit is not None and row.get("device_costs") is not None:
            costs = edit(row)
            if costs is None:
                return None
            row = {**row, "device_costs": costs}
        edited.append(row)
    series = sim_time_at_bandwidth(edited, mbps)
    return None if series is None else series[-1]


def read_runs(folder: Path, method: str, metric: str) -> dict[int, list[Row]]:
    """{seed: metrics rows} of `method` (a comparison's label, e.g. fibecfed[key=value]) in a
    comparison folder."""
    runs = {}
    for path in sorted((folder / folder_name(method)).glob("seed*/metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs[int(path.parent.name.removeprefix("seed"))] = score_rows(rows, metric)
    return runs


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def report(folder: Path, method: str = "fibecfed", reference: str = "fedavg") -> str:
    data = json.loads((folder / "comparison.json").read_text())
    speeds = data["run_bandwidth_mbps"]  # per method
    missing = [m for m in (method, reference) if m not in speeds]
    if missing:
        raise SystemExit(f"{folder / 'comparison.json'} has no {', '.join(missing)}: make it with "
                         f"`fibecfed compare --report-only` over both methods")
    if speeds[method] != speeds[reference]:
        raise SystemExit(f"{folder}: {method} ran at {speeds[method]} Mbit/s, {reference} at {speeds[reference]}")
    mbps = speeds[method]
    ours, theirs = read_runs(folder, method, data["metric"]), read_runs(folder, reference, data["metric"])
    edits = {"as run": None, "no wait": without_wait, "no probe": without_probe,
             "neither": lambda row: without_probe({**row, "device_costs": without_wait(row)})}
    lines = [
        f"{folder.name}: {method} against {reference}, simulated time to the target at {mbps:g} Mbit/s (s), "
        f"and its ratio to {reference}'s on the same seed",
        "",
        "| score | seed | " + " | ".join(f"{name} s" for name in edits) + " | " + " | ".join(f"{name} ratio" for name in edits) + " |",
        "|---|---|" + "---|" * (2 * len(edits)),
    ]
    for score, key, target in (("global", GLOBAL, data["target"]), ("personalised", PERSONAL, data["personalized_target"])):
        seeds = sorted(set(ours) & set(theirs))
        base = [time_to_target(theirs[seed], target, key, mbps) for seed in seeds]
        times = {name: [time_to_target(ours[seed], target, key, mbps, edit) for seed in seeds] for name, edit in edits.items()}
        for i, seed in enumerate(seeds):
            row_ratios = [(t[i] / base[i] if t[i] is not None and base[i] else None) for t in times.values()]
            lines.append(f"| {score} | {seed} | " + " | ".join(_fmt(t[i]) for t in times.values()) + " | "
                         + " | ".join(_fmt(r) for r in row_ratios) + " |")
        # As `compare` does: the ratio of the means where every seed of both reached the target.
        means = [ratio_to_reference(t, base)[0] for t in times.values()]
        lines.append(f"| {score} | ratio of the means | " + " | ".join("" for _ in edits) + " | "
                     + " | ".join(_fmt(m) for m in means) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="comparison folders (with comparison.json and run folders)")
    parser.add_argument("--method", default="fibecfed", help="the comparison's label of the method to read")
    parser.add_argument("--reference", default="fedavg")
    args = parser.parse_args(argv)
    print("\n".join(report(folder, args.method, args.reference) for folder in args.folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
