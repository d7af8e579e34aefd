"""Layer sensitivity, layer-selection policies and the GAL key filter (method.md, Part 2)."""

import numpy as np
import pytest
import torch

from fibecfed.adapters import layer_of_key, trainable_parameters
from fibecfed.layers import (
    SELECTION_POLICIES,
    _layer_hidden_states,
    aggregation_keys,
    combine_layer_scores,
    hidden_state_sizes,
    layer_sensitivity,
    local_keys,
    register_policy,
    select_aggregation_layers,
    transformer_layers,
)
from tests.conftest import random_batch, tiny_bert, tiny_llama


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sharpened_llama(layer: int, layers: int = 4):
    """tiny_llama whose layer `layer` amplifies perturbations of its input, by construction.

    Llama blocks are pre-norm residual: h_out = h + o_proj(attention(norm(h))) + mlp(...). Scaling
    q_proj and k_proj by 30 sharpens the attention softmax, so a small change of the input moves
    the attention weights a lot; scaling o_proj by 10 makes that branch dominate the residual
    stream. (BERT's post-LayerNorm blocks renormalise the output, which cancels plain weight
    scaling, so the pre-norm model is the cleaner construction.)
    """
    model = tiny_llama(layers=layers)
    attention = transformer_layers(model)[layer].self_attn
    with torch.no_grad():
        attention.q_proj.base_layer.weight.mul_(30.0)
        attention.k_proj.weight.mul_(30.0)
        attention.o_proj.weight.mul_(10.0)
    return model


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_transformer_layers_finds_the_blocks(build):
    model = build(layers=4)
    blocks = transformer_layers(model)
    assert len(blocks) == 4
    expected = "BertLayer" if build is tiny_bert else "LlamaDecoderLayer"
    assert all(type(b).__name__ == expected for b in blocks)
    # Block l is the module whose LoRA keys layer_of_key maps to l.
    names = {id(m): n for n, m in model.named_modules()}
    assert layer_of_key(names[id(blocks[2])] + ".x") == 2


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_hooked_hidden_states_are_layer_outputs(build):
    """What transformers 5.24 returns: hidden_states[l+1] is layer l's output, except that the last
    entry is `last_hidden_state`, which for Llama has passed the final RMSNorm."""
    model = build(layers=4).eval()
    batch = random_batch()
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        hooked = _layer_hidden_states(model, transformer_layers(model), embeds, batch["attention_mask"])
        reference = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert len(hooked) == len(reference.hidden_states) == 5
    for j in range(4):
        assert torch.allclose(hooked[j], reference.hidden_states[j])
    if build is tiny_bert:
        assert torch.allclose(hooked[4], reference.hidden_states[4])
    else:
        final_norm = model.get_base_model().model.norm
        assert not torch.allclose(hooked[4], reference.hidden_states[4])
        assert torch.allclose(final_norm(hooked[4]), reference.hidden_states[4])


