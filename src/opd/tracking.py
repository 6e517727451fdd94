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
    """Append-only JSONL writer. ``truncate_after(step)`` drops lines of steps after a resumed checkpoint."""

    def __init__(self, path: str | Path, *, backends: tuple[str, ...] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional extra: only when asked for

                self._tb = SummaryWriter(str(self.path.parent / "tb"))
            except ImportError as e:  # pragma: no cover - optional
                raise RuntimeError("tensorboard logging needs `pip install tensorboard`") from e
        if "wandb" in backends:
            try:
                import wandb  # type: ignore  # optional extra: only when asked for

                self._wandb = wandb
            except ImportError as e:  # pragma: no cover - optional
                raise RuntimeError("wandb logging needs `pip install opd[wandb]`") from e

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
        if self._wandb is not None and self._wandb.run is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


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
