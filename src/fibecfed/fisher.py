"""Per-sample gradients, Fisher difficulty scores and the diagonal Fisher (method.md, Part 1).

The empirical Fisher information of sample i is F_i = g_i g_iᵀ with g_i = ∇ log p(y_i | x_i).
Only its diagonal is used: the difficulty score is its trace, ‖g_i‖² (larger = harder), and the
diagonal averaged over samples, mean_i g_i², is the parameter importance behind the sparse local
update (Part 2).

Per-sample gradients come from one batched forward/backward, Opacus-style: every trainable
parameter belongs to an `nn.Linear` (peft's lora_A / lora_B, a classification head), whose weight
gradient is a sum over tokens of (output gradient) ⊗ (input). Keeping the batch dimension of that
sum gives each sample's own gradient, without a backward per sample (method.md: "never one
sample at a time").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fibecfed.heads import HeadOutput

Batch = Mapping[str, torch.Tensor]
LogitsFn = Callable[[Batch], torch.Tensor]
GradientTarget = Literal["adapters", "embeddings", "logits", "head"]
# Class scores and the last linear map's input, from one forward pass (heads.HeadOutput).
HeadFn = Callable[[Batch], "HeadOutput"]

_TARGETS = ("adapters", "embeddings", "logits", "head")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while scoring, then every submodule back in the mode it was in."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _summed_loss(logits_fn: LogitsFn, batch: Batch) -> torch.Tensor:
    """Σ_i -log p(y_i | x_i): a sum, not a mean, so each sample's gradient is its own."""
    logits = logits_fn(batch)  # (B, C)
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")


