"""The Flower ClientApp: one SuperNode is one device (its partition id from the node config).

Each handler only decodes, calls fibecfed's device-side functions (the same `train_device`,
`probe_device` the in-process simulator calls) and encodes. The device's private state
(DeviceState: personal adapter entries, Fisher momentum, difficulty scores) lives in
`Context.state` as records and never leaves the node.

Non-exchanged keys. `device_round` reads the global value of a key it does not exchange when the
device lacks a personal value for it: at the device's first round, and for a layer that has just
stopped being aggregated. The node rebuilds the initial global state itself (the same pretrained
model and the same seeded LoRA and head initialisation as the server's `prepare`), so a key whose
global value is still the initial one costs nothing; the server sends the global values of the
other such keys ("stale" keys: aggregated once, not now) with the plan, and those bytes are
counted as download (see strategy.FibecFedStrategy).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fibecfed import faults, outputs
from fibecfed.config import RunConfig
from fibecfed.device_store import state_from_payload, state_to_payload
from fibecfed.federated import DeviceState, ProbeSettings, check_update
from fibecfed.flower import records
from fibecfed.layers import transformer_layers
from fibecfed.simulator import Prepared, prepare, probe_device, train_device

logger = logging.getLogger(__name__)

# An injected hang sleeps this much past the server's deadline (federation.device_timeout_s),
# which started before the message reached the node.
HANG_MARGIN_S = 1.0


@dataclass
class NodeData:
    """A node's prepared data and model, and the run's initial global adapter."""

    config: RunConfig
    prepared: Prepared
    initial_state: dict[str, torch.Tensor]
    initial_fingerprint: str


# The prepared model and data, per process and run config: loading and tokenising happen once,
# not every round (a SuperNode's ClientApp process, or a simulation actor, serves many rounds).
_PREPARED: dict[str, NodeData] = {}


def node_data(config_json: str) -> NodeData:
    cached = _PREPARED.get(config_json)
    if cached is None:
        _PREPARED.clear()  # one run at a time: do not keep an old run's model alive
        config = records.decode_config(config_json)
        prepared = prepare(config)
        initial = prepared.runner.state()
        cached = NodeData(config, prepared, initial, records.state_fingerprint(initial))
        _PREPARED[config_json] = cached
    return cached


def partition_id(context: Context) -> int:
    """This node's device: `partition-id` of the node config (the simulation runtime sets it)."""
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config 'partition-id=N'")
    return int(context.node_config["partition-id"])


def _check_device(order_device: int, context: Context) -> int:
    device = partition_id(context)
    if order_device != device:
        raise ValueError(f"a message for device {order_device} reached the node of partition {device}")
    return device


def identify(msg: Message, context: Context) -> Message:
    """Which device this node is (the server maps devices to nodes with it)."""
    return Message(RecordDict({"node": ConfigRecord({"partition-id": partition_id(context)})}), reply_to=msg)


def _memory_states(context: Context, run: str) -> list[DeviceState]:
    """This device's states of run `run` in Context.state: after its last kept round, and the one
    that round started from."""
    tag = context.state.config_records.get(records.RUN_TAG)
    if tag is None or str(tag["run"]) != run:
        return []
    return [records.device_state_from_records(context.state, prefix)
            for prefix in (records.STATE_PREFIX, records.PREV_PREFIX) if records.has_device_state(context.state, prefix)]


def _disk_states(folder: Path | None, device: int, run: str) -> list[DeviceState]:
    """The same two on disk (`device-N.pt`, `device-N.prev.pt`): they survive the node's process."""
    if folder is None:
        return []
    payloads = [outputs.load_checkpoint(folder / f"device-{device}{suffix}.pt") for suffix in ("", ".prev")]
    return [state_from_payload(p) for p in payloads if p is not None and p.get("run") == run]


