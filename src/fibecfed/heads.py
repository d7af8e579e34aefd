"""Class scores from a model: one function for both heads, so training, evaluation and Fisher
scores never need to know which head a model has."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


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
    if head != "verbalizer" or label_token_ids is None:
        raise ValueError(f"unknown head {head!r} or missing label_token_ids")
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = causal_lm.base_model  # e.g. LlamaModel: hidden states without the LM head
    body_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "inputs_embeds", "attention_mask")}
    hidden = body(**body_inputs).last_hidden_state  # (B, L, H)
    last = inputs["attention_mask"].sum(dim=1) - 1  # (B,) index of the last real token (right padding)
    final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    lm_head = causal_lm.get_output_embeddings()
    weight = lm_head.weight[label_token_ids]  # (C, H)
    logits = final @ weight.T  # (B, C)
    if getattr(lm_head, "bias", None) is not None:
        logits = logits + lm_head.bias[label_token_ids]
    return logits
