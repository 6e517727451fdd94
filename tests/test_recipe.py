"""opd recipe: remedies chosen from the diagnosis (a pure function), run, escalated on alerts, reported."""

import json
from pathlib import Path

import pytest

import opd
from opd.cli import main as cli_main
from opd.config_io import load_config
from opd.diagnose.verdict import (
    FLAG_INCOMPATIBLE_PATTERN,
    FLAG_LITTLE_NEW,
    FLAG_NO_SIGNAL,
    FLAG_TEMPLATE,
    FLAG_TOKENIZER,
    FLAG_TRUNCATED,
    REMEDY_COLD_START,
    REMEDY_LONGER,
    REMEDY_PROMPTS,
    REMEDY_TEMPLATE,
    Evidence,
    decide,
)
from opd.errors import ConfigError
from opd.remedies import COLDSTART, CONTENT, TEMPLATE, RecipeConfig, choose_remedies, next_remedy

# ------------------------------------------------------------------------------ the choice (pure)


def names(rs):
    return [r.name for r in rs]


@pytest.mark.parametrize(
    "flags, says",
    [
        ([FLAG_LITTLE_NEW], "no new capability"),
        ([FLAG_NO_SIGNAL], "equals the student's"),
        ([FLAG_TOKENIZER], "tokenizers are incompatible"),
        ([], "advises against OPD"),
    ],
)
def test_no_go_is_refused_with_the_reason(flags, says):
    plan = choose_remedies("no-go", [], flags, low_overlap_share=1.0, template_candidates=2)
    assert plan.refused and says in plan.refused and not plan.initial and not plan.fallback


def test_inconclusive_is_refused_naming_max_new_tokens():
    plan = choose_remedies("inconclusive", [REMEDY_LONGER], [FLAG_TRUNCATED])
    assert plan.refused and "max_new_tokens" in plan.refused


@pytest.mark.parametrize("candidates, ladder", [(0, [CONTENT, COLDSTART]), (2, [TEMPLATE, CONTENT])])
def test_go_applies_nothing_and_keeps_the_ladder_for_alerts(candidates, ladder):
    plan = choose_remedies("go", [], [], template_candidates=candidates, max_remedies=2)
    assert plan.refused is None and plan.initial == []
    assert names(plan.fallback) == ladder


@pytest.mark.parametrize(
    "share, remedy",
    [
        (None, COLDSTART),
        (1.0, COLDSTART),
        (0.95, COLDSTART),
        (0.5, CONTENT),
        (0.1, CONTENT),
        (0.05, COLDSTART),
    ],
)
def test_incompatible_pattern_cold_start_unless_the_overlap_is_low_on_part_of_the_pool(share, remedy):
    plan = choose_remedies(
        "go-after-remedy", [REMEDY_COLD_START], [FLAG_INCOMPATIBLE_PATTERN], low_overlap_share=share
    )
    assert names(plan.initial) == [remedy]
    assert remedy not in names(plan.fallback)


def test_prompts_off_the_teachers_distribution_get_content_alignment():
    plan = choose_remedies(
        "go-after-remedy", [REMEDY_PROMPTS], [FLAG_INCOMPATIBLE_PATTERN], low_overlap_share=1.0
    )
    assert names(plan.initial) == [CONTENT] and names(plan.fallback) == [COLDSTART]


def test_template_mismatch_needs_candidates():
    with_c = choose_remedies("go-after-remedy", [REMEDY_TEMPLATE], [FLAG_TEMPLATE], template_candidates=3)
    assert names(with_c.initial) == [TEMPLATE] and names(with_c.fallback) == [CONTENT]
    without = choose_remedies("go-after-remedy", [REMEDY_TEMPLATE], [FLAG_TEMPLATE], template_candidates=0)
    assert without.refused and "template_candidates" in without.refused
    # with a second remedy the mismatch is noted and the other remedy runs
    both = choose_remedies(
        "go-after-remedy",
        [REMEDY_TEMPLATE, REMEDY_COLD_START],
        [FLAG_TEMPLATE, FLAG_INCOMPATIBLE_PATTERN],
        template_candidates=0,
    )
    assert names(both.initial) == [COLDSTART] and any("template_candidates" in n for n in both.notes)


