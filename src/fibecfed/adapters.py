"""Adapters as named state dicts: the one module that knows peft's key names.

Keys are those of `peft.get_peft_model_state_dict` (the format peft saves and loads), e.g.
`base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.weight` or, for a
classification head, `base_model.model.classifier.weight`, or for trainable label words
(model.train_label_words), `base_model.model.lm_head.token_adapter.trainable_tokens_delta`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

AdapterState = dict[str, torch.Tensor]

# Transformer blocks are numbered children of a ModuleList: bert `encoder.layer.3`, llama
# `model.layers.3`, gpt2 `transformer.h.3`, distilbert `transformer.layer.3`.
_LAYER_PATTERN = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")
_ADAPTER_NAME = "default"


def peft_key(parameter_name: str) -> str:
    """Map a parameter name of a peft model to its peft state-dict key (drop the adapter name)."""
    key = parameter_name.replace(f".modules_to_save.{_ADAPTER_NAME}.", ".")
    key = key.replace(f".{_ADAPTER_NAME}.", ".")
    # A ParameterDict entry ends with the adapter name: peft's trainable tokens,
    # `...lm_head.token_adapter.trainable_tokens_delta.default`.
    return key.removesuffix(f".{_ADAPTER_NAME}")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters (LoRA matrices and head) keyed by peft state-dict key, in model order."""
    params = {peft_key(name): p for name, p in model.named_parameters() if p.requires_grad}
    return params


def layer_of_key(key: str) -> int | None:
    """Index of the transformer layer a key belongs to, or None (head, pooler, embeddings)."""
    match = _LAYER_PATTERN.search(key)
    return int(match.group(1)) if match else None


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key or ".lora_embedding_" in key


def is_token_key(key: str) -> bool:
    """peft's trainable token rows (model.train_label_words): a head, but not an nn.Linear's weight."""
    return ".trainable_tokens_delta" in key


def layer_keys(keys: Iterable[str]) -> dict[int, list[str]]:
    """Group keys by transformer layer index (keys outside any layer are left out)."""
    groups: dict[int, list[str]] = {}
    for key in keys:
        layer = layer_of_key(key)
        if layer is not None:
            groups.setdefault(layer, []).append(key)
    return dict(sorted(groups.items()))


def get_state(params: Mapping[str, nn.Parameter], keys: Iterable[str] | None = None) -> AdapterState:
    """A detached CPU copy of the named parameters (all, or only `keys`)."""
    names = params.keys() if keys is None else keys
    return {k: params[k].detach().to("cpu", copy=True) for k in names}


def set_state(params: Mapping[str, nn.Parameter], state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy a state dict into the model's parameters in place.

    strict=True: `state` must hold exactly the model's trainable keys. strict=False: a subset is
    fine (layer-selective exchange), but an unknown key is still an error.
    """
    unknown = set(state) - set(params)
    if unknown:
        raise KeyError(f"adapter state has keys the model lacks: {sorted(unknown)[:3]}")
    if strict:
        missing = set(params) - set(state)
        if missing:
            raise KeyError(f"adapter state lacks keys of the model: {sorted(missing)[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            target = params[key]
            if target.shape != value.shape:
                raise ValueError(f"shape mismatch for {key}: model {tuple(target.shape)}, state {tuple(value.shape)}")
            target.copy_(value.to(target.device, target.dtype))


def num_elements(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())
