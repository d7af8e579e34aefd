"""Bad input on the command line: exit code 2, one `error: ...` line naming the problem, no
traceback, and nothing written to (or deleted from) the run folder. No model trains here: every
case is refused before training starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fibecfed import cli

GOOD_ROWS = "text\tlabel\n" + "".join(f"text number {i}\t{'pos' if i % 2 else 'neg'}\n" for i in range(12))
SMALL = ["partition.num_devices=2", "federation.devices_per_round=1", "federation.rounds=1"]


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the CLI in-process; return its exit code and its one stderr line."""
    code = cli.main(["run", "--no-progress", *argv]) if argv[0] != "compare" else cli.main(list(argv))
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return code, lines[0]


def _data(tmp_path: Path, name: str, content: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def _files(tmp_path: Path, content: bytes | str, name: str = "train.tsv") -> list[str]:
    return ["data.name=files", f"data.train_file={_data(tmp_path, name, content)}", *SMALL]


# ---------------------------------------------------------------------------------------------
# Impossible configs.


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("federation.rounds=0", "error: invalid config: federation.rounds must be >= 1, got 0"),
        ("federation.rounds=-3", "error: invalid config: federation.rounds must be >= 1, got -3"),
        ("federation.rounds=abc", "error: invalid config: federation.rounds must be int, got 'abc'"),
        ("train.lr=0", "error: invalid config: train.lr must be > 0, got 0.0"),
        ("train.lr=-1e-3", "error: invalid config: train.lr must be > 0, got -0.001"),
        ("method.layers.share=1.5", "error: invalid config: method.layers.share must be in (0, 1], got 1.5"),
        ("method.sparse.share=-0.1", "error: invalid config: method.sparse.share must be in [0, 1], got -0.1"),
        ("federation.faults.share=2", "error: invalid config: federation.faults.share must be in [0, 1], got 2.0"),
        ("model.max_length=0", "error: invalid config: model.max_length must be >= 8, got 0"),
        ("federation.devices_per_round=50",
         "error: invalid config: federation.devices_per_round (50) exceeds partition.num_devices (20)"),
        ("method=fedavgg", "error: invalid config: method.name must be one of 'fedavg', 'fedprox', 'fibecfed', got 'fedavgg'"),
        ("federation", "error: override 'federation' must look like key=value (e.g. federation.rounds=5)"),
    ],
)
def test_impossible_config(capsys, tmp_path, override, expected):
    out = tmp_path / "out"
    code, line = _main(capsys, "--out", str(out), override)
    assert (code, line) == (2, expected)
    assert not out.exists()


def test_unknown_key_says_did_you_mean(capsys, tmp_path):
    code, line = _main(capsys, "--out", str(tmp_path / "out"), "federation.roundz=3")
    assert code == 2
    assert line.startswith("error: invalid config: unknown config key federation.roundz (did you mean federation.rounds?); known keys: ")


def test_invalid_yaml_config_file_is_one_line(capsys, tmp_path):
    config = _data(tmp_path, "bad.yaml", "federation:\n  rounds: [1, 2\n")
    code, line = _main(capsys, "--config", config, "--out", str(tmp_path / "out"))
    assert code == 2
    assert line.startswith(f"error: config {config} is not valid YAML: ")
    assert "(line 3, column 1)" in line