def test_template_and_cold_start_together_in_order_and_max_remedies_caps_them():
    args = (
        "go-after-remedy",
        [REMEDY_TEMPLATE, REMEDY_COLD_START],
        [FLAG_TEMPLATE, FLAG_INCOMPATIBLE_PATTERN],
    )
    plan = choose_remedies(*args, template_candidates=1, max_remedies=3)
    assert names(plan.initial) == [TEMPLATE, COLDSTART] and names(plan.fallback) == [CONTENT]
    one = choose_remedies(*args, template_candidates=1, max_remedies=1)
    assert names(one.initial) == [TEMPLATE] and one.fallback == []
    assert any("max_remedies=1" in n for n in one.notes)


def test_disallowed_remedies_are_noted_or_refused():
    only_content = choose_remedies(
        "go-after-remedy", [REMEDY_COLD_START], [FLAG_INCOMPATIBLE_PATTERN], allowed=(CONTENT,)
    )
    assert only_content.refused and "remedies=['content']" in only_content.refused
    go = choose_remedies("go", [], [], allowed=(COLDSTART,), max_remedies=0)
    assert go.refused is None and go.fallback == []  # max_remedies=0: plain OPD, no escalation
    with pytest.raises(ValueError, match="unknown"):
        choose_remedies("go", [], [], allowed=("magic",))
    with pytest.raises(ValueError, match="verdict 'maybe'"):
        choose_remedies("maybe", [], [])


def test_truncated_go_after_remedy_keeps_its_remedy_and_notes_the_length():
    plan = choose_remedies(
        "go-after-remedy", [REMEDY_COLD_START, REMEDY_LONGER], [FLAG_INCOMPATIBLE_PATTERN, FLAG_TRUNCATED]
    )
    assert names(plan.initial) == [COLDSTART] and any("max_new_tokens" in n for n in plan.notes)


def test_next_remedy_walks_the_ladder():
    plan = choose_remedies("go", [], [], template_candidates=1, max_remedies=3)
    assert names(plan.fallback) == [TEMPLATE, CONTENT, COLDSTART]
    assert next_remedy(plan, []).name == TEMPLATE
    assert next_remedy(plan, [TEMPLATE]).name == CONTENT
    assert next_remedy(plan, [TEMPLATE, CONTENT, COLDSTART]) is None


def test_a_template_measured_before_the_diagnosis_is_no_fallback_rung():
    """The pick is already in place: an alert must move on to a remedy that changes the run."""
    plan = choose_remedies("go", [], [], template_candidates=1, template_measured=True, max_remedies=3)
    assert names(plan.fallback) == [CONTENT, COLDSTART]


@pytest.mark.parametrize(
    "ev, plan_initial, refused",
    [
        # the lab's three pairs (docs/diagnose.md figures), through the real verdict rules
        (
            dict(
                overlap_ratio=0.53,
                overlap_mass_student=0.99,
                overlap_mass_teacher=0.99,
                overlap_adv=-0.04,
                entropy_gap=0.08,
                reward_abs_mean=0.4,
                accuracy_student=0.55,
                accuracy_teacher=1.0,
                continuation_advantage=0.12,
            ),
            [],
            False,
        ),
        (
            dict(
                overlap_ratio=0.46,
                overlap_mass_student=0.95,
                overlap_mass_teacher=0.65,
                overlap_adv=-0.6,
                entropy_gap=0.12,
                reward_abs_mean=9.6,
                accuracy_student=0.55,
                accuracy_teacher=1.0,
                continuation_advantage=-0.3,
                first_token_entropy_student=0.1,
                first_token_entropy_teacher=0.1,
            ),
            [COLDSTART],
            False,
        ),
        (
            dict(
                overlap_ratio=0.61,
                overlap_mass_student=0.998,
                overlap_mass_teacher=0.998,
                overlap_adv=-0.01,
                entropy_gap=0.05,
                reward_abs_mean=0.15,
                accuracy_student=0.55,
                accuracy_teacher=0.63,
                continuation_advantage=0.02,
            ),
            None,
            True,
        ),
        (
            dict(
                stop_reward=-5.0,
                overlap_ratio=0.53,
                overlap_mass_student=0.99,
                overlap_mass_teacher=0.99,
                overlap_adv=-0.04,
                entropy_gap=0.08,
                reward_abs_mean=0.4,
                accuracy_student=0.55,
                accuracy_teacher=1.0,
                continuation_advantage=0.12,
            ),
            [TEMPLATE],
            False,
        ),
    ],
)
def test_the_choice_follows_decide(ev, plan_initial, refused):
    v = decide(Evidence(**ev))
    plan = choose_remedies(v.verdict, v.remedies, v.flags, low_overlap_share=1.0, template_candidates=1)
    assert bool(plan.refused) == refused
    if not refused:
        assert names(plan.initial) == plan_initial


