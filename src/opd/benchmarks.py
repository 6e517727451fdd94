"""Benchmarks: any prompt file with answers, loaded into one schema for ``opd eval``.

``load_benchmark(spec, data_dir) -> Benchmark`` reads a benchmark into rows of exactly four fields:

- ``id`` — the row's own ``id`` (or ``unique_id``, ``idx``, ``extra_info.index``) when it has one, else its
  0-based position in the file, as a string;
- ``prompt`` — the problem: a string, or a verl-style list of chat messages kept as is (rendered later,
  by :func:`opd.data.load_prompts`, exactly as training renders prompts);
- ``answer`` — the ground truth as a string (a GSM8K rationale ending ``#### N`` becomes ``N``);
- ``source`` — the row's ``data_source`` when it has one, else the benchmark's name.

What ``spec`` may be, tried in this order:

1. ``lab:<set>`` — a lab prompt set (``lab:test``, ``lab:test-hard``, ...; :func:`opd.lab.prompt_rows`);
2. a path to a ``.parquet`` / ``.jsonl`` / ``.json`` / ``.csv`` file or a ``datasets`` ``save_to_disk``
   directory (read by :func:`opd.datafiles.read_rows`, the reader training uses);
3. a bare name plus ``data_dir``: the first of ``<data_dir>/<name><suffix>`` then
   ``<data_dir>/<name>-test<suffix>`` that exists, for the suffixes ``.parquet .jsonl .json .csv``
   (``aime24`` → ``aime24.parquet``, ``gsm8k`` → ``gsm8k-test.jsonl``).

The field mapping is :mod:`opd.data`'s: ``prompt_field="auto"`` takes the first of
:data:`opd.data.PROMPT_FIELDS` present in the first row, ``answer_field="auto"`` the first of
:data:`opd.data.ANSWER_FIELDS` (``reward_model.ground_truth`` of verl files, ``answer``, ``solution``, ...);
dotted names walk nested dicts. A benchmark must have answers: a file without an answer field, or a row
whose answer is missing or empty, is an error naming the row and the fix.

``limit`` > 0 keeps a random sample of ``limit`` rows (drawn with ``seed``, kept in file order), so a
quick run sees easy and hard rows alike; ``limit = 0`` keeps every row.

opd bundles and downloads no benchmark: the files are the user's (verl's preprocessing scripts write
the Parquet layout of AIME24/25, AMC23 and MATH-500; GSM8K's test split is one JSONL file).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from opd.data import (
    _MISSING,
    ANSWER_FIELDS,
    _clean_answer,
    _get_field,
    _resolve_field,
    resolve_prompt_field,
)
from opd.datafiles import SUPPORTED_SUFFIXES, read_rows
from opd.lab import LAB_PREFIX

__all__ = [
    "BENCHMARK_SUFFIXES",
    "Benchmark",
    "ID_FIELDS",
    "load_benchmark",
    "resolve_benchmark_path",
    "sample_indices",
]

BENCHMARK_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
"""Suffixes tried, in order, when a benchmark is named by ``name`` + ``data_dir``."""
ID_FIELDS = ("id", "unique_id", "idx", "extra_info.index")
"""Row fields used, in order, as the row's ``id`` (else its position in the file)."""


@dataclass
class Benchmark:
    """A benchmark: ``name`` (the file stem, or ``lab:<set>``), ``rows`` (dicts with ``id``, ``prompt``,
    ``answer``, ``source``) and ``path`` (the file read; None for a lab set)."""

    name: str
    rows: list[dict[str, Any]]
    path: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, limit: int, seed: int = 0) -> Benchmark:
        """The rows :func:`load_benchmark` keeps for ``limit`` / ``seed`` (itself when ``limit`` is 0 or
        covers every row), so limiting a loaded benchmark again with the same values changes nothing."""
        keep = sample_indices(len(self.rows), limit, seed)
        return self if len(keep) == len(self.rows) else replace(self, rows=[self.rows[i] for i in keep])


