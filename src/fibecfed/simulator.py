"""The in-process federated runner: K simulated devices, one model in memory.

A thin runtime over `server.Server`: each round the server plans (sampled devices, exchanged
keys, switches), the devices run `device_round` one after another on the single model (their
states swapped in and out: the in-process transport), the server aggregates and counts, and the
runner evaluates, writes a metrics line and a checkpoint. A killed run started again with the
same output folder resumes after the last completed round.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fibecfed import faults, outputs
from fibecfed.accounting import compute_clock
from fibecfed.checks import check_devices_per_round, check_label_words, prompt_template
from fibecfed.config import RunConfig, config_to_dict, load_config
from fibecfed.data.loaders import load_task
from fibecfed.data.partition import partition_task
from fibecfed.data.types import TaskData
from fibecfed.device_store import DeviceStore, state_from_payload, state_to_payload
from fibecfed.encoding import encode_dataset
from fibecfed.errors import ConfigError
from fibecfed.evaluation import classification_metrics
from fibecfed.federated import (
    CurriculumSettings,
    DeviceState,
    DeviceUpdate,
    LocalTrainSettings,
    ModelRunner,
    ProbeSettings,
    SparseSettings,
    device_layer_scores,
    device_round,
)
from fibecfed.layers import transformer_layers
from fibecfed.models import load_model
from fibecfed.server import LayerProbe, ProbeRequest, RoundPlan, Server, rejection_totals, server_settings
from fibecfed.training import NonFiniteLossError

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# Format 2: the server state and the states of the devices that changed in its round
# ("changed_devices"); every device's latest state lives in DEVICES/<device>.pt
# (device_store). Format 1 (no "format" key) held every device's state ("device_states").
CHECKPOINT_FORMAT = 2
DEVICES = "devices"
# Config keys that change how a run is carried out, not its results: a run resumes with other values.
RESUME_FREE = (("federation", "device_cache"),)
# How a refused resume can start over instead (fibecfed run; compare names its own way).
START_OVER = "use another --out, or start over: --fresh (fibecfed run) or delete the folder (compare)"


@dataclass
class Prepared:
    """Data, partition and model, ready for rounds (built once per run)."""

    task: TaskData
    train_parts: list[list[int]]
    test_parts: list[list[int]]
    runner: ModelRunner
    train: Any
    test: Any
    eval_indices: list[int]
    device_eval_indices: list[list[int]]


# Label words for the verbalizer where the label names are not words (GLUE's "0"/"1") or are
# several tokens; one word per class, in class order. Other tasks use their label names.
PRESET_LABEL_WORDS: dict[str, list[str]] = {
    "sst2": [" negative", " positive"],
    "cola": [" no", " yes"],
    "mrpc": [" no", " yes"],
    "rte": [" yes", " no"],
    "qnli": [" yes", " no"],
}


def default_label_words(task_name: str, label_names: list[str]) -> list[str]:
    """Next-token words per class (leading space: a word inside a sentence)."""
    if task_name in PRESET_LABEL_WORDS and len(PRESET_LABEL_WORDS[task_name]) == len(label_names):
        return PRESET_LABEL_WORDS[task_name]
    return [" " + name.replace("_", " ") for name in label_names]


def prepare(config: RunConfig) -> Prepared:
    """Load and partition the data, load the model, tokenise once."""
    task = load_task(config.data, config.seed)
    train_parts, test_parts = partition_task(task, config.partition, config.seed, config.data.group_column is not None)
    # The same checks as the CLI's preflight: a Simulation built in code gets them too.
    check_devices_per_round(config.federation.devices_per_round, len(train_parts))
    label_words = config.model.label_words or default_label_words(task.name, task.label_names)
    check_label_words(label_words, task.label_names)
    loaded = load_model(
        config.model.name,
        num_labels=len(task.label_names),
        head=config.model.head,
        label_words=label_words,
        lora_r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        device=config.model.device,
        cache_dir=config.model.cache_dir,
        seed=config.seed,
        train_label_words=config.model.train_label_words,
    )
    template = None
    if loaded.head == "verbalizer":
        template = prompt_template(config.model.prompt_template, task.train.text_pairs is not None)
    train = encode_dataset(task.train, loaded.tokenizer, config.model.max_length, template)
    test = encode_dataset(task.test, loaded.tokenizer, config.model.max_length, template)

    rng = np.random.default_rng([config.seed, 0, 0, 7])
    eval_indices = list(range(len(test)))
    if config.federation.eval_samples is not None and len(eval_indices) > config.federation.eval_samples:
        eval_indices = sorted(rng.choice(len(test), config.federation.eval_samples, replace=False).tolist())
    cap = config.federation.device_eval_samples
    device_eval = [sorted(part) if cap is None or len(part) <= cap else sorted(rng.choice(part, cap, replace=False).tolist()) for part in test_parts]
    return Prepared(task, train_parts, test_parts, ModelRunner(loaded), train, test, eval_indices, device_eval)


def train_settings(config: RunConfig) -> LocalTrainSettings:
    t = config.train
    return LocalTrainSettings(
        lr=t.lr,
        head_lr=t.head_lr,
        weight_decay=t.weight_decay,
        batch_size=t.batch_size,
        local_steps=t.local_steps,
        local_epochs=t.local_epochs,
        max_grad_norm=t.max_grad_norm,
        eval_batch_size=t.eval_batch_size,
        prox_mu=config.method.prox_mu,
    )


def curriculum_settings(config: RunConfig) -> CurriculumSettings | None:
    c = config.method.curriculum
    if not c.enabled:
        return None
    return CurriculumSettings(
        pacing=c.pacing,
        start_fraction=c.start_fraction,
        full_at=c.full_at,
        order=c.order,
        class_balanced=c.class_balanced,
        score_wrt=c.score_wrt,
        normalize_by_length=c.normalize_by_length,
        score_at=c.score_at,
        score_samples=c.score_samples,
        online_refresh=bool(c.online_refresh),
        rescore_every=c.rescore_every,
        score_batch_size=c.score_batch_size,
        scale_steps=c.scale_steps,
        total_rounds=config.federation.rounds,
        first_round_pool=c.first_round_pool,
    )


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None, path: tuple[str, ...] = ()
) -> list[str]:
    """The dotted keys where `current` differs from `saved`, a run's saved config, in a resume's
    eyes: the RESUME_FREE keys are ignored, and so are keys the saved run predates (added to
    fibecfed since) while they keep their default (`defaults`, the default config for the same
    method): a run made before a switch existed ran as if it were at its default, so turning the
    switch on is another run."""
    differences = []
    for key, value in saved.items():
        here = path + (key,)
        if here in RESUME_FREE:
            continue
        if key not in current:
            differences.append(".".join(here))
        elif isinstance(value, dict) and isinstance(current[key], dict):
            below = defaults.get(key) if isinstance(defaults, dict) else None
            differences += config_differences(value, current[key], below if isinstance(below, dict) else None, here)
        elif value != current[key]:
            differences.append(".".join(here))
    if defaults is not None:
        for key in sorted(current.keys() - saved.keys()):
            here = path + (key,)
            if here not in RESUME_FREE and (key not in defaults or current[key] != defaults[key]):
                differences.append(".".join(here))
    return differences


def same_config(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> bool:
    """Whether a run saved with `saved` may go on under `current` (see config_differences)."""
    return not config_differences(saved, current, defaults)


def different_run_error(out: Path, differences: Sequence[str], start_over: str) -> ConfigError:
    """The error for a folder that holds a run of another config, naming what differs;
    `start_over` says what to do instead (which depends on the command)."""
    shown = ", ".join(differences[:6]) + (f" and {len(differences) - 6} more" if len(differences) > 6 else "")
    return ConfigError(f"{out} holds a run with a different config (it differs in {shown}); {start_over}")


# Keys whose default changed after they were added: a run saved before the key existed ran
# with the value given here, not with today's default.
PREDATED_DEFAULTS: dict[tuple[str, ...], Any] = {("method", "curriculum", "first_round_pool"): "scored"}
# Method parts that a config can switch off: while a part is off in both configs, its other keys
# do not change the run (FedAvg's run is the same whatever its curriculum settings say), except
# those another part reads (the sparse update's Fisher probe batches by score_batch_size).
SWITCHED_PARTS = (("method", "curriculum"), ("method", "layers"), ("method", "sparse"))
READ_WHEN_OFF = ("method.curriculum.score_batch_size",)


def _at(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def saved_config_differences(saved: dict[str, Any], config: RunConfig) -> list[str]:
    """What differs between a run folder's saved config and `config`, defaults of the method
    considered, with PREDATED_DEFAULTS filled into a saved config that predates them, and the keys
    of a method part that is off in both left out."""
    saved = copy.deepcopy(saved)
    for path, value in PREDATED_DEFAULTS.items():
        parent = _at(saved, path[:-1])
        if isinstance(parent, dict) and path[-1] not in parent:
            parent[path[-1]] = value
    current = config_to_dict(config)
    defaults = config_to_dict(load_config(None, [f"method={config.method.name}"]))
    off = [".".join(part) + "." for part in SWITCHED_PARTS
           if _at(saved, part + ("enabled",)) is False and _at(current, part + ("enabled",)) is False]
    return [d for d in config_differences(saved, current, defaults)
            if d in READ_WHEN_OFF or not any(d.startswith(prefix) and d != prefix + "enabled" for prefix in off)]


def data_fingerprint(prepared: Prepared) -> str:
    """A hash of what the run trains and evaluates on: the label names, every sample's token ids
    and label, and each device's train and test part. A resume refuses a folder whose run saw
    other data (an edited data file, another tokenizer or prompt), which the config alone
    cannot tell."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(prepared.task.label_names)).encode())
    for encoded in (prepared.train, prepared.test):
        digest.update(np.asarray([len(ids) for ids in encoded.input_ids], dtype=np.int64).tobytes())
        digest.update(np.fromiter((t for ids in encoded.input_ids for t in ids), dtype=np.int64).tobytes())
        digest.update(encoded.labels.to(torch.int64).numpy().tobytes())
    digest.update(json.dumps([list(map(int, p)) for p in (*prepared.train_parts, *prepared.test_parts)]).encode())
    return digest.hexdigest()[:32]


