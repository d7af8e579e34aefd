import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fibecfed.adapters import is_lora_key, trainable_parameters
from fibecfed.fisher import (
    diagonal_fisher,
    difficulty_scores,
    per_sample_gradients,
    score_and_fisher,
    score_dataset,
)
from fibecfed.heads import class_logits
from tests.conftest import random_batch, tiny_bert, tiny_llama

LABEL_WORDS = torch.tensor([5, 6, 7])


def _sample(batch, i):
    """Sample i alone, a batch of one with its own attention mask (padding kept)."""
    return {k: v[i : i + 1] for k, v in batch.items()}


def per_sample_gradients_reference(params, logits_fn, batch):
    """Naive loop: one backward per sample of that sample's loss alone."""
    grads = {key: [] for key in params}
    for i in range(batch["labels"].shape[0]):
        one = _sample(batch, i)
        loss = F.cross_entropy(logits_fn(one), one["labels"], reduction="sum")
        for key, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            grads[key].append(torch.zeros_like(params[key]) if g is None else g)
    return {key: torch.stack(gs) for key, gs in grads.items()}


def embedding_scores_reference(model, logits_fn, batch):
    scores = []
    for i in range(batch["labels"].shape[0]):
        one = _sample(batch, i)
        embeds = model.get_input_embeddings()(one["input_ids"]).detach().requires_grad_(True)
        inputs = {k: v for k, v in one.items() if k != "input_ids"} | {"inputs_embeds": embeds}
        (g,) = torch.autograd.grad(F.cross_entropy(logits_fn(inputs), one["labels"]), embeds)
        real = one["attention_mask"][0].bool()
        scores.append(g[0, real].pow(2).sum())
    return torch.stack(scores)


def _bert():
    model = tiny_bert()
    model.eval()
    params = trainable_parameters(model)
    # peft initialises lora_B to zero, which makes every lora_A gradient zero; move off that point.
    with torch.no_grad():
        for key, p in params.items():
            if ".lora_B." in key:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return model, params, (lambda b: class_logits(model, b, "classifier"))


def _llama():
    model = tiny_llama()
    model.eval()
    params = trainable_parameters(model)
    with torch.no_grad():
        for key, p in params.items():
            if ".lora_B." in key:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return model, params, (lambda b: class_logits(model, b, "verbalizer", LABEL_WORDS))


MODELS = {"bert": _bert, "llama": _llama}


@pytest.mark.parametrize("name", MODELS)
def test_per_sample_gradients_match_naive_loop(name):
    model, params, logits_fn = MODELS[name]()
    batch = random_batch(batch_size=5, length=7)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # row 0 is padded
    fast = per_sample_gradients(model, params, logits_fn, batch)
    slow = per_sample_gradients_reference(params, logits_fn, batch)
    assert fast.keys() == params.keys()
    if name == "bert":  # the classification head (modules_to_save) is covered, weight and bias
        assert {k for k in params if not is_lora_key(k)} == {
            "base_model.model.classifier.weight",
            "base_model.model.classifier.bias",
        }
    for key in params:
        assert fast[key].shape == (5, *params[key].shape)
        assert float(slow[key].abs().max()) > 0, key  # a real check, not zeros against zeros
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("wrt", ["adapters", "embeddings"])
@pytest.mark.parametrize("normalize", [False, True])
def test_difficulty_scores_match_naive_loop(name, wrt, normalize):
    model, params, logits_fn = MODELS[name]()
    batch = random_batch(batch_size=5, length=7)
    scores = difficulty_scores(model, params, logits_fn, batch, wrt=wrt, normalize_by_length=normalize)
    if wrt == "adapters":
        slow = per_sample_gradients_reference(params, logits_fn, batch)
        expected = sum(g.flatten(1).pow(2).sum(1) for g in slow.values())
    else:
        expected = embedding_scores_reference(model, logits_fn, batch)
    if normalize:
        expected = expected / torch.tensor([5.0, 7, 7, 7, 7])  # row 0 has 2 padded positions
    assert scores.shape == (5,)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)


