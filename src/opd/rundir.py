"""The run directory: one writer at a time, never clobbered, never pointed at its own inputs.

Guarantees (docs/reliability.md lists them with the faults they cover):

- **One run per directory.** :class:`RunLock` holds an exclusive ``fcntl.flock`` on
  ``OUTPUT_DIR/.opd.lock`` for the whole run. The kernel drops the lock when the process dies, however
  it dies, so a second run into the same directory is refused while the first is alive. The lock file
  records pid, host and start time: a file left by a dead process on this host is taken over with a
  log line; one left by another host (network file systems do not always share ``flock`` locks across
  machines) is refused with the fix.
- **Inputs are never outputs.** :func:`check_output_dir` refuses an empty ``output_dir`` (it would mean
  the current directory), an existing file, and a directory that is or contains a model or data path
  the run reads (writing ``config.json`` into the student's directory breaks the student).
- **A finished run is never overwritten by accident.** :func:`prepare_train_dir` refuses a non-empty
  directory unless ``resume=true`` (and then the saved config must agree on everything that defines
  the run, see :data:`RESUME_MAY_CHANGE`) or ``overwrite=true`` (which removes only opd's own run files,
  and only once the new run has loaded its models and data).
- **A run that failed before writing anything leaves nothing behind**: :func:`locked_run_dir` removes
  the directories it created, and a fresh training run that failed before its first step removes the
  ``config.json`` (and step-0 metrics) it wrote.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from opd.checkpoint import list_checkpoints
from opd.config_io import translate_old_keys
from opd.lab import LabModel, LabNameError, resolve

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX (Windows)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("opd")

LOCK_NAME = ".opd.lock"
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "metrics.tmp",
    "summary.json",
    "checkpoints",
    "final",
    "tb",
    "teacher_data.jsonl",
    "teacher_data.jsonl.stats.json",
)
"""What a training run writes into its ``output_dir`` (``opd sft`` adds its teacher data; ``overwrite=true`` removes exactly these,
plus ``.tmp-final-*`` debris; anything else in the directory is left alone)."""

RESUME_MAY_CHANGE = frozenset(
    {
        "steps",
        "save_every",
        "keep_checkpoints",
        "resume",
        "overwrite",
        "output_dir",
        "progress",
        "threads",
        "device",
        "teacher_device",
        "teacher_timeout",
        "teacher_retries",
        "alerts",
        "stop_on_alert",
        "alert_thresholds",
        "eval_every",
        "eval_prompts",
        "eval_limit",
        "eval_temperature",
        "eval_samples",
    }
)
"""OPDConfig keys that may differ between a run and its resumption: the length of the run, checkpoint
cadence, where it lives and which devices it runs on (a CPU run may continue on a GPU; floating-point
results then differ by rounding), logging, alerts and periodic evaluation (which samples from its own seeded
generator, so it never changes the training trajectory). Every other key (models, dtypes, data and
prompt rendering, batch shape, objective, optimiser, seed) defines the run and is refused on resume.
With ``lr_schedule=cosine`` a changed ``steps`` re-stretches the decay over the new length."""


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message names it and says the fix."""


# --------------------------------------------------------------------------- output_dir vs inputs


def _input_path(value: str, kind: str) -> Path | None:
    """The local file or directory an input string refers to, or None (hub id, ``lab:`` data split,
    or a path that does not exist, which the loader reports)."""
    if not value:
        return None
    try:
        lab = resolve(value)
    except LabNameError:  # reported by the loader
        return None
    if lab is not None:
        return lab.directory.resolve() if isinstance(lab, LabModel) and kind == "model" else None
    p = Path(value).expanduser()
    return p.resolve() if p.exists() else None


def check_output_dir(
    path: str | os.PathLike | None,
    *,
    models: Mapping[str, str] = {},
    data: Mapping[str, str] = {},
    key: str = "output_dir",
) -> Path:
    """Refuse an output directory that is empty, an existing file, or is/contains an input path.

    ``models`` / ``data`` map config keys (``student``, ``prompts``...) to the values given. Returns
    the directory as a ``Path``.
    """
    if path is None or not str(path).strip():
        raise RunDirError(
            f"{key} is empty: give the directory the run should write to, e.g. {key}=runs/my-run "
            "(it is never taken to mean the current directory)"
        )
    out = Path(str(path)).expanduser()
    if out.exists() and not out.is_dir():
        raise RunDirError(
            f"{key}={str(path)!r} is an existing file, not a directory: choose a directory path"
        )
    resolved = out.resolve()
    for kind, inputs in (("model", models), ("data", data)):
        for name, value in inputs.items():
            p = _input_path(str(value or ""), kind)
            if p is None:
                continue
            if p == resolved or resolved in p.parents:
                what = "is" if p == resolved else "contains"
                raise RunDirError(
                    f"{key}={str(path)!r} {what} the {name} {kind} {str(value)!r}: the run would write its "
                    f"files over its own input; choose another {key}"
                )
    return out


