"""Every device's private state on disk, one file per device, behind a small in-memory cache.

A run with K devices keeps K `DeviceState`s (personal adapter entries, Fisher momentum,
difficulty scores): about 2.2 MB a device for MiniLM, so 2.2 GB at 1,000 devices. Only the
devices of the current round need theirs in memory. The store keeps each device's last committed
state in `<folder>/<device>.pt` and at most `cache_size` of them in memory (least recently used
first out); a round's new states wait, staged, until the checkpoint that describes the round is
on disk (`commit`).

Crash safety (the simulator's order): stage the round's states -> write the checkpoint with the
staged states in it (atomic) -> `commit` writes the device files (each atomic). A kill before the
checkpoint is durable leaves the previous checkpoint and no device file of the round; a kill
after it leaves files of round r-1 or r, and resume re-applies the checkpoint's states
(`restore`): device files are never ahead of the checkpoint.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fibecfed import outputs
from fibecfed.federated import DeviceState
from fibecfed.masks import fisher_sums

logger = logging.getLogger(__name__)


def state_to_payload(state: DeviceState) -> dict[str, Any]:
    """A DeviceState as plain containers for torch.save (no copy of the tensors)."""
    return {"personal": state.personal, "participations": state.participations, "extra": state.extra}


def state_from_payload(payload: Mapping[str, Any]) -> DeviceState:
    """The DeviceState of `state_to_payload` (or of `dataclasses.asdict`, as format-1 checkpoints
    hold it); a full-diagonal Fisher momentum of an older fibecfed becomes its sums
    (masks.fisher_sums)."""
    extra = dict(payload.get("extra") or {})
    if extra.get("fisher"):
        extra["fisher"] = fisher_sums(extra["fisher"])
    return DeviceState(personal=dict(payload.get("personal") or {}), participations=int(payload.get("participations", 0)), extra=extra)


class DeviceStore:
    """Per-device states in `folder` (`<device>.pt`), at most `cache_size` committed ones in memory.

    `checkout` gives a round a working copy; `stage` holds its result until `commit`; `discard`
    forgets it (a rejected update: the device keeps its old state). Reading (`checkout`,
    `states`) sees staged states before committed ones.
    """

    def __init__(self, folder: str | Path, cache_size: int = 32):
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.folder = Path(folder)
        self.cache_size = cache_size
        self._cache: OrderedDict[int, DeviceState] = OrderedDict()
        self._pending: dict[int, DeviceState] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        # A "<device>.pt.tmp" a kill left behind is ignored: its target holds the previous state.
        self._on_disk: set[int] = {int(p.stem) for p in self.folder.glob("*.pt") if p.stem.isdigit()}

    def path(self, device: int) -> Path:
        return self.folder / f"{device}.pt"

    def devices(self) -> list[int]:
        """Every device with a state (committed or staged), in order."""
        return sorted(self._on_disk | set(self._pending))

    @property
    def cached(self) -> int:
        """How many committed states are in memory now (at most cache_size)."""
        return len(self._cache)

    def _committed(self, device: int, remember: bool = True) -> DeviceState | None:
        """The committed state (shared, not a copy), through the cache; None if the device has none."""
        if device in self._cache:
            self._cache.move_to_end(device)
            return self._cache[device]
        if device not in self._on_disk:
            return None
        state = state_from_payload(torch.load(self.path(device), map_location="cpu", weights_only=False))
        if remember:
            self._remember(device, state)
        return state

    def _remember(self, device: int, state: DeviceState) -> None:
        if self.cache_size == 0:
            return
        self._cache[device] = state
        self._cache.move_to_end(device)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def checkout(self, device: int) -> DeviceState:
        """A working copy of the device's state (a fresh DeviceState for a device never seen):
        the round may change it freely; nothing in the store changes until `stage`."""
        state = self._pending.get(device) or self._committed(device)
        return copy.deepcopy(state) if state is not None else DeviceState()

    def stage(self, device: int, state: DeviceState) -> None:
        """The device's state after a round; kept in memory until `commit` (or `discard`)."""
        self._pending[device] = state

    def discard(self, device: int) -> None:
        """Forget the device's staged state: it keeps the one it had (a rejected update)."""
        self._pending.pop(device, None)

    def staged(self) -> dict[int, DeviceState]:
        """The staged states by device (shared, not copies): what a checkpoint saves."""
        return dict(sorted(self._pending.items()))

    def commit(self) -> int:
        """Write every staged state to its file (each atomically) and make it the committed one.

        Call it only once the checkpoint holding these states is durable. Returns bytes written.
        """
        written = 0
        for device, state in sorted(self._pending.items()):
            written += outputs.save_checkpoint(self.path(device), state_to_payload(state), sync_folder=False)
            self._on_disk.add(device)
            self._remember(device, state)
        if self._pending:
            outputs.fsync_folder(self.folder)
        self._pending.clear()
        return written

    def restore(self, states: Mapping[int, DeviceState]) -> int:
        """Resume: re-apply a checkpoint's changed states (a kill may have come before their
        files were written), then commit them. Returns bytes written."""
        self._pending.clear()
        for device, state in states.items():
            self.stage(int(device), state)
        return self.commit()

    def states(self) -> Iterator[tuple[int, DeviceState]]:
        """(device, state) of every device with a state, in device order, one at a time (read
        only; states outside the cache are loaded for the moment and not kept)."""
        for device in self.devices():
            state = self._pending.get(device) or self._committed(device, remember=False)
            assert state is not None
            yield device, state
