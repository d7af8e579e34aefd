"""Global aggregation layers (GAL): layer sensitivity scores and the choice of layers to exchange.

method.md, Part 2: each transformer layer gets a sensitivity score, "how much its output changes
between an input and a slightly perturbed copy (noise added to the input embeddings)"; the top-N
layers are the GAL. Only GAL LoRA parameters (plus any head) travel between server and devices;
the other layers' adapters stay on the device. Everything here is a pure function of a model, a
batch, tensors and keys: no I/O, no global RNG state.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from fibecfed.adapters import layer_of_key

SensitivityMeasure = Literal["gain", "relative_gain", "output_change"]
# A policy picks `n` layer indices from per-layer scores (L,); `rng` only for random policies.
SelectionPolicy = Callable[[torch.Tensor, int, "np.random.Generator | None"], list[int]]

SELECTION_POLICIES: dict[str, SelectionPolicy] = {}
_PROBE_INDEX = 987654


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (bert `encoder.layer`, llama `model.layers`, gpt2 `h`).

    Found generically, also inside a peft wrapper: among the ModuleLists whose children are blocks
    of one class (modules with submodules, not a list of plain linears), prefer those whose path
    the adapter key mapping (`adapters.layer_of_key`) reads as numbered layers, so that index l
    here is layer l of the adapter keys; then the longest list; then the first one found.
    """
    candidates = []
    for order, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1 or not any(True for _ in children[0].children()):
            continue
        # An index no inner list could produce: the key pattern must read this list's own index.
        matches_keys = layer_of_key(f".{name}.{_PROBE_INDEX}.weight") == _PROBE_INDEX
        candidates.append((matches_keys, len(children), -order, module))
    if not candidates:
        raise ValueError(f"found no list of transformer blocks in {type(model).__name__}")
    return max(candidates, key=lambda c: c[:3])[3]


def _body(model: nn.Module) -> nn.Module:
    """The transformer without its task head (BertModel, LlamaModel), LoRA layers included.

    Only the blocks' hidden states are needed, so the classifier / LM head (a 49k-word vocabulary
    projection for SmolLM2) is skipped.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "base_model", inner)


def _layer_hidden_states(
    model: nn.Module, blocks: nn.ModuleList, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """[input of block 0, output of block 0, ..., output of block L-1], each (B, T, H).

    `token_type_ids` (B, T): the segments of a sentence pair, for models that embed them (BERT);
    without them BERT takes every token for the first segment, an input it never trains on.

    Read with forward hooks on the blocks rather than `output_hidden_states=True`: in
    transformers 5.24 (`utils/output_capturing.py`, `capture_outputs`) hidden_states[0] is the input
    of layer 0 and hidden_states[l+1] the output of layer l, except that the last entry is replaced
    by `last_hidden_state`. For BERT (no final norm) that is the same tensor; for Llama it is
    `model.norm(output of the last layer)`, the final RMSNorm, which would make the last layer look
    different from the others (its scale is fixed by the norm). The hooks give every layer's own
    output on any architecture.
    """
    captured: list[torch.Tensor] = []

    def record_input(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    def record_output(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [blocks[0].register_forward_pre_hook(record_input, with_kwargs=True)]
    handles += [block.register_forward_hook(record_output) for block in blocks]
    try:
        body = _body(model)
        extra = {}
        if token_type_ids is not None and "token_type_ids" in inspect.signature(body.forward).parameters:
            # Only a model that embeds segments takes them (heads.py leaves them out for a decoder).
            extra["token_type_ids"] = token_type_ids.to(inputs_embeds.device)
        body(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **extra)
    finally:
        for handle in handles:
            handle.remove()
    assert len(captured) == len(blocks) + 1, f"captured {len(captured)} hidden states for {len(blocks)} blocks"
    return captured


def _mean_token_norm(states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norm (B, T, H) -> (B, T), averaged over each sample's real tokens, then over samples."""
    norms = torch.linalg.vector_norm(states.float(), dim=-1)  # (B, T)
    norms = torch.where(token_mask, norms, torch.zeros_like(norms))  # padding may hold anything, even NaN
    per_sample = norms.sum(dim=1) / token_mask.sum(dim=1).clamp(min=1)  # (B,)
    return per_sample[token_mask.any(dim=1)].mean()


