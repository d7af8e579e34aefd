"""Reproduce BENCHMARKS.md: `fibecfed compare` on each dataset, then one report.

    python bench/benchmarks.py --datasets sst2,subj,tweets --seeds 0,1,2 --out bench/results
    python bench/benchmarks.py --datasets sst2 --seeds 0,1,2 --report-only   # rebuild a report from finished runs

Runs resume: an interrupted benchmark started again skips finished runs. The GLUE-format
datasets are read from --shared (default: ../shared/datasets from the repository root).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fibecfed.cli import quiet_libraries
from fibecfed.compare import compare, parse_methods

REPO = Path(__file__).resolve().parents[1]
# The measure each task is judged by (GLUE's): MCC for CoLA, F1 for MRPC, accuracy elsewhere.
METRICS = {"cola": "mcc", "mrpc": "f1"}
GLUE_FOLDERS = {"sst2": "sst-2", "cola": "cola", "mrpc": "mrpc", "rte": "rte", "qnli": "qnli", "subj": "subj"}
DEFAULT_METHODS = "fedavg,fedprox,fibecfed"


def dataset_overrides(name: str, shared: Path) -> list[str]:
    if name in GLUE_FOLDERS:
        return [f"data.name={name}", f"data.path={shared / GLUE_FOLDERS[name]}"]
    return [f"data.name={name}"]


def run(args: argparse.Namespace, report_only: bool = False) -> None:
    methods = parse_methods(args.methods)
    seeds = [int(s) for s in args.seeds.split(",")]
    for dataset in args.datasets.split(","):
        started = time.time()
        print(f"=== {dataset}: {args.methods}, seeds {seeds}", flush=True)
        compare(
            methods, seeds, args.out / dataset, config=args.config,
            overrides=[*dataset_overrides(dataset, args.shared), *args.overrides],
            target=args.target, target_share=args.target_share, metric=METRICS.get(dataset, "accuracy"),
            report_only=report_only,
        )
        print((args.out / dataset / "comparison.md").read_text(), flush=True)
        print(f"=== {dataset} done in {time.time() - started:.0f} s", flush=True)


def report(out: Path) -> str:
    """One section per dataset folder that holds a comparison.json."""
    sections = []
    for folder in sorted(p for p in out.iterdir() if (p / "comparison.json").is_file()):
        data = json.loads((folder / "comparison.json").read_text())
        md = (folder / "comparison.md").read_text()
        sections.append(
            f"### {folder.name}\n\nOverrides: `{' '.join(data['overrides'])}`; seeds {data['seeds']}.\n\n{md}\n"
            f"![{folder.name}]({folder.relative_to(REPO) / 'comparison.png'})\n"
        )
    return "\n".join(sections)


def _cell(entry: dict, key: str, digits: int = 3) -> str:
    value, std = entry.get(key), entry.get(key + "_std")
    if value is None:
        return "—"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def summary(out: Path, names: list[str] | None = None, fibecfed: str = "fibecfed") -> str:
    """One line per dataset and score (global, personalised): FibecFed against FedAvg.

    Final scores (mean ± spread over seeds), rounds to the target, in how many seeds FibecFed got
    there, and its time and bytes to the target over FedAvg's: simulated time at the run's link
    speed, compute-only time (the lineage's), bytes. A ratio is over every seed when every seed of
    both reached the target, else seed by seed (in brackets) where both did.
    """
    lines = [
        "| dataset | score | metric | seeds | FedAvg final | FedProx final | FibecFed final | rounds to target, FedAvg / FibecFed "
        "| FibecFed reached | sim. time ratio | compute-only time ratio | bytes ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    folders = [out / n for n in names] if names else sorted(p for p in out.iterdir() if p.is_dir())
    for folder in folders:
        if not (folder / "comparison.json").is_file():
            continue
        data = json.loads((folder / "comparison.json").read_text())
        methods = data["methods"]
        avg, prox, fib = methods.get("fedavg", {}), methods.get("fedprox", {}), methods.get(fibecfed)
        if fib is None or not avg:
            continue
        for score, prefix in (("global", ""), ("personalised", "personalized_")):

            def ratio(key: str) -> str:
                value = fib.get(prefix + key + "_ratio")
                if value is not None:
                    return f"{value:.2f}"
                paired = fib.get(prefix + key + "_paired_ratios") or []
                return "(" + ", ".join(f"{v:.2f}" for v in paired) + ")" if paired else "—"

            final = prefix + "final_accuracy" if prefix else "final_accuracy"
            reached = fib.get(prefix + "reached", fib.get("reached"))
            lines.append(
                f"| {folder.name} | {score} | {data['metric']} | {len(data['seeds'])} | {_cell(avg, final)} | "
                f"{_cell(prox, final) if prox else '—'} | {_cell(fib, final)} | "
                f"{_cell(avg, prefix + 'round_to_target', 1)} / {_cell(fib, prefix + 'round_to_target', 1)} | {reached}/{fib['seeds']} | "
                f"{ratio('sim_time_to_target_s')} | {ratio('compute_time_to_target_s')} | {ratio('upload_bytes_to_target')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="tweets,sst2,subj,rte,mrpc,cola")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--config", default="bench", help="preset or file (default: the bench preset)")
    parser.add_argument("--target", type=float)
    parser.add_argument("--target-share", type=float, default=0.95)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--report-only", action="store_true", help="rebuild each dataset's report from finished runs")
    parser.add_argument("--summary-only", action="store_true",
                        help="print the reports and the summary table of the finished comparisons in --out (any folder names)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    quiet_libraries()
    if not args.summary_only:
        run(args, report_only=args.report_only)
    print(report(args.out))
    print(summary(args.out, args.datasets.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
