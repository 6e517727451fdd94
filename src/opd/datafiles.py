"""Prompt and benchmark files → rows (``read_rows``): ``*.jsonl``, ``*.json`` (a list of objects),
``*.parquet``, ``*.csv``, a directory written by ``datasets.Dataset.save_to_disk`` (needs
``pip install opd[datasets]``), and ``lab:<split>`` for the lab's prompt splits. :mod:`opd.data` renders
the rows into prompts."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq

from opd.lab import LabPrompts
from opd.lab import resolve as resolve_lab
from opd.textfiles import read_utf8

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
"""File types ``read_rows`` reads (besides a ``save_to_disk`` directory and ``lab:<split>``)."""


def read_rows(source: str | Path) -> list[dict]:
    """Read every row of ``source`` as a plain dict (nested lists / dicts as Python objects).

    ``source`` is a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, a ``datasets``
    ``save_to_disk`` directory, or ``lab:<split>``.
    """
    name = str(source)
    path = Path(source)
    lab = resolve_lab(name, kind="prompts")
    if isinstance(lab, LabPrompts):
        rows = lab.rows()
    elif not path.exists():
        raise FileNotFoundError(
            f"prompt source {name!r} does not exist; pass a {', '.join(SUPPORTED_SUFFIXES)} file, a "
            "datasets save_to_disk directory, or lab:<split>"
        )
    elif path.is_dir():
        rows = _read_hf_dir(path)
    else:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        elif suffix == ".csv":
            rows = [dict(r) for r in csv.DictReader(io.StringIO(read_utf8(path), newline=""))]
        else:
            raise ValueError(
                f"prompt source {name!r}: unsupported file type {suffix!r}; expected one of "
                f"{', '.join(SUPPORTED_SUFFIXES)}, a datasets save_to_disk directory, or lab:<split>"
            )
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(
                f"{name}: row {i} is a {type(r).__name__} ({_short(r)}), expected an object with named "
                "fields such as 'prompt' and 'answer'"
            )
    return rows


def _read_hf_dir(path: Path) -> list[dict]:
    try:
        import datasets  # optional extra (opd[datasets]), slow to import: only for a save_to_disk directory
    except ImportError as e:
        raise ImportError(
            f"prompt source {str(path)!r} is a directory, read as a Hugging Face dataset saved with "
            "save_to_disk, which needs the datasets package: pip install opd[datasets]"
        ) from e
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(
            f"prompt source {str(path)!r} is a directory but not a dataset written by save_to_disk ({e}); "
            f"pass a {', '.join(SUPPORTED_SUFFIXES)} file or a save_to_disk directory"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if len(splits) != 1:
            raise ValueError(
                f"prompt source {str(path)!r} is a DatasetDict with splits {splits}; point at one split's "
                f"subdirectory instead, e.g. {str(path / splits[0])!r}"
            )
        ds = ds[splits[0]]
    return ds.to_list()


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: line {lineno} is not valid JSON ({e.msg}): {_short(line)}; "
                "each line of a .jsonl file must be one JSON object"
            ) from e
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a list of objects") from e
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: top-level JSON value is a {type(data).__name__}, expected a list of objects "
            "(use .jsonl for one object per line)"
        )
    return data


def _short(value, n: int = 80) -> str:
    """``repr(value)``, cut to ``n`` characters (for error messages)."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."
