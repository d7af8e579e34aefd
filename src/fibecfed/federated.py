"""One device's round and the server's aggregation step, shared by every runtime.

Every runtime's device side calls `device_round` (through `simulator.train_device`), and its
server side `server.Server`, which checks the updates with `valid_updates` and aggregates them
(`aggregation.weighted_average`, then the server optimiser's step); the in-process simulator
and the Flower apps only decode, call and encode. `aggregate_updates` is plain FedAvg over the
uploaded entries, without the server optimiser.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fibecfed.adapters import (
    AdapterState,
    get_state,
    is_lora_key,
    is_token_key,
    layer_of_key,
    set_state,
    trainable_parameters,
)
from fibecfed.aggregation import UpdateProblem, merge_state, update_problem, weighted_average
from fibecfed.curriculum import class_balanced_pool, curriculum_pool, pacing_fraction
from fibecfed.encoding import EncodedDataset, collate
from fibecfed.fisher import FisherAccumulator, head_fisher_trace, score_and_fisher, score_dataset
from fibecfed.evaluation import classification_metrics, predict
from fibecfed.heads import HeadOutput, class_logits, class_logits_and_features
from fibecfed.layers import layer_sensitivity
from fibecfed.masks import base_key, fisher_sums, importance_from_sums, neuron_masks, update_fisher_momentum
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


@dataclass(frozen=True)
class CurriculumSettings:
    """Part 1 switches (see config.CurriculumConfig)."""

    pacing: str = "linear"
    start_fraction: float = 0.2
    full_at: float = 0.8
    order: str = "easy_first"
    class_balanced: bool = False
    score_wrt: str = "adapters"
    normalize_by_length: bool = False
    score_at: str = "first_participation"
    score_samples: int | None = None
    online_refresh: bool = False
    rescore_every: int = 0
    score_batch_size: int = 32
    scale_steps: bool = False
    total_rounds: int = 1
    first_round_pool: str = "random"


@dataclass(frozen=True)
class SparseSettings:
    """Part 2b switches (see config.SparseUpdateConfig)."""

    share: float = 0.1
    gamma: float = 0.9
    fisher_source: str = "training"
    fisher_samples: int = 64
    batch_size: int = 32
    every: int = 1
    lora_a_importance: str = "rank"
    fisher_every: int = 1


@dataclass(frozen=True)
class ProbeSettings:
    """Part 2a: the layer-sensitivity probe a device runs on its trained model (config.LayerSelectionConfig)."""

    probe_samples: int = 16
    noise_scale: float = 0.01
    measure: str = "gain"


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
    curriculum_fraction: float = 1.0  # share of the device's data in this round's pool
    pool_size: int = 0
    scoring_seconds: float = 0.0  # part of compute_seconds spent on difficulty scores and Fisher
    # When, in seconds after the start of the run, the device's initialisation-phase scoring was
    # done (it runs in the background: see config.CurriculumConfig.score_at and
    # first_round_pool); it delays this round by the part the run's time before it did not cover.
    # Not part of compute_seconds.
    background_seconds: float = 0.0
    layer_scores: torch.Tensor | None = None  # (L,) sensitivity of its trained model, when probed
    probe_seconds: float = 0.0  # part of compute_seconds spent on the probe
    trained_personal: bool = False  # whether its non-aggregated layers trained this round


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

    def head_output(self, batch: Mapping[str, torch.Tensor]) -> HeadOutput:
        return class_logits_and_features(self.loaded.model, batch, self.loaded.head, self.loaded.label_token_ids)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits(batch), batch["labels"])

    def batch(self, encoded: EncodedDataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return collate(encoded, indices, self.pad_token_id, self.loaded.device)

    def load_state(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        set_state(self.params, state, strict=strict)

    def state(self, keys: Sequence[str] | None = None) -> AdapterState:
        return get_state(self.params, keys)

    def predictions(self, encoded: EncodedDataset, indices: Sequence[int], batch_size: int) -> torch.Tensor:
        """Predicted class of each of `indices`, shape (N,), in that order."""
        self.loaded.model.eval()
        # Longest first (see evaluate).
        ordered = sorted(range(len(indices)), key=lambda j: len(encoded.input_ids[indices[j]]), reverse=True)
        preds, _ = predict(self.logits, lambda idx: self.batch(encoded, idx), [indices[j] for j in ordered], batch_size)
        result = torch.empty(len(indices), dtype=torch.long)
        result[torch.tensor(ordered, dtype=torch.long)] = preds
        return result

    def evaluate(self, encoded: EncodedDataset, indices: Sequence[int], batch_size: int, num_classes: int) -> dict[str, float]:
        """Accuracy, f1, mcc and mean loss of the current model on `indices`."""
        self.loaded.model.eval()
        # Batches of similar length waste little compute on padding (about 2x faster on tweets);
        # the metrics do not depend on the order. Longest first: each batch's activations then fit
        # in the blocks the previous (longer) batch freed; shortest first, glibc's heap kept
        # growing (bench/scale.py, 1,000 devices: peak 1.42x of 2 devices, longest first 1.24x).
        ordered = sorted(indices, key=lambda i: len(encoded.input_ids[i]), reverse=True)
        preds, loss = predict(self.logits, lambda idx: self.batch(encoded, idx), ordered, batch_size)
        metrics = classification_metrics(preds, encoded.labels[ordered], num_classes)
        metrics["loss"] = loss
        return metrics


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from (run seed, round, device, purpose): independent streams, reproducible."""
    return int(np.random.default_rng(list(parts)).integers(0, 2**63 - 1))