# --------------------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    bits = [f"pid {holder.get('pid', '?')}", f"on host {holder.get('host', '?')}"]
    if holder.get("started"):
        bits.append(f"started {holder['started']}")
    return ", ".join(bits)


class RunLock:
    """Exclusive, process-lifetime lock on a directory (``flock`` on ``DIR/.opd.lock``).

    ``acquire`` raises :class:`RunDirError` when another live process holds it. ``release`` removes
    the lock file, then closes it (closing drops the lock); the inode check in ``acquire`` makes the
    remove-then-close order safe against a process that opened the old file in between.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover - not POSIX
            log.warning("%s: not locked (run-directory locking needs POSIX fcntl)", self.directory)
            return
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                who = f" ({_describe(holder)})" if holder else ""
                raise RunDirError(
                    f"output directory {str(self.directory)!r} is in use by another opd run{who}: wait for "
                    "it to finish, or choose another output directory"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock: retry
                os.close(fd)
                continue
            previous = _read_holder(fd)
            if previous:
                try:
                    self._check_stale(previous)
                except BaseException:
                    os.close(fd)  # leave the other host's file in place for the user to judge
                    raise
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                "command": " ".join(sys.argv[:3]),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return
        raise RunDirError(f"could not lock {str(self.directory)!r}: the lock file keeps changing; retry")

    def _check_stale(self, previous: dict[str, Any]) -> None:
        """A lock file with content that nobody holds: a run that died without releasing it."""
        if previous.get("host") != socket.gethostname():
            raise RunDirError(
                f"output directory {str(self.directory)!r} has a lock left by an opd run on another host "
                f"({_describe(previous)}) that cannot be checked from here: if that run is no longer "
                f"running, delete {str(self.path)!r} and retry"
            )
        pid = previous.get("pid")
        state = "no longer running" if not (isinstance(pid, int) and _pid_alive(pid)) else "not holding it"
        log.warning(
            "%s: taking over a stale lock from a run that ended without releasing it (%s; %s)",
            self.directory,
            _describe(previous),
            state,
        )

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}


# --------------------------------------------------------------------------- the directory


class RunDir:
    """A locked output directory. ``created``: the directories this process made (outermost first)."""

    def __init__(self, path: Path, created: list[Path], lock: RunLock):
        self.path = path
        self.created = created
        self.lock = lock
        self.fresh = False
        """True when every run file in the directory was written by this run (an empty directory at
        the start, or one cleared by ``overwrite``); set by :func:`prepare_train_dir`."""
        self.previous_run: list[str] = []
        """Run files of an earlier run that ``overwrite=true`` replaces (see :meth:`clear_previous_run`)."""

    def entries(self) -> list[str]:
        """Names in the directory other than the lock file."""
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK_NAME)

    def clear_previous_run(self) -> None:
        """Remove the earlier run that ``overwrite=true`` replaces. Called once models and data have
        loaded, so a run that cannot start leaves the earlier one intact."""
        for name in self.previous_run:
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        if self.previous_run:
            log.warning(
                "overwrite=true: removed the previous run's %s from %s",
                ", ".join(self.previous_run),
                self.path,
            )
            self.previous_run = []
            self.fresh = True


@contextlib.contextmanager
def locked_run_dir(
    path: str | os.PathLike | None,
    *,
    models: Mapping[str, str] = {},
    data: Mapping[str, str] = {},
    key: str = "output_dir",
) -> Iterator[RunDir]:
    """Check, create and lock an output directory for the duration of the ``with`` block.

    On any exit the lock is released. On an exception, a fresh training run that wrote nothing lasting
    (see :func:`_rollback_fresh_run`) is undone, and directories this call created are removed if empty.
    """
    out = check_output_dir(path, models=models, data=data, key=key)
    created = _make_dirs(out)
    lock = RunLock(out)
    try:
        lock.acquire()
    except BaseException:
        _remove_empty(created)
        raise
    run = RunDir(out, created, lock)
    try:
        yield run
    except BaseException:
        if run.fresh:
            _rollback_fresh_run(out)
        lock.release()
        _remove_empty(created)
        raise
    lock.release()


def _make_dirs(out: Path) -> list[Path]:
    missing = []
    p = out.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunDirError(f"cannot create {str(out)!r}: a parent of it is a file, not a directory") from None
    except PermissionError as e:
        raise RunDirError(f"cannot create {str(out)!r}: {e.strerror}; choose a writable directory") from None
    return list(reversed(missing))


def _remove_empty(created: list[Path]) -> None:
    for d in reversed(created):  # innermost first
        try:
            d.rmdir()
        except OSError:
            return  # not empty (someone wrote there), or already gone


def _rollback_fresh_run(out: Path) -> None:
    """Undo a fresh training run that failed before its first step: its ``config.json``, step-0 metrics
    and empty checkpoint folder carry nothing a rerun would not write again, and leaving them would
    make the rerun refuse the directory."""
    if (out / "final").exists() or (out / "summary.json").exists() or list_checkpoints(out):
        return
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) >= 1:
                    return
            except ValueError:
                continue
    for name in ("config.json", "metrics.jsonl", "metrics.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    ck = out / "checkpoints"
    if ck.is_dir() and all(p.name.startswith(".tmp-") for p in ck.iterdir()):
        shutil.rmtree(ck, ignore_errors=True)


# --------------------------------------------------------------------------- train's rules


def prepare_train_dir(
    run: RunDir,
    config: Mapping[str, Any],
    defaults: Mapping[str, Any],
    *,
    resume: bool,
    overwrite: bool,
) -> None:
    """Apply the non-empty-directory rules of ``opd train`` (module docstring) before any model loads.

    ``config``: the new run's config as a JSON-ready dict; ``defaults``: each key's default (for keys a
    saved config predates).
    """
    entries = run.entries()
    if not entries:
        run.fresh = True
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if overwrite:  # removed by run.clear_previous_run(), once the new run is ready to write
        run.previous_run = [n for n in entries if n in RUN_FILES or n.startswith(".tmp-final-")]
        return
    if not resume:
        raise RunDirError(
            f"output_dir {str(run.path)!r} is not empty ({shown}): pass resume=true to continue the run in "
            "it, overwrite=true to replace it, or choose another output_dir"
        )
    saved_path = run.path / "config.json"
    if saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text())
        except ValueError:
            raise RunDirError(
                f"resume=true: {str(saved_path)!r} is not readable JSON, so the run cannot be checked; "
                "restore it or start a new run (another output_dir, or overwrite=true)"
            ) from None
        # a run saved by an earlier version: its renamed keys (top_k, rollout_top_k) in today's names
        diffs = config_changes(translate_old_keys(saved), config, defaults)
        if diffs:
            raise RunDirError(
                f"resume=true: output_dir {str(run.path)!r} holds a run with different settings that define "
                f"it ({'; '.join(diffs)}): restore them to continue that run, or start a new one "
                "(another output_dir, or overwrite=true)"
            )
    elif list_checkpoints(run.path):
        log.warning("resume=true: %s has no config.json, so the resumed settings cannot be checked", run.path)
    if not list_checkpoints(run.path) and (
        (run.path / "final").exists() or (run.path / "summary.json").exists()
    ):
        raise RunDirError(
            f"resume=true: output_dir {str(run.path)!r} holds a finished run with no checkpoint to continue "
            "from (save_every=0): resuming would redo it from step 0 over its results; pass overwrite=true "
            "to do that, or choose another output_dir"
        )


def config_changes(
    saved: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any]
) -> list[str]:
    """``"key: old -> new"`` for each run-defining key whose value differs (keys a saved config
    predates count as their default)."""
    out = []
    for key, value in new.items():
        if key in RESUME_MAY_CHANGE:
            continue
        old = saved.get(key, defaults.get(key))
        if _norm(old) != _norm(value):
            out.append(f"{key}: {old!r} -> {value!r}")
    return out


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


# --------------------------------------------------------------------------- interrupts

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
"""Exit status of ``opd`` after an interrupt: 128 + the signal number, the shell's convention."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM. ``summary``: what ``summary.json`` says (None when the signal
    came before training started, so nothing was saved). A ``KeyboardInterrupt``, so code that does not
    handle it stops as it would on Ctrl-C."""

    def __init__(self, signal_name: str, summary: dict[str, Any] | None = None):
        self.signal_name = signal_name
        self.summary = summary
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal_name, 130)

    def message(self) -> str:
        s = self.summary
        if not s:
            return f"interrupted by {self.signal_name} before training started; nothing was saved"
        return (
            f"interrupted by {self.signal_name} after step {s['steps_done']}: checkpoint "
            f"{s['checkpoint']}; continue with resume=true and the same output_dir={s['output_dir']}"
        )


class StopSignals:
    """Turn SIGINT/SIGTERM into a stop request at the next step boundary.

    Until :meth:`arm` is called (model loading, data preparation) a signal aborts at once by raising
    :class:`RunInterrupted`: there is nothing to save yet. Once armed, the first signal only sets
    :attr:`requested`; the training loop checks it after each step, saves a checkpoint and stops. A
    second signal aborts at once (``KeyboardInterrupt``), leaving the newest periodic checkpoint. The
    handlers are installed only in the main thread (Python delivers signals there) and restored on exit.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested: str | None = None
        self.armed = False
        self._old: dict[int, Any] = {}

    def arm(self) -> None:
        self.armed = True

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise RunInterrupted(name)
        if self.requested is not None:
            sys.stderr.write(f"\n[opd] second {name}: aborting now, without a checkpoint of this step\n")
            raise KeyboardInterrupt(f"second {name}")
        self.requested = name
        sys.stderr.write(
            f"\n[opd] {name}: finishing this step, then saving a checkpoint and stopping "
            f"(send it again to abort at once)\n"
        )
        sys.stderr.flush()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
