"""Files a run writes: metrics.jsonl, summary.json, checkpoints, plots. All writes are atomic."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_metrics(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl from the full history (keeps it consistent with a checkpoint)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fsync_folder(folder: Path) -> None:
    """Make the renames inside `folder` durable (POSIX: a rename lives in the folder's entry)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, payload: dict[str, Any], sync_folder: bool = True) -> int:
    """torch.save `payload` to `path` atomically and durably; returns the bytes written.

    Written to a temporary file in the same folder, flushed and fsynced, then renamed over
    `path`: a kill at any point leaves either the old file or the new one, whole. With
    `sync_folder` the folder is fsynced too, so the rename survives a power cut (pass False when
    writing many files, then call `fsync_folder` once).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
        written = f.tell()
    os.replace(tmp, path)
    if sync_folder:
        fsync_folder(path.parent)
    return written


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def plot_metrics(rows: Sequence[dict[str, Any]], path: Path, title: str = "", majority: float | None = None) -> None:
    """Global and personalised accuracy against round, simulated time and uploaded bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("accuracy") is not None]
    if not rows:
        return
    rounds = [r["round"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    pacc = [r.get("personalized_accuracy") for r in rows]
    xs = [
        (rounds, "round"),
        ([r["sim_time_s"] for r in rows], "simulated federated time (s)"),
        ([r["upload_bytes"] / 1e6 for r in rows], "uploaded (MB, cumulative)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, (x, label) in zip(axes, xs):
        ax.plot(x, acc, marker="o", ms=3, label="global")
        if any(p is not None for p in pacc):
            ax.plot(x, [p if p is not None else float("nan") for p in pacc], marker="s", ms=3, label="personalised")
        if majority is not None:
            ax.axhline(majority, color="grey", ls="--", lw=1, label="majority class")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