def _owning_linears(model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[nn.Linear, dict[str, str]]:
    """The nn.Linear owning each parameter: module -> {"weight": key, "bias": key} (present ones)."""
    key_of = {id(p): key for key, p in params.items()}
    owners: dict[nn.Linear, dict[str, str]] = {}
    found: set[str] = set()
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for role in ("weight", "bias"):
            param = getattr(module, role, None)
            if param is not None and id(param) in key_of:
                owners.setdefault(module, {})[role] = key_of[id(param)]
                found.add(key_of[id(param)])
    missing = [key for key in params if key not in found]
    if missing:
        raise NotImplementedError(
            f"per-sample gradients are implemented for nn.Linear parameters only (LoRA matrices, a linear "
            f"classification head); not owned by an nn.Linear of the model: {missing[:3]}"
        )
    return owners


def per_sample_gradients(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    logits_fn: LogitsFn,
    batch: Batch,
) -> dict[str, torch.Tensor]:
    """Gradient of each sample's loss -log p(y_i | x_i) w.r.t. every parameter in `params`.

    Returns key -> tensor of shape (B, *param.shape), float32. One forward and one backward for
    the whole batch: a forward hook on each owning nn.Linear keeps its input x, shape (B, in) for
    a head on pooled output or (B, L, in) for token-wise layers, and a hook on its output receives
    the output gradient g of the same leading shape; then per sample
        ∂loss_i/∂W = Σ_t g[i, t] ⊗ x[i, t]  -> (out, in),    ∂loss_i/∂b = Σ_t g[i, t]  -> (out,)
    (samples interact in no layer, so g[i] carries only sample i's loss). The sum of the
    per-sample gradients is checked against autograd's batch gradient, which catches a parameter
    also used outside its module's forward (tied weights, DoRA).

    The train/eval mode is left as the caller set it. No hook stays registered, and the
    parameters' `.grad` are not touched (gradients are taken with torch.autograd.grad).
    """
    not_trainable = [key for key, p in params.items() if not p.requires_grad]
    if not_trainable:
        raise ValueError(f"per-sample gradients need trainable parameters; requires_grad=False: {not_trainable[:3]}")
    owners = _owning_linears(model, params)
    batch_size = int(batch["labels"].shape[0])
    grads: dict[str, torch.Tensor] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def accumulate(module: nn.Linear, inputs: torch.Tensor, grad_out: torch.Tensor) -> None:
        keys = owners[module]
        x = inputs.reshape(batch_size, -1, module.in_features).float()  # (B, T, in); T = 1 for 2-D input
        g = grad_out.reshape(batch_size, -1, module.out_features).float()  # (B, T, out)
        # A module called more than once (or per sample chunk) adds up, as autograd would.
        if "weight" in keys:
            weight_grad = torch.einsum("bto,bti->boi", g, x)  # (B, out, in)
            grads[keys["weight"]] = grads[keys["weight"]] + weight_grad if keys["weight"] in grads else weight_grad
        if "bias" in keys:
            bias_grad = g.sum(dim=1)  # (B, out)
            grads[keys["bias"]] = grads[keys["bias"]] + bias_grad if keys["bias"] in grads else bias_grad

    def capture(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        if not inputs or inputs[0].shape[0] != batch_size:
            raise NotImplementedError(
                f"{type(module).__name__} was called without a positional input whose first dimension is the "
                f"batch ({batch_size}); per-sample gradients cannot be split by sample"
            )
        activation = inputs[0].detach()
        handles.append(output.register_hook(lambda grad_out: accumulate(module, activation, grad_out)))

    try:
        for module in owners:
            handles.append(module.register_forward_hook(capture))
        with torch.enable_grad():
            loss = _summed_loss(logits_fn, batch)
            totals = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()

    result = {}
    for (key, param), total in zip(params.items(), totals):
        per_sample = grads.get(key)
        if per_sample is None:  # the module never ran: this batch's loss does not depend on it
            per_sample = torch.zeros((batch_size, *param.shape), dtype=torch.float32, device=param.device)
        _check_sums_to_batch_gradient(key, param, per_sample, total)
        result[key] = per_sample
    return result


def _check_sums_to_batch_gradient(
    key: str, param: nn.Parameter, per_sample: torch.Tensor, total: torch.Tensor | None
) -> None:
    summed = per_sample.sum(dim=0)
    reference = torch.zeros_like(summed) if total is None else total.float()
    rtol = 5e-2 if param.dtype in (torch.float16, torch.bfloat16) else 1e-3
    gap = float((summed - reference).norm())
    if gap > rtol * (float(summed.norm()) + float(reference.norm())) + 1e-6:
        raise NotImplementedError(
            f"per-sample gradients of {key} do not sum to its batch gradient (gap {gap:.3g}): the parameter "
            f"is used outside its nn.Linear's forward (tied weights, DoRA, gradient checkpointing?)"
        )


def _real_tokens(batch: Batch) -> torch.Tensor:
    """Number of non-padded tokens per sample, shape (B,), float."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1).float()
    reference = batch["input_ids"] if "input_ids" in batch else batch["inputs_embeds"]
    return torch.full((reference.shape[0],), float(reference.shape[1]), device=reference.device)


def squared_norms(per_sample_grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """‖g_i‖² over all keys, shape (B,): the trace of sample i's diagonal empirical Fisher."""
    return sum(g.flatten(start_dim=1).pow(2).sum(dim=1) for g in per_sample_grads.values())


def _embedding_scores(logits_fn: LogitsFn, model: nn.Module, batch: Batch) -> torch.Tensor:
    """‖∂(-log p(y_i|x_i))/∂e_i‖² over the real tokens of sample i, shape (B,).

    e_i are the input token embeddings (B, L, H), before position embeddings are added. One
    backward of the summed loss gives every sample's own gradient: samples do not interact.
    """
    if "inputs_embeds" in batch:
        embeds = batch["inputs_embeds"]
    else:
        with torch.no_grad():
            embeds = model.get_input_embeddings()(batch["input_ids"])  # (B, L, H)
    embeds = embeds.detach().requires_grad_(True)
    inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "inputs_embeds")}
    inputs["inputs_embeds"] = embeds
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(_summed_loss(logits_fn, inputs), embeds)  # (B, L, H)
    per_token = grad.float().pow(2).sum(dim=-1)  # (B, L)
    if "attention_mask" in batch:
        per_token = per_token * batch["attention_mask"].to(per_token.dtype)
    return per_token.sum(dim=1)


