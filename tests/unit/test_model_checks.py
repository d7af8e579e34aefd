"""A model that cannot load is refused with one line before any weights are read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fibecfed import models
from fibecfed.errors import ModelError
from fibecfed.models import check_model, check_target_modules, resolve_model_source

HINT = "(a Hugging Face model folder holds config.json, the weights and the tokenizer files)"


def _copy_without(folder: Path, tmp_path: Path, *patterns: str) -> Path:
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    for pattern in patterns:
        for path in target.glob(pattern):
            path.unlink()
    return target


def test_folder_without_weights(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    folder = _copy_without(tiny_encoder_dir, tmp_path, "*.safetensors", "*.bin")
    with pytest.raises(ModelError) as error:
        resolve_model_source(str(folder))
    assert str(error.value) == f"model folder {folder} has no weights (*.safetensors or *.bin) {HINT}"


def test_folder_without_config(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    folder = _copy_without(tiny_encoder_dir, tmp_path, "config.json")
    with pytest.raises(ModelError) as error:
        resolve_model_source(str(folder))
    assert str(error.value) == f"model folder {folder} has no config.json {HINT}"


def test_load_model_refuses_a_folder_without_weights(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    # The Flower client loads through load_model without the CLI's preflight: same message.
    folder = _copy_without(tiny_encoder_dir, tmp_path, "*.safetensors")
    with pytest.raises(ModelError, match=r"has no weights"):
        models.load_model(str(folder), num_labels=2)


def test_missing_local_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as error:
        resolve_model_source(str(tmp_path / "nope"))
    assert str(error.value) == f"model folder {tmp_path / 'nope'} not found (model.name; packaged models: minilm, smollm2)"


def test_a_file_is_not_a_model_folder(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"is a file; give the folder"):
        resolve_model_source(str(tmp_path / "model.bin"))


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"),
        ({"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hugging Face hub cannot be reached to download it"),
    ],
)
def test_unknown_hub_name_without_network(monkeypatch: pytest.MonkeyPatch, env: dict, reason: str) -> None:
    # Port 9 (discard) on loopback refuses at once: the same answer as no network, in milliseconds.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ModelError) as error:
        resolve_model_source("someorg/no-such-model")
    assert str(error.value) == (
        "model.name='someorg/no-such-model' is not a local folder nor a packaged model (minilm, smollm2), "
        f"and {reason}; give a model folder or a packaged name"
    )


# ---------------------------------------------------------------------------------------------
# LoRA target modules (hand-written module names: no model needed).

NAMES = ["encoder", "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value", "classifier"]
LINEAR = ["classifier", "query", "value"]


def test_targets_that_match_pass() -> None:
    check_target_modules(["query", "value"], NAMES, LINEAR, "m")
    check_target_modules(["encoder.layer.0.attention.self.query"], NAMES, LINEAR, "m")  # a full name
    check_target_modules(["all-linear"], NAMES, LINEAR, "m")  # peft's keyword


def test_one_typo_among_good_targets_is_refused() -> None:
    # peft alone would adapt `query` and silently skip the typo.
    with pytest.raises(ModelError) as error:
        check_target_modules(["query", "vlaue"], NAMES, LINEAR, "m")
    assert str(error.value) == (
        "lora.target_modules: no module of 'm' is named vlaue (did you mean value?); "
        "its linear layers are: classifier, query, value"
    )


def test_a_suffix_must_match_whole_name_parts() -> None:
    with pytest.raises(ModelError, match=r"is named ery"):
        check_target_modules(["ery"], NAMES, LINEAR, "m")


def test_check_model_on_a_real_folder(tiny_encoder_dir: Path) -> None:
    check_model(str(tiny_encoder_dir), "auto", "auto")
    check_model(str(tiny_encoder_dir), "classifier", ["query", "value"])
    with pytest.raises(ModelError) as error:
        check_model(str(tiny_encoder_dir), "auto", ["q_proj", "v_proj"])
    assert str(error.value) == (
        f"lora.target_modules: no module of '{tiny_encoder_dir}' is named q_proj, v_proj; "
        "its linear layers are: classifier, dense, key, query, value"
    )


def test_verbalizer_on_an_encoder_is_refused(tiny_encoder_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"model.head=verbalizer needs a decoder"):
        check_model(str(tiny_encoder_dir), "verbalizer", "auto")


def test_trainable_label_words_need_the_verbalizer(tiny_encoder_dir: Path, tiny_decoder_dir: Path) -> None:
    # Refused before any weight is read: an encoder's "auto" head is a classifier.
    with pytest.raises(ModelError, match=r"train_label_words=true needs the verbalizer head; .* has a classifier head"):
        check_model(str(tiny_encoder_dir), "auto", "auto", train_label_words=True)
    with pytest.raises(ModelError, match=r"has a classifier head"):
        check_model(str(tiny_decoder_dir), "classifier", "auto", train_label_words=True)
    check_model(str(tiny_decoder_dir), "auto", "auto", train_label_words=True)


def _converted(folder: Path, marker: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text(marker)
    return folder


def test_two_conversions_racing_for_the_model_cache_both_succeed(tmp_path):
    """Two runs started together on a fresh machine both convert the packaged decoder; the one
    that publishes second keeps the first one's folder and drops its own (before: OSError,
    directory not empty, and the run died)."""
    target = tmp_path / "SmolLM2"
    models.publish_folder(_converted(tmp_path / "a.tmp", "first"), target)
    models.publish_folder(_converted(tmp_path / "b.tmp", "second"), target)
    assert (target / "model.safetensors").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2"]


def test_a_cache_folder_in_the_way_that_is_not_a_model_is_not_hidden(tmp_path):
    target = tmp_path / "SmolLM2"
    target.mkdir()
    (target / "stray.txt").write_text("not a model")
    with pytest.raises(OSError):
        models.publish_folder(_converted(tmp_path / "a.tmp", "first"), target)


def test_the_tmp_folders_of_killed_conversions_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    target = tmp_path / "SmolLM2"
    dead = _converted(tmp_path / f"SmolLM2.tmp-{int(gone.stdout)}-abcd1234", "killed")
    old_style = _converted(tmp_path / "SmolLM2.tmp", "older fibecfed")
    live = _converted(tmp_path / f"SmolLM2.tmp-{os.getpid()}-abcd1234", "converting now")
    models.remove_stale_conversions(target)
    assert not dead.exists() and not old_style.exists() and live.exists()