def _length_sorted(encoded: EncodedDataset, indices: Sequence[int]) -> list[int]:
    """Indices ordered by token length, so scoring batches carry little padding."""
    return sorted(indices, key=lambda i: len(encoded.input_ids[i]))


def difficulty_of_device(
    runner: ModelRunner,
    train: EncodedDataset,
    train_indices: Sequence[int],
    settings: CurriculumSettings,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Fisher difficulty score of each of the device's samples, shape (n_k,), in `train_indices`
    order (NaN for samples left unscored when `settings.score_samples` caps the count: a random
    subset drawn with `rng`); and, when scored over the adapters, the diagonal Fisher of the same
    pass (free)."""
    chosen = list(train_indices)
    cap = settings.score_samples
    if cap is not None and len(chosen) > cap:
        if rng is None:
            raise ValueError("scoring a subsample needs an rng")
        chosen = rng.choice(np.asarray(chosen), cap, replace=False).tolist()
    ordered = _length_sorted(train, chosen)
    make_batch = lambda idx: runner.batch(train, idx)  # noqa: E731
    fisher = None
    if settings.score_wrt == "adapters":
        # Per-sample gradients come from nn.Linear hooks; trainable label-word rows are embedding
        # rows (tied to the LM head), so the adapter score leaves them out.
        linear_params = {k: p for k, p in runner.params.items() if not is_token_key(k)}
        scores, fisher = score_and_fisher(
            runner.loaded.model, linear_params, runner.logits, make_batch, ordered, settings.score_batch_size,
            normalize_by_length=settings.normalize_by_length,
        )
    else:
        scores = score_dataset(
            runner.loaded.model, runner.params, runner.logits, make_batch, ordered, settings.score_batch_size,
            wrt=settings.score_wrt, normalize_by_length=settings.normalize_by_length, head_fn=runner.head_output,
        )
    by_index = dict(zip(ordered, scores.tolist()))
    return torch.tensor([by_index.get(i, float("nan")) for i in train_indices], dtype=torch.float32), fisher


def _store_scores(device_state: DeviceState, scores: torch.Tensor, fisher: dict[str, torch.Tensor] | None, round_num: int) -> None:
    device_state.extra["scores"] = scores
    device_state.extra["scored_round"] = round_num
    if fisher is not None and "fisher" not in device_state.extra:
        # The first Fisher of the sparse update comes with adapter scores, at no extra cost; kept
        # as the row (and lora_B column) sums the masks need (masks.fisher_sums).
        device_state.extra["fisher"] = fisher_sums(fisher)


def initial_difficulty(
    runner: ModelRunner,
    train: EncodedDataset,
    train_indices: Sequence[int],
    device_state: DeviceState,
    initial_state: Mapping[str, torch.Tensor] | None,
    settings: CurriculumSettings,
    seed: int,
    device: int,
) -> None:
    """The initialisation phase of one device: score its data with the initial global model.

    The model's current state is put back afterwards. The subsample (score_samples) is drawn
    from (seed, device) alone, so it does not depend on when the device scores.
    """
    current = runner.state() if initial_state is not None else None
    if initial_state is not None:
        runner.load_state(initial_state)
    try:
        scores, fisher = difficulty_of_device(runner, train, train_indices, settings, np.random.default_rng([seed, 0, device, 6]))
    finally:
        if current is not None:
            runner.load_state(current)
    _store_scores(device_state, scores, fisher, 0)


def curriculum_round_pool(
    runner: ModelRunner,
    train: EncodedDataset,
    train_indices: Sequence[int],
    device_state: DeviceState,
    round_num: int,
    settings: CurriculumSettings,
    rng: np.random.Generator,
    seed: int = 0,
    device: int = 0,
) -> tuple[list[int], float]:
    """This round's training pool: the easiest ⌈g(t)·n_k⌉ samples (method.md Part 1).

    Scores come from the initialisation phase (`initial_difficulty`), or are computed here at
    the device's first participation with the model it has then; if `rescore_every` > 0, again
    once that many rounds have passed.
    """
    scored_round = device_state.extra.get("scored_round")
    stale = settings.rescore_every > 0 and scored_round is not None and round_num - scored_round >= settings.rescore_every
    if "scores" not in device_state.extra or stale:
        scores, fisher = difficulty_of_device(
            runner, train, train_indices, settings, np.random.default_rng([seed, round_num, device, 6])
        )
        _store_scores(device_state, scores, fisher, round_num)
    return _round_pool(train, train_indices, device_state.extra["scores"], round_num, settings, settings.order, rng)


def _round_pool(
    train: EncodedDataset,
    train_indices: Sequence[int],
    scores: Sequence[float] | torch.Tensor,
    round_num: int,
    settings: CurriculumSettings,
    order: str,
    rng: np.random.Generator,
) -> tuple[list[int], float]:
    """The round's pool of ⌈g(t)·n_k⌉ samples in `order` by `scores` (class-balanced if the
    curriculum is), and g(t)."""
    fraction = pacing_fraction(
        settings.pacing, round_num, settings.total_rounds, start_fraction=settings.start_fraction, full_at=settings.full_at
    )
    if settings.class_balanced:
        labels = train.labels[list(train_indices)].tolist()
        return class_balanced_pool(list(train_indices), scores, labels, fraction, order=order, rng=rng), fraction
    return curriculum_pool(list(train_indices), scores, fraction, order=order, rng=rng), fraction


def random_round_pool(
    train: EncodedDataset,
    train_indices: Sequence[int],
    round_num: int,
    settings: CurriculumSettings,
    rng: np.random.Generator,
) -> tuple[list[int], float]:
    """A pool of this round's size (⌈g(t)·n_k⌉) drawn at random, class-balanced if the curriculum
    is: a device's first pool when it does not wait for its difficulty scores
    (CurriculumSettings.first_round_pool="random")."""
    return _round_pool(train, train_indices, [float("nan")] * len(train_indices), round_num, settings, "random", rng)


def masks_from_fisher(
    fisher: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], settings: SparseSettings
) -> dict[str, torch.Tensor]:
    """Row masks keeping the top share ρ of each LoRA matrix's neurons by Fisher importance.

    `fisher`: the full diagonal (key -> the parameter's shape) or its `masks.fisher_sums`; both
    give the same masks."""
    importance = importance_from_sums(fisher_sums(fisher), shapes, settings.lora_a_importance == "rank")
    return neuron_masks(importance, shapes, settings.share)


def sparse_update_masks(
    runner: ModelRunner,
    train: EncodedDataset,
    pool: Sequence[int],
    personal_keys: Sequence[str],
    device_state: DeviceState,
    settings: SparseSettings,
    rng: np.random.Generator,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Masks that let only the most important neurons of the non-aggregated layers train.

    The diagonal Fisher F_t = γ F_{t-1} + (1-γ) F~_t (method.md Part 2) picks the top share ρ of
    each LoRA matrix's rows. With fisher_source=probe, F~_t comes from a pass over a sample of
    the pool now; with "training" it is the device's momentum from its earlier rounds. Returns
    the masks of the keys that have a Fisher, and the LoRA keys that have none yet (a first
    participation, or a layer that just stopped being aggregated): their masks come from the
    first training step's own Fisher (`device_round`), with no extra pass.
    """
    lora_keys = [k for k in personal_keys if is_lora_key(k)]
    if not lora_keys:
        return {}, []
    # fisher_sums: a state saved before the Fisher was kept as sums holds the full diagonal.
    fisher = fisher_sums(device_state.extra.get("fisher") or {})
    if settings.fisher_source == "probe":
        probe_size = min(settings.fisher_samples, len(pool))
        probe = _length_sorted(train, rng.choice(np.asarray(pool), probe_size, replace=False).tolist())
        personal_params = {k: runner.params[k] for k in lora_keys}
        _, fisher_now = score_and_fisher(
            runner.loaded.model, personal_params, runner.logits, lambda idx: runner.batch(train, idx), probe, settings.batch_size
        )
        fisher = {**fisher, **update_fisher_momentum(fisher, fisher_sums(fisher_now), settings.gamma)}
        device_state.extra["fisher"] = fisher
    known = [k for k in lora_keys if k in fisher]
    missing = [k for k in lora_keys if k not in fisher]
    masks = masks_from_fisher(fisher, {k: runner.params[k].shape for k in known}, settings) if known else {}
    return masks, missing


def _above_lowest(personal_keys: Sequence[str], exchanged_keys: Sequence[str]) -> list[str]:
    """The personal keys of layers above the lowest exchanged (aggregated) layer."""
    exchanged_layers = [layer_of_key(k) for k in exchanged_keys if layer_of_key(k) is not None]
    if not exchanged_layers:
        return []
    lowest = min(exchanged_layers)
    return [k for k in personal_keys if layer_of_key(k) is not None and layer_of_key(k) > lowest]


def round_steps(pool_size: int, fraction: float, settings: LocalTrainSettings, scale_steps: bool) -> int:
    """Local steps this round: epochs over the pool, or local_steps (times the pool fraction
    when the work follows the curriculum)."""
    if settings.local_steps is not None and scale_steps:
        return max(1, math.ceil(settings.local_steps * fraction - 1e-9))
    return num_local_steps(pool_size, settings.batch_size, settings.local_steps, settings.local_epochs)


def probe_layers(
    runner: ModelRunner,
    train: EncodedDataset,
    train_indices: Sequence[int],
    probe: ProbeSettings,
    seed: int,
    round_num: int,
    device: int,
) -> torch.Tensor:
    """Per-layer sensitivity (L,) of the model as it is now, on a random local batch."""
    rng = np.random.default_rng([seed, round_num, device, 3])
    size = min(probe.probe_samples, len(train_indices))
    chosen = _length_sorted(train, rng.choice(np.asarray(train_indices), size, replace=False).tolist())
    generator = torch.Generator().manual_seed(derive_seed(seed, round_num, device, 4))
    return layer_sensitivity(
        runner.loaded.model, runner.batch(train, chosen), noise_scale=probe.noise_scale, generator=generator, measure=probe.measure
    )


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
    curriculum: CurriculumSettings | None = None,
    sparse: SparseSettings | None = None,
    clock: Callable[[], float] = time.perf_counter,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    probe: ProbeSettings | None = None,
    own_start_keys: Sequence[str] = (),
) -> DeviceUpdate:
    """Download, train locally, and return what the device uploads.

    The model is loaded with the global state for the exchanged keys and the device's own
    personal state for the rest; after training, the personal entries are written back into
    `device_state` and the exchanged ones are returned. With every method switch off
    (curriculum=None, sparse=None, all keys exchanged) this is FedAvg's local step.
    `initial_state` is the run's initial global state, which the initialisation phase scores
    with (curriculum.score_at=init). `probe`: measure the layer sensitivity of the trained model
    at the end of the round (the scores travel up with the update). `own_start_keys`: exchanged
    keys of layers that have just joined the aggregated ones; the device starts them from its own
    trained values where it has them (their global values were never or long ago aggregated),
    and the average of what the devices send becomes their global value. `device_state.personal`
    keeps exactly the keys that are not exchanged this round: a layer that leaves the
    aggregated ones starts from its latest global value.
    """
    keys = list(exchanged_keys) if exchanged_keys is not None else runner.keys
    exchanged = set(keys)
    runner.load_state({k: global_state[k] for k in keys}, strict=False)
    own = {k: device_state.personal[k] for k in own_start_keys if k in exchanged and k in device_state.personal}
    if own:
        runner.load_state(own, strict=False)
    personal_keys = [k for k in runner.keys if k not in exchanged]
    if personal_keys:
        # First participation: the device starts its personal layers from the initial global values.
        runner.load_state({k: device_state.personal.get(k, global_state[k]) for k in personal_keys}, strict=False)

    background = 0.0
    unscored = curriculum is not None and curriculum.score_at == "init" and "scores" not in device_state.extra
    # In round 1 no device can have finished its initialisation-phase scoring (the run has only
    # just started). With first_round_pool=random it does not wait for it: it trains this round on
    # a random pool of the round's size and scores afterwards, in the background.
    deferred = unscored and round_num == 1 and curriculum.first_round_pool == "random"
    if unscored and not deferred:
        # The initialisation phase, which a real device runs as soon as it joins: timed apart.
        background_started = clock()
        initial_difficulty(runner, train, train_indices, device_state, initial_state, curriculum, seed, device)
        background = clock() - background_started
    elif "scores_due_s" in device_state.extra:
        # Scored after its round-1 training: done that many seconds after the start of the run.
        background = float(device_state.extra.pop("scores_due_s"))

    rng = np.random.default_rng([seed, round_num, device, 1])
    started = clock()
    pool, fraction = list(train_indices), 1.0
    if curriculum is not None and deferred:
        pool, fraction = random_round_pool(train, train_indices, round_num, curriculum, np.random.default_rng([seed, round_num, device, 7]))
    elif curriculum is not None:
        pool, fraction = curriculum_round_pool(runner, train, train_indices, device_state, round_num, curriculum, rng, seed, device)
    # The non-aggregated layers above the lowest aggregated one train every round: the backward
    # pass reaches them anyway. Those below it train in every k-th round (sparse.every), on every
    # device of that round alike: a round lasts as long as its slowest device, so a schedule per
    # device would put one that trains them in almost every round. Otherwise they are frozen and
    # the backward pass stops at the lowest aggregated layer.
    train_personal = bool(personal_keys) and (sparse is None or round_num % sparse.every == 0)
    training_personal = personal_keys if train_personal else _above_lowest(personal_keys, keys)
    masks, unmasked = None, []
    if sparse is not None and training_personal:
        masks, unmasked = sparse_update_masks(runner, train, pool, training_personal, device_state, sparse, rng)
    scoring_seconds = clock() - started

    steps = round_steps(len(pool), fraction, settings, curriculum is not None and curriculum.scale_steps)
    batch_indices = sample_batches(pool, settings.batch_size, steps, rng)
    anchor = {k: global_state[k] for k in keys} if settings.prox_mu > 0 else None

    lora_personal = [k for k in training_personal if is_lora_key(k)]
    accumulator = None
    if sparse is not None and sparse.fisher_source == "training" and lora_personal:
        accumulator = FisherAccumulator(runner.loaded.model, {k: runner.params[k] for k in lora_personal})
    lazy_masks = None
    if accumulator is not None and unmasked:
        known_masks = masks

        def lazy_masks() -> dict[str, torch.Tensor]:
            # Keys without a Fisher yet (a first participation): this step's own Fisher picks
            # their rows (with B = 0 through lora_B's columns: masks.rank_importance), so no
            # probe pass runs before training.
            first = accumulator.fisher()
            return {**known_masks, **masks_from_fisher(first, {k: runner.params[k].shape for k in unmasked}, sparse)}

        masks = None

    online = curriculum is not None and curriculum.online_refresh
    recorded: list[torch.Tensor] = []
    step = iter(range(len(batch_indices)))

    def loss_fn(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        index = next(step)
        if accumulator is not None:
            # The Fisher of every m-th step (sparse.fisher_every): its per-sample products cost.
            accumulator.enabled = index % sparse.fisher_every == 0
            if accumulator.enabled:
                accumulator.count(int(batch["labels"].shape[0]))
        if not online:
            return runner.loss(batch)
        out = runner.head_output(batch)
        # Each trained sample's difficulty, current, from this very forward pass (free). It is a
        # training pass: the dropout right before the head (BERT's classifier dropout on the
        # pooled output, 0.1 for MiniLM) would make ‖h‖² about 1/(1 - p) of its eval-mode value,
        # so the score uses the head's input and logits before that dropout
        # (HeadOutput.for_scores), on the scale of the initial eval-mode scores it is ranked with.
        # Earlier dropouts stay (an eval-mode score would cost a second forward pass); the
        # decoder has none.
        score_logits, score_features = out.for_scores()
        trace = head_fisher_trace(score_logits, score_features, batch["labels"], out.has_bias)
        if curriculum.normalize_by_length:
            trace = trace / batch["attention_mask"].sum(dim=1).float()
        recorded.append(trace.cpu())
        return torch.nn.functional.cross_entropy(out.logits, batch["labels"])

    runner.loaded.model.train()
    # Dropout draws from torch's global RNG: seed it per (run, round, device) inside a fork so
    # the run is reproducible and resumable and the caller's RNG is left untouched.
    with torch.random.fork_rng(devices=[]), accumulator or contextlib.nullcontext():
        torch.manual_seed(derive_seed(seed, round_num, device, 2))
        result = local_train(
            runner.params,
            loss_fn,
            (runner.batch(train, idx) for idx in batch_indices),
            lr=settings.lr,
            head_lr=settings.head_lr,
            weight_decay=settings.weight_decay,
            max_grad_norm=settings.max_grad_norm,
            prox_mu=settings.prox_mu,
            prox_anchor=anchor,
            update_masks=masks,
            frozen_keys=[k for k in personal_keys if k not in set(training_personal)],
            masks_after_first_backward=lazy_masks,
        )
    if accumulator is not None:
        # F_t = γ F_{t-1} + (1-γ) F~_t with F~_t from this round's own training steps.
        # Momentum of the sums (masks.fisher_sums): the sums of the momentum, up to float rounding.
        previous = fisher_sums(device_state.extra.get("fisher") or {})
        updated = update_fisher_momentum(previous, fisher_sums(accumulator.fisher()), sparse.gamma)
        # Layers that did not train this round keep their momentum; layers that are aggregated now drop theirs.
        personal = set(personal_keys)
        kept = {k: v for k, v in previous.items() if base_key(k) in personal and k not in updated}
        device_state.extra["fisher"] = {**kept, **updated}
    deferred_seconds = 0.0
    if deferred:
        # The initialisation phase, after the round's training (timed apart, not in its compute):
        # the same scores as before it, since they come from the initial model.
        deferred_started = clock()
        initial_difficulty(runner, train, train_indices, device_state, initial_state, curriculum, seed, device)
        deferred_seconds = clock() - deferred_started
    if recorded:
        position = {index: i for i, index in enumerate(train_indices)}
        scores = device_state.extra["scores"].clone()
        for batch, values in zip(batch_indices, recorded):
            for index, value in zip(batch, values.tolist()):
                scores[position[index]] = value
        device_state.extra["scores"] = scores
    layer_scores, probe_seconds = None, 0.0
    if probe is not None:
        probe_started = clock()
        layer_scores = probe_layers(runner, train, train_indices, probe, seed, round_num, device)
        probe_seconds = clock() - probe_started
    compute_seconds = clock() - started - deferred_seconds
    if deferred:
        # Round 1 starts at the start of the run and the device scores once its training and
        # probe are done (here it scored before the probe, timed apart: the same seconds), so its
        # scores are ready this long after the start; the time to download round 1's state is
        # left out (the warm-up round exchanges the head, if any), and so is a probe before the
        # round (select_after=0), which the server adds to the round's compute.
        device_state.extra["scores_due_s"] = compute_seconds + deferred_seconds

    upload = runner.state(keys)
    device_state.personal = runner.state(personal_keys)
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
        curriculum_fraction=fraction,
        pool_size=len(pool),
        scoring_seconds=scoring_seconds,
        background_seconds=background,
        layer_scores=layer_scores,
        probe_seconds=probe_seconds,
        trained_personal=train_personal,
    )


