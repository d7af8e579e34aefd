"""The federated server, without a transport: sampling, layer choice, aggregation, accounting.

A runtime drives it round by round and moves the messages itself:

    request = server.probe_request(r)           # devices that probe the global model first, or None
    plan = server.plan_round(r, probes)         # who trains, with which keys and switches
    ... each device in plan.devices runs `device_round` and sends a DeviceUpdate ...
    result = server.finish_round(plan, updates, failed)   # validate, aggregate, choose, count
    ... restore the devices in result.dropped (rejected updates); evaluate if result.evaluate ...
    row = server.record_round(result, evaluation, wall_seconds)

The in-process simulator calls `device_round` directly; a Flower ServerApp would send the plan
through its Grid. Nothing here touches device data or device state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fibecfed.accounting import serialized_nbytes, simulated_round_seconds
from fibecfed.adapters import AdapterState, layer_of_key
from fibecfed.aggregation import UPDATE_PROBLEMS, ServerOptimizer, server_step, weighted_average
from fibecfed.config import LayerSelectionConfig, RunConfig
from fibecfed.errors import FibecfedError
from fibecfed.federated import DeviceUpdate, ProbeSettings, SparseSettings, valid_updates
from fibecfed.layers import aggregation_keys, combine_layer_scores, select_aggregation_layers

logger = logging.getLogger(__name__)

# Layer-selection policies that rank the layers by the devices' sensitivity probes.
PROBED_POLICIES = ("sensitivity", "reverse")

# The evaluation fields of a round the runtime did not evaluate.
NOT_EVALUATED: dict[str, Any] = {"accuracy": None, "personalized_accuracy": None}

# Why a sampled device contributed nothing to a round (a metrics row's "rejected" counts): it
# did not answer by the deadline ("timeout"), its round raised ("error"), or the server rejected
# its update (aggregation.UPDATE_PROBLEMS).
REJECTION_REASONS = ("timeout", "error", *UPDATE_PROBLEMS)


@dataclass(frozen=True)
class ServerSettings:
    """The values the server needs (a slice of the run config, plus two facts of the model and partition)."""

    seed: int
    rounds: int
    num_devices: int
    devices_per_round: int
    eval_every: int
    bandwidth_mbps: float
    num_layers: int  # transformer layers of the model: the length of a layer-score vector
    layers: LayerSelectionConfig | None  # None: no layer selection, every key is aggregated
    sparse: SparseSettings | None  # what devices use outside warm-up rounds
    # How long the server waits for a round's replies: a round in which a device timed out lasts
    # at least this long in simulated time.
    device_timeout_s: float = 3600.0
    # What the server does with the average of the uploads (FedAvg's jump by default).
    server_opt: ServerOptimizer = ServerOptimizer()


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


def probe_settings(layers: LayerSelectionConfig) -> ProbeSettings:
    return ProbeSettings(probe_samples=layers.probe_samples, noise_scale=layers.noise_scale, measure=layers.measure)


def server_settings(config: RunConfig, num_devices: int, num_layers: int) -> ServerSettings:
    f = config.federation
    return ServerSettings(
        seed=config.seed,
        rounds=f.rounds,
        num_devices=num_devices,
        devices_per_round=f.devices_per_round,
        eval_every=f.eval_every,
        bandwidth_mbps=f.bandwidth_mbps,
        num_layers=num_layers,
        layers=config.method.layers if config.method.layers.enabled else None,
        sparse=sparse_settings(config),
        device_timeout_s=f.device_timeout_s,
        server_opt=ServerOptimizer(
            kind=f.server_opt.kind, lr=f.server_opt.lr, beta1=f.server_opt.beta1, beta2=f.server_opt.beta2, tau=f.server_opt.tau
        ),
    )


def sample_devices(seed: int, round_num: int, num_devices: int, per_round: int) -> list[int]:
    """The devices that train in `round_num`: a seeded draw without replacement, sorted."""
    rng = np.random.default_rng([seed, round_num, 0, 0])
    return sorted(rng.choice(num_devices, per_round, replace=False).tolist())


# The layer selection's state, a plain dict (it goes into checkpoints as is): `layers` (the
# global aggregation layers, None before the first choice), `layers_round` (the round from which
# they hold), `layer_scores` (the combined scores they were chosen from) and, after a choice,
# `joined` (layers that were not aggregated before it).
def initial_selection() -> dict[str, Any]:
    return {"layers": None, "layers_round": None, "layer_scores": None}


def warming_up(layers: LayerSelectionConfig | None, selection: Mapping[str, Any]) -> bool:
    """Whether this round comes before the first probe-based choice (method.layers.select_after)."""
    return bool(layers) and layers.select_after > 0 and selection["layers"] is None and layers.policy in PROBED_POLICIES


def probe_due(layers: LayerSelectionConfig | None, selection: Mapping[str, Any], round_num: int) -> bool:
    """Whether the sampled devices probe their trained models at the end of this round."""
    if not layers or layers.policy not in PROBED_POLICIES or layers.select_after == 0:
        return False
    if selection["layers"] is None:
        return round_num >= layers.select_after
    # The layers chosen hold from layers_round on; refresh after refresh_every rounds of them.
    return layers.refresh_every > 0 and round_num - selection["layers_round"] + 1 >= layers.refresh_every


def layers_due(layers: LayerSelectionConfig | None, selection: Mapping[str, Any], round_num: int) -> bool:
    """Whether the server chooses the layers before this round: policies without scores, or a
    probe of the global model (method.layers.select_after=0)."""
    if not layers or (layers.policy in PROBED_POLICIES and layers.select_after > 0):
        return False
    if selection["layers"] is None:
        return True
    return layers.refresh_every > 0 and round_num - selection["layers_round"] >= layers.refresh_every


def joined_layers(selection: Mapping[str, Any], chosen: Sequence[int]) -> list[int]:
    """The layers of a new choice that start from the devices' own values: those not aggregated
    before, and those that joined at the last choice and no round has aggregated since."""
    previous = set(selection["layers"] or [])
    pending = set(selection.get("joined") or []) if selection.get("joined_unaggregated", False) else set()
    return sorted((set(chosen) - previous) | (pending & set(chosen)))


def choose_before_round(
    layers: LayerSelectionConfig, selection: Mapping[str, Any], scores: torch.Tensor, round_num: int, seed: int
) -> dict[str, Any]:
    """The selection after a choice made before `round_num` from combined scores (L,); it holds
    from this round on (method.md Part 2: top share of the layers)."""
    rng = np.random.default_rng([seed, round_num, 0, 5])
    previous = selection["layers"] or []
    chosen = select_aggregation_layers(scores, layers.share, layers.policy, rng=rng)
    updated = {**selection, "layers": chosen}
    # The first choice has nothing joining: every device still has the initial values.
    updated["joined"] = joined_layers(selection, chosen) if previous else []
    updated["layers_round"] = round_num
    updated["layer_scores"] = [round(float(x), 6) for x in scores]
    logger.info("round %d: aggregation layers %s (scores %s)", round_num, chosen, updated["layer_scores"])
    return updated


def choose_after_probes(
    layers: LayerSelectionConfig, selection: Mapping[str, Any], updates: Sequence[DeviceUpdate], round_num: int
) -> dict[str, Any]:
    """The selection for the rounds after `round_num`, from the devices' trained-model
    sensitivities averaged by data size; unchanged when no device sent scores."""
    probed = [u for u in updates if u.layer_scores is not None]
    if not probed:
        logger.warning("round %d: no device returned layer scores; the aggregation layers stay as they are", round_num)
        return dict(selection)
    combined = combine_layer_scores([u.layer_scores for u in probed], [u.num_samples for u in probed])
    chosen = select_aggregation_layers(combined, layers.share, layers.policy)
    updated = {**selection, "layers": chosen}
    updated["joined"] = joined_layers(selection, chosen)
    updated["layers_round"] = round_num + 1
    updated["layer_scores"] = [round(float(x), 6) for x in combined]
    logger.info("after round %d: aggregation layers %s (scores %s)", round_num, chosen, updated["layer_scores"])
    return updated


def rejection_counts(reasons: Mapping[int, str]) -> dict[str, int]:
    """Devices per reason (every reason of REJECTION_REASONS, zeros included: a stable schema)."""
    unknown = set(reasons.values()) - set(REJECTION_REASONS)
    if unknown:
        raise ValueError(f"unknown rejection reasons {sorted(unknown)}; reasons: {REJECTION_REASONS}")
    return {reason: sum(r == reason for r in reasons.values()) for reason in REJECTION_REASONS}


def rejection_totals(history: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The "rejected" counts of every round of a metrics history, summed by reason."""
    totals = rejection_counts({})
    for row in history:
        for reason, count in (row.get("rejected") or {}).items():
            totals[reason] = totals.get(reason, 0) + count
    return totals


