"""Typed run configuration: dataclasses that validate themselves and reject unknown keys.

A config is built from a YAML preset shipped in the package (or a user file) plus `key=value`
overrides. Every problem is collected and reported at once, each naming its dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from fibecfed.errors import ConfigError


@dataclass
class ModelConfig:
    # A Hugging Face model id, a local folder, or a packaged alias: "minilm" (all-MiniLM-L6-v2)
    # or "smollm2" (SmolLM2-135M-Instruct from its GGUF file).
    name: str = "minilm"
    # "classifier": a sequence-classification head; "verbalizer": label words scored by the LM
    # head (decoders only); "auto": classifier for encoders, verbalizer for decoders.
    head: Literal["auto", "classifier", "verbalizer"] = "auto"
    # Label words for the verbalizer, one per class in label order (None: the label names).
    label_words: list[str] | None = None
    # Verbalizer only: train the label words' rows of the LM head, a (C, H) head that every method
    # exchanges and aggregates like a classifier head (train.head_lr). False: the pretrained rows,
    # and the verbalizer has no head to aggregate.
    train_label_words: bool = False
    # Prompt for the verbalizer; {text} and {text_pair} are replaced. None: "{text}\nAnswer:",
    # or "{text}\n{text_pair}\nAnswer:" for sentence-pair tasks.
    prompt_template: str | None = None
    max_length: int = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Folder that caches converted models (GGUF -> safetensors). None: ~/.cache/fibecfed.
    cache_dir: str | None = None

    def _check(self, issues: list[str]) -> None:
        if self.max_length < 8:
            issues.append(f"model.max_length must be >= 8, got {self.max_length}")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # "auto": per-architecture default (see fibecfed.models.DEFAULT_TARGET_MODULES).
    target_modules: list[str] | str = "auto"

    def _check(self, issues: list[str]) -> None:
        if self.r < 1:
            issues.append(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            issues.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0:
            issues.append(f"lora.alpha must be > 0, got {self.alpha}")


@dataclass
class DataConfig:
    # A preset ("tweets", "bbc_news", "sst2", "cola", "mrpc", "rte", "qnli", "subj"), "files"
    # for your own TSV/CSV/JSONL, or "hf" for a Hugging Face dataset (needs network).
    name: str = "tweets"
    # Folder of a GLUE-format preset (sst2 ... subj).
    path: str | None = None
    train_file: str | None = None
    test_file: str | None = None
    format: Literal["auto", "tsv", "csv", "jsonl"] = "auto"
    header: bool = True
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    # Column for the natural partition (partition.scheme=natural).
    group_column: str | None = None
    # Label names in class order; None: sorted unique labels of the train split.
    labels: list[str] | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    # Share of the train split held out as test where a dataset has no test split.
    test_fraction: float = 0.1
    max_train_samples: int | None = None
    max_test_samples: int | None = None

    def _check(self, issues: list[str]) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            issues.append(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        for key in ("max_train_samples", "max_test_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                issues.append(f"data.{key} must be >= 1, got {value}")


@dataclass
class PartitionConfig:
    scheme: Literal["iid", "dirichlet_label", "dirichlet_quantity", "natural"] = "dirichlet_label"
    num_devices: int = 20
    # Concentration of the per-device class priors (label skew) or sizes (quantity skew).
    alpha: float = 0.5
    # Concentration of the device sizes under label skew (FedPepTAO: 5).
    size_alpha: float = 5.0
    # A device with fewer train samples than this is an error (say how to fix it); at least 1.
    min_samples: int = 1

    def _check(self, issues: list[str]) -> None:
        if self.num_devices < 1:
            issues.append(f"partition.num_devices must be >= 1, got {self.num_devices}")
        if self.min_samples < 1:
            # A device without training data cannot train: every round it took part in would fail.
            issues.append(f"partition.min_samples must be >= 1, got {self.min_samples}")
        if self.alpha <= 0 or self.size_alpha <= 0:
            issues.append("partition.alpha and partition.size_alpha must be > 0")


@dataclass
class TrainConfig:
    """Local training on a device in one round."""

    # AdamW learning rate of the adapters; None: the method's tuned rate (TUNED_LEARNING_RATES).
    lr: float | None = None
    # Learning rate of the classification head; None: the method's tuned rate.
    head_lr: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 16
    # Exactly one of local_steps / local_epochs is used: steps if set, else epochs.
    local_steps: int | None = 4
    local_epochs: float | None = None
    max_grad_norm: float | None = 1.0
    eval_batch_size: int = 64

    def _check(self, issues: list[str]) -> None:
        if self.lr is not None and self.lr <= 0:
            issues.append(f"train.lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            issues.append(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.local_steps is None and self.local_epochs is None:
            issues.append("set train.local_steps or train.local_epochs")
        if self.local_steps is not None and self.local_epochs is not None:
            issues.append("set only one of train.local_steps and train.local_epochs (e.g. train.local_steps=null train.local_epochs=1)")
        if self.head_lr is not None and self.head_lr <= 0:
            issues.append(f"train.head_lr must be > 0, got {self.head_lr}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            issues.append(f"train.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.eval_batch_size < 1:
            issues.append(f"train.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.weight_decay < 0:
            issues.append(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.local_steps is not None and self.local_steps < 1:
            issues.append(f"train.local_steps must be >= 1, got {self.local_steps}")
        if self.local_epochs is not None and self.local_epochs <= 0:
            issues.append(f"train.local_epochs must be > 0, got {self.local_epochs}")


# Injected device faults (federation.faults.kinds). Each names what a faulty device does and,
# after the colon, the reason the server gives for leaving its update out (metrics "rejected").
FAULT_KINDS: dict[str, str] = {
    "raise": "error",  # the device's code raises an exception in the middle of its round
    "hang": "timeout",  # the device does not answer before federation.device_timeout_s
    "nan": "non_finite",  # one value of its update is NaN
    "inf": "non_finite",  # one value of its update is +inf
    "shape": "shape",  # one tensor of its update has the wrong shape
    "dtype": "dtype",  # one tensor of its update has the wrong dtype (float64)
    "unknown_key": "unknown_key",  # its update carries a key the server did not ask for
    "missing_key": "missing_key",  # its update lacks a key the server asked for
}


@dataclass
class FaultsConfig:
    """Injected device faults, to see a run survive them (off by default: share=0).

    Each device that trains in a round is faulty in that round with probability `share`, drawn
    from (seed, round, device), so a run is reproducible and resumes like any other; a faulty
    device's kind is drawn uniformly from `kinds` (list one twice to draw it twice as often).
    The server rejects what a faulty device sends (or never receives it); the device keeps the
    state it had before the round. "hang": a device that does not answer by the deadline. The
    in-process runtime cannot pre-empt a device, so there the device does not train and the
    server counts it as timed out, the round's simulated time including the whole
    federation.device_timeout_s it waited (set that to a realistic deadline when injecting
    hangs). On the Flower runtime the node really sleeps past the deadline. Faults hit the
    training rounds, not the probes of the global model (method.layers.select_after=0) nor the
    evaluations.
    """

    share: float = 0.0
    kinds: list[str] = field(default_factory=lambda: list(FAULT_KINDS))

    def _check(self, issues: list[str]) -> None:
        if not 0.0 <= self.share <= 1.0:
            issues.append(f"federation.faults.share must be in [0, 1], got {self.share}")
        if not self.kinds:
            issues.append(f"federation.faults.kinds must name at least one kind of {', '.join(FAULT_KINDS)}")
        for kind in self.kinds:
            if kind not in FAULT_KINDS:
                close = difflib.get_close_matches(kind, list(FAULT_KINDS), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                issues.append(f"federation.faults.kinds: unknown fault kind {kind!r}{hint}; kinds: {', '.join(FAULT_KINDS)}")


@dataclass
class ServerOptConfig:
    """How the server turns the average of the uploads into the new global values
    (fibecfed.aggregation.server_step): "avg" jumps to the average (FedAvg); "momentum" (FedAvgM)
    and "adam" (FedAdam, Reddi et al. 2021) step along the pseudo-gradient average − global.
    Only the aggregated keys move, for every method alike."""

    kind: Literal["avg", "momentum", "adam"] = "avg"
    # None: 1.0 for momentum, TUNED_ADAM_LR of the method for adam (docs/defaults.md).
    lr: float | None = None
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def _check(self, issues: list[str]) -> None:
        if self.lr is not None and self.lr <= 0:
            issues.append(f"federation.server_opt.lr must be > 0, got {self.lr}")
        if self.kind == "avg" and self.lr not in (None, 1.0):
            issues.append(f"federation.server_opt.lr applies to kind momentum or adam; avg takes the average itself (got lr={self.lr})")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                issues.append(f"federation.server_opt.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.tau <= 0:
            issues.append(f"federation.server_opt.tau must be > 0, got {self.tau}")


@dataclass
class FederationConfig:
    rounds: int = 20
    devices_per_round: int = 4
    # Simulated link speed (both directions) for the simulated federated time.
    bandwidth_mbps: float = 10.0
    # The clock behind each device's simulated compute seconds. "process": this process's CPU
    # time, which other programs sharing the cores inflate far less than wall time (measured: 2-18%
    # on a run, through shared caches; it counts every torch thread, i.e. core-seconds). "wall": elapsed
    # time. "auto": process on CPU, wall on CUDA (GPU kernels run outside the CPU clock).
    compute_clock: Literal["auto", "process", "wall"] = "auto"
    eval_every: int = 1
    # Central evaluation on a fixed random subset of the test split of at most this size.
    eval_samples: int | None = 1000
    # Personalised evaluation, every evaluated round: every device's own model (its personal
    # layers + the global ones) on (at most device_eval_samples of) its own test part, the
    # predictions of all devices pooled into one score.
    personalized_eval: bool = True
    device_eval_samples: int | None = 200
    # Where the devices run: "inprocess" (one model, devices in turn: fibecfed.simulator) or
    # "flower" (Flower's simulation runtime, one ClientApp per device: fibecfed.flower; needs
    # the `flower` extra). Same server, same results up to float rounding.
    runtime: Literal["inprocess", "flower"] = "inprocess"
    # Flower runtime: how long the server waits for a round's replies; a device that has not
    # answered by then (crashed, hung, cut off) counts as failed and the round aggregates the rest.
    # Both runtimes: a round with an injected hang (faults.kinds) lasts this long in simulated time.
    device_timeout_s: float = 3600.0
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    # In-process runtime: how many devices' private states stay in memory; the others live in
    # <out>/devices/ (fibecfed.device_store). Changes nothing in the results, so a run may
    # resume with another value.
    device_cache: int = 32
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)

    def _check(self, issues: list[str]) -> None:
        if self.device_cache < 0:
            issues.append(f"federation.device_cache must be >= 0, got {self.device_cache}")
        if self.device_timeout_s <= 0:
            issues.append(f"federation.device_timeout_s must be > 0, got {self.device_timeout_s}")
        if self.rounds < 1:
            issues.append(f"federation.rounds must be >= 1, got {self.rounds}")
        if self.devices_per_round < 1:
            issues.append(f"federation.devices_per_round must be >= 1, got {self.devices_per_round}")
        if self.bandwidth_mbps <= 0:
            issues.append(f"federation.bandwidth_mbps must be > 0, got {self.bandwidth_mbps}")
        if self.eval_every < 1:
            issues.append(f"federation.eval_every must be >= 1, got {self.eval_every}")
        for key in ("eval_samples", "device_eval_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                issues.append(f"federation.{key} must be >= 1 or null, got {value}")


@dataclass
class CurriculumConfig:
    """Part 1 of FibecFed: train each device easy-to-hard by Fisher-information difficulty."""

    # None: on for method.name=fibecfed, off otherwise.
    enabled: bool | None = None
    # Share of a device's easiest samples used in round t: linear | root | step | none.
    pacing: Literal["linear", "root", "step", "none"] = "linear"
    start_fraction: float = 0.2  # lambda_0: share in the first round
    full_at: float = 0.8  # beta: all data from this share of the rounds on
    # easy_first (the method), hard_first (anti-curriculum ablation), random (pool of random samples).
    order: Literal["easy_first", "hard_first", "random"] = "easy_first"
    # Rank each class on its own and take the same share of each (our choice; see docs/defaults.md).
    class_balanced: bool = True
    # Gradient of log p(y|x) with respect to the adapters (+head), the input embeddings, the
    # class scores (logits), or a linear head's weights (head: the exact Fisher trace
    # ‖p - e_y‖²(‖h‖² + 1); logits and head need a forward pass only).
    score_wrt: Literal["adapters", "embeddings", "logits", "head"] = "head"
    normalize_by_length: bool = False
    # When a device scores its data: "init", the initialisation phase, with the initial model,
    # in the background from the start of the run (it delays a round only by the part that did
    # not fit before the device's first round); "first_participation", with the model it
    # receives then, on the round's critical path.
    score_at: Literal["init", "first_participation"] = "init"
    # With score_at=init, what the devices of round 1 train on: "scored", the easiest share by
    # their scores (they wait for their initialisation phase: the run has only just started);
    # "random", a random pool of the round's size (class-balanced if class_balanced), scoring
    # after the round in the background, so that round 1 does not wait for it. None: "random"
    # with score_at=init (chosen on the tuning set, docs/defaults.md), else "scored" (a device
    # that scores at its first participation has no initialisation phase to wait for). Runs
    # saved before this key existed used "scored" (simulator.PREDATED_DEFAULTS).
    first_round_pool: Literal["scored", "random"] | None = None
    # Score at most this many of a device's samples (a seeded random subset; null: all). The
    # others rank after the scored ones and join the pool last.
    score_samples: int | None = 256
    # Keep the scores of the samples a device trains on current from the training forward pass
    # itself (the head's Fisher trace, free). None: on when score_wrt=head (the same quantity)
    # and order=easy_first.
    online_refresh: bool | None = None
    # Re-score a device's data with the current model every R rounds (0: never).
    rescore_every: int = 0
    score_batch_size: int = 32
    # With train.local_steps, train ceil(local_steps · pool fraction) steps, so the local work
    # follows the pool as it does with local_epochs (early rounds are cheaper).
    scale_steps: bool = True

    def _check(self, issues: list[str]) -> None:
        if not 0.0 < self.start_fraction <= 1.0:
            issues.append(f"method.curriculum.start_fraction must be in (0, 1], got {self.start_fraction}")
        if not 0.0 < self.full_at <= 1.0:
            issues.append(f"method.curriculum.full_at must be in (0, 1], got {self.full_at}")
        if self.rescore_every < 0:
            issues.append(f"method.curriculum.rescore_every must be >= 0, got {self.rescore_every}")
        if self.score_batch_size < 1:
            issues.append(f"method.curriculum.score_batch_size must be >= 1, got {self.score_batch_size}")
        if self.score_samples is not None and self.score_samples < 1:
            issues.append(f"method.curriculum.score_samples must be >= 1 or null, got {self.score_samples}")
        if self.first_round_pool == "random" and self.score_at != "init":
            issues.append(
                "method.curriculum.first_round_pool=random lets round 1 skip the wait for the initialisation "
                f"phase: it needs method.curriculum.score_at=init (got {self.score_at})"
            )
        if self.online_refresh and self.score_wrt != "head":
            issues.append(
                "method.curriculum.online_refresh refreshes scores with the head's Fisher trace: it needs "
                f"method.curriculum.score_wrt=head (got {self.score_wrt})"
            )


@dataclass
class LayerSelectionConfig:
    """Part 2a: aggregate only the global aggregation layers (GAL); the rest stay on the device."""

    enabled: bool | None = None  # None: on for method.name=fibecfed
    share: float = 0.17  # share of the transformer layers that are aggregated (1 of MiniLM's 6)
    # sensitivity (most sensitive first), reverse, random, all.
    policy: Literal["sensitivity", "reverse", "random", "all"] = "sensitivity"
    # How a layer's sensitivity is measured (fibecfed.layers.layer_sensitivity): "gain", how much
    # it amplifies a perturbation of its input; "relative_gain", the same for the perturbation
    # relative to the hidden states' size (does not favour layers that rescale the residual
    # stream, as a decoder's first layer does); "output_change", method.md's literal reading.
    measure: Literal["gain", "relative_gain", "output_change"] = "gain"
    noise_scale: float = 0.01
    # Rounds of local training before the first choice: in them only the head (and any other
    # key outside the transformer layers) is exchanged, every layer trains on the device, and at
    # the end of the last one the sampled devices probe their trained models. 0: probe the
    # initial global model before round 1 (its LoRA B are zero: the probe sees the backbone).
    select_after: int = 1
    # Re-select every R rounds after that, from the sampled devices' trained models (0: never).
    refresh_every: int = 5
    probe_samples: int = 16  # samples per device for the sensitivity probe

    def _check(self, issues: list[str]) -> None:
        if not 0.0 < self.share <= 1.0:
            issues.append(f"method.layers.share must be in (0, 1], got {self.share}")
        if self.noise_scale <= 0:
            issues.append(f"method.layers.noise_scale must be > 0, got {self.noise_scale}")
        if self.refresh_every < 0:
            issues.append(f"method.layers.refresh_every must be >= 0, got {self.refresh_every}")
        if self.probe_samples < 1:
            issues.append(f"method.layers.probe_samples must be >= 1, got {self.probe_samples}")
        if self.select_after < 0:
            issues.append(f"method.layers.select_after must be >= 0, got {self.select_after}")


@dataclass
class SparseUpdateConfig:
    """Part 2b: update non-aggregated layers only at their most important neurons."""

    enabled: bool | None = None  # None: on for method.name=fibecfed
    share: float = 0.1  # rho: share of the neurons (rows of each LoRA matrix) that train
    gamma: float = 0.9  # momentum of the Fisher: F_t = gamma F_{t-1} + (1 - gamma) F~_t
    # Where F~_t comes from: "training" collects per-sample squared gradients during the local
    # steps themselves (no extra pass; F from the previous participation picks this round's mask);
    # "probe" runs a separate pass over `fisher_samples` pool samples before training.
    fisher_source: Literal["training", "probe"] = "training"
    fisher_samples: int = 64  # probe size (fisher_source=probe)
    # The non-aggregated layers below the lowest aggregated one train in every k-th round (1:
    # every round); in the others they are frozen and the backward pass stops at the lowest
    # aggregated layer (the compute the sparse update saves). Those above it train every round:
    # the backward pass reaches them anyway.
    every: int = 3
    # Collect the Fisher on every m-th local step only (its per-sample products cost compute).
    fisher_every: int = 2
    # Importance of a lora_A row: "rank", its rank component's (its own Fisher plus that of
    # lora_B's matching column, non-zero while B = 0); "rows", its own Fisher only.
    lora_a_importance: Literal["rank", "rows"] = "rank"

    def _check(self, issues: list[str]) -> None:
        if self.every < 1:
            issues.append(f"method.sparse.every must be >= 1, got {self.every}")
        if self.fisher_every < 1:
            issues.append(f"method.sparse.fisher_every must be >= 1, got {self.fisher_every}")
        if not 0.0 <= self.share <= 1.0:
            issues.append(f"method.sparse.share must be in [0, 1], got {self.share}")
        if not 0.0 <= self.gamma < 1.0:
            issues.append(f"method.sparse.gamma must be in [0, 1), got {self.gamma}")
        if self.fisher_samples < 1:
            issues.append(f"method.sparse.fisher_samples must be >= 1, got {self.fisher_samples}")


# (adapter lr, head lr) per method, chosen by the tuning protocol in docs/defaults.md: the same
# grid and seeds for every method on a tuning dataset that the benchmark table leaves out.
TUNED_LEARNING_RATES: dict[str, tuple[float, float]] = {
    "fedavg": (0.001, 0.01),
    "fedprox": (0.002, 0.01),
    "fibecfed": (0.005, 0.01),
}
TUNED_PROX_MU = 0.1
# FedAdam's server learning rate per method when federation.server_opt.lr is unset, from the
# tuning protocol in docs/defaults.md (`bench/tune.py --grid server`: the same grid and seeds for
# FedAvg's and FibecFed's clients). FedProx was not tuned with it: its clients are FedAvg's plus
# the proximal term, so it takes FedAvg's value. Momentum (FedAvgM) takes the usual 1.0
# (Hsu et al. 2019); "avg" has no step size (it takes the average itself).
TUNED_ADAM_LR: dict[str, float] = {"fedavg": 0.01, "fedprox": 0.01, "fibecfed": 0.01}


@dataclass
class MethodConfig:
    # fedavg, fedprox and fibecfed are one loop with different switches (see README, Methods).
    name: Literal["fedavg", "fedprox", "fibecfed"] = "fedavg"
    # FedProx proximal term weight; None: TUNED_PROX_MU for fedprox, 0 otherwise.
    prox_mu: float | None = None
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    layers: LayerSelectionConfig = field(default_factory=LayerSelectionConfig)
    sparse: SparseUpdateConfig = field(default_factory=SparseUpdateConfig)

    def _resolve(self) -> None:
        """Fill the switches left at None from the method's name."""
        is_fibecfed = self.name == "fibecfed"
        for part in (self.curriculum, self.layers, self.sparse):
            if part.enabled is None:
                part.enabled = is_fibecfed

        if self.curriculum.online_refresh is None:
            # On for the head score in the easy-first order (hard-first with refreshed scores
            # would rotate through the samples it has just made easy).
            self.curriculum.online_refresh = self.curriculum.score_wrt == "head" and self.curriculum.order == "easy_first"
        if self.curriculum.first_round_pool is None:
            self.curriculum.first_round_pool = "random" if self.curriculum.score_at == "init" else "scored"
        if self.prox_mu is None:
            self.prox_mu = TUNED_PROX_MU if self.name == "fedprox" else 0.0

    def _check(self, issues: list[str]) -> None:
        if self.prox_mu is not None and self.prox_mu < 0:
            issues.append(f"method.prox_mu must be >= 0, got {self.prox_mu}")


