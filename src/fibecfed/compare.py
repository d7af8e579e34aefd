"""Side-by-side comparison of methods: the same partition, seeds and evaluation for every method.

A method is a named set of config overrides (a baseline is a config, not a loop). Every run is
an ordinary run folder (resumable), so an interrupted comparison picks up where it stopped.
The figures that decide "faster" are read from smoothed curves, never from a lucky round.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fibecfed import outputs
from fibecfed.config import load_config
from fibecfed.errors import ConfigError

logger = logging.getLogger(__name__)

# Methods and ablations as config overrides over the run's config.
# Every entry pins the switches it depends on, so a shared --config or override cannot leak
# FibecFed's parts (or a proximal term) into a baseline.
_OFF = ["method.curriculum.enabled=false", "method.layers.enabled=false", "method.sparse.enabled=false"]
_ON = ["method.curriculum.enabled=true", "method.layers.enabled=true", "method.sparse.enabled=true", "method.prox_mu=0"]
METHODS: dict[str, list[str]] = {
    "fedavg": ["method.name=fedavg", "method.prox_mu=0", *_OFF],
    "fedprox": ["method.name=fedprox", *_OFF],
    "fibecfed": ["method.name=fibecfed", *_ON],
    "fibecfed-no-curriculum": ["method.name=fibecfed", *_ON, "method.curriculum.enabled=false"],
    "fibecfed-hard-first": ["method.name=fibecfed", *_ON, "method.curriculum.order=hard_first"],
    "fibecfed-no-layer-selection": ["method.name=fibecfed", *_ON, "method.layers.enabled=false"],
    "fibecfed-random-layers": ["method.name=fibecfed", *_ON, "method.layers.policy=random"],
    "fibecfed-reverse-layers": ["method.name=fibecfed", *_ON, "method.layers.policy=reverse"],
    "fibecfed-no-sparse": ["method.name=fibecfed", *_ON, "method.sparse.enabled=false"],
    "fibecfed-curriculum-only": ["method.name=fibecfed", *_ON, "method.layers.enabled=false", "method.sparse.enabled=false"],
}
SMOOTHING_WINDOW = 3


@dataclass(frozen=True)
class MethodSpec:
    label: str
    overrides: list[str]


def parse_methods(text: str) -> list[MethodSpec]:
    """`fedavg,fibecfed,fibecfed[method.layers.share=0.33;method.sparse.share=0.2]`.

    A name in brackets-free form is a registered method; `NAME[k=v;k=v]` adds overrides to it.
    """
    specs, depth, current = [], 0, ""
    for char in text + ",":
        if char == "," and depth == 0:
            if current.strip():
                specs.append(current.strip())
            current = ""
            continue
        depth += char == "["
        depth -= char == "]"
        current += char
    result = []
    for spec in specs:
        name, extra = spec, []
        if "[" in spec:
            if not spec.endswith("]"):
                raise ConfigError(f"method {spec!r}: write NAME[key=value;key=value]")
            name, inner = spec[:-1].split("[", 1)
            extra = [item.strip() for item in inner.split(";") if item.strip()]
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        result.append(MethodSpec(label=spec, overrides=METHODS[name] + extra))
    labels = [s.label for s in result]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"a method is listed twice: {labels}")
    if not result:
        raise ConfigError("--methods is empty")
    return result


def smoothed(values: Sequence[float | None], window: int = SMOOTHING_WINDOW) -> list[float | None]:
    """Trailing mean of the last `window` evaluations (None where a round was not evaluated).

    The first window-1 evaluated rounds average what exists so far.
    """
    seen: list[float] = []
    result: list[float | None] = []
    for value in values:
        if value is None:
            result.append(None)
            continue
        seen.append(value)
        tail = seen[-window:]
        result.append(sum(tail) / len(tail))
    return result


def first_reaching(rows: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first round whose smoothed accuracy reaches `target` (round 0 excluded), or None."""
    curve = smoothed([r.get("accuracy") for r in rows])
    for row, value in zip(rows, curve):
        if row["round"] > 0 and value is not None and value >= target:
            return row
    return None