def check_same_data(checkpoint: Mapping[str, Any], fingerprint: str, out: Path, start_over: str) -> None:
    """Refuse to resume a run whose data changed since its checkpoint (checkpoints from before
    the fingerprint existed go on unchecked)."""
    saved = checkpoint.get("data_fingerprint")
    if saved is not None and saved != fingerprint:
        raise ConfigError(
            f"{out} holds a run on other data: the data files, the model's tokenizer, the prompt or the partition "
            f"(which another numpy may draw differently) changed since it started, under the same config; {start_over}"
        )


def checkpoint_device_states(checkpoint: Mapping[str, Any]) -> dict[int, DeviceState]:
    """The device states a checkpoint holds: format 2, the devices its round changed; format 1,
    every device's (each a DeviceState, an old full-diagonal Fisher converted to its sums)."""
    states = checkpoint.get("changed_devices", checkpoint.get("device_states", {}))
    return {int(device): state_from_payload(payload) for device, payload in states.items()}


def read_device_states(out: str | Path) -> dict[int, DeviceState]:
    """Every device's latest state in a run folder (its device files, then its checkpoint's
    changed devices over them, as a resume sees them); devices that never trained have none."""
    out = Path(out)
    states = dict(DeviceStore(out / DEVICES, cache_size=0).states())
    checkpoint = outputs.load_checkpoint(out / CHECKPOINT)
    if checkpoint is not None:
        states.update(checkpoint_device_states(checkpoint))
    return dict(sorted(states.items()))


