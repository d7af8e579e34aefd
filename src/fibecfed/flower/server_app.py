"""The Flower ServerApp: prepares the run, maps devices to SuperNodes, and lets the strategy
drive `fibecfed.server.Server` round by round; writes the same files as `fibecfed run`.

Run config (pyproject.toml [tool.flwr.app.config], or `flwr run . --run-config ...`):
`config` (a YAML file or preset name; "" = the default), `overrides` (space-separated
key=value, as on the fibecfed command line), `out` (the run folder, on the SuperLink's machine).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fibecfed import outputs
from fibecfed.config import RunConfig, config_to_dict, load_config
from fibecfed.errors import ConfigError
from fibecfed.flower import records
from fibecfed.flower.strategy import FibecFedStrategy
from fibecfed.simulator import (
    CHECKPOINT,
    check_same_data,
    different_run_error,
    prepare,
    saved_config_differences,
    write_run_outputs,
)

# A deployment's run folder is the ServerApp's: starting over means deleting its checkpoint.
START_OVER = "use another out folder, or delete its checkpoint.pt to start over (with the fibecfed CLI: another --out, or --fresh)"

logger = logging.getLogger(__name__)


def run_server(grid: Grid, config: RunConfig, out: Path, timeout: float | None = None, fresh: bool = False) -> dict[str, Any]:
    """The whole run on the server side; returns the summary (also in out/summary.json).

    `timeout` (default: federation.device_timeout_s) bounds each round's wait for replies.
    """
    timeout = config.federation.device_timeout_s if timeout is None else timeout
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = None if fresh else existing_checkpoint(config, out)
    prepared = prepare(config)
    strategy = FibecFedStrategy(config, prepared, out / "metrics.jsonl", timeout=timeout, checkpoint_path=out / CHECKPOINT)
    if checkpoint is not None:
        check_same_data(checkpoint, strategy.data_fingerprint, out, START_OVER)
    if fresh:
        # An earlier run's checkpoint is not this run's: gone only now that this run's data and model loaded.
        (out / CHECKPOINT).unlink(missing_ok=True)
    # Written once the data and model loaded (as the in-process runtime does).
    outputs.write_json(out / "config.json", config_to_dict(config))
    if checkpoint is not None:
        strategy.resume(checkpoint)
        # metrics.jsonl may hold a row of the round the checkpoint lacks: the round is redone.
        outputs.write_metrics(out / "metrics.jsonl", strategy.server.history)
        logger.info("resuming %s after round %d", out, strategy.offset)
    remaining = config.federation.rounds - strategy.offset
    if remaining > 0:
        strategy.connect(grid)
        strategy.start(
            grid,
            initial_arrays=records.state_to_record(strategy.server.global_state),
            num_rounds=remaining,
            timeout=timeout,
            evaluate_fn=strategy.evaluate_fn,
        )
    return write_run_outputs(config, out, prepared, strategy.server.global_state, strategy.server.history)


def existing_checkpoint(config: RunConfig, out: Path) -> dict[str, Any] | None:
    """The checkpoint of an unfinished run of the same config in `out`, to go on from (None: start)."""
    checkpoint = outputs.load_checkpoint(out / CHECKPOINT)
    if checkpoint is None:
        return None
    if checkpoint.get("runtime") != "flower":
        raise ConfigError(f"{out} holds a run of the in-process runtime; resume it with federation.runtime=inprocess, "
                          "or use another out folder (or delete its checkpoint.pt to start over)")
    differences = saved_config_differences(checkpoint["config"], config)
    if differences:
        raise different_run_error(out, differences, START_OVER)
    return checkpoint


def config_from_run_config(run_config: dict[str, Any]) -> tuple[RunConfig, Path]:
    """The fibecfed config and run folder from Flower's run config."""
    overrides = shlex.split(str(run_config.get("overrides", "")))
    config = load_config(str(run_config.get("config", "")) or None, overrides)
    return config, Path(str(run_config.get("out", "runs/flower")))


def make_server_app(config: RunConfig | None = None, out: Path | None = None, fresh: bool = False) -> ServerApp:
    """A ServerApp for `config` and `out`, or (None) for those of Flower's run config; `fresh`:
    ignore a checkpoint in `out` and start over."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg, folder = (config, out) if config is not None else config_from_run_config(dict(context.run_config))
        run_server(grid, cfg, Path(folder), fresh=fresh)

    return app


app = make_server_app()