def _logit_scores(logits_fn: LogitsFn, batch: Batch) -> torch.Tensor:
    """‖∂(-log p(y_i|x_i))/∂z_i‖² = ‖softmax(z_i) - e_{y_i}‖², shape (B,), from a forward pass alone.

    z_i (C,) are the class scores: this is the Fisher trace with respect to the scores themselves,
    not a parameter's. The head's own Fisher also depends on the features it sees: see
    `head_fisher_trace` (wrt="head").
    """
    with torch.no_grad():
        probs = torch.softmax(logits_fn(batch).float(), dim=-1)  # (B, C)
        residual = probs - F.one_hot(batch["labels"], probs.shape[-1]).to(probs.dtype)
        return residual.pow(2).sum(dim=-1)


def head_fisher_trace(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """Trace of sample i's empirical Fisher over a linear head z = W h + b, shape (B,).

    ∂(-log p(y|x))/∂W = (p - e_y) ⊗ h and ∂/∂b = p - e_y, so the trace ‖g‖² is
    ‖p - e_y‖² · (‖h‖² + 1) with a bias, ‖p - e_y‖² · ‖h‖² without. logits (B, C), features
    (B, H), labels (B,). Exact, from a forward pass: no backward, no per-sample gradients.
    """
    probs = torch.softmax(logits.detach().float(), dim=-1)  # (B, C)
    residual = probs - F.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    feature_norm = features.detach().float().pow(2).sum(dim=-1)  # (B,)
    return residual.pow(2).sum(dim=-1) * (feature_norm + (1.0 if has_bias else 0.0))


def _head_scores(head_fn: HeadFn, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        out = head_fn(batch)
        return head_fisher_trace(out.logits, out.features, batch["labels"], out.has_bias)


def difficulty_scores(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    logits_fn: LogitsFn,
    batch: Batch,
    wrt: GradientTarget = "adapters",
    normalize_by_length: bool = False,
    head_fn: HeadFn | None = None,
) -> torch.Tensor:
    """Fisher difficulty of each sample in `batch`, shape (B,), float32, detached.

    method.md Part 1: score_i = trace of the diagonal empirical Fisher = ‖g_i‖², with
    g_i = ∇ log p(y_i | x_i) taken over `params` (wrt="adapters", the default) or over the input
    token embeddings of the non-padded positions (wrt="embeddings"), over the class scores
    (wrt="logits"), or over the weights of a linear head (wrt="head", needs `head_fn`: the exact
    `head_fisher_trace`); the last two need a forward pass only. `params` is used by "adapters" only.
    normalize_by_length divides by the number of real tokens, so long texts are not harder merely
    for being long. Scored in eval mode (dropout off); the model's modes are restored afterwards.
    """
    if wrt not in _TARGETS:
        raise ValueError(f"unknown gradient target wrt={wrt!r}; choose one of {list(_TARGETS)}")
    with eval_mode(model):
        if wrt == "adapters":
            scores = squared_norms(per_sample_gradients(model, params, logits_fn, batch))
        elif wrt == "logits":
            scores = _logit_scores(logits_fn, batch)
        elif wrt == "head":
            if head_fn is None:
                raise ValueError("wrt='head' needs head_fn, the class scores with the head's input features")
            scores = _head_scores(head_fn, batch)
        else:
            scores = _embedding_scores(logits_fn, model, batch)
    if normalize_by_length:
        scores = scores / _real_tokens(batch).to(scores.device)
    return scores.detach()


def _chunks(indices: Sequence[int], batch_size: int) -> Iterator[Sequence[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


def score_dataset(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    logits_fn: LogitsFn,
    make_batch: Callable[[Sequence[int]], Batch],
    indices: Sequence[int],
    batch_size: int,
    wrt: GradientTarget = "adapters",
    normalize_by_length: bool = False,
    head_fn: HeadFn | None = None,
) -> torch.Tensor:
    """Difficulty scores of the samples at `indices`, shape (N,), float32 on the CPU, in that order.

    Consecutive chunks of `batch_size` indices are batched by `make_batch` (which pads and puts
    the batch on the model's device) and scored together.
    """
    scores = [
        difficulty_scores(model, params, logits_fn, make_batch(chunk), wrt, normalize_by_length, head_fn).cpu()
        for chunk in _chunks(indices, batch_size)
    ]
    return torch.cat(scores) if scores else torch.zeros(0)


def diagonal_fisher(per_sample_grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher, key -> mean_i g_i² of the parameter's shape (method.md Part 2)."""
    return {key: g.pow(2).mean(dim=0) for key, g in per_sample_grads.items()}


def score_and_fisher(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    logits_fn: LogitsFn,
    make_batch: Callable[[Sequence[int]], Batch],
    indices: Sequence[int],
    batch_size: int,
    normalize_by_length: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Adapter difficulty scores (N,) and the diagonal Fisher over the samples, from one pass.

    The scores equal `score_dataset(..., wrt="adapters")`; the Fisher, key -> mean over all N
    samples of g_i² (not length-normalised), equals `diagonal_fisher` of all per-sample
    gradients at once. Both come back float32 on the CPU. Scored in eval mode.
    """
    if len(indices) == 0:
        raise ValueError("cannot compute a Fisher over no samples; indices is empty")
    scores: list[torch.Tensor] = []
    fisher_sum: dict[str, torch.Tensor] = {}
    with eval_mode(model):
        for chunk in _chunks(indices, batch_size):
            batch = make_batch(chunk)
            grads = per_sample_gradients(model, params, logits_fn, batch)
            chunk_scores = squared_norms(grads)
            if normalize_by_length:
                chunk_scores = chunk_scores / _real_tokens(batch).to(chunk_scores.device)
            scores.append(chunk_scores.detach().cpu())
            for key, g in grads.items():
                squares = g.pow(2).sum(dim=0)
                fisher_sum[key] = fisher_sum[key] + squares if key in fisher_sum else squares
    fisher = {key: (total / len(indices)).cpu() for key, total in fisher_sum.items()}
    return torch.cat(scores), fisher


class FisherAccumulator:
    """Diagonal empirical Fisher of some parameters, collected during ordinary training steps.

    While active (a context manager), every backward pass through the owning nn.Linear modules
    adds the per-sample squared gradients Σ_i g_i² to a running sum, from the same activations
    and output gradients the step computes anyway: no extra forward or backward (method.md
    Part 2 needs the Fisher every round; a separate probe pass would cost as much as training).
    The training loss is a batch mean, so each output gradient is 1/B of the sample's own; it is
    scaled back by B. Gradients are taken before any update mask is applied, so masked neurons
    keep an up-to-date importance.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Parameter]):
        self.owners = _owning_linears(model, params)
        self.params = params
        self.sums: dict[str, torch.Tensor] = {}
        self.samples = 0
        # Off: the next forward passes are not collected (a Fisher from every m-th step only).
        self.enabled = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _accumulate(self, module: nn.Linear, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        batch_size = x.shape[0]
        keys = self.owners[module]
        x3 = x.reshape(batch_size, -1, module.in_features).float()  # (B, T, in)
        g3 = grad_out.reshape(batch_size, -1, module.out_features).float() * batch_size  # (B, T, out)
        if "weight" in keys:
            squares = torch.einsum("bto,bti->boi", g3, x3).pow(2).sum(dim=0)  # (out, in)
            self.sums[keys["weight"]] = self.sums.get(keys["weight"], 0) + squares.detach()
        if "bias" in keys:
            squares = g3.sum(dim=1).pow(2).sum(dim=0)  # (out,)
            self.sums[keys["bias"]] = self.sums.get(keys["bias"], 0) + squares.detach()

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self.enabled or not torch.is_grad_enabled() or not output.requires_grad or not inputs:
            return
        activation = inputs[0].detach()
        self._handles.append(output.register_hook(lambda grad_out: self._accumulate(module, activation, grad_out)))

    def count(self, batch_size: int) -> None:
        """Record that a step over `batch_size` samples ran (the Fisher is a mean over samples)."""
        self.samples += batch_size

    def __enter__(self) -> FisherAccumulator:
        for module in self.owners:
            self._handles.append(module.register_forward_hook(self._capture))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def fisher(self) -> dict[str, torch.Tensor]:
        """key -> mean over the samples seen of g_i², the parameter's shape, on the CPU."""
        if self.samples == 0:
            raise ValueError("no training step ran while the accumulator was active")
        return {
            key: (self.sums[key] / self.samples).cpu() if key in self.sums else torch.zeros(p.shape)
            for key, p in self.params.items()
        }