def personalized_metrics(
    runner: ModelRunner,
    test: Any,
    device_indices: list[list[int]],
    global_state: dict[str, torch.Tensor],
    personal: Mapping[int, dict[str, torch.Tensor]] | Iterable[tuple[int, dict[str, torch.Tensor]]],
    batch_size: int,
    num_classes: int,
) -> dict[str, float | int | None]:
    """Every device's own model (its personal entries over the global state) on its own test
    indices, the predictions of all devices pooled into one accuracy / f1 / mcc, and `devices`:
    how many devices' test parts were pooled (those with a non-empty part).

    `personal`: a dict, or (device, entries) pairs in device order, consumed one at a time (a
    DeviceStore streams them from disk). A device that never trained, or a method without
    personal state, uses the global model: those devices are evaluated together in one pass.
    """
    pairs = sorted(personal.items()) if isinstance(personal, Mapping) else personal
    own_preds, own_labels, own = [], [], set()
    for device, state in pairs:
        part = device_indices[device]
        if not state:
            continue
        own.add(device)
        if not part:
            continue
        runner.load_state(global_state)
        runner.load_state(state, strict=False)
        own_preds.append(runner.predictions(test, part, batch_size))
        own_labels.append(test.labels[part])
    shared = [i for d, part in enumerate(device_indices) if d not in own for i in part]
    preds, labels = [], []
    runner.load_state(global_state)
    if shared:
        # First, as before streaming: the pooled predictions keep their order.
        preds.append(runner.predictions(test, shared, batch_size))
        labels.append(test.labels[shared])
    preds += own_preds
    labels += own_labels
    devices = sum(1 for part in device_indices if part)
    if not preds:
        return {"accuracy": None, "f1": None, "mcc": None, "devices": 0}
    pooled = classification_metrics(torch.cat(preds), torch.as_tensor(torch.cat([torch.as_tensor(x) for x in labels])), num_classes)
    return {**pooled, "devices": devices}


