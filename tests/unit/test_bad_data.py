"""Malformed data files are refused with one message that names the file, the line and the fix.

Every expectation below is the exact message, written out by hand from the file contents.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fibecfed.config import DataConfig, PartitionConfig
from fibecfed.data.loaders import load_task
from fibecfed.data.partition import partition_task
from fibecfed.errors import DataError


def _files(tmp_path: Path, train: bytes | str, test: bytes | str | None = None, suffix: str = "tsv", **cfg) -> DataConfig:
    def write(name: str, content: bytes | str) -> str:
        path = tmp_path / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    return DataConfig(
        name="files",
        train_file=write(f"train.{suffix}", train),
        test_file=None if test is None else write(f"test.{suffix}", test),
        **cfg,
    )


def _error(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as error:
        load_task(cfg, seed=0)
    return str(error.value)


def test_bad_encoding_names_line_and_byte(tmp_path: Path) -> None:
    # "text\tlabel\n" is 11 bytes, "good\tpos\n" 9 more: the \xff after "b" is at offset 21, line 3.
    cfg = _files(tmp_path, b"text\tlabel\ngood\tpos\nb\xffad\tneg\n")
    assert _error(cfg) == (
        f"{tmp_path / 'train.tsv'} line 3 is not UTF-8 text (byte 0xff at offset 21); save the file as UTF-8"
    )


def test_bad_encoding_after_a_byte_order_mark_counts_the_mark(tmp_path: Path) -> None:
    # 3 BOM bytes + "text,label\n" (11) = 14: the \xe9 of "caf\xe9" is at offset 17.
    cfg = _files(tmp_path, b"\xef\xbb\xbftext,label\ncaf\xe9,1\n", suffix="csv")
    assert "line 2 is not UTF-8 text (byte 0xe9 at offset 17)" in _error(cfg)


@pytest.mark.parametrize(
    ("row", "found"),
    [("bad\tneg\textra", 3), ("lonely", 1)],
)
def test_ragged_row_names_line_and_counts(tmp_path: Path, row: str, found: int) -> None:
    cfg = _files(tmp_path, f"text\tlabel\ngood\tpos\n\n{row}\n")
    # Line 3 is blank (skipped), so the ragged row is on line 4.
    assert _error(cfg) == (
        f"{tmp_path / 'train.tsv'} line 4: expected 2 fields, found {found} "
        "(a tab inside a field?); columns: text, label"
    )


def test_ragged_csv_row_after_a_multiline_field_names_its_first_line(tmp_path: Path) -> None:
    cfg = _files(tmp_path, 'text,label\n"two\nlines",pos\nx,neg,extra\n', suffix="csv")
    assert "train.csv line 4: expected 2 fields, found 3" in _error(cfg)


def test_empty_file(tmp_path: Path) -> None:
    assert _error(_files(tmp_path, "")) == f"{tmp_path / 'train.tsv'} is empty"


def test_blank_lines_only_is_empty(tmp_path: Path) -> None:
    assert _error(_files(tmp_path, "\n\n  \n", suffix="jsonl")) == f"{tmp_path / 'train.jsonl'} is empty"


def test_header_only_train_file(tmp_path: Path) -> None:
    assert _error(_files(tmp_path, "text\tlabel\n", "text\tlabel\nc\tpos\n")) == "train.tsv has no data rows"


def test_header_only_test_file(tmp_path: Path) -> None:
    assert _error(_files(tmp_path, "text\tlabel\na\tpos\nb\tneg\n", "text\tlabel\n")) == "test.tsv has no data rows"


def test_label_outside_the_listed_labels(tmp_path: Path) -> None:
    cfg = _files(tmp_path, "text\tlabel\ngood\tpos\nbad\tneg\n", labels=["pos", "neutral"])
    assert _error(cfg) == "unknown label `neg` in train.tsv line 3; known labels: pos, neutral; set data.labels"


def test_test_label_never_seen_in_train(tmp_path: Path) -> None:
    cfg = _files(tmp_path, '{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n',
                 '{"text": "c", "label": "meh"}\n', suffix="jsonl")
    assert _error(cfg) == "unknown label `meh` in test.jsonl line 1; known labels: neg, pos; set data.labels"


def test_one_class_is_not_a_classification_task(tmp_path: Path) -> None:
    cfg = _files(tmp_path, "text\tlabel\na\tpos\nb\tpos\n")
    assert _error(cfg) == (
        "train.tsv has only the label `pos` in column `label`; a classifier needs at least two classes "
        "(wrong data.label_column?)"
    )


def test_one_listed_label_is_refused(tmp_path: Path) -> None:
    cfg = _files(tmp_path, "text\tlabel\na\tpos\nb\tpos\n", labels=["pos"])
    assert _error(cfg) == "data.labels lists 1 label(s); a classifier needs at least two"


@pytest.mark.parametrize(
    ("key", "name"),
    [("text_column", "sentence"), ("label_column", "score"), ("text_pair_column", "hypothesis"), ("group_column", "user")],
)
def test_missing_column_names_the_setting(tmp_path: Path, key: str, name: str) -> None:
    cfg = _files(tmp_path, "text\tlabel\na\tpos\nb\tneg\n", **{key: name})
    assert _error(cfg) == f"column `{name}` not found in train.tsv; columns are: text, label; set data.{key}"


def test_blank_text_names_line_and_column(tmp_path: Path) -> None:
    cfg = _files(tmp_path, "text\tlabel\ngood\tpos\n  \tneg\n")
    assert _error(cfg) == "blank text in train.tsv line 3, column `text`; fill it in or remove the row"


def test_blank_text_pair_and_missing_jsonl_key(tmp_path: Path) -> None:
    # The second record has no "hypothesis": its cell is blank.
    cfg = _files(
        tmp_path,
        '{"text": "a", "hypothesis": "x", "label": "yes"}\n{"text": "b", "label": "no"}\n',
        suffix="jsonl", text_pair_column="hypothesis",
    )
    assert _error(cfg) == "blank text in train.jsonl line 2, column `hypothesis`; fill it in or remove the row"


def test_empty_label_names_line(tmp_path: Path) -> None:
    cfg = _files(tmp_path, "text,label\na,pos\nb,\n", suffix="csv")
    assert _error(cfg) == "empty label in train.csv line 3, column `label`"


def test_huge_integer_in_jsonl_is_a_data_error(tmp_path: Path) -> None:
    cfg = _files(tmp_path, '{"text": "a", "label": ' + "9" * 5000 + "}\n", suffix="jsonl")
    assert _error(cfg).startswith(f"{tmp_path / 'train.jsonl'} line 1 is not valid JSON: Exceeds the limit")


def test_deeply_nested_jsonl_is_a_data_error(tmp_path: Path) -> None:
    cfg = _files(tmp_path, "[" * 100_000 + "\n", suffix="jsonl")
    assert _error(cfg) == f"{tmp_path / 'train.jsonl'} line 1 is not valid JSON: nested too deeply"


def test_a_folder_given_as_data_file(tmp_path: Path) -> None:
    (tmp_path / "data.tsv").mkdir()
    cfg = DataConfig(name="files", train_file=str(tmp_path / "data.tsv"))
    assert _error(cfg) == f"{tmp_path / 'data.tsv'} is not a file"


# ---------------------------------------------------------------------------------------------
# Partitions that leave a device without data.


def _two_class_task(tmp_path: Path, n: int):
    rows = "".join(f"text {i}\t{'pos' if i % 2 else 'neg'}\n" for i in range(n))
    return load_task(_files(tmp_path, "text\tlabel\n" + rows, "text\tlabel\nx\tpos\ny\tneg\n"), seed=0)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet_label", "dirichlet_quantity"])
def test_more_devices_than_samples(tmp_path: Path, scheme: str) -> None:
    task = _two_class_task(tmp_path, 6)
    with pytest.raises(DataError) as error:
        partition_task(task, PartitionConfig(scheme=scheme, num_devices=8), seed=0, group_column_set=False)
    assert str(error.value) == (
        "6 training samples cannot give each of partition.num_devices=8 devices partition.min_samples=1; "
        "set partition.num_devices=6 or fewer, or use more data"
    )


def test_natural_partition_without_group_column(tmp_path: Path) -> None:
    task = _two_class_task(tmp_path, 6)
    with pytest.raises(DataError, match=r"^partition.scheme=natural needs data.group_column$"):
        partition_task(task, PartitionConfig(scheme="natural"), seed=0, group_column_set=False)