def weighted_mean(values: Sequence[tuple[float, int]]) -> float | None:
    total = sum(w for _, w in values)
    return sum(v * w for v, w in values) / total if total else None


@dataclass(frozen=True)
class LayerProbe:
    """A device's answer to a probe request: the sensitivity (L,) of the global model's layers."""

    scores: torch.Tensor
    seconds: float  # compute time of the probe, added to the device's round
    num_samples: int  # the device's training-set size: the weight of its scores


def probe_problem(probe: LayerProbe, num_layers: int) -> str | None:
    """Why the server cannot use a device's probe answer, or None: finite, non-negative (L,)
    float scores (a sensitivity is a ratio of norms), a positive weight, finite seconds. A node
    on another runtime may send anything; one bad answer must not end the run."""
    scores = probe.scores
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        return "layer scores are not a floating-point tensor"
    if scores.shape != (num_layers,):
        return f"layer scores have shape {tuple(scores.shape)}, expected ({num_layers},)"
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        return f"layer scores must be finite and >= 0, got {scores.tolist()}"
    if not isinstance(probe.num_samples, int) or probe.num_samples < 1:
        return f"its weight (num_samples) must be a positive integer, got {probe.num_samples!r}"
    if not math.isfinite(probe.seconds) or probe.seconds < 0:
        return f"its probe time must be finite and >= 0, got {probe.seconds!r}"
    return None


