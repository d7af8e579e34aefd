"""Tokenising a dataset once, and padding index batches of it into model inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fibecfed.data.types import TextDataset


@dataclass(frozen=True)
class EncodedDataset:
    """Token ids per sample (unpadded) and the labels, shape (N,)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)


def format_prompt(template: str, text: str, text_pair: str | None) -> str:
    """Fill a verbalizer prompt; `{text}` and `{text_pair}` are the only placeholders."""
    return template.replace("{text}", text).replace("{text_pair}", text_pair or "")


def encode_dataset(
    dataset: TextDataset, tokenizer: Any, max_length: int, prompt_template: str | None = None
) -> EncodedDataset:
    """Tokenise every sample once (truncated to `max_length`), without padding.

    With a prompt template (verbalizer head), text and pair are put into the prompt and encoded
    as one sequence; otherwise a pair is encoded as the tokenizer's sentence pair.
    """
    if prompt_template is not None:
        pairs = dataset.text_pairs or [None] * len(dataset)
        prompts = [format_prompt(prompt_template, t, p) for t, p in zip(dataset.texts, pairs)]
        enc = tokenizer(prompts, truncation=True, max_length=max_length)
    elif dataset.text_pairs is not None:
        enc = tokenizer(dataset.texts, dataset.text_pairs, truncation=True, max_length=max_length)
    else:
        enc = tokenizer(dataset.texts, truncation=True, max_length=max_length)
    return EncodedDataset(
        input_ids=list(enc["input_ids"]),
        token_type_ids=list(enc["token_type_ids"]) if "token_type_ids" in enc else None,
        labels=torch.tensor(dataset.labels, dtype=torch.long),
    )


def collate(
    encoded: EncodedDataset, indices: Sequence[int], pad_token_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Right-pad the samples at `indices` to the longest of them.

    Returns input_ids and attention_mask of shape (B, L_max), token_type_ids if the model uses
    them, and labels of shape (B,).
    """
    rows = [encoded.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        input_ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[j, : len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if encoded.token_type_ids is not None:
        token_types = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(indices):
            row = encoded.token_type_ids[i]
            token_types[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        batch["token_type_ids"] = token_types
    batch["labels"] = encoded.labels[list(indices)]
    return {k: v.to(device) for k, v in batch.items()}