# ---------------------------------------------------------------------------------------------
# Malformed data.


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"text\tlabel\ngood\tpos\nb\xffad\tneg\n", "{path} line 3 is not UTF-8 text (byte 0xff at offset 21); save the file as UTF-8"),
        ("text\tlabel\ngood\tpos\nbad\tneg\tmore\n", "{path} line 3: expected 2 fields, found 3 (a tab inside a field?); columns: text, label"),
        ("", "{path} is empty"),
        ("text\tlabel\n", "train.tsv has no data rows"),
        ("text\tlabel\ngood\tpos\n\tneg\n", "blank text in train.tsv line 3, column `text`; fill it in or remove the row"),
        ("text\tlabel\ngood\tpos\nbad\t\n", "empty label in train.tsv line 3, column `label`"),
        ("text\tlabel\ngood\tpos\nbad\tpos\n", "train.tsv has only the label `pos` in column `label`; a classifier needs at least two classes (wrong data.label_column?)"),
        ("sentence\tlabel\ngood\tpos\nbad\tneg\n", "column `text` not found in train.tsv; columns are: sentence, label; set data.text_column"),
        # 2 rows: one is held out as test, one left to train 2 devices.
        ("text\tlabel\ngood\tpos\nbad\tneg\n", "1 training samples cannot give each of partition.num_devices=2 devices partition.min_samples=1; set partition.num_devices=1 or fewer, or use more data"),
    ],
)
def test_malformed_data(capsys, tmp_path, content, expected):
    code, line = _main(capsys, "--out", str(tmp_path / "out"), *_files(tmp_path, content))
    assert (code, line) == (2, "error: " + expected.format(path=tmp_path / "train.tsv"))


def test_label_outside_the_listed_labels(capsys, tmp_path):
    code, line = _main(capsys, "--out", str(tmp_path / "out"), *_files(tmp_path, GOOD_ROWS), "data.labels=[pos,neutral]")
    assert (code, line) == (2, "error: unknown label `neg` in train.tsv line 2; known labels: pos, neutral; set data.labels")


def test_natural_partition_with_fewer_groups_than_devices_per_round(capsys, tmp_path):
    rows = "text\tlabel\tuser\n" + "".join(f"t{i}\t{'ab'[i % 2]}\tu{i % 2}\n" for i in range(10))
    argv = [*_files(tmp_path, rows), "partition.scheme=natural", "data.group_column=user",
            "federation.devices_per_round=3", "partition.num_devices=5"]
    code, line = _main(capsys, "--out", str(tmp_path / "out"), *argv)
    assert (code, line) == (2, "error: federation.devices_per_round (3) exceeds the 2 devices of the partition")


# ---------------------------------------------------------------------------------------------
# Models.


