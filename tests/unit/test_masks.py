"""Fisher neuron importance, its momentum and the sparse-update masks (method.md, Part 2)."""

import pytest
import torch

from fibecfed.adapters import trainable_parameters
from fibecfed.masks import neuron_importance, neuron_masks, update_fisher_momentum
from tests.conftest import tiny_bert


def test_neuron_importance_sums_rows():
    fisher = {
        "a.lora_A.weight": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),  # (r=2, in=3)
        "a.lora_B.weight": torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 0.5], [0.0, 0.0]]),  # (out=4, r=2)
        "head.bias": torch.tensor([0.5, 0.25]),
    }
    importance = neuron_importance(fisher)
    assert torch.equal(importance["a.lora_A.weight"], torch.tensor([6.0, 15.0]))
    assert torch.equal(importance["a.lora_B.weight"], torch.tensor([2.0, 2.0, 3.5, 0.0]))
    assert torch.equal(importance["head.bias"], torch.tensor([0.5, 0.25]))


def test_neuron_importance_of_real_lora_shapes():
    params = trainable_parameters(tiny_bert())
    importance = neuron_importance({k: torch.ones_like(p) for k, p in params.items()})
    a = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    b = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    assert importance[a].shape == (2,) and torch.equal(importance[a], torch.full((2,), 16.0))  # r rows of 16 inputs
    assert importance[b].shape == (16,) and torch.equal(importance[b], torch.full((16,), 2.0))  # 16 outputs of r inputs


def test_fisher_momentum_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([[4.0]])}
    b = {"w": torch.tensor([3.0, 0.0]), "v": torch.tensor([[0.0]])}
    first = update_fisher_momentum(None, a, gamma=0.9)
    assert torch.equal(first["w"], a["w"]) and first["w"] is not a["w"]  # no bias toward zero
    second = update_fisher_momentum(first, b, gamma=0.9)
    assert torch.allclose(second["w"], torch.tensor([0.9 * 1.0 + 0.1 * 3.0, 0.9 * 2.0 + 0.1 * 0.0]))
    assert torch.allclose(second["v"], torch.tensor([[0.9 * 4.0]]))


def test_fisher_momentum_new_and_dropped_keys():
    previous = {"w": torch.tensor([1.0]), "old": torch.tensor([5.0])}
    current = {"w": torch.tensor([2.0]), "new": torch.tensor([7.0])}
    updated = update_fisher_momentum(previous, current, gamma=0.5)
    assert set(updated) == {"w", "new"}
    assert torch.allclose(updated["w"], torch.tensor([1.5]))
    assert torch.equal(updated["new"], torch.tensor([7.0]))
    with pytest.raises(ValueError, match="shape"):
        update_fisher_momentum({"w": torch.ones(2)}, {"w": torch.ones(3)}, gamma=0.9)
    with pytest.raises(ValueError, match="gamma"):
        update_fisher_momentum(None, current, gamma=1.5)


def test_neuron_masks_top_rows_by_hand():
    masks = neuron_masks({"w": torch.tensor([3.0, 1.0, 2.0])}, {"w": torch.Size([3, 4])}, share=0.34)
    # ceil(0.34 * 3) = ceil(1.02) = 2 rows: the two most important, rows 0 and 2, whole rows.
    expected = torch.tensor([[True] * 4, [False] * 4, [True] * 4])
    assert masks["w"].dtype == torch.bool
    assert torch.equal(masks["w"], expected)


def test_neuron_masks_extremes_ties_and_minimum():
    importance = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([0.0, 2.0])}
    shapes = {"w": torch.Size([4, 2]), "b": torch.Size([2])}
    assert all(bool(m.all()) for m in neuron_masks(importance, shapes, share=1.0).values())
    assert not any(bool(m.any()) for m in neuron_masks(importance, shapes, share=0.0).values())
    small = neuron_masks(importance, shapes, share=0.1)  # ceil(0.4) = 1 row, and at least one
    assert torch.equal(small["w"][:, 0], torch.tensor([True, False, False, False]))  # tie: lower row
    assert torch.equal(small["b"], torch.tensor([False, True]))
    half = neuron_masks(importance, shapes, share=0.5)
    assert torch.equal(half["w"][:, 1], torch.tensor([True, True, False, False]))


