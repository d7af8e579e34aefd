"""`fibecfed run federation.runtime=flower`: the run on Flower's simulation runtime (Ray), one
virtual SuperNode per device."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fibecfed.config import RunConfig
from fibecfed.data.loaders import load_task
from fibecfed.data.partition import partition_task
from fibecfed.errors import FibecfedError

logger = logging.getLogger(__name__)


def num_devices(config: RunConfig) -> int:
    """The partition's device count (under the natural partition, the data's groups decide it)."""
    if config.partition.scheme != "natural":
        return config.partition.num_devices
    task = load_task(config.data, config.seed)
    return len(partition_task(task, config.partition, config.seed, config.data.group_column is not None)[0])


def run_flower_simulation(
    config: RunConfig, out: str | Path, *, cpus_per_node: float = 1.0, state_dir: str | Path | None = None,
    client_app: Any = None, fresh: bool = False,
) -> dict[str, Any]:
    """Run `config` with the ServerApp and ClientApp on Flower's simulation runtime; returns
    the summary. `client_app`: another ClientApp (tests), default fibecfed's. `fresh`: start
    over, whatever checkpoint `out` holds (replaced once the ServerApp's data and model loaded)."""
    from flwr.simulation import run_simulation

    from fibecfed.flower.client_app import make_client_app
    from fibecfed.flower.server_app import make_server_app

    out = Path(out)
    summary = out / "summary.json"
    # A summary left by an earlier run in `out` must not pass for this run's (it stays if this
    # run is refused: the folder's run is then still that one).
    # (inode, mtime): outputs.atomic_write_text renames a new file over it, so a rewrite always
    # changes the inode, even where the file system keeps coarse times.
    before = (summary.stat().st_ino, summary.stat().st_mtime_ns) if summary.is_file() else None
    run_simulation(
        server_app=make_server_app(config, out, fresh=fresh),
        client_app=client_app if client_app is not None else make_client_app(state_dir),
        num_supernodes=num_devices(config),
        backend_config={"client_resources": {"num_cpus": cpus_per_node, "num_gpus": 0.0}},
    )
    if not summary.is_file() or (summary.stat().st_ino, summary.stat().st_mtime_ns) == before:
        raise FibecfedError(f"the Flower simulation ended without {summary}; see the log above for the ServerApp's error")
    return json.loads(summary.read_text())
