"""Final scores seed by seed, from finished run folders, with the paired differences.

    python bench/finals.py bench/results/tweets-5seeds [--against bench/results/tweets-5seeds-f514cc6] [--last 5]

A comparison's table gives each method's final score as a mean and spread over seeds. With a few
seeds and label-skewed devices the final (one evaluation, after the last round) swings by up to
±0.1 from one seed to the next, for every method alike, so the spread hides whether one method
ends lower seed after seed. This prints every seed's final global and personalised score, per
method, and each method's difference to the reference (fedavg if present) on the same seed.
`--last K` reads each run's metrics instead and gives every score's mean over its last K evaluations,
which one evaluation's swing moves less. `--against` adds the runs of a second folder (e.g. the same method at an earlier commit) under
"<method>@<folder name>", paired on the seed as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

SCORES = (("final_accuracy", "global"), ("final_personalized_accuracy", "personalised"))
ROW_KEYS = {"final_accuracy": "accuracy", "final_personalized_accuracy": "personalized_accuracy"}  # in metrics.jsonl


def last_mean(rows: list[dict], key: str, last: int) -> float | None:
    """The mean of `key` over the last `last` rounds that recorded it (round 0 left out)."""
    values = [r[key] for r in rows if r.get("round", 0) > 0 and r.get(key) is not None][-last:]
    return statistics.fmean(values) if values else None


def read_finals(folder: Path, suffix: str = "", last: int | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """{method: {seed: {score key: value}}} from <folder>/<method>/seed<N>/summary.json; with
    `last`, each score is instead its mean over the run's last `last` evaluations (metrics.jsonl)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for summary in sorted(folder.glob("*/seed*/summary.json")):
        method = summary.parent.parent.name + suffix
        seed = int(summary.parent.name.removeprefix("seed"))
        if last is None:
            data = json.loads(summary.read_text())
        else:
            metrics = summary.parent / "metrics.jsonl"
            if not metrics.is_file():
                continue  # a summary without its metrics: nothing to average
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            data = {key: last_mean(rows, ROW_KEYS[key], last) for key, _ in SCORES}
        out.setdefault(method, {})[seed] = {key: data[key] for key, _ in SCORES if data.get(key) is not None}
    return out


def paired(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], key: str) -> list[float]:
    """a − b on every seed both hold a score for."""
    return [a[s][key] - b[s][key] for s in sorted(set(a) & set(b)) if key in a[s] and key in b[s]]


def spread(values: list[float]) -> float:
    """The population standard deviation, as `fibecfed compare` reports it."""
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def table(finals: dict[str, dict[int, dict[str, float]]], reference: str, last: int | None = None) -> str:
    seeds = sorted({s for runs in finals.values() for s in runs})
    lines = []
    for key, name in SCORES:
        what = f"Final {name} score" if last is None else f"Mean {name} score over the last {last} evaluations"
        lines += [f"{what}, seed by seed (difference to {reference} on the same seed in brackets):", ""]
        lines.append("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± spread | mean difference | lower on |")
        lines.append("|---" * (len(seeds) + 4) + "|")
        for method, runs in finals.items():
            cells = []
            for s in seeds:
                if s not in runs or key not in runs[s]:
                    cells.append("—")
                    continue
                value = runs[s][key]
                ref = finals.get(reference, {}).get(s, {}).get(key)
                cells.append(f"{value:.3f}" if method == reference or ref is None else f"{value:.3f} ({value - ref:+.3f})")
            values = [runs[s][key] for s in seeds if s in runs and key in runs[s]]
            diffs = [] if method == reference else paired(runs, finals.get(reference, {}), key)
            mean = f"{statistics.fmean(values):.3f} ± {spread(values):.3f}" if values else "—"
            mean_diff = f"{statistics.fmean(diffs):+.3f}" if diffs else "—"
            lower = f"{sum(d < 0 for d in diffs)} of {len(diffs)}" if diffs else "—"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean} | {mean_diff} | {lower} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--against", type=Path, help="a second comparison folder, paired on the seed")
    parser.add_argument("--reference", default=None, help="method the differences are to (default: fedavg if present)")
    parser.add_argument("--last", type=int, default=None, metavar="K",
                        help="each score's mean over the last K evaluations instead of the final one (which swings)")
    args = parser.parse_args(argv)
    if args.last is not None and args.last < 1:
        parser.error(f"--last must be >= 1, got {args.last}")
    finals = read_finals(args.folder, last=args.last)
    if args.against is not None:
        finals.update(read_finals(args.against, suffix=f"@{args.against.name}", last=args.last))
    if not finals:
        print(f"no finished runs (<method>/seed<N>/summary.json) under {args.folder}", file=sys.stderr)
        return 1
    reference = args.reference or ("fedavg" if "fedavg" in finals else next(iter(finals)))
    if reference not in finals:
        print(f"reference {reference!r} not among {', '.join(finals)}", file=sys.stderr)
        return 1
    print(table(finals, reference, args.last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
