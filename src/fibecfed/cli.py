"""Command line: `fibecfed run [--config FILE] [key=value ...] [--out DIR]`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fibecfed.errors import ConfigError, FibecfedError

logger = logging.getLogger("fibecfed.cli")


def quiet_libraries() -> None:
    # Library chatter (weight-loading reports, per-file progress bars) would bury our progress bar.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _score(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def cmd_run(args: argparse.Namespace) -> int:
    from fibecfed import runtimes
    from fibecfed.checks import preflight
    from fibecfed.config import load_config

    config = load_config(args.config, args.overrides)
    # Bad data or a bad model folder is refused here, before --fresh deletes a checkpoint or the
    # run writes its config.json.
    preflight(config)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    make_folder(out)
    args.resolved_out = out
    print(f"fibecfed run: {config.method.name} on {config.data.name} with {config.model.name}, "
          f"{config.partition.num_devices} devices, {config.federation.rounds} rounds, "
          f"{config.federation.runtime} runtime -> {out}", file=sys.stderr)
    summary = runtimes.run(config, out, progress=not args.no_progress, fresh=args.fresh)
    print(
        f"accuracy {summary['initial_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
        f"(best {summary['best_accuracy']:.3f}, majority class {summary['majority_rate']:.3f}); "
        f"personalised (every device's own model) {_score(summary.get('final_personalized_accuracy'))}; "
        f"wall {summary['wall_time_s']:.0f} s, simulated {summary['sim_time_s']:.0f} s "
        f"(compute only {summary.get('compute_time_s') or 0:.0f} s), "
        f"uploaded {summary['upload_bytes'] / 1e6:.1f} MB"
    )
    rejected = {reason: n for reason, n in (summary.get("rejected") or {}).items() if n}
    if rejected:
        print("updates left out (devices x rounds), by reason: " + ", ".join(f"{n} {reason}" for reason, n in rejected.items()))
    print(f"outputs in {out}: metrics.jsonl, summary.json, accuracy.png, adapter/")
    return 0


def make_folder(out: Path) -> None:
    """Create the run folder (after the checks: a refused run creates nothing), or say why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot use {out} as the run folder (--out): {exc.strerror or exc}") from None


def resume_hint(args: argparse.Namespace) -> str:
    """How to go on after an interrupt: the same command, with the folder named if it was not,
    and without --fresh (which would start over again)."""
    if args.command == "export":
        return "interrupted; run the same command again (it writes every device's folder anew)"
    out = getattr(args, "resolved_out", None)
    changes = []
    if getattr(args, "fresh", False):
        changes.append("without --fresh")
    if out is not None and not args.out:
        changes.append(f"with --out {out}")
    if changes:
        return f"interrupted; to resume from the last completed round, run the same command {' and '.join(changes)}"
    return "interrupted; run the same command again to resume from the last completed round"


def cmd_compare(args: argparse.Namespace) -> int:
    from fibecfed.checks import preflight
    from fibecfed.compare import DEFAULT_SWEEP_MBPS, compare, parse_bandwidths, parse_methods, parse_seeds

    methods = parse_methods(args.methods)
    sweep = parse_bandwidths(args.bandwidths) if args.bandwidths else list(DEFAULT_SWEEP_MBPS)
    seeds = parse_seeds(args.seeds)
    out = Path(args.out) if args.out else Path("runs") / ("compare-" + time.strftime("%Y%m%d-%H%M%S"))
    args.resolved_out = out
    result = compare(
        methods, seeds, out, config=args.config, overrides=args.overrides, target=args.target,
        target_share=args.target_share, reference=args.reference, progress=not args.no_progress,
        metric=args.metric, report_only=args.report_only, personalized_target=args.personalized_target, sweep_mbps=sweep,
        preflight=preflight,
    )
    print((out / "comparison.md").read_text())
    plots = "comparison.png, bandwidth.png" if (out / "bandwidth.png").is_file() else "comparison.png"
    print(f"outputs in {out}: comparison.json, comparison.md, {plots}, one run folder per method and seed")
    return 0 if result else 1


def cmd_export(args: argparse.Namespace) -> int:
    from fibecfed.export import export_device_adapters

    result = export_device_adapters(args.run, args.devices, args.out)
    score = result["personalized_accuracy"]
    print(f"each device's own model after round {result['round']} of {args.run}"
          + (f" (pooled personalised accuracy {score:.3f})" if score is not None else " (a round that was not evaluated)"))
    for device, info in result["devices"].items():
        what = f"{info['own_entries']} entries of its own" if info["trained"] else "never trained: the global model"
        print(f"device {device}: {info['folder']} ({what})")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"run": cmd_run, "compare": cmd_compare, "export": cmd_export}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fibecfed", description="Federated LoRA fine-tuning (FibecFed).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="fine-tune across simulated devices, in-process")
    run.add_argument("--config", help="a YAML config file or a preset name (default: the embedded default)")
    run.add_argument("--out", help="run folder (default: runs/<timestamp>, printed at the start); an unfinished run "
                     "there resumes")
    run.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out and start over")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. federation.rounds=5")

    cmp = sub.add_parser("compare", help="run several methods on the same partition and seeds; write a report")
    cmp.add_argument("--methods", default="fibecfed,fedavg,fedprox",
                     help="comma-separated: fedavg, fedprox, fibecfed, fibecfed-no-curriculum, ... or NAME[key=value;...]")
    cmp.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    cmp.add_argument("--config", help="a YAML config file or a preset name")
    cmp.add_argument("--out", help="comparison folder (default: runs/compare-<timestamp>); unfinished runs resume")
    cmp.add_argument("--target", type=float, help="target accuracy (default: a share of the reference's best)")
    cmp.add_argument("--target-share", type=float, default=0.95,
                     help="share of the reference's best smoothed score that makes either default target")
    cmp.add_argument("--personalized-target", type=float,
                     help="target personalised score (default: --target-share x the reference's best smoothed one)")
    cmp.add_argument("--bandwidths",
                     help="comma-separated link speeds in Mbit/s at which to recompute the time to target "
                          "(default: 1,2,5,10,20,50,100,1000)")
    cmp.add_argument("--reference", help="method the ratios are against (default: fedavg if listed)")
    cmp.add_argument("--metric", default="accuracy", choices=["accuracy", "f1", "mcc"], help="global metric to compare on")
    cmp.add_argument("--no-progress", action="store_true", help="no progress bars")
    cmp.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs, run nothing")
    cmp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every method")

    exp = sub.add_parser("export", help="write each device's own model (its personal layers over the global ones) "
                                        "of an in-process run as a peft adapter")
    exp.add_argument("run", help="the run folder (fibecfed run --out)")
    exp.add_argument("--devices", default="all", help="comma-separated device numbers, or all (default)")
    exp.add_argument("--out", help="where to write device-<d>/ folders (default: RUN/device-adapters)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Options and key=value overrides in any order.

    argparse gives a nargs="*" positional only its first run of values; the overrides after an
    option (`run method=fibecfed --out DIR data.name=sst2`) come back as extras, so those are
    appended to the overrides, and anything else among the extras is still an error.
    """
    args, extras = parser.parse_known_args(argv)
    stray = [e for e in extras if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extras:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = [*args.overrides, *extras]
    return args


def one_line(message: str) -> str:
    """A message as one line: some messages quote text that has line breaks (YAML errors)."""
    return " / ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        quiet_libraries()
        return COMMANDS[args.command](args)
    except FibecfedError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(resume_hint(args), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
