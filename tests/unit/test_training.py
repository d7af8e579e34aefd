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


def test_batch_that_joins_two_passes_holds_no_sample_twice():
    # 10 samples in batches of 4: the third batch takes 2 from the first pass and 2 from the
    # second. Before the fix the second pass's shuffle could open with a sample still held.
    pool = list(range(10))
    for seed in range(200):
        for batch in sample_batches(pool, 4, 12, np.random.default_rng(seed)):
            assert len(set(batch)) == len(batch), (seed, batch)
    # 7 samples, batches of 3, 7 steps = 3 whole passes: every pass still covers the pool.
    batches = sample_batches(list(range(7)), 3, 7, np.random.default_rng(1))
    flat = [i for b in batches for i in b]
    assert [sorted(flat[k * 7 : (k + 1) * 7]) for k in range(3)] == [list(range(7))] * 3
    assert all(len(set(b)) == 3 for b in batches)


def test_next_pass_moves_held_samples_after_the_joining_batch():
    from fibecfed.training import _next_pass

    # Held 5 and 2 from the last pass; the batch needs 2 more. The shuffle 2,7,5,1,3 gives
    # 7 and 1 first (the first two not held), then 2,5,3 in shuffle order.
    assert _next_pass([2, 7, 5, 1, 3], [5, 2], 2) == [7, 1, 2, 5, 3]
    assert _next_pass([2, 7, 5], [], 3) == [2, 7, 5]


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


def _masked_full_backward_reference(params, loss_fn, batches, lr, weight_decay, masks):
    """The sparse update as first written: a full backward every step, gradients zeroed outside
    the masks, AdamW over every parameter, masked entries restored after each step."""
    optimizer = torch.optim.AdamW([{"params": list(params.values()), "lr": lr, "weight_decay": weight_decay}])
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(batch).backward()
        for key, mask in masks.items():
            params[key].grad.masked_fill_(~mask, 0.0)
        before = {k: params[k].detach().clone() for k in masks}
        optimizer.step()
        with torch.no_grad():
            for key, mask in masks.items():
                params[key].copy_(torch.where(mask, params[key], before[key]))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_flop_saving_update_leaves_the_same_weights_as_the_masked_full_backward(weight_decay):
    """Frozen layers (all-False masks, or frozen_keys) get no backward at all, and with no weight
    decay masked rows need no restore; the weights must come out as with the full backward."""
    batches = [random_batch(seed=s) for s in range(4)]
    layer = "base_model.model.bert.encoder.layer.{}.attention.self.{}.lora_{}.weight"
    results = []
    for use_reference in (True, False):
        model = tiny_bert()
        params = trainable_parameters(model)
        masks = {}
        for index in (0, 1):  # the two lowest layers do not train at all
            for module in ("query", "value"):
                for half in "AB":
                    key = layer.format(index, module, half)
                    masks[key] = torch.zeros_like(params[key], dtype=torch.bool)
        partial = layer.format(3, "query", "B")
        masks[partial] = torch.zeros_like(params[partial], dtype=torch.bool)
        masks[partial][[1, 5, 7]] = True  # three rows of layer 3 train
        if use_reference:
            _masked_full_backward_reference(params, _loss_fn(model), batches, 1e-2, weight_decay, masks)
        else:
            local_train(params, _loss_fn(model), batches, lr=1e-2, weight_decay=weight_decay, update_masks=masks)
        results.append(get_state(params))
    reference, saving = results
    for key in reference:
        assert torch.allclose(reference[key], saving[key], atol=1e-6), key


def test_frozen_lower_layers_get_no_backward():
    from fibecfed.layers import transformer_layers

    model = tiny_bert()
    params = trainable_parameters(model)
    needs_grad = {}
    blocks = transformer_layers(model)
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, out, i=index: needs_grad.__setitem__(i, out[0].requires_grad if isinstance(out, tuple) else out.requires_grad))
    frozen = [k for k in params if ".layer.0." in k or ".layer.1." in k]
    before = get_state(params)
    local_train(params, _loss_fn(model), [random_batch()], lr=1e-2, frozen_keys=frozen)
    # Nothing in or below layers 0 and 1 trains: their outputs are not in the autograd graph,
    # so the backward pass stops at layer 2.
    assert needs_grad == {0: False, 1: False, 2: True, 3: True}
    after = get_state(params)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(params[k].requires_grad for k in frozen)  # restored after the loop