def test_model_folder_without_weights(capsys, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    code, line = _main(capsys, "--out", str(tmp_path / "out"), *_files(tmp_path, GOOD_ROWS), f"model.name={folder}")
    assert code == 2
    assert line == f"error: model folder {folder} has no weights (*.safetensors or *.bin) (a Hugging Face model folder holds config.json, the weights and the tokenizer files)"


def test_target_modules_that_match_nothing(capsys, tmp_path, tiny_encoder_dir):
    argv = [*_files(tmp_path, GOOD_ROWS), f"model.name={tiny_encoder_dir}", "lora.target_modules=[qeury]"]
    code, line = _main(capsys, "--out", str(tmp_path / "out"), *argv)
    assert (code, line) == (2, f"error: lora.target_modules: no module of '{tiny_encoder_dir}' is named qeury (did you mean query?); its linear layers are: classifier, dense, key, query, value")


def test_unknown_hub_name_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, line = _main(capsys, "--out", str(tmp_path / "out"), *_files(tmp_path, GOOD_ROWS), "model.name=someorg/missing")
    assert code == 2
    assert line.startswith("error: model.name='someorg/missing' is not a local folder nor a packaged model")


# ---------------------------------------------------------------------------------------------
# A previous run in --out survives a refused run, even with --fresh.


def test_refused_run_leaves_the_run_folder_untouched(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    previous = {"checkpoint.pt": b"previous checkpoint", "config.json": b'{"seed": 0}', "metrics.jsonl": b'{"round": 0}\n'}
    for name, content in previous.items():
        (out / name).write_bytes(content)
    code, _ = _main(capsys, "--fresh", "--out", str(out), *_files(tmp_path, "text\tlabel\n"))
    assert code == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous


def test_debug_shows_the_traceback(tmp_path):
    from fibecfed.errors import DataError

    with pytest.raises(DataError, match="is empty"):
        cli.main(["--debug", "run", "--out", str(tmp_path / "out"), *_files(tmp_path, "")])


# ---------------------------------------------------------------------------------------------
# Options and overrides in any order, for both subcommands (the overrides after --out / --seeds
# are applied: each case fails on one of them).


def test_run_overrides_after_out_are_applied(capsys, tmp_path):
    out = tmp_path / "out"
    code, line = _main(capsys, "method=fibecfed", "--out", str(out), "data.name=files", f"data.train_file={tmp_path / 'nope.tsv'}")
    assert (code, line) == (2, f"error: data file {tmp_path / 'nope.tsv'} not found")
    assert not out.exists()


def test_compare_overrides_around_seeds_are_applied(capsys, tmp_path):
    out = tmp_path / "cmp"
    code, line = _main(capsys, "compare", "--no-progress", "data.name=files", "--seeds", "0,1", "--out", str(out),
                       f"data.train_file={_data(tmp_path, 'train.tsv', '')}", "--methods", "fedavg,fibecfed")
    assert (code, line) == (2, f"error: {tmp_path / 'train.tsv'} is empty")
    assert not out.exists()


def test_compare_bad_seeds(capsys, tmp_path):
    code, line = _main(capsys, "compare", "federation.rounds=1", "--seeds", "0,x", "--out", str(tmp_path / "cmp"))
    assert (code, line) == (2, "error: --seeds: 'x' is not an integer; write e.g. 0,1,2")


# ---------------------------------------------------------------------------------------------
# The real command, one per category: what a user sees.


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["federation.rounds=abc"], "error: invalid config: federation.rounds must be int, got 'abc'\n"),
        (["data.name=files", "data.train_file={tmp}/train.tsv"], "error: {tmp}/train.tsv is empty\n"),
        (["model.name={tmp}/no-model"], "error: model folder {tmp}/no-model not found (model.name; packaged models: minilm, smollm2)\n"),
    ],
    ids=["config", "data", "model"],
)
def test_real_command(tmp_path, args, expected):
    (tmp_path / "train.tsv").write_text("")
    argv = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "fibecfed", "run", "--out", str(tmp_path / "out"), "data.max_train_samples=200", "partition.num_devices=2",
         "federation.devices_per_round=1", *argv],
        capture_output=True, text=True, timeout=120,
    )
    assert (result.returncode, result.stderr) == (2, expected.format(tmp=tmp_path))
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Found by a review as a new user (2026-11-27): each was a traceback, a lost run or a silent mix.


def test_a_bad_prompt_template_is_refused_before_fresh_touches_the_folder(capsys, tmp_path, tiny_decoder_dir):
    out = tmp_path / "out"
    out.mkdir()
    previous = {"checkpoint.pt": b"previous checkpoint", "config.json": b'{"seed": 0}'}
    for name, content in previous.items():
        (out / name).write_bytes(content)
    code, line = _main(capsys, "--fresh", "--out", str(out), *_files(tmp_path, GOOD_ROWS),
                       f"model.name={tiny_decoder_dir}", "model.prompt_template=no placeholder")
    assert (code, line) == (2, "error: model.prompt_template must contain {text}")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous


