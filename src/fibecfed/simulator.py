"""The in-process federated runner: K simulated devices, one model in memory.

Each round: sample devices (seeded by run seed and round), run `device_round` for each, one
after another, on the single model (their states swapped in and out), aggregate, evaluate,
write a metrics line and a checkpoint. A killed run started again with the same output folder
resumes after the last completed round.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fibecfed import outputs
from fibecfed.accounting import compute_clock, serialized_nbytes, simulated_round_seconds
from fibecfed.config import RunConfig, config_to_dict
from fibecfed.data.loaders import load_task
from fibecfed.data.partition import partition_task
from fibecfed.data.types import TaskData
from fibecfed.encoding import encode_dataset
from fibecfed.errors import ConfigError
from fibecfed.evaluation import classification_metrics
from fibecfed.federated import (
    CurriculumSettings,
    ProbeSettings,
    SparseSettings,
    device_layer_scores,
    DeviceState,
    DeviceUpdate,
    LocalTrainSettings,
    ModelRunner,
    aggregate_updates,
    device_round,
    valid_updates,
)
from fibecfed.adapters import layer_of_key
from fibecfed.layers import aggregation_keys, combine_layer_scores, select_aggregation_layers, transformer_layers
from fibecfed.models import load_model
from fibecfed.training import NonFiniteLossError

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


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
SINGLE_PROMPT = "{text}\nAnswer:"
PAIR_PROMPT = "{text}\n{text_pair}\nAnswer:"


def default_label_words(task_name: str, label_names: list[str]) -> list[str]:
    """Next-token words per class (leading space: a word inside a sentence)."""
    if task_name in PRESET_LABEL_WORDS and len(PRESET_LABEL_WORDS[task_name]) == len(label_names):
        return PRESET_LABEL_WORDS[task_name]
    return [" " + name.replace("_", " ") for name in label_names]


def prompt_template(configured: str | None, has_pairs: bool) -> str:
    """The verbalizer prompt; a sentence-pair task must show the model both sentences."""
    if configured is None:
        return PAIR_PROMPT if has_pairs else SINGLE_PROMPT
    if has_pairs and "{text_pair}" not in configured:
        raise ConfigError("this task has sentence pairs: model.prompt_template must contain {text_pair} as well as {text}")
    if "{text}" not in configured:
        raise ConfigError("model.prompt_template must contain {text}")
    return configured


def prepare(config: RunConfig) -> Prepared:
    """Load and partition the data, load the model, tokenise once."""
    task = load_task(config.data, config.seed)
    train_parts, test_parts = partition_task(task, config.partition, config.seed, config.data.group_column is not None)
    if config.federation.devices_per_round > len(train_parts):
        raise ConfigError(
            f"federation.devices_per_round ({config.federation.devices_per_round}) exceeds the "
            f"{len(train_parts)} devices of the partition"
        )
    label_words = config.model.label_words or default_label_words(task.name, task.label_names)
    if len(label_words) != len(task.label_names):
        raise ConfigError(
            f"model.label_words has {len(label_words)} words but the task has {len(task.label_names)} "
            f"labels ({', '.join(task.label_names)})"
        )
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
    )


def sparse_settings(config: RunConfig) -> SparseSettings | None:
    sp = config.method.sparse
    if not sp.enabled or not config.method.layers.enabled:
        # Without layer selection every layer is aggregated: there is nothing to update sparsely.
        return None
    return SparseSettings(
        share=sp.share,
        gamma=sp.gamma,
        fisher_source=sp.fisher_source,
        fisher_samples=sp.fisher_samples,
        batch_size=config.method.curriculum.score_batch_size,
        every=sp.every,
        lora_a_importance=sp.lora_a_importance,
        fisher_every=sp.fisher_every,
    )


def probe_settings(config: RunConfig) -> ProbeSettings:
    layers = config.method.layers
    return ProbeSettings(probe_samples=layers.probe_samples, noise_scale=layers.noise_scale, measure=layers.measure)


def sample_devices(seed: int, round_num: int, num_devices: int, per_round: int) -> list[int]:
    """The devices that train in `round_num`: a seeded draw without replacement, sorted."""
    rng = np.random.default_rng([seed, round_num, 0, 0])
    return sorted(rng.choice(num_devices, per_round, replace=False).tolist())


def _same_config(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Equal, except that keys the saved run predates (added to fibecfed since) are ignored."""
    for key, value in saved.items():
        if key not in current:
            return False
        if isinstance(value, dict) and isinstance(current[key], dict):
            if not _same_config(value, current[key]):
                return False
        elif value != current[key]:
            return False
    return True


