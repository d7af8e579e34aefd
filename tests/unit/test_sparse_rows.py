"""FibecFed's sparse local update in real rounds (method.md Part 2b): of each personal LoRA
matrix, exactly the rows its mask selects change and every other row stays bit-identical; the
layers a round freezes (method.sparse.every) do not change at all.

Tiny BERT (4 layers, LoRA r=8 on every linear) and 400 real tweets; layer 2 is aggregated, so
layers 0 and 1 lie below the lowest aggregated layer and layer 3 above it. The masks are derived
here from the device's stored Fisher by the rule itself, not by the code's mask functions.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from fibecfed.adapters import is_lora_key, layer_of_key
from fibecfed.config import load_config
from fibecfed.federated import DeviceState, device_round
from fibecfed.layers import aggregation_keys
from fibecfed.masks import base_key
from fibecfed.server import sparse_settings
from fibecfed.simulator import prepare, train_settings
from tests.conftest import tiny_run_overrides

SHARE = 0.25  # lora_A (8, in): 2 rows; lora_B (16, 8): 4 rows, (32, 8): 8 rows
STEPS = 3


def expected_rows(fisher: dict[str, torch.Tensor], key: str, share: float) -> torch.Tensor:
    """(rows,) bool: the ceil(share·rows) most important rows of `key`, ties to the lower row.

    A row's importance is the sum of its diagonal Fisher; a lora_A row j also counts the Fisher
    of lora_B's column j (rank component j of B·A, whose A row has a zero gradient while B = 0).
    The device keeps those sums (masks.fisher_sums): fisher[key] (rows,) and, of lora_B, its
    column sums fisher[key + "#columns"] (r,).
    """
    importance = fisher[key]  # (rows,)
    assert importance.dim() == 1, key
    if ".lora_A." in key:
        importance = importance + fisher[key.replace(".lora_A.", ".lora_B.") + "#columns"]
    rows = importance.shape[0]
    kept = math.ceil(share * rows)
    values = importance.tolist()
    chosen = sorted(range(rows), key=lambda i: (-values[i], i))[:kept]
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[chosen] = True
    return mask


def changed_rows(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: rows with at least one entry that is not bit-identical."""
    return (before != after).reshape(before.shape[0], -1).any(dim=1)


def assert_exactly_masked_rows_changed(before, after, fisher, keys, share):
    assert keys, "no keys to check"
    for key in keys:
        expected = expected_rows(fisher, key, share)
        assert 0 < int(expected.sum()) < expected.numel(), key  # a mask that actually selects
        assert torch.equal(changed_rows(before[key], after[key]), expected), (
            key, changed_rows(before[key], after[key]).nonzero().flatten().tolist(), expected.nonzero().flatten().tolist()
        )


@pytest.fixture(scope="module")
def setting(tiny_encoder_dir):
    config = load_config(None, tiny_run_overrides(tiny_encoder_dir) + ["method=fibecfed", f"method.sparse.share={SHARE}",
                                                                       f"train.local_steps={STEPS}"])
    prepared = prepare(config)
    # fisher_every >= the steps: only the first step collects the Fisher, so the Fisher a device
    # stores after training a layer for the first time is that first step's, the one the
    # first-participation masks come from (no extra pass before training).
    sparse = dataclasses.replace(sparse_settings(config), share=SHARE, every=2, fisher_every=STEPS, fisher_source="training")
    return config, prepared, sparse


def test_only_the_masked_rows_of_personal_lora_matrices_change(setting):
    config, prepared, sparse = setting
    runner = prepared.runner
    initial = runner.state()
    exchanged = aggregation_keys(runner.keys, [2])
    personal = [k for k in runner.keys if k not in set(exchanged)]
    below = [k for k in personal if layer_of_key(k) in (0, 1)]
    above = [k for k in personal if layer_of_key(k) == 3]
    assert below and above and all(is_lora_key(k) for k in personal)
    state = DeviceState()

    def participate(round_num):
        return device_round(
            runner, 0, round_num, config.seed, initial, state, prepared.train, prepared.train_parts[0],
            train_settings(config), exchanged_keys=exchanged, sparse=sparse,
        )

    # Round 1, the device's first: 1 % every(2) != 0, so layers 0 and 1 are frozen; layer 3 starts
    # from the global values and its masks come from the first step's Fisher.
    update = participate(1)
    assert update.steps == STEPS and not update.trained_personal
    after_1 = copy.deepcopy(state.personal)
    fisher_1 = copy.deepcopy(state.extra["fisher"])
    assert set(after_1) == set(personal)
    assert {base_key(k) for k in fisher_1} == set(above)  # the frozen layers have no Fisher yet
    for key in below:
        assert torch.equal(after_1[key], initial[key]), key
    assert_exactly_masked_rows_changed(initial, after_1, fisher_1, above, SHARE)

    # Round 2: every layer trains. Layer 3's masks come from the momentum stored in round 1;
    # layers 0 and 1 train for the first time, with masks from this round's first step.
    update = participate(2)
    assert update.trained_personal
    after_2 = copy.deepcopy(state.personal)
    fisher_2 = copy.deepcopy(state.extra["fisher"])
    assert {base_key(k) for k in fisher_2} == set(personal)
    assert_exactly_masked_rows_changed(after_1, after_2, fisher_1, above, SHARE)
    assert_exactly_masked_rows_changed(after_1, after_2, fisher_2, below, SHARE)
    # Layer 3's Fisher moved on (F_2 = γ F_1 + (1-γ) F~_2), so round 3's masks may differ.
    assert not all(torch.equal(fisher_2[k], fisher_1[k]) for k in above)
    # ... and picks other rows of some matrix: a round that took its masks from the wrong Fisher fails here.
    assert any(not torch.equal(expected_rows(fisher_1, k, SHARE), expected_rows(fisher_2, k, SHARE)) for k in above)

    # Round 3: layers 0 and 1 frozen again, bit-identical, their Fisher kept; layer 3 follows the
    # masks of the Fisher stored in round 2.
    update = participate(3)
    assert not update.trained_personal
    after_3 = copy.deepcopy(state.personal)
    for key in below:
        assert torch.equal(after_3[key], after_2[key]), key
        assert torch.equal(state.extra["fisher"][key], fisher_2[key]), key
    assert_exactly_masked_rows_changed(after_2, after_3, fisher_2, above, SHARE)

