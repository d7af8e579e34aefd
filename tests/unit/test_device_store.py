"""DeviceStore semantics (checkout / stage / discard / commit, the LRU bound, streaming) and the
Fisher kept as row and column sums (masks.fisher_sums): the same masks as the full diagonal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fibecfed.device_store import DeviceStore, state_from_payload, state_to_payload
from fibecfed.federated import DeviceState, SparseSettings, masks_from_fisher
from fibecfed.masks import COLUMNS, fisher_sums, neuron_importance, neuron_masks, rank_importance, update_fisher_momentum


def state(value: float, participations: int = 1) -> DeviceState:
    return DeviceState(personal={"w": torch.full((2, 3), value)}, participations=participations, extra={"scores": torch.tensor([value])})


def test_checkout_of_an_unknown_device_is_fresh(tmp_path):
    store = DeviceStore(tmp_path, cache_size=2)
    assert store.checkout(7) == DeviceState() and store.devices() == []


def test_stage_commit_and_discard(tmp_path):
    store = DeviceStore(tmp_path, cache_size=2)
    store.stage(0, state(1.0))
    store.stage(1, state(2.0))
    # Staged states are visible before commit, but no file exists yet (the checkpoint comes first).
    assert store.devices() == [0, 1] and not list(tmp_path.glob("*.pt"))
    assert torch.equal(store.checkout(0).personal["w"], torch.full((2, 3), 1.0))
    store.discard(1)  # a rejected update: device 1 keeps what it had (nothing)
    assert store.devices() == [0]
    written = store.commit()
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["0.pt"]
    assert written == (tmp_path / "0.pt").stat().st_size
    assert store.staged() == {} and store.commit() == 0

    # A working copy: changing it leaves the stored state alone; discarding a staged one restores it.
    working = store.checkout(0)
    working.personal["w"] += 5.0
    working.participations += 1
    store.stage(0, working)
    store.discard(0)
    again = store.checkout(0)
    assert again.participations == 1 and torch.equal(again.personal["w"], torch.full((2, 3), 1.0))


def test_a_new_store_reads_committed_files(tmp_path):
    store = DeviceStore(tmp_path, cache_size=1)
    for device in range(3):
        store.stage(device, state(float(device), participations=device + 1))
    store.commit()
    reopened = DeviceStore(tmp_path, cache_size=1)
    assert reopened.devices() == [0, 1, 2]
    assert reopened.checkout(2).participations == 3
    assert torch.equal(reopened.checkout(1).extra["scores"], torch.tensor([1.0]))


def test_the_cache_holds_at_most_cache_size_states(tmp_path):
    store = DeviceStore(tmp_path, cache_size=2)
    for device in range(5):
        store.stage(device, state(float(device)))
    store.commit()
    assert store.cached == 2  # the last two committed: 3 and 4
    store.checkout(0)
    store.checkout(1)
    assert store.cached == 2 and list(store._cache) == [0, 1]  # least recently used out first
    store.checkout(0)
    store.checkout(2)
    assert list(store._cache) == [0, 2]
    # Streaming every state neither fills the cache nor changes it.
    seen = [(d, float(s.personal["w"][0, 0])) for d, s in store.states()]
    assert seen == [(d, float(d)) for d in range(5)]
    assert list(store._cache) == [0, 2]
    assert DeviceStore(tmp_path, cache_size=0).checkout(4).participations == 1


def test_states_stream_staged_over_committed(tmp_path):
    store = DeviceStore(tmp_path, cache_size=0)
    store.stage(0, state(1.0))
    store.commit()
    store.stage(0, state(9.0))
    store.stage(3, state(3.0))
    stream = store.states()
    assert not isinstance(stream, (list, dict))  # a generator: one state at a time
    assert [(d, float(s.personal["w"][0, 0])) for d, s in stream] == [(0, 9.0), (3, 3.0)]


def test_restore_writes_the_checkpoints_states(tmp_path):
    store = DeviceStore(tmp_path, cache_size=4)
    store.stage(0, state(1.0))
    store.commit()
    # A kill after the checkpoint of the next round, before its device files: resume re-applies it.
    resumed = DeviceStore(tmp_path, cache_size=4)
    resumed.restore({0: state(2.0, participations=2), 5: state(5.0)})
    assert resumed.staged() == {}
    files = DeviceStore(tmp_path, cache_size=0)
    assert files.devices() == [0, 5] and files.checkout(0).participations == 2


def test_payload_round_trip_does_not_copy(tmp_path):
    s = state(4.0)
    payload = state_to_payload(s)
    assert payload["personal"]["w"] is s.personal["w"]
    back = state_from_payload(payload)
    assert back == s
    old = state_from_payload(dataclasses.asdict(s))  # format-1 checkpoints hold asdict()
    assert old.participations == 1 and torch.equal(old.personal["w"], s.personal["w"])
    assert torch.equal(old.extra["scores"], s.extra["scores"])


def lora_fisher(seed: int, rank: int = 8, hidden: int = 64, layers: int = 3) -> dict[str, torch.Tensor]:
    """A random diagonal Fisher of LoRA query/value pairs: lora_A (r, in), lora_B (out, r)."""
    g = torch.Generator().manual_seed(seed)
    fisher = {}
    for layer in range(layers):
        for module in ("query", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
            fisher[f"{prefix}.lora_A.weight"] = torch.rand(rank, hidden, generator=g)
            fisher[f"{prefix}.lora_B.weight"] = torch.rand(hidden, rank, generator=g)
    return fisher


def test_fisher_sums_by_hand():
    fisher = {
        "x.lora_A.weight": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),  # (r=2, in=3)
        "x.lora_B.weight": torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.5, 0.5]]),  # (out=3, r=2)
        "head.bias": torch.tensor([0.25, 0.75]),
    }
    sums = fisher_sums(fisher)
    assert set(sums) == {"x.lora_A.weight", "x.lora_B.weight", "x.lora_B.weight" + COLUMNS, "head.bias"}
    assert torch.equal(sums["x.lora_A.weight"], torch.tensor([6.0, 15.0]))
    assert torch.equal(sums["x.lora_B.weight"], torch.tensor([1.0, 3.0, 1.0]))
    assert torch.equal(sums["x.lora_B.weight" + COLUMNS], torch.tensor([3.5, 1.5]))
    assert torch.equal(sums["head.bias"], fisher["head.bias"])
    # Idempotent: sums pass through (old and new states go through the same conversion).
    again = fisher_sums(sums)
    assert set(again) == set(sums) and all(torch.equal(again[k], v) for k, v in sums.items())


@pytest.mark.parametrize("lora_a_importance", ["rank", "rows"])
@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_masks_from_sums_equal_masks_from_the_full_diagonal(lora_a_importance, share):
    settings = SparseSettings(share=share, lora_a_importance=lora_a_importance)
    for seed in range(5):
        full = lora_fisher(seed)
        shapes = {k: v.shape for k, v in full.items()}
        # The old path, written out: row sums, plus lora_B's column sums for lora_A (rank).
        importance = neuron_importance(full)
        if lora_a_importance == "rank":
            importance = rank_importance(full, importance)
        old = neuron_masks(importance, shapes, share)
        new = masks_from_fisher(fisher_sums(full), shapes, settings)
        assert set(old) == set(new)
        for key in old:
            assert torch.equal(old[key], new[key]), key


def test_momentum_of_sums_gives_the_same_masks_over_rounds():
    """Old: F_t = γ F_{t-1} + (1-γ) F~_t on the full diagonal, then sums. New: the same momentum
    on the sums. Equal up to float rounding (sums and momentum commute in exact arithmetic); the
    masks are identical."""
    gamma, share = 0.9, 0.25
    settings = SparseSettings(share=share, gamma=gamma)
    full_momentum, sums_momentum = None, None
    for round_num in range(6):
        now = lora_fisher(100 + round_num)
        full_momentum = update_fisher_momentum(full_momentum, now, gamma)
        sums_momentum = update_fisher_momentum(sums_momentum, fisher_sums(now), gamma)
        reference = fisher_sums(full_momentum)
        assert set(reference) == set(sums_momentum)
        for key, value in reference.items():
            torch.testing.assert_close(sums_momentum[key], value, rtol=1e-6, atol=0)
        shapes = {k: v.shape for k, v in now.items()}
        old = masks_from_fisher(full_momentum, shapes, settings)
        new = masks_from_fisher(sums_momentum, shapes, settings)
        for key in old:
            assert torch.equal(old[key], new[key]), (round_num, key)


def test_sums_are_about_16x_smaller_for_minilm_shapes():
    # MiniLM: hidden 384, LoRA r=8 on query and value of 12 layers.
    full = lora_fisher(0, rank=8, hidden=384, layers=12)
    sums = fisher_sums(full)
    numbers = lambda d: sum(v.numel() for v in d.values())  # noqa: E731
    # Per pair: A 8·384 + B 384·8 = 6144 numbers; sums: 8 + 384 + 8 = 400, 15.4x fewer.
    assert numbers(full) == 24 * 6144 and numbers(sums) == 24 * 400
    assert numbers(full) / numbers(sums) == pytest.approx(15.36)


def test_an_old_full_diagonal_state_converts_on_load(tmp_path):
    full = lora_fisher(3)
    old = DeviceState(personal={}, participations=2, extra={"fisher": full})
    torch.save(dataclasses.asdict(old), tmp_path / "4.pt")  # a device file or format-1 entry of an older fibecfed
    loaded = DeviceStore(tmp_path, cache_size=1).checkout(4)
    expected = fisher_sums(full)
    assert set(loaded.extra["fisher"]) == set(expected)
    assert all(torch.equal(loaded.extra["fisher"][k], v) for k, v in expected.items())
    assert all(v.dim() == 1 for v in loaded.extra["fisher"].values())