def sample_indices(n: int, limit: int, seed: int) -> list[int]:
    """Indices of a seeded random sample of ``limit`` of ``n`` rows, ascending; all of them when
    ``limit`` is 0 or at least ``n``."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def resolve_benchmark_path(spec: str, data_dir: str | Path | None = None) -> Path:
    """The file (or ``save_to_disk`` directory) a benchmark ``spec`` names (module docstring, 2-3)."""
    path = Path(spec)
    if path.exists():
        return path
    looks_like_path = path.suffix.lower() in SUPPORTED_SUFFIXES or len(path.parts) > 1
    if looks_like_path:
        raise FileNotFoundError(
            f"benchmark {spec!r}: no such file; check the path, or name a benchmark file in --data-dir "
            "by its name (e.g. aime24 for DATA_DIR/aime24.parquet)"
        )
    if data_dir is None:
        raise FileNotFoundError(
            f"benchmark {spec!r} is not a file; pass its path (e.g. data/{spec}.parquet), or --data-dir DIR "
            f"(data_dir=DIR) holding {spec}.parquet / {spec}.jsonl, or a lab set such as lab:test"
        )
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data_dir {str(root)!r} is not a directory; pass the folder that holds the benchmark files"
        )
    tried = [root / f"{spec}{tail}{suffix}" for tail in ("", "-test") for suffix in BENCHMARK_SUFFIXES]
    for candidate in tried:
        if candidate.exists():
            return candidate
    present = sorted(p.name for p in root.iterdir() if p.suffix.lower() in BENCHMARK_SUFFIXES)
    raise FileNotFoundError(
        f"benchmark {spec!r}: none of {', '.join(p.name for p in tried[:2])}, ... in data_dir {str(root)!r} "
        f"(it holds: {', '.join(present) or 'no benchmark files'}); pass one of those names or a file path"
    )


def load_benchmark(
    spec: str,
    data_dir: str | Path | None = None,
    *,
    prompt_field: str = "auto",
    answer_field: str = "auto",
    limit: int = 0,
    seed: int = 0,
) -> Benchmark:
    """Read the benchmark ``spec`` into the schema of the module docstring.

    Args:
        spec: ``lab:<set>``, a file path, or a name looked up in ``data_dir``.
        data_dir: folder of benchmark files for bare names (never needed for paths or lab sets).
        prompt_field: field holding the problem (string or chat messages); ``"auto"`` tries
            :data:`opd.data.PROMPT_FIELDS`.
        answer_field: field holding the ground truth (dotted paths allowed); ``"auto"`` tries
            :data:`opd.data.ANSWER_FIELDS`.
        limit: keep a seeded random sample of this many rows (in file order); 0 keeps all.
        seed: seed of that sample.
    """
    if limit < 0:
        raise ValueError(f"limit={limit}: must be >= 0 (0 = every row)")
    if spec.startswith(LAB_PREFIX):
        name, path, raw = spec, None, read_rows(spec)
    else:
        file = resolve_benchmark_path(spec, data_dir)
        name = file.name if file.is_dir() else file.stem
        path, raw = str(file), read_rows(file)
    where = path or name
    if not raw:
        raise ValueError(f"benchmark {where!r} has no rows; check the file")
    p_field = resolve_prompt_field(raw[0], prompt_field, f"benchmark {where!r}")
    a_field = _resolve_field(raw[0], answer_field, ANSWER_FIELDS)
    if a_field is None:
        raise ValueError(
            f"benchmark {where!r}: row 0 has none of the answer fields {list(ANSWER_FIELDS)} (fields: "
            f"{sorted(raw[0])}); pass answer_field=<name> naming the ground-truth field"
        )
    id_field = next((f for f in ID_FIELDS if _get_field(raw[0], f) not in (_MISSING, None)), None)

    rows = []
    for i in sample_indices(len(raw), limit, seed):
        row = raw[i]
        prompt = _get_field(row, p_field)
        if prompt is _MISSING or prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError(
                f"benchmark {where!r}: row {i} has no prompt in field {p_field!r} (fields: {sorted(row)}); "
                "fill it, remove the row, or pass prompt_field=<name>"
            )
        answer = _get_field(row, a_field)
        answer = None if answer is _MISSING else _clean_answer(answer)
        if not answer:
            raise ValueError(
                f"benchmark {where!r}: row {i} has no answer in field {a_field!r} (fields: {sorted(row)}); "
                "fill it, remove the row, or pass answer_field=<name>"
            )
        row_id = _get_field(row, id_field) if id_field else _MISSING
        source = row.get("data_source")
        rows.append(
            {
                "id": str(i if row_id in (_MISSING, None) else row_id),
                "prompt": prompt,
                "answer": answer,
                "source": str(source) if source else name,
            }
        )
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise ValueError(
            f"benchmark {where!r}: id {dup!r} appears more than once in field {id_field!r}; ids must be "
            "unique (predictions are matched to prompts by id): deduplicate the file"
        )
    return Benchmark(name=name, rows=rows, path=path)
