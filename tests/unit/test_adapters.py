"""Contract tests: adapter key names and key-to-layer mapping match peft's state-dict format."""

import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fibecfed.adapters import get_state, is_lora_key, layer_keys, layer_of_key, set_state, trainable_parameters
from tests.conftest import tiny_bert, tiny_llama


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_keys_match_peft_state_dict(build):
    model = build()
    params = trainable_parameters(model)
    reference = get_peft_model_state_dict(model)
    assert set(params) == set(reference)
    for key, value in reference.items():
        assert torch.equal(params[key].detach(), value)


def test_bert_key_names_and_layers():
    params = trainable_parameters(tiny_bert(layers=4))
    key = "base_model.model.bert.encoder.layer.2.attention.self.query.lora_A.weight"
    assert key in params
    assert layer_of_key(key) == 2
    assert "base_model.model.classifier.weight" in params
    assert layer_of_key("base_model.model.classifier.weight") is None
    groups = layer_keys(params)
    assert list(groups) == [0, 1, 2, 3]
    # query and value, A and B each: 4 keys per layer
    assert all(len(v) == 4 for v in groups.values())


def test_llama_layers():
    params = trainable_parameters(tiny_llama(layers=3))
    assert list(layer_keys(params)) == [0, 1, 2]
    assert layer_of_key("base_model.model.model.layers.11.self_attn.q_proj.lora_B.weight") == 11
    assert layer_of_key("base_model.model.transformer.h.5.attn.c_attn.lora_A.weight") == 5
    assert all(is_lora_key(k) for k in params)


def test_state_roundtrip_and_swap():
    a, b = tiny_bert(seed=0), tiny_bert(seed=1)
    pa, pb = trainable_parameters(a), trainable_parameters(b)
    state_b = get_state(pb)
    set_state(pa, state_b)
    for key in pa:
        assert torch.equal(pa[key].detach(), state_b[key])
    # get_state is a copy: changing the model does not change it
    with torch.no_grad():
        next(iter(pa.values())).add_(1.0)
    assert not torch.equal(next(iter(pa.values())).detach(), state_b[next(iter(pa))])


def test_state_loads_through_peft():
    a, b = tiny_bert(seed=0), tiny_bert(seed=1)
    state = get_state(trainable_parameters(a))
    set_peft_model_state_dict(b, state)
    for key, value in get_peft_model_state_dict(b).items():
        assert torch.equal(value, state[key])


def test_set_state_errors():
    params = trainable_parameters(tiny_bert())
    state = get_state(params)
    with pytest.raises(KeyError, match="lacks"):
        set_state(params, dict(list(state.items())[:2]))
    set_state(params, dict(list(state.items())[:2]), strict=False)  # subset allowed
    with pytest.raises(KeyError, match="model lacks"):
        set_state(params, {**state, "nope": torch.zeros(1)})
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        set_state(params, {key: torch.zeros(99)}, strict=False)
