"""fibecfed on Flower (Message API): a ServerApp over `fibecfed.server.Server`, a ClientApp per
device, and `run_flower_simulation` for Flower's simulation runtime.

Needs the `flower` extra: `pip install 'fibecfed[flower]'` (flwr[simulation]==1.42.0).
`import fibecfed` and the in-process simulator work without it.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fibecfed.flower needs Flower: pip install 'fibecfed[flower]' (flwr[simulation]==1.42.0)"
    ) from exc
