"""What one consolidation round at the end would give FibecFed's global model: every device's
personal layers averaged (weighted by its training samples, as FedAvg weights) over the global
adapter, scored on the central test subset. Offline, from finished run folders; no training.

    python bench/consolidate.py bench/results/tweets-smollm2/fibecfed/seed0 [more run folders]

FibecFed's global model is the backbone plus the aggregated layers: its personal layers stay at
their initial values on the server. Where the personal part is most of the model (the decoder:
25 layers of 30, no head) that caps the global score near zero-shot. This measures the score a
one-off upload of every device's personal layers would buy, and prints the bytes it would cost
(every device that trained uploads its personal entries once), against the run's total upload.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from fibecfed import outputs
from fibecfed.accounting import serialized_nbytes
from fibecfed.config import config_from_dict
from fibecfed.simulator import central_evaluation, prepare, read_device_states


def consolidate(
    global_state: Mapping[str, torch.Tensor],
    personal: Mapping[int, Mapping[str, torch.Tensor]],
    weights: Mapping[int, float],
) -> dict[str, torch.Tensor]:
    """The global state with each personal key replaced by the weighted mean of the devices that
    hold it (weights renormalised over those devices). Keys no device holds keep their value."""
    out = {k: v.clone() for k, v in global_state.items()}
    keys = {k for state in personal.values() for k in state}
    for key in sorted(keys):
        holders = [d for d, state in personal.items() if key in state and weights.get(d, 0) > 0]
        if not holders:
            continue
        total = sum(weights[d] for d in holders)
        out[key] = sum(personal[d][key].float() * (weights[d] / total) for d in holders).to(global_state[key].dtype)
    return out


def score(run: Path) -> dict[str, float | int]:
    missing = [name for name in ("checkpoint.pt", "config.json", "summary.json") if not (run / name).is_file()]
    if missing:
        raise SystemExit(f"{run}: no {', '.join(missing)} (not a finished run folder)")
    checkpoint = outputs.load_checkpoint(run / "checkpoint.pt")
    config = config_from_dict(json.loads((run / "config.json").read_text()))
    prepared = prepare(config)
    global_state = checkpoint["global_state"]
    personal = {d: s.personal for d, s in read_device_states(run).items() if s.personal}
    weights = {d: float(len(prepared.train_parts[d])) for d in personal}
    merged = consolidate(global_state, personal, weights)
    num_classes = len(prepared.task.label_names)
    batch = config.train.eval_batch_size
    before = central_evaluation(prepared, global_state, batch, num_classes)["accuracy"]
    after = central_evaluation(prepared, merged, batch, num_classes)["accuracy"]
    summary = json.loads((run / "summary.json").read_text())
    return {
        "devices": len(personal),
        "global": before,
        "consolidated": after,
        "upload_mb": sum(serialized_nbytes(dict(s)) for s in personal.values()) / 1e6,
        "run_upload_mb": summary.get("upload_bytes", 0) / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("| run | devices | global (as run) | consolidated | consolidation upload (MB) | run's upload (MB) |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        r = score(run)
        print(f"| {run} | {r['devices']} | {r['global']:.3f} | {r['consolidated']:.3f} | "
              f"{r['upload_mb']:.2f} | {r['run_upload_mb']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
