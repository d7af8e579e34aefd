"""Side-by-side comparison of methods: the same partition, seeds and evaluation for every method.

A method is a named set of config overrides (a baseline is a config, not a loop). Every run is
an ordinary run folder (resumable), so an interrupted comparison picks up where it stopped.
The figures that decide "faster" are read from smoothed curves, never from a lucky round.

Two scores are compared, each against its own target: the global model on the central test set
(`accuracy`, or the --metric) and the personalised score (every device's own model on its own
test part, pooled). Times to target come three ways: simulated time at the run's link speed,
compute-only time (no communication), and, from each round's per-device costs, simulated time
at any other link speed (the bandwidth sweep), so one set of runs shows where a method that
sends fewer bytes but computes more starts to win.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fibecfed import outputs
from fibecfed.config import RunConfig, load_config
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
    # FedAvg's clients under FedAdam's server (Reddi et al. 2021): the baseline for any run that
    # gives FibecFed a server optimiser (fibecfed[federation.server_opt.kind=adam]).
    "fedadam": ["method.name=fedavg", "method.prox_mu=0", *_OFF, "federation.server_opt.kind=adam"],
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
DEFAULT_SWEEP_MBPS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)
GLOBAL, PERSONAL = "accuracy", "personalized_accuracy"  # row keys of the two scores (after `score_rows`)
PERSONALIZED = "personalized_"  # prefix of the personalised score's figures in a summary entry
# Figures read off the first round that reaches a target: figure name -> that row's key.
TO_TARGET = {
    "round_to_target": "round",
    "sim_time_to_target_s": "sim_time_s",
    "compute_time_to_target_s": "compute_time_s",
    "wall_time_to_target_s": "wall_time_s",
    "upload_bytes_to_target": "upload_bytes",
}
RATIO_FIGURES = ("final_accuracy", "sim_time_to_target_s", "compute_time_to_target_s", "wall_time_to_target_s", "upload_bytes_to_target")
PAIRED_FIGURES = ("sim_time_to_target_s", "compute_time_to_target_s", "upload_bytes_to_target")


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
        if depth < 0:
            raise ConfigError(f"--methods {text!r}: a ']' without its '[' (write NAME[key=value;key=value])")
        current += char
    if depth != 0:
        raise ConfigError(f"--methods {text!r}: a '[' without its ']' (write NAME[key=value;key=value])")
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


def first_reaching_index(rows: Sequence[dict[str, Any]], target: float, key: str = GLOBAL) -> int | None:
    """Index of the first row whose smoothed `key` reaches `target` (round 0 excluded), or None."""
    curve = smoothed([r.get(key) for r in rows])
    for index, (row, value) in enumerate(zip(rows, curve)):
        if row["round"] > 0 and value is not None and value >= target:
            return index
    return None


def first_reaching(rows: Sequence[dict[str, Any]], target: float, key: str = GLOBAL) -> dict[str, Any] | None:
    """The first round whose smoothed `key` (global accuracy by default) reaches `target`, or None."""
    index = first_reaching_index(rows, target, key)
    return None if index is None else rows[index]


def round_time_at_bandwidth(device_costs: Sequence[Sequence[float]], mbps: float, elapsed_s: float = 0.0) -> float:
    """Seconds one round lasts if every link runs at `mbps` Mbit/s: its slowest device's
    download + compute + upload (0 for a round with no device to wait for).

    device_costs: one [compute_seconds, download_bytes, upload_bytes] per device that counts in
    the round's time (the simulator's `device_costs` row entry). An optional fourth number is
    initialisation work that has run in the background since the start of the run: it delays the
    device only by the part not done after `elapsed_s`, the run's time before this round at the
    same speed. `mbps` may be math.inf: compute only.
    """
    seconds_per_byte = 8.0 / (mbps * 1e6)
    return max(
        ((cost[1] + cost[2]) * seconds_per_byte + cost[0] + max(0.0, (cost[3] if len(cost) > 3 else 0.0) - elapsed_s)
         for cost in device_costs),
        default=0.0,
    )


def sim_time_at_bandwidth(rows: Sequence[dict[str, Any]], mbps: float) -> list[float] | None:
    """A run's cumulative simulated time, row by row, as if every link had run at `mbps` Mbit/s.

    A round's bytes and compute seconds do not depend on the link, so one run answers "how long
    at another speed" exactly, without a rerun. Round 0 may hold a one-off initialisation phase
    (devices scoring their data in parallel), so it counts too; a round-0 row without costs counts
    as none. None when a later row has no `device_costs` (runs made before the simulator wrote them).
    """
    total, series = 0.0, []
    for row in rows:
        costs = row.get("device_costs")
        if costs is None:
            if row["round"] > 0:
                return None
            costs = []
        total += round_time_at_bandwidth(costs, mbps, elapsed_s=total)
        series.append(total)
    return series


def sweep_mismatch_s(rows: Sequence[dict[str, Any]], mbps: float) -> float | None:
    """How far the recomputed time at the run's own speed ends from the run's `sim_time_s` (s),
    None without costs. More than rounding means the costs do not explain the simulated time
    (e.g. a simulator whose `device_costs` mean something else), and the sweep is not to be trusted."""
    series = sim_time_at_bandwidth(rows, mbps)
    if series is None or not rows or rows[-1].get("sim_time_s") is None:
        return None
    return abs(series[-1] - rows[-1]["sim_time_s"])


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` as integers >= 0."""
    seeds = []
    for item in str(text).split(","):
        if not item.strip():
            continue
        try:
            seed = int(item)
        except ValueError:
            raise ConfigError(f"--seeds: {item.strip()!r} is not an integer; write e.g. 0,1,2") from None
        if seed < 0:
            raise ConfigError(f"--seeds: {seed} must be >= 0")
        seeds.append(seed)
    if not seeds:
        raise ConfigError("--seeds is empty; write e.g. 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds lists a seed twice: {text}")
    return seeds


