"""``recipe(config)``: diagnose → choose remedies → run → watch the alerts → evaluate → report.

One run directory, top to bottom:

    output_dir/
      template-first/   with template_candidates: the teacher's context picked before the diagnosis,
                        which (and every run) then scores with it as teacher_prompt_template
      diagnose/         opd diagnose of the student against the teacher (the "before")
      attempt-1/        the first run: opd train's layout, or opd coldstart's (sft/, opd/) with the cold start;
                        remedy/ holds what a template or content remedy chose (e.g. the selected prompts)
      attempt-2/ ...    one more per alert that stopped a run while a remedy was left
      diagnose-after/   opd diagnose of the final model against the teacher (diagnose_after)
      recipe.json       the state: the plan, each attempt (remedies, why, outcome, alerts), the evaluation
      report.md/.html, curves.png

Every attempt starts from the recipe's student with all remedies applied so far (a run an alert stopped
has failed: its model is not continued); what a template or content remedy chose is reused by the later
attempts (the remedies before it are the same, so its inputs are). ``resume=true`` continues: a finished diagnosis or attempt is
read back, not redone; an unfinished attempt resumes as its method does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

from opd.config import OPDConfig
from opd.config_io import to_dict
from opd.diagnose import diagnose
from opd.methods import coldstart as coldstart_method
from opd.methods import opd as opd_method
from opd.methods.coldstart import OPD_DIR, SFT_DIR, ColdstartConfig
from opd.remedies.choose import (
    COLDSTART,
    CONTENT,
    TEMPLATE,
    Remedy,
    RemedyPlan,
    choose_remedies,
    next_remedy,
)
from opd.remedies.config import RecipeConfig, diagnose_config
from opd.remedies.report import write_recipe_report
from opd.remedies.tools import DefaultPromptTools, PromptTools
from opd.report import write_text_atomic
from opd.rundir import locked_run_dir, prepare_train_dir
from opd.tracking import read_metrics_if_any

log = logging.getLogger("opd.recipe")

__all__ = ["STATE", "low_overlap_share", "recipe"]

STATE = "recipe.json"


def recipe(cfg: RecipeConfig, *, tools: PromptTools | None = None) -> dict[str, Any]:
    """Run the recipe (module docstring). Returns the state written to ``recipe.json``: ``status``
    (``refused`` or ``done``), ``refused`` (the message), ``plan``, ``attempts``, ``evaluation``,
    ``diagnosis`` (before / after summaries) and ``final_model``. ``tools``: the template and content
    remedies (default :class:`opd.remedies.tools.DefaultPromptTools`)."""
    cfg.check_runnable()
    tools = tools if tools is not None else DefaultPromptTools()
    root = Path(cfg.output_dir)
    inputs = {"student": cfg.student, "teacher": cfg.teacher}
    data = {"prompts": cfg.prompts, "eval_prompts": cfg.eval_prompts}
    with locked_run_dir(root, models=inputs, data=data) as run:
        prepare_train_dir(
            run, to_dict(cfg), to_dict(RecipeConfig()), resume=cfg.resume, overwrite=cfg.overwrite
        )
        run.clear_previous_run()
        if cfg.overwrite:  # the recipe's own entries (opd train's files went with clear_previous_run)
            _remove_recipe_entries(root)
        run.fresh = False
        write_text_atomic(root / "config.json", json.dumps(to_dict(cfg), indent=1))
        state = _read_state(root) if cfg.resume else {}
        state.setdefault("attempts", [])
        return _run(cfg, root, state, tools)


def _run(cfg: RecipeConfig, root: Path, state: dict[str, Any], tools: PromptTools) -> dict[str, Any]:
    # ---- 0. the teacher's own template first, when candidates are given: a teacher scored (and, in the
    # diagnosis's accuracy check, asked) under a template it was not trained with can look incapable
    first = _template_first(cfg, root, state, tools)
    # ---- 1. diagnose
    before = _diagnosis(cfg, root / "diagnose", cfg.student, first)
    state["diagnosis"] = {"before": _diagnosis_summary(before, cfg)}
    plan = choose_remedies(
        before["verdict"],
        before["remedies"],
        before["flags"],
        low_overlap_share=state["diagnosis"]["before"]["low_overlap_share"],
        allowed=tuple(cfg.remedies),
        template_candidates=len(cfg.template_candidates),
        template_measured="template_first" in state,
        max_remedies=cfg.max_remedies,
        partial_share=tuple(cfg.low_overlap_partial),
    )
    state["plan"] = dataclasses.asdict(plan)
    if plan.refused:
        log.warning("[recipe] refused: %s", plan.refused)
        state.update(status="refused", refused=plan.refused, final_model=None)
        return _finish(cfg, root, state)
    log.info(
        "[recipe] verdict %s: remedies %s",
        before["verdict"],
        ", ".join(r.name for r in plan.initial) or "none",
    )

    # ---- 2. run, watch, escalate
    attempts = state["attempts"]
    if not attempts:
        attempts.append(_new_attempt(root, 1, list(plan.initial)))
    while True:
        att = attempts[-1]
        applied = [Remedy(**r) for r in att["remedies"]]
        nxt = next_remedy(plan, [r.name for r in applied])
        can_escalate = nxt is not None and len(applied) < cfg.max_remedies
        if not att.get("done"):
            _save_state(root, state)
            att.update(
                _attempt(
                    cfg,
                    root,
                    att,
                    applied,
                    tools,
                    stop_on_alert=can_escalate,
                    first=first,
                    first_pick=state.get("template_first"),
                )
            )
            att["done"] = True
            _save_state(root, state)
        if att["stopped_by_alert"] is not None and can_escalate:
            log.warning(
                "[recipe] attempt %d stopped by %s at step %s: next remedy %s",
                att["attempt"],
                ", ".join(att["alerts"]),
                att["stopped_by_alert"],
                nxt.name,
            )
            attempts.append(_new_attempt(root, att["attempt"] + 1, [*applied, nxt]))
            # the remedies already set up are applied to the same config again: reuse what they chose
            attempts[-1]["setup"] = dict(att.get("setup") or {})
            continue
        break
    final = attempts[-1]
    state["final_model"] = final["final_model"]

    # ---- 3. evaluate (the runs' own greedy evaluations on eval_prompts) and diagnose the result
    state["evaluation"] = _evaluation(attempts)
    if cfg.diagnose_after and final["final_model"]:
        after = _diagnosis(cfg, root / "diagnose-after", final["final_model"], first)
        state["diagnosis"]["after"] = _diagnosis_summary(after, cfg)
    state["status"] = "done"
    return _finish(cfg, root, state)


def _template_first(cfg: RecipeConfig, root: Path, state: dict[str, Any], tools: PromptTools) -> str | None:
    """With ``template_candidates`` and the template remedy allowed: pick the teacher's context among the
    candidates before the diagnosis (into ``template-first/``); returns the picked template when it is not
    the student's own rendering (the diagnoses then score and ask the teacher under it as
    ``teacher_prompt_template``, and every run uses it: see :func:`_attempt`), else None. A resumed
    recipe reads its pick back from the state."""
    if not cfg.template_candidates or TEMPLATE not in cfg.remedies:
        return None
    pick = state.get("template_first")
    if pick is None:
        out = root / "template-first"
        out.mkdir(parents=True, exist_ok=True)
        values = {f.name: getattr(cfg, f.name) for f in fields(ColdstartConfig)}
        pick = tools.align_template(
            _opd_config(values, str(out / "template")), list(cfg.template_candidates), out
        )
        state["template_first"] = pick
        _save_state(root, state)
    template = pick.get("template")
    log.info(
        "[recipe] the teacher's template, picked before the diagnosis: %r (%s)", template, pick.get("why")
    )
    if not template or template in (cfg.prompt_template, "{problem}"):
        return None  # the student's own rendering: nothing changes
    return template


def _finish(cfg: RecipeConfig, root: Path, state: dict[str, Any]) -> dict[str, Any]:
    state["output_dir"] = str(root)
    _save_state(root, state)
    state["report"] = [str(p) for p in write_recipe_report(root, state)]
    _save_state(root, state)
    return state


# ------------------------------------------------------------------------------------------- diagnosis


def _diagnosis(
    cfg: RecipeConfig, out_dir: Path, student: str, teacher_template: str | None
) -> dict[str, Any]:
    """``opd diagnose`` of ``student`` into ``out_dir``; a finished one (diagnosis.json) is read back."""
    path = out_dir / "diagnosis.json"
    if path.is_file():
        log.info("[recipe] diagnosis in %s already done: read back", out_dir)
        return json.loads(path.read_text())
    dcfg = diagnose_config(cfg, str(out_dir), student)
    if teacher_template is not None:
        dcfg = dataclasses.replace(dcfg, teacher_prompt_template=teacher_template)
    return diagnose(dcfg)


def low_overlap_share(result: dict[str, Any], mass_min: float) -> float | None:
    """Share of the diagnosis's rollouts whose overlap mass (the smaller of the student's and teacher's
    per-rollout mean mass on the shared top-k set) is under ``mass_min``; None when not recorded."""
    masses = (result.get("context") or {}).get("seq_overlap_mass")
    if not masses:
        return None
    return sum(m < mass_min for m in masses) / len(masses)


def _diagnosis_summary(result: dict[str, Any], cfg: RecipeConfig) -> dict[str, Any]:
    ev = result.get("evidence") or {}
    mass_min = (result.get("config") or {}).get("thresholds", {}).get("overlap_mass_min", 0.9)
    acc_s, acc_t = ev.get("accuracy_student"), ev.get("accuracy_teacher")
    return {
        "student": result.get("config", {}).get("student"),
        "verdict": result["verdict"],
        "remedies": result["remedies"],
        "flags": result["flags"],
        "reasons": result["reasons"],
        "overlap_ratio": ev.get("overlap_ratio"),
        "overlap_mass": min(
            [m for m in (ev.get("overlap_mass_student"), ev.get("overlap_mass_teacher")) if m is not None],
            default=None,
        ),
        "overlap_adv": ev.get("overlap_adv"),
        "entropy_gap": ev.get("entropy_gap"),
        "reward_abs_mean": ev.get("reward_abs_mean"),
        "accuracy_student": acc_s,
        "accuracy_teacher": acc_t,
        "continuation_advantage": ev.get("continuation_advantage"),
        "low_overlap_share": low_overlap_share(result, mass_min),
    }


# -------------------------------------------------------------------------------------------- attempts


def _new_attempt(root: Path, i: int, remedies: list[Remedy]) -> dict[str, Any]:
    return {
        "attempt": i,
        "dir": str(root / f"attempt-{i}"),
        "remedies": [dataclasses.asdict(r) for r in remedies],
    }


def _attempt(
    cfg: RecipeConfig,
    root: Path,
    att: dict[str, Any],
    remedies: list[Remedy],
    tools: PromptTools,
    *,
    stop_on_alert: bool,
    first: str | None = None,
    first_pick: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply ``remedies`` to the recipe's OPD config (what a template or content remedy chooses goes to
    ``attempt-N-remedy/``, and is kept in ``att["setup"]``), run it into ``attempt-N/``, read the outcome.
    ``first``: the teacher's template picked before the diagnosis (:func:`_template_first`), applied to
    every run as the template remedy's choice is; ``first_pick``: that measurement, which the template
    remedy reuses (same models, prompts and candidates) instead of measuring again."""
    att_dir = Path(att["dir"])
    values = {f.name: getattr(cfg, f.name) for f in fields(ColdstartConfig)}
    cold = any(r.name == COLDSTART for r in remedies)
    if first is not None:
        # the cold start's SFT stage samples the teacher under the student's prompt: both models get it
        values["prompt_template" if cold else "teacher_prompt_template"] = first
    setup = att.setdefault("setup", {})
    remedy_dir = root / f"attempt-{att['attempt']}-remedy"
    for r in remedies:
        if r.name == TEMPLATE:
            if TEMPLATE not in setup and first_pick is not None:
                setup[TEMPLATE] = dict(first_pick)
            elif TEMPLATE not in setup:
                remedy_dir.mkdir(parents=True, exist_ok=True)
                setup[TEMPLATE] = tools.align_template(
                    _opd_config(values, str(remedy_dir / "template")),
                    list(cfg.template_candidates),
                    remedy_dir,
                )
            target = cfg.template_target
            if target == "teacher_prompt_template" and cold:
                target = "prompt_template"  # the cold start's teacher samples under the student's prompt
                log.info("[recipe] with the cold start the chosen template goes to prompt_template")
            values[target] = setup[TEMPLATE]["template"]
            setup[TEMPLATE]["applied_as"] = target
        elif r.name == CONTENT:
            if CONTENT not in setup:
                remedy_dir.mkdir(parents=True, exist_ok=True)
                setup[CONTENT] = tools.align_content(
                    _opd_config(values, str(remedy_dir / "content")),
                    remedy_dir,
                    num_prompts=cfg.content_num_prompts,
                    fraction=cfg.content_fraction,
                    ood_share=cfg.content_ood_share,
                    seed=cfg.seed,
                )
            values["prompts"] = setup[CONTENT]["prompts"]
    resume = att_dir.is_dir() and any(att_dir.iterdir())  # an interrupted attempt continues
    values.update(output_dir=str(att_dir), resume=resume, overwrite=False, stop_on_alert=stop_on_alert)
    if cold:
        summary = coldstart_method.train(ColdstartConfig(**values))
        opd_summary, opd_dir = summary["stages"]["opd"], att_dir / OPD_DIR
    else:
        summary = opd_method.train(_opd_config(values, str(att_dir)))
        opd_summary, opd_dir = summary, att_dir
    metrics = read_metrics_if_any(opd_dir / "metrics.jsonl")
    alerts = {k: v for row in metrics for k, v in row.items() if k.startswith("alert/")}
    return {
        "method": "coldstart" if cold else "opd",
        "final_model": summary["final_model"],
        "steps_done": summary["steps_done"],
        "stopped_by_alert": opd_summary["stopped_by_alert"] if opd_summary else None,
        "alerts": alerts,
        "metrics": {
            "opd": str(opd_dir / "metrics.jsonl"),
            "sft": str(att_dir / SFT_DIR / "metrics.jsonl") if cold else None,
        },
    }


