"""The tuning protocol behind the defaults (docs/defaults.md): every method gets the same budget.

    python bench/tune.py --dataset sst2 --seeds 0,1 --out bench/results/tuning-sst2 [--procs 2]
    python bench/tune.py --grid server --dataset sst2 --seeds 0,1 --out bench/results/tuning-server-sst2
    python bench/tune.py --grid measure --config bench-decoder --dataset sst2 --seeds 0,1 \
        --out bench/results/tuning-decoder-sst2-h200 model.device=cuda
    python bench/tune.py --grid labelwords --config bench-decoder --dataset sst2 --seeds 0,1 \
        --out bench/results/tuning-decoder-sst2-labelwords
    python bench/tune.py --grid sparse --score personalised --config bench-decoder --dataset sst2 --seeds 0,1 \
        --out bench/results/tuning-decoder-sst2-sparse model.device=cuda
    python bench/tune.py --grid firstpool --dataset sst2 --seeds 0,1,2 --out bench/results/tuning-sst2-firstpool

Each method runs the same number of configurations (a 3 x 2 grid) with the same seeds on one
tuning dataset, which is then left out of the benchmark table (`--grid client`, the default):

- FedAvg:   train.lr x train.head_lr
- FedProx:  train.lr x method.prox_mu (head_lr at the preset's 0.01)
- FibecFed: train.lr x train.head_lr, the same grid as FedAvg

`--grid server` tunes the server optimiser the same way: FedAdam's server learning rate over one
grid for FedAvg's clients (the `fedadam` baseline) and for FibecFed's, each client at its method's
tuned rates (federation.server_opt, docs/defaults.md). `--grid measure` compares FibecFed's
layer-sensitivity measures (`gain`, the default, against `relative_gain`), a switch the other
methods lack; FedAvg runs beside them as a reference row. `--grid labelwords` turns the decoder's
trainable label words (model.train_label_words) on and off for FedAvg and FibecFed alike.
`--grid sparse` compares FibecFed's sparse share of the personal layers (0.1, 0.3, 1.0), with
FedAvg as a reference row; the personal layers are not in the global model, so
run it with `--score personalised` (the area under the all-devices personalised accuracy).
`--grid firstpool` compares what FibecFed's round 1 trains on (method.curriculum.first_round_pool:
the easiest share by scores it waits for, or a random pool), with FedAvg as a reference row.

key=value arguments are config overrides for every run (e.g. `model.device=cuda`), in any order with the options.

A configuration's score is the area under its global accuracy curve: the mean accuracy over all
evaluated rounds 1..T, averaged over the seeds. It rewards learning early and ending high, and
uses neither time nor bytes, so no method is tuned on the quantity it is judged by. The best
configuration of each method is the one the benchmarks then use, unchanged, everywhere.

The runs go through `fibecfed compare` (resumable run folders), split over --procs processes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import dataset_overrides

from fibecfed import outputs
from fibecfed.cli import parse_args

REPO = Path(__file__).resolve().parents[1]
LRS = [0.001, 0.002, 0.005]
GRID: dict[str, list[list[str]]] = {
    "fedavg": [[f"train.lr={lr}", f"train.head_lr={h}"] for lr, h in itertools.product(LRS, [0.01, 0.03])],
    "fedprox": [[f"train.lr={lr}", f"method.prox_mu={mu}"] for lr, mu in itertools.product(LRS, [0.01, 0.1])],
    "fibecfed": [[f"train.lr={lr}", f"train.head_lr={h}"] for lr, h in itertools.product(LRS, [0.01, 0.03])],
}
SERVER_LRS = [0.003, 0.01, 0.03]
ADAM = "federation.server_opt.kind=adam"
SERVER_GRID: dict[str, list[list[str]]] = {
    "fedadam": [[f"federation.server_opt.lr={lr}"] for lr in SERVER_LRS],
    "fibecfed": [[ADAM, f"federation.server_opt.lr={lr}"] for lr in SERVER_LRS],
}
# FibecFed's layer-sensitivity measure (fibecfed.layers.layer_sensitivity), a switch the other
# methods do not have: on the decoder, "gain" picks the first layers, "relative_gain" the last.
MEASURE_GRID: dict[str, list[list[str]]] = {
    "fibecfed": [[], ["method.layers.measure=relative_gain"]],
    "fedavg": [[]],  # a reference row: FedAvg has no such switch
}
# The verbalizer's trainable label words (model.train_label_words), a switch every method has: off
# (the pretrained rows) against on, at the decoder preset's adapter rate for the rows too.
LABEL_WORDS = ["model.train_label_words=true", "train.head_lr=0.001"]
LABEL_WORDS_GRID: dict[str, list[list[str]]] = {"fedavg": [[], LABEL_WORDS], "fibecfed": [[], LABEL_WORDS]}
# FibecFed's sparse share rho of the personal layers (method.sparse.share), chosen at 0.1 on
# MiniLM (docs/defaults.md, study 1). On the decoder the gain measure aggregates layer 0, so every
# round's backward pass reaches every layer and a larger share costs about nothing: the question is
# whether the personal layers (25 of 30) then reach the personalised target in fewer rounds.
SPARSE_GRID: dict[str, list[list[str]]] = {
    "fibecfed": [[], ["method.sparse.share=0.3"], ["method.sparse.share=1.0"]],
    "fedavg": [[]],  # a reference row: FedAvg has no such switch
}
# What round 1 trains on (method.curriculum.first_round_pool): the easiest share by the
# initialisation-phase scores, which the devices of round 1 must wait for, or a random pool of the
# same size while they score in the background (bench/critical_path.py bounds the time it saves).
FIRST_POOL_GRID: dict[str, list[list[str]]] = {
    # Both values spelled out, so the run folders keep their meaning if the default changes.
    "fibecfed": [["method.curriculum.first_round_pool=scored"], ["method.curriculum.first_round_pool=random"]],
    "fedavg": [[]],  # a reference row: FedAvg has no such switch
}
GRIDS = {"client": GRID, "server": SERVER_GRID, "measure": MEASURE_GRID, "labelwords": LABEL_WORDS_GRID,
         "sparse": SPARSE_GRID, "firstpool": FIRST_POOL_GRID}
SCORES = {"global": "accuracy", "personalised": "personalized_accuracy"}


def label(method: str, overrides: list[str]) -> str:
    return f"{method}[{';'.join(overrides)}]" if overrides else method


def folder(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")


def area_under_curve(rows: list[dict], key: str = "accuracy") -> float:
    """Mean score `key` (global accuracy by default) over the evaluated rounds after round 0."""
    values = [r[key] for r in rows if r["round"] > 0 and r.get(key) is not None]
    if not values:
        raise ValueError(f"no round after round 0 recorded {key!r}")
    return statistics.fmean(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--config", default="bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tuning-sst2")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="client",
                        help="client: learning rates (and FedProx's mu); server: FedAdam's server learning rate; "
                             "measure: FibecFed's layer-sensitivity measure; labelwords: the decoder's trainable label words; "
                             "sparse: FibecFed's sparse share; firstpool: what FibecFed's round 1 trains on")
    parser.add_argument("--score", choices=sorted(SCORES), default="global",
                        help="the curve whose area decides: global accuracy (the protocol's criterion) or the "
                             "personalised accuracy over all devices (for a switch of the personal layers only)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run (e.g. model.device=cuda)")
    args = parse_args(parser, argv)
    grid = GRIDS[args.grid]
    labels = [label(m, o) for m, configs in grid.items() for o in configs]
    base = ["--config", args.config, "--seeds", args.seeds, "--out", str(args.out), "--no-progress",
            *dataset_overrides(args.dataset, args.shared), *args.overrides]
    if not args.report_only:
        # Interleave the methods so every process gets a share of each.
        shares = [labels[i :: args.procs] for i in range(args.procs)]
        procs = [
            subprocess.Popen([sys.executable, "-m", "fibecfed", "compare", "--methods", ",".join(share), *base],
                             stdout=subprocess.DEVNULL, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
            for share in shares
        ]
        if any(p.wait() != 0 for p in procs):
            print("a tuning process failed", file=sys.stderr)
            return 1
    seeds = [int(s) for s in args.seeds.split(",")]
    table = {}
    for method, configs in grid.items():
        for overrides in configs:
            name = label(method, overrides)
            runs = [outputs.read_metrics(args.out / folder(name) / f"seed{s}" / "metrics.jsonl") for s in seeds]
            aucs = [area_under_curve(rows, SCORES[args.score]) for rows in runs]
            finals = [[r for r in rows if r.get("accuracy") is not None][-1]["accuracy"] for rows in runs]
            pers = [[r for r in rows if r.get("accuracy") is not None][-1].get("personalized_accuracy") for rows in runs]
            table[name] = {"method": method, "overrides": overrides, "auc": statistics.fmean(aucs), "aucs": aucs,
                           "final": statistics.fmean(finals), "final_personalized": statistics.fmean(p for p in pers if p is not None)}
    chosen = {m: max((n for n, e in table.items() if e["method"] == m), key=lambda n: table[n]["auc"]) for m in grid}
    overrides = f", overrides `{' '.join(args.overrides)}`" if args.overrides else ""
    lines = [f"Tuning on {args.dataset} ({args.config} preset{overrides}), seeds {seeds}: score = mean {args.score} accuracy "
             "over rounds 1..T (area under the curve), averaged over seeds.", "",
             "| configuration | score (AUC) | per seed | final accuracy | final personalised | chosen |", "|---|---|---|---|---|---|"]
    for name, e in table.items():
        lines.append(f"| `{name}` | {e['auc']:.3f} | {', '.join(f'{a:.3f}' for a in e['aucs'])} | {e['final']:.3f} | "
                     f"{e['final_personalized']:.3f} | {'**yes**' if chosen[e['method']] == name else ''} |")
    text = "\n".join(lines) + "\n"
    outputs.write_json(args.out / "tuning.json", {"dataset": args.dataset, "config": args.config, "overrides": args.overrides,
                                                    "score": args.score,
                                                    "seeds": seeds, "table": table, "chosen": chosen})
    outputs.atomic_write_text(args.out / "tuning.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
