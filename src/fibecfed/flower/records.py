"""The wire format of the Flower runtime: fibecfed's objects to Flower records and back.

Pure functions, no I/O. Adapter states travel as ArrayRecords keyed by peft state-dict keys
(float32 tensors round-trip bit for bit); scalars travel in ConfigRecords and MetricRecords.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fibecfed.adapters import AdapterState
from fibecfed.config import RunConfig, config_from_dict, config_to_dict
from fibecfed.federated import DeviceState, DeviceUpdate, ProbeSettings, SparseSettings

# Record names inside a message's RecordDict.
GLOBAL = "global"  # the global values of the exchanged keys (or of every key, for a probe or an evaluation)
STALE = "global-personal"  # global values of non-exchanged keys the device lacks (see client_app)
ROUND = "round"  # the round's settings
UPDATE = "update"  # the device's trained exchanged entries
UPDATE_INFO = "update-info"  # DeviceUpdate scalars
PERSONALIZED = "personalized"  # the device's own-model metrics after training
LAYER_SCORES = "layer-scores"  # (L,) layer sensitivities
PREDICTIONS = "predictions"  # predictions and labels of a personalised evaluation

# Names of the device's private state inside Context.state: the state after the device's last
# kept round, the one before it (PREV_PREFIX; a round the server did not count is undone from
# it), and the run they belong to (RUN_TAG).
STATE_PREFIX = "fibecfed."
PREV_PREFIX = "fibecfed-prev."
RUN_TAG = "fibecfed-run"


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> AdapterState:
    return {k: torch.from_numpy(array.numpy().copy()) for k, array in record.items()}


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records, as Flower's own message_size_mod counts them."""
    return sum(record.count_bytes() for record in content.values())


def adapter_bytes(content: RecordDict) -> int:
    """Bytes of the adapter entries a train message or reply carries (the rest is overhead)."""
    return sum(content.array_records[name].count_bytes() for name in (GLOBAL, STALE, UPDATE) if name in content.array_records)


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of named tensors: the server and a node check they start from the same initial adapter."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def encode_config(config: RunConfig) -> str:
    """The resolved run config as JSON: nodes need no run_config of their own."""
    return json.dumps(config_to_dict(config), sort_keys=True)


def decode_config(text: str) -> RunConfig:
    return config_from_dict(json.loads(text))


@dataclass(frozen=True)
class TrainOrder:
    """What a node reads from a train message (a RoundPlan, for one device)."""

    round_num: int
    device: int
    config_json: str
    exchanged_keys: list[str]
    own_start_keys: list[str]
    warmup: bool
    sparse: SparseSettings | None
    probe: ProbeSettings | None
    global_values: AdapterState  # exchanged keys, plus the stale non-exchanged keys the node lacks
    initial_fingerprint: str  # of the server's initial global adapter (state_fingerprint)
    run: str = ""  # the run's id (kept over a resume): a node's saved state belongs to one run
    # The device's kept participations before this round, as the server counted them (None: a
    # server that does not say); the node trains from its state with that count.
    participations: int | None = None


def _settings_to_json(settings: Any) -> str:
    return json.dumps(None if settings is None else vars(settings))


def train_content(
    plan: Any, device: int, config_json: str, stale: Mapping[str, torch.Tensor], initial_fingerprint: str,
    run: str = "", participations: int | None = None,
) -> RecordDict:
    """A train message for `device` from a server.RoundPlan."""
    extra = {} if participations is None else {"participations": participations}
    content = RecordDict({
        GLOBAL: state_to_record(plan.state),
        ROUND: ConfigRecord({
            "round": plan.round_num,
            "device": device,
            # Key lists as JSON text: a ConfigRecord cannot size an empty list.
            "exchanged-keys": json.dumps(list(plan.exchanged_keys)),
            "own-start-keys": json.dumps(list(plan.own_start_keys)),
            "warmup": plan.warmup,
            "sparse": _settings_to_json(plan.sparse),
            "probe": _settings_to_json(plan.probe),
            "config": config_json,
            "initial-fingerprint": initial_fingerprint,
            "run": run,
            **extra,
        }),
    })
    if stale:
        content[STALE] = state_to_record(stale)
    return content


def read_train_content(content: RecordDict) -> TrainOrder:
    cfg = content.config_records[ROUND]
    values = record_to_state(content.array_records[GLOBAL])
    if STALE in content.array_records:
        values.update(record_to_state(content.array_records[STALE]))
    sparse, probe = json.loads(cfg["sparse"]), json.loads(cfg["probe"])
    return TrainOrder(
        round_num=int(cfg["round"]),
        device=int(cfg["device"]),
        config_json=str(cfg["config"]),
        exchanged_keys=json.loads(cfg["exchanged-keys"]),
        own_start_keys=json.loads(cfg["own-start-keys"]),
        warmup=bool(cfg["warmup"]),
        sparse=None if sparse is None else SparseSettings(**sparse),
        probe=None if probe is None else ProbeSettings(**probe),
        global_values=values,
        initial_fingerprint=str(cfg["initial-fingerprint"]),
        run=str(cfg.get("run", "")),
        participations=int(cfg["participations"]) if "participations" in cfg else None,
    )


