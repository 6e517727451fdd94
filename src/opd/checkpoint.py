"""Atomic, resumable checkpoints.

Layout: ``OUTPUT_DIR/checkpoints/step-000010/`` holding ``model/`` (:func:`opd.models.save_model`),
``optimizer.pt`` and ``scheduler.pt`` (plain tensors and numbers, read back with
``torch.load(weights_only=True)``, which never unpickles arbitrary objects), ``rng.json`` (python,
numpy and torch generator states) and ``state.json`` (step, data position, anything else the method
needs). A checkpoint is written into ``.tmp-step-000010-<pid>/`` and renamed into place only when
complete (``os.replace`` of a directory is atomic on POSIX), so a crash while writing leaves at most a
stray temporary directory, which is ignored and cleaned up on the next save.

The ``COMPLETE`` marker lists every file of the checkpoint with its size. :func:`verify_checkpoint`
checks the marker, the sizes, the safetensors headers and the JSON files without loading tensors;
:func:`load_newest_checkpoint` skips a newest checkpoint that fails the check (or fails to load), says
so, and restores the newest one that works. Pickled files (``optimizer.pt``, ``scheduler.pt``) are read
with torch's safe loader only; a file that needs more than plain tensors and numbers is refused with
:class:`UnsafeFileError`, never loaded some other way.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from opd.models import save_model

log = logging.getLogger("opd")

_STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE_MARKER = "COMPLETE"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as JSON-serialisable values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / COMPLETE_MARKER).exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: dict[str, Any] | None = None,
    keep: int = 2,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` complete ones. ``optimizer_state``:
    an optimiser state dict gathered beforehand (a sharded student's, :func:`opd.fsdp.full_state`), written
    instead of ``optimizer.state_dict()``."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stray in root.glob(".tmp-step-*"):  # left behind by a crash mid-write
        shutil.rmtree(stray, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, tokenizer, tmp / "model", atomic=False)  # the whole checkpoint is renamed below
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    elif optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "rng.json").write_text(json.dumps(rng_state()))
    (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=1))
    sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"files": sizes}, indent=1) + "\n")
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_model_state(model: torch.nn.Module, path: Path, sd: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(sd)``; tied embeddings are stored once, anything else missing is an error."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing={missing} unexpected={unexpected}"
        )


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    loaders: tuple[Callable[[dict], None], Callable[[dict], None]] | None = None,
) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG in place from ``path``; returns ``state.json``. ``loaders``:
    ``(load_model, load_optimizer)`` that take the full state dicts read from disk instead of
    ``load_state_dict`` (a sharded student, :func:`opd.fsdp.loaders`)."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).exists():
        raise FileNotFoundError(f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker); delete it")
    sd: dict[str, torch.Tensor] = {}
    for f in sorted((path / "model").glob("*.safetensors")):
        sd.update(load_file(f))
    load_model, load_optimizer = loaders or (partial(_load_model_state, model, path), None)
    load_model(sd)
    if optimizer is not None:
        (load_optimizer or optimizer.load_state_dict)(safe_torch_load(path / "optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(safe_torch_load(path / "scheduler.pt"))
    if restore_rng:
        set_rng_state(json.loads((path / "rng.json").read_text()))
    return json.loads((path / "state.json").read_text())


class UnsafeFileError(ValueError):
    """A pickle file asks to build objects other than tensors and numbers; it was not loaded."""


class CheckpointError(ValueError):
    """A checkpoint is incomplete, truncated or unreadable; the message says what and the fix."""


def unsafe_pickle_error(path: str | Path, err: BaseException) -> UnsafeFileError:
    """The one-line error for a pickle that torch's safe loader (``weights_only=True``) refused.

    Keeps torch's reason (e.g. ``unsupported GLOBAL posix.system``) and drops its advice to retry with
    the protection off: a file opd or transformers wrote never needs that, so such a file was replaced
    or came from elsewhere.
    """
    skip = ("weights only load failed", "re-running", "please file an issue", "check the documentation")
    reason = " ".join(
        line.strip()
        for line in str(err).splitlines()
        if line.strip() and not any(line.strip().lower().startswith(s) for s in skip)
    )
    reason = reason.replace("weights_only", "safe loading")[:200] or type(err).__name__
    return UnsafeFileError(
        f"refused to load {str(path)!r} as unsafe: it is a pickle that would create objects other than "
        f"tensors and numbers ({reason}), so loading it could run arbitrary code; files written by opd "
        "or transformers never need that. Delete it or restore it from a copy you trust"
    )


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``; an unsafe pickle raises :class:`UnsafeFileError`."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise unsafe_pickle_error(path, err) from None


def verify_checkpoint(path: str | Path) -> str | None:
    """None when ``path`` looks complete and readable, else the reason it is not (one phrase).

    Checks the ``COMPLETE`` marker, the file sizes it lists (older checkpoints have a bare marker),
    that ``model/`` holds at least one safetensors file whose header parses and covers the file, and
    that ``state.json`` and ``rng.json`` parse. Tensors are not loaded.
    """
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} marker (written last, so the save did not finish)"
    try:
        listed = json.loads(marker.read_text()).get("files", {})
    except (ValueError, AttributeError):
        listed = {}  # a bare "ok" marker of an older checkpoint
    for rel, size in listed.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} is {f.stat().st_size} bytes, {size} were written (truncated or modified)"
    shards = sorted((path / "model").glob("*.safetensors"))
    if not shards:
        return "model/ holds no .safetensors file"
    for f in shards:
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            return f"{f.relative_to(path)} is unreadable ({str(err).splitlines()[0]})"
    for name in ("state.json", "rng.json"):
        try:
            json.loads((path / name).read_text())
        except (OSError, ValueError) as err:
            return f"{name} is unreadable ({type(err).__name__})"
    return None


def load_newest_checkpoint(
    output_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    loaders: tuple[Callable[[dict], None], Callable[[dict], None]] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """Restore the newest checkpoint under ``output_dir`` that verifies and loads; None when there is none.

    A newer checkpoint that fails is skipped with a warning naming it and why (each load replaces the
    model, optimizer, scheduler and RNG state entirely, so a half-finished failed load leaves nothing
    behind). :class:`CheckpointError` when checkpoints exist but none is usable; an unsafe pickle
    raises :class:`UnsafeFileError` at once rather than falling back past a tampered file.
    """
    root = checkpoint_root(output_dir)
    candidates = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir():
                candidates.append((int(m.group(1)), d))
    problems = []
    for _, path in sorted(candidates, reverse=True):
        why = verify_checkpoint(path)
        if why is None:
            try:
                return path, load_checkpoint(
                    path, model=model, optimizer=optimizer, scheduler=scheduler, loaders=loaders
                )
            except UnsafeFileError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure to load means: try the previous one
                why = f"loading failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
        problems.append(f"{path.name}: {why}")
        log.warning("checkpoint %s is unusable (%s): falling back to the previous one", path, why)
    if problems:
        raise CheckpointError(
            f"no usable checkpoint in {str(root)!r} ({'; '.join(problems)}): restore one, or start over "
            "with overwrite=true"
        )
    return None


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return key in keys or (key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