def device_layer_scores(
    runner: ModelRunner,
    train: EncodedDataset,
    train_indices: Sequence[int],
    global_state: Mapping[str, torch.Tensor],
    probe_samples: int,
    noise_scale: float,
    measure: str,
    seed: int,
    round_num: int,
    device: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[torch.Tensor, float]:
    """A device's per-layer sensitivity (L,) with the global model, before training; and seconds
    (method.layers.select_after=0)."""
    started = clock()
    runner.load_state(global_state)
    scores = probe_layers(runner, train, train_indices, ProbeSettings(probe_samples, noise_scale, measure), seed, round_num, device)
    return scores, clock() - started


def aggregate_updates(
    global_state: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> AdapterState:
    """FedAvg over the uploaded entries, merged into the previous global state.

    Entries nobody uploaded keep their previous global values.
    """
    if not states:
        return dict(global_state)
    return merge_state(global_state, weighted_average(states, weights))


def check_update(
    update: DeviceUpdate, expected: Mapping[str, torch.Tensor], num_layers: int | None = None
) -> UpdateProblem | None:
    """Why the server cannot aggregate `update`, or None: its state must be exactly the keys of
    `expected` (the global values the server sent), same shapes and dtypes, all finite; and its
    layer scores, if any, a finite (num_layers,) vector the round asked for (num_layers: the
    model's layer count in a round that probes, None otherwise)."""
    problem = update_problem(update.state, expected)
    if problem is not None or update.layer_scores is None:
        return problem
    scores = update.layer_scores
    if num_layers is None:
        return UpdateProblem("unknown_key", "layer scores the round did not ask for")
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        return UpdateProblem("dtype", "layer scores are not a floating-point tensor")
    if scores.shape != (num_layers,):
        return UpdateProblem("shape", f"layer scores have shape {tuple(scores.shape)}, expected ({num_layers},)")
    if not torch.isfinite(scores).all():
        return UpdateProblem("non_finite", "NaN or inf in the layer scores")
    return None


def valid_updates(
    updates: Sequence[DeviceUpdate], expected: Mapping[str, torch.Tensor], num_layers: int | None = None
) -> tuple[list[DeviceUpdate], dict[int, str]]:
    """Split updates into those safe to aggregate and the devices whose update is rejected, each
    with its reason (aggregation.UPDATE_PROBLEMS); see `check_update`."""
    good, rejected = [], {}
    for update in updates:
        problem = check_update(update, expected, num_layers)
        if problem is None:
            good.append(update)
        else:
            logger.warning("device %d: update rejected, %s (%s)", update.device, problem.reason, problem.detail)
            rejected[update.device] = problem.reason
    return good, rejected


__all__ = [
    "CurriculumSettings",
    "ProbeSettings",
    "SparseSettings",
    "device_layer_scores",
    "DeviceState",
    "DeviceUpdate",
    "LocalTrainSettings",
    "ModelRunner",
    "NonFiniteLossError",
    "aggregate_updates",
    "check_update",
    "derive_seed",
    "device_round",
    "valid_updates",
]
