"""Failure-signature alerts over the metric history of a run (docs/paper.md §3 and §5).

OPD can fail silently: a stronger teacher can teach nothing, and the failure is visible early at the
token level. ``AlertMonitor`` watches the per-step metric dicts (the lines of metrics.jsonl) and fires
each rule at most once per run:

- ``overlap_not_rising`` (``overlap/ratio``): its least-squares rise over the first ``window`` steps
  is below ``overlap_min_rise``, unless it already averages ``overlap_saturated`` or more;
- ``overlap_mass_falling`` (``overlap/mass_teacher``): its least-squares drop over the last
  ``window`` steps exceeds ``mass_max_drop``;
- ``entropy_spike`` (``entropy/student``): value > ``entropy_spike_factor`` × running median;
- ``grad_norm_spike`` (``grad_norm``): value > ``grad_norm_spike_factor`` × running median;
- ``length_collapse`` / ``length_explode`` (``response/length_mean``): recent mean below early mean
  / ``length_collapse_factor`` / above early mean × ``length_explode_factor``;
- ``truncation_high`` (``response/truncated_frac``): recent mean > ``truncated_frac_max``.

"Running median": median of the previous ``median_window`` values (the current one excluded), used
once ``min_history`` values exist. "Early mean": mean of the first ``smooth`` values of the run;
"recent mean": mean of the last ``smooth`` values (compared only once they do not overlap). The
least-squares rise/drop of values ``y_i`` at steps ``s_i`` over a window of ``w`` steps is
``slope · w`` with ``slope = Σ (s_i − s̄)(y_i − ȳ) / Σ (s_i − s̄)²``: it uses every point, so one
noisy step does not decide it.

Deliberately left out: printing and logging (the caller prints each new alert once and writes it to
metrics.jsonl as ``alert/<name>``), stopping the run (the caller reads ``should_stop``), and any
rule that needs tensors rather than logged scalars. Missing, non-numeric or non-finite values are
ignored (a skipped step logs ``grad_norm = inf``; that is the skip logic's business, not a spike).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ALERT_NAMES", "AlertConfig", "AlertMonitor"]

OVERLAP = "overlap/ratio"
MASS = "overlap/mass_teacher"
ENTROPY = "entropy/student"
GRAD_NORM = "grad_norm"
LENGTH = "response/length_mean"
TRUNCATED = "response/truncated_frac"

ALERT_NAMES = (
    "overlap_not_rising",
    "overlap_mass_falling",
    "entropy_spike",
    "grad_norm_spike",
    "length_collapse",
    "length_explode",
    "truncation_high",
)

_STATE_VERSION = 1


@dataclass
class AlertConfig:
    """Thresholds of the failure-signature alerts; set a threshold to ``None`` to turn its rule off.

    Defaults and why they were chosen: docs/metrics.md ("Alerts").
    """

    stop_on_alert: bool = False
    """Stop the run (``AlertMonitor.should_stop``) as soon as any alert has fired."""

    window: int = 50
    """Steps over which the overlap rise and the mass drop are measured."""

    overlap_min_rise: float | None = 0.02
    """Minimum least-squares rise of ``overlap/ratio`` over the first ``window`` steps. Successful runs
    rise ≈ 0.72 → 0.91 over ~200 steps (≈ 0.05 per 50 steps); failing runs stay flat from the start."""

    overlap_saturated: float = 0.95
    """No ``overlap_not_rising`` alert when ``overlap/ratio`` already averages at least this over the
    first window: there is nothing left to rise."""

    mass_max_drop: float | None = 0.05
    """Maximum least-squares drop of ``overlap/mass_teacher`` over the last ``window`` steps. Successful
    runs hold 0.97–0.99; a drop of 0.05 is far outside that band."""

    entropy_spike_factor: float | None = 2.0
    """Fire when ``entropy/student`` exceeds this multiple of its running median."""

    grad_norm_spike_factor: float | None = 5.0
    """Fire when ``grad_norm`` (before clipping) exceeds this multiple of its running median."""

    median_window: int = 50
    """Number of previous values in the running median of the spike rules."""

    min_history: int = 10
    """Values needed before a spike rule compares against the running median."""

    length_collapse_factor: float | None = 2.0
    """Fire when the recent mean of ``response/length_mean`` falls below early mean / factor."""

    length_explode_factor: float | None = 2.0
    """Fire when the recent mean of ``response/length_mean`` exceeds early mean × factor."""

    truncated_frac_max: float | None = 0.2
    """Fire when the recent mean of ``response/truncated_frac`` (rollouts that hit the length cap)
    exceeds this: their ends get no stop signal and docs/paper.md §5 shows long responses collapse
    from the end."""

    smooth: int = 5
    """Number of values averaged for the early and recent means (length and truncation rules)."""

    def __post_init__(self) -> None:
        for name in ("window", "median_window", "min_history", "smooth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AlertConfig.{name} must be a positive integer, got {value!r}.")
        if self.window < 2:
            raise ValueError(
                f"AlertConfig.window must be at least 2 steps to measure a trend, got {self.window}."
            )
        if self.min_history > self.median_window:
            raise ValueError(
                f"AlertConfig.min_history ({self.min_history}) exceeds median_window ({self.median_window}); "
                "the spike rules would never fire. Lower min_history or raise median_window."
            )
        for name in (
            "entropy_spike_factor",
            "grad_norm_spike_factor",
            "length_collapse_factor",
            "length_explode_factor",
        ):
            value = getattr(self, name)
            if value is not None and not value > 1.0:
                raise ValueError(
                    f"AlertConfig.{name} must be > 1 (or None to disable the rule), got {value!r}."
                )
        for name in ("overlap_min_rise", "mass_max_drop"):
            value = getattr(self, name)
            if value is not None and not value >= 0.0:
                raise ValueError(
                    f"AlertConfig.{name} must be >= 0 (or None to disable the rule), got {value!r}."
                )
        if self.truncated_frac_max is not None and not 0.0 <= self.truncated_frac_max < 1.0:
            raise ValueError(
                f"AlertConfig.truncated_frac_max must be in [0, 1) (or None to disable the rule), "
                f"got {self.truncated_frac_max!r}."
            )
        if not 0.0 < self.overlap_saturated <= 1.0:
            raise ValueError(
                f"AlertConfig.overlap_saturated must be in (0, 1], got {self.overlap_saturated!r}."
            )


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, bool, string, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _ls_change(points: list[tuple[int, float]], span: int) -> float:
    """Least-squares slope of ``points`` (step, value) times ``span`` steps (0 for a single step)."""
    n = len(points)
    s_mean = sum(s for s, _ in points) / n
    y_mean = sum(y for _, y in points) / n
    sxx = sum((s - s_mean) ** 2 for s, _ in points)
    if sxx == 0:
        return 0.0
    sxy = sum((s - s_mean) * (y - y_mean) for s, y in points)
    return sxy / sxx * span


class AlertMonitor:
    """Feed it each step's metrics; it returns the alerts that fire for the first time.

    >>> monitor = AlertMonitor(AlertConfig())
    >>> for step, metrics in enumerate(history):          # doctest: +SKIP
    ...     for key, message in monitor.update(step, metrics).items():
    ...         print(f"[alert] {key}: {message}")
    ...     if monitor.should_stop:
    ...         break
    """

    def __init__(self, config: AlertConfig | None = None) -> None:
        self.config = config if config is not None else AlertConfig()
        self._fired: dict[str, str] = {}
        self._recent: dict[str, list[tuple[int, float]]] = {}  # trailing values, bounded
        self._early: dict[str, list[tuple[int, float]]] = {}  # first values (overlap window, length)
        self._done: set[str] = set()  # once-only checks already evaluated

    @property
    def fired(self) -> dict[str, str]:
        """Every alert fired so far in this run: ``{"alert/<name>": message}``."""
        return dict(self._fired)

    @property
    def should_stop(self) -> bool:
        """True when ``config.stop_on_alert`` is set and at least one alert has fired."""
        return self.config.stop_on_alert and bool(self._fired)

    def update(self, step: int, metrics: dict[str, Any]) -> dict[str, str]:
        """Record ``metrics`` of ``step``; return the alerts newly fired by it (usually ``{}``)."""
        new: dict[str, str] = {}
        values = {
            key: _number(metrics.get(key)) for key in (OVERLAP, MASS, ENTROPY, GRAD_NORM, LENGTH, TRUNCATED)
        }
        for rule in (
            self._overlap_not_rising,
            self._mass_falling,
            self._spikes,
            self._length,
            self._truncation,
        ):
            for name, message in rule(step, values):
                key = f"alert/{name}"
                if key not in self._fired:
                    self._fired[key] = message
                    new[key] = message
        for key, value in values.items():
            if value is not None:
                self._remember(key, step, value)
        return new

    # -- rules: each yields (name, message); the value of `step` is not yet in the history ----------

    def _overlap_not_rising(self, step: int, values: dict[str, float | None]) -> Iterator[tuple[str, str]]:
        c = self.config
        value = values[OVERLAP]
        if c.overlap_min_rise is None or "overlap_not_rising" in self._done or value is None:
            return
        early = self._early.setdefault(OVERLAP, [])
        early.append((step, value))
        first = early[0][0]
        if step - first < c.window:
            return
        self._done.add("overlap_not_rising")
        points = [(s, y) for s, y in early if s <= first + c.window]
        self._early.pop(OVERLAP)
        mean = sum(y for _, y in points) / len(points)
        if mean >= c.overlap_saturated:
            return
        rise = _ls_change(points, c.window)
        if rise < c.overlap_min_rise:
            yield (
                "overlap_not_rising",
                f"{OVERLAP} rose by {rise:+.4f} over steps {first}-{first + c.window} (least-squares fit; "
                f"{points[0][1]:.3f} -> {points[-1][1]:.3f}, mean {mean:.3f}) < overlap_min_rise = "
                f"{c.overlap_min_rise}: the flat-overlap failure signature (docs/paper.md §3). Check the pair "
                "with `opd diagnose`; consider an off-policy cold start or the teacher's prompt template.",
            )

    def _mass_falling(self, step: int, values: dict[str, float | None]) -> Iterator[tuple[str, str]]:
        c = self.config
        value = values[MASS]
        if c.mass_max_drop is None or value is None:
            return
        history = self._recent.get(MASS, [])
        older = [s for s, _ in history if s <= step - c.window]
        if not older:
            return  # the history does not cover a full window yet
        points = [(s, y) for s, y in history if s >= older[-1]] + [(step, value)]
        drop = -_ls_change(points, c.window)
        if drop > c.mass_max_drop:
            yield (
                "overlap_mass_falling",
                f"{MASS} fell by {drop:.4f} over steps {points[0][0]}-{step} (least-squares fit; "
                f"{points[0][1]:.3f} -> {value:.3f}) > mass_max_drop = {c.mass_max_drop}: the shared top-k "
                "set is losing the teacher's probability mass (successful runs hold 0.97-0.99, docs/paper.md §3).",
            )

    def _spikes(self, step: int, values: dict[str, float | None]) -> Iterator[tuple[str, str]]:
        c = self.config
        for key, factor, name in (
            (ENTROPY, c.entropy_spike_factor, "entropy_spike"),
            (GRAD_NORM, c.grad_norm_spike_factor, "grad_norm_spike"),
        ):
            value = values[key]
            if factor is None or value is None:
                continue
            history = [y for _, y in self._recent.get(key, [])][-c.median_window :]
            if len(history) < c.min_history:
                continue
            median = statistics.median(history)
            if median > 0 and value > factor * median:
                yield (
                    name,
                    f"{key} = {value:.4g} at step {step} > {name}_factor = {factor} x running median "
                    f"{median:.4g} (previous {len(history)} values).",
                )

    def _length(self, step: int, values: dict[str, float | None]) -> Iterator[tuple[str, str]]:
        c = self.config
        value = values[LENGTH]
        if value is None:
            return
        early = self._early.setdefault(LENGTH, [])
        if len(early) < c.smooth:
            early.append((step, value))
        recent = [y for _, y in self._recent.get(LENGTH, [])][-(c.smooth - 1) :] if c.smooth > 1 else []
        recent.append(value)
        if len(early) < c.smooth or self._count(LENGTH) + 1 < 2 * c.smooth:
            return
        early_mean = sum(y for _, y in early) / len(early)
        recent_mean = sum(recent) / len(recent)
        if early_mean <= 0:
            return
        if c.length_collapse_factor is not None and recent_mean < early_mean / c.length_collapse_factor:
            yield (
                "length_collapse",
                f"{LENGTH}: mean of the last {len(recent)} steps {recent_mean:.1f} < early mean {early_mean:.1f} "
                f"/ length_collapse_factor = {c.length_collapse_factor} (docs/paper.md §5: too little signal "
                "in short responses).",
            )
        if c.length_explode_factor is not None and recent_mean > early_mean * c.length_explode_factor:
            yield (
                "length_explode",
                f"{LENGTH}: mean of the last {len(recent)} steps {recent_mean:.1f} > early mean {early_mean:.1f} "
                f"x length_explode_factor = {c.length_explode_factor} (docs/paper.md §5: long responses collapse "
                "late, from the end backwards).",
            )

    def _truncation(self, step: int, values: dict[str, float | None]) -> Iterator[tuple[str, str]]:
        c = self.config
        value = values[TRUNCATED]
        if c.truncated_frac_max is None or value is None:
            return
        recent = [y for _, y in self._recent.get(TRUNCATED, [])][-(c.smooth - 1) :] if c.smooth > 1 else []
        recent.append(value)
        if len(recent) < c.smooth:
            return
        mean = sum(recent) / len(recent)
        if mean > c.truncated_frac_max:
            yield (
                "truncation_high",
                f"{TRUNCATED}: mean of the last {len(recent)} steps {mean:.3f} > truncated_frac_max = "
                f"{c.truncated_frac_max}; raise the response length cap or shorten the task (docs/paper.md §5).",
            )

    # -- history -------------------------------------------------------------------------------------

    def _count(self, key: str) -> int:
        return len(self._recent.get(key, []))

    def _remember(self, key: str, step: int, value: float) -> None:
        """Append to the trailing history, keeping what the rules need: the last ``max(median_window,
        2·smooth)`` values, every value within ``window`` steps and the last one before that."""
        c = self.config
        series = self._recent.setdefault(key, [])
        series.append((step, value))
        keep = max(c.median_window, 2 * c.smooth)
        while len(series) > keep and series[1][0] <= step - c.window:
            series.pop(0)

    # -- resume --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (fired alerts and the history the rules need) for checkpoints."""
        return {
            "version": _STATE_VERSION,
            "config": asdict(self.config),
            "fired": dict(self._fired),
            "recent": {k: [[s, y] for s, y in v] for k, v in self._recent.items()},
            "early": {k: [[s, y] for s, y in v] for k, v in self._early.items()},
            "done": sorted(self._done),
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` output. The current config is kept (thresholds may be changed
        on resume); alerts already fired stay fired. ``None`` (a checkpoint saved with alerts off)
        restores nothing: the monitor starts from an empty history."""
        if state is None:
            return
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"alert monitor state has version {version!r}, expected {_STATE_VERSION}; it was written by "
                "an incompatible opd version. Resume without it (alerts restart from an empty history)."
            )
        self._fired = {str(k): str(v) for k, v in state["fired"].items()}
        self._recent = {k: [(int(s), float(y)) for s, y in v] for k, v in state["recent"].items()}
        self._early = {k: [(int(s), float(y)) for s, y in v] for k, v in state["early"].items()}
        self._done = set(state["done"])
