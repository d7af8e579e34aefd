import pytest

from fibecfed.config import config_from_dict, load_config, parse_overrides
from fibecfed.errors import ConfigError


def test_default_preset_loads():
    config = load_config()
    assert config.data.name == "tweets"
    assert config.model.name == "minilm"
    assert config.method.name == "fedavg"


def test_overrides_are_typed():
    config = load_config(None, ["federation.rounds=3", "train.lr=1e-3", "lora.target_modules=[query,value]", "data.max_train_samples=null"])
    assert config.federation.rounds == 3
    assert config.train.lr == pytest.approx(1e-3)
    assert config.lora.target_modules == ["query", "value"]
    assert config.data.max_train_samples is None


def test_int_is_accepted_for_float():
    config = load_config(None, ["train.lr=1"])
    assert isinstance(config.train.lr, float) and config.train.lr == 1.0


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["federation.round=3"])
    assert "federation.round" in str(err.value)
    assert "did you mean federation.rounds" in str(err.value)


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config key optimizer"):
        config_from_dict({"optimizer": {"lr": 1}})


def test_a_key_that_is_not_a_name_is_a_config_error(tmp_path):
    # YAML reads `1: 2` as an int key and a lone `?` as a None key.
    with pytest.raises(ConfigError, match=r"config key 1 is not a name; known keys: seed, model, "):
        config_from_dict({1: 2})
    with pytest.raises(ConfigError, match=r"config key None under federation is not a name; known keys: federation\.rounds"):
        config_from_dict({"federation": {None: 3}})
    (tmp_path / "odd.yaml").write_text("?\n")
    with pytest.raises(ConfigError, match="config key None is not a name"):
        load_config(str(tmp_path / "odd.yaml"))


@pytest.mark.parametrize("text", ["? 0x" + "F" * 4000 + "\n: 1\n", "train: {lr: 0x" + "F" * 4000 + "}\n",
                                  "seed: 18446744073709551616\n"])
def test_an_integer_past_64_bits_is_a_config_error(tmp_path, text):
    (tmp_path / "huge.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"holds an integer of \d+ bits; no setting takes more than 64"):
        load_config(str(tmp_path / "huge.yaml"))
    load_config(None, ["seed=18446744073709551615"])  # 2**64 - 1: the largest seed torch takes


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.batch_size=abc", "method.name=sgd", "federation.rounds=2.5"])
    message = str(err.value)
    assert "train.batch_size" in message and "method.name" in message and "federation.rounds" in message


def test_range_checks():
    with pytest.raises(ConfigError, match="lora.r must be >= 1"):
        load_config(None, ["lora.r=0"])
    with pytest.raises(ConfigError, match="devices_per_round"):
        load_config(None, ["federation.devices_per_round=30"])


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_config(None, ["federation.rounds=true"])


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["rounds"])


def test_config_file_and_missing_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n  rounds: 7\n")
    assert load_config(str(path)).federation.rounds == 7
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no-such-preset")


def test_method_in_a_file_survives_method_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: fibecfed\n")
    config = load_config(str(path), ["method.curriculum.pacing=root"])
    assert config.method.name == "fibecfed"
    assert config.method.curriculum.enabled and config.method.curriculum.pacing == "root"


def test_string_overrides_stay_text():
    config = load_config(None, ["model.prompt_template=Tweet: {text}\\nSentiment:", "data.labels=[no, yes]", "data.name=files"])
    assert config.model.prompt_template == "Tweet: {text}\nSentiment:"
    assert config.data.labels == ["no", "yes"]
    assert load_config(None, ["data.path=null"]).data.path is None


def test_non_finite_and_conflicting_values_are_errors():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=nan"])
    with pytest.raises(ConfigError, match="only one of train.local_steps"):
        load_config(None, ["train.local_epochs=1"])
    assert load_config(None, ["train.local_steps=null", "train.local_epochs=1"]).train.local_epochs == 1.0
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["train=5"])


def test_method_defaults_resolve_from_name():
    from fibecfed.config import TUNED_PROX_MU

    assert load_config(None, ["method=fedprox"]).method.prox_mu == pytest.approx(TUNED_PROX_MU)
    fib = load_config(None, ["method=fibecfed"]).method
    assert fib.curriculum.enabled and fib.layers.enabled and fib.sparse.enabled and fib.prox_mu == 0.0
    avg = load_config(None, []).method
    assert not (avg.curriculum.enabled or avg.layers.enabled or avg.sparse.enabled)


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "fibecfed"])
def test_learning_rates_default_to_the_methods_tuned_ones(method):
    from fibecfed.config import TUNED_LEARNING_RATES

    config = load_config("bench", [f"method={method}"])
    assert (config.train.lr, config.train.head_lr) == TUNED_LEARNING_RATES[method]
    mine = load_config("bench", [f"method={method}", "train.lr=0.0007", "train.head_lr=0.07"])
    assert (mine.train.lr, mine.train.head_lr) == (0.0007, 0.07)


def test_device_timeout_must_be_positive():
    assert load_config(None, ["federation.device_timeout_s=30"]).federation.device_timeout_s == 30.0
    with pytest.raises(ConfigError, match="federation.device_timeout_s must be > 0"):
        load_config(None, ["federation.device_timeout_s=0"])


def test_server_optimiser_defaults_and_checks():
    from fibecfed.config import TUNED_ADAM_LR

    assert load_config(None, []).federation.server_opt.kind == "avg"
    for method in ("fedavg", "fibecfed"):
        adam = load_config(None, [f"method={method}", "federation.server_opt.kind=adam"]).federation.server_opt
        assert adam.lr == TUNED_ADAM_LR[method]
    assert load_config(None, ["federation.server_opt.kind=momentum"]).federation.server_opt.lr == 1.0
    assert load_config(None, ["federation.server_opt.kind=adam", "federation.server_opt.lr=0.3"]).federation.server_opt.lr == 0.3
    with pytest.raises(ConfigError, match="server_opt.lr applies to kind momentum or adam"):
        load_config(None, ["federation.server_opt.lr=0.5"])
    with pytest.raises(ConfigError, match="beta2 must be in"):
        load_config(None, ["federation.server_opt.kind=adam", "federation.server_opt.beta2=1.0"])
    with pytest.raises(ConfigError, match="kind"):
        load_config(None, ["federation.server_opt.kind=sgd"])