def test_a_sentence_pair_keeps_its_segments_in_the_probe():
    # BERT embeds token types: the probe must see the second sentence as the model does in
    # training (type 1), not as the first (the default when token_type_ids are left out).
    model = tiny_bert(layers=4).eval()
    batch = random_batch()
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    batch["token_type_ids"][:, 3:] = 1
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        hooked = _layer_hidden_states(model, transformer_layers(model), embeds, batch["attention_mask"], batch["token_type_ids"])
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"], output_hidden_states=True)
        single = _layer_hidden_states(model, transformer_layers(model), embeds, batch["attention_mask"])
    assert all(torch.allclose(h, r) for h, r in zip(hooked, reference.hidden_states))
    assert not torch.allclose(single[0], reference.hidden_states[0])
    pair = layer_sensitivity(model, batch, generator=torch.Generator().manual_seed(0))
    without = layer_sensitivity(model, {k: v for k, v in batch.items() if k != "token_type_ids"}, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(pair, without)


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_gain_ranks_the_amplifying_layer_first(layer):
    scores = layer_sensitivity(sharpened_llama(layer), random_batch(8, 10), generator=seeded(), measure="gain")
    assert scores.shape == (4,)
    assert int(scores.argmax()) == layer
    others = torch.cat([scores[:layer], scores[layer + 1 :]])
    assert scores[layer] > 2.0 * others.max()  # an unmodified layer passes a perturbation on at gain ~1


def test_output_change_is_cumulative():
    """output_change jumps at the sensitive layer, but every later layer inherits the change through
    the residual stream, so it ranks the sensitive layer first only when that layer is the last."""
    batch = random_batch(8, 10)
    scores = layer_sensitivity(sharpened_llama(1), batch, generator=seeded(), measure="output_change")
    assert scores[1:].min() > 1.5 * scores[0]
    last = layer_sensitivity(sharpened_llama(3), batch, generator=seeded(), measure="output_change")
    assert int(last.argmax()) == 3
    assert last[3] > 1.3 * last[:3].max()


class _AffineBlock(torch.nn.Module):
    """h -> scale · h + shift: a block whose effect on a perturbation is known exactly."""

    def __init__(self, scale: float, shift: torch.Tensor):
        super().__init__()
        self.inner = torch.nn.Identity()  # a block has submodules (transformer_layers looks for them)
        self.scale, self.shift = scale, shift

    def forward(self, hidden_states, attention_mask=None):
        return (self.scale * self.inner(hidden_states) + self.shift,)


class _AffineStack(torch.nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.embed = torch.nn.Embedding(4, 3)
        self.layers = torch.nn.ModuleList(blocks)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds, attention_mask=None):
        hidden = inputs_embeds
        for block in self.layers:
            hidden = block(hidden, attention_mask)[0]
        return hidden


def test_gain_and_relative_gain_by_hand():
    """Every token's embedding is e1 (size S_0 = 1). Layer 0 multiplies by 4: the perturbation and
    the states grow alike, gain 4, relative gain 1. Layer 1 adds 3·e2: the perturbation passes
    unchanged (gain 1) while the states grow to |4e1 + 3e2| = 5, so the relative perturbation
    shrinks to 4/5: relative gain 0.8. output_change is Δ_{l+1} / S_{l+1}: 4Δ_0/4 and 4Δ_0/5."""
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    model = _AffineStack([_AffineBlock(4.0, torch.zeros(3)), _AffineBlock(1.0, 3.0 * e2)])
    embeds = e1.expand(2, 5, 3).clone()  # (B=2, T=5, H=3)
    batch = {"inputs_embeds": embeds, "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    gain = layer_sensitivity(model, batch, generator=seeded(), measure="gain")
    relative = layer_sensitivity(model, batch, generator=seeded(), measure="relative_gain")
    change = layer_sensitivity(model, batch, generator=seeded(), measure="output_change")
    assert torch.allclose(gain, torch.tensor([4.0, 1.0]), atol=1e-5)
    assert torch.allclose(relative, torch.tensor([1.0, 0.8]), atol=1e-5)
    # Δ_0 by hand: the noise layer_sensitivity draws (same generator), at 0.01 · std(E).
    noise = torch.randn(embeds.shape, generator=seeded())
    delta_0 = (0.01 * embeds.std() * noise).norm(dim=-1).mean()
    assert torch.allclose(change, torch.stack([4 * delta_0 / 4, 4 * delta_0 / 5]), rtol=1e-5)
    # The sizes themselves: |e1| = 1, |4 e1| = 4, |4 e1 + 3 e2| = 5; the padded token (id 3, a
    # different embedding) does not count.
    with torch.no_grad():
        model.embed.weight.copy_(torch.stack([e1, e1, e1, 7.0 * e2]))
    ids = torch.tensor([[0, 1, 2, 3], [2, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    sizes = hidden_state_sizes(model, {"input_ids": ids, "attention_mask": mask})
    assert torch.allclose(sizes, torch.tensor([1.0, 4.0, 5.0]), atol=1e-6)


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_relative_gain_ranks_the_amplifying_layer_first(layer):
    scores = layer_sensitivity(sharpened_llama(layer), random_batch(8, 10), generator=seeded(), measure="relative_gain")
    assert int(scores.argmax()) == layer


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
@pytest.mark.parametrize("measure", ["gain", "relative_gain", "output_change"])
def test_scores_are_reproducible_and_positive(build, measure):
    model = build(layers=4)
    batch = random_batch(8, 10)
    first = layer_sensitivity(model, batch, generator=seeded(3), measure=measure)
    again = layer_sensitivity(model, batch, generator=seeded(3), measure=measure)
    other = layer_sensitivity(model, batch, generator=seeded(4), measure=measure)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert bool(torch.isfinite(first).all()) and bool((first > 0).all())


def test_padding_tokens_do_not_count():
    model = tiny_bert(layers=4)
    batch = random_batch(4, 6)  # row 0 has two padded positions
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, -2:] = 7
    assert torch.allclose(
        layer_sensitivity(model, batch, generator=seeded()), layer_sensitivity(model, changed, generator=seeded())
    )


def test_inputs_embeds_batch_and_mode_restored():
    model = tiny_llama(layers=4)
    model.train()
    model.get_base_model().model.norm.eval()  # a mixed state must come back as it was
    batch = random_batch()
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    from_ids = layer_sensitivity(model, batch, generator=seeded())
    from_embeds = layer_sensitivity(
        model, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}, generator=seeded()
    )
    assert torch.allclose(from_ids, from_embeds)
    assert model.training and not model.get_base_model().model.norm.training


def test_unknown_measure():
    with pytest.raises(ValueError, match="gain"):
        layer_sensitivity(tiny_bert(), random_batch(), measure="loudness")


def test_combine_scores_by_data_size():
    # Two devices score their own batches; the server weights them by data size 30 and 10.
    model = tiny_bert(layers=4)
    a = layer_sensitivity(model, random_batch(seed=1), generator=seeded())
    b = layer_sensitivity(model, random_batch(seed=2), generator=seeded())
    combined = combine_layer_scores([a, b], [30, 10])
    assert torch.allclose(combined, 0.75 * a + 0.25 * b)
    hand = combine_layer_scores([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], [1, 3])
    assert torch.allclose(hand, torch.tensor([(1 + 9) / 4, (2 + 18) / 4]))


def test_combine_scores_rejects_mismatches():
    with pytest.raises(ValueError):
        combine_layer_scores([torch.ones(4)], [1, 2])
    with pytest.raises(ValueError):
        combine_layer_scores([torch.ones(4), torch.ones(3)], [1, 1])
    with pytest.raises(ValueError):
        combine_layer_scores([torch.ones(4)], [0])


SCORES = torch.tensor([0.1, 0.9, 0.5, 0.3])


def test_selection_policies_by_hand():
    assert select_aggregation_layers(SCORES, 0.5, "sensitivity") == [1, 2]
    assert select_aggregation_layers(SCORES, 0.5, "reverse") == [0, 3]
    assert select_aggregation_layers(SCORES, 0.5, "all") == [0, 1, 2, 3]
    assert select_aggregation_layers(SCORES, 0.25, "sensitivity") == [1]
    assert select_aggregation_layers(SCORES, 0.0, "sensitivity") == [1]  # at least one layer
    assert select_aggregation_layers(SCORES, 1.0, "reverse") == [0, 1, 2, 3]


def test_random_policy_is_reproducible():
    first = select_aggregation_layers(SCORES, 0.5, "random", rng=np.random.default_rng(5))
    again = select_aggregation_layers(SCORES, 0.5, "random", rng=np.random.default_rng(5))
    assert first == again == sorted(first)
    assert len(set(first)) == 2 and set(first) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="Generator"):
        select_aggregation_layers(SCORES, 0.5, "random")


def test_ties_go_to_the_lower_layer():
    tied = torch.tensor([0.5, 0.7, 0.5, 0.5])
    assert select_aggregation_layers(tied, 0.5, "sensitivity") == [0, 1]
    assert select_aggregation_layers(tied, 0.5, "reverse") == [0, 2]


def test_unknown_policy_lists_names():
    with pytest.raises(ValueError, match="sensitivity") as info:
        select_aggregation_layers(SCORES, 0.5, "loudest")
    assert "random" in str(info.value)


def test_register_policy():
    @register_policy("test_first_layers")
    def first_layers(scores, n, rng=None):
        return list(range(n))[::-1]

    try:
        assert select_aggregation_layers(SCORES, 0.75, "test_first_layers") == [0, 1, 2]
        with pytest.raises(ValueError, match="already"):
            register_policy("test_first_layers")(first_layers)
    finally:
        del SELECTION_POLICIES["test_first_layers"]


def test_aggregation_keys_of_tiny_bert():
    keys = list(trainable_parameters(tiny_bert(layers=4)))
    exchanged = aggregation_keys(keys, [1, 3])
    expected = [
        f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}.lora_{ab}.weight"
        for layer in (1, 3)
        for module in ("query", "value")
        for ab in ("A", "B")
    ] + ["base_model.model.classifier.weight", "base_model.model.classifier.bias"]
    assert sorted(exchanged) == sorted(expected)
    assert exchanged == [k for k in keys if k in expected]  # input order
    kept = local_keys(keys, [1, 3])
    assert kept == [k for k in keys if layer_of_key(k) in (0, 2)]
    assert len(kept) == 8 and not set(kept) & set(exchanged)


def test_aggregation_keys_rejects_unknown_layers():
    keys = list(trainable_parameters(tiny_bert(layers=4)))
    with pytest.raises(ValueError, match=r"\[5\]"):
        aggregation_keys(keys, [1, 5])


def test_a_probe_on_trained_adapters_changes_the_choice():
    """Defect 1 of the old default: probed in round 1, every LoRA B is zero, so the probe sees the
    bare backbone. Adapters that make layer 2 amplify perturbations (as trained ones may) move
    the most sensitive layer there; a probe of the untrained adapters cannot see that."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    # r = 16 = hidden size: an adapter can express any change of q_proj / o_proj.
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16,
                                                                target_modules=["q_proj", "k_proj", "o_proj"]))
    batch = random_batch(8, 10)
    untrained = layer_sensitivity(model, batch, generator=seeded(), measure="gain")
    before = select_aggregation_layers(untrained, 0.25, "sensitivity")
    target = 2 if before != [2] else 1
    # "Training": B·A·(alpha/r) = (c-1)·W, i.e. the adapted map is c·W (as in sharpened_llama:
    # a sharper attention softmax and a dominant attention branch in that one layer).
    attention = transformer_layers(model)[target].self_attn
    with torch.no_grad():
        for name, factor in (("q_proj", 30.0), ("k_proj", 30.0), ("o_proj", 10.0)):
            module = getattr(attention, name)
            module.lora_A["default"].weight.copy_(torch.eye(16))
            module.lora_B["default"].weight.copy_((factor - 1.0) * module.base_layer.weight)
    trained = layer_sensitivity(model, batch, generator=seeded(), measure="gain")
    after = select_aggregation_layers(trained, 0.25, "sensitivity")
    assert after == [target] and before != after
