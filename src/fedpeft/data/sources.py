"""Load records (plain dicts) from local files or the Hugging Face Hub.

Local formats, chosen by the file suffix: ``.json`` (a list of objects, an object holding one list, or
JSON lines), ``.jsonl``, ``.csv``, ``.tsv``, ``.parquet``. A directory is read as one file per client:
every supported file in it (natural sort, so ``client_10`` follows ``client_9``), each record tagged
with ``client`` = the file's stem, which ``data.partition.kind=natural`` with ``by=client`` uses.

A column mapping (``{"question": "instruction", "answer": "output"}`` or the string
``"question->instruction, answer->output"``) renames source columns to the fields a task reads; a mapped
column missing from a file is an error naming the file, the column and the columns it has.

Local loading never touches the network. Hub loading goes through ``datasets`` and fails with a message
saying what to do when there is no network.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")


class DataError(ValueError):
    """Data that cannot be used; the message names the file, the field and the value."""


# ------------------------------------------------------------------------------------------ columns
def parse_columns(columns: Mapping[str, str] | str | None) -> dict[str, str]:
    """``"a->b, c->d"`` or ``{"a": "b"}`` -> ``{"a": "b", "c": "d"}`` (source column -> field)."""
    if columns is None:
        return {}
    if isinstance(columns, Mapping):
        return {str(k): str(v) for k, v in columns.items()}
    mapping: dict[str, str] = {}
    for item in str(columns).split(","):
        item = item.strip()
        if not item:
            continue
        for sep in ("->", "=", ":"):
            if sep in item:
                src, dst = (part.strip() for part in item.split(sep, 1))
                break
        else:
            raise DataError(f"column mapping item {item!r} is not of the form source->field")
        if not src or not dst:
            raise DataError(f"column mapping item {item!r} has an empty side")
        mapping[src] = dst
    return mapping


def apply_columns(records: list[Record], columns: Mapping[str, str] | str | None, origin: str = "<records>") -> list[Record]:
    """Rename source columns to fields. Every mapped source column must exist in every record."""
    mapping = parse_columns(columns)
    if not mapping:
        return records
    out = []
    for i, record in enumerate(records):
        missing = [src for src in mapping if src not in record]
        if missing:
            raise DataError(
                f"{origin}: record {i} has no column {missing[0]!r} (mapped to {mapping[missing[0]]!r}); "
                f"its columns are {sorted(record)}"
            )
        new = {k: v for k, v in record.items() if k not in mapping}
        for src, dst in mapping.items():
            new[dst] = record[src]
        out.append(new)
    return out


def require_fields(records: Sequence[Record], fields: Sequence[str], origin: str = "<records>") -> None:
    """Raise naming the first record lacking one of ``fields``."""
    for i, record in enumerate(records):
        for field in fields:
            if field not in record:
                raise DataError(
                    f"{origin}: record {i} has no field {field!r} (it has {sorted(record)}); "
                    f"map a column to it with data.columns, e.g. '<column>->{field}'"
                )


# ---------------------------------------------------------------------------------------- local files
def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _read_json(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # JSON lines in a .json file
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
    return records


def _read_delimited(path: Path, delimiter: str, fieldnames: Sequence[str] | None) -> list[Record]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, fieldnames=list(fieldnames) if fieldnames else None, delimiter=delimiter,
                                quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        records = []
        for number, row in enumerate(reader, 1 if fieldnames else 2):
            if fieldnames and number == 1 and [str(v).strip() for v in row.values()] == [str(f) for f in fieldnames]:
                # A header row read as data would become a record (and, in a classification file, a label).
                raise DataError(f"{path}: its first row {list(row.values())} repeats data.fieldnames, so the file has "
                                f"a header row; drop data.fieldnames (or map the header's columns with data.columns)")
            if None in row:
                raise DataError(f"{path}: line {number} has more values than the header ({reader.fieldnames})")
            if any(v is None for v in row.values()):
                raise DataError(f"{path}: line {number} has fewer values than the header ({reader.fieldnames})")
            records.append(dict(row))
        return records


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    return pq.read_table(path).to_pylist()


def _not_utf8(path: Path) -> DataError:
    """The error for a text file that is not UTF-8, naming the first bad line."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        return DataError(f"{path}: not UTF-8 text: line {line} holds byte 0x{raw[exc.start]:02x} ({exc.reason}); "
                         "save the file as UTF-8")
    return DataError(f"{path}: not UTF-8 text")