def test_neuron_masks_float_share_is_exact():
    masks = neuron_masks({"w": torch.arange(10.0)}, {"w": torch.Size([10, 1])}, share=0.7)
    assert int(masks["w"].sum()) == 7  # 0.7 * 10 = 7.000000000000001 in floats


def test_neuron_masks_fit_local_train_format():
    params = trainable_parameters(tiny_bert())
    lora = {k: p for k, p in params.items() if "lora_" in k}
    fisher = {k: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) for k, p in lora.items()}
    masks = neuron_masks(neuron_importance(fisher), {k: p.shape for k, p in lora.items()}, share=0.25)
    for key, mask in masks.items():
        assert mask.shape == lora[key].shape and mask.dtype == torch.bool
        rows_on = mask.all(dim=1)
        assert torch.equal(mask.any(dim=1), rows_on)  # whole rows
        assert int(rows_on.sum()) == max(1, -(-lora[key].shape[0] // 4))


def test_neuron_masks_rejects_mismatches():
    with pytest.raises(KeyError):
        neuron_masks({"w": torch.ones(2)}, {"v": torch.Size([2, 2])}, share=0.5)
    with pytest.raises(ValueError, match="shape"):
        neuron_masks({"w": torch.ones(3)}, {"w": torch.Size([2, 2])}, share=0.5)
    with pytest.raises(ValueError, match="share"):
        neuron_masks({"w": torch.ones(2)}, {"w": torch.Size([2, 2])}, share=1.5)


def test_rank_importance_by_hand():
    from fibecfed.masks import rank_importance

    fisher = {
        "a.lora_A.weight": torch.zeros(2, 3),  # B = 0: A's own gradient is exactly zero
        "a.lora_B.weight": torch.tensor([[1.0, 4.0], [0.0, 2.0], [3.0, 0.5]]),  # column sums 4.0, 6.5
        "b.lora_A.weight": torch.tensor([[1.0, 1.0], [0.0, 0.0]]),  # no partner in the Fisher
    }
    importance = rank_importance(fisher, neuron_importance(fisher))
    assert torch.equal(importance["a.lora_A.weight"], torch.tensor([4.0, 6.5]))
    assert torch.equal(importance["a.lora_B.weight"], torch.tensor([5.0, 2.0, 3.5]))  # B rows unchanged
    assert torch.equal(importance["b.lora_A.weight"], torch.tensor([2.0, 0.0]))


def test_first_lora_a_mask_is_informative_not_row_zero():
    """At a first participation B = 0, so A's Fisher is all zeros and ranking A's own rows keeps
    row 0 by tie-break; the rank component's importance picks by B's columns instead."""
    from fibecfed.federated import SparseSettings, masks_from_fisher
    from fibecfed.fisher import FisherAccumulator
    from fibecfed.heads import class_logits
    from tests.conftest import random_batch

    torch.manual_seed(0)
    model = tiny_bert()
    params = trainable_parameters(model)
    lora = {k: p for k, p in params.items() if ".lora_" in k}
    assert all(float(p.abs().sum()) == 0 for k, p in lora.items() if ".lora_B." in k)  # peft's B = 0
    batch = random_batch(batch_size=8)
    with FisherAccumulator(model, lora) as acc:
        loss = torch.nn.functional.cross_entropy(class_logits(model, batch, "classifier"), batch["labels"])
        loss.backward()
    acc.samples = 8
    fisher = acc.fisher()
    a_keys = [k for k in lora if ".lora_A." in k]
    assert all(float(fisher[k].abs().sum()) == 0 for k in a_keys)
    shapes = {k: p.shape for k, p in lora.items()}
    share = 0.5  # 1 of r = 2 rows
    by_rows = masks_from_fisher(fisher, shapes, SparseSettings(share=share, lora_a_importance="rows"))
    by_rank = masks_from_fisher(fisher, shapes, SparseSettings(share=share, lora_a_importance="rank"))
    assert all(bool(by_rows[k][0].all()) and not bool(by_rows[k][1].any()) for k in a_keys)  # the tie-break
    chosen = []
    for key in a_keys:
        b_columns = fisher[key.replace("lora_A", "lora_B")].sum(dim=0)  # (r,)
        row = int(torch.argmax(by_rank[key][:, 0].int()))
        assert row == int(torch.argmax(b_columns)), key
        chosen.append(row)
    assert 1 in chosen  # not row 0 everywhere