def test_logit_scores_by_hand_and_against_autograd():
    # Class scores z = [0, 0] with label 0: p = [0.5, 0.5], p - e_0 = [-0.5, 0.5], norm^2 = 0.5.
    # z = [ln 3, 0] with label 1: p = [0.75, 0.25], p - e_1 = [0.75, -0.75], norm^2 = 1.125.
    fixed = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])}
    scores = difficulty_scores(nn.Linear(1, 1), {}, lambda b: fixed, batch, wrt="logits")
    torch.testing.assert_close(scores, torch.tensor([0.5, 1.125]))
    # On a real model: the squared gradient of each sample's loss with respect to its class scores.
    model, params, logits_fn = MODELS["bert"]()
    batch = random_batch(batch_size=5, length=7)
    logits = logits_fn(batch).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, batch["labels"], reduction="sum"), logits)
    scores = difficulty_scores(model, params, logits_fn, batch, wrt="logits")
    torch.testing.assert_close(scores, grad.pow(2).sum(1), rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in params.values())  # a forward pass only


def test_fitted_sample_is_easier_than_misfitted_one():
    model = tiny_bert()
    params = trainable_parameters(model)
    fitted = random_batch(batch_size=1, length=6, seed=3)
    fitted["labels"] = torch.tensor([0])
    optimizer = torch.optim.Adam(params.values(), lr=5e-2)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(class_logits(model, fitted, "classifier"), fitted["labels"]).backward()
        optimizer.step()
    for p in params.values():
        p.grad = None
    wrong = {**fitted, "labels": torch.tensor([1])}  # same text, a label the model now rejects
    both = {k: torch.cat([fitted[k], wrong[k]]) for k in fitted}
    logits_fn = lambda b: class_logits(model, b, "classifier")  # noqa: E731
    assert F.cross_entropy(logits_fn(fitted), fitted["labels"]) < 0.05
    for wrt in ("adapters", "embeddings", "logits"):
        easy, hard = difficulty_scores(model, params, logits_fn, both, wrt=wrt).tolist()
        assert easy < hard, wrt


def test_diagonal_fisher_is_mean_of_squared_per_sample_gradients():
    model, params, logits_fn = _bert()
    batch = random_batch(batch_size=4)
    slow = per_sample_gradients_reference(params, logits_fn, batch)
    fisher = diagonal_fisher(per_sample_gradients(model, params, logits_fn, batch))
    assert fisher.keys() == params.keys()
    for key in params:
        assert fisher[key].shape == params[key].shape
        torch.testing.assert_close(fisher[key], slow[key].pow(2).mean(0), rtol=1e-4, atol=1e-8)


def test_dataset_scoring_batches_and_fisher_over_all_samples():
    model, params, logits_fn = _bert()
    data = random_batch(batch_size=7, length=6, seed=5)
    make_batch = lambda idx: {k: v[list(idx)] for k, v in data.items()}  # noqa: E731
    indices = [6, 0, 3, 1, 5]
    scores = score_dataset(model, params, logits_fn, make_batch, indices, batch_size=2)
    whole = difficulty_scores(model, params, logits_fn, make_batch(indices))
    torch.testing.assert_close(scores, whole, rtol=1e-4, atol=1e-6)
    normalized, fisher = score_and_fisher(model, params, logits_fn, make_batch, indices, 2, normalize_by_length=True)
    lengths = data["attention_mask"][indices].sum(1).float()
    torch.testing.assert_close(normalized, whole / lengths, rtol=1e-4, atol=1e-6)
    slow = per_sample_gradients_reference(params, logits_fn, make_batch(indices))
    for key in params:
        torch.testing.assert_close(fisher[key], slow[key].pow(2).mean(0), rtol=1e-4, atol=1e-8)
    embeds = score_dataset(model, params, logits_fn, make_batch, indices, batch_size=3, wrt="embeddings")
    expected = difficulty_scores(model, params, logits_fn, make_batch(indices), wrt="embeddings")
    torch.testing.assert_close(embeds, expected)
    assert score_dataset(model, params, logits_fn, make_batch, [], batch_size=2).shape == (0,)


