"""Fuzz: any `key=value` override (and any YAML config file) either gives a valid config or
raises ConfigError; never a ValueError, TypeError, KeyError or a YAML error. Bounded: a few
seconds on 2 cores."""

from __future__ import annotations

import dataclasses
import tempfile
import typing
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fibecfed.config import RunConfig, config_from_dict, config_to_dict, load_config
from fibecfed.errors import ConfigError

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None)


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.append(prefix + f.name)  # a section given a value is an error too
            keys += _dotted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


KEYS = _dotted_keys(RunConfig)
# Values that each mean something to YAML or to a type check.
VALUES = [
    "0", "1", "-1", "3", "0.5", "1.5", "-0.1", "1e-3", "1e400", "-1e400", ".inf", ".nan", "nan", "9" * 5000,
    "abc", "", " ", "null", "~", "true", "no", "[]", "[a, b]", "[1, 2]", "[", "]", "{a: 1}", "{", "2001-02-30",
    "2001-02-03", "!!python/object:os.system", "!!binary aGk=", "&a [*a]", "'", '"', "a: b", "- x", "\\n", "[" * 50,
    "fibecfed", "fedavg", "auto", "natural", "iid", "minilm", "tsv",
]
KEY = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + "x"), st.text(max_size=12), st.just("method"))
VALUE = st.one_of(st.sampled_from(VALUES), st.text(max_size=12))
OVERRIDE = st.one_of(st.tuples(KEY, VALUE).map("=".join), st.text(max_size=20))


def _check_valid(config: RunConfig) -> None:
    assert config.federation.rounds >= 1
    assert config.train.lr is not None and config.train.lr > 0
    assert 0 < config.method.layers.share <= 1
    assert 0 <= config.federation.faults.share <= 1
    assert config.model.max_length >= 8
    if config.partition.scheme != "natural":
        assert config.federation.devices_per_round <= config.partition.num_devices
    # A valid config survives the trip through its dict (as run folders store it).
    assert config_from_dict(config_to_dict(config)) == config


@FUZZ
@given(overrides=st.lists(OVERRIDE, max_size=4))
def test_any_override_gives_a_valid_config_or_config_error(overrides):
    try:
        config = load_config(None, overrides)
    except ConfigError as exc:
        assert str(exc).strip()
        return
    _check_valid(config)


@FUZZ
@given(key=st.sampled_from(KEYS), value=st.sampled_from(VALUES))
def test_every_key_with_every_odd_value(key, value):
    test_any_override_gives_a_valid_config_or_config_error.hypothesis.inner_test([f"{key}={value}"])


YAML_TEXT = st.one_of(
    st.text(max_size=60),
    st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)), max_size=4).map(
        lambda items: "\n".join(f"{k}: {v}" for k, v in items)
    ),
    st.lists(st.sampled_from(["federation:", "  rounds: 2", "  rounds: x", "method: fibecfed", "method:", "  name: 3", "- a", "\t", ": :"]), max_size=5).map("\n".join),
)


@FUZZ
@given(text=YAML_TEXT)
@example(text="?")  # a mapping whose only key is None (found by this test in CI)
@example(text="1: 2\nfederation:\n  3: x")  # int keys, at the top and in a section
@example(text="0: &0 [*0]")  # a list that holds itself
def test_any_config_file_gives_a_valid_config_or_config_error(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            config = load_config(str(path))
        except ConfigError as exc:
            assert "\n" not in str(exc) or str(exc).strip()
            return
    _check_valid(config)