@dataclass
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    def _check(self, issues: list[str]) -> None:
        if self.seed < 0:
            issues.append(f"seed must be >= 0, got {self.seed}")
        # Under the natural partition the number of groups sets the device count (checked later).
        if self.partition.scheme != "natural" and self.federation.devices_per_round > self.partition.num_devices:
            issues.append(
                f"federation.devices_per_round ({self.federation.devices_per_round}) exceeds "
                f"partition.num_devices ({self.partition.num_devices})"
            )


# ---------------------------------------------------------------------------------------------
# Building a config from plain dicts, with type checks and every problem collected.


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check `value` against a type annotation; return (ok, coerced value)."""
    origin = get_origin(annotation)
    if annotation is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            ok, coerced = _type_ok(value, arg)
            if ok:
                return True, coerced
        return False, value
    if origin is Literal:
        return value in get_args(annotation), value
    if annotation is type(None):
        return value is None, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item_type,) = get_args(annotation)
        coerced_items = []
        for item in value:
            ok, coerced = _type_ok(item, item_type)
            if not ok:
                return False, value
            coerced_items.append(coerced)
        return True, coerced_items
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as text.
            try:
                value = float(value)
            except ValueError:
                return False, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # NaN and infinity are never a sensible setting here.
            return math.isfinite(value), float(value)
        return False, value
    if annotation is str:
        # YAML reads `name=123` as an int; a string field takes it as text.
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return True, str(value)
        return False, value
    return isinstance(value, annotation), value


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(get_args(annotation)[0])}"
    return getattr(annotation, "__name__", str(annotation))


def _build(cls: type, data: dict[str, Any], prefix: str, issues: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):  # YAML gives `1:` an int key and a lone `?` a None key
            issues.append(f"config key {key!r}{' under ' + prefix.rstrip('.') if prefix else ''} is not a name; "
                          f"known keys: {', '.join(prefix + n for n in names)}")
            continue
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            issues.append(f"unknown config key {dotted}{hint}; known keys: {', '.join(prefix + n for n in names)}")
            continue
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation) and isinstance(value, OverrideValue):
            issues.append(f"{dotted} is a section; set one of its keys, e.g. {dotted}.<key>=...")
            continue
        value = _unwrap(value, annotation)
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                issues.append(f"{dotted} must be a mapping of keys, got {value!r}")
                continue
            kwargs[key] = _build(annotation, value, f"{dotted}.", issues)
            continue
        ok, coerced = _type_ok(value, annotation)
        if not ok:
            issues.append(f"{dotted} must be {_describe(annotation)}, got {value!r}")
            continue
        kwargs[key] = coerced
    instance = cls(**kwargs)
    return instance


def _check_all(obj: Any, issues: list[str]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_all(value, issues)
    check = getattr(obj, "_check", None)
    if check is not None:
        check(issues)


def _largest_int_bits(value: Any) -> int:
    """The bit length of the largest integer anywhere in `value` (keys too), 0 if none. Each
    container is read once: a YAML alias can make a list that holds itself."""
    largest, stack, seen = 0, [value], set()
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if id(item) not in seen:
                seen.add(id(item))
                stack.extend([*item.keys(), *item.values()] if isinstance(item, dict) else item)
        elif isinstance(item, int) and not isinstance(item, bool):
            largest = max(largest, item.bit_length())
    return largest


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig; raise ConfigError listing every problem."""
    # YAML reads hex and binary integers of any size; past 4,300 digits Python cannot even print
    # one (ValueError), and no setting (a seed included: torch takes 64 bits) takes one.
    if (bits := _largest_int_bits(data)) > 64:
        raise ConfigError(f"invalid config: it holds an integer of {bits} bits; no setting takes more than 64")
    issues: list[str] = []
    data = _method_shorthand(data)
    config = _build(RunConfig, data, "", issues)
    if not issues:
        config.method._resolve()
        lr, head_lr = TUNED_LEARNING_RATES[config.method.name]
        config.train.lr = lr if config.train.lr is None else config.train.lr
        config.train.head_lr = head_lr if config.train.head_lr is None else config.train.head_lr
        server_opt = config.federation.server_opt
        if server_opt.lr is None:
            server_opt.lr = TUNED_ADAM_LR[config.method.name] if server_opt.kind == "adam" else 1.0
        _check_all(config, issues)
    if issues:
        raise ConfigError("invalid config: " + "; ".join(issues))
    return config


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