def device_state(context: Context, folder: Path | None, device: int, run: str, participations: int | None) -> DeviceState:
    """The device's state after `participations` kept rounds, as the server counts them.

    Usually the one in memory. After a round the server did not count (its reply came too late,
    or the server stopped before saving the round and now resumes) it is the one that round
    started from; after a restart of the node or of the run, one of the two on disk; before the
    device's first kept round, a fresh one. None (an older server): the newest.
    """
    memory = _memory_states(context, run)
    if memory and _disk_is_newer(context, folder, device):
        # Another message of this device wrote its state since this Context was copied (on
        # Flower's simulation engine a Context is written back after the handler returns): the
        # files hold the newer states.
        memory = []
    if participations is None:
        return (memory or _disk_states(folder, device, run) or [DeviceState()])[0]
    if participations == 0:
        return DeviceState()
    for candidates in (memory, None):
        if candidates is None:  # the disk is read only when memory has no match
            candidates = _disk_states(folder, device, run)
        for state in candidates:
            if state.participations == participations:
                return state
    found = sorted({s.participations for s in [*memory, *_disk_states(folder, device, run)]})
    where = f"its state folder {folder}" if folder is not None else "no state folder (node config state-dir)"
    raise RuntimeError(
        f"device {device}: the server counts {participations} kept rounds of it, but this node holds its state after "
        f"{found or 'no'} rounds and has {where}; a resumed run needs the nodes' state folders"
    )


def keep_device_state(
    context: Context, folder: Path | None, device: int, run: str, state: DeviceState, start: DeviceState
) -> None:
    """Keep the state after a round that passed the server's check, and `start`, the state that
    round trained from (the server may still not count the round: then the next round starts
    from `start` again), in memory and, with a state folder, on disk (`start` written first)."""
    # Usually the round started from the newest kept state, whose file is on disk already: it
    # becomes the "before" file by a rename instead of a second write.
    tag = context.state.config_records.get(records.RUN_TAG)
    scalars = context.state.config_records.get(records.STATE_PREFIX + "scalars")
    started_from_latest = (tag is not None and str(tag["run"]) == run and scalars is not None
                           and int(scalars["participations"]) == start.participations)
    records.store_device_state(context.state, start, records.PREV_PREFIX)
    records.store_device_state(context.state, state)
    run_tag = {"run": run}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        latest, previous = folder / f"device-{device}.pt", folder / f"device-{device}.prev.pt"
        # The file on disk is the one this context's latest state was saved to, unless another
        # message of this device wrote since (on the simulation runtime a late round can still
        # be running when the device's next round starts: `device_lock`); only then is it `start`.
        if started_from_latest and latest.is_file() and tag is not None and tag.get("file") == _file_tag(latest):
            os.replace(latest, previous)
        else:
            outputs.save_checkpoint(previous, {**state_to_payload(start), "run": run})
        outputs.save_checkpoint(latest, {**state_to_payload(state), "run": run})
        run_tag["file"] = _file_tag(latest)
    context.state[records.RUN_TAG] = ConfigRecord(run_tag)


def _disk_is_newer(context: Context, folder: Path | None, device: int) -> bool:
    """Whether the latest state file is not the one this Context last wrote."""
    tag = context.state.config_records.get(records.RUN_TAG)
    if folder is None or tag is None or tag.get("file") is None:
        return False
    latest = folder / f"device-{device}.pt"
    return latest.is_file() and _file_tag(latest) != tag["file"]


def _file_tag(path: Path) -> str:
    # (inode, mtime): outputs.save_checkpoint renames a new file over the old one, so every write
    # changes the inode.
    stat = path.stat()
    return f"{stat.st_ino}:{stat.st_mtime_ns}"


@contextlib.contextmanager
def device_lock(folder: Path | None, device: int) -> Iterator[None]:
    """Hold the device's state for one round: another message for the same device waits.

    Flower may run two messages of one node at once (the simulation engine's workers, and a
    SuperNode, which starts a task per message it pulls): a round that ran past the server's
    deadline can still be training when the device is sampled again, and both would start from
    the same state and write their own. With the lock the later round waits (a real device cannot
    run two rounds at once either) and then starts from the state the server counts. The lock
    lives in the state folder: a node without one (node config `state-dir`) keeps its state in
    memory only and is not protected.
    """
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"device-{device}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _state_folder(context: Context, state_dir: str | Path | None) -> Path | None:
    folder = context.node_config.get("state-dir") or state_dir
    return Path(folder) if folder else None


