"""The verbalizer's class logits are the full LM head's logits at the last real token (issue 10)."""

import torch

from fibecfed.heads import class_logits
from tests.conftest import tiny_llama


def test_verbalizer_equals_lm_head_logits_at_last_real_token():
    model = tiny_llama()
    model.eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".lora_B." in key:  # non-zero adapters, so the LoRA path is part of what is compared
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    label_ids = torch.tensor([7, 42, 3])
    # Right padding with different real lengths: 5 and 3 tokens (pad id 0).
    input_ids = torch.tensor([[5, 9, 11, 13, 17], [21, 23, 29, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        ours = class_logits(model, {"input_ids": input_ids, "attention_mask": attention_mask}, "verbalizer", label_ids)
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    expected = torch.stack([full[0, 4, label_ids], full[1, 2, label_ids]])  # (B, C) at the last real tokens
    assert ours.shape == (2, 3)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # Not the padded position: the second row's last position gives other logits.
    assert not torch.allclose(ours[1], full[1, 4, label_ids])
