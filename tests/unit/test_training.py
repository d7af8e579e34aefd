import numpy as np
import pytest
import torch

from fibecfed.adapters import get_state, trainable_parameters
from fibecfed.heads import class_logits
from fibecfed.training import NonFiniteLossError, local_train, num_local_steps, sample_batches
from tests.conftest import random_batch, tiny_bert


def test_num_local_steps():
    assert num_local_steps(100, 16, 5, None) == 5
    assert num_local_steps(100, 16, None, 1.0) == 7  # ceil(100/16)
    assert num_local_steps(100, 16, None, 0.5) == 4


def test_sample_batches_cover_pool_before_repeating():
    pool = list(range(10, 20))
    batches = sample_batches(pool, 4, 5, np.random.default_rng(0))
    assert [len(b) for b in batches] == [4] * 5
    first_pass = batches[0] + batches[1] + batches[2][:2]
    assert sorted(first_pass) == pool  # each sample once before any twice
    assert all(i in pool for b in batches for i in b)
    again = sample_batches(pool, 4, 5, np.random.default_rng(0))
    assert batches == again
    assert sample_batches([3, 4], 8, 2, np.random.default_rng(0))[0] in ([3, 4], [4, 3])
    with pytest.raises(ValueError):
        sample_batches([], 4, 1, np.random.default_rng(0))


def _loss_fn(model):
    def loss(batch):
        return torch.nn.functional.cross_entropy(class_logits(model, batch, "classifier"), batch["labels"])

    return loss


def test_local_train_reduces_loss_on_fixed_batch():
    model = tiny_bert()
    params = trainable_parameters(model)
    batch = random_batch()
    before = float(_loss_fn(model)(batch))
    local_train(params, _loss_fn(model), [batch] * 30, lr=1e-2)
    after = float(_loss_fn(model)(batch))
    assert after < before


def test_mask_keeps_unmasked_entries_bit_identical():
    model = tiny_bert()
    params = trainable_parameters(model)
    before = get_state(params)
    key = "base_model.model.bert.encoder.layer.1.attention.self.query.lora_B.weight"
    frozen_key = "base_model.model.bert.encoder.layer.2.attention.self.query.lora_A.weight"
    mask = torch.zeros_like(params[key], dtype=torch.bool)
    mask[:3] = True  # only the first 3 output neurons may change
    masks = {key: mask, frozen_key: torch.zeros_like(params[frozen_key], dtype=torch.bool)}
    local_train(params, _loss_fn(model), [random_batch(seed=s) for s in range(5)], lr=1e-2, weight_decay=0.1, update_masks=masks)
    after = get_state(params)
    assert torch.equal(after[key][~mask], before[key][~mask])
    assert not torch.equal(after[key][mask], before[key][mask])
    assert torch.equal(after[frozen_key], before[frozen_key])
    # an unmasked parameter trains as usual
    other = "base_model.model.bert.encoder.layer.0.attention.self.value.lora_A.weight"
    assert not torch.equal(after[other], before[other])


def test_prox_term_keeps_weights_closer_to_anchor():
    batches = [random_batch(seed=s) for s in range(10)]
    distances = []
    for mu in (0.0, 10.0):
        model = tiny_bert()
        params = trainable_parameters(model)
        anchor = get_state(params)
        local_train(params, _loss_fn(model), batches, lr=1e-2, prox_mu=mu, prox_anchor=anchor)
        distances.append(sum(float(((params[k].detach() - anchor[k]) ** 2).sum()) for k in anchor))
    assert distances[1] < distances[0]


def test_nan_loss_raises():
    model = tiny_bert()
    params = trainable_parameters(model)

    def bad_loss(batch):
        return torch.tensor(float("nan"), requires_grad=True)

    with pytest.raises(NonFiniteLossError):
        local_train(params, bad_loss, [random_batch()], lr=1e-2)
