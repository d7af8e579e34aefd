"""A Flower Strategy over fibecfed's transport-free server.

Flower's `Strategy.start` runs the rounds (configure_train, send through the Grid,
aggregate_train, configure_evaluate, send, aggregate_evaluate, evaluate_fn); every decision is
`fibecfed.server.Server`'s, exactly as in the in-process simulator:

    configure_train    server.probe_request -> probe messages -> server.plan_round -> train messages
    aggregate_train    decode the replies -> server.finish_round (bytes measured on the messages)
    configure_evaluate personalised evaluation: every node's own model, when some keys are personal
    aggregate_evaluate pool the nodes' predictions into one score
    evaluate_fn        the global model on the central test subset -> server.record_round

Stock FedAvg would refuse replies with differing key sets and replace the whole global record;
here the server merges the aggregated keys into its global state.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fibecfed import faults, outputs
from fibecfed.config import RunConfig, config_to_dict
from fibecfed.errors import FibecfedError
from fibecfed.evaluation import classification_metrics
from fibecfed.federated import DeviceUpdate
from fibecfed.flower import records
from fibecfed.layers import transformer_layers
from fibecfed.server import LayerProbe, MeasuredTransfer, ProbeRequest, RoundPlan, RoundResult, Server, server_settings
from fibecfed.simulator import Prepared, central_evaluation, data_fingerprint, personalized_metrics

logger = logging.getLogger(__name__)


@dataclass
class RoundInFlight:
    """One round between configure_train and evaluate_fn."""

    started: float
    plan: RoundPlan | None = None
    download: dict[int, int] = field(default_factory=dict)  # bytes per device, measured on the messages
    upload: dict[int, int] = field(default_factory=dict)
    adapter: dict[int, int] = field(default_factory=dict)  # bytes of adapter entries in those, both ways
    result: RoundResult | None = None
    personalized: dict[str, Any] | None = None  # pooled metrics from the nodes
    evaluate_sent: list[int] = field(default_factory=list)  # devices asked for a personalised evaluation


class FibecFedStrategy(Strategy):
    """Drives `Server` through a Flower Grid; one SuperNode per device."""

    def __init__(
        self, config: RunConfig, prepared: Prepared, metrics_path: Path, timeout: float = 3600.0,
        checkpoint_path: Path | None = None,
    ):
        self.config = config
        self.checkpoint_path = checkpoint_path
        self.prepared = prepared
        self.metrics_path = metrics_path
        self.timeout = timeout
        self.num_classes = len(prepared.task.label_names)
        self.config_json = records.encode_config(config)
        # The model as loaded: the run's initial global state; every node rebuilds the same one.
        self.initial_state = prepared.runner.state()
        self.initial_fingerprint = records.state_fingerprint(self.initial_state)
        # What the run trains on: a resume refuses a checkpoint made on other data.
        self.data_fingerprint = data_fingerprint(prepared)
        num_devices = len(prepared.train_parts)
        self.settings = server_settings(config, num_devices, len(transformer_layers(prepared.runner.loaded.model)))
        self.server = Server(self.settings, self.initial_state, initial_state=self.initial_state)
        self.full_bytes = records.state_to_record(self.initial_state).count_bytes()
        self.nodes: dict[int, int] = {}  # device -> Flower node id
        # Device -> its updates the server kept: a node trains from its state with that count.
        self.kept: dict[int, int] = {}
        # The run's id, kept over a resume: the nodes' saved states belong to it.
        self.run_id = uuid.uuid4().hex
        # Rounds done before this ServerApp started (a resumed run): Flower counts from 1 again.
        self.offset = 0
        self.pending: RoundInFlight | None = None

    # -- Checkpoints --------------------------------------------------------------------------

    def to_checkpoint(self) -> dict[str, Any]:
        """What a restarted ServerApp needs to go on after the last finished round."""
        return {
            **self.server.to_checkpoint(),
            "config": config_to_dict(self.config),
            "data_fingerprint": self.data_fingerprint,
            "runtime": "flower",
            "run_id": self.run_id,
            "kept": dict(self.kept),
        }

    def resume(self, payload: Mapping[str, Any]) -> None:
        """Go on from a `to_checkpoint` payload: the next round is payload["round"] + 1."""
        # The server's checkpoint holds which keys each node holds ("held"), as this one's did before.
        self.server = Server.from_checkpoint(self.settings, payload, initial_state=self.initial_state)
        self.run_id = str(payload["run_id"])
        self.kept = {int(device): int(count) for device, count in payload["kept"].items()}
        self.offset = self.server.round

    # -- Nodes --------------------------------------------------------------------------------

    def connect(self, grid: Grid, wait_s: float = 600.0) -> None:
        """Map each device to its node: ask every node its partition id (a query message)."""
        num_devices = len(self.prepared.train_parts)
        deadline = time.monotonic() + wait_s
        node_ids = list(grid.get_node_ids())
        while len(node_ids) < num_devices and time.monotonic() < deadline:
            time.sleep(1.0)
            node_ids = list(grid.get_node_ids())
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        # The nodes' first answer includes their start-up: wait for it as long as for the nodes
        # to appear, even when the rounds' deadline (federation.device_timeout_s) is shorter.
        for reply in grid.send_and_receive(messages, timeout=max(self.timeout, wait_s)):
            if reply.has_error():
                logger.warning("node %d did not say its partition id: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            device = int(reply.content.config_records["node"]["partition-id"])
            if not 0 <= device < num_devices:
                logger.warning("node %d has partition-id=%d, outside this run's %d devices: left out",
                               reply.metadata.src_node_id, device, num_devices)
                continue
            if device in self.nodes:
                raise FibecfedError(f"two SuperNodes have partition-id={device}")
            self.nodes[device] = reply.metadata.src_node_id
        missing = [d for d in range(num_devices) if d not in self.nodes]
        if missing:
            raise missing_nodes_error(missing, num_devices)
        logger.info("devices on nodes: %s", self.nodes)

    def _device_of(self, reply: Message) -> int | None:
        """The device whose node sent `reply`; None (logged) for any other sender: the SuperLink
        itself answers with an error for a node that went offline or a message that expired, and
        the device then counts as one that did not answer in time."""
        device = {n: d for d, n in self.nodes.items()}.get(reply.metadata.src_node_id)
        if device is None:
            reason = reply.error.reason if reply.has_error() else "no error"
            logger.warning("a reply from node %s, which holds no device of this run, is left out (%s)",
                           reply.metadata.src_node_id, reason)
        return device

    # -- Training -----------------------------------------------------------------------------

    def _probe(self, grid: Grid, request: ProbeRequest, pending: RoundInFlight) -> dict[int, LayerProbe]:
        """The requested devices' sensitivities of the global model (method.layers.select_after=0)."""
        messages = []
        for device in request.devices:
            content = RecordDict({
                records.GLOBAL: records.state_to_record(self.server.global_state),
                records.ROUND: ConfigRecord({
                    "round": request.round_num, "device": device, "config": self.config_json,
                    "probe": json.dumps(vars(request.settings)),
                }),
            })
            pending.download[device] = pending.download.get(device, 0) + records.content_bytes(content)
            messages.append(Message(content, dst_node_id=self.nodes[device], message_type=f"{MessageType.TRAIN}.probe"))
        probes, reasons = {}, {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            device = self._device_of(reply)
            if device is None:
                continue
            if reply.has_error():
                logger.warning("device %d failed its probe in round %d: %s", device, request.round_num, reply.error.reason)
                reasons[device] = reply.error.reason
                continue
            pending.upload[device] = pending.upload.get(device, 0) + records.content_bytes(reply.content)
            try:
                info = reply.content.config_records[records.UPDATE_INFO]
                scores = records.record_to_state(reply.content.array_records[records.LAYER_SCORES])["scores"]
                probe = LayerProbe(scores, float(info["seconds"]), int(info["num-samples"]))
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("device %d sent a malformed probe reply in round %d (%s: %s)",
                               device, request.round_num, type(exc).__name__, exc)
                continue
            if probe.num_samples != len(self.prepared.train_parts[device]):
                logger.warning("device %d's probe reports %d training samples, but its partition holds %d: left out",
                               device, probe.num_samples, len(self.prepared.train_parts[device]))
                continue
            probes[device] = probe  # its scores are checked by the server (server.probe_problem)
        # As the simulator does: the same code broke on every node.
        self._stop_if_broken_everywhere(request.round_num, request.devices, reasons)
        return probes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        pending = RoundInFlight(started=time.perf_counter())
        self.pending = pending
        request = self.server.probe_request(server_round)
        probes = self._probe(grid, request, pending) if request is not None else None
        plan = self.server.plan_round(server_round, probes)
        pending.plan = plan
        messages = []
        for device in plan.devices:
            content = records.train_content(
                plan, device, self.config_json, self.server.stale_values(device, plan.exchanged_keys), self.initial_fingerprint,
                run=self.run_id, participations=self.kept.get(device, 0),
            )
            pending.download[device] = pending.download.get(device, 0) + records.content_bytes(content)
            pending.adapter[device] = pending.adapter.get(device, 0) + records.adapter_bytes(content)
            messages.append(Message(content, dst_node_id=self.nodes[device], message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.offset
        pending = self.pending
        plan = pending.plan
        received, errors, reasons = {}, {}, {}
        for reply in replies:
            device = self._device_of(reply)
            if device is None:
                continue
            if reply.has_error():
                logger.warning("device %d failed in round %d: %s", device, server_round, reply.error.reason)
                errors[device] = "error"
                reasons[device] = reply.error.reason
                continue
            pending.upload[device] = pending.upload.get(device, 0) + records.content_bytes(reply.content)
            pending.adapter[device] = pending.adapter.get(device, 0) + records.adapter_bytes(reply.content)
            update = read_reply(reply.content, device, server_round, len(self.prepared.train_parts[device]))
            if update is None:
                errors[device] = "error"
            else:
                received[device] = update
        self._stop_if_broken_everywhere(server_round, plan.devices, reasons)
        # In plan order, as the server expects (it checks each update against the plan); a device
        # that sent nothing failed: with an error reply, or none before the deadline (timeout).
        updates = [received[d] for d in plan.devices if d in received]
        failed = {d: errors.get(d, "timeout") for d in plan.devices if d not in received}
        for device in plan.devices:
            pending.upload.setdefault(device, 0)
        # FedAvg's messages: the same, with the whole adapter both ways instead of the entries sent.
        fedavg = sum(pending.download[d] + pending.upload[d] - pending.adapter[d] + 2 * self.full_bytes for d in received)
        measured = MeasuredTransfer(download=pending.download, upload=pending.upload, fedavg_bytes=fedavg)
        result = self.server.finish_round(plan, updates, failed, measured)
        pending.result = result
        for update in updates:  # the server also notes which keys its node now holds (Server.held)
            if update.device not in result.dropped:
                self.kept[update.device] = self.kept.get(update.device, 0) + 1
        metrics = {"failed-devices": len(result.fields["failed_devices"])}
        if result.fields["loss"] is not None:
            metrics["loss"] = float(result.fields["loss"])
        return records.state_to_record(self.server.global_state), MetricRecord(metrics)

    def _stop_if_broken_everywhere(self, round_num: int, devices: Sequence[int], reasons: Mapping[int, str]) -> None:
        """End the run when every sampled device's ClientApp raised, none of them for a device
        fault (an injected one, which the server draws as the nodes do, or a loss that became NaN):
        the same code broke on every node, e.g. nodes whose model files differ from the server's.
        The simulator stops in the same case; otherwise the rounds would go on, every device
        failing, and the run would end with the initial model as if it had succeeded."""
        share, kinds = self.config.federation.faults.share, self.config.federation.faults.kinds
        injected = faults.round_faults(self.config.seed, round_num, devices, share, kinds)
        # NonFiniteLossError's message (training.local_train); Flower's simulation runtime
        # reports only the message of a ClientApp's exception, not its class.
        unexpected = {d: r for d, r in reasons.items() if d not in injected and "loss became" not in r}
        if devices and len(unexpected) == len(devices):
            first = unexpected[devices[0]]
            raise FibecfedError(
                f"round {round_num}: every sampled device's ClientApp raised ({len(devices)} of {len(devices)}), so the "
                f"run stops; device {devices[0]}'s error: {first.strip()}"
            )

    # -- Evaluation ---------------------------------------------------------------------------

    def _personal_on_nodes(self, plan: RoundPlan) -> bool:
        """Whether a device's own model can differ from the global one this round."""
        return self.config.federation.personalized_eval and set(plan.exchanged_keys) != set(self.server.keys)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        pending = self.pending
        if pending is None or pending.result is None or not pending.result.evaluate or not self._personal_on_nodes(pending.plan):
            return []
        global_record = records.state_to_record(self.server.global_state)
        messages = []
        for device, node in sorted(self.nodes.items()):
            content = RecordDict({
                records.GLOBAL: global_record,
                records.ROUND: ConfigRecord({
                    "round": server_round, "device": device, "config": self.config_json,
                    "exchanged-keys": json.dumps(pending.plan.exchanged_keys),
                    "run": self.run_id, "participations": self.kept.get(device, 0),
                }),
            })
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE))
        pending.evaluate_sent = sorted(self.nodes)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Pool the replies' predictions. A device whose node failed or did not answer in time is
        left out, with a warning; the row's `personalized_devices` says how many were pooled, so
        a score over fewer devices is never mistaken for the full one."""
        server_round += self.offset
        if self.pending is None or not self.pending.evaluate_sent:
            return None  # nothing was asked: the server scores the devices' test parts itself
        preds, labels, answered = [], [], set()
        for reply in replies:
            device = self._device_of(reply)
            if device is None:
                continue
            if reply.has_error():
                logger.warning("device %d failed its evaluation in round %d: %s", device, server_round, reply.error.reason)
                continue
            try:
                p, y = records.read_predictions(reply.content)
                if p.dim() != 1 or p.shape != y.shape or (len(p) and not (0 <= int(p.min()) and int(p.max()) < self.num_classes)):
                    raise ValueError(f"predictions {tuple(p.shape)} and labels {tuple(y.shape)} do not match, or a class is out of range")
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("device %d sent a malformed evaluation in round %d (%s: %s)", device, server_round, type(exc).__name__, exc)
                continue
            answered.add(device)
            preds.append(p)
            labels.append(y)
        missing = [d for d in self.pending.evaluate_sent if d not in answered]
        if missing:
            logger.warning("round %d: the personalised score leaves out devices %s (no evaluation from their nodes)",
                           server_round, missing)
        self.pending.personalized = pool_predictions(preds, labels, self.num_classes)
        return MetricRecord({k: float(v) for k, v in self.pending.personalized.items() if v is not None})

    def _evaluation(self, personalized: Mapping[str, Any] | None) -> dict[str, Any]:
        """The metrics row's evaluation fields, as the simulator writes them."""
        batch = self.config.train.eval_batch_size
        row = central_evaluation(self.prepared, self.server.global_state, batch, self.num_classes)
        if not self.config.federation.personalized_eval:
            row["personalized_accuracy"] = None
        elif personalized is not None:
            row.update(personalized)
        else:
            # No device model differs from the global one: the server scores the devices' test parts itself.
            pooled = personalized_metrics(self.prepared.runner, self.prepared.test, self.prepared.device_eval_indices,
                                          self.server.global_state, {}, batch, self.num_classes)
            row.update({f"personalized_{k}": v for k, v in pooled.items()})
        return row

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Round 0: the starting point. Later: evaluate when due, write the metrics row and the
        checkpoint (so that a restarted ServerApp goes on after this round)."""
        if server_round == 0 and self.offset > 0:
            return None  # a resumed run: its starting point is in the history already
        if server_round == 0:
            row = self.server.record_start(self._evaluation(None))
        else:
            pending = self.pending
            evaluation = self._evaluation(pending.personalized) if pending.result.evaluate else None
            row = self.server.record_round(pending.result, evaluation, time.perf_counter() - pending.started)
            self.pending = None
        outputs.write_metrics(self.metrics_path, self.server.history)
        if server_round > 0 and self.checkpoint_path is not None:
            outputs.save_checkpoint(self.checkpoint_path, self.to_checkpoint())
        return MetricRecord({"accuracy": float(row["accuracy"])}) if row.get("accuracy") is not None else None

    def summary(self) -> None:
        logger.info("fibecfed %s: %d devices, %d per round", self.config.method.name,
                    len(self.prepared.train_parts), self.config.federation.devices_per_round)


def pool_predictions(preds: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int) -> dict[str, Any]:
    """The personalised row fields from the devices' replies (one (n_d,) prediction and label
    tensor each): the pooled accuracy / f1 / mcc, and `personalized_devices`, how many devices
    with a non-empty test part were pooled (as the in-process runtime counts them). No reply with
    a prediction: no score (None), never the global model's in its place."""
    devices = sum(1 for p in preds if len(p))
    pooled: dict[str, Any] = {"accuracy": None, "f1": None, "mcc": None}
    if devices:
        pooled = classification_metrics(torch.cat(preds), torch.cat(labels), num_classes)
    return {f"personalized_{k}": v for k, v in {**pooled, "devices": devices}.items()}


