"""``RecipeConfig``: one ``opd recipe`` run. It is ``opd coldstart``'s config (every ``opd train`` key plus
the ``sft_`` keys of the cold-start stage, :class:`opd.methods.coldstart.ColdstartConfig`) plus the
recipe's own keys below. Loaded like every opd config: YAML file plus ``key=value`` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from opd.config import DataConfig, ModelsConfig, TeacherPromptConfig
from opd.config_io import _coerce_types
from opd.diagnose.config import DiagnoseConfig
from opd.errors import ConfigError
from opd.methods.coldstart import ColdstartConfig
from opd.remedies.choose import REMEDY_NAMES

__all__ = ["TEMPLATE_TARGETS", "RecipeConfig", "diagnose_config"]

TEMPLATE_TARGETS = ("prompt_template", "teacher_prompt_template")

SHARED_DIAGNOSE_KEYS = (
    "max_new_tokens",
    "teacher_temperature",
    "seed",
    "threads",
    "progress",
    "score_chunk_size",
)
"""``DiagnoseConfig`` keys taken from the recipe's own (besides the models, data and teacher-prompt keys)."""


@dataclass
class RecipeConfig(ColdstartConfig):
    """Diagnose, remedy, train, watch, evaluate, report (docs/recipe.md, "opd recipe"). The ``opd train``
    keys configure every OPD run, the ``sft_`` keys the cold-start stage when that remedy is applied."""

    output_dir: str = "runs/recipe"
    """The run directory: diagnose/, attempt-N/ (one per run), diagnose-after/, recipe.json, report.{md,html}, PNG curves."""

    remedies: tuple[str, ...] = REMEDY_NAMES
    """Remedies the recipe may apply: template, content, coldstart."""
    max_remedies: int = 2
    """Most remedies applied in all (those the diagnosis calls for first, then one per alert that stops a run)."""
    template_candidates: tuple[str, ...] = ()
    """Candidate prompt templates (``{problem}`` placeholder) for template alignment; none = that remedy is skipped."""
    template_target: str = "teacher_prompt_template"
    """Where the chosen template goes: teacher_prompt_template (the teacher only, as the candidates are
    measured) or prompt_template (both models). With the cold start in the same run it goes to
    prompt_template (the cold start's SFT stage samples the teacher under the student's prompt)."""
    content_fraction: float = 0.5
    """Content alignment: the share of the prompt pool kept (the best-agreeing prompts plus the OOD share)."""
    content_num_prompts: int = 256
    """Content alignment: prompts of the pool measured and ranked (a seeded sample; only measured ones are kept)."""
    content_ood_share: float = 0.2
    """Content alignment: the share of the kept prompts drawn from the rest of the pool (holds entropy up)."""
    low_overlap_partial: tuple[float, float] = (0.1, 0.9)
    """Incompatible patterns: content alignment instead of the cold start when the share of the diagnosis's
    rollouts with a low overlap mass lies in this range (the mismatch is on part of the pool only)."""
    diagnose: dict = field(default_factory=dict)
    """``opd diagnose`` keys for the diagnoses (before and after), e.g. {num_prompts: 32, rollouts_per_prompt: 2};
    the models, prompts, max_new_tokens and seed are the recipe's unless given here."""
    diagnose_after: bool = True
    """Diagnose the final model against the teacher (the report's "after")."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _coerce_types(self)
        errs = []
        bad = [r for r in self.remedies if r not in REMEDY_NAMES]
        if bad:
            errs.append(f"remedies={list(self.remedies)}: unknown {bad}; choose from {list(REMEDY_NAMES)}")
        if self.max_remedies < 0:
            errs.append(f"max_remedies={self.max_remedies}: must be >= 0 (0 = diagnose and run, no remedy)")
        if self.template_target not in TEMPLATE_TARGETS:
            errs.append(f"template_target={self.template_target!r}: choose {' or '.join(TEMPLATE_TARGETS)}")
        for t in self.template_candidates:
            if "{problem}" not in t and "{prompt}" not in t:
                errs.append(
                    f"template_candidates: {t!r} has no {{problem}} placeholder; write e.g. 'Solve: {{problem}}'"
                )
        if not 0 < self.content_fraction <= 1:
            errs.append(f"content_fraction={self.content_fraction}: must be in (0, 1]")
        if self.content_num_prompts < 1:
            errs.append(f"content_num_prompts={self.content_num_prompts}: must be >= 1")
        if not 0 <= self.content_ood_share < 1:
            errs.append(f"content_ood_share={self.content_ood_share}: must be in [0, 1)")
        lo, hi = self.low_overlap_partial
        if not 0 <= lo <= hi <= 1:
            errs.append(f"low_overlap_partial={list(self.low_overlap_partial)}: need 0 <= low <= high <= 1")
        if errs:
            raise ConfigError("invalid recipe config:\n  - " + "\n  - ".join(errs))
        diagnose_config(self, "", self.student or "lab:student")  # the diagnose keys' own rules, now


def diagnose_config(cfg: RecipeConfig, output_dir: str, student: str) -> DiagnoseConfig:
    """The diagnosis of ``student`` against the recipe's teacher: the models, data and teacher-prompt keys
    and :data:`SHARED_DIAGNOSE_KEYS` from the recipe, then its ``diagnose`` mapping, into ``output_dir``."""
    names = {f.name for f in fields(DiagnoseConfig)}
    shared = {f.name for c in (ModelsConfig, DataConfig, TeacherPromptConfig) for f in fields(c)}
    values = {k: getattr(cfg, k) for k in shared | set(SHARED_DIAGNOSE_KEYS) if k in names}
    values.pop("student_dtype", None)  # opd train's is a compute dtype; the diagnosis loads weights in it
    unknown = [k for k in cfg.diagnose if k not in names]
    if unknown:
        raise ConfigError(
            f"diagnose: unknown key(s) {unknown}; they are opd diagnose's keys (`opd diagnose --help`)"
        )
    values.update(cfg.diagnose)
    values.update(student=student, output_dir=output_dir or "runs/diagnose")
    try:
        return DiagnoseConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"diagnose: {e}") from None