def round_breakdown(rows: Sequence[dict[str, Any]], bandwidth_mbps: float) -> dict[str, float]:
    """Where a round's simulated time goes, mean over the run's rounds (round 0 excluded).

    A round lasts as long as its slowest device's download + compute + upload. Every sampled
    device moves the same bytes (the exchanged keys), so a device's transfer seconds are the
    round's bytes over the device count at `bandwidth_mbps`, and compute is the rest.
    Scoring is the curriculum/mask/sensitivity overhead per device (already inside compute).
    """
    sims, transfers, scorings, uploads, fractions = [], [], [], [], []
    prev = None
    for row in rows:
        if prev is not None and row["round"] > 0:
            n = max(1, len(row.get("devices") or []) - len(row.get("failed_devices") or []))
            up = row["upload_bytes"] - prev["upload_bytes"]
            down = row.get("download_bytes", 0) - prev.get("download_bytes", 0)
            sims.append(row["sim_time_s"] - prev["sim_time_s"])
            transfers.append((up + down) / n * 8.0 / (bandwidth_mbps * 1e6))
            scorings.append((row.get("scoring_seconds") or 0.0) / n)
            uploads.append(up / n)
            fractions.append(row.get("curriculum_fraction", 1.0) or 1.0)
        prev = row
    if not sims:
        return {}
    sim, transfer = statistics.fmean(sims), statistics.fmean(transfers)
    return {
        "round_sim_s": sim,
        "round_transfer_s": transfer,
        "round_compute_s": sim - transfer,
        "round_scoring_s": statistics.fmean(scorings),
        "round_device_upload_bytes": statistics.fmean(uploads),
        "round_curriculum_fraction": statistics.fmean(fractions),
    }


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.pstdev(present) if len(present) > 1 else 0.0


