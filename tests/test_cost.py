"""The compute-cost accounting: the FLOP rule, resume continuity and what an OPD step records."""

import pytest
import torch
from opd_configs import make_cfg

from opd.cost import COUNTERS, CostMeter, count_parameters, model_bytes
from opd.methods import opd as opd_method
from opd.tracking import read_metrics


def test_flop_rule_is_2n_forward_6n_trained():
    m = CostMeter(student_params=10, teacher_params=100)
    m.add(
        student_generated_tokens=3, student_prefill_tokens=2, student_forward_tokens=5, student_train_tokens=7
    )
    m.add(teacher_forward_tokens=4, teacher_generated_tokens=torch.tensor([1, 2]))
    assert m.student_flops() == 2 * 10 * (3 + 2 + 5) + 6 * 10 * 7
    assert m.teacher_flops() == 2 * 100 * (4 + 3)
    assert m.row()["cost/flops"] == m.student_flops() + m.teacher_flops()
    with pytest.raises(KeyError, match="unknown cost counter"):
        m.add(student_tokens=1)


def test_state_dict_round_trip():
    m = CostMeter(5, 6)
    m.add(student_loss_tokens=9)
    n = CostMeter(0)
    n.load_state_dict(m.state_dict())
    assert n == m and set(n.counts) == set(COUNTERS)


def test_parameter_count_and_bytes():
    lin = torch.nn.Linear(3, 2)
    assert count_parameters(lin) == 8 and count_parameters(None) == 0
    assert model_bytes(lin) == 8 * 4


def test_opd_run_counts_its_tokens(tiny_pair, tmp_path):
    cfg = make_cfg(tiny_pair, tmp_path, steps=2)
    opd_method.train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    a, b = rows[0], rows[1]
    # cumulative and increasing; loss tokens = response tokens (ppo_epochs=1)
    assert b["cost/student_loss_tokens"] > a["cost/student_loss_tokens"] > 0
    assert a["cost/student_generated_tokens"] == a["cost/student_loss_tokens"]
    # one fused student pass per step (ppo_epochs=1, student support): no separate scoring forward
    assert a["cost/teacher_forward_tokens"] == a["cost/student_train_tokens"]
    assert a["cost/student_forward_tokens"] == 0
    assert a["cost/flops"] > 0 and a["memory/peak_mb"] > 0


def test_budget_stops_the_run_at_the_first_step_that_reaches_it(tiny_pair, tmp_path):
    full = opd_method.train(make_cfg(tiny_pair, tmp_path / "a", steps=4))
    rows = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    budget = rows[1]["cost/student_loss_tokens"]  # reached exactly at step 2
    res = opd_method.train(
        make_cfg(tiny_pair, tmp_path / "b", steps=4, budget_unit="student_loss_tokens", budget=budget)
    )
    assert full["stopped_by_budget"] is None and res["stopped_by_budget"] == 2
    assert res["cost"]["cost/student_loss_tokens"] == budget
    with pytest.raises(Exception, match="budget_unit"):
        make_cfg(tiny_pair, tmp_path, budget_unit="tokens", budget=1)


def test_a_budget_stopped_run_evaluates_its_final_model(tiny_pair, tmp_path):
    """The accuracy-vs-compute curve ends at the model the run ends with, not up to eval_every - 1 steps before."""
    full = opd_method.train(make_cfg(tiny_pair, tmp_path / "a", steps=4))
    budget = full["cost"]["cost/student_loss_tokens"] * 0.4  # reached at step 2 or 3
    prompts = tiny_pair[2]
    res = opd_method.train(
        make_cfg(
            tiny_pair,
            tmp_path / "b",
            steps=4,
            budget_unit="student_loss_tokens",
            budget=budget,
            eval_every=10,
            eval_prompts=str(prompts),
            eval_limit=2,
        )
    )
    rows = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    evaluated = [r["step"] for r in rows if "eval/accuracy" in r]
    assert res["stopped_by_budget"] in (2, 3)
    assert evaluated == [0, res["stopped_by_budget"]]
