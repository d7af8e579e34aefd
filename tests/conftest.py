"""Shared fixtures: tiny models built from configs (no downloads, milliseconds per step)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("FIBECFED_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


def tiny_bert(num_labels: int = 3, layers: int = 4, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    lora = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    return get_peft_model(model, lora)


def tiny_llama(layers: int = 4, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=64, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, lora)


@pytest.fixture
def bert_model():
    return tiny_bert()


@pytest.fixture
def llama_model():
    return tiny_llama()


def random_batch(batch_size: int = 4, length: int = 6, num_labels: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 100, (batch_size, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0  # one padded row
    labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
