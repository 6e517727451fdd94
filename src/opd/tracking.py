"""Metric tracking: one JSON line per step in ``metrics.jsonl`` always; TensorBoard / wandb when asked
for and installed; progress bars."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


class MetricsLogger:
    """Append-only JSONL writer (``metrics.jsonl``, always), mirrored to the experiment trackers named in
    ``backends`` (``tensorboard`` → ``<run>/tb``, ``wandb``, ``trackio``) under the same metric names.
    Each tracker is imported only when chosen; a missing one is a one-line error naming its install.
    ``truncate_after(step)`` drops lines of steps after a resumed checkpoint."""

    def __init__(
        self,
        path: str | Path,
        *,
        backends: tuple[str, ...] = (),
        config: dict[str, Any] | None = None,
        project: str = "opd",
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None
        self._trackio = None
        run_name = self.path.parent.name
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional extra
            except ImportError:
                raise RuntimeError(
                    "report_to=tensorboard needs the tensorboard package: pip install 'opd[tensorboard]'"
                ) from None
            self._tb = SummaryWriter(str(self.path.parent / "tb"))
        if "wandb" in backends:
            try:
                import wandb  # type: ignore  # optional extra
            except ImportError:
                raise RuntimeError(
                    "report_to=wandb needs the wandb package: pip install 'opd[wandb]'"
                ) from None
            self._wandb = wandb
            if wandb.run is None:
                wandb.init(project=project, name=run_name, config=config, dir=str(self.path.parent))
        if "trackio" in backends:
            try:
                import trackio  # type: ignore  # optional extra
            except ImportError:
                raise RuntimeError(
                    "report_to=trackio needs the trackio package: pip install 'opd[trackio]'"
                ) from None
            self._trackio = trackio
            trackio.init(project=project, name=run_name, config=config)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        os.replace(tmp, self.path)

    def log(self, metrics: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        step = row.get("step")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._wandb is not None and self._wandb.run is not None:
            self._wandb.log(scalars, step=step)
        if self._trackio is not None:
            self._trackio.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._trackio is not None:
            self._trackio.finish()
        if self._wandb is not None and self._wandb.run is not None:
            self._wandb.finish()


class NullMetricsLogger:
    """What processes other than rank 0 log into: nothing (the same methods as :class:`MetricsLogger`)."""

    def truncate_after(self, step: int) -> None:
        pass

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def read_metrics_if_any(path: str | Path | None) -> list[dict[str, Any]]:
    """:func:`read_metrics` of ``path``; [] when there is no path or no file (a run that has not logged)."""
    return read_metrics(path) if path and Path(path).is_file() else []


def progress(iterable=None, *, total=None, desc="", enabled=True, initial=0, unit="it"):
    """A tqdm bar (to stderr), or a no-op wrapper when disabled."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=not enabled,
        initial=initial,
        unit=unit,
        dynamic_ncols=True,
        leave=True,
    )