def test_no_hooks_or_grads_left_and_mode_restored():
    model, params, logits_fn = _bert()
    model.train()
    batch = random_batch()
    per_sample_gradients(model, params, logits_fn, batch)
    difficulty_scores(model, params, logits_fn, batch)
    difficulty_scores(model, params, logits_fn, batch, wrt="embeddings")
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks and not module._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_scores_are_taken_without_dropout():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.5,
    )
    lora = LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"], lora_dropout=0.5)
    model = get_peft_model(BertForSequenceClassification(config), lora)
    model.train()
    params = trainable_parameters(model)
    logits_fn = lambda b: class_logits(model, b, "classifier")  # noqa: E731
    batch = random_batch()
    first = difficulty_scores(model, params, logits_fn, batch)
    torch.testing.assert_close(first, difficulty_scores(model, params, logits_fn, batch))
    assert model.training


def test_parameter_outside_a_linear_is_rejected():
    model, params, logits_fn = _bert()
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(True)
    try:
        with pytest.raises(NotImplementedError, match="word_embeddings"):
            with_embedding = {**params, "bert.embeddings.word_embeddings.weight": embedding}
            per_sample_gradients(model, with_embedding, logits_fn, random_batch())
    finally:
        embedding.requires_grad_(False)


def test_unknown_target_is_rejected():
    model, params, logits_fn = _bert()
    with pytest.raises(ValueError, match="adapters"):
        difficulty_scores(model, params, logits_fn, random_batch(), wrt="gradients")


def test_fisher_accumulated_during_training_equals_per_sample_fisher():
    """Hooks on ordinary (mean-loss) training backward passes give mean_i g_i², as the batched
    per-sample computation does, before the optimizer step changes anything."""
    from fibecfed.fisher import FisherAccumulator

    model = tiny_bert()
    params = trainable_parameters(model)
    with torch.no_grad():
        for key, p in params.items():
            if "lora_B" in key:
                p.normal_(0, 0.1)
    subset = {k: p for k, p in params.items() if ".layer.1." in k}
    batches = [random_batch(seed=s) for s in range(2)]

    def logits_fn(batch):
        return class_logits(model, batch, "classifier")

    model.eval()
    expected = {}
    for batch in batches:
        grads = per_sample_gradients(model, subset, logits_fn, batch)
        for key, g in grads.items():
            expected[key] = expected.get(key, 0) + g.pow(2).sum(dim=0)
    with FisherAccumulator(model, subset) as acc:
        for batch in batches:
            loss = torch.nn.functional.cross_entropy(logits_fn(batch), batch["labels"])
            model.zero_grad()
            loss.backward()
            acc.count(batch["labels"].shape[0])
    got = acc.fisher()
    for key in subset:
        torch.testing.assert_close(got[key], expected[key] / 8, rtol=1e-4, atol=1e-8)
    assert all(not m._forward_hooks for m in model.modules())
    # Collected on every other step only (method.sparse.fisher_every=2): the first batch's alone.
    first = {key: g.pow(2).sum(dim=0) for key, g in per_sample_gradients(model, subset, logits_fn, batches[0]).items()}
    with FisherAccumulator(model, subset) as acc:
        for step, batch in enumerate(batches):
            acc.enabled = step % 2 == 0
            if acc.enabled:
                acc.count(batch["labels"].shape[0])
            loss = torch.nn.functional.cross_entropy(logits_fn(batch), batch["labels"])
            model.zero_grad()
            loss.backward()
    for key in subset:
        torch.testing.assert_close(acc.fisher()[key], first[key] / 4, rtol=1e-4, atol=1e-8)


def test_head_fisher_trace_by_hand():
    from fibecfed.fisher import head_fisher_trace

    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = (1/2, 1/2) and (3/4, 1/4)
    features = torch.tensor([[1.0, 2.0], [0.0, 3.0]])  # ||h||² = 5 and 9
    labels = torch.tensor([0, 0])
    # ||p - e_y||²: (1/4 + 1/4) = 1/2 and (1/16 + 1/16) = 1/8
    expected_bias = torch.tensor([0.5 * 6.0, 0.125 * 10.0])
    expected_plain = torch.tensor([0.5 * 5.0, 0.125 * 9.0])
    assert torch.allclose(head_fisher_trace(logits, features, labels, True), expected_bias)
    assert torch.allclose(head_fisher_trace(logits, features, labels, False), expected_plain)


