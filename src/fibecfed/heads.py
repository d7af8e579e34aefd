"""Class scores from a model: one function for both heads, so training, evaluation and Fisher
scores never need to know which head a model has."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class HeadOutput:
    """Class scores and what the last linear map saw.

    logits: (B, C). features: (B, H), the input h of the linear map that produced the logits
    (the classifier's input, or the decoder's last hidden state at the next-token position).
    has_bias: whether that map adds a bias (so ∂z/∂b = 1 per class).
    """

    logits: torch.Tensor
    features: torch.Tensor
    has_bias: bool
    # In training mode, where the head's input came straight out of a dropout (BERT's and
    # DistilBERT's classifier dropout, the second of RoBERTa's two): the logits and features
    # without that one dropout, (B, C) and (B, H); None otherwise. Kept apart because the loss
    # must use the dropped-out ones. A difficulty score from a training pass (the online refresh)
    # then matches an eval-mode score in scale where that is the only dropout after the body's
    # last LayerNorm (BERT, DistilBERT): inverted dropout makes ‖h‖² about 1/(1 - p) of its
    # value. Dropouts earlier stay: RoBERTa's first one, before its dense layer, still moves ‖h‖.
    undropped_logits: torch.Tensor | None = None
    undropped_features: torch.Tensor | None = None

    def for_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) a head-Fisher difficulty score should use: without the head's dropout."""
        if self.undropped_features is None or self.undropped_logits is None:
            return self.logits, self.features
        return self.undropped_logits, self.undropped_features


def class_logits(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    head: str,
    label_token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalised class scores, shape (B, C).

    classifier: the sequence-classification head's logits.
    verbalizer: the LM head's logit of each class's label word at the last prompt token (the
    next-token position), computed only for the C label words instead of the whole vocabulary.
    `batch` may carry `inputs_embeds` (B, L, H) instead of `input_ids` (gradients with respect
    to the input embeddings, perturbation of the embeddings).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if head == "classifier":
        return model(**inputs).logits
    return _verbalizer(model, inputs, head, label_token_ids).logits


def _verbalizer(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], head: str, label_token_ids: torch.Tensor | None
) -> HeadOutput:
    if head != "verbalizer" or label_token_ids is None:
        raise ValueError(f"unknown head {head!r} or missing label_token_ids")
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = causal_lm.base_model  # e.g. LlamaModel: hidden states without the LM head
    body_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "inputs_embeds", "attention_mask")}
    hidden = body(**body_inputs).last_hidden_state  # (B, L, H)
    last = inputs["attention_mask"].sum(dim=1) - 1  # (B,) index of the last real token (right padding)
    final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    lm_head = causal_lm.get_output_embeddings()
    weight = label_rows(lm_head, label_token_ids)  # (C, H)
    logits = final @ weight.T  # (B, C)
    # peft's wrapper of trainable label words hides the head's other attributes: its bias is the base layer's.
    adapter = getattr(lm_head, "token_adapter", None)
    bias = getattr(lm_head if adapter is None else adapter.get_base_layer(), "bias", None)
    if bias is not None:
        logits = logits + bias[label_token_ids]
    return HeadOutput(logits, final, bias is not None)


def label_rows(lm_head: nn.Module, label_token_ids: torch.Tensor) -> torch.Tensor:
    """The LM head's rows of the label words, shape (C, H), as the model's forward would use them.

    A plain head gives `weight[label_token_ids]`. Under peft's trainable tokens
    (model.train_label_words) the head is a wrapper whose base weight keeps the pretrained rows
    and whose (T, H) `trainable_tokens_delta` holds the current value of T token rows (it replaces
    them, it is not added); the label words' rows are read from there, so gradients reach them
    without peft rebuilding the whole (V, H) matrix (only the LM head is wrapped, so no forward
    pass rebuilds it either: the scores come from these rows, not from the head's forward).
    """
    adapter = getattr(lm_head, "token_adapter", None)
    if adapter is None:
        return lm_head.weight[label_token_ids]
    name = adapter.active_adapters[0]
    indices = adapter.token_indices[name]  # list of the T trainable token ids
    delta = adapter.trainable_tokens_delta[name]  # (T, H)
    position = {token: i for i, token in enumerate(indices)}
    missing = [int(t) for t in label_token_ids.tolist() if int(t) not in position]
    if missing:
        raise ValueError(f"label token ids {missing} are not among the trainable tokens {indices}")
    rows = torch.tensor([position[int(t)] for t in label_token_ids.tolist()], device=delta.device)
    return delta[rows]


def class_logits_and_features(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    head: str,
    label_token_ids: torch.Tensor | None = None,
) -> HeadOutput:
    """`class_logits` plus the input of the last linear map, from the same forward pass.

    For the classifier head the last nn.Linear with C outputs whose output is the logits is
    found with forward hooks (BERT `classifier`, RoBERTa `classifier.out_proj`; Llama's `score`
    runs on every token, and the token it pools is found by matching its output to the logits),
    so any sequence-classification model works without a table of head names.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if head != "classifier":
        return _verbalizer(model, inputs, head, label_token_ids)
    num_classes = int(model.config.num_labels) if hasattr(model, "config") else None
    # (module, input, output, undropped input or None) of each candidate head call.
    calls: list[tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    last_dropout: list[tuple[torch.Tensor, torch.Tensor]] = []  # the latest dropout's (input, output) only

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # The very tensor the latest dropout returned is this map's input: keep that dropout's input.
        source = last_dropout[0][0] if last_dropout and last_dropout[0][1] is args[0] else None
        calls.append((module, args[0], output, source))

    def record_dropout(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        last_dropout[:] = [(args[0], output)]  # one slot: the body's dropouts are not kept alive

    handles = [
        m.register_forward_hook(record)
        for m in model.modules()
        if isinstance(m, nn.Linear) and (num_classes is None or m.out_features == num_classes)
    ]
    if model.training:
        handles += [m.register_forward_hook(record_dropout) for m in model.modules() if isinstance(m, nn.Dropout)]
    try:
        logits = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    batch_size = logits.shape[0]
    rows = torch.arange(batch_size, device=logits.device)
    last_dropout.clear()
    for module, x, out, source in reversed(calls):
        if out.shape == logits.shape and torch.equal(out, logits):
            output = HeadOutput(logits, x.reshape(batch_size, -1), module.bias is not None)
            if source is not None:  # the head's input came straight out of a dropout: undo it
                with torch.no_grad():
                    output.undropped_logits = module(source).reshape(logits.shape)
                output.undropped_features = source.reshape(batch_size, -1)
            return output
        if out.dim() == 3 and out.shape[0] == batch_size and out.shape[-1] == logits.shape[-1]:
            # A head that runs on every token and then pools one position (Llama's `score` takes
            # the last real token): only that position's input reaches the loss.
            hits = (out == logits[:, None, :]).all(dim=-1)  # (B, L)
            if bool(hits.any(dim=1).all()):
                position = hits.shape[1] - 1 - hits.flip(dims=[1]).int().argmax(dim=1)  # last matching token
                return HeadOutput(logits, x[rows, position], module.bias is not None)
    raise NotImplementedError(
        f"cannot find the linear map that produces the class scores of {type(model).__name__}; "
        f"use method.curriculum.score_wrt=adapters or logits"
    )
