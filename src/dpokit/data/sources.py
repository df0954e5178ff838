"""Where preference rows come from: local files or folders (.jsonl/.json/.csv/.parquet) or a hub dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

from datasets import Dataset

from dpokit.core.config import looks_like_local_path
from dpokit.core.errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _read_jsonl(path: Path, bad: list | None = None) -> list[tuple[str, dict]]:
    """(location, row) pairs. With `bad` (a list), bad lines are appended there instead of raising."""
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            problem = None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                line, problem = "", f"not UTF-8 (byte {err.start}); re-encode the file as UTF-8"
            if problem is None and not line.strip():
                continue
            if problem is None:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    problem = f"invalid JSON ({err.msg}, column {err.colno}); fix or remove that line"
                else:
                    if not isinstance(row, dict):
                        problem = f"expected a JSON object per line, got {type(row).__name__}"
            if problem is not None:
                if bad is None:
                    raise UserError(f"{path}:{lineno}: {problem}, or set data.on_error: skip")
                bad.append({"where": f"{path}:{lineno}", "kind": "invalid_json", "error": problem})
                continue
            rows.append((f"{path}:{lineno}", row))
    return rows


def _read_json(path: Path, bad: list | None = None) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as err:
        # A .json file holding JSON Lines is common; accept it.
        if err.msg == "Extra data":
            return _read_jsonl(path, bad)
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); fix the file") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON list of objects (or JSON Lines)")
    return [(f"{path} item {i}", row) for i, row in enumerate(data, start=1)]


def _read_csv(path: Path, bad: list | None = None) -> list[tuple[str, dict]]:
    import pandas as pd

    try:
        # dtype=str: a numeric-looking answer ("42") stays text; score columns are parsed by the formats.
        frame = pd.read_csv(path, encoding="utf-8", keep_default_na=False, dtype=str)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    except pd.errors.ParserError as err:
        raise UserError(f"{path}: malformed CSV ({str(err).strip()}); fix the quoting or column count") from None
    except pd.errors.EmptyDataError:
        return []
    # Row N is the N-th record; line N+1 of the file when no field spans lines (the header is line 1).
    return [(f"{path} row {i}", row) for i, row in enumerate(frame.to_dict(orient="records"), start=1)]


def _read_parquet(path: Path, bad: list | None = None) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path}: cannot read Parquet ({err}); check the file") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(rows, start=1)]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_local_rows(path: str | os.PathLike, bad: list | None = None) -> list[tuple[str, dict]]:
    """(location, row) of one file, or of every supported file in a folder (sorted by name)."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise UserError(f"{path}: folder has no {'/'.join(FILE_SUFFIXES)} files")
        return [item for f in files for item in read_local_rows(f, bad)]
    if not path.exists():
        raise UserError(f"{path}: file not found; check data.source")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    return reader(path, bad)


def read_local(path: str | os.PathLike) -> list[dict]:
    """Rows of one file, or of every supported file in a folder (sorted by name)."""
    return [row for _, row in read_local_rows(path)]


def read_hub(dataset_id: str, split: str, config_name: str | None = None) -> Dataset:
    from datasets import load_dataset

    try:
        return load_dataset(dataset_id, config_name, split=split)
    except ValueError as err:
        if "split" in str(err).lower():
            raise UserError(f"data.split: {dataset_id!r} has no split {split!r} ({err})") from None
        raise UserError(f"data.source: cannot load hub dataset {dataset_id!r}: {err}") from None
    except Exception as err:  # network, auth, missing dataset: all user-facing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"data.source: cannot load hub dataset {dataset_id!r} ({first}); check the id, your network, "
            "or use a local file"
        ) from None


def read_source(source: str, split: str = "train", config_name: str | None = None) -> list[dict] | Dataset:
    """Local files give a list of dicts (small, with file/line errors); hub datasets stay a `Dataset`."""
    if looks_like_local_path(source):
        return read_local(source)
    return read_hub(source, split, config_name)


def read_rows(source: str, split: str = "train", config_name: str | None = None,
              bad: list | None = None) -> list[tuple[str, dict]]:
    """(location, row) pairs; locations name the file and line/row (or the hub split and row) for messages."""
    if looks_like_local_path(source):
        return read_local_rows(source, bad)
    dataset = read_hub(source, split, config_name)
    return [(f"{source}[{split}] row {i}", row) for i, row in enumerate(dataset, start=1)]
