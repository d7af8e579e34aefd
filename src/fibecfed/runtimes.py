"""One run of a config on the runtime it names (federation.runtime): in-process or Flower."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fibecfed.config import RunConfig
from fibecfed.errors import FibecfedError


def run(config: RunConfig, out: str | Path, progress: bool = False, fresh: bool = False) -> dict[str, Any]:
    """Run `config` into `out`; return the summary. Both runtimes resume an unfinished run in
    `out`, unless `fresh`: then a checkpoint there is ignored and replaced. On Flower's simulation
    runtime the virtual nodes keep the devices' states in `out/node-states`, so that they survive
    the run's processes."""
    if config.federation.runtime == "flower":
        try:
            from fibecfed.flower.simulation import run_flower_simulation
        except ImportError as exc:
            raise FibecfedError(f"{exc} (or set federation.runtime=inprocess)") from None
        return run_flower_simulation(config, out, state_dir=Path(out) / "node-states", fresh=fresh)
    from fibecfed.simulator import Simulation

    return Simulation(config, out, progress=progress, resume=not fresh).run()