# Layer-selection policies that rank the layers by the devices' sensitivity probes.
_PROBED = ("sensitivity", "reverse")


def personalized_metrics(
    runner: ModelRunner,
    test: Any,
    device_indices: list[list[int]],
    global_state: dict[str, torch.Tensor],
    personal: dict[int, dict[str, torch.Tensor]],
    batch_size: int,
    num_classes: int,
) -> dict[str, float]:
    """Every device's own model (its personal entries over the global state) on its own test
    indices, the predictions of all devices pooled into one accuracy / f1 / mcc.

    A device that never trained, or a method without personal state, uses the global model:
    those devices are evaluated together in one pass.
    """
    shared = [i for d, part in enumerate(device_indices) if not personal.get(d) for i in part]
    preds, labels = [], []
    runner.load_state(global_state)
    if shared:
        preds.append(runner.predictions(test, shared, batch_size))
        labels.append(test.labels[shared])
    for device, state in sorted(personal.items()):
        part = device_indices[device]
        if not state or not part:
            continue
        runner.load_state(global_state)
        runner.load_state(state, strict=False)
        preds.append(runner.predictions(test, part, batch_size))
        labels.append(test.labels[part])
    runner.load_state(global_state)
    if not preds:
        return {"accuracy": None, "f1": None, "mcc": None}
    return classification_metrics(torch.cat(preds), torch.as_tensor(torch.cat([torch.as_tensor(x) for x in labels])), num_classes)


def _weighted_mean(values: list[tuple[float, int]]) -> float | None:
    total = sum(w for _, w in values)
    return sum(v * w for v, w in values) / total if total else None


