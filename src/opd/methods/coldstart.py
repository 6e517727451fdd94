"""Off-policy cold start, then OPD (``opd coldstart``): the study's recipe for a failing pair (docs/paper.md §4).

One config, one command, one run directory with both stages:

    output_dir/
      sft/      stage 1: ``opd sft`` — teacher responses on ``sft_num_prompts`` prompts of ``prompts``
                (``sft_teacher_temperature`` / ``sft_teacher_top_p``, the study's 0.7 / 0.95; truncated,
                answerless and repetitive responses rejected and counted, or also wrong ones with
                ``sft_only_correct``), then SFT of the student on them (prompt tokens masked, ``sft_lr``
                with a cosine schedule and ``sft_warmup_steps``) → ``sft/final``
      opd/      stage 2: ``opd train`` from ``sft/final`` toward the same teacher, on the prompts of
                ``prompts`` whose text is not in ``sft/teacher_data.jsonl`` (exact match, the
                ``exclude_prompts`` hook of :func:`opd.data.load_prompts`) → ``opd/final``
      config.json, summary.json (both stages' summaries, the total cost)

Each stage is the method's own ``train`` on a config built from this one (:func:`sft_config`,
:func:`opd_config`), so run layout, metrics, checkpoints, resume and cost accounting are theirs. Every
OPD key means what it means for ``opd train`` (it configures stage 2, and the shared keys — models,
data, ``max_new_tokens``, ``micro_batch_size``, ``weight_decay``, evaluation, checkpointing, seed —
configure stage 1 too); stage 1's own settings are the ``sft_`` keys. ``resume=true`` continues
whichever stage was unfinished (a stage-1 run with ``final/`` and ``summary.json`` is not redone).
A compute budget (``budget_unit`` / ``budget``) is for both stages together: stage 1 runs under the whole
budget, stage 2 under what stage 1 left (it is skipped if nothing is left; the final model is then
stage 1's).

Several processes (``torchrun`` / ``accelerate launch``): the run joins the process group once and both
stages run data parallel in it (each as its method does, :mod:`opd.runtime`); rank 0 locks and writes
``output_dir``, the others read each stage's summary back from it.

What this file deliberately leaves out: a teacher for stage 1 other than the OPD teacher, a second
tokenizer, embedding-based (near-duplicate) prompt deduplication, and mixing SFT data into OPD steps.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from opd.config import OPDConfig
from opd.config_io import raise_errors, to_dict
from opd.cost import COUNTERS
from opd.errors import ConfigError
from opd.methods import opd as opd_method
from opd.methods import sft as sft_method
from opd.methods.sft import TEACHER_DATA, SFTConfig
from opd.rundir import RunInterrupted, locked_run_dir, prepare_train_dir
from opd.runtime import Runtime

log = logging.getLogger("opd")

SFT_DIR, OPD_DIR = "sft", "opd"
"""The stages' run directories inside ``output_dir``."""


@dataclass
class ColdstartConfig(OPDConfig):
    """Cold start (SFT on rejection-sampled teacher responses), then OPD on the remaining prompts.

    Every ``opd train`` key is inherited unchanged and configures the OPD stage; the shared ones (models,
    data, ``max_new_tokens``, micro-batching, weight decay, evaluation, checkpointing, seed) also
    configure the SFT stage. The ``sft_`` keys are the SFT stage's own (``opd sft``'s key without the
    prefix); their defaults are the study's cold start.
    """

    output_dir: str = "runs/coldstart"
    """Where the run goes: ``sft/`` (stage 1), ``opd/`` (stage 2), config.json and summary.json."""

    # --- stage 1: teacher data ---
    sft_num_prompts: int = 1024
    """Prompts of ``prompts`` (a seeded random subset) the teacher answers for SFT; OPD trains on the others."""
    sft_teacher_samples_per_prompt: int = 1
    """Teacher responses sampled per SFT prompt (the study: 1)."""
    sft_teacher_temperature: float = 0.7
    """Teacher sampling temperature for the SFT data (the study: 0.7; 0 = greedy). Not ``teacher_temperature``, OPD's scoring temperature."""
    sft_teacher_top_p: float = 0.95
    """Teacher nucleus threshold for the SFT data (the study: 0.95; 1.0 = off)."""
    sft_only_correct: bool = False
    """Keep only teacher responses graded correct (prompts without an answer are kept if they pass the other rules)."""
    sft_repetition_ngram: int = 10
    """n of the repetition rule (a response is rejected when more than ``sft_max_repetition`` of its token n-grams are repeats)."""
    sft_max_repetition: float = 0.5
    """Largest accepted share of repeated n-grams, 1 − distinct/total (1.0 = rule off)."""
    sft_generation_batch_size: int = 64
    """Sequences (prompt x sample rows) per teacher generate call."""

    # --- stage 1: supervised fine-tuning ---
    sft_steps: int = 100
    """SFT optimizer steps, each on ``sft_batch_size`` teacher sequences."""
    sft_batch_size: int = 16
    """Teacher sequences per SFT step (gradients accumulated over micro_batch_size chunks)."""
    sft_lr: float = 1e-5
    """SFT learning rate (the study: 1e-5; tiny models need far more)."""
    sft_lr_schedule: str = "cosine"
    """SFT schedule: cosine (the study) or constant, both with linear warmup."""
    sft_warmup_steps: int = 5
    """SFT linear warmup steps (the study: 5% of the steps)."""
    sft_eval_every: int = 0
    """Evaluate on ``eval_prompts`` every N SFT steps (0 = every ``eval_every`` steps, as the OPD stage)."""

    def __post_init__(self) -> None:
        super().__post_init__()  # _coerce_types (sft_ keys included), the shared parts' and OPD's rules
        errs = []
        if self.sft_num_prompts < 1:
            errs.append(
                f"sft_num_prompts={self.sft_num_prompts}: must be >= 1 (the SFT prompts; OPD trains on the others)"
            )
        if self.sft_eval_every < 0:
            errs.append(f"sft_eval_every={self.sft_eval_every}: must be >= 0 (0 = eval_every)")
        if self.exclude_prompts:
            errs.append(
                f"exclude_prompts={self.exclude_prompts!r}: opd coldstart sets it for its OPD stage (the SFT "
                "stage's prompts); filter the prompt file beforehand instead"
            )
        if self.teacher_prompts:
            errs.append(
                "teacher_prompt_template / teacher_system_prompt: opd coldstart does not support them (its SFT "
                "stage samples the teacher under the student's prompts); use opd train, or drop the keys"
            )
        raise_errors(errs)
        sft_config(self)  # the SFT stage's own rules, reported under the sft_ names