def train(msg: Message, context: Context, state_dir: str | Path | None = None) -> Message:
    """One round of local training (`device_round`); the private state is kept only if the
    update passes the server's check (`check_update`, against the global values received: the
    server rejects any other, so the device keeps its old state, as in the simulator). With a
    state folder (node config `state-dir`, or `state_dir`) the node also saves its state there
    after each round, on its own disk (to inspect it, or to keep it over a SuperNode restart).

    Injected faults (federation.faults) are drawn here as in the simulator: "hang" sleeps past
    the server's deadline and gives up without training, "raise" raises in the middle of the
    round (Flower sends the server an error reply), the others corrupt the upload."""
    order = records.read_train_content(msg.content)
    device = _check_device(order.device, context)
    data = node_data(order.config_json)
    if order.initial_fingerprint != data.initial_fingerprint:
        # The node fills the keys it neither receives nor holds from its own initial adapter.
        raise RuntimeError(
            f"device {device}: this node's initial adapter differs from the server's (fingerprint "
            f"{data.initial_fingerprint}, server {order.initial_fingerprint}): model files or library versions differ"
        )
    federation = data.config.federation
    fault = faults.device_fault(data.config.seed, order.round_num, device, federation.faults.share, federation.faults.kinds)
    if fault == "hang":
        logger.warning("device %d hangs in round %d (injected): no answer before the deadline", device, order.round_num)
        time.sleep(federation.device_timeout_s + HANG_MARGIN_S)
        raise faults.InjectedFault(f"device {device} hung in round {order.round_num} (injected fault)")
    folder = _state_folder(context, state_dir)
    with device_lock(folder, device):
        state = device_state(context, folder, device, order.run, order.participations)
        start = copy.deepcopy(state)  # device_round changes `state` in place
        global_values = {**data.initial_state, **order.global_values}
        update = train_device(
            data.config, data.prepared, device, order.round_num, global_values, state, data.initial_state,
            exchanged_keys=order.exchanged_keys, own_start_keys=order.own_start_keys, sparse=order.sparse,
            probe=order.probe, fault=fault,
        )
        num_layers = len(transformer_layers(data.prepared.runner.loaded.model)) if order.probe is not None else None
        problem = check_update(update, {k: order.global_values[k] for k in order.exchanged_keys}, num_layers)
        if problem is not None:
            logger.warning("device %d: the server will reject its update of round %d (%s); its state stays as before",
                           device, order.round_num, problem.reason)
        else:
            keep_device_state(context, folder, device, order.run, state, start)
    return Message(records.update_content(update), reply_to=msg)


def probe(msg: Message, context: Context) -> Message:
    """Layer sensitivities (L,) of the global model before the round (server.ProbeRequest)."""
    cfg = msg.content.config_records[records.ROUND]
    device = _check_device(int(cfg["device"]), context)
    data = node_data(str(cfg["config"]))
    global_state = {**data.initial_state, **records.record_to_state(msg.content.array_records[records.GLOBAL])}
    settings = ProbeSettings(**json.loads(cfg["probe"]))
    result = probe_device(data.config, data.prepared, device, int(cfg["round"]), global_state, settings)
    return Message(RecordDict({
        records.LAYER_SCORES: records.state_to_record({"scores": result.scores}),
        records.UPDATE_INFO: ConfigRecord({"seconds": float(result.seconds), "num-samples": result.num_samples}),
    }), reply_to=msg)


def evaluate(msg: Message, context: Context, state_dir: str | Path | None = None) -> Message:
    """Personalised evaluation: this device's own model (its personal entries of the layers not
    exchanged this round, over the new global state) on its own test part; the predictions go
    back, and the server pools every device's into one score (as the simulator does)."""
    cfg = msg.content.config_records[records.ROUND]
    device = _check_device(int(cfg["device"]), context)
    data = node_data(str(cfg["config"]))
    runner, prepared = data.prepared.runner, data.prepared
    global_state = records.record_to_state(msg.content.array_records[records.GLOBAL])
    shared = set(json.loads(cfg["exchanged-keys"]))
    participations = int(cfg["participations"]) if "participations" in cfg else None
    personal = device_state(context, _state_folder(context, state_dir), device, str(cfg.get("run", "")), participations).personal
    runner.load_state(global_state)
    runner.load_state({k: v for k, v in personal.items() if k not in shared}, strict=False)
    part = prepared.device_eval_indices[device]
    preds = runner.predictions(prepared.test, part, data.config.train.eval_batch_size) if part else torch.zeros(0)
    labels = torch.as_tensor(prepared.test.labels[part]) if part else torch.zeros(0)
    return Message(records.predictions_content(preds, labels), reply_to=msg)


def make_client_app(state_dir: str | Path | None = None) -> ClientApp:
    """The ClientApp; `state_dir`: where nodes also save their private state (see `train`)."""
    app = ClientApp()
    app.query()(identify)

    @app.train()
    def train_round(msg: Message, context: Context) -> Message:
        return train(msg, context, state_dir)

    app.train("probe")(probe)

    @app.evaluate()
    def evaluate_round(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, state_dir)

    return app


app = make_client_app()