def hidden_state_sizes(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """S_0 .. S_L, shape (L+1,), on the CPU: the mean token norm of the first block's input and of
    each block's output (real tokens only, each sample weighing the same), as `layer_sensitivity`
    measures them; eval mode, no grad, every module's mode restored."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            embeddings = model.get_input_embeddings()
            embeds = embeddings(batch["input_ids"].to(embeddings.weight.device))
            attention_mask = batch["attention_mask"].to(embeds.device)
            states = _layer_hidden_states(model, transformer_layers(model), embeds, attention_mask, batch.get("token_type_ids"))
            sizes = torch.stack([_mean_token_norm(h, attention_mask.bool()) for h in states])
    finally:
        for module, training in modes.items():
            module.training = training
    return sizes.cpu()


def layer_sensitivity(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    noise_scale: float = 0.01,
    generator: torch.Generator | None = None,
    measure: SensitivityMeasure = "gain",
) -> torch.Tensor:
    """Sensitivity score of each transformer layer, shape (L,), on the CPU; larger = more sensitive.

    The model runs twice (eval mode, no grad; every module's train/eval mode is restored) on the
    input embeddings E = model.get_input_embeddings()(input_ids), shape (B, T, H), or on
    batch["inputs_embeds"], and on a perturbed copy E + noise_scale · std(E) · N(0, 1), where
    std(E) is the scalar standard deviation of E's entries over real tokens and the noise comes
    from `generator` (the global RNG if None). h_0 is the input of the first block (for BERT the
    word embeddings after position/type embeddings and LayerNorm), h_{l+1} the output of layer l.
    Δ_j is the L2 norm of the per-token change of h_j, over real tokens only (attention_mask),
    averaged over each sample's tokens and then over samples (each sample weighs the same).

    measure="gain" (default): Δ_{l+1} / Δ_l, how much layer l amplifies a perturbation of its own
    input. Isolates each layer from the layers before it: in a residual network the change of the
    output of layer l also carries every earlier layer's change.
    measure="relative_gain": (Δ_{l+1} / S_{l+1}) / (Δ_l / S_l) with S_j the mean token norm of h_j
    (a ratio of token averages, like Δ): how much layer l amplifies a *relative* perturbation of
    its input, its relative condition number: gain · S_l / S_{l+1}. Unlike "gain" it does not
    reward a layer for growing the residual stream (and it rewards one that shrinks it): in SmolLM2 layer 0 lifts the tiny embeddings
    (mean norm 2.8) to norm 47 and so scores a gain of 12, and a "massive activation" layer (11,
    norm 144 -> 892) scores 1.2; their relative gains are 0.70 and 0.20
    (`bench/layer_probe.py --config bench-decoder`). Not the default: it lost on the tuning set
    (docs/defaults.md).
    measure="output_change": Δ_{l+1} / mean ‖h_{l+1}‖, the relative change of the layer's output
    (a ratio of the two token averages), the literal reading of method.md. It is cumulative: a
    layer after a sensitive one inherits its change, so the scores tend to grow with depth.
    """
    if measure not in ("gain", "relative_gain", "output_change"):
        raise ValueError(f"unknown sensitivity measure {measure!r}; choose 'gain', 'relative_gain' or 'output_change'")
    if noise_scale <= 0:
        raise ValueError(f"noise_scale must be positive, got {noise_scale}")
    blocks = transformer_layers(model)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if "inputs_embeds" in batch:
                embeds = batch["inputs_embeds"]
            else:
                input_ids = batch["input_ids"]
                embeds = model.get_input_embeddings()(input_ids.to(model.get_input_embeddings().weight.device))
            attention_mask = batch.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            attention_mask = attention_mask.to(embeds.device)
            token_mask = attention_mask.bool()  # (B, T)

            # Noise is drawn on the generator's device, so a CPU generator gives the same noise
            # whatever device the model is on.
            noise_device = generator.device if generator is not None else embeds.device
            noise = torch.randn(embeds.shape, generator=generator, device=noise_device, dtype=torch.float32)
            scale = noise_scale * embeds[token_mask].float().std()
            perturbed = embeds + (scale * noise.to(embeds.device)).to(embeds.dtype)

            types = batch.get("token_type_ids")
            clean = _layer_hidden_states(model, blocks, embeds, attention_mask, types)
            noisy = _layer_hidden_states(model, blocks, perturbed, attention_mask, types)
            change = torch.stack(
                [_mean_token_norm(n - c, token_mask) for c, n in zip(clean, noisy)]
            )  # (L+1,): Δ_0 .. Δ_L
            tiny = torch.finfo(change.dtype).tiny
            if measure == "gain":
                scores = change[1:] / change[:-1].clamp(min=tiny)
            else:
                size = torch.stack([_mean_token_norm(h, token_mask) for h in clean])  # (L+1,): S_0 .. S_L
                relative = change / size.clamp(min=tiny)  # (L+1,): Δ_j / S_j
                if measure == "relative_gain":
                    scores = relative[1:] / relative[:-1].clamp(min=tiny)
                else:
                    scores = relative[1:]
    finally:
        for module, training in modes.items():
            module.training = training
    return scores.cpu()


def combine_layer_scores(scores: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Server side: the devices' layer scores (each (L,)) averaged with weights (data sizes), (L,)."""
    if len(scores) == 0:
        raise ValueError("no layer scores to combine")
    if len(scores) != len(weights):
        raise ValueError(f"{len(scores)} score vectors but {len(weights)} weights")
    shapes = {tuple(s.shape) for s in scores}
    if len(shapes) != 1:
        raise ValueError(f"devices sent layer scores of different shapes: {sorted(shapes)}")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    stacked = torch.stack([s.detach().cpu().to(torch.float64) for s in scores])  # (K, L)
    return ((w[:, None] * stacked).sum(dim=0) / w.sum()).to(torch.float32)


def register_policy(name: str) -> Callable[[SelectionPolicy], SelectionPolicy]:
    """Decorator adding a layer-selection policy `(scores, n, rng) -> layer indices` under `name`."""

    def register(policy: SelectionPolicy) -> SelectionPolicy:
        if name in SELECTION_POLICIES:
            raise ValueError(f"layer-selection policy {name!r} is already registered")
        SELECTION_POLICIES[name] = policy
        return policy

    return register


def _ranked(scores: torch.Tensor, descending: bool) -> list[int]:
    # Ties go to the lower layer index (a sort key, not torch.sort, so it is exact and stable).
    values = scores.tolist()
    sign = -1.0 if descending else 1.0
    return sorted(range(len(values)), key=lambda i: (sign * values[i], i))


@register_policy("sensitivity")
def _most_sensitive(scores: torch.Tensor, n: int, rng: np.random.Generator | None = None) -> list[int]:
    """The n most sensitive layers (method.md's default GAL)."""
    return _ranked(scores, descending=True)[:n]


@register_policy("reverse")
def _least_sensitive(scores: torch.Tensor, n: int, rng: np.random.Generator | None = None) -> list[int]:
    """The n least sensitive layers (ablation: the opposite order)."""
    return _ranked(scores, descending=False)[:n]


@register_policy("random")
def _random_layers(scores: torch.Tensor, n: int, rng: np.random.Generator | None = None) -> list[int]:
    """n distinct layers drawn uniformly (ablation: random GAL)."""
    if rng is None:
        raise ValueError("the 'random' layer-selection policy needs an np.random.Generator (rng=...)")
    return [int(i) for i in rng.choice(len(scores), size=n, replace=False)]


@register_policy("all")
def _all_layers(scores: torch.Tensor, n: int, rng: np.random.Generator | None = None) -> list[int]:
    """Every layer (ablation: no layer selection, FedAvg over all adapters)."""
    return list(range(len(scores)))


def select_aggregation_layers(
    scores: torch.Tensor, share: float, policy: str, rng: np.random.Generator | None = None
) -> list[int]:
    """The GAL: sorted layer indices chosen by `policy` from per-layer scores (L,).

    N = max(1, round(share · L)) layers (Python's round: halves go to the even number); ties in
    the scores go to the lower layer index. "all" ignores `share`.
    """
    if policy not in SELECTION_POLICIES:
        raise ValueError(f"unknown layer-selection policy {policy!r}; choose one of {sorted(SELECTION_POLICIES)}")
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"layer scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"layer scores must be finite, got {scores.tolist()}")
    if not (0.0 <= share <= 1.0) or math.isnan(share):
        raise ValueError(f"share of aggregation layers must be in [0, 1], got {share}")
    n = max(1, round(share * len(scores)))
    chosen = SELECTION_POLICIES[policy](scores.detach().cpu(), n, rng)
    return sorted(chosen)


def aggregation_keys(keys: Iterable[str], layers: Sequence[int]) -> list[str]:
    """The adapter keys exchanged with the server, in input order.

    Keys of the selected layers plus every key outside any layer (classification head, BERT
    pooler): per method.md a head is always aggregated. A selected layer without any key is an
    error (the layer indexing of the scores and of the keys disagree).
    """
    keys = list(keys)
    selected = set(layers)
    present = {layer_of_key(k) for k in keys}
    missing = sorted(selected - present)
    if missing:
        raise ValueError(f"selected layers {missing} have no adapter keys; key layers are {sorted(p for p in present if p is not None)}")
    return [k for k in keys if layer_of_key(k) is None or layer_of_key(k) in selected]


def local_keys(keys: Iterable[str], layers: Sequence[int]) -> list[str]:
    """The adapter keys that stay on the device: keys of the layers not in `layers`, in input order."""
    keys = list(keys)
    exchanged = set(aggregation_keys(keys, layers))
    return [k for k in keys if k not in exchanged]