@dataclass(frozen=True)
class ProbeRequest:
    """Before `round_num`'s plan: these devices measure the layer sensitivity of the global model."""

    round_num: int
    devices: list[int]
    settings: ProbeSettings


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks of the devices in one round."""

    round_num: int
    devices: list[int]  # sampled, sorted
    exchanged_keys: list[str]  # downloaded, trained from the global values, uploaded, aggregated
    warmup: bool  # before the first probe-based layer choice: only the keys outside the layers travel
    probe: ProbeSettings | None  # devices probe their trained models at the end of the round
    own_start_keys: list[str]  # exchanged keys of layers that just joined: devices start them from their own values
    sparse: SparseSettings | None  # the sparse update of the non-aggregated layers (None in warm-up)
    aggregated_layers: list[int] | None  # the layers aggregated this round (None: all, or warm-up)
    state: AdapterState  # what the server sends: the global values of the exchanged keys
    download_bytes: int  # per device, serialized `state`
    full_bytes: int  # the whole global adapter, serialized (what FedAvg would send)
    # Cost of the pre-round probe (ProbeRequest) per sampled device: seconds and upload bytes.
    probe_seconds: dict[int, float] = field(default_factory=dict)
    probe_upload: dict[int, int] = field(default_factory=dict)
    # Per sampled device, what it downloads beyond `state`: the global adapter for a probe before
    # the round, and the stale global values of non-exchanged keys it lacks (`Server.stale_values`).
    extra_download: dict[int, int] = field(default_factory=dict)
    # Whether the server chose the layers before this round (from probes of the global model, or
    # a policy without scores): the round's metrics row reports the scores of that choice.
    chosen_before: bool = False


@dataclass(frozen=True)
class MeasuredTransfer:
    """Bytes a runtime measured on its wire in one round, replacing the server's estimates
    (serialized safetensors sizes): per device, all it downloaded (probe and training messages)
    and all it uploaded; `fedavg_bytes`: what the devices that sent an update would have moved
    both ways in the same runtime had their messages carried the whole adapter (FedAvg)."""

    download: Mapping[int, int]
    upload: Mapping[int, int]
    fedavg_bytes: int


@dataclass(frozen=True)
class RoundResult:
    """A finished round, before its evaluation (which the runtime does)."""

    plan: RoundPlan
    dropped: list[int]  # devices whose update the server rejected: the runtime restores their state
    evaluate: bool  # whether the runtime evaluates the new global model this round
    fields: dict[str, Any]  # the metrics row after the evaluation's fields (wall_time_s filled in later)


class Server:
    """The global adapter, the layer selection, the running totals and the metrics history."""

    def __init__(
        self,
        settings: ServerSettings,
        global_state: AdapterState,
        *,
        round_num: int = 0,
        selection: dict[str, Any] | None = None,
        totals: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
        moments: dict[str, torch.Tensor] | None = None,
        initial_state: AdapterState | None = None,
        held: Mapping[int, Iterable[str]] | None = None,
    ):
        self.settings = settings
        self.global_state = dict(global_state)
        # The run's initial global state, which every device rebuilds itself (the same model and
        # seeded initialisation): a global value still equal to it costs no download. Default:
        # `global_state`, a new run's.
        self.initial_state = dict(global_state if initial_state is None else initial_state)
        # Device -> the non-exchanged keys it holds values of (after its last kept update).
        self.held = {int(d): set(keys) for d, keys in (held or {}).items()}
        self.round = round_num  # the last completed round (0: none yet)
        self.selection = initial_selection() if selection is None else selection
        self.totals = totals if totals is not None else {
            "wall_time_s": 0.0, "sim_time_s": 0.0, "compute_time_s": 0.0,
            "upload_bytes": 0, "download_bytes": 0, "bytes_saved": 0,
        }
        self.history = [] if history is None else history
        # The server optimiser's state ("m/<key>"; for adam also "v/<key>", "t/<key>"); empty for "avg".
        self.moments = {} if moments is None else dict(moments)

    @classmethod
    def from_checkpoint(
        cls, settings: ServerSettings, payload: Mapping[str, Any], initial_state: AdapterState | None = None
    ) -> Server:
        """The server as `to_checkpoint` saved it (a run resumes after `payload["round"]`);
        `initial_state`: the run's initial global state (None: the saved global state stands in,
        so the values of that moment count as ones a device can rebuild)."""
        return cls(
            settings,
            payload["global_state"],
            round_num=payload["round"],
            selection=payload["server"],
            # Checkpoints written before compute_time_s was counted lack it.
            totals={"compute_time_s": 0.0, **payload["totals"]},
            history=payload["history"],
            # Checkpoints written before the server optimiser existed have no moments.
            moments=payload.get("server_moments", {}),
            initial_state=payload["global_state"] if initial_state is None else initial_state,
            # In-process checkpoints written before the server tracked it: devices hold nothing
            # yet as far as the download count goes (an overcount, never an undercount).
            held=payload.get("held", {}),
        )

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "global_state": self.global_state,
            "history": self.history,
            "totals": self.totals,
            "server": self.selection,
            "server_moments": self.moments,
            "held": {device: sorted(keys) for device, keys in self.held.items()},
        }

    @property
    def keys(self) -> list[str]:
        return list(self.global_state)

    def stale_values(self, device: int, exchanged: Iterable[str]) -> dict[str, torch.Tensor]:
        """Global values of non-exchanged keys `device` lacks and cannot rebuild (not initial).

        A device trains the keys it does not exchange from its own values, and from their global
        values where it has none (its first round, or a layer that has just stopped being
        aggregated): those must reach it, unless they are still the initial values it rebuilds.
        """
        skip = set(exchanged) | self.held.get(device, set())
        return {k: v for k, v in self.global_state.items()
                if k not in skip and not torch.equal(v, self.initial_state[k])}

    def record_start(self, evaluation: Mapping[str, Any]) -> dict[str, Any]:
        """Round 0: the starting point (the curve's first point, and the majority-rate check)."""
        row = {
            "round": 0,
            "devices": [],
            **evaluation,
            "sampled_personalized_accuracy": None,
            "loss": None,
            "failed_devices": [],
            "rejected": rejection_counts({}),
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
            "probe_seconds": 0.0,
        }
        self.history.append(row)
        return row

    def _sample(self, round_num: int) -> list[int]:
        s = self.settings
        return sample_devices(s.seed, round_num, s.num_devices, s.devices_per_round)

    def probe_request(self, round_num: int) -> ProbeRequest | None:
        """The devices whose probes of the global model `plan_round` needs, or None."""
        layers = self.settings.layers
        if not layers_due(layers, self.selection, round_num) or layers.policy not in PROBED_POLICIES:
            return None
        return ProbeRequest(round_num, self._sample(round_num), probe_settings(layers))

    def plan_round(self, round_num: int, probes: Mapping[int, LayerProbe] | None = None) -> RoundPlan:
        """Sample the devices and say what they do; choose the layers first when due (with the
        answers to `probe_request(round_num)` in `probes`, by device)."""
        s = self.settings
        sampled = self._sample(round_num)
        probe_seconds = {d: 0.0 for d in sampled}
        probe_upload = {d: 0 for d in sampled}
        chosen_before = layers_due(s.layers, self.selection, round_num)
        # Every sampled device got the probe request, with the global adapter.
        asked = chosen_before and s.layers.policy in PROBED_POLICIES
        if chosen_before:
            if s.layers.policy in PROBED_POLICIES:
                answered = []
                for device in [d for d in sampled if probes is not None and d in probes]:
                    problem = probe_problem(probes[device], s.num_layers)
                    if problem is None:
                        answered.append(device)
                    else:
                        logger.warning("round %d: device %d's layer probe is left out: %s", round_num, device, problem)
                for device in answered:
                    probe_seconds[device] += probes[device].seconds
                    probe_upload[device] += serialized_nbytes({"layer_scores": probes[device].scores})
                if answered:
                    # Weighted by data size (method.md Part 2).
                    combined = combine_layer_scores([probes[d].scores for d in answered], [probes[d].num_samples for d in answered])
                elif self.selection["layers"] is not None:
                    # A refresh nobody could measure: the layers stay, and the next round asks again.
                    logger.warning("round %d: no sampled device sent a usable layer probe; the aggregation layers "
                                   "stay %s", round_num, self.selection["layers"])
                    combined, chosen_before = None, False
                else:
                    raise FibecfedError(
                        f"round {round_num}: the first choice of aggregation layers needs the sampled devices' layer "
                        f"probes, and none of the {len(sampled)} sent a usable one (see the warnings above)"
                    )
            else:
                combined = torch.zeros(s.num_layers)
            if combined is not None:
                self.selection = choose_before_round(s.layers, self.selection, combined, round_num, s.seed)
        warmup = warming_up(s.layers, self.selection)
        chosen = self.selection["layers"]
        if warmup:
            # Before the first choice only the keys outside the layers travel (method.layers.select_after).
            exchanged = aggregation_keys(self.keys, [])
        else:
            exchanged = self.keys if chosen is None else aggregation_keys(self.keys, chosen)
        # Layers that join the aggregated ones this round start from the devices' own values; so
        # do they in the rounds after, until a round aggregated them (no valid update came back).
        pending = self.selection.get("layers_round") == round_num or self.selection.get("joined_unaggregated", False)
        joined = set(self.selection.get("joined") or []) if pending else set()
        state = {k: self.global_state[k] for k in exchanged}
        full_bytes = serialized_nbytes(self.global_state)
        extra_download = {d: serialized_nbytes(self.stale_values(d, exchanged)) for d in sampled}
        if asked:
            for device in sampled:
                extra_download[device] += full_bytes
        return RoundPlan(
            round_num=round_num,
            devices=sampled,
            exchanged_keys=exchanged,
            warmup=warmup,
            probe=probe_settings(s.layers) if probe_due(s.layers, self.selection, round_num) else None,
            own_start_keys=[k for k in exchanged if layer_of_key(k) in joined],
            # Warm-up rounds train every layer densely: no aggregation layers yet.
            sparse=None if warmup else s.sparse,
            aggregated_layers=None if warmup else chosen,
            state=state,
            download_bytes=serialized_nbytes(state),
            full_bytes=full_bytes,
            probe_seconds=probe_seconds,
            probe_upload=probe_upload,
            extra_download=extra_download,
            chosen_before=chosen_before,
        )

    def finish_round(
        self, plan: RoundPlan, updates: Sequence[DeviceUpdate], failed: Sequence[int] | Mapping[int, str],
        measured: MeasuredTransfer | None = None,
    ) -> RoundResult:
        """Aggregate the valid updates into the global state, choose the layers from the
        devices' probes when the plan asked for them, and count the round's costs.

        `updates`: what the devices that finished sent, in plan.devices order; each is checked
        against the plan (exactly its exchanged keys, the global shapes and dtypes, finite
        values) and left out with a reason otherwise. `failed`: the devices that did not finish
        (they downloaded, but sent nothing), by reason ("timeout" or "error"; a plain sequence:
        "error"). `measured`: the bytes a transport counted on its wire (None: the serialized
        sizes of the tensors).
        """
        s = self.settings
        failures = dict(failed) if isinstance(failed, Mapping) else {d: "error" for d in failed}
        unplanned = sorted({u.device for u in updates} - set(plan.devices))
        if unplanned:
            raise ValueError(f"round {plan.round_num}: updates from devices {unplanned} that the plan did not sample")
        good, rejected = valid_updates(updates, plan.state, s.num_layers if plan.probe is not None else None)
        dropped = sorted(rejected)
        if good:
            average = weighted_average([u.state for u in good], [u.num_samples for u in good])
            self.global_state, self.moments = server_step(
                self.global_state, average, self.moments, s.server_opt, fresh=plan.own_start_keys
            )
        if plan.own_start_keys:
            # Joined layers nobody aggregated yet keep starting from the devices' own values
            # (before a choice after this round, which carries them over: `joined_layers`).
            self.selection = {**self.selection, "joined_unaggregated": not good}
        if plan.probe is not None:
            self.selection = choose_after_probes(s.layers, self.selection, good, plan.round_num)
        personal_keys = set(self.keys) - set(plan.exchanged_keys)
        for u in good:  # a device whose update was rejected keeps the state it had before
            self.held[u.device] = personal_keys

        # Per device: [compute s, download bytes, upload bytes, initialisation-phase s]. The
        # initialisation phase ran in the background from the start: it delays the device's
        # first round only by the part that did not fit in the time before it.
        costs = []
        for u in updates:
            if measured is not None:
                download, upload = measured.download[u.device], measured.upload[u.device]
            else:
                download = plan.download_bytes + plan.extra_download.get(u.device, 0)
                upload = plan.probe_upload.get(u.device, 0) + serialized_nbytes(u.state)
                if u.layer_scores is not None:
                    upload += serialized_nbytes({"layer_scores": u.layer_scores})
            seconds = u.compute_seconds + plan.probe_seconds.get(u.device, 0.0)
            costs.append([seconds, download, upload, u.background_seconds])
        totals = self.totals
        sim_round = simulated_round_seconds(
            [c + max(0.0, bg - totals["sim_time_s"]) for c, _, _, bg in costs],
            [d for _, d, _, _ in costs],
            [u for _, _, u, _ in costs],
            s.bandwidth_mbps,
        )
        if "timeout" in failures.values():
            # The server waited for the device until the deadline.
            sim_round = max(sim_round, s.device_timeout_s)
        compute_round = max((c + max(0.0, bg - totals["compute_time_s"]) for c, _, _, bg in costs), default=0.0)
        upload_sizes = [u for _, _, u, _ in costs]
        failed_downloads = [measured.download[d] if measured is not None else plan.download_bytes + plan.extra_download.get(d, 0)
                            for d in failures]
        download_sizes = [d for _, d, _, _ in costs] + failed_downloads
        totals["upload_bytes"] += sum(upload_sizes)
        totals["download_bytes"] += sum(download_sizes)
        totals["sim_time_s"] += sim_round
        totals["compute_time_s"] += compute_round
        # What FedAvg would have sent for the same devices: the full adapter both ways.
        fedavg_bytes = measured.fedavg_bytes if measured is not None else 2 * plan.full_bytes * len(updates)
        totals["bytes_saved"] += fedavg_bytes - sum(upload_sizes) - sum(d for _, d, _, _ in costs)

        personal = [(u.personalized, u.personalized_count) for u in good if u.personalized]
        fields: dict[str, Any] = {
            "sampled_personalized_accuracy": weighted_mean([(p["accuracy"], n) for p, n in personal]),
            "loss": weighted_mean([(u.loss, u.num_samples) for u in good]),
            "failed_devices": sorted([*failures, *dropped]),
            "rejected": rejection_counts({**failures, **rejected}),
            "curriculum_fraction": weighted_mean([(u.curriculum_fraction, u.num_samples) for u in updates]),
            "aggregated_layers": plan.aggregated_layers,
        }
        if plan.probe is not None or plan.chosen_before:
            # The scores of the choice made after this round (probe) or before it.
            fields["layer_scores"] = self.selection["layer_scores"]
        fields.update({
            "trained_personal": sum(u.trained_personal for u in updates),
            "bytes_saved_vs_fedavg": totals["bytes_saved"],
            "scoring_seconds": round(sum(u.scoring_seconds for u in updates), 3),
            # The layer-sensitivity probes (after training, and before the round when asked),
            # summed over the devices; part of their compute, like scoring_seconds.
            "probe_seconds": round(sum(u.probe_seconds for u in updates) + sum(plan.probe_seconds.get(u.device, 0.0) for u in updates), 3),
            "device_costs": [[round(c, 4), d, u, round(bg, 4)] for c, d, u, bg in costs],
            "wall_time_s": None,
            "sim_time_s": round(totals["sim_time_s"], 3),
            "compute_time_s": round(totals["compute_time_s"], 3),
            "upload_bytes": totals["upload_bytes"],
            "download_bytes": totals["download_bytes"],
            "round_upload_bytes": sum(upload_sizes),
        })
        evaluate = plan.round_num % s.eval_every == 0 or plan.round_num == s.rounds
        return RoundResult(plan, dropped, evaluate, fields)

    def record_round(self, result: RoundResult, evaluation: Mapping[str, Any] | None, wall_seconds: float) -> dict[str, Any]:
        """The round's metrics row, appended to the history: the runtime's `evaluation` of the
        new global model (None when it did not evaluate) and the round's wall-clock seconds."""
        self.totals["wall_time_s"] += wall_seconds
        row: dict[str, Any] = {
            "round": result.plan.round_num,
            "devices": result.plan.devices,
            **(evaluation if evaluation is not None else NOT_EVALUATED),
            **result.fields,
        }
        row["wall_time_s"] = round(self.totals["wall_time_s"], 3)
        self.history.append(row)
        self.round = result.plan.round_num
        return row


__all__ = [
    "LayerProbe",
    "MeasuredTransfer",
    "NOT_EVALUATED",
    "REJECTION_REASONS",
    "ProbeRequest",
    "RoundPlan",
    "RoundResult",
    "Server",
    "ServerSettings",
    "choose_after_probes",
    "choose_before_round",
    "layers_due",
    "probe_due",
    "probe_settings",
    "rejection_counts",
    "rejection_totals",
    "sample_devices",
    "server_settings",
    "sparse_settings",
    "warming_up",
]
