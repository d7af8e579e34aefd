"""Checks that refuse a run's bad input before the run touches its folder or loads a model.

`preflight(config)` reads the data, partitions it and inspects the model folder (its config only,
built on the meta device), and raises the first ConfigError, DataError or ModelError a run would
hit. The CLI calls it before anything is written, so a refused run leaves a previous run's
checkpoint and outputs exactly as they were, and no half-written config.json misleads anyone.
"""

from __future__ import annotations

import logging

from fibecfed.config import RunConfig
from fibecfed.data.loaders import load_task
from fibecfed.data.partition import partition_task
from fibecfed.errors import ConfigError
from fibecfed.models import check_model

logger = logging.getLogger(__name__)


def check_devices_per_round(devices_per_round: int, num_devices: int) -> None:
    """The natural partition sets the device count from the data, so the config check cannot."""
    if devices_per_round > num_devices:
        raise ConfigError(
            f"federation.devices_per_round ({devices_per_round}) exceeds the {num_devices} devices "
            "of the partition"
        )


def check_label_words(label_words: list[str] | None, label_names: list[str]) -> None:
    if label_words is not None and len(label_words) != len(label_names):
        raise ConfigError(
            f"model.label_words has {len(label_words)} words but the task has {len(label_names)} "
            f"labels ({', '.join(label_names)})"
        )


# The verbalizer prompts when model.prompt_template is not set.
SINGLE_PROMPT = "{text}\nAnswer:"
PAIR_PROMPT = "{text}\n{text_pair}\nAnswer:"


def prompt_template(configured: str | None, has_pairs: bool) -> str:
    """The verbalizer prompt; a sentence-pair task must show the model both sentences."""
    if configured is None:
        return PAIR_PROMPT if has_pairs else SINGLE_PROMPT
    if has_pairs and "{text_pair}" not in configured:
        raise ConfigError("this task has sentence pairs: model.prompt_template must contain {text_pair} as well as {text}")
    if "{text}" not in configured:
        raise ConfigError("model.prompt_template must contain {text}")
    return configured


def preflight(config: RunConfig) -> None:
    """Raise what `config` would fail with, before any training. Data first (cheap, and the
    commonest mistake), then the model folder and the LoRA targets (no weights are read)."""
    task = load_task(config.data, config.seed)
    train_parts, _ = partition_task(task, config.partition, config.seed, config.data.group_column is not None)
    check_devices_per_round(config.federation.devices_per_round, len(train_parts))
    check_label_words(config.model.label_words, task.label_names)
    head = check_model(config.model.name, config.model.head, config.lora.target_modules, config.model.cache_dir,
                       config.model.train_label_words)
    if head == "verbalizer":
        prompt_template(config.model.prompt_template, task.train.text_pairs is not None)
    logger.debug("preflight passed: %d train, %d test samples on %d devices", len(task.train), len(task.test), len(train_parts))