# ------------------------------------------------------------------------------ config


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"remedies=\['magic'\]: unknown"):
        RecipeConfig(remedies=("magic",))
    with pytest.raises(ConfigError, match="no {problem} placeholder"):
        RecipeConfig(template_candidates=("Solve it",))
    with pytest.raises(ConfigError, match=r"diagnose: unknown key\(s\) \['num_promts'\]"):
        RecipeConfig(diagnose={"num_promts": 3})
    with pytest.raises(ConfigError, match="did you mean 'max_remedies'"):
        load_config(RecipeConfig, overrides=["max_remedes=1"], command="recipe")
    assert load_config(RecipeConfig, overrides=["remedies=[coldstart]"], command="recipe").remedies == (
        "coldstart",
    )


# ------------------------------------------------------------------------------ on the lab

DIAG = {"num_prompts": 32, "rollouts_per_prompt": 2, "max_new_tokens": 96}
"""The demo's diagnosis setting: the lab verdicts hold at it (docs/diagnose.md)."""


def lab_recipe(tmp_path, teacher, **kw) -> RecipeConfig:
    base = dict(
        student="lab:student",
        teacher=teacher,
        prompts="lab:train",
        eval_prompts="lab:test",
        eval_every=2,
        eval_limit=16,
        steps=2,
        prompts_per_step=2,
        rollouts_per_prompt=2,
        max_new_tokens=64,
        micro_batch_size=8,
        lr=3e-4,
        weight_decay=0.0,
        sft_num_prompts=12,
        sft_steps=2,
        sft_batch_size=4,
        sft_warmup_steps=1,
        sft_lr=3e-4,
        diagnose=DIAG,
        diagnose_after=False,
        output_dir=str(tmp_path / "recipe"),
        progress=False,
        threads=1,
        seed=0,
    )
    base.update(kw)
    return RecipeConfig(**base)


def test_lab_teacher_a_same_is_refused(tmp_path, capsys):
    cfg = lab_recipe(tmp_path, "lab:teacher-a-same")
    args = [
        f"{k}={v}"
        for k, v in (
            ("student", cfg.student),
            ("teacher", cfg.teacher),
            ("prompts", cfg.prompts),
            ("output_dir", cfg.output_dir),
            ("progress", "false"),
            ("threads", 1),
        )
    ]
    assert (
        cli_main(["recipe", *args, "diagnose={num_prompts: 32, rollouts_per_prompt: 2, max_new_tokens: 96}"])
        == 3
    )
    out = capsys.readouterr().out
    assert "diagnosis no-go" in out and "refused: no-go: the teacher brings no new capability" in out
    root = Path(cfg.output_dir)
    state = json.loads((root / "recipe.json").read_text())
    assert state["status"] == "refused" and state["attempts"] == []
    assert not list(root.glob("attempt-*"))
    md = (root / "report.md").read_text()
    assert "**Refused.**" in md and "none: the recipe refused" in md and (root / "report.html").is_file()
    # overwrite=true starts again: the old diagnosis is measured anew, a previous attempt is removed
    (root / "attempt-7").mkdir()
    before = (root / "diagnose" / "diagnosis.json").stat().st_mtime_ns
    state = opd.recipe(lab_recipe(tmp_path, "lab:teacher-a-same", overwrite=True))
    assert state["status"] == "refused" and not (root / "attempt-7").exists()
    assert (root / "diagnose" / "diagnosis.json").stat().st_mtime_ns != before