SFT_KEYS: dict[str, str] = {
    "num_prompts": "sft_num_prompts",
    "teacher_samples_per_prompt": "sft_teacher_samples_per_prompt",
    "teacher_temperature": "sft_teacher_temperature",
    "teacher_top_p": "sft_teacher_top_p",
    "only_correct": "sft_only_correct",
    "repetition_ngram": "sft_repetition_ngram",
    "max_repetition": "sft_max_repetition",
    "generation_batch_size": "sft_generation_batch_size",
    "steps": "sft_steps",
    "batch_size": "sft_batch_size",
    "lr": "sft_lr",
    "lr_schedule": "sft_lr_schedule",
    "warmup_steps": "sft_warmup_steps",
}
"""``SFTConfig`` key → the ``ColdstartConfig`` key that sets it; every other SFT key takes the OPD key of
the same name (``eval_every``: ``sft_eval_every`` when that is set) or a value of the stage's own
(:func:`sft_config`)."""


def sft_config(cfg: ColdstartConfig, budget: float | None = None) -> SFTConfig:
    """The SFT stage's config (``output_dir/sft``). A rule it breaks is a ConfigError naming the ``sft_`` key."""
    opd_keys = {f.name for f in fields(OPDConfig)}
    values: dict[str, Any] = {}
    for f in fields(SFTConfig):
        if f.name in SFT_KEYS:
            values[f.name] = getattr(cfg, SFT_KEYS[f.name])
        elif f.name in opd_keys:
            values[f.name] = getattr(cfg, f.name)
    values.update(
        output_dir=str(Path(cfg.output_dir) / SFT_DIR),
        eval_every=cfg.sft_eval_every or cfg.eval_every,
        stop_on_alert=False,  # the alerts watch OPD's signatures
        report_to="none",  # SFT logs to metrics.jsonl only
        sft_data="",
    )
    if budget is not None:
        values["budget"] = budget
    try:
        return SFTConfig(**values)
    except ConfigError as e:
        raise ConfigError(_sft_names(str(e))) from None


def _sft_names(message: str) -> str:
    """An SFT config error in the coldstart's key names (``steps=0`` → ``sft_steps=0``)."""
    for key, ours in SFT_KEYS.items():
        message = re.sub(rf"(?<![\w.]){key}(?!\w)", ours, message)
    return message


def opd_config(cfg: ColdstartConfig, budget: float | None = None) -> OPDConfig:
    """The OPD stage's config (``output_dir/opd``): every OPD key as given, from ``sft/final``, on the
    prompts not in ``sft/teacher_data.jsonl``."""
    values = {f.name: getattr(cfg, f.name) for f in fields(OPDConfig)}
    root = Path(cfg.output_dir)
    values.update(
        student=str(root / SFT_DIR / "final"),
        output_dir=str(root / OPD_DIR),
        exclude_prompts=str(root / SFT_DIR / TEACHER_DATA),
    )
    if budget is not None:
        values["budget"] = budget
    return OPDConfig(**values)


# --------------------------------------------------------------------------- the run


