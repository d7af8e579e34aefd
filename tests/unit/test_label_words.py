"""Trainable label words (model.train_label_words): the verbalizer's label rows as a (C, H) head.

The rows are peft's trainable tokens: a key outside every layer, so every method exchanges and
aggregates it like a classifier head, and the saved adapter loads with PeftModel.from_pretrained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fibecfed.adapters import is_lora_key, is_token_key, layer_of_key, trainable_parameters
from fibecfed.config import load_config
from fibecfed.heads import class_logits, class_logits_and_features, label_rows
from fibecfed.models import load_model
from fibecfed.simulator import CHECKPOINT, Simulation
from tests.conftest import tiny_run_overrides

WORDS = ["negative", "neutral", "positive"]


def _load(folder: Path, train: bool):
    return load_model(str(folder), num_labels=3, head="verbalizer", label_words=WORDS, train_label_words=train)


def _batch(loaded, texts=("good day\nSentiment:", "a bad one\nSentiment:")):
    encoded = loaded.tokenizer(list(texts), padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": torch.tensor([2, 0])}


@pytest.mark.parametrize("tied", [True, False])
def test_label_rows_are_one_head_key_outside_the_layers(tied, tied_decoder_dir, tiny_decoder_dir):
    from peft import get_peft_model_state_dict

    folder = tied_decoder_dir if tied else tiny_decoder_dir
    plain, trained = _load(folder, False), _load(folder, True)
    params = trainable_parameters(trained.model)
    extra = [k for k in params if k not in trainable_parameters(plain.model)]
    assert len(extra) == 1 and is_token_key(extra[0])
    key = extra[0]
    # The LM head's rows, tied to the input embedding or not: the embedding stays a plain lookup.
    assert ".lm_head.token_adapter." in key
    assert type(trained.model.get_base_model().get_input_embeddings()) is torch.nn.Embedding
    assert layer_of_key(key) is None and not is_lora_key(key)
    assert params[key].shape == (3, 16)
    assert set(params) == set(get_peft_model_state_dict(trained.model))
    # Initialised from the pretrained rows: the same class scores as without it.
    base_rows = plain.model.get_base_model().get_output_embeddings().weight[plain.label_token_ids]
    torch.testing.assert_close(params[key].detach(), base_rows.detach())
    batch = _batch(trained)
    with torch.no_grad():
        torch.testing.assert_close(
            class_logits(trained.model, batch, "verbalizer", trained.label_token_ids),
            class_logits(plain.model, batch, "verbalizer", plain.label_token_ids),
        )


@pytest.mark.parametrize("tied", [True, False])
def test_scores_and_gradient_use_the_trainable_rows(tied, tied_decoder_dir, tiny_decoder_dir):
    loaded = _load(tied_decoder_dir if tied else tiny_decoder_dir, True)
    model, ids = loaded.model, loaded.label_token_ids
    key = next(k for k in trainable_parameters(model) if is_token_key(k))
    delta = trainable_parameters(model)[key]
    with torch.no_grad():
        delta.copy_(torch.arange(48, dtype=torch.float32).reshape(3, 16) / 100)
    lm_head = model.get_base_model().get_output_embeddings()
    assert torch.equal(label_rows(lm_head, ids), delta)
    # Rows in another order than the trainable tokens' are read by token id, not by position.
    torch.testing.assert_close(label_rows(lm_head, ids.flip(0)), delta.flip(0))
    batch = _batch(loaded)
    out = class_logits_and_features(model, batch, "verbalizer", ids)
    # logits z = h Wᵀ with W the (3, 16) rows; the loss's gradient w.r.t. W is (softmax(z) - e_y)ᵀ h.
    torch.testing.assert_close(out.logits, out.features @ delta.T)
    loss = torch.nn.functional.cross_entropy(out.logits, batch["labels"], reduction="sum")
    (grad,) = torch.autograd.grad(loss, delta)
    error = torch.softmax(out.logits, dim=1) - torch.nn.functional.one_hot(batch["labels"], 3)  # (B, C)
    torch.testing.assert_close(grad, error.T @ out.features.detach(), rtol=1e-5, atol=1e-6)
    # The full LM head's logits at the last token agree: the rows are what the forward uses.
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(dim=1) - 1
    torch.testing.assert_close(out.logits.detach(), full[torch.arange(2), last][:, ids], rtol=1e-5, atol=1e-5)


def test_label_rows_missing_from_the_trainable_tokens_is_an_error(tiny_decoder_dir):
    loaded = _load(tiny_decoder_dir, True)
    lm_head = loaded.model.get_base_model().get_output_embeddings()
    with pytest.raises(ValueError, match="not among the trainable tokens"):
        label_rows(lm_head, torch.tensor([5]))


@pytest.mark.parametrize(("method", "tied"), [("fedavg", False), ("fibecfed", True)])
def test_runs_aggregate_the_label_rows_and_save_them_for_peft(method, tied, tied_decoder_dir, tiny_decoder_dir, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    tiny_decoder_dir = tied_decoder_dir if tied else tiny_decoder_dir
    # score_wrt=adapters: the rows are left out of the per-sample gradients (not an nn.Linear's).
    extra = [f"method={method}", "model.head=verbalizer", "model.train_label_words=true", "train.head_lr=0.05",
             "method.curriculum.score_wrt=adapters", "method.curriculum.score_at=first_participation"]
    config = load_config(None, tiny_run_overrides(tiny_decoder_dir, 2) + extra)
    Simulation(config, tmp_path).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    checkpoint = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    key = next(k for k in checkpoint["global_state"] if is_token_key(k))
    initial = _load(tiny_decoder_dir, True)
    start = trainable_parameters(initial.model)[key].detach()
    # The server's rows moved: they were exchanged and averaged, in FibecFed's warm-up round too.
    assert not torch.allclose(checkpoint["global_state"][key], start)
    if method == "fibecfed":
        assert rows[1]["aggregated_layers"] is None and rows[1]["round_upload_bytes"] > 0
    base = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    loaded = get_peft_model_state_dict(model)
    for name, value in checkpoint["global_state"].items():
        assert torch.equal(loaded[name], value), name
    # The loaded model scores the label words with the trained rows, as the run did.
    run_model = _load(tiny_decoder_dir, True)
    set_peft_model_state_dict(run_model.model, checkpoint["global_state"])
    batch = {k: v for k, v in _batch(run_model).items() if k != "labels"}
    with torch.no_grad():
        full = model(**batch).logits  # (B, L, V)
        ours = class_logits(run_model.model, batch, "verbalizer", run_model.label_token_ids)
    last = batch["attention_mask"].sum(dim=1) - 1
    torch.testing.assert_close(ours, full[torch.arange(2), last][:, run_model.label_token_ids], rtol=1e-5, atol=1e-5)


def test_label_words_on_a_classifier_is_a_clear_error(tiny_encoder_dir):
    from fibecfed.errors import ModelError

    with pytest.raises(ModelError, match="needs the verbalizer head"):
        load_model(str(tiny_encoder_dir), num_labels=3, train_label_words=True)


@pytest.mark.parametrize("tied", [True, False])
def test_no_gradient_flows_into_the_layers_for_the_rows_alone(tied, tied_decoder_dir, tiny_decoder_dir):
    # With only the rows trainable, the backward pass stops at them: the hidden states need no
    # gradient (were the tied embedding wrapped instead, every layer's backward would run).
    loaded = _load(tied_decoder_dir if tied else tiny_decoder_dir, True)
    for key, param in trainable_parameters(loaded.model).items():
        param.requires_grad_(is_token_key(key))
    out = class_logits_and_features(loaded.model, _batch(loaded), "verbalizer", loaded.label_token_ids)
    assert out.logits.requires_grad and not out.features.requires_grad


def test_a_biased_lm_head_keeps_its_bias():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=False)
    ids = torch.tensor([5, 9])

    def build(rows: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.lm_head = torch.nn.Linear(16, 50, bias=True)  # as Phi's or GPT-J's head
        torch.nn.init.normal_(model.lm_head.bias, std=1.0)
        extra = {"trainable_token_indices": {"lm_head": ids.tolist()}} if rows else {}
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], **extra))

    batch = {"input_ids": torch.tensor([[3, 4, 8]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    plain, trained = build(False), build(True)
    with torch.no_grad():
        a = class_logits_and_features(plain, batch, "verbalizer", ids)
        b = class_logits_and_features(trained, batch, "verbalizer", ids)
    assert a.has_bias and b.has_bias
    torch.testing.assert_close(a.logits, b.logits)
    bias = plain.get_base_model().lm_head.bias[ids]
    torch.testing.assert_close(a.logits, a.features @ plain.get_base_model().lm_head.weight[ids].T + bias)
