"""Shared fixtures: tiny models built from configs (no downloads, milliseconds per step)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread (and do not fight the CLI runs of integration tests).
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A 4-layer BERT with hidden size 16 and the packaged MiniLM's real tokenizer, saved as a
    local Hugging Face folder: the simulator loads it by path like any user model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fibecfed.models import resolve_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=128,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_run_overrides(model_dir: Path, rounds: int = 2) -> list[str]:
    """A run on a tiny model and 400 real tweets: seconds, not minutes."""
    return [
        f"model.name={model_dir}",
        "model.max_length=32",
        "data.max_train_samples=400",
        "data.max_test_samples=100",
        "partition.num_devices=4",
        "federation.devices_per_round=2",
        f"federation.rounds={rounds}",
        "federation.device_eval_samples=20",
        "train.batch_size=8",
        "train.local_steps=2",
        "train.lr=0.01",
    ]


def _save_tiny_decoder(folder: Path, tied: bool) -> Path:
    """A 4-layer Llama with hidden size 16 (and MiniLM's tokenizer, whose words are single tokens)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fibecfed.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=32, max_position_embeddings=128, pad_token_id=0,
        architectures=["LlamaForCausalLM"], tie_word_embeddings=tied,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory) -> Path:
    return _save_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), tied=False)


@pytest.fixture(scope="session")
def tied_decoder_dir(tmp_path_factory) -> Path:
    """The same with its LM head tied to the input embedding, as SmolLM2's."""
    return _save_tiny_decoder(tmp_path_factory.mktemp("tiny-llama-tied"), tied=True)
