"""Reading a task's records: local JSON Lines, CSV and Parquet files, or a Hugging Face
data set, each record validated against the task's ``data.TaskSpec``.

Design note
-----------
``cfg.data.source`` is a local directory holding one file per split, named
``<split>.jsonl`` (JSON Lines), ``<split>.csv`` (a header line of column names) or
``<split>.parquet`` (needs pyarrow, the ``parquet`` extra); or one local file (a single
split); or else a Hugging Face data-set id read with ``datasets.load_dataset(source,
hub_config, split=...)`` (``glue`` takes the preset's name as its configuration). A
source that *looks* like a path (starts with ``.``, ``/`` or ``~``, holds more than one
``/``, or ends in a data file's suffix) but does not exist is an error naming it, never a
silent hub lookup. Local files are read record by record, so a bad record is an error
naming the file, the line (a Parquet file: the row) and the column. A directory read as
one split holds ``<split>.<suffix>`` or exactly one data file.

Records come back as dicts with the task's columns, a classification label turned into
its class id. Splitting a single split into train / eval, tokenising and partitioning are
``fedspine_jax.data``'s.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedspine_jax.errors import UserError

if TYPE_CHECKING:
    from fedspine_jax.data import TaskSpec


class DataError(UserError, ValueError):
    """A data source, file or record is invalid; the message names where."""


LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def looks_local(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
            or source.endswith(LOCAL_SUFFIXES))


def _label_id(spec: TaskSpec, value: Any, where: str) -> int:
    """The class id of a label value: an integer id, or one of ``spec.label_names``."""
    col = spec.label_column
    if isinstance(value, str) and value in spec.label_names:
        return spec.label_names.index(value)
    if isinstance(value, bool) or not isinstance(value, int):
        names = f" or one of {list(spec.label_names)}" if spec.label_names else ""
        raise DataError(f"{where}: {col} {value!r} is not an integer{names}")
    if not 0 <= value < spec.num_labels:
        raise DataError(f"{where}: unknown {col} {value} (allowed 0..{spec.num_labels - 1})")
    return value


def _check_record(rec: Any, spec: TaskSpec, where: str) -> dict:
    """Validate one raw record (columns, types, label); errors name ``where`` and the column.

    Returns the record, its label (classification) turned into a class id.
    """
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    need = list(spec.columns) + ([spec.label_column] if spec.kind == "classification"
                                 else [])
    for name in need:
        if name not in rec:
            keys = ("data.text_column, data.label_column" if spec.kind == "classification"
                    else "data.template, data.response_column")
            hint = (f"; for other columns use data.task={spec.kind} with {keys}"
                    if spec.is_preset else "")
            raise DataError(f"{where}: missing field {name!r} ({spec.name} records need "
                            f"{need}; this one has {sorted(rec)}){hint}")
    for name in spec.columns:
        if not isinstance(rec[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {rec[name]!r}")
    col = spec.label_column
    if spec.kind == "classification":
        label = _label_id(spec, rec[col], where)
        return {**rec, col: label} if isinstance(rec[col], str) else rec
    if col and rec.get(col) is not None and rec[col] not in spec.label_names:
        raise DataError(f"{where}: unknown {col} {rec[col]!r} (allowed "
                        f"{list(spec.label_names)})")
    return rec


def read_jsonl(path: str | Path, spec: TaskSpec) -> list[dict]:
    """Read and validate a JSON Lines file of ``task`` records (blank lines are skipped).

    Raises:
        DataError: naming the file and the 1-based line number of a line that is not valid
            JSON, not an object, lacks a column, or has a bad label.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            records.append(_check_record(rec, spec, where))
    return records