def _opd_config(values: dict[str, Any], output_dir: str) -> OPDConfig:
    names = {f.name for f in fields(OPDConfig)}
    return OPDConfig(**{k: v for k, v in values.items() if k in names} | {"output_dir": output_dir})


def read_curves(attempt: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """An attempt's metric rows: ``{"sft": [...], "opd": [...]}`` (sft empty without the cold start)."""
    out = {}
    for stage, path in attempt.get("metrics", {}).items():
        out[stage] = read_metrics_if_any(path)
    return out


def _evaluation(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """Greedy accuracy on ``eval_prompts`` from the runs' own evaluations: the recipe's student (step 0 of
    the first run), each attempt's start and end, the final model."""
    per = []
    for a in attempts:
        curves = read_curves(a)
        first = curves.get("sft") or curves.get("opd") or []
        evals_first = [r["eval/accuracy"] for r in first if "eval/accuracy" in r]
        evals_opd = [(r["step"], r["eval/accuracy"]) for r in curves.get("opd", []) if "eval/accuracy" in r]
        per.append(
            {
                "attempt": a["attempt"],
                "start": evals_first[0] if evals_first else None,
                "opd_start": evals_opd[0][1] if evals_opd else None,
                "final": evals_opd[-1][1] if evals_opd else None,
                "final_step": evals_opd[-1][0] if evals_opd else None,
            }
        )
    return {
        "student": per[0]["start"] if per else None,
        "final": per[-1]["final"] if per else None,
        "attempts": per,
    }


# ------------------------------------------------------------------------------------------------ state


def _remove_recipe_entries(root: Path) -> None:
    """``overwrite=true``: remove a previous recipe's diagnoses, attempts, state and report."""
    for p in root.iterdir():
        if p.name in ("diagnose", "diagnose-after") or p.name.startswith("attempt-"):
            shutil.rmtree(p)
        elif p.name in (STATE, "report.md", "report.html", "curves.png"):
            p.unlink()


def _read_state(root: Path) -> dict[str, Any]:
    path = root / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(root: Path, state: dict[str, Any]) -> None:
    write_text_atomic(root / STATE, json.dumps(state, indent=1, default=str) + "\n")


def _plan_from_state(state: dict[str, Any]) -> RemedyPlan:  # used by the report
    p = state.get("plan") or {}
    return RemedyPlan(
        refused=p.get("refused"),
        initial=[Remedy(**r) for r in p.get("initial", [])],
        fallback=[Remedy(**r) for r in p.get("fallback", [])],
        notes=list(p.get("notes", [])),
    )
