"""The in-memory form of a text-classification task, independent of where it came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TextDataset:
    """Parallel lists, one entry per sample; `labels` index into `label_names`."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    text_pairs: list[str] | None = None
    # Value of the natural-partition column per sample (e.g. a user or a topic), if any.
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.texts)
        assert len(self.labels) == n, "labels and texts differ in length"
        assert self.text_pairs is None or len(self.text_pairs) == n
        assert self.groups is None or len(self.groups) == n

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        idx = list(indices)
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            label_names=self.label_names,
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
            groups=None if self.groups is None else [self.groups[i] for i in idx],
        )


@dataclass(frozen=True)
class TaskData:
    """A train and a test split sharing one label set, plus how to score the task."""

    name: str
    train: TextDataset
    test: TextDataset
    # The headline metric besides accuracy: "accuracy", "f1" (binary, positive = class 1) or "mcc".
    metric: str = "accuracy"

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names