def read_csv(path: str | Path, spec: TaskSpec) -> list[dict]:
    """Read and validate a CSV file with a header line of column names.

    Every cell is text: a label cell that is not one of the label names is read as an
    integer id, and an empty category cell as no category.

    Raises:
        DataError: naming the file and the line of a missing column or bad value.
    """
    path = Path(path)
    col = spec.label_column
    records = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        need = list(spec.columns) + ([col] if spec.kind == "classification" else [])
        missing = [c for c in need if c not in header]
        if missing:
            raise DataError(f"{path}:1: no column {missing[0]!r} ({spec.name} needs {need}; "
                            f"the header has {header})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError(f"{where}: more cells than the {len(header)} columns")
            cell = row.get(col)
            if spec.kind == "classification" and cell not in spec.label_names:
                if cell is not None and re.fullmatch(r"\s*[+-]?\d+\s*", cell):
                    row[col] = int(cell)
            elif col in row and not cell:
                row[col] = None
            records.append(_check_record(row, spec, where))
    return records


def read_parquet(path: str | Path, spec: TaskSpec) -> list[dict]:
    """Read and validate a Parquet file (needs ``pyarrow``: the ``parquet`` extra).

    Raises:
        DataError: pyarrow missing, or naming the file and the 0-based row of a bad record.
    """
    path = Path(path)
    try:
        import pyarrow.parquet as pq  # deferred: only Parquet files need it
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install "
                        f"'fedspine-jax[parquet]'") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    return [_check_record(r, spec, f"{path} row {i}") for i, r in enumerate(rows)]


def read_file(path: str | Path, spec: TaskSpec) -> list[dict]:
    """The validated records of one local file, by its suffix (.jsonl / .json JSON Lines,
    .csv, .parquet)."""
    path = Path(path)
    reader = {".jsonl": read_jsonl, ".json": read_jsonl, ".csv": read_csv,
              ".parquet": read_parquet}.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown file type (allowed {', '.join(LOCAL_SUFFIXES)})")
    records = reader(path, spec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _split_file(directory: Path, split: str, spec: TaskSpec) -> Path:
    """The file of ``split`` in a local directory (``<split>.jsonl``, ``.csv``, ...)."""
    found = [directory / f"{split}{s}" for s in LOCAL_SUFFIXES
             if (directory / f"{split}{s}").is_file()]
    if len(found) == 1:
        return found[0]
    if len(spec.splits) == 1 and not found:  # one split: the directory's only data file
        files = sorted(f for f in directory.iterdir() if f.suffix.lower() in LOCAL_SUFFIXES)
        if len(files) == 1:
            return files[0]
        raise DataError(f"{spec.name} source {str(directory)!r} must hold {split}.jsonl "
                        f"(or .csv, .parquet) or exactly one data file, found "
                        f"{[f.name for f in files]}")
    want = ", ".join(s + ".jsonl" for s in spec.splits)
    raise DataError(f"{spec.name} source {str(directory)!r} has "
                    f"{'no' if not found else 'more than one'} {split}.jsonl / .csv / "
                    f".parquet (expected {want}, or the same names in CSV or Parquet)")


def _read_hub(source: str, spec: TaskSpec, split: str) -> list[dict]:
    try:
        import datasets  # deferred: only hub sources need it
    except ImportError:
        raise DataError(f"data.source={source!r} is not a local directory or file, and "
                        f"reading it from the Hugging Face hub needs the 'hub' extra: pip "
                        f"install 'fedspine-jax[hub]'") from None
    config = spec.hub_config
    if config is None and spec.name in ("sst2", "mnli") and source.rsplit("/", 1)[-1] == "glue":
        config = spec.name
    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as e:  # the hub raises many types; re-raise naming the source
        raise DataError(f"could not load hub data set {source!r} (config {config!r}, split "
                        f"{split!r}): {type(e).__name__}: {str(e).splitlines()[0][:200]}; "
                        f"without a hub, point data.source at a local directory") from e
    rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
    if not rows:
        raise DataError(f"hub data set {source!r} split {split!r}: no records")
    return [_check_record(r, spec, f"{source}[{split}] row {i}") for i, r in enumerate(rows)]


def read_splits(spec: TaskSpec, source: str) -> list[list[dict]]:
    """The validated records of the splits ``source`` holds, in ``spec.splits`` order: a
    local directory and a hub id give one list per split, one local file a single list.

    Raises:
        DataError: a source that looks like a local path but does not exist, a missing or
            ambiguous split file, or a bad record (naming its file, line and column).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return [read_file(_split_file(path, s, spec), spec) for s in spec.splits]
    if path.is_file():
        return [read_file(path, spec)]
    if looks_local(source):
        raise DataError(f"data source {source!r} looks like a local path but is not a "
                        f"directory or file; point data.source at the data (e.g. --set "
                        f"data.source=../shared/data/sst2)")
    return [_read_hub(source, spec, split) for split in spec.splits]