def compute_clock_of(config: RunConfig, prepared: Prepared) -> Callable[[], float]:
    """The clock for devices' simulated compute seconds (federation.compute_clock)."""
    return compute_clock(config.federation.compute_clock, prepared.runner.loaded.device)


def train_device(
    config: RunConfig,
    prepared: Prepared,
    device: int,
    round_num: int,
    global_state: dict,
    state: DeviceState,
    initial_state: dict,
    *,
    exchanged_keys: list[str],
    own_start_keys: list[str],
    sparse: SparseSettings | None,
    probe: ProbeSettings | None,
    fault: str | None = None,
) -> DeviceUpdate:
    """One device's round on its own partition (every runtime's device side): `device_round`
    with the run's settings. `global_state` must hold the exchanged keys and the global value
    of every non-exchanged key that `state.personal` lacks. `fault`: an injected fault kind
    (faults.device_fault) other than "hang", which the runtime plays itself."""
    if fault == "hang":
        raise ValueError("a hang is the runtime's to play: it cannot happen inside train_device")
    runner = faults.FailingRunner(prepared.runner) if fault == "raise" else prepared.runner
    update = device_round(
        runner,
        device,
        round_num,
        config.seed,
        global_state,
        state,
        prepared.train,
        prepared.train_parts[device],
        train_settings(config),
        test=prepared.test if config.federation.personalized_eval else None,
        test_indices=prepared.device_eval_indices[device],
        num_classes=len(prepared.task.label_names),
        exchanged_keys=exchanged_keys,
        clock=compute_clock_of(config, prepared),
        curriculum=curriculum_settings(config),
        sparse=sparse,
        initial_state=initial_state,
        probe=probe,
        own_start_keys=own_start_keys,
    )
    if fault == "raise":
        # It made fewer batches than FailingRunner.fail_at: it breaks down at the end of its
        # round instead, after writing its new state (which the runtime must put back).
        raise faults.InjectedFault(f"injected fault: device {device} broke down at the end of round {round_num}")
    if fault is not None:
        update.state = faults.corrupt_update(update.state, fault)
    return update


def probe_device(
    config: RunConfig, prepared: Prepared, device: int, round_num: int, global_state: dict, settings: ProbeSettings
) -> LayerProbe:
    """A device's layer sensitivities (L,) of the global model, before the round (ProbeRequest)."""
    part = prepared.train_parts[device]
    scores, seconds = device_layer_scores(
        prepared.runner, prepared.train, part, global_state, settings.probe_samples, settings.noise_scale,
        settings.measure, config.seed, round_num, device, clock=compute_clock_of(config, prepared),
    )
    return LayerProbe(scores, seconds, len(part))