@dataclass(frozen=True)
class OverrideValue:
    """A command-line value: its text and its YAML reading. String fields take the text (so
    `model.prompt_template=Tweet: {text}` stays text); other fields take the YAML reading."""

    raw: str
    parsed: Any


def _raw_text(raw: str) -> str:
    # A typed `\n` (backslash, n) is a newline: shells do not make one inside a key=value word.
    return raw.replace("\\n", "\n")


def _unwrap(value: Any, annotation: Any) -> Any:
    if not isinstance(value, OverrideValue):
        return value
    args = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    optional = type(None) in args
    if optional and value.parsed is None:
        return None
    text = value.raw.strip()
    takes_list = any(get_origin(arg) is list and get_args(arg) == (str,) for arg in args)
    if takes_list and (str not in args or (text.startswith("[") and text.endswith("]"))):
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        # List items stay text: `data.labels=[no, yes]` is two words, not two booleans.
        return [item.strip().strip("'\"") for item in text.split(",") if item.strip()]
    if str in args:
        return _raw_text(value.raw)
    return value.parsed


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parse `key.sub=value` strings; values are read as YAML (numbers, lists, null, text)."""
    result: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. federation.rounds=5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key == "method":
            key = "method.name"  # `method=fibecfed` is shorthand
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except Exception:  # noqa: BLE001
            # Not YAML (or YAML that cannot be built: `2001-02-30` is a date with no such day,
            # thousands of `[` exceed the recursion limit): keep the text; the type check of the
            # key then says what it wants.
            parsed = raw
        _set_dotted(result, key, OverrideValue(raw, parsed))
    return result


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def preset_names() -> list[str]:
    folder = resources.files("fibecfed") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(path_or_preset: str) -> dict[str, Any]:
    """Read a config file, or a preset shipped in the package by name."""
    path = Path(path_or_preset)
    if path.is_file():
        text = path.read_text()
    else:
        resource = resources.files("fibecfed") / "presets" / f"{path_or_preset}.yaml"
        if not resource.is_file():
            raise ConfigError(
                f"config {path_or_preset!r} is neither a file nor a preset; presets: {', '.join(preset_names())}"
            )
        text = resource.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config {path_or_preset} is not valid YAML: {problem}{where}") from None
    except (ValueError, RecursionError) as exc:  # e.g. a date with no such day
        raise ConfigError(f"config {path_or_preset} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path_or_preset} must be a mapping of keys")
    return data


def load_config(config: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The default preset, then `config` (file or preset name), then `key=value` overrides."""
    data = _method_shorthand(read_yaml("default"))
    if config is not None:
        data = merge(data, _method_shorthand(read_yaml(config)))
    data = merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def _method_shorthand(data: dict[str, Any]) -> dict[str, Any]:
    """`method: fibecfed` is short for `method: {name: fibecfed}` (normalised before merging, so a
    later `method.x=...` override adds to it instead of replacing it)."""
    if isinstance(data.get("method"), str):
        return {**data, "method": {"name": data["method"]}}
    return data
