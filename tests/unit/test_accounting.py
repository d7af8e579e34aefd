import pytest
import torch
from safetensors.torch import load

from fibecfed.accounting import serialize_state, serialized_nbytes, simulated_round_seconds, transfer_seconds


def test_serialized_size_is_payload_plus_header():
    state = {"a": torch.zeros(10, 4), "b": torch.zeros(3)}
    blob = serialize_state(state)
    # safetensors: 8-byte header length, a JSON header, then the raw float32 data (43 * 4 bytes).
    header_len = int.from_bytes(blob[:8], "little")
    assert len(blob) == 8 + header_len + 43 * 4
    assert serialized_nbytes(state) == len(blob)
    assert torch.equal(load(blob)["a"], state["a"])


def test_empty_state_sends_nothing():
    assert serialized_nbytes({}) == 0


def test_fewer_keys_fewer_bytes():
    full = {f"k{i}": torch.zeros(100) for i in range(4)}
    half = {k: full[k] for k in ["k0", "k1"]}
    assert serialized_nbytes(half) < serialized_nbytes(full) * 0.55


def test_transfer_time():
    # 10 Mbit/s: 1,250,000 bytes take 1 s.
    assert transfer_seconds(1_250_000, 10.0) == pytest.approx(1.0)


def test_round_time_is_slowest_device():
    # device 0: 1 + 2 + 1 = 4 s; device 1: 0.5 + 5 + 0.5 = 6 s.
    seconds = simulated_round_seconds([2.0, 5.0], [1_250_000, 625_000], [1_250_000, 625_000], 10.0)
    assert seconds == pytest.approx(6.0)
    assert simulated_round_seconds([], [], [], 10.0) == 0.0


def test_compute_clock_process_ignores_waiting_and_auto_follows_device():
    import time

    from fibecfed.accounting import compute_clock

    process = compute_clock("auto", torch.device("cpu"))
    wall = compute_clock("auto", torch.device("cuda"))
    assert process is time.process_time and wall is time.perf_counter
    # A sleep is time another program could have the core for: wall time counts it, CPU time not.
    p0, w0 = process(), wall()
    time.sleep(0.3)
    assert wall() - w0 >= 0.3
    assert process() - p0 < 0.1
    with pytest.raises(ValueError, match="unknown compute clock"):
        compute_clock("gpu", torch.device("cpu"))
