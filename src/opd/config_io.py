"""Reading configs: YAML files plus ``key=value`` overrides into a typed config dataclass.

:func:`load_config` (file + overrides → validated dataclass, unknown keys refused with a did-you-mean
hint, keys of earlier versions named with their replacement), the value coercion each config's
``__post_init__`` runs (:func:`_coerce_types`), and the ``--help`` text built from each field's
docstring (:func:`field_docs`, :func:`help_text`). The config dataclasses themselves are in
:mod:`opd.config`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from opd.errors import ConfigError
from opd.textfiles import read_utf8

RENAMED_KEYS: dict[str, str] = {
    "top_k": "objective + support_size (top_k=K>0 -> objective=topk support_size=K; top_k=0 -> "
    "objective=sampled; top_k=-1 -> objective=full)",
    "rollout_top_k": "sample_top_k",
    "out_dir": "output_dir",
    "out": "output_dir",
}
"""Keys of earlier versions → what replaced them (named in the error for an old key)."""


def translate_old_keys(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config of an earlier version (``config.json`` of a run being resumed) in today's keys:
    ``top_k`` → ``objective`` + ``support_size``, ``rollout_top_k`` → ``sample_top_k``. New keys win."""
    out = dict(values)
    if "top_k" in out:
        k = out.pop("top_k")
        if isinstance(k, int) and "objective" not in out:
            out["objective"] = "sampled" if k == 0 else ("full" if k < 0 else "topk")
            if k > 0:
                out.setdefault("support_size", k)
    if "rollout_top_k" in out:
        out.setdefault("sample_top_k", out.pop("rollout_top_k"))
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Field name → docstring (the string literal right after each annotated field), inherited parts
    included (a method's config reuses the docstrings of the shared parts it inherits)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        source = textwrap.dedent(inspect.getsource(klass))  # a class defined inside a function is indented
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for prev, node in zip(body, body[1:]):
            if (
                isinstance(prev, ast.AnnAssign)
                and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def load_yaml_text(text: str, where: str, example: str = "") -> Any:
    """``yaml.safe_load(text)``; a syntax error becomes a ConfigError naming ``where`` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}; fix the syntax there{example}") from None


def _field_type(cls: type, name: str) -> Any:
    return get_type_hints(cls)[name]


def _coerce_value(tp: Any, value: Any, key: str) -> Any:
    """Convert YAML/CLI values to the field type, with an error naming the key on failure."""
    origin = get_origin(tp)
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}: null is not allowed; give a value")
    if origin is not None and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _coerce_value(inner[0], value, key)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = load_yaml_text(value, key, f", e.g. {key}=[0.9, 0.999]")
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
                return tuple(_coerce_value(args[0], v, key) for v in value)
            return tuple(_coerce_value(a, v, key) for a, v in zip(args, value, strict=True))
        if tp is dict or origin is dict:
            if isinstance(value, str):
                value = load_yaml_text(value, key, f", e.g. {key}={{name: 1, other: 2}}") or {}
            if not isinstance(value, dict):
                raise ValueError
            return value
    except ConfigError:
        raise
    except (ValueError, TypeError):
        raise ConfigError(
            f"{key}={value!r}: expected a value of type {getattr(tp, '__name__', tp)}"
        ) from None
    return value


def _coerce_types(obj: Any) -> None:
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        setattr(obj, f.name, _coerce_value(hints[f.name], getattr(obj, f.name), f.name))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. steps=10)")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"override {item!r}: {key!r} is not a config key")
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key] = raw
        # keep strings like "lab:student" or paths as given
        if isinstance(out[key], (dict, list)) and key not in (
            "chat_template_kwargs",
            "adam_betas",
            "alert_thresholds",
        ):
            out[key] = raw
    return out


def build_config(cls: type, values: dict[str, Any], command: str = "train"):
    """Instantiate ``cls`` from a dict, rejecting unknown keys with a did-you-mean hint (and the
    ``opd <command> --help`` that lists the keys)."""
    names = {f.name for f in fields(cls)}
    unknown = [k for k in values if k not in names]
    renamed = [k for k in unknown if k in RENAMED_KEYS and RENAMED_KEYS[k].split()[0] in names]
    if renamed:
        raise ConfigError("; ".join(f"config key {k!r} was renamed: use {RENAMED_KEYS[k]}" for k in renamed))
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"unknown config key(s) for {cls.__name__}: {', '.join(hints)}; run "
            f"`opd {command} --help` for the list"
        )
    return cls(**values)


def load_config(
    cls: type,
    path: str | Path | None = None,
    overrides: list[str] | dict | None = None,
    command: str = "train",
):
    """YAML file (optional) + overrides → validated config of type ``cls`` (``command``: the CLI
    subcommand named in the error for an unknown key)."""
    return build_config(cls, config_values(path, overrides), command)


def config_values(
    path: str | Path | None, overrides: list[str] | dict | None, what: str = "config file"
) -> dict[str, Any]:
    """The raw values of a YAML file (optional; ``what`` names it in the errors) updated with the
    overrides (``key=value`` strings or a mapping), before any type checking: a missing file or one whose
    top level is not a mapping is a :class:`ConfigError` naming it."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{what} {str(p)!r} not found")
        loaded = load_yaml_text(read_utf8(p), f"{what} {str(p)!r}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{what} {str(p)!r}: expected a mapping of key: value at the top level")
        values.update(loaded)
    if overrides:
        values.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return values


DTYPES = ("float32", "bfloat16", "float16")
"""The weight dtypes a model loads in."""


def below(cfg: Any, keys: tuple[str, ...], low: int, note: str = "") -> list[str]:
    """One rule violation ``key=value: must be >= low`` (then ``note``) for each of ``keys`` whose value
    in ``cfg`` is below ``low``."""
    return [f"{key}={getattr(cfg, key)}: must be >= {low}{note}" for key in keys if getattr(cfg, key) < low]


def dtype_errors(cfg: Any, keys: tuple[str, ...]) -> list[str]:
    """One rule violation for each of ``keys`` whose value in ``cfg`` is not one of :data:`DTYPES`."""
    return [
        f"{key}={getattr(cfg, key)!r}: choose float32, bfloat16 or float16"
        for key in keys
        if getattr(cfg, key) not in DTYPES
    ]


def raise_errors(errs: list[str], what: str = "config") -> None:
    """One :class:`ConfigError` listing every rule violation of a config (``invalid <what>:``), if any."""
    if errs:
        raise ConfigError(f"invalid {what}:\n  - " + "\n  - ".join(errs))


def require_keys(cfg: Any, keys: tuple[str, ...], example: str, missing: tuple[str, ...] = ()) -> None:
    """A :class:`ConfigError` naming the keys of ``keys`` that ``cfg`` leaves empty (and the ``missing``
    ones the caller found), with ``example``: a command line that sets them."""
    missing = (*(k for k in keys if not getattr(cfg, k)), *missing)
    if missing:
        raise ConfigError(
            f"missing required key(s): {', '.join(missing)}; set them in the YAML file or as key=value, "
            f"e.g. {example}"
        )


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def help_text(cls: type) -> str:
    """One line per key: name, type, default, meaning (used by ``opd train --help``)."""
    docs = field_docs(cls)
    hints = get_type_hints(cls)
    lines = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tp = hints[f.name]
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"  {f.name} ({tname}, default: {default!r})\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