class Simulation:
    """Run `config` in-process, writing into `out_dir`."""

    def __init__(self, config: RunConfig, out_dir: str | Path, progress: bool = False, resume: bool = True):
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress
        self.resume = resume
        # Bytes of checkpoint + device files written in each round this process ran.
        self.bytes_written: list[int] = []

    def _check_existing(self) -> dict[str, Any] | None:
        """Return a checkpoint to resume from, or None; refuse to mix two different runs."""
        checkpoint = outputs.load_checkpoint(self.out / CHECKPOINT) if self.resume else None
        if checkpoint is None:
            return None
        differences = saved_config_differences(checkpoint["config"], self.config)
        if differences:
            raise different_run_error(self.out, differences, START_OVER)
        return checkpoint

    def run(self) -> dict[str, Any]:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint = self._check_existing()
        prepared = prepare(cfg)
        fingerprint = data_fingerprint(prepared)
        if checkpoint is not None:
            check_same_data(checkpoint, fingerprint, self.out, START_OVER)
        # Written once the data and model loaded: a run refused before that leaves the folder's
        # config.json describing the run that is there.
        outputs.write_json(self.out / "config.json", config_to_dict(cfg))
        runner = prepared.runner
        num_classes = len(prepared.task.label_names)
        # The model as loaded: the run's initial global state (the initialisation phase scores with it).
        initial_state = runner.state()
        settings = server_settings(cfg, len(prepared.train_parts), len(transformer_layers(runner.loaded.model)))

        if checkpoint is not None:
            server = Server.from_checkpoint(settings, checkpoint, initial_state=initial_state)
            store = DeviceStore(self.out / DEVICES, cfg.federation.device_cache)
            # A kill after the checkpoint but before (all) its device files: write them now.
            store.restore(checkpoint_device_states(checkpoint))
            logger.info("resuming %s after round %d", self.out, checkpoint["round"])
        else:
            # An earlier run's checkpoint and device files in this folder (--fresh) are not this
            # run's: gone only now that this run's data and model loaded.
            (self.out / CHECKPOINT).unlink(missing_ok=True)
            shutil.rmtree(self.out / DEVICES, ignore_errors=True)
            store = DeviceStore(self.out / DEVICES, cfg.federation.device_cache)
            server = Server(settings, initial_state)
            server.record_start(self._evaluate(prepared, server.global_state, store, num_classes))
        outputs.write_metrics(self.out / "metrics.jsonl", server.history)

        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.federation.rounds, initial=server.round, desc="rounds", unit="round")
            bar.set_postfix(acc=f"{server.history[-1].get('accuracy') or 0:.3f}")
        for round_num in range(server.round + 1, cfg.federation.rounds + 1):
            started = time.perf_counter()
            request = server.probe_request(round_num)
            probes = self._probe_global_model(prepared, server.global_state, request) if request is not None else None
            plan = server.plan_round(round_num, probes)
            updates, failed = self._train_devices(prepared, plan, server.global_state, store, initial_state)
            result = server.finish_round(plan, updates, failed)
            for device in result.dropped:
                # A device whose update the server rejected keeps the state it had before this round.
                store.discard(device)
            evaluation = None
            if result.evaluate:
                evaluation = self._evaluate(prepared, server.global_state, store, num_classes, plan.exchanged_keys)
            row = server.record_round(result, evaluation, time.perf_counter() - started)
            outputs.write_metrics(self.out / "metrics.jsonl", server.history)
            # The checkpoint first, with the round's new device states in it; then the device
            # files: they are never ahead of the checkpoint (device_store).
            written = outputs.save_checkpoint(
                self.out / CHECKPOINT,
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": config_to_dict(cfg),
                    "data_fingerprint": fingerprint,
                    "changed_devices": {k: state_to_payload(v) for k, v in store.staged().items()},
                    **server.to_checkpoint(),
                },
            )
            self.bytes_written.append(written + store.commit())
            if bar is not None:
                self._show_progress(bar, server.history, row)
        if bar is not None:
            bar.close()

        return self._finish(prepared, server.global_state, server.history)

    def _probe_global_model(self, prepared: Prepared, global_state: dict, request: ProbeRequest) -> dict[int, LayerProbe]:
        """The requested devices' layer sensitivities (L,) of the global model, before the round.

        A device whose probe raises is left out of the choice; if every device's
        does, the first error is raised (the same code broke everywhere: a bug, not a device). The
        Flower strategy does the same."""
        probes, errors = {}, []
        for device in request.devices:
            try:
                probes[device] = probe_device(self.config, prepared, device, request.round_num, global_state, request.settings)
            except Exception as exc:  # noqa: BLE001 - one device's failure must not end the run
                logger.warning("device %d failed its layer probe in round %d (%s: %s); it is left out of the choice",
                               device, request.round_num, type(exc).__name__, exc, exc_info=True)
                errors.append(exc)
        if errors and len(errors) == len(request.devices):
            raise errors[0]
        return probes

    def _train_devices(
        self, prepared: Prepared, plan: RoundPlan, global_state: dict, store: DeviceStore, initial_state: dict,
    ) -> tuple[list[DeviceUpdate], dict[int, str]]:
        """The in-process transport: each planned device trains in turn on the one model, on a
        working copy of its state, staged in `store` if its round completes.

        Returns the updates and the devices that sent none with the reason ("error": their round
        raised, their stored state stays; "timeout": an injected hang).
        """
        cfg = self.config
        updates: list[DeviceUpdate] = []
        failed: dict[int, str] = {}
        errors: list[Exception] = []
        injected = faults.round_faults(cfg.seed, plan.round_num, plan.devices, cfg.federation.faults.share,
                                       cfg.federation.faults.kinds)
        for device in plan.devices:
            if injected.get(device) == "hang":
                # One process cannot pre-empt a device: its reply would come after the deadline,
                # so it does not train at all (config.FaultsConfig).
                logger.warning("device %d does not answer in round %d (injected hang): timed out", device, plan.round_num)
                failed[device] = "timeout"
                continue
            state = store.checkout(device)
            try:
                # The whole global state: a device's first participation starts its personal
                # layers from their global values.
                update = train_device(
                    cfg, prepared, device, plan.round_num, global_state, state, initial_state,
                    exchanged_keys=plan.exchanged_keys, own_start_keys=plan.own_start_keys, sparse=plan.sparse,
                    probe=plan.probe, fault=injected.get(device),
                )
            except Exception as exc:  # noqa: BLE001 - whatever breaks a device's round, the others go on
                expected = isinstance(exc, (NonFiniteLossError, faults.InjectedFault))
                logger.warning("device %d failed in round %d (%s: %s); it is left out of this round",
                               device, plan.round_num, type(exc).__name__, exc, exc_info=not expected)
                failed[device] = "error"
                if not expected:
                    errors.append(exc)
                continue
            store.stage(device, state)
            updates.append(update)
        if errors and len(errors) == len(plan.devices):
            # The same code broke on every device: a bug or a broken setup, not a device's fault.
            raise errors[0]
        return updates, failed

    @staticmethod
    def _show_progress(bar: Any, history: list[dict[str, Any]], row: dict[str, Any]) -> None:
        recent = [r["accuracy"] for r in history if r["round"] > 0 and r.get("accuracy") is not None][-3:]
        if row.get("accuracy") is not None:
            # Under non-IID data one round's accuracy swings; the mean of the last 3 shows the trend.
            postfix = {"acc": f"{row['accuracy']:.3f}", "avg3": f"{sum(recent) / len(recent):.3f}"}
            if row.get("personalized_accuracy") is not None:
                postfix["pers"] = f"{row['personalized_accuracy']:.3f}"
            bar.set_postfix(postfix, refresh=False)
        bar.update(1)

    def _evaluate(
        self, prepared: Prepared, global_state: dict, store: DeviceStore, num_classes: int,
        exchanged: list[str] | None = None,
    ) -> dict[str, Any]:
        """The global model on the central test subset, and every device's own model on its own
        test part, predictions pooled (the lineage's personalised score). A device's model is its
        personal entries of the layers that are not aggregated now, over the current global state."""
        runner = prepared.runner
        row = central_evaluation(prepared, global_state, self.config.train.eval_batch_size, num_classes)
        if self.config.federation.personalized_eval:
            shared = set(exchanged or [])
            # Streamed from the store, one device at a time: never every device's state at once.
            personal = ((d, {k: v for k, v in s.personal.items() if k not in shared}) for d, s in store.states())
            pooled = personalized_metrics(runner, prepared.test, prepared.device_eval_indices, global_state,
                                          personal, self.config.train.eval_batch_size, num_classes)
            row.update({f"personalized_{k}": v for k, v in pooled.items()})
        else:
            row["personalized_accuracy"] = None
        return row

    def _finish(self, prepared: Prepared, global_state: dict, history: list[dict[str, Any]]) -> dict[str, Any]:
        return write_run_outputs(self.config, self.out, prepared, global_state, history)