def parse_bandwidths(text: str) -> list[float]:
    """`1,10,100` -> [1.0, 10.0, 100.0] Mbit/s for the sweep; each must be a finite number > 0."""
    speeds = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            speed = float(item)
        except ValueError:
            raise ConfigError(f"--bandwidths: {item!r} is not a number; write Mbit/s as e.g. 1,10,100") from None
        if not (speed > 0 and math.isfinite(speed)):
            raise ConfigError(f"--bandwidths: {item!r} must be a finite speed > 0 Mbit/s")
        speeds.append(speed)
    if not speeds:
        raise ConfigError("--bandwidths is empty; write Mbit/s as e.g. 1,10,100")
    return sorted(set(speeds))


def score_rows(rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows whose `accuracy` and `personalized_accuracy` hold `metric` (e.g. Matthews correlation
    for CoLA), so every figure below reads one pair of keys whatever the task's measure."""
    if metric == "accuracy":
        return list(rows)
    return [{**r, GLOBAL: r.get(metric), PERSONAL: r.get(f"personalized_{metric}")} for r in rows]


def personalized_measure(rows: Sequence[dict[str, Any]]) -> str:
    """Which devices a run's personalised score covers. Runs that also carry the sampled-only
    score (`sampled_personalized_accuracy`) score every device; older runs only the sampled ones."""
    return "every device" if any("sampled_personalized_accuracy" in r for r in rows) else "sampled devices"


def short_personalized_rounds(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Rounds whose personalised score pooled fewer devices than the run's fullest evaluation
    (`personalized_devices`: on Flower, a node that failed or timed out its evaluation is left
    out). Empty for runs that predate the count."""
    counts = [(r["round"], r["personalized_devices"]) for r in rows if r.get("personalized_devices") is not None]
    most = max((n for _, n in counts), default=0)
    return [round_num for round_num, n in counts if n < most]


def round_breakdown(rows: Sequence[dict[str, Any]], bandwidth_mbps: float) -> dict[str, float]:
    """Where a round's simulated time goes, mean over the run's rounds (round 0 excluded).

    A round lasts as long as its slowest device's download + compute + upload. Every sampled
    device moves the same bytes (the exchanged keys), so a device's transfer seconds are the
    round's bytes over the device count at `bandwidth_mbps`, and compute is the rest.
    Scoring is the curriculum/mask/Fisher-probe overhead per device (already inside compute);
    `round_probe_s`, where the runs record it, the layer-sensitivity probes' (also inside compute,
    not inside scoring), per device.
    Runs that record `compute_time_s` add the slowest device's compute per round
    (`round_compute_only_s`) and the mean initialisation-phase seconds of a device
    (`init_background_s`: the difficulty scoring a device runs once, in the background, from the
    4th entry of `device_costs`; the part of it that delays a round is inside that round's time).
    """
    sims, transfers, scorings, probes, uploads, fractions, computes = [], [], [], [], [], [], []
    prev = None
    for row in rows:
        if prev is not None and row["round"] > 0:
            n = max(1, len(row.get("devices") or []) - len(row.get("failed_devices") or []))
            up = row["upload_bytes"] - prev["upload_bytes"]
            down = row.get("download_bytes", 0) - prev.get("download_bytes", 0)
            sims.append(row["sim_time_s"] - prev["sim_time_s"])
            transfers.append((up + down) / n * 8.0 / (bandwidth_mbps * 1e6))
            scorings.append((row.get("scoring_seconds") or 0.0) / n)
            if "probe_seconds" in row:  # runs since the simulator recorded it
                probes.append(row["probe_seconds"] / n)
            uploads.append(up / n)
            fractions.append(row.get("curriculum_fraction", 1.0) or 1.0)
            if row.get("compute_time_s") is not None and prev.get("compute_time_s") is not None:
                computes.append(row["compute_time_s"] - prev["compute_time_s"])
        prev = row
    if not sims:
        return {}
    sim, transfer = statistics.fmean(sims), statistics.fmean(transfers)
    result = {
        "round_sim_s": sim,
        "round_transfer_s": transfer,
        "round_compute_s": sim - transfer,
        "round_scoring_s": statistics.fmean(scorings),
        **({"round_probe_s": statistics.fmean(probes)} if len(probes) == len(sims) else {}),
        "round_device_upload_bytes": statistics.fmean(uploads),
        "round_curriculum_fraction": statistics.fmean(fractions),
    }
    if len(computes) == len(sims):
        result["round_compute_only_s"] = statistics.fmean(computes)
        background = [c[3] for row in rows for c in row.get("device_costs") or [] if len(c) > 3 and c[3] > 0]
        result["init_background_s"] = statistics.fmean(background) if background else 0.0
    return result


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.pstdev(present) if len(present) > 1 else 0.0


def ratio_to_reference(values: Sequence[float | None], reference: Sequence[float | None]) -> tuple[float | None, list[float]]:
    """(ratio of the means, seed-by-seed ratios) of a per-seed figure against the reference's.

    A to-target mean over only the seeds that got there would flatter a method that rarely does,
    so the ratio of means needs every seed of both methods to have the figure (None otherwise).
    Seed by seed, where both have it, the partition and sampling are the same, so a paired ratio
    is fair even when some seed never got there.
    """
    paired = [v / b for v, b in zip(values, reference) if v is not None and b]
    complete = bool(values) and bool(reference) and None not in values and None not in reference
    mean, base = _mean_std(values)[0], _mean_std(reference)[0]
    return (mean / base if complete and mean is not None and base else None), paired


def score_per_seed(
    seed_rows: Sequence[Sequence[dict[str, Any]]], key: str, target: float | None, sweep_mbps: Sequence[float] = ()
) -> tuple[dict[str, list[Any]], dict[float, list[float | None]]]:
    """One score's figures seed by seed (None where a seed has none): final and best smoothed
    value, the to-target figures of TO_TARGET, and the time to target at each `sweep_mbps`.

    The best smoothed value leaves out round 0 (the untrained model) when later rounds exist.
    """
    figures: dict[str, list[Any]] = {name: [] for name in ("final_accuracy", "best_smoothed_accuracy", *TO_TARGET)}
    sweep: dict[float, list[float | None]] = {mbps: [] for mbps in sweep_mbps}
    for rows in seed_rows:
        raw = [r.get(key) for r in rows]
        scored = [(r["round"], v, s) for r, v, s in zip(rows, raw, smoothed(raw)) if v is not None]
        trained = [s for rnd, _, s in scored if rnd > 0] or [s for _, _, s in scored]
        figures["final_accuracy"].append(scored[-1][1] if scored else None)
        figures["best_smoothed_accuracy"].append(max(trained) if trained else None)
        at = None if target is None else first_reaching_index(rows, target, key)
        for name, row_key in TO_TARGET.items():
            figures[name].append(None if at is None else rows[at].get(row_key))
        for mbps in sweep_mbps:
            series = None if at is None else sim_time_at_bandwidth(rows, mbps)
            sweep[mbps].append(None if series is None else series[at])
    return figures, sweep


def summarise(
    runs: dict[str, list[list[dict[str, Any]]]],
    target: float | None,
    reference: str,
    bandwidths: dict[str, float] | None = None,
    personalized_target: float | None = None,
    sweep_mbps: Sequence[float] = (),
) -> dict[str, dict[str, Any]]:
    """Per method: final/best score, and rounds, time and bytes to the target, mean and spread
    over seeds, for the global score and for the personalised one.

    Keys of a method's entry (X_std is the spread over seeds of every mean X):
    - run totals: seeds, wall_time_s, sim_time_s, compute_time_s, upload_bytes,
      final_personalized_accuracy (the last personalised score any device answered; the same as
      personalized_final_accuracy, kept for older readers);
      the round breakdown (round_sim_s, round_transfer_s, round_compute_s, round_scoring_s,
      round_probe_s where every seed's rows record probe_seconds,
      round_device_upload_bytes, round_curriculum_fraction, and round_compute_only_s,
      init_background_s where the runs record compute_time_s); device_costs_seeds (seeds whose
      rows carry device_costs, i.e. can be swept); sweep_mismatch_s (the largest gap, over seeds,
      between the recomputed time at the run's own speed and its sim_time_s: a self-check).
    - global score against `target`: final_accuracy, best_smoothed_accuracy, reached,
      round_to_target, sim_time_to_target_s, compute_time_to_target_s, wall_time_to_target_s,
      upload_bytes_to_target; their ratios to the reference (X_ratio, for final_accuracy and the
      to-target times and bytes) and seed-by-seed ratios (X_paired_ratios, for sim and compute
      time and upload bytes); bandwidth_sweep: one dict per swept speed, {mbps,
      time_to_target_s, time_to_target_s_std, seeds (seeds with a time), ratio, paired_ratios}.
    - personalised score against `personalized_target`: the same names with the prefix
      `personalized_` (personalized_final_accuracy, personalized_reached,
      personalized_sim_time_to_target_s_ratio, personalized_bandwidth_sweep, ...).
    "accuracy" in a name means the compared metric (see `score_rows`). A seed that never reaches
    a target counts as missing for the to-target figures; `reached` says in how many it did.
    """
    table: dict[str, dict[str, Any]] = {}
    per_seed: dict[str, dict[str, list[Any]]] = {}
    sweeps: dict[str, dict[str, dict[float, list[float | None]]]] = {}
    scores = [("", GLOBAL, target), (PERSONALIZED, PERSONAL, personalized_target)]
    for label, seed_rows in runs.items():
        entry: dict[str, Any] = {"seeds": len(seed_rows)}
        per_seed[label], sweeps[label] = {}, {}
        for prefix, key, goal in scores:
            figures, sweep = score_per_seed(seed_rows, key, goal, sweep_mbps)
            entry[prefix + "reached"] = sum(v is not None for v in figures["round_to_target"])
            for name, values in figures.items():
                entry[prefix + name], entry[prefix + name + "_std"] = _mean_std(values)
                per_seed[label][prefix + name] = values
            sweeps[label][prefix] = sweep
        lasts = [rows[-1] if rows else {} for rows in seed_rows]
        totals = {
            # The last personalised score any device answered (summary.json's, for accuracy).
            "final_personalized_accuracy": [
                next((r[PERSONAL] for r in reversed(rows) if r.get(PERSONAL) is not None), None) for rows in seed_rows
            ],
            **{name: [last.get(name) for last in lasts] for name in ("wall_time_s", "sim_time_s", "compute_time_s", "upload_bytes")},
        }
        for name, values in totals.items():
            entry[name], entry[name + "_std"] = _mean_std(values)
        breakdowns = [round_breakdown(rows, (bandwidths or {}).get(label, 10.0)) for rows in seed_rows]
        for name in dict.fromkeys(n for b in breakdowns for n in b):
            if name == "round_probe_s" and not all(name in b for b in breakdowns):
                continue  # some seeds ran before the simulator recorded the probes: no mean of a part
            entry[name] = statistics.fmean(b[name] for b in breakdowns if name in b)
        entry["device_costs_seeds"] = sum(sim_time_at_bandwidth(rows, 1.0) is not None for rows in seed_rows)
        mismatches = [sweep_mismatch_s(rows, (bandwidths or {}).get(label, 10.0)) for rows in seed_rows]
        entry["sweep_mismatch_s"] = max((m for m in mismatches if m is not None), default=None)
        table[label] = entry
    if reference not in table:
        return table
    for label, entry in table.items():
        for prefix, _, _ in scores:
            for name in RATIO_FIGURES:
                ratio, paired = ratio_to_reference(per_seed[label][prefix + name], per_seed[reference][prefix + name])
                entry[prefix + name + "_ratio"] = ratio
                if name in PAIRED_FIGURES:
                    entry[prefix + name + "_paired_ratios"] = paired
            entry[prefix + "bandwidth_sweep"] = [
                _sweep_point(mbps, values, sweeps[reference][prefix][mbps]) for mbps, values in sweeps[label][prefix].items()
            ]
    return table


def _sweep_point(mbps: float, values: list[float | None], reference: list[float | None]) -> dict[str, Any]:
    mean, std = _mean_std(values)
    ratio, paired = ratio_to_reference(values, reference)
    return {"mbps": mbps, "time_to_target_s": mean, "time_to_target_s_std": std,
            "seeds": sum(v is not None for v in values), "ratio": ratio, "paired_ratios": paired}


def sweep_ratio(point: dict[str, Any]) -> float | None:
    """The ratio to plot or judge by: over all seeds where every seed of both reached the target,
    else the mean of the seed-by-seed ratios (None without any)."""
    if point.get("ratio") is not None:
        return point["ratio"]
    paired = point.get("paired_ratios") or []
    return statistics.fmean(paired) if paired else None


def winning_speeds(points: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(speeds where a method reaches the target sooner than the reference, speeds where it does
    not) among the swept ones with a ratio: the ratio crosses 1 between the two groups."""
    judged = [(p["mbps"], sweep_ratio(p)) for p in points]
    return [m for m, r in judged if r is not None and r < 1.0], [m for m, r in judged if r is not None and r >= 1.0]


def _fmt(value: float | None, std: float | None = None, digits: int = 3, scale: float = 1.0) -> str:
    if value is None:
        return "—"
    text = f"{value / scale:.{digits}f}"
    if std:
        text += f" ± {std / scale:.{digits}f}"
    return text


def _ratios(values: Sequence[float] | None) -> str:
    return ", ".join(f"{v:.2f}" for v in values) if values else "none"


def _speeds(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _score_table(table: dict[str, dict[str, Any]], prefix: str, metric: str, with_wall: bool) -> list[str]:
    name = "personalised " + metric if prefix else metric
    head = (
        f"| method | final {name} | best smoothed {name} | rounds to target | sim. time to target (s) | ratio "
        "| compute time to target (s) | ratio | upload to target (MB) | ratio |" + (" total wall (s) |" if with_wall else "") + " reached |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for label, e in table.items():
        def cell(key: str, digits: int = 3, scale: float = 1.0, spread: bool = True, e=e) -> str:
            return _fmt(e.get(prefix + key), e.get(prefix + key + "_std") if spread else None, digits, scale)

        cells = [
            label, cell("final_accuracy"), cell("best_smoothed_accuracy"), cell("round_to_target", 1, spread=False),
            cell("sim_time_to_target_s", 1), cell("sim_time_to_target_s_ratio", 2, spread=False),
            cell("compute_time_to_target_s", 1), cell("compute_time_to_target_s_ratio", 2, spread=False),
            cell("upload_bytes_to_target", 2, 1e6), cell("upload_bytes_to_target_ratio", 2, spread=False),
        ]
        if with_wall:
            cells.append(_fmt(e.get("wall_time_s"), e.get("wall_time_s_std"), 0))
        cells.append(f"{e.get(prefix + 'reached', 0)}/{e['seeds']}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _paired_line(table: dict[str, dict[str, Any]], prefix: str, reference: str) -> list[str]:
    # Runs from before the compute-only clock have no compute figures at all: leave them out.
    with_compute = any(e.get("compute_time_s") is not None for e in table.values())
    paired = [
        f"`{label}` time {_ratios(e.get(prefix + 'sim_time_to_target_s_paired_ratios'))}, "
        + (f"compute time {_ratios(e.get(prefix + 'compute_time_to_target_s_paired_ratios'))}, " if with_compute else "")
        + f"bytes {_ratios(e.get(prefix + 'upload_bytes_to_target_paired_ratios'))}"
        for label, e in table.items()
        if label != reference
    ]
    if not paired:
        return []
    return ["", f"Seed by seed, where both it and `{reference}` reached the target, to-target ratios: " + "; ".join(paired) + "."]


def _sweep_cell(point: dict[str, Any], reference: bool) -> str:
    text = _fmt(point.get("time_to_target_s"), None, 1)
    if reference or point.get("time_to_target_s") is None:
        return text
    if point.get("ratio") is not None:
        return f"{text} ({point['ratio']:.2f})"
    paired = point.get("paired_ratios") or []
    return f"{text} (seeds: {_ratios(paired)})" if paired else text


def _sweep_table(table: dict[str, dict[str, Any]], prefix: str, reference: str) -> list[str]:
    """Rows: link speeds, then compute only (infinite speed); columns: methods. Cells: mean time to
    target over seeds (s) and, in brackets, its ratio to the reference's."""
    labels = list(table)
    speeds = [p["mbps"] for p in table[labels[0]].get(prefix + "bandwidth_sweep", [])]
    if not speeds:
        return []
    lines = ["| Mbit/s | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for i, mbps in enumerate(speeds):
        cells = [_sweep_cell(table[label][prefix + "bandwidth_sweep"][i], label == reference) for label in labels]
        lines.append(f"| {mbps:g} | " + " | ".join(cells) + " |")
    compute = [
        _sweep_cell({"time_to_target_s": e.get(prefix + "compute_time_to_target_s"), "ratio": e.get(prefix + "compute_time_to_target_s_ratio"),
                     "paired_ratios": e.get(prefix + "compute_time_to_target_s_paired_ratios")}, label == reference)
        for label, e in table.items()
    ]
    lines.append("| ∞ (compute only) | " + " | ".join(compute) + " |")
    verdicts = []
    for label, e in table.items():
        if label == reference:
            continue
        wins, losses = winning_speeds(e.get(prefix + "bandwidth_sweep", []))
        if wins or losses:
            verdicts.append(f"`{label}` is faster at {_speeds(wins) or 'no swept speed'}"
                            + (f", slower at {_speeds(losses)}" if losses else "") + " Mbit/s")
    if verdicts:
        lines += ["", "; ".join(verdicts) + "."]
    return lines


def _sweep_disagrees(entry: dict[str, Any]) -> bool:
    # Costs and times are rounded in metrics.jsonl (0.1 ms, 1 ms): allow that, and 0.5 %.
    gap, total = entry.get("sweep_mismatch_s"), entry.get("sim_time_s") or 0.0
    return gap is not None and gap > 0.01 + 0.005 * total


def markdown_table(
    table: dict[str, dict[str, Any]],
    target: float,
    reference: str,
    note: str = "",
    metric: str = "accuracy",
    personalized_target: float | None = None,
    personalized_note: str = "",
    run_mbps: float | None = None,
) -> str:
    """comparison.md: the global score's table, the personalised score's, the bandwidth sweep for
    both, and where a round's simulated time goes."""
    lines = [
        f"Metric: global {metric}. Target: **{target:.3f}** (reached when the mean of the last {SMOOTHING_WINDOW} evaluations "
        f"first reaches it). Ratios are against `{reference}`. Mean ± spread over seeds. Compute time leaves out "
        "communication (per round the slowest device's compute, with what it waited for its background initialisation).",
        "",
        *_score_table(table, "", metric, with_wall=True),
    ]
    no_clock = [label for label, e in table.items() if e.get("compute_time_s") is None]
    if no_clock:
        note = (note + "; " if note else "") + (
            f"no compute time for {', '.join(f'`{m}`' for m in no_clock)}: runs made before the simulator recorded "
            "`compute_time_s`"
        )
    if note:
        lines += ["", note]
    lines += _paired_line(table, "", reference)
    target_text = "none" if personalized_target is None else f"**{personalized_target:.3f}**"
    lines += [
        "",
        f"Personalised {metric}: each device's own model (its personal layers with the current global ones) on its own "
        f"test part, all devices' predictions pooled into one score. Target: {target_text}.",
        "",
        *_score_table(table, PERSONALIZED, metric, with_wall=False),
    ]
    if personalized_note:
        lines += ["", personalized_note]
    if personalized_target is not None:
        lines += _paired_line(table, PERSONALIZED, reference)
    speed = f"the runs used {run_mbps:g} Mbit/s; " if run_mbps else ""
    swept = [label for label, e in table.items() if e.get("device_costs_seeds")]
    for prefix, name in (("", f"global {metric}"), (PERSONALIZED, f"personalised {metric}")):
        sweep = _sweep_table(table, prefix, reference) if swept else []
        if not sweep:
            continue
        lines += [
            "",
            f"Time to the {name} target if every link ran at another speed ({speed}recomputed from each round's per-device "
            f"compute seconds and bytes, no rerun). Cells: mean time to target over seeds (s), in brackets the ratio to "
            f"`{reference}` (all seeds; `seeds:` where only some seeds of both reached).",
            "",
            *sweep,
        ]
    off = [label for label, e in table.items() if _sweep_disagrees(e)]
    if off and swept:
        lines += [
            "",
            f"Caution: for {', '.join(f'`{m}`' for m in off)} the per-device costs do not add up to the runs' own simulated "
            "time at their link speed (`sweep_mismatch_s` in comparison.json); the sweep may not describe these runs.",
        ]
    missing = [label for label, e in table.items() if e.get("device_costs_seeds", 0) < e["seeds"]]
    if missing and any(e.get("bandwidth_sweep") for e in table.values()):
        lines += [
            "",
            f"Bandwidth sweep {'unavailable' if not swept else 'incomplete'}: the runs of {', '.join(f'`{m}`' for m in missing)} "
            "carry no per-device costs (`device_costs`); rerun them with the newer simulator to sweep link speeds.",
        ]
    if all("round_sim_s" in e for e in table.values()):
        with_compute = all("round_compute_only_s" in e for e in table.values())
        with_probe = all("round_probe_s" in e for e in table.values())
        lines += [
            "",
            "Where a round's simulated time goes (mean over rounds and seeds; compute includes scoring" + (" and probes" if with_probe else "")
            + ("; compute only: the slowest device's compute, measured; init: a device's one-off initialisation-phase scoring, in the background" if with_compute else "")
            + "):",
            "",
            "| method | sim. s / round | compute s | of which scoring s |" + (" of which probes s |" if with_probe else "")
            + " transfer s | upload MB / device | curriculum fraction |"
            + (" compute only s / round | init s / device |" if with_compute else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if with_probe else "") + ("---|---|" if with_compute else ""),
        ]
        for label, e in table.items():
            lines.append(
                f"| {label} | {e['round_sim_s']:.2f} | {e['round_compute_s']:.2f} | {e['round_scoring_s']:.2f} | "
                + (f"{e['round_probe_s']:.2f} | " if with_probe else "")
                + f"{e['round_transfer_s']:.2f} | {e['round_device_upload_bytes'] / 1e6:.2f} | {e['round_curriculum_fraction']:.2f} |"
                + (f" {e['round_compute_only_s']:.2f} | {e['init_background_s']:.2f} |" if with_compute else "")
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


def plot_bandwidth_sweep(
    table: dict[str, dict[str, Any]], reference: str, path: Path, metric: str = "accuracy", run_mbps: float | None = None
) -> bool:
    """Time-to-target ratio against link speed (log x), global and personalised score side by side:
    one line per method other than the reference, a line at 1 (as fast as the reference) and a
    dashed one at 1/3 (three times faster); the dotted line in a method's colour is its
    compute-only ratio, where the curve tends as the link gets faster. Returns False, writing
    nothing, when no method has a ratio at any speed (runs without device_costs)."""
    panels = [("", f"global {metric}"), (PERSONALIZED, f"personalised {metric}")]
    curves = {
        (prefix, label): [(p["mbps"], sweep_ratio(p)) for p in e.get(prefix + "bandwidth_sweep", []) if sweep_ratio(p) is not None]
        for prefix, _ in panels
        for label, e in table.items()
        if label != reference
    }
    if not any(curves.values()):
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    palette = plt.get_cmap("tab10" if len(table) <= 10 else "tab20")
    for ax, (prefix, name) in zip(axes, panels):
        for i, (label, e) in enumerate(table.items()):
            points = curves.get((prefix, label))
            if not points:
                continue
            color = palette(i % palette.N)
            ax.plot([m for m, _ in points], [r for _, r in points], "o-", color=color, lw=2, label=label)
            compute = e.get(prefix + "compute_time_to_target_s_ratio")
            paired = e.get(prefix + "compute_time_to_target_s_paired_ratios") or []
            compute = compute if compute is not None else (statistics.fmean(paired) if paired else None)
            if compute is not None:
                ax.axhline(compute, color=color, ls=":", lw=1.2, label=f"{label}, compute only")
        ax.axhline(1.0, color="black", lw=1)
        ax.axhline(1 / 3, color="black", ls="--", lw=1, label="1/3")
        if run_mbps:
            ax.axvline(run_mbps, color="grey", alpha=0.4, lw=6, label=f"the runs' {run_mbps:g} Mbit/s")
        ax.set_xscale("log")
        speeds = sorted({m for points in curves.values() for m, _ in points})
        ax.set_xticks(speeds, [f"{m:g}" for m in speeds])
        ax.minorticks_off()
        ax.set_xlabel("link speed (Mbit/s)")
        ax.set_title(f"time to the {name} target")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"time to target / {reference}'s (below 1: faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    personalized_target: float | None = None,
    sweep_mbps: Sequence[float] = DEFAULT_SWEEP_MBPS,
    preflight: Callable[[RunConfig], None] | None = None,
) -> dict[str, Any]:
    """Run every method for every seed, one after another in this process, then write the report:
    comparison.json (keys in `summarise`), comparison.md, comparison.png and bandwidth.png.

    target: an explicit global score; otherwise `target_share` x the reference method's best
    smoothed global score (mean over seeds). personalized_target: the same for the personalised
    score, by default `target_share` x the reference's best smoothed personalised score.
    The reference is fedavg if listed, else the first method.
    sweep_mbps: link speeds at which to recompute the time to target from the runs' device costs.
    report_only: rebuild the report from finished run folders without running anything.
    preflight: a check of each config's data and model (fibecfed.checks.preflight), run on every
    config before the comparison folder is created or the first run starts.
    """
    from fibecfed import runtimes

    if metric not in ("accuracy", "f1", "mcc"):
        raise ConfigError(f"--metric must be accuracy, f1 or mcc, got {metric!r}")
    lowest = -1.0 if metric == "mcc" else 0.0
    for flag, value in (("--target", target), ("--personalized-target", personalized_target)):
        if value is not None and not lowest <= value <= 1.0:
            raise ConfigError(f"{flag} must be in [{lowest:g}, 1] (the {metric} scale), got {value}")
    if not 0.0 < target_share <= 1.0:
        raise ConfigError(f"--target-share must be in (0, 1], got {target_share}")
    out = Path(out_dir)
    labels = [m.label for m in methods]
    reference = reference or ("fedavg" if "fedavg" in labels else labels[0])
    if reference not in labels:
        raise ConfigError(f"reference method {reference!r} is not among --methods ({', '.join(labels)})")
    # Validate every config before the first (long) run starts.
    configs = {
        (m.label, seed): load_config(config, [*overrides, *m.overrides, f"seed={seed}"]) for m in methods for seed in seeds
    }
    if preflight is not None and not report_only:
        checked: list[dict[str, Any]] = []
        for run_config in configs.values():
            # Methods differ in switches that data and model checks do not read: check each
            # distinct (seed, data, partition, model, lora) once.
            key = {part: getattr(run_config, part) for part in ("seed", "data", "partition", "model", "lora")}
            key["devices_per_round"] = run_config.federation.devices_per_round
            if key not in checked:
                checked.append(key)
                preflight(run_config)
    # Every run folder that holds a run must hold a run of its config: refused now, not hours in.
    for (label, seed), run_config in configs.items():
        check_run_folder(out / folder_name(label) / f"seed{seed}", run_config)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot use {out} as the comparison folder (--out): {exc.strerror or exc}") from None
    runs: dict[str, list[list[dict[str, Any]]]] = {m.label: [] for m in methods}
    # Seed by seed, every method in turn: on a shared machine a slow spell then slows the runs
    # of one seed of every method alike, not all the seeds of one method (the paired ratios).
    for seed in seeds:
        for m in methods:
            run_dir = out / folder_name(m.label) / f"seed{seed}"
            logger.info("running %s, seed %d -> %s", m.label, seed, run_dir)
            if progress:
                print(f"== {m.label}, seed {seed} -> {run_dir}", flush=True)
            if report_only:
                if not (run_dir / "summary.json").is_file():
                    raise ConfigError(f"no finished run in {run_dir}; run the comparison without --report-only")
            elif finished_run(run_dir, configs[(m.label, seed)]):
                logger.info("%s, seed %d: reusing the finished run in %s", m.label, seed, run_dir)
            else:
                (run_one or (lambda c, d: runtimes.run(c, d, progress=progress)))(configs[(m.label, seed)], run_dir)
            runs[m.label].append(score_rows(outputs.read_metrics(run_dir / "metrics.jsonl"), metric))

    ref_alone = summarise({reference: runs[reference]}, None, reference)[reference]
    if target is None:
        ref_best = ref_alone["best_smoothed_accuracy"]
        if ref_best is None:
            raise ConfigError(f"{reference}'s runs have no evaluated {metric}; give --target")
        target = target_share * ref_best
        target_note = f"target = {target_share:.2f} x {reference}'s best smoothed {metric} ({ref_best:.3f})"
    else:
        target_note = "target given explicitly"
    if personalized_target is not None:
        personalized_note = "personalised target given explicitly"
    elif ref_alone[PERSONALIZED + "best_smoothed_accuracy"] is None:
        personalized_note = f"no personalised target: {reference}'s runs have no personalised {metric}"
    else:
        ref_best = ref_alone[PERSONALIZED + "best_smoothed_accuracy"]
        personalized_target = target_share * ref_best
        personalized_note = f"personalised target = {target_share:.2f} x {reference}'s best smoothed personalised {metric} ({ref_best:.3f})"
    measures = {personalized_measure(rows) for seed_rows in runs.values() for rows in seed_rows}
    measure = measures.pop() if len(measures) == 1 else "mixed"
    if measure != "every device":
        personalized_note += (
            "; note: some or all of these runs predate the every-device score, so their personalised score covers only "
            "the devices sampled in each round" if measure == "mixed" else
            "; note: these runs predate the every-device score, so their personalised score covers only the devices "
            "sampled in each round"
        )
    short = {
        f"{label} seed {seed}": rounds
        for label, seed_rows in runs.items() for seed, rows in zip(seeds, seed_rows)
        if (rounds := short_personalized_rounds(rows))
    }
    if short:
        personalized_note += "; note: in some rounds the personalised score pooled fewer devices than in the run's other rounds (devices that failed their evaluation): " + ", ".join(
            f"{run} rounds {', '.join(map(str, rounds))}" for run, rounds in short.items())
    bandwidths = {m.label: configs[(m.label, seeds[0])].federation.bandwidth_mbps for m in methods}
    sweep_mbps = sorted(set(sweep_mbps))
    table = summarise(runs, target, reference, bandwidths, personalized_target, sweep_mbps)
    run_mbps = bandwidths[reference] if len(set(bandwidths.values())) == 1 else None
    result = {
        "target": target,
        "target_rule": target_note,
        "personalized_target": personalized_target,
        "personalized_target_rule": personalized_note,
        "personalized_measure": measure,
        "reference": reference,
        "smoothing": f"trailing mean of the last {SMOOTHING_WINDOW} evaluations",
        "seeds": list(seeds),
        "metric": metric,
        "overrides": list(overrides),
        "run_bandwidth_mbps": bandwidths,
        "sweep_bandwidths_mbps": sweep_mbps,
        "methods": {m.label: {"overrides": m.overrides, **table[m.label]} for m in methods},
    }
    outputs.write_json(out / "comparison.json", result)
    outputs.atomic_write_text(
        out / "comparison.md",
        markdown_table(table, target, reference, target_note, metric, personalized_target, personalized_note, run_mbps),
    )
    plot_comparison(runs, out / "comparison.png", title=" vs ".join(labels) + ("" if metric == "accuracy" else f" ({metric})"))
    if not plot_bandwidth_sweep(table, reference, out / "bandwidth.png", metric, run_mbps):
        # Runs without device costs: no plot, and none left from an earlier report to contradict this one.
        (out / "bandwidth.png").unlink(missing_ok=True)
    return result


def finished_run(run_dir: Path, config: RunConfig) -> bool:
    """Whether `run_dir` holds a finished run of `config`: its config.json is there (and
    check_run_folder has refused it if it describes another config), the summary.json a run
    writes at its end says it did all the config's rounds, and its metrics reach the last one. A
    comparison reuses such a run as it is: resuming it would load the data and the model only to
    find no round left, and two comparisons that share the folder would rewrite its device files
    at the same time. Committed results (metrics and summary, no config.json) are not reused: a
    comparison over them runs them again, which is how they are reproduced."""
    if not (run_dir / "config.json").is_file():
        return False
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = outputs.read_metrics(run_dir / "metrics.jsonl")
    except (OSError, ValueError):
        return False
    rounds = config.federation.rounds
    return isinstance(summary, dict) and summary.get("rounds") == rounds and bool(rows) and rows[-1].get("round") == rounds


def check_run_folder(run_dir: Path, config: RunConfig) -> None:
    """Refuse a method's run folder that holds a run of another config (its config.json, written
    when a run starts): resuming it would mix two runs, and a report would give one the other's
    settings. Only a folder with a checkpoint or a summary holds a run: a config.json alone is
    left by a run that failed before its first round, which a run simply starts over. Folders
    without config.json (results committed without it) are not checked."""
    from fibecfed.simulator import different_run_error, saved_config_differences

    if not ((run_dir / "checkpoint.pt").is_file() or (run_dir / "summary.json").is_file()):
        return
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # none, or unreadable: a resume still checks the run's checkpoint
    if not isinstance(saved, dict):
        return
    differences = saved_config_differences(saved, config)
    if differences:
        raise different_run_error(run_dir, differences, "use another --out, or delete that folder to run it again")


def folder_name(label: str) -> str:
    """A method label's run folder name in a comparison's --out (fibecfed[a=b] -> fibecfed_a_b)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_")
