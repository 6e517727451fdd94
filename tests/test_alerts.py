"""Failure-signature alerts on synthetic metric histories: each rule fires when it should, only once,
not when it should not, and survives a resume."""

from __future__ import annotations

import json
import math
import random

import pytest

from opd.alerts import ALERT_NAMES, AlertConfig, AlertMonitor


def _healthy(step: int, rng: random.Random) -> dict[str, float]:
    """A successful run: overlap rising 0.72 -> 0.91 over 200 steps, mass ~0.98, stable scalars."""
    return {
        "step": step,
        "overlap/ratio": 0.72 + 0.19 * min(step, 200) / 200 + rng.gauss(0, 0.005),
        "overlap/mass_teacher": 0.98 + rng.gauss(0, 0.003),
        "entropy/student": 0.5 + rng.gauss(0, 0.03),
        "grad_norm": 0.3 + abs(rng.gauss(0, 0.05)),
        "response/length_mean": 3000 + rng.gauss(0, 100),
        "response/truncated_frac": 0.02 + abs(rng.gauss(0, 0.01)),
        "loss/pg": 0.01,
    }


def _run(history, config=None, monitor=None):
    monitor = monitor or AlertMonitor(config or AlertConfig())
    fired_at = {}
    for m in history:
        for key, message in monitor.update(m["step"], m).items():
            assert key not in fired_at, f"{key} fired twice"
            fired_at[key] = (m["step"], message)
    return monitor, fired_at


def _history(n=300, seed=0, **edits):
    """Healthy history with per-metric overrides: edits[name] = f(step, value) -> new value."""
    rng = random.Random(seed)
    out = []
    for step in range(n):
        m = _healthy(step, rng)
        for name, f in edits.items():
            m[name] = f(step, m[name])
        out.append(m)
    return out


def test_healthy_run_fires_nothing():
    _, fired = _run(_history())
    assert fired == {}


def test_flat_overlap_fires_once_after_the_window_with_numbers():
    hist = _history(**{"overlap/ratio": lambda s, v: 0.70})
    _, fired = _run(hist)
    assert set(fired) == {"alert/overlap_not_rising"}
    step, message = fired["alert/overlap_not_rising"]
    assert step == 50
    assert "overlap_min_rise = 0.02" in message and "0.700" in message


def test_overlap_already_saturated_does_not_fire():
    _, fired = _run(_history(**{"overlap/ratio": lambda s, v: 0.97}))
    assert fired == {}


def test_falling_mass_fires_and_stable_or_noisy_mass_does_not():
    falling = _history(**{"overlap/mass_teacher": lambda s, v: v - max(0, s - 100) * 0.002})
    _, fired = _run(falling)
    assert set(fired) == {"alert/overlap_mass_falling"}
    step, message = fired["alert/overlap_mass_falling"]
    assert 100 < step <= 160 and "mass_max_drop = 0.05" in message
    noisy = _history(seed=2, **{"overlap/mass_teacher": lambda s, v: 0.97 + 0.02 * math.sin(s)})
    assert _run(noisy)[1] == {}


def test_entropy_and_grad_norm_spikes():
    hist = _history(
        **{
            "entropy/student": lambda s, v: 2.0 if s == 120 else v,
            "grad_norm": lambda s, v: 50.0 if s in (150, 151, 200) else v,
        }
    )
    _, fired = _run(hist)
    assert set(fired) == {"alert/entropy_spike", "alert/grad_norm_spike"}
    assert fired["alert/entropy_spike"][0] == 120
    assert fired["alert/grad_norm_spike"][0] == 150
    assert "grad_norm_spike_factor = 5.0" in fired["alert/grad_norm_spike"][1]


def test_spike_needs_min_history():
    hist = _history(n=20, **{"grad_norm": lambda s, v: 50.0 if s == 5 else v})
    assert _run(hist)[1] == {}


def test_length_collapse_and_explode():
    collapse = _history(**{"response/length_mean": lambda s, v: v if s < 150 else 900.0})
    _, fired = _run(collapse)
    assert set(fired) == {"alert/length_collapse"}
    assert 150 <= fired["alert/length_collapse"][0] < 155
    explode = _history(**{"response/length_mean": lambda s, v: v * (1 + s / 50)})
    _, fired = _run(explode)
    assert set(fired) == {"alert/length_explode"}