def central_evaluation(prepared: Prepared, global_state: dict, batch_size: int, num_classes: int) -> dict[str, Any]:
    """The global model on the central test subset (federation.eval_samples): a metrics row's fields."""
    runner = prepared.runner
    runner.load_state(global_state)
    central = runner.evaluate(prepared.test, prepared.eval_indices, batch_size, num_classes)
    return {"accuracy": central["accuracy"], "f1": central["f1"], "mcc": central["mcc"], "test_loss": central["loss"]}


def write_run_outputs(
    config: RunConfig, out: Path, prepared: Prepared, global_state: dict, history: list[dict[str, Any]]
) -> dict[str, Any]:
    """The files every runtime leaves: adapter/ (peft format), summary.json, accuracy.png."""
    runner = prepared.runner
    runner.load_state(global_state)
    adapter_dir = out / "adapter"
    # peft's own format: PeftModel.from_pretrained(base_model, adapter_dir) loads it.
    runner.loaded.model.save_pretrained(adapter_dir)
    runner.loaded.tokenizer.save_pretrained(adapter_dir)
    evaluated = [r for r in history if r.get("accuracy") is not None]
    personal = [r for r in history if r.get("personalized_accuracy") is not None]
    labels = prepared.task.test.labels
    majority = max(labels.count(c) for c in set(labels)) / len(labels) if labels else None
    last = history[-1]
    summary = {
        "method": config.method.name,
        "model": config.model.name,
        "data": prepared.task.name,
        "rounds": last["round"],
        "num_devices": len(prepared.train_parts),
        "label_names": prepared.task.label_names,
        "majority_rate": majority,
        "initial_accuracy": evaluated[0]["accuracy"] if evaluated else None,
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "best_accuracy": max(r["accuracy"] for r in evaluated) if evaluated else None,
        "final_f1": evaluated[-1].get("f1") if evaluated else None,
        "final_mcc": evaluated[-1].get("mcc") if evaluated else None,
        "headline_metric": prepared.task.metric,
        # Every device's own model on its own test part, pooled, at the last evaluation that got
        # any device's answer (on Flower a round's evaluation can get none), and that round: the
        # score comparison.json's personalized_final_accuracy holds (with --metric accuracy).
        "final_personalized_accuracy": personal[-1]["personalized_accuracy"] if personal else None,
        "final_personalized_round": personal[-1]["round"] if personal else None,
        "final_sampled_personalized_accuracy": last.get("sampled_personalized_accuracy"),
        "wall_time_s": last["wall_time_s"],
        "sim_time_s": last["sim_time_s"],
        "compute_time_s": last.get("compute_time_s"),
        "upload_bytes": last["upload_bytes"],
        "download_bytes": last["download_bytes"],
        # Sampled devices that contributed nothing, by reason, over all rounds (server.REJECTION_REASONS).
        "rejected": rejection_totals(history),
        "trainable_parameters": sum(v.numel() for v in global_state.values()),
        "adapter_dir": str(adapter_dir),
    }
    outputs.write_json(out / "summary.json", summary)
    outputs.plot_metrics(
        history, out / "accuracy.png", title=f"{config.method.name} on {prepared.task.name}", majority=majority
    )
    return summary