def test_lab_teacher_a_plus_gets_plain_opd(tmp_path):
    state = opd.recipe(lab_recipe(tmp_path, "lab:teacher-a-plus"))
    assert state["diagnosis"]["before"]["verdict"] == "go"
    assert state["plan"]["initial"] == [] and len(state["attempts"]) == 1
    a = state["attempts"][0]
    assert (
        a["method"] == "opd"
        and a["remedies"] == []
        and a["steps_done"] == 2
        and a["stopped_by_alert"] is None
    )
    assert state["final_model"] == str(Path(a["dir"]) / "final")
    assert state["evaluation"]["student"] is not None and state["evaluation"]["final"] is not None


def test_lab_teacher_b_plus_gets_the_cold_start_and_a_diagnosis_after(tmp_path):
    state = opd.recipe(lab_recipe(tmp_path, "lab:teacher-b-plus", diagnose_after=True))
    before = state["diagnosis"]["before"]
    assert before["verdict"] == "go-after-remedy" and before["low_overlap_share"] == 1.0
    assert names_of(state["plan"]["initial"]) == [COLDSTART]
    (a,) = state["attempts"]
    root = Path(state["output_dir"])
    assert a["method"] == "coldstart" and (root / "attempt-1" / "sft" / "final").is_dir()
    assert state["final_model"] == str(root / "attempt-1" / "opd" / "final")
    after = json.loads((root / "diagnose-after" / "diagnosis.json").read_text())
    assert after["config"]["student"] == state["final_model"] and state["diagnosis"]["after"]["verdict"]
    md = (root / "report.md").read_text()
    assert (
        "off-policy cold start" in md and "curves.png" in md and (root / "curves.png").stat().st_size > 1000
    )


def names_of(rs):
    return [r["name"] for r in rs]


class FakeTools:
    """Content alignment that points the run at another lab prompt set (and fails when told to)."""

    def __init__(self, fail=False):
        self.fail, self.calls = fail, []

    def align_template(self, cfg, candidates, out_dir):
        self.calls.append(("template", cfg.prompts))
        return {"template": candidates[-1], "why": "the last candidate (test)"}

    def align_content(self, cfg, out_dir, *, num_prompts, fraction, ood_share, seed):
        self.calls.append(("content", cfg.prompts, fraction, ood_share))
        if self.fail:
            raise RuntimeError("ranking failed (test)")
        return {"prompts": "lab:train-hard", "why": "the hard prompts (test)"}


