"""One device's round and the server's aggregation step, shared by every runtime.

The in-process simulator and the Flower app both call `device_round` and `aggregate_updates`;
they differ only in how states travel (Python objects vs Flower messages).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fibecfed.adapters import AdapterState, get_state, set_state, trainable_parameters
from fibecfed.aggregation import has_non_finite, merge_state, weighted_average
from fibecfed.encoding import EncodedDataset, collate
from fibecfed.evaluation import classification_metrics, predict
from fibecfed.heads import class_logits
from fibecfed.models import LoadedModel
from fibecfed.training import NonFiniteLossError, local_train, num_local_steps, sample_batches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalTrainSettings:
    """The values local training needs (a slice of the run config)."""

    lr: float
    head_lr: float | None
    weight_decay: float
    batch_size: int
    local_steps: int | None
    local_epochs: float | None
    max_grad_norm: float | None
    eval_batch_size: int
    prox_mu: float = 0.0


@dataclass
class DeviceState:
    """Everything a device keeps between participations; never leaves the device.

    `personal` holds the adapter entries that are not exchanged with the server (empty for
    FedAvg). `extra` holds method state such as difficulty scores or Fisher momentum.
    """

    personal: AdapterState = field(default_factory=dict)
    participations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeviceUpdate:
    device: int
    state: AdapterState  # the exchanged entries after local training (what is uploaded)
    num_samples: int  # the device's training-set size: its aggregation weight
    loss: float
    compute_seconds: float
    steps: int
    personalized: dict[str, float] | None = None  # metrics of the device's model on its test part
    personalized_count: int = 0


class ModelRunner:
    """A loaded model plus its trainable parameters, for running devices one after another.

    Only one copy of the model exists; a device's state is swapped into it before it trains.
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.params = trainable_parameters(loaded.model)
        self.pad_token_id = int(loaded.tokenizer.pad_token_id)

    @property
    def keys(self) -> list[str]:
        return list(self.params.keys())

    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return class_logits(self.loaded.model, batch, self.loaded.head, self.loaded.label_token_ids)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits(batch), batch["labels"])

    def batch(self, encoded: EncodedDataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return collate(encoded, indices, self.pad_token_id, self.loaded.device)

    def load_state(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        set_state(self.params, state, strict=strict)

    def state(self, keys: Sequence[str] | None = None) -> AdapterState:
        return get_state(self.params, keys)

    def evaluate(self, encoded: EncodedDataset, indices: Sequence[int], batch_size: int, num_classes: int) -> dict[str, float]:
        """Accuracy, f1, mcc and mean loss of the current model on `indices`."""
        self.loaded.model.eval()
        # Batches of similar length waste little compute on padding (about 2x faster on tweets);
        # the metrics do not depend on the order.
        ordered = sorted(indices, key=lambda i: len(encoded.input_ids[i]))
        preds, loss = predict(self.logits, lambda idx: self.batch(encoded, idx), ordered, batch_size)
        metrics = classification_metrics(preds, encoded.labels[ordered], num_classes)
        metrics["loss"] = loss
        return metrics


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from (run seed, round, device, purpose): independent streams, reproducible."""
    return int(np.random.default_rng(list(parts)).integers(0, 2**63 - 1))


def device_round(
    runner: ModelRunner,
    device: int,
    round_num: int,
    seed: int,
    global_state: Mapping[str, torch.Tensor],
    device_state: DeviceState,
    train: EncodedDataset,
    train_indices: Sequence[int],
    settings: LocalTrainSettings,
    test: EncodedDataset | None = None,
    test_indices: Sequence[int] = (),
    num_classes: int = 2,
    exchanged_keys: Sequence[str] | None = None,
) -> DeviceUpdate:
    """Download, train locally, and return what the device uploads.

    The model is loaded with the global state for the exchanged keys and the device's own
    personal state for the rest; after training, the personal entries are written back into
    `device_state` and the exchanged ones are returned.
    """
    keys = list(exchanged_keys) if exchanged_keys is not None else runner.keys
    runner.load_state({k: global_state[k] for k in keys}, strict=False)
    personal_keys = [k for k in runner.keys if k not in set(keys)]
    if personal_keys:
        # First participation: the device starts its personal layers from the initial global values.
        runner.load_state({k: device_state.personal.get(k, global_state[k]) for k in personal_keys}, strict=False)

    rng = np.random.default_rng([seed, round_num, device, 1])
    steps = num_local_steps(len(train_indices), settings.batch_size, settings.local_steps, settings.local_epochs)
    batch_indices = sample_batches(train_indices, settings.batch_size, steps, rng)
    anchor = {k: global_state[k] for k in keys} if settings.prox_mu > 0 else None

    runner.loaded.model.train()
    started = time.perf_counter()
    # Dropout draws from torch's global RNG: seed it per (run, round, device) inside a fork so
    # the run is reproducible and resumable and the caller's RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, round_num, device, 2))
        result = local_train(
            runner.params,
            runner.loss,
            (runner.batch(train, idx) for idx in batch_indices),
            lr=settings.lr,
            head_lr=settings.head_lr,
            weight_decay=settings.weight_decay,
            max_grad_norm=settings.max_grad_norm,
            prox_mu=settings.prox_mu,
            prox_anchor=anchor,
        )
    compute_seconds = time.perf_counter() - started

    upload = runner.state(keys)
    device_state.personal = runner.state(personal_keys) if personal_keys else {}
    device_state.participations += 1
    personalized, count = None, 0
    if test is not None and len(test_indices) > 0:
        personalized = runner.evaluate(test, test_indices, settings.eval_batch_size, num_classes)
        count = len(test_indices)
    return DeviceUpdate(
        device=device,
        state=upload,
        num_samples=len(train_indices),
        loss=result.mean_loss,
        compute_seconds=compute_seconds,
        steps=result.steps,
        personalized=personalized,
        personalized_count=count,
    )


def aggregate_updates(
    global_state: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> AdapterState:
    """FedAvg over the uploaded entries, merged into the previous global state.

    Entries nobody uploaded keep their previous global values.
    """
    if not states:
        return dict(global_state)
    return merge_state(global_state, weighted_average(states, weights))


def valid_updates(updates: Sequence[DeviceUpdate]) -> tuple[list[DeviceUpdate], list[int]]:
    """Split updates into those safe to aggregate and the devices whose update had NaN/inf."""
    good, dropped = [], []
    for update in updates:
        bad = has_non_finite(update.state)
        if bad:
            logger.warning("device %d sent non-finite values (%s ...); its update is dropped", update.device, bad[0])
            dropped.append(update.device)
        else:
            good.append(update)
    return good, dropped


__all__ = [
    "DeviceState",
    "DeviceUpdate",
    "LocalTrainSettings",
    "ModelRunner",
    "NonFiniteLossError",
    "aggregate_updates",
    "derive_seed",
    "device_round",
    "valid_updates",
]