class Simulation:
    """Run `config` in-process, writing into `out_dir`."""

    def __init__(self, config: RunConfig, out_dir: str | Path, progress: bool = False, resume: bool = True):
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress
        self.resume = resume

    def _check_existing(self) -> dict[str, Any] | None:
        """Return a checkpoint to resume from, or None; refuse to mix two different runs."""
        checkpoint = outputs.load_checkpoint(self.out / CHECKPOINT) if self.resume else None
        if checkpoint is None:
            return None
        if not _same_config(checkpoint["config"], config_to_dict(self.config)):
            raise ConfigError(
                f"{self.out} holds a run with a different config; use another --out, or --fresh to start over"
            )
        return checkpoint

    def run(self) -> dict[str, Any]:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint = self._check_existing()
        outputs.write_json(self.out / "config.json", config_to_dict(cfg))
        prepared = prepare(cfg)
        runner = prepared.runner
        settings = train_settings(cfg)
        curriculum = curriculum_settings(cfg)
        sparse = sparse_settings(cfg)
        num_classes = len(prepared.task.label_names)
        num_devices = len(prepared.train_parts)
        # The model as loaded: the run's initial global state (the initialisation phase scores with it).
        initial_state = runner.state()

        if checkpoint is not None:
            start_round = checkpoint["round"] + 1
            global_state = checkpoint["global_state"]
            device_states = {int(k): DeviceState(**v) for k, v in checkpoint["device_states"].items()}
            history = checkpoint["history"]
            totals = {"compute_time_s": 0.0, **checkpoint["totals"]}
            server = checkpoint["server"]
            logger.info("resuming %s after round %d", self.out, checkpoint["round"])
        else:
            start_round = 1
            global_state = dict(initial_state)
            device_states = {}
            history = []
            totals = {"wall_time_s": 0.0, "sim_time_s": 0.0, "compute_time_s": 0.0, "upload_bytes": 0, "download_bytes": 0, "bytes_saved": 0}
            # Server-side method state: the global aggregation layers and from which round they hold.
            server = {"layers": None, "layers_round": None, "layer_scores": None}
            # Round 0: the starting point (the curve's first point, and the majority-rate check).
            history.append(self._round0_row(prepared, global_state, device_states, num_classes))
        outputs.write_metrics(self.out / "metrics.jsonl", history)

        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.federation.rounds, initial=start_round - 1, desc="rounds", unit="round")
            bar.set_postfix(acc=f"{history[-1].get('accuracy') or 0:.3f}")
        for round_num in range(start_round, cfg.federation.rounds + 1):
            started = time.perf_counter()
            sampled = sample_devices(cfg.seed, round_num, num_devices, cfg.federation.devices_per_round)
            updates: list[DeviceUpdate] = []
            failed: list[int] = []
            backups: dict[int, DeviceState] = {}
            extra_seconds = {d: 0.0 for d in sampled}
            extra_upload = {d: 0 for d in sampled}
            if self._layers_due(server, round_num):
                self._select_layers(prepared, global_state, sampled, round_num, server, extra_seconds, extra_upload)
            warmup = self._warming_up(server)
            if warmup:
                # Before the first choice only the keys outside the layers travel (method.layers.select_after).
                exchanged = aggregation_keys(runner.keys, [])
            else:
                exchanged = runner.keys if server["layers"] is None else aggregation_keys(runner.keys, server["layers"])
            probe = probe_settings(cfg) if self._probe_due(server, round_num) else None
            used_layers = None if warmup else server["layers"]
            # Layers that join the aggregated ones this round start from the devices' own values.
            joined = (server.get("joined") or []) if server.get("layers_round") == round_num else []
            own_start = [k for k in exchanged if layer_of_key(k) in set(joined)]
            full_bytes = serialized_nbytes(global_state)
            download = serialized_nbytes({k: global_state[k] for k in exchanged})
            for device in sampled:
                state = device_states.setdefault(device, DeviceState())
                backup = copy.deepcopy(state)
                backups[device] = backup
                try:
                    update = device_round(
                        runner,
                        device,
                        round_num,
                        cfg.seed,
                        global_state,
                        state,
                        prepared.train,
                        prepared.train_parts[device],
                        settings,
                        test=prepared.test if cfg.federation.personalized_eval else None,
                        test_indices=prepared.device_eval_indices[device],
                        num_classes=num_classes,
                        exchanged_keys=exchanged,
                        clock=self._compute_clock(prepared),
                        curriculum=curriculum,
                        # Warm-up rounds train every layer densely: no aggregation layers yet.
                        sparse=None if warmup else sparse,
                        initial_state=initial_state,
                        probe=probe,
                        own_start_keys=own_start,
                    )
                except NonFiniteLossError as exc:
                    logger.warning("device %d failed in round %d (%s); it is left out of this round", device, round_num, exc)
                    device_states[device] = backup
                    failed.append(device)
                    continue
                if update.layer_scores is not None:
                    extra_upload[device] += serialized_nbytes({"layer_scores": update.layer_scores})
                updates.append(update)
            good, dropped = valid_updates(updates)
            for device in dropped:
                # A device whose update had NaN/inf keeps the state it had before this round.
                device_states[device] = backups[device]
            global_state = aggregate_updates(global_state, [u.state for u in good], [u.num_samples for u in good])
            if probe is not None:
                self._choose_from_probes(good, round_num, server)

            # Per device: [compute s, download bytes, upload bytes, initialisation-phase s]. The
            # initialisation phase ran in the background from the start: it delays the device's
            # first round only by the part that did not fit in the time before it.
            costs = [
                [u.compute_seconds + extra_seconds[u.device], download, serialized_nbytes(u.state) + extra_upload[u.device], u.background_seconds]
                for u in updates
            ]
            sim_round = simulated_round_seconds(
                [c + max(0.0, bg - totals["sim_time_s"]) for c, _, _, bg in costs],
                [d for _, d, _, _ in costs],
                [u for _, _, u, _ in costs],
                cfg.federation.bandwidth_mbps,
            )
            compute_round = max((c + max(0.0, bg - totals["compute_time_s"]) for c, _, _, bg in costs), default=0.0)
            upload_sizes = [u for _, _, u, _ in costs]
            download_sizes = [download] * (len(updates) + len(failed))
            totals["upload_bytes"] += sum(upload_sizes)
            totals["download_bytes"] += sum(download_sizes)
            totals["sim_time_s"] += sim_round
            totals["compute_time_s"] += compute_round
            # What FedAvg would have sent for the same devices: the full adapter both ways.
            totals["bytes_saved"] += 2 * full_bytes * len(updates) - sum(upload_sizes) - download * len(updates)

            row: dict[str, Any] = {"round": round_num, "devices": sampled}
            if round_num % cfg.federation.eval_every == 0 or round_num == cfg.federation.rounds:
                row.update(self._evaluate(prepared, global_state, device_states, num_classes, exchanged))
            else:
                row.update({"accuracy": None, "personalized_accuracy": None})
            personal = [(u.personalized, u.personalized_count) for u in good if u.personalized]
            row["sampled_personalized_accuracy"] = _weighted_mean([(p["accuracy"], n) for p, n in personal])
            row["loss"] = _weighted_mean([(u.loss, u.num_samples) for u in good])
            row["failed_devices"] = sorted(failed + dropped)
            row["curriculum_fraction"] = _weighted_mean([(u.curriculum_fraction, u.num_samples) for u in updates])
            row["aggregated_layers"] = used_layers
            if probe is not None:
                row["layer_scores"] = server["layer_scores"]
            row["trained_personal"] = sum(u.trained_personal for u in updates)
            row["bytes_saved_vs_fedavg"] = totals["bytes_saved"]
            row["scoring_seconds"] = round(sum(u.scoring_seconds for u in updates), 3)
            row["device_costs"] = [[round(c, 4), d, u, round(bg, 4)] for c, d, u, bg in costs]
            totals["wall_time_s"] += time.perf_counter() - started
            row.update(
                {
                    "wall_time_s": round(totals["wall_time_s"], 3),
                    "sim_time_s": round(totals["sim_time_s"], 3),
                    "compute_time_s": round(totals["compute_time_s"], 3),
                    "upload_bytes": totals["upload_bytes"],
                    "download_bytes": totals["download_bytes"],
                    "round_upload_bytes": sum(upload_sizes),
                }
            )
            history.append(row)
            outputs.write_metrics(self.out / "metrics.jsonl", history)
            outputs.save_checkpoint(
                self.out / CHECKPOINT,
                {
                    "round": round_num,
                    "config": config_to_dict(cfg),
                    "global_state": global_state,
                    "device_states": {k: dataclasses.asdict(v) for k, v in device_states.items()},
                    "history": history,
                    "totals": totals,
                    "server": server,
                },
            )
            if bar is not None:
                recent = [r["accuracy"] for r in history if r["round"] > 0 and r.get("accuracy") is not None][-3:]
                if row.get("accuracy") is not None:
                    # Under non-IID data one round's accuracy swings; the mean of the last 3 shows the trend.
                    postfix = {"acc": f"{row['accuracy']:.3f}", "avg3": f"{sum(recent) / len(recent):.3f}"}
                    if row.get("personalized_accuracy") is not None:
                        postfix["pers"] = f"{row['personalized_accuracy']:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()

        return self._finish(prepared, global_state, history)

    def _evaluate(
        self, prepared: Prepared, global_state: dict, device_states: dict[int, DeviceState], num_classes: int,
        exchanged: list[str] | None = None,
    ) -> dict[str, Any]:
        """The global model on the central test subset, and every device's own model on its own
        test part, predictions pooled (the lineage's personalised score). A device's model is its
        personal entries of the layers that are not aggregated now, over the current global state."""
        runner = prepared.runner
        runner.load_state(global_state)
        central = runner.evaluate(prepared.test, prepared.eval_indices, self.config.train.eval_batch_size, num_classes)
        row = {"accuracy": central["accuracy"], "f1": central["f1"], "mcc": central["mcc"], "test_loss": central["loss"]}
        if self.config.federation.personalized_eval:
            shared = set(exchanged or [])
            personal = {d: {k: v for k, v in s.personal.items() if k not in shared} for d, s in device_states.items()}
            pooled = personalized_metrics(runner, prepared.test, prepared.device_eval_indices, global_state,
                                          personal, self.config.train.eval_batch_size, num_classes)
            row.update({f"personalized_{k}": v for k, v in pooled.items()})
        else:
            row["personalized_accuracy"] = None
        return row

    def _warming_up(self, server: dict[str, Any]) -> bool:
        layers = self.config.method.layers
        return layers.enabled and layers.select_after > 0 and server["layers"] is None and layers.policy in _PROBED

    def _probe_due(self, server: dict[str, Any], round_num: int) -> bool:
        """Whether the sampled devices probe their trained models at the end of this round."""
        layers = self.config.method.layers
        if not layers.enabled or layers.policy not in _PROBED or layers.select_after == 0:
            return False
        if server["layers"] is None:
            return round_num >= layers.select_after
        # The layers chosen hold from layers_round on; refresh after refresh_every rounds of them.
        return layers.refresh_every > 0 and round_num - server["layers_round"] + 1 >= layers.refresh_every

    def _choose_from_probes(self, updates: list[DeviceUpdate], round_num: int, server: dict[str, Any]) -> None:
        """The server's choice for the next rounds, from the devices' trained-model sensitivities
        averaged by data size (method.md Part 2: top share of the layers)."""
        probed = [u for u in updates if u.layer_scores is not None]
        if not probed:
            logger.warning("round %d: no device returned layer scores; the aggregation layers stay as they are", round_num)
            return
        cfg = self.config.method.layers
        combined = combine_layer_scores([u.layer_scores for u in probed], [u.num_samples for u in probed])
        previous = server["layers"] or []
        server["layers"] = select_aggregation_layers(combined, cfg.share, cfg.policy)
        server["joined"] = sorted(set(server["layers"]) - set(previous))
        server["layers_round"] = round_num + 1
        server["layer_scores"] = [round(float(x), 6) for x in combined]
        logger.info("after round %d: aggregation layers %s (scores %s)", round_num, server["layers"], server["layer_scores"])

    def _compute_clock(self, prepared: Prepared) -> Callable[[], float]:
        """The clock for devices' simulated compute seconds (federation.compute_clock)."""
        return compute_clock(self.config.federation.compute_clock, prepared.runner.loaded.device)

    def _layers_due(self, server: dict[str, Any], round_num: int) -> bool:
        """Whether the server chooses the layers before this round: policies without scores, or a
        probe of the global model (method.layers.select_after=0)."""
        layers = self.config.method.layers
        if not layers.enabled or (layers.policy in _PROBED and layers.select_after > 0):
            return False
        if server["layers"] is None:
            return True
        return layers.refresh_every > 0 and round_num - server["layers_round"] >= layers.refresh_every

    def _select_layers(
        self,
        prepared: Prepared,
        global_state: dict,
        sampled: list[int],
        round_num: int,
        server: dict[str, Any],
        extra_seconds: dict[int, float],
        extra_upload: dict[int, int],
    ) -> None:
        """Choose the global aggregation layers from the sampled devices' sensitivity scores.

        Each device measures the sensitivity of every layer on a local batch and sends the L
        scores (counted in its upload and compute time); the server averages them weighted by
        data size and keeps the top share (method.md Part 2).
        """
        cfg = self.config.method.layers
        scores, weights = [], []
        if cfg.policy in ("sensitivity", "reverse"):
            for device in sampled:
                device_scores, seconds = device_layer_scores(
                    prepared.runner, prepared.train, prepared.train_parts[device], global_state,
                    cfg.probe_samples, cfg.noise_scale, cfg.measure, self.config.seed, round_num, device,
                    clock=self._compute_clock(prepared),
                )
                scores.append(device_scores)
                weights.append(len(prepared.train_parts[device]))
                extra_seconds[device] += seconds
                extra_upload[device] += serialized_nbytes({"layer_scores": device_scores})
            combined = combine_layer_scores(scores, weights)
        else:
            combined = torch.zeros(len(transformer_layers(prepared.runner.loaded.model)))
        rng = np.random.default_rng([self.config.seed, round_num, 0, 5])
        previous = server["layers"] or []
        server["layers"] = select_aggregation_layers(combined, cfg.share, cfg.policy, rng=rng)
        server["joined"] = sorted(set(server["layers"]) - set(previous)) if previous else []
        server["layers_round"] = round_num
        server["layer_scores"] = [round(float(x), 6) for x in combined]
        logger.info("round %d: aggregation layers %s (scores %s)", round_num, server["layers"], server["layer_scores"])

    def _round0_row(
        self, prepared: Prepared, global_state: dict, device_states: dict[int, DeviceState], num_classes: int
    ) -> dict[str, Any]:
        return {
            "round": 0,
            "devices": [],
            **self._evaluate(prepared, global_state, device_states, num_classes),
            "sampled_personalized_accuracy": None,
            "loss": None,
            "failed_devices": [],
            "wall_time_s": 0.0,
            "sim_time_s": 0.0,
            "compute_time_s": 0.0,
            "upload_bytes": 0,
            "download_bytes": 0,
            "round_upload_bytes": 0,
            "device_costs": [],
            "curriculum_fraction": None,
            "aggregated_layers": None,
            "bytes_saved_vs_fedavg": 0,
            "scoring_seconds": 0.0,
        }

    def _finish(self, prepared: Prepared, global_state: dict, history: list[dict[str, Any]]) -> dict[str, Any]:
        runner = prepared.runner
        runner.load_state(global_state)
        adapter_dir = self.out / "adapter"
        # peft's own format: PeftModel.from_pretrained(base_model, adapter_dir) loads it.
        runner.loaded.model.save_pretrained(adapter_dir)
        runner.loaded.tokenizer.save_pretrained(adapter_dir)
        evaluated = [r for r in history if r.get("accuracy") is not None]
        labels = prepared.task.test.labels
        majority = max(labels.count(c) for c in set(labels)) / len(labels) if labels else None
        last = history[-1]
        summary = {
            "method": self.config.method.name,
            "model": self.config.model.name,
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
            # Every device's own model on its own test part, pooled, at the last evaluation.
            "final_personalized_accuracy": evaluated[-1].get("personalized_accuracy") if evaluated else None,
            "final_sampled_personalized_accuracy": last.get("sampled_personalized_accuracy"),
            "wall_time_s": last["wall_time_s"],
            "sim_time_s": last["sim_time_s"],
            "compute_time_s": last.get("compute_time_s"),
            "upload_bytes": last["upload_bytes"],
            "download_bytes": last["download_bytes"],
            "trainable_parameters": sum(v.numel() for v in global_state.values()),
            "adapter_dir": str(adapter_dir),
        }
        outputs.write_json(self.out / "summary.json", summary)
        outputs.plot_metrics(
            history, self.out / "accuracy.png", title=f"{self.config.method.name} on {prepared.task.name}", majority=majority
        )
        return summary