def read_reply(content: RecordDict, device: int, round_num: int, num_samples: int | None = None) -> DeviceUpdate | None:
    """The update in a train reply from `device`'s node; None (logged) if the reply is malformed,
    speaks for another device, or reports numbers the server cannot use (`reply_problem`).
    `num_samples`: the device's training-set size, which the server knows from the partition."""
    try:
        update = records.read_update_content(content)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("device %d sent a malformed reply in round %d (%s: %s)", device, round_num, type(exc).__name__, exc)
        return None
    if update.device != device:
        logger.warning("the node of device %d sent an update for device %d in round %d", device, update.device, round_num)
        return None
    problem = reply_problem(update, num_samples)
    if problem is not None:
        logger.warning("device %d sent an unusable reply in round %d: %s", device, round_num, problem)
        return None
    return update


def reply_problem(update: DeviceUpdate, num_samples: int | None = None) -> str | None:
    """Why the server cannot use the numbers of a train reply, or None. Its tensors are checked
    by the server (`federated.check_update`); these are the rest. The aggregation weight is the
    partition's size (a node that reports another would weigh its update wrongly, and 0 or less
    would drop it or extrapolate); the seconds set the simulated clock; loss and personalised
    counts go to metrics.jsonl."""
    if num_samples is not None and update.num_samples != num_samples:
        return f"it reports {update.num_samples} training samples, but its partition holds {num_samples}"
    if update.num_samples < 1:
        return f"it reports {update.num_samples} training samples"
    seconds = {"compute-seconds": update.compute_seconds, "scoring-seconds": update.scoring_seconds,
               "background-seconds": update.background_seconds, "probe-seconds": update.probe_seconds}
    for name, value in seconds.items():
        if not math.isfinite(value) or value < 0:
            return f"{name} must be finite and >= 0, got {value}"
    if not math.isfinite(update.loss):
        return f"its loss is {update.loss}"
    if not 0.0 <= update.curriculum_fraction <= 1.0:
        return f"curriculum-fraction must be in [0, 1], got {update.curriculum_fraction}"
    if update.steps < 0 or update.pool_size < 0 or update.personalized_count < 0:
        return f"negative counts (steps {update.steps}, pool {update.pool_size}, personalised {update.personalized_count})"
    values = [v for v in (update.personalized or {}).values() if isinstance(v, (int, float))]
    if not all(math.isfinite(v) for v in values):
        return f"its personalised scores are not finite: {update.personalized}"
    return None


def missing_nodes_error(missing: list[int], num_devices: int) -> FibecfedError:
    return FibecfedError(
        f"no SuperNode for devices {missing[:5]}: the run has {num_devices} devices; start one SuperNode per "
        f"device with --node-config 'partition-id=N num-partitions={num_devices}' (N = 0..{num_devices - 1})"
    )