def test_head_score_equals_the_classifier_heads_fisher_trace_by_autograd():
    model = tiny_bert()
    model.eval()
    batch = random_batch()
    params = trainable_parameters(model)
    head = {k: p for k, p in params.items() if not is_lora_key(k)}  # classifier weight and bias
    assert set(head) == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    logits_fn = lambda b: class_logits(model, b, "classifier")  # noqa: E731
    reference = sum(g.flatten(1).pow(2).sum(1) for g in per_sample_gradients_reference(head, logits_fn, batch).values())
    from fibecfed.heads import class_logits_and_features

    head_fn = lambda b: class_logits_and_features(model, b, "classifier")  # noqa: E731
    scores = difficulty_scores(model, params, logits_fn, batch, wrt="head", head_fn=head_fn)
    assert torch.allclose(scores, reference, rtol=1e-4, atol=1e-7)
    # The class scores alone ("logits") miss the factor ||h||² + 1.
    logit_only = difficulty_scores(model, params, logits_fn, batch, wrt="logits")
    assert not torch.allclose(logit_only, reference, rtol=1e-2)


@pytest.mark.parametrize("head", ["verbalizer", "classifier"])
def test_head_score_matches_autograd_on_a_decoder(head):
    """The verbalizer's head is the label words' rows of the LM head (no bias); Llama's
    classification `score` runs on every token and pools the last real one."""
    from fibecfed.heads import class_logits_and_features

    if head == "verbalizer":
        model = tiny_llama()
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForSequenceClassification

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64,
                             pad_token_id=0, num_labels=3)
        model = get_peft_model(LlamaForSequenceClassification(config),
                               LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.eval()
    batch = random_batch()
    batch["input_ids"][batch["attention_mask"] == 0] = 0  # right padding with the pad token
    out = class_logits_and_features(model, batch, head, LABEL_WORDS)
    assert torch.allclose(out.logits, class_logits(model, batch, head, LABEL_WORDS))
    # Autograd: the per-sample gradient of each sample's loss w.r.t. a trainable copy of the
    # head's weight (and bias), evaluated on the features the function reports.
    if head == "verbalizer":
        weight = model.get_base_model().get_output_embeddings().weight[LABEL_WORDS].detach().clone()
        bias = None
    else:
        score = model.base_model.model.score
        if hasattr(score, "modules_to_save"):  # peft's wrapper around a trained head
            score = score.modules_to_save["default"]
        weight, bias = score.weight.detach().clone(), None if score.bias is None else score.bias.detach().clone()
    assert out.has_bias == (bias is not None)
    expected = []
    for i in range(batch["labels"].shape[0]):
        w = weight.clone().requires_grad_(True)
        z = out.features[i].detach() @ w.T
        loss = F.cross_entropy(z[None], batch["labels"][i : i + 1])
        (g,) = torch.autograd.grad(loss, [w])
        expected.append(g.pow(2).sum())
        # The features really are what the head saw: the same logits.
        assert torch.allclose(z, out.logits[i], atol=1e-5)
    from fibecfed.fisher import head_fisher_trace

    got = head_fisher_trace(out.logits, out.features, batch["labels"], out.has_bias)
    assert torch.allclose(got, torch.stack(expected), rtol=1e-4, atol=1e-7)


def test_training_pass_score_undoes_the_heads_dropout():
    """The online refresh scores a sample from its training forward pass. With the classifier's
    dropout (p = 0.5 here, the body's dropouts off) the head's input is h·mask/(1 - p): the
    undropped view must give exactly the eval-mode logits and features, while the dropped view
    differs (zeros, and the kept units doubled)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from fibecfed.fisher import head_fisher_trace
    from fibecfed.heads import class_logits_and_features

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.5,
    )
    lora = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    model = get_peft_model(BertForSequenceClassification(config), lora)
    batch = random_batch()
    model.eval()
    with torch.no_grad():
        reference = class_logits_and_features(model, batch, "classifier")
    assert reference.undropped_features is None  # eval mode: nothing to undo
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        out = class_logits_and_features(model, batch, "classifier")
    assert not torch.allclose(out.features, reference.features)
    assert bool((out.features == 0).any())
    logits, features = out.for_scores()
    assert torch.allclose(features, reference.features, atol=1e-6)
    assert torch.allclose(logits, reference.logits, atol=1e-6)
    labels = batch["labels"]
    assert torch.allclose(
        head_fisher_trace(logits, features, labels, out.has_bias),
        head_fisher_trace(reference.logits, reference.features, labels, reference.has_bias),
        atol=1e-6,
    )