def test_truncation_high_fires_on_the_smoothed_fraction_only():
    one_bad_step = _history(**{"response/truncated_frac": lambda s, v: 0.6 if s == 100 else v})
    assert _run(one_bad_step)[1] == {}
    high = _history(**{"response/truncated_frac": lambda s, v: 0.35 if s >= 100 else v})
    _, fired = _run(high)
    assert set(fired) == {"alert/truncation_high"}
    assert fired["alert/truncation_high"][0] == 102  # 5-step mean: (3 x 0.35 + 2 x ~0.03) / 5 > 0.2


def test_missing_and_non_finite_metrics_are_ignored():
    monitor = AlertMonitor()
    for step in range(300):
        assert monitor.update(step, {"step": step}) == {}
        assert monitor.update(step, {"grad_norm": float("inf"), "entropy/student": float("nan")}) == {}
        assert monitor.update(step, {"overlap/ratio": "n/a", "response/length_mean": None}) == {}
    assert monitor.fired == {} and not monitor.should_stop


def test_sparse_logging_still_measures_windows():
    """Metrics logged every 7 steps: the window rules still fire."""
    hist = _history(
        **{"overlap/ratio": lambda s, v: 0.5, "overlap/mass_teacher": lambda s, v: 0.98 - 0.002 * s}
    )
    _, fired = _run(hist[::7])
    assert set(fired) == {"alert/overlap_not_rising", "alert/overlap_mass_falling"}


def test_disabled_rules_and_should_stop():
    hist = _history(**{"overlap/ratio": lambda s, v: 0.6})
    monitor, fired = _run(hist, AlertConfig(overlap_min_rise=None, stop_on_alert=True))
    assert fired == {} and not monitor.should_stop
    monitor, fired = _run(hist, AlertConfig(stop_on_alert=True))
    assert monitor.should_stop and set(monitor.fired) == set(fired) == {"alert/overlap_not_rising"}
    assert not _run(hist)[0].should_stop  # stop_on_alert defaults to False


def test_resume_keeps_fired_alerts_and_history():
    hist = _history(
        **{
            "overlap/ratio": lambda s, v: 0.6,
            "grad_norm": lambda s, v: 50.0 if s in (40, 140) else v,
        }
    )
    straight, fired_straight = _run(hist)
    first, fired_a = _run(hist[:30])
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    resumed = AlertMonitor(AlertConfig())
    resumed.load_state_dict(state)
    _, fired_b = _run(hist[30:], monitor=resumed)
    assert {**fired_a, **fired_b} == fired_straight
    assert set(fired_straight) == {"alert/overlap_not_rising", "alert/grad_norm_spike"}
    # after the resume, already-fired alerts are not repeated
    again = AlertMonitor()
    again.load_state_dict(json.loads(json.dumps(straight.state_dict())))
    assert _run(hist, monitor=again)[1] == {}
    with pytest.raises(ValueError, match="version"):
        AlertMonitor().load_state_dict({"version": 99})
    fresh = AlertMonitor()
    fresh.load_state_dict(None)  # checkpoint written with alerts off
    assert fresh.fired == {}


def test_history_stays_bounded():
    monitor, _ = _run(_history(n=2000))
    state = monitor.state_dict()
    assert all(len(v) <= 60 for v in state["recent"].values())
    assert state["early"].get("overlap/ratio") is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 1}, "window"),
        ({"entropy_spike_factor": 1.0}, "entropy_spike_factor"),
        ({"truncated_frac_max": 1.5}, "truncated_frac_max"),
        ({"min_history": 80}, "min_history"),
        ({"smooth": 0}, "smooth"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlertConfig(**kwargs)


def test_alert_names_are_the_documented_ones():
    assert set(ALERT_NAMES) == {
        "overlap_not_rising",
        "overlap_mass_falling",
        "entropy_spike",
        "grad_norm_spike",
        "length_collapse",
        "length_explode",
        "truncation_high",
    }