def read_file(path: str | Path, fieldnames: Sequence[str] | None = None) -> list[Record]:
    """Records of one file, by suffix. ``fieldnames`` names the columns of a CSV/TSV without a header
    row: every row, the first included, is then a record."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file '{path}' does not exist")
    try:
        return _read_by_suffix(path, fieldnames)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _read_by_suffix(path: Path, fieldnames: Sequence[str] | None) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        records = _read_json(path)
    elif suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        records = _read_delimited(path, "," if suffix == ".csv" else "\t", fieldnames)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise DataError(f"data file '{path}': unsupported format {suffix!r}; supported: {', '.join(SUFFIXES)}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {i} is a {type(record).__name__}, expected an object with named fields")
    return records


def list_data_files(directory: str | Path, pattern: str = "*") -> list[Path]:
    directory = Path(directory)
    files = [p for p in directory.glob(pattern) if p.is_file() and p.suffix.lower() in SUFFIXES]
    return sorted(files, key=_natural_key)


def load_local(path: str | Path, columns: Mapping[str, str] | str | None = None, *, pattern: str = "*",
               fieldnames: Sequence[str] | None = None, client_field: str = "client",
               limit: int | None = None) -> list[Record]:
    """Records from a file, or from every matching file of a directory (tagged ``client_field`` = stem)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path '{path}' does not exist")
    if path.is_dir():
        files = list_data_files(path, pattern)
        if not files:
            raise DataError(f"data directory '{path}' has no {pattern} files with a supported suffix ({', '.join(SUFFIXES)})")
        records: list[Record] = []
        for file in files:
            part = apply_columns(read_file(file, fieldnames), columns, str(file))
            if not part:
                raise DataError(f"data file '{file}' has no records")
            for record in part:
                record.setdefault(client_field, file.stem)
            records.extend(part)
    else:
        records = apply_columns(read_file(path, fieldnames), columns, str(path))
        if not records:
            raise DataError(f"data file '{path}' has no records")
    return records[:limit] if limit is not None else records


# --------------------------------------------------------------------------------------------- hub
def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def open_hub_dataset(name: str, config: str | None = None, split: str = "train", *, revision: str | None = None,
                     what: str = "the Hugging Face Hub",
                     offline_hint: str = "point data.path (or FEDPEFT_DATA_DIR) at them"):
    """``datasets.load_dataset(name, config, split=split)`` (a hub id, or a local directory of parquet /
    image-folder files) as a ``datasets.Dataset``, its failures as ``DataError`` saying what to do."""
    where = f"'{name}'" + (f" (config {config!r})" if config else "") + f" split {split!r}"
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading '{name}' from {what} needs the 'datasets' package "
                        f"(pip install 'fedpeft[hub]'), or give a local file with data.path") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split, revision=revision)
    except (ConnectionError, OSError) as exc:
        hint = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
        raise DataError(
            f"cannot load {where} from {what}{hint}: {exc}. With no network, download the "
            f"files elsewhere and {offline_hint}"
        ) from None
    except ValueError as exc:  # unknown split / config
        raise DataError(f"cannot load {where} from {what}: {exc}") from None
    except Exception as exc:  # datasets raises its own types for missing repos; keep the message
        if type(exc).__name__ in ("DatasetNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError",
                                  "LocalEntryNotFoundError", "RepositoryNotFoundError", "HfHubHTTPError"):
            raise DataError(f"cannot load {where} from {what}: {exc}") from None
        raise
    return dataset


def load_hub(name: str, config: str | None = None, split: str = "train",
             columns: Mapping[str, str] | str | None = None, *, revision: str | None = None,
             limit: int | None = None) -> list[Record]:
    """Records of a Hugging Face Hub dataset split (needs ``datasets`` and, unless cached, a network)."""
    dataset = open_hub_dataset(name, config, split, revision=revision)
    where = f"'{name}'" + (f" (config {config!r})" if config else "") + f" split {split!r}"
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    records = [dict(row) for row in dataset]
    if not records:
        raise DataError(f"{where} on the Hugging Face Hub has no records")
    return apply_columns(records, columns, f"hub:{name}")


def looks_local(source: str | Path) -> bool:
    """A path on disk, or something shaped like one (a data suffix, or starting with ``.``, ``/``, ``~``);
    anything else is read as a Hugging Face Hub dataset name."""
    path = Path(source)
    return path.exists() or path.suffix.lower() in SUFFIXES or str(source).startswith((".", "/", "~"))


def load_records(source: str | Path, columns: Mapping[str, str] | str | None = None, *, split: str = "train",
                 hub_config: str | None = None, limit: int | None = None, **local_options: Any) -> list[Record]:
    """A local path when ``source`` exists on disk (or looks like a path), else a Hub dataset name."""
    path = Path(source)
    if looks_local(source):
        return load_local(path.expanduser(), columns, limit=limit, **local_options)
    return load_hub(str(source), hub_config, split, columns, limit=limit)