def test_an_alert_stops_the_run_and_the_next_remedy_is_applied_then_resume_continues(tmp_path):
    # go for teacher-a-plus; an overlap rise of 1.0 within 2 steps is impossible: the alert fires at step 3
    kw = dict(
        steps=4,
        eval_every=0,
        alert_thresholds={"window": 2, "overlap_min_rise": 1.0, "overlap_saturated": 1.0},
        remedies=(CONTENT, COLDSTART),
        max_remedies=2,
    )
    cfg = lab_recipe(tmp_path, "lab:teacher-a-plus", **kw)
    with pytest.raises(RuntimeError, match="ranking failed"):
        opd.recipe(cfg, tools=FakeTools(fail=True))  # stops while setting up attempt 2
    root = Path(cfg.output_dir)
    diag_mtime = (root / "diagnose" / "diagnosis.json").stat().st_mtime_ns
    a1_mtime = (root / "attempt-1" / "summary.json").stat().st_mtime_ns

    tools = FakeTools()
    state = opd.recipe(lab_recipe(tmp_path, "lab:teacher-a-plus", resume=True, **kw), tools=tools)
    assert (root / "diagnose" / "diagnosis.json").stat().st_mtime_ns == diag_mtime  # not redone
    assert (root / "attempt-1" / "summary.json").stat().st_mtime_ns == a1_mtime
    a1, a2, a3 = state["attempts"]
    assert a1["remedies"] == [] and a1["stopped_by_alert"] == 3 and "alert/overlap_not_rising" in a1["alerts"]
    assert names_of(a2["remedies"]) == [CONTENT] and a2["stopped_by_alert"] == 3
    assert json.loads((root / "attempt-2" / "config.json").read_text())["prompts"] == "lab:train-hard"
    assert tools.calls == [("content", "lab:train", 0.5, 0.2)]  # attempt 3 reuses attempt 2's selection
    assert names_of(a3["remedies"]) == [CONTENT, COLDSTART] and a3["method"] == "coldstart"
    assert a3["stopped_by_alert"] is None and a3["steps_done"] == 4  # no remedy left: runs to the end
    assert "alert/overlap_not_rising" in a3["alerts"]
    assert state["status"] == "done" and state["final_model"] == str(root / "attempt-3" / "opd" / "final")
    md = (root / "report.md").read_text()
    assert "overlap_not_rising" in md and "the hard prompts (test)" in md

    # a finished recipe re-run with resume=true redoes nothing
    again = opd.recipe(
        lab_recipe(tmp_path, "lab:teacher-a-plus", resume=True, **kw), tools=FakeTools(fail=True)
    )
    assert [a["steps_done"] for a in again["attempts"]] == [3, 3, 4]
    with pytest.raises(Exception, match="resume=true"):
        opd.recipe(lab_recipe(tmp_path, "lab:teacher-a-plus", **kw))  # a non-empty directory needs resume


def test_template_remedy_sets_the_chosen_template(tmp_path):
    """A diagnosis with a template mismatch (no lab pair has one: written here) → the tool's template."""
    root = tmp_path / "recipe"
    (root / "diagnose").mkdir(parents=True)
    v = decide(
        Evidence(
            stop_reward=-5.0,
            overlap_ratio=0.5,
            overlap_mass_student=0.99,
            overlap_mass_teacher=0.99,
            overlap_adv=-0.04,
            entropy_gap=0.08,
            reward_abs_mean=0.4,
        )
    )
    (root / "diagnose" / "diagnosis.json").write_text(
        json.dumps(
            {
                "verdict": v.verdict,
                "remedies": v.remedies,
                "flags": v.flags,
                "reasons": v.reasons,
                "evidence": {},
                "config": {"student": "lab:student"},
            }
        )
    )
    cands = ("Problem: {problem}", "Solve: {problem}")
    cfg = lab_recipe(tmp_path, "lab:teacher-a-plus", resume=True, template_candidates=cands, eval_every=0)
    tools = FakeTools()
    state = opd.recipe(cfg, tools=tools)
    assert tools.calls == [("template", "lab:train")]  # measured once (before the diagnosis), then reused
    assert names_of(state["plan"]["initial"]) == [TEMPLATE]
    saved = json.loads((root / "attempt-1" / "config.json").read_text())
    assert saved["teacher_prompt_template"] == "Solve: {problem}" and saved["prompt_template"] is None
    assert state["attempts"][0]["steps_done"] == 2


def write_diagnosis(root, **evidence):
    """A finished diagnosis in ``root/diagnose`` (the recipe reads it back instead of measuring)."""
    (root / "diagnose").mkdir(parents=True)
    v = decide(Evidence(**evidence))
    (root / "diagnose" / "diagnosis.json").write_text(
        json.dumps(
            {
                "verdict": v.verdict,
                "remedies": v.remedies,
                "flags": v.flags,
                "reasons": v.reasons,
                "evidence": {},
                "config": {"student": "lab:student"},
            }
        )
    )
    return v


