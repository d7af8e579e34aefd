"""Fuzz: whatever bytes a user gives as a data file, the loader either builds a valid task or
raises the package's DataError; never UnicodeDecodeError, IndexError, KeyError, csv.Error or a
json error. Bounded: about 5 s on 2 cores."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fibecfed.config import DataConfig
from fibecfed.data.loaders import load_task
from fibecfed.data.types import TaskData
from fibecfed.errors import DataError

FUZZ = settings(max_examples=120, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None)

# Characters that mean something to one of the formats, plus a few letters and non-ASCII text.
SPECIAL = "\t,\"'\n\r {}[]:\\ab01x\u00e9\u2028\ufeff\x00"
TEXT = st.text(SPECIAL, max_size=6)
LABEL = st.sampled_from(["pos"] * 6 + ["neg"] * 6 + ["", " neg", "neu", "0"])
WORDS = st.sampled_from(["good", "bad film", "ok", "caf\u00e9 \u2028 x", 'a "quoted" word'])
ROWS = st.lists(st.tuples(st.one_of(WORDS, WORDS, WORDS, TEXT), LABEL), min_size=0, max_size=10)
HEADER = st.sampled_from([["text", "label"], ["text", "label"], ["label", "text"], ["sentence", "label"], ["text"], ["text", "text"]])


def _render(suffix: str, header: list[str], rows: list[tuple[str, str]], with_header: bool = True) -> bytes:
    """A table in the file format, cells written as they come (a tab in a TSV cell stays a tab)."""
    import json

    records = [dict(zip(header, (text, label))) for text, label in rows]
    if suffix == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).encode()
    sep = "\t" if suffix == "tsv" else ","
    lines = [sep.join(header)] * with_header + [sep.join(r.get(c, "") for c in header) for r in records]
    return "\n".join(lines).encode()


@st.composite
def _table_bytes(draw: st.DrawFn, suffix: str) -> bytes:
    """A table that often loads, sometimes damaged: a few bytes inserted somewhere."""
    content = _render(suffix, draw(HEADER), draw(ROWS), with_header=draw(st.booleans()))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        at = draw(st.integers(0, len(content)))
        content = content[:at] + draw(st.binary(min_size=1, max_size=3)) + content[at:]
    return content


def _bytes_for(suffix: str) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=200), st.text(SPECIAL, max_size=80).map(str.encode), _table_bytes(suffix), _table_bytes(suffix))


def _check_valid(task: TaskData) -> None:
    assert len(task.label_names) >= 2
    for split in (task.train, task.test):
        assert len(split) >= 1
        assert all(0 <= y < len(task.label_names) for y in split.labels)
        assert all(text.strip() for text in split.texts)


def _load(suffix: str, train: bytes, test: bytes | None, header: bool = True) -> None:
    with tempfile.TemporaryDirectory() as folder:
        train_path = Path(folder) / f"train.{suffix}"
        train_path.write_bytes(train)
        test_path = None
        if test is not None:
            test_path = Path(folder) / f"test.{suffix}"
            test_path.write_bytes(test)
        # Without a header the columns are "0", "1", ...: name them as a user would.
        columns = {} if header else {"text_column": "0", "label_column": "1"}
        cfg = DataConfig(
            name="files", train_file=str(train_path), test_file=None if test_path is None else str(test_path), header=header, **columns
        )
        try:
            task = load_task(cfg, seed=0)
        except DataError as exc:
            assert str(exc).strip(), "a DataError must say something"
            return
        _check_valid(task)


@FUZZ
@given(data=st.data(), suffix=st.sampled_from(["tsv", "csv", "jsonl"]), header=st.booleans(), with_test=st.booleans())
def test_any_file_loads_or_raises_data_error(data, suffix, header, with_test):
    train = data.draw(_bytes_for(suffix), label="train")
    test = data.draw(_bytes_for(suffix), label="test") if with_test else None
    _load(suffix, train, test, header)


@FUZZ
@given(rows=st.lists(st.tuples(st.text(SPECIAL, max_size=6), st.sampled_from(["pos", "neg", "", " pos", "neu"])), max_size=10))
def test_well_formed_tsv_with_odd_cells(rows):
    # Cells with tabs or newlines make ragged rows; the rest must load or be refused cleanly.
    body = "".join(f"{text}\t{label}\n" for text, label in rows)
    _load("tsv", ("text\tlabel\n" + body).encode(), None)


@FUZZ
@given(
    suffix=st.sampled_from(["tsv", "csv", "jsonl"]),
    rows=st.lists(st.tuples(WORDS, st.sampled_from(["pos", "neg"])), min_size=3, max_size=12).filter(
        lambda rows: {label for _, label in rows} == {"pos", "neg"}
    ),
)
def test_a_clean_table_always_loads(suffix, rows):
    # The other side of the property: damage is refused, but clean data is never refused.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"train.{suffix}"
        train = _render(suffix, ["text", "label"], rows)
        test = _render(suffix, ["text", "label"], [("x", "pos"), ("y", "neg")])
        path.write_bytes(train)
        (Path(folder) / f"test.{suffix}").write_bytes(test)
        task = load_task(DataConfig(name="files", train_file=str(path), test_file=str(Path(folder) / f"test.{suffix}")), seed=0)
    assert task.label_names == ["neg", "pos"]
    assert task.train.texts == [text.strip() for text, _ in rows]
    assert [task.label_names[y] for y in task.train.labels] == [label for _, label in rows]