def train(cfg: ColdstartConfig) -> dict[str, Any]:
    """Stage 1 (``opd sft`` into ``output_dir/sft``), then stage 2 (``opd train`` into ``output_dir/opd``).
    Returns the summary (also ``output_dir/summary.json``): both stages' summaries under ``stages``, the
    summed ``cost``, the final model and ``steps_done`` (OPD's). Interrupts as in each stage
    (:class:`opd.rundir.RunInterrupted` with a checkpoint); ``resume=true`` continues."""
    cfg.check_runnable()
    root = Path(cfg.output_dir)
    inputs = {"student": cfg.student, "teacher": cfg.teacher}
    data = {"prompts": cfg.prompts, "eval_prompts": cfg.eval_prompts}
    runtime = Runtime.from_config(cfg)  # the process group both stages share (several processes)
    try:
        if runtime.is_main:
            return _train(cfg, root, inputs, data, runtime)
        return _follow(cfg, root, runtime)
    except RunInterrupted as e:  # name the coldstart's directory in "continue with resume=true ..."
        raise RunInterrupted(
            e.signal_name, {**e.summary, "output_dir": str(root)} if e.summary else None
        ) from None
    finally:
        runtime.close()


def _follow(cfg: ColdstartConfig, root: Path, runtime: Runtime) -> dict[str, Any]:
    """A process other than rank 0: the same stages, once rank 0 has prepared ``output_dir``; each
    stage's outcome is read from the summary its rank 0 wrote."""
    runtime.barrier()  # rank 0 holds and has prepared the directory
    limited = cfg.budget_unit != "none"
    sft_summary = _finished_summary(root / SFT_DIR) if cfg.resume else None
    if sft_summary is None:
        sft_method.train(sft_config(cfg, cfg.budget if limited else None))
        sft_summary = json.loads((root / SFT_DIR / "summary.json").read_text())
    left = cfg.budget - _spent(sft_summary["cost"], cfg.budget_unit) if limited else None
    steps_done = 0
    if left is None or left > 0:
        steps_done = opd_method.train(opd_config(cfg, left))["steps_done"]
    runtime.barrier()  # rank 0 has written the summary
    return {"rank": runtime.rank, "steps_done": steps_done}


def _train(
    cfg: ColdstartConfig, root: Path, inputs: dict[str, str], data: dict[str, str], runtime: Runtime
) -> dict[str, Any]:
    with locked_run_dir(root, models=inputs, data=data) as run:
        prepare_train_dir(
            run, to_dict(cfg), to_dict(ColdstartConfig()), resume=cfg.resume, overwrite=cfg.overwrite
        )
        runtime.barrier()  # the other processes follow (:func:`_follow`)
        limited = cfg.budget_unit != "none"

        # ---- stage 1: cold start
        sft_summary = _finished_summary(root / SFT_DIR) if cfg.resume else None
        if sft_summary is not None:
            log.info("[coldstart] stage 1 (SFT) already finished in %s: not redone", root / SFT_DIR)
        else:
            log.info("[coldstart] stage 1 of 2: SFT on teacher responses into %s", root / SFT_DIR)
            sft_summary = sft_method.train(sft_config(cfg, cfg.budget if limited else None))
        # from here the directory holds a lasting result: never rolled back, and config.json is this run's
        run.clear_previous_run()
        run.fresh = False
        (root / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

        # ---- stage 2: OPD on the prompts SFT did not use
        left = cfg.budget - _spent(sft_summary["cost"], cfg.budget_unit) if limited else None
        if left is not None and left <= 0:
            log.warning(
                "[coldstart] the budget of %g %s was spent in stage 1: no OPD stage",
                cfg.budget,
                cfg.budget_unit,
            )
            opd_summary = None
        else:
            log.info(
                "[coldstart] stage 2 of 2: OPD from %s into %s", sft_summary["final_model"], root / OPD_DIR
            )
            opd_summary = opd_method.train(opd_config(cfg, left))

        summaries = {"sft": sft_summary, "opd": opd_summary}
        summary = {
            "output_dir": str(root),
            "final_model": (opd_summary or sft_summary)["final_model"],
            "steps_done": opd_summary["steps_done"] if opd_summary else 0,
            "sft_steps_done": sft_summary["steps_done"],
            "cost": total_cost([s["cost"] for s in summaries.values() if s]),
            "budget": {"unit": cfg.budget_unit, "budget": cfg.budget, "opd_stage": left} if limited else None,
            "stages": summaries,
        }
        (root / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    runtime.barrier()
    return summary


def _finished_summary(stage_dir: Path) -> dict[str, Any] | None:
    """A stage run's summary when it finished (``final/`` and a summary that is not an interrupt's)."""
    path = stage_dir / "summary.json"
    if not (stage_dir / "final").is_dir() or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return None if summary.get("interrupted") else summary


def _spent(cost_row: dict[str, float], unit: str) -> float:
    return cost_row["cost/flops"] if unit == "flops" else cost_row[f"cost/{unit}"]


def total_cost(rows: list[dict[str, float]]) -> dict[str, float]:
    """The ``cost/*`` rows of the stages, summed (every counter and FLOP estimate adds up)."""
    keys = [f"cost/{k}" for k in COUNTERS] + ["cost/student_flops", "cost/teacher_flops", "cost/flops"]
    return {k: sum(r.get(k, 0) for r in rows) for k in keys}