def summarise(
    runs: dict[str, list[list[dict[str, Any]]]],
    target: float,
    reference: str,
    bandwidths: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per method: final/best accuracy, and time and bytes to the target, mean and spread over seeds.

    A seed that never reaches the target counts as missing for the to-target figures, and
    `reached` says in how many seeds it did.
    """
    table: dict[str, dict[str, Any]] = {}
    for label, seed_rows in runs.items():
        finals, bests, personal, walls, sims, ups = [], [], [], [], [], []
        to_sim, to_wall, to_up, to_round = [], [], [], []
        breakdowns = []
        per_seed: dict[str, list[float | None]] = {"sim_time_to_target_s": [], "upload_bytes_to_target": []}
        for rows in seed_rows:
            breakdowns.append(round_breakdown(rows, (bandwidths or {}).get(label, 10.0)))
            evaluated = [r for r in rows if r.get("accuracy") is not None]
            curve = [v for v in smoothed([r["accuracy"] for r in evaluated]) if v is not None]
            finals.append(evaluated[-1]["accuracy"])
            bests.append(max(curve[1:] or curve))
            personal.append(rows[-1].get("personalized_accuracy"))
            walls.append(rows[-1]["wall_time_s"])
            sims.append(rows[-1]["sim_time_s"])
            ups.append(rows[-1]["upload_bytes"])
            hit = first_reaching(rows, target)
            per_seed["sim_time_to_target_s"].append(None if hit is None else hit["sim_time_s"])
            per_seed["upload_bytes_to_target"].append(None if hit is None else hit["upload_bytes"])
            if hit is not None:
                to_sim.append(hit["sim_time_s"])
                to_wall.append(hit["wall_time_s"])
                to_up.append(hit["upload_bytes"])
                to_round.append(hit["round"])
        entry: dict[str, Any] = {"seeds": len(seed_rows), "reached": len(to_sim)}
        for name, values in [
            ("final_accuracy", finals), ("best_smoothed_accuracy", bests), ("final_personalized_accuracy", personal),
            ("wall_time_s", walls), ("sim_time_s", sims), ("upload_bytes", ups),
            ("round_to_target", to_round), ("sim_time_to_target_s", to_sim), ("wall_time_to_target_s", to_wall),
            ("upload_bytes_to_target", to_up),
        ]:
            mean, std = _mean_std(values)
            entry[name] = mean
            entry[name + "_std"] = std
        for name in breakdowns[0] if breakdowns else ():
            entry[name] = statistics.fmean(b[name] for b in breakdowns)
        entry["_per_seed"] = per_seed
        table[label] = entry
    ref = table.get(reference) or {}
    for entry in table.values():
        for name in ("sim_time_to_target_s", "wall_time_to_target_s", "upload_bytes_to_target", "final_accuracy"):
            value, base = entry.get(name), ref.get(name)
            # A to-target mean over only the seeds that got there would flatter a method that
            # rarely does: ratios need every seed of both methods to reach the target.
            complete = name == "final_accuracy" or (entry["reached"] == entry["seeds"] and ref.get("reached") == ref.get("seeds"))
            entry[name + "_ratio"] = value / base if value is not None and base and complete else None
    ref_seeds = ref.get("_per_seed", {})
    for entry in table.values():
        # Seed by seed, where both this method and the reference reached the target: the same
        # partition and sampling, so a paired ratio is fair even when some seed never got there.
        for name, values in entry["_per_seed"].items():
            pairs = zip(values, ref_seeds.get(name, []))
            entry[name + "_paired_ratios"] = [v / b for v, b in pairs if v is not None and b]
    for entry in table.values():
        del entry["_per_seed"]
    return table


def _fmt(value: float | None, std: float | None = None, digits: int = 3, scale: float = 1.0) -> str:
    if value is None:
        return "—"
    text = f"{value / scale:.{digits}f}"
    if std:
        text += f" ± {std / scale:.{digits}f}"
    return text


def _ratios(values: Sequence[float] | None) -> str:
    return ", ".join(f"{v:.2f}" for v in values) if values else "none"


def markdown_table(
    table: dict[str, dict[str, Any]], target: float, reference: str, note: str = "", metric: str = "accuracy"
) -> str:
    lines = [
        f"Metric: global {metric}. Target: **{target:.3f}** (reached when the mean of the last {SMOOTHING_WINDOW} evaluations "
        f"first reaches it). Ratios are against `{reference}`. Mean ± spread over seeds.",
        "",
        f"| method | final {metric} | best smoothed {metric} | personalised acc | rounds to target | sim. time to target (s) | ratio | upload to target (MB) | ratio | total wall (s) | reached |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, e in table.items():
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} |".format(
                label,
                _fmt(e["final_accuracy"], e["final_accuracy_std"]),
                _fmt(e["best_smoothed_accuracy"], e["best_smoothed_accuracy_std"]),
                _fmt(e["final_personalized_accuracy"], e["final_personalized_accuracy_std"]),
                _fmt(e["round_to_target"], None, 1),
                _fmt(e["sim_time_to_target_s"], e["sim_time_to_target_s_std"], 1),
                _fmt(e["sim_time_to_target_s_ratio"], None, 2),
                _fmt(e["upload_bytes_to_target"], e["upload_bytes_to_target_std"], 2, 1e6),
                _fmt(e["upload_bytes_to_target_ratio"], None, 2),
                _fmt(e["wall_time_s"], e["wall_time_s_std"], 0),
                e["reached"],
                e["seeds"],
            )
        )
    if note:
        lines += ["", note]
    paired = [
        f"`{label}` time {_ratios(e.get('sim_time_to_target_s_paired_ratios'))}, bytes {_ratios(e.get('upload_bytes_to_target_paired_ratios'))}"
        for label, e in table.items()
        if label != reference
    ]
    if paired:
        lines += ["", f"Seed by seed, where both it and `{reference}` reached the target, to-target ratios: " + "; ".join(paired) + "."]
    if all("round_sim_s" in e for e in table.values()):
        lines += [
            "",
            "Where a round's simulated time goes (mean over rounds and seeds; compute includes scoring):",
            "",
            "| method | sim. s / round | compute s | of which scoring s | transfer s | upload MB / device | curriculum fraction |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, e in table.items():
            lines.append(
                f"| {label} | {e['round_sim_s']:.2f} | {e['round_compute_s']:.2f} | {e['round_scoring_s']:.2f} | "
                f"{e['round_transfer_s']:.2f} | {e['round_device_upload_bytes'] / 1e6:.2f} | {e['round_curriculum_fraction']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot_comparison(runs: dict[str, list[list[dict[str, Any]]]], path: Path, title: str = "") -> None:
    """Accuracy against round, simulated time and uploaded bytes; raw (thin) and smoothed (thick).

    With several seeds, the curves are the mean over seeds, round by round.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for i, (label, seed_rows) in enumerate(runs.items()):
        color = palette(i % palette.N)
        length = min(len(rows) for rows in seed_rows)

        def mean_of(key: str, rows_list=seed_rows, n=length) -> list[float | None]:
            out = []
            for j in range(n):
                values = [rows[j].get(key) for rows in rows_list]
                out.append(None if any(v is None for v in values) else statistics.fmean(values))
            return out

        acc = mean_of("accuracy")
        smooth = smoothed(acc)
        xs = [mean_of("round"), mean_of("sim_time_s"), [x / 1e6 for x in mean_of("upload_bytes")]]
        for ax, x in zip(axes, xs):
            pts = [(a, b) for a, b in zip(x, acc) if b is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.35, lw=1)
            pts = [(a, b) for a, b in zip(x, smooth) if b is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=2.2, label=label)
    for ax, label in zip(axes, ["round", "simulated federated time (s)", "uploaded (MB, cumulative)"]):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("global accuracy (thin: raw, thick: smoothed)")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title if len(title) <= 100 else f"{len(runs)} methods (see the legend)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(
    methods: Sequence[MethodSpec],
    seeds: Sequence[int],
    out_dir: str | Path,
    config: str | None = None,
    overrides: Sequence[str] = (),
    target: float | None = None,
    target_share: float = 0.95,
    reference: str | None = None,
    run_one: Callable[..., dict[str, Any]] | None = None,
    progress: bool = False,
    metric: str = "accuracy",
    report_only: bool = False,
) -> dict[str, Any]:
    """Run every method for every seed, one after another in this process, then write the report.

    target: an explicit accuracy; otherwise `target_share` x the reference method's best
    smoothed accuracy (mean over seeds). The reference is fedavg if listed, else the first method.
    report_only: rebuild the report from finished run folders without running anything.
    """
    from fibecfed.simulator import Simulation

    if metric not in ("accuracy", "f1", "mcc"):
        raise ConfigError(f"--metric must be accuracy, f1 or mcc, got {metric!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [m.label for m in methods]
    reference = reference or ("fedavg" if "fedavg" in labels else labels[0])
    if reference not in labels:
        raise ConfigError(f"reference method {reference!r} is not among --methods ({', '.join(labels)})")
    # Validate every config before the first (long) run starts.
    configs = {
        (m.label, seed): load_config(config, [*overrides, *m.overrides, f"seed={seed}"]) for m in methods for seed in seeds
    }
    runs: dict[str, list[list[dict[str, Any]]]] = {m.label: [] for m in methods}
    for m in methods:
        for seed in seeds:
            run_dir = out / _folder_name(m.label) / f"seed{seed}"
            logger.info("running %s, seed %d -> %s", m.label, seed, run_dir)
            if progress:
                print(f"== {m.label}, seed {seed} -> {run_dir}", flush=True)
            if report_only:
                if not (run_dir / "summary.json").is_file():
                    raise ConfigError(f"no finished run in {run_dir}; run the comparison without --report-only")
            else:
                (run_one or (lambda c, d: Simulation(c, d, progress=progress).run()))(configs[(m.label, seed)], run_dir)
            rows = outputs.read_metrics(run_dir / "metrics.jsonl")
            if metric != "accuracy":
                # Compare on the task's own measure (e.g. Matthews correlation for CoLA).
                rows = [{**r, "accuracy": r.get(metric)} for r in rows]
            runs[m.label].append(rows)

    if target is None:
        ref_best = summarise({reference: runs[reference]}, 0.0, reference)[reference]["best_smoothed_accuracy"]
        target = target_share * ref_best
        target_note = f"target = {target_share:.2f} x {reference}'s best smoothed {metric} ({ref_best:.3f})"
    else:
        target_note = "target given explicitly"
    bandwidths = {m.label: configs[(m.label, seeds[0])].federation.bandwidth_mbps for m in methods}
    table = summarise(runs, target, reference, bandwidths)
    result = {
        "target": target,
        "target_rule": target_note,
        "reference": reference,
        "smoothing": f"trailing mean of the last {SMOOTHING_WINDOW} evaluations",
        "seeds": list(seeds),
        "metric": metric,
        "overrides": list(overrides),
        "methods": {m.label: {"overrides": m.overrides, **table[m.label]} for m in methods},
    }
    outputs.write_json(out / "comparison.json", result)
    outputs.atomic_write_text(out / "comparison.md", markdown_table(table, target, reference, target_note, metric))
    plot_comparison(runs, out / "comparison.png", title=" vs ".join(labels) + ("" if metric == "accuracy" else f" ({metric})"))
    return result


def _folder_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_")