def test_an_out_that_cannot_be_a_folder(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    code, line = _main(capsys, "--out", str(afile), *_files(tmp_path, GOOD_ROWS))
    assert code == 2
    assert line.startswith(f"error: cannot use {afile} as the run folder (--out): ")
    assert afile.read_text() == "not a folder"


def test_min_samples_below_one(capsys, tmp_path):
    code, line = _main(capsys, "--out", str(tmp_path / "out"), *_files(tmp_path, GOOD_ROWS), "partition.min_samples=0")
    assert (code, line) == (2, "error: invalid config: partition.min_samples must be >= 1, got 0")


def test_a_label_column_that_holds_text(capsys, tmp_path):
    rows = "text\tlabel\n" + "".join(f"{'pos' if i % 2 else 'neg'}\tsentence number {i}\n" for i in range(60))
    code, line = _main(capsys, "--out", str(tmp_path / "out"), *_files(tmp_path, rows))
    assert code == 2
    assert line == ("error: column `label` of train.tsv has 60 distinct values in 60 rows: it looks "
                    "like text, not labels (wrong data.label_column or data.text_column?); if these are the "
                    "classes, list them in data.labels")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--methods", "fibecfed[method.layers.share=0.3"],
         "error: --methods 'fibecfed[method.layers.share=0.3': a '[' without its ']' (write NAME[key=value;key=value])"),
        (["--methods", "fedavg]"], "error: --methods 'fedavg]': a ']' without its '[' (write NAME[key=value;key=value])"),
        (["--methods", "fedavg", "--target", "1.5"], "error: --target must be in [0, 1] (the accuracy scale), got 1.5"),
        (["--methods", "fedavg", "--metric", "mcc", "--personalized-target", "-2"],
         "error: --personalized-target must be in [-1, 1] (the mcc scale), got -2.0"),
        (["--methods", "fedavg", "--target-share", "-1"], "error: --target-share must be in (0, 1], got -1.0"),
    ],
)
def test_compare_flags(capsys, tmp_path, flags, expected):
    out = tmp_path / "cmp"
    code, line = _main(capsys, "compare", "--no-progress", "--out", str(out), *flags, *_files(tmp_path, GOOD_ROWS))
    assert (code, line) == (2, expected)
    assert not out.exists()


def test_compare_refuses_a_run_folder_of_another_config_before_any_run(capsys, tmp_path):
    """--report-only would have reported the runs under the new settings, and a run would have
    failed only when its turn came."""
    from fibecfed.config import config_to_dict, load_config
    from fibecfed.outputs import write_json

    overrides = _files(tmp_path, GOOD_ROWS)
    run_dir = tmp_path / "cmp" / "fedavg" / "seed0"
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", config_to_dict(load_config(None, [*overrides, "method=fedavg", "seed=0"])))
    (run_dir / "summary.json").write_text("{}")
    for extra in ([], ["--report-only"]):
        code, line = _main(capsys, "compare", "--no-progress", "--out", str(tmp_path / "cmp"), "--methods", "fedavg",
                           *extra, *overrides, "federation.bandwidth_mbps=1000", "train.batch_size=4")
        assert (code, line) == (2, f"error: {run_dir} holds a run with a different config (it differs in "
                                   "train.batch_size, federation.bandwidth_mbps); use another --out, or delete that "
                                   "folder to run it again")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "summary.json"]
    # A config.json alone is left by a run that failed before its first round: no run to protect.
    (run_dir / "summary.json").unlink()
    code, line = _main(capsys, "compare", "--no-progress", "--out", str(tmp_path / "cmp"), "--methods", "fedavg",
                       "--report-only", *overrides, "train.batch_size=4")
    assert (code, line) == (2, f"error: no finished run in {run_dir}; run the comparison without --report-only")


def test_an_interrupted_run_without_out_says_which_out_resumes_it(capsys, tmp_path, monkeypatch):
    from fibecfed import runtimes

    def interrupted(config, out, progress=False, fresh=False):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtimes, "run", interrupted)
    assert cli.main(["run", "--no-progress", *_files(tmp_path, GOOD_ROWS)]) == 130
    err = capsys.readouterr().err.splitlines()
    (folder,) = list((tmp_path / "runs").iterdir())
    assert err[-1] == f"interrupted; to resume from the last completed round, run the same command with --out runs/{folder.name}"
    assert cli.main(["run", "--no-progress", "--out", str(folder), *_files(tmp_path, GOOD_ROWS)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted; run the same command again to resume from the last completed round"
    # Run again as it was, --fresh would start over again.
    assert cli.main(["run", "--no-progress", "--fresh", *_files(tmp_path, GOOD_ROWS)]) == 130
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "interrupted; to resume from the last completed round, run the same command without --fresh and with --out runs/")
