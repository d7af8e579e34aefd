"""bench/consolidate.py: the weighted mean of the devices' personal entries over the global state, by hand."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import consolidate  # noqa: E402


def test_personal_keys_are_the_weighted_mean_of_their_holders():
    # "agg" is aggregated (no device holds it): it keeps the server's value. "p" is personal on
    # devices 0 (30 samples) and 1 (10 samples): (1*30 + 5*10) / 40 = 2.0 and (2*30 + 6*10) / 40
    # = 3.0. "q" is held by device 1 alone: its value, whatever its weight.
    global_state = {"agg": torch.tensor([7.0]), "p": torch.zeros(2), "q": torch.zeros(1)}
    personal = {
        0: {"p": torch.tensor([1.0, 2.0])},
        1: {"p": torch.tensor([5.0, 6.0]), "q": torch.tensor([4.0])},
    }
    merged = consolidate.consolidate(global_state, personal, {0: 30.0, 1: 10.0})
    assert torch.equal(merged["agg"], torch.tensor([7.0]))
    assert torch.allclose(merged["p"], torch.tensor([2.0, 3.0]))
    assert torch.equal(merged["q"], torch.tensor([4.0]))
    assert torch.equal(global_state["p"], torch.zeros(2))  # the input is not changed


def test_a_device_with_no_weight_is_left_out():
    merged = consolidate.consolidate(
        {"p": torch.zeros(1)}, {0: {"p": torch.tensor([1.0])}, 1: {"p": torch.tensor([9.0])}}, {0: 1.0, 1: 0.0}
    )
    assert torch.equal(merged["p"], torch.tensor([1.0]))
