"""``DiagnoseConfig``: one pre-flight diagnosis. The models and prompts keys are ``opd train``'s
(:class:`opd.config.ModelsConfig`, :class:`opd.config.DataConfig`, documented once there); the rest
are the diagnosis's own. Loaded like every opd config: YAML file plus ``key=value`` overrides
(:func:`opd.config_io.load_config`)."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields

from opd.config import DataConfig, ModelsConfig, TeacherPromptConfig
from opd.config_io import _coerce_types, below, dtype_errors, load_yaml_text, raise_errors, require_keys
from opd.diagnose.verdict import DiagnoseThresholds
from opd.errors import ConfigError

__all__ = ["DiagnoseConfig"]


@dataclass
class DiagnoseConfig(TeacherPromptConfig, DataConfig, ModelsConfig):
    """One pre-flight diagnosis of a (student, teacher, prompts) triple; answers in the prompts enable
    condition (ii). Same conventions as ``OPDConfig``."""

    student_dtype: str = "float32"
    """Student weights dtype: float32, bfloat16 or float16 (inference only; log-probs are always float32).
    Unlike ``opd train``'s compute dtype, the weights themselves are loaded in this dtype."""

    # --- sample sizes ---
    num_prompts: int = 64
    """Prompts sampled (seeded shuffle) from the source."""
    rollouts_per_prompt: int = 4
    """Student rollouts per prompt (scored by both models for condition (i) and the rewards)."""
    max_new_tokens: int = 256
    """Maximum response length of every generation (rollouts, accuracy, continuations)."""
    temperature: float = 1.0
    """Student sampling temperature for the rollouts (OPD samples at 1.0); the student is scored at it."""
    teacher_temperature: float = 1.0
    """Temperature applied to the teacher's logits when scoring (as in ``opd train``)."""
    metrics_top_k: int = 16
    """k of the overlap metrics (TopK of each model at every position) and K of the top-K reward
    (student support, student_p weights: what ``opd train`` optimises with ``objective=topk support_size=K``)."""
    prefix_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Continuation test: cut each prompt's first rollout after these fractions of its response tokens."""
    eval_temperature: float = 0.0
    """Decoding for the accuracy check and the continuations: 0 = greedy (deterministic), > 0 = sampled."""
    eval_samples: int = 1
    """Samples per prompt (and per prefix) when eval_temperature > 0 (avg@n); ignored when greedy."""
    position_bin: int = 0
    """Response positions per bin of the position profiles; 0 = the longest rollout // 16, rounded up."""

    # --- run ---
    output_dir: str = "runs/diagnose"
    """Where diagnosis.json, diagnosis.md and diagnosis.html are written."""
    seed: int = 0
    """Seed of the prompt sample and of all sampling."""
    batch_size: int = 64
    """Sequences per generate call and per scoring forward pass (lower it for large models)."""
    score_chunk_size: int = 256
    """Positions per chunk when computing log-softmax (peak memory O(chunk * vocab))."""
    threads: int = 0
    """torch CPU threads; 0 = auto: 1 when both models have under 10M parameters (tiny models gain nothing
    from intra-op threads and slow down several-fold on a shared CPU), else the torch default. Restored after."""
    progress: bool = True
    """Show progress bars."""
    thresholds: DiagnoseThresholds = field(default_factory=DiagnoseThresholds)
    """Decision thresholds, a mapping of DiagnoseThresholds fields, e.g. thresholds={overlap_ratio_min: 0.5}."""

    def __post_init__(self) -> None:
        if isinstance(self.prefix_fractions, (int, float)) and not isinstance(self.prefix_fractions, bool):
            self.prefix_fractions = (float(self.prefix_fractions),)
        self.thresholds = _thresholds(self.thresholds)
        _coerce_types(self)
        errs = TeacherPromptConfig._check(self)
        errs += below(
            self,
            (
                "num_prompts",
                "rollouts_per_prompt",
                "max_new_tokens",
                "metrics_top_k",
                "eval_samples",
                "batch_size",
            ),
            1,
        )
        errs += below(self, ("position_bin", "threads", "max_prompt_tokens", "score_chunk_size"), 0)
        if any(not 0.0 <= f < 1.0 for f in self.prefix_fractions):
            errs.append(
                f"prefix_fractions={list(self.prefix_fractions)}: each fraction must be in [0, 1) "
                "(0 = from the prompt alone); pass an empty list to skip the continuation test"
            )
        if self.temperature <= 0:
            errs.append(
                f"temperature={self.temperature}: rollouts must be sampled (> 0), as OPD samples them; use 1.0"
            )
        if self.teacher_temperature <= 0:
            errs.append(f"teacher_temperature={self.teacher_temperature}: must be > 0; use 1.0")
        if self.eval_temperature < 0:
            errs.append(f"eval_temperature={self.eval_temperature}: must be >= 0 (0 = greedy)")
        errs += dtype_errors(self, ("student_dtype", "teacher_dtype"))
        raise_errors(errs, "diagnose config")

    def check_runnable(self) -> None:
        """The keys that must be set before running (not needed to print help or defaults)."""
        require_keys(
            self,
            ("student", "teacher", "prompts"),
            "opd diagnose student=lab:student teacher=lab:teacher-a-plus prompts=lab:test",
        )

    def bin_size(self, longest_response: int) -> int:
        """Positions per profile bin: ``position_bin``, or the longest rollout / 16 (at least 1)."""
        return self.position_bin or max(1, math.ceil(longest_response / 16))

    @property
    def eval_n(self) -> int:
        """Samples per prompt of the accuracy check and the continuations (1 when greedy)."""
        return 1 if self.eval_temperature == 0 else self.eval_samples


def _thresholds(value) -> DiagnoseThresholds:
    """``thresholds`` from a DiagnoseThresholds, a mapping, or YAML text of one (a ``key=value`` override)."""
    if isinstance(value, DiagnoseThresholds):
        return value
    if isinstance(value, str):
        value = load_yaml_text(value, "thresholds", ", e.g. thresholds={overlap_ratio_min: 0.5}") or {}
    if not isinstance(value, dict):
        raise ConfigError(
            f"thresholds={value!r}: expected a mapping of threshold names to numbers, "
            "e.g. thresholds={overlap_ratio_min: 0.5}"
        )
    names = [f.name for f in fields(DiagnoseThresholds)]
    out = {}
    for key, raw in value.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"thresholds: unknown key {key!r}; {hint}known keys: {', '.join(names)}")
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"thresholds.{key}={raw!r}: expected a number")
        out[key] = float(raw)
    return DiagnoseThresholds(**out)