COMPATIBLE = dict(
    overlap_ratio=0.5,
    overlap_mass_student=0.99,
    overlap_mass_teacher=0.99,
    overlap_adv=-0.04,
    entropy_gap=0.08,
    reward_abs_mean=0.4,
)


def test_the_prompt_tools_pick_teacher_a_qas_own_template(tmp_path):
    """opd.prompts measures the candidates: lab:teacher-a-qa was trained under the qa template only."""
    root = tmp_path / "recipe"
    write_diagnosis(root, stop_reward=-5.0, **COMPATIBLE)  # a template mismatch
    qa = "Question: {problem}\nWork it out one step per line.\nAnswer:"
    cfg = lab_recipe(
        tmp_path,
        "lab:teacher-a-qa",
        resume=True,
        template_candidates=("{problem}", qa),
        eval_every=0,
        steps=1,
    )
    state = opd.recipe(cfg)
    setup = state["attempts"][0]["setup"]["template"]
    assert setup["template"] == qa and setup["applied_as"] == "teacher_prompt_template"
    assert json.loads((root / "attempt-1" / "config.json").read_text())["teacher_prompt_template"] == qa
    # measured once, before the diagnosis; the remedy reuses that measurement
    assert (root / "template-first" / "template.json").is_file()
    assert not (root / "attempt-1-remedy" / "template.json").exists()


def test_lab_teacher_a_qa_is_diagnosed_and_trained_under_its_own_template_when_candidates_are_given(tmp_path):
    """Template first: under the student's prompt lab:teacher-a-qa solves nothing (the diagnosis says
    no-go and the recipe would refuse); with the candidates the recipe picks its qa template before the
    diagnosis, which then says go, and plain OPD runs with the teacher under that template."""
    qa = "Question: {problem}\nWork it out one step per line.\nAnswer:"
    cfg = lab_recipe(
        tmp_path, "lab:teacher-a-qa", template_candidates=("{problem}", qa), eval_every=0, steps=1
    )
    state = opd.recipe(cfg)
    root = Path(state["output_dir"])
    assert state["template_first"]["template"] == qa and (root / "template-first" / "template.json").is_file()
    diagnosis = json.loads((root / "diagnose" / "diagnosis.json").read_text())
    assert diagnosis["config"]["teacher_prompt_template"] == qa
    assert state["diagnosis"]["before"]["verdict"] == "go" and state["plan"]["initial"] == []
    assert json.loads((root / "attempt-1" / "config.json").read_text())["teacher_prompt_template"] == qa
    assert "picked before the diagnosis" in (root / "report.md").read_text()
    # without the candidates the same pair is refused: the teacher looks incapable under the student's prompt
    refused = opd.recipe(lab_recipe(tmp_path / "plain", "lab:teacher-a-qa", eval_every=0, steps=1))
    assert refused["status"] == "refused" and "template_first" not in refused


def test_the_prompt_tools_select_the_content(tmp_path):
    """Content alignment through opd.prompts: 8 prompts ranked, half kept (one OOD), OPD trains on them."""
    root = tmp_path / "recipe"
    v = write_diagnosis(
        root,
        **(
            COMPATIBLE
            | dict(overlap_mass_teacher=0.6, first_token_entropy_student=0.1, first_token_entropy_teacher=1.5)
        ),
    )
    assert "teacher-aligned prompts" in v.remedies
    cfg = lab_recipe(
        tmp_path,
        "lab:teacher-a-plus",
        resume=True,
        content_num_prompts=8,
        content_ood_share=0.25,
        eval_every=0,
        steps=1,
    )
    state = opd.recipe(cfg)
    setup = state["attempts"][0]["setup"]["content"]
    selected = Path(setup["prompts"])
    assert selected.is_file() and len(selected.read_text().splitlines()) == 4 == setup["kept"]
    assert "3 best-agreeing of 8 measured prompts plus 1 out-of-distribution" in setup["why"]
    saved = json.loads((root / "attempt-1" / "config.json").read_text())
    assert saved["prompts"] == str(selected) and state["attempts"][0]["steps_done"] == 1