def update_content(update: DeviceUpdate) -> RecordDict:
    """A train reply: the trained exchanged entries and the DeviceUpdate scalars."""
    content = RecordDict({
        UPDATE: state_to_record(update.state),
        UPDATE_INFO: ConfigRecord({
            "device": update.device,
            "num-samples": update.num_samples,
            "loss": float(update.loss),
            "compute-seconds": float(update.compute_seconds),
            "steps": update.steps,
            "personalized-count": update.personalized_count,
            "curriculum-fraction": float(update.curriculum_fraction),
            "pool-size": update.pool_size,
            "scoring-seconds": float(update.scoring_seconds),
            "background-seconds": float(update.background_seconds),
            "probe-seconds": float(update.probe_seconds),
            "trained-personal": bool(update.trained_personal),
        }),
    })
    if update.personalized is not None:
        content[PERSONALIZED] = MetricRecord({k: float(v) for k, v in update.personalized.items() if v is not None})
    if update.layer_scores is not None:
        content[LAYER_SCORES] = state_to_record({"scores": update.layer_scores})
    return content


def read_update_content(content: RecordDict) -> DeviceUpdate:
    info = content.config_records[UPDATE_INFO]
    personalized = dict(content.metric_records[PERSONALIZED]) if PERSONALIZED in content.metric_records else None
    scores = record_to_state(content.array_records[LAYER_SCORES])["scores"] if LAYER_SCORES in content.array_records else None
    return DeviceUpdate(
        device=int(info["device"]),
        state=record_to_state(content.array_records[UPDATE]),
        num_samples=int(info["num-samples"]),
        loss=float(info["loss"]),
        compute_seconds=float(info["compute-seconds"]),
        steps=int(info["steps"]),
        personalized=personalized,
        personalized_count=int(info["personalized-count"]),
        curriculum_fraction=float(info["curriculum-fraction"]),
        pool_size=int(info["pool-size"]),
        scoring_seconds=float(info["scoring-seconds"]),
        background_seconds=float(info["background-seconds"]),
        layer_scores=scores,
        probe_seconds=float(info["probe-seconds"]),
        trained_personal=bool(info["trained-personal"]),
    )


def device_state_to_records(state: DeviceState, prefix: str = STATE_PREFIX) -> dict[str, ArrayRecord | ConfigRecord]:
    """A DeviceState as records for Context.state: the personal adapter entries, each tensor
    or dict of tensors of `extra` (difficulty scores, Fisher momentum), and the scalars."""
    records: dict[str, ArrayRecord | ConfigRecord] = {prefix + "personal": state_to_record(state.personal)}
    scalars: dict[str, Any] = {"participations": state.participations}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.extra.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict):
            records[prefix + "extra." + key] = state_to_record(value)
        elif isinstance(value, (bool, int, float, str)):
            scalars["extra." + key] = value
        else:
            raise TypeError(f"device state extra[{key!r}] of type {type(value).__name__} has no record form")
    records[prefix + "tensors"] = state_to_record(tensors)
    records[prefix + "scalars"] = ConfigRecord(scalars)
    return records


def has_device_state(recorddict: RecordDict, prefix: str = STATE_PREFIX) -> bool:
    return prefix + "scalars" in recorddict


def device_state_from_records(recorddict: RecordDict, prefix: str = STATE_PREFIX) -> DeviceState:
    """The DeviceState stored by `device_state_to_records` (an empty one on a first round)."""
    if not has_device_state(recorddict, prefix):
        return DeviceState()
    scalars = recorddict.config_records[prefix + "scalars"]
    extra: dict[str, Any] = {k[len("extra."):]: v for k, v in scalars.items() if k.startswith("extra.")}
    extra.update(record_to_state(recorddict.array_records[prefix + "tensors"]))
    for name, record in recorddict.array_records.items():
        if name.startswith(prefix + "extra."):
            extra[name[len(prefix + "extra."):]] = record_to_state(record)
    return DeviceState(
        personal=record_to_state(recorddict.array_records[prefix + "personal"]),
        participations=int(scalars["participations"]),
        extra=extra,
    )


def store_device_state(recorddict: RecordDict, state: DeviceState, prefix: str = STATE_PREFIX) -> None:
    """Replace the DeviceState kept in `recorddict` (a node's Context.state) under `prefix`."""
    for name in [n for n in recorddict if n.startswith(prefix)]:
        del recorddict[name]
    for name, record in device_state_to_records(state, prefix).items():
        recorddict[name] = record


def predictions_content(preds: torch.Tensor, labels: torch.Tensor) -> RecordDict:
    return RecordDict({PREDICTIONS: state_to_record({"preds": preds.long(), "labels": labels.long()})})


def read_predictions(content: RecordDict) -> tuple[torch.Tensor, torch.Tensor]:
    values = record_to_state(content.array_records[PREDICTIONS])
    return values["preds"], values["labels"]

