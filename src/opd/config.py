"""Typed configuration for opd runs.

One flat dataclass per command, composed from shared parts (``ModelsConfig``, ``DataConfig``,
``RolloutConfig``, ``OptimConfig``, ``RunConfig``) by inheritance, so YAML keys stay flat and each
shared field is documented once. Each field has a docstring (``field_docs`` extracts them for
``--help``). Configs come from YAML files plus ``key=value`` overrides (:func:`load_config`); cross-field rules are
checked in ``__post_init__`` and raise :class:`ConfigError` with the fix. No runtime-derived values live
in the user config.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from opd.alerts import AlertConfig
from opd.errors import ConfigError
from opd.objectives import AGGREGATIONS, SUPPORTS, WEIGHTINGS
from opd.rollout import BACKENDS as ROLLOUT_BACKENDS
from opd.textfiles import read_utf8

# --------------------------------------------------------------------------- parts shared by methods
# A method's config is one flat dataclass (YAML keys and ``key=value`` overrides stay flat) that inherits
# the parts it needs, so each shared field is declared and documented once. Field order in ``--help``:
# the parts in the order of the class bases, reversed (models, data, rollout, optimiser, run), then the
# method's own fields.


@dataclass
class ModelsConfig:
    """Student and teacher models, their dtypes and the devices they run on."""

    student: str = ""
    """Student model: a local directory, a hub id (online only), a .gguf file or ``lab:<name>``."""
    teacher: str = ""
    """Teacher model (same tokenizer as the student): a local directory, hub id, .gguf file or ``lab:<name>``."""
    student_dtype: str = "float32"
    """Student compute dtype: float32 or bfloat16. The weights stay float32 (AdamW master weights, saved as
    float32); bfloat16 runs the forward passes under autocast. Logits, log-probs and losses are always float32.
    float16 is not supported for training (it needs loss scaling): use bfloat16."""
    teacher_dtype: str = "float32"
    """Teacher weights dtype: float32, bfloat16 or float16 (not trained; its log-probs are always float32)."""
    trust_remote_code: bool = False
    """Allow model repos to run their own Python code. Off unless you trust the source."""
    device: str = "auto"
    """Where the student trains and samples: auto (cuda if torch sees a GPU, else mps, else cpu), cpu, cuda, cuda:N or mps."""
    teacher_device: str = ""
    """Where the teacher scores (same choices as ``device``); empty = the student's device."""
    gradient_checkpointing: bool = False
    """Recompute the student's activations in the backward pass instead of keeping them (less memory, ~30% more compute)."""
    lora_r: int = 0
    """LoRA rank for the student (0 = train all weights). Needs ``pip install opd[peft]``; ``final/`` holds the
    merged model and ``final/adapter`` the adapter."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: all-linear (every linear layer but the output head) or a comma-separated list of module names, e.g. q_proj,v_proj."""

    def _check(self) -> list[str]:
        errs = []
        for dt_key in ("student_dtype", "teacher_dtype"):
            if getattr(self, dt_key) not in ("float32", "bfloat16", "float16"):
                errs.append(f"{dt_key}={getattr(self, dt_key)!r}: choose float32 or bfloat16")
        if self.student_dtype == "float16":
            errs.append(
                "student_dtype='float16': not supported for training (float16 gradients need loss scaling, "
                "which opd does not implement). Fix: student_dtype=bfloat16 (or float32)"
            )
        if self.lora_r < 0:
            errs.append(f"lora_r={self.lora_r}: must be >= 0 (0 = no LoRA, train all weights)")
        if self.lora_r and self.lora_alpha <= 0:
            errs.append(f"lora_alpha={self.lora_alpha}: must be > 0")
        if not 0 <= self.lora_dropout < 1:
            errs.append(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        for key, allow_empty in (("device", False), ("teacher_device", True)):
            value = getattr(self, key)
            if not (allow_empty and value == "") and not DEVICE_PATTERN.fullmatch(value):
                errs.append(
                    f"{key}={value!r}: choose auto, cpu, cuda, cuda:N or mps (auto = cuda, else mps, else cpu)"
                )
        return errs


@dataclass
class DataConfig:
    """Prompt sources and how prompts are rendered."""

    prompts: str = ""
    """Prompt source: .jsonl/.json/.parquet/.csv, a saved HF dataset directory, or ``lab:<split>``."""
    prompt_field: str = "auto"
    """Field holding the prompt (text or a verl-style chat list); 'auto' tries prompt/problem/question/..."""
    answer_field: str = "auto"
    """Field holding the ground-truth answer (dotted paths allowed, e.g. reward_model.ground_truth)."""
    prompt_template: str | None = None
    """Template applied to the prompt text; ``{problem}`` is replaced by the prompt. None = use as is."""
    use_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (recommended for chat models)."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for apply_chat_template, e.g. {enable_thinking: false}."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this many tokens are dropped (the count is logged)."""
    exclude_prompts: str = ""
    """Leave out of ``prompts`` every row whose prompt text (before or after prompt_template) is exactly one of
    this source's, e.g. an SFT run's teacher_data.jsonl (the count is logged). Empty = keep all."""

    def _check(self) -> list[str]:
        return (
            [f"max_prompt_tokens={self.max_prompt_tokens}: must be >= 1"]
            if self.max_prompt_tokens < 1
            else []
        )


@dataclass
class RolloutConfig:
    """How many on-policy samples each step draws, and how."""

    prompts_per_step: int = 8
    """Prompts sampled per step."""
    rollouts_per_prompt: int = 4
    """Student responses sampled per prompt."""
    max_new_tokens: int = 256
    """Maximum response length in tokens; longer responses are truncated (and flagged)."""
    temperature: float = 1.0
    """Student sampling temperature for rollouts (> 0; the study uses 1.0). The student is scored at the same
    temperature (logits / temperature) for rewards, the update and metrics."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts: must stay 1.0 in training (truncated sampling is not the distribution
    the objective scores); use eval_top_p for evaluation."""
    sample_top_k: int = 0
    """Top-k filtering of rollout sampling: must stay 0 (off) in training (see top_p). Not the objective's ``support_size``."""
    rollout_batch_size: int = 0
    """Sequences (prompt x sample rows) per generate call (0 = the whole step at once)."""
    rollout_backend: str = "hf"
    """Sampling backend (``opd.rollout.make_backend``): hf (Hugging Face generate on the training model)."""
    rollout_seeding: str = "stream"
    """stream: one random stream per process, prompts batched together (fastest). per_prompt: each prompt's
    samples come from a seed of (seed, step, its place in the step's batch), so a run samples the same
    rollouts at any number of processes or rollout_batch_size (one generate call per prompt: slower)."""

    def _check(self) -> list[str]:
        errs = []
        for key in ("prompts_per_step", "rollouts_per_prompt", "max_new_tokens"):
            if getattr(self, key) < 1:
                errs.append(f"{key}={getattr(self, key)}: must be >= 1")
        for key in ("sample_top_k", "rollout_batch_size"):
            if getattr(self, key) < 0:
                errs.append(f"{key}={getattr(self, key)}: must be >= 0")
        if self.temperature <= 0:
            errs.append(
                f"temperature={self.temperature}: OPD trains on sampled rollouts (greedy decoding gives "
                "rollouts_per_prompt identical copies); use temperature=1.0 (the study's value). "
                "eval_temperature=0 stays allowed for greedy evaluation"
            )
        if not 0 < self.top_p <= 1:
            errs.append(f"top_p={self.top_p}: must be in (0, 1]")
        truncated = [f"top_p={self.top_p}"] if self.top_p < 1 else []
        truncated += [f"sample_top_k={self.sample_top_k}"] if self.sample_top_k > 0 else []
        if truncated:
            errs.append(
                f"{' and '.join(truncated)}: OPD scores the student's untruncated distribution at "
                "`temperature`, so top-p / top-k rollouts would be off-policy for the objective. Fix: "
                "top_p=1.0 and sample_top_k=0 (the study's setting); for evaluation use eval_top_p"
            )
        if self.rollout_seeding not in ("stream", "per_prompt"):
            errs.append(f"rollout_seeding={self.rollout_seeding!r}: choose stream or per_prompt")
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            errs.append(
                f"rollout_backend={self.rollout_backend!r}: choose one of {', '.join(ROLLOUT_BACKENDS)}"
            )
        return errs


@dataclass
class OptimConfig:
    """The number of steps, AdamW, its schedule and the micro-batching of forward/backward passes."""

    steps: int = 100
    """Number of optimizer steps (each on a fresh on-policy rollout batch)."""
    lr: float = 1e-6
    """AdamW learning rate (the study: 1e-6 for 1.5B+ models; tiny models need far more)."""
    lr_schedule: str = "constant"
    """constant or cosine (both with linear warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass; gradients are accumulated over the rollout batch."""

    def _check(self) -> list[str]:
        errs = []
        for key in ("steps", "micro_batch_size"):
            if getattr(self, key) < 1:
                errs.append(f"{key}={getattr(self, key)}: must be >= 1")
        if self.warmup_steps < 0:
            errs.append(f"warmup_steps={self.warmup_steps}: must be >= 0")
        if self.lr <= 0:
            errs.append(f"lr={self.lr}: must be > 0")
        if self.lr_schedule not in ("constant", "cosine"):
            errs.append(f"lr_schedule={self.lr_schedule!r}: choose constant or cosine")
        if self.warmup_steps > self.steps:
            errs.append(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}: lower warmup_steps")
        return errs


@dataclass
class RunConfig:
    """Output directory, seeding, checkpointing, periodic evaluation, alerts and logging."""

    output_dir: str = "runs/opd"
    """Where metrics.jsonl, checkpoints and the final model go."""
    seed: int = 0
    """Seed for data order, sampling and initialisation of any randomness."""
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only the final model)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir (settings that define the run must match)."""
    overwrite: bool = False
    """Replace the run already in output_dir (its metrics, checkpoints, final model); off: a non-empty output_dir is refused."""
    eval_every: int = 0
    """Evaluate accuracy on ``eval_prompts`` every N steps (0 = off)."""
    eval_prompts: str = ""
    """Prompt source with answers for periodic evaluation (same formats as ``prompts``)."""
    eval_limit: int = 0
    """Evaluate on at most this many eval prompts (0 = all)."""
    eval_temperature: float = 0.0
    """Sampling temperature for periodic evaluation (0 = greedy, one sample). The study: 0.7."""
    eval_top_p: float = 1.0
    """Nucleus threshold for periodic evaluation when eval_temperature > 0 (1.0 = off). The study: 0.95."""
    eval_samples: int = 1
    """Samples per eval prompt when eval_temperature > 0: eval/accuracy is avg@n. The study: 16."""
    alerts: bool = True
    """Check the failure-signature alerts (see docs/metrics.md)."""
    stop_on_alert: bool = False
    """Stop the run when an alert fires."""
    alert_thresholds: dict = field(default_factory=dict)
    """Overrides of the alert thresholds (opd.alerts.AlertConfig fields), e.g. {window: 20, truncated_frac_max: 0.3}."""
    progress: bool = True
    """Show a progress bar."""
    threads: int = 0
    """torch CPU threads (0 = torch default)."""
    report_to: str = "none"
    """Experiment tracking besides metrics.jsonl: none, or a comma-separated list of tensorboard, wandb, trackio
    (each an optional install, imported only when chosen); the same metric names as metrics.jsonl."""
    budget_unit: str = "none"
    """Stop the run when a compute budget is spent: none, student_loss_tokens (response tokens trained on,
    per optimiser pass) or flops (the estimate of ``opd.cost``); ``steps`` stays the upper bound."""
    budget: float = 0.0
    """The budget in ``budget_unit``: the run stops after the first step at which the cumulative count reaches it."""

    def _check(self) -> list[str]:
        errs = []
        unknown = [b for b in tracking_backends(self.report_to) if b not in TRACKERS]
        if unknown:
            errs.append(
                f"report_to={self.report_to!r}: unknown {', '.join(unknown)}; choose none or from {', '.join(TRACKERS)}"
            )
        if self.budget_unit not in BUDGET_UNITS:
            errs.append(f"budget_unit={self.budget_unit!r}: choose one of {', '.join(BUDGET_UNITS)}")
        elif self.budget_unit != "none" and self.budget <= 0:
            errs.append(f"budget={self.budget} with budget_unit={self.budget_unit}: give a budget > 0")
        for key in ("save_every", "keep_checkpoints", "eval_every", "eval_limit", "threads"):
            if getattr(self, key) < 0:
                errs.append(f"{key}={getattr(self, key)}: must be >= 0")
        if self.eval_temperature < 0:
            errs.append(f"eval_temperature={self.eval_temperature}: must be >= 0 (0 = greedy)")
        errs.extend(_alert_threshold_errors(self))
        if self.keep_checkpoints < 1 and self.save_every > 0:
            errs.append("keep_checkpoints must be >= 1 when save_every > 0")
        if self.eval_every and not self.eval_prompts:
            errs.append("eval_every > 0 needs eval_prompts (a prompt source with answers)")
        if self.resume and self.overwrite:
            errs.append("resume=true and overwrite=true: choose one (continue the run, or replace it)")
        if not 0 < self.eval_top_p <= 1:
            errs.append(
                f"eval_top_p={self.eval_top_p}: must be in (0, 1]; 1.0 = off, the study evaluates at 0.95"
            )
        if self.eval_samples < 1:
            errs.append(
                f"eval_samples={self.eval_samples}: must be >= 1 (the study: 16, with eval_temperature=0.7)"
            )
        return errs


@dataclass
class OPDConfig(RunConfig, OptimConfig, RolloutConfig, DataConfig, ModelsConfig):
    """On-policy distillation run. Defaults follow the study's reference recipe, scaled for small runs.

    The shared parts (models, data, rollout, optimiser, run) are inherited; the fields below are OPD's own.
    """

    # --- objective ---
    objective: str = "topk"
    """The OPD objective: sampled (the sampled token's log-ratio as reward), topk (the reverse KL on a top-K
    support of ``support_size`` tokens; see support / weighting) or full (the exact full-vocabulary reverse KL)."""
    support_size: int = 16
    """K of the top-K objective (objective=topk only)."""
    support: str = "student"
    """Top-K support: student, teacher, intersection, union or symmetric_difference."""
    weighting: str = "student_p"
    """Top-K weights: student_p, teacher_p or uniform."""
    renormalize: bool = False
    """Top-K: minimise the paper's Eq. 5 form, KL(p̄‖q̄) with p, q renormalised on the support (exact gradient), instead of the reference code's full-vocab log-ratio. Not with symmetric_difference. See docs/objectives.md."""
    estimator: str = "k1"
    """Sampled-token mode: which estimate of the per-token KL is logged as reward/mean, k1 (log q - log p) or k3 (low variance). Training always uses the k1 log-ratio as the advantage (k3 is not a valid advantage; docs/objectives.md)."""
    teacher_temperature: float = 1.0
    """Temperature applied to the teacher's logits when scoring."""
    loss_aggregation: str = "token-mean"
    """token-mean, seq-mean-token-sum or seq-mean-token-mean."""
    metrics_top_k: int = 16
    """k for the mechanism metrics (overlap ratio etc.), logged in every objective mode."""
    metrics_position_chunk: int = 256
    """Position-chunk size (tokens) for the per-position metrics."""

    # --- policy-gradient update ---
    ppo_epochs: int = 1
    """Passes over each rollout batch; ratio clipping matters only when > 1."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon."""
    dual_clip: float = 3.0
    """Dual-clip constant c for negative advantages."""
    score_chunk_size: int = 256
    """Positions per chunk when computing log-softmax (peak memory O(chunk * vocab))."""

    def __post_init__(self) -> None:
        _coerce_types(self)
        errs = part_errors(self)  # the rules of the shared parts, then OPD's own
        if self.objective not in OBJECTIVES:
            errs.append(f"objective={self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.support_size < 1:
            errs.append(f"support_size={self.support_size}: must be >= 1 (K of the top-K objective)")
        if self.support not in SUPPORTS:
            errs.append(f"support={self.support!r}: choose one of {', '.join(SUPPORTS)}")
        if self.weighting not in WEIGHTINGS:
            errs.append(f"weighting={self.weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        if self.loss_aggregation not in AGGREGATIONS:
            errs.append(
                f"loss_aggregation={self.loss_aggregation!r}: choose one of {', '.join(AGGREGATIONS)}"
            )
        if self.estimator not in ("k1", "k3"):
            errs.append(f"estimator={self.estimator!r}: choose k1 or k3")
        if self.renormalize and self.support == "symmetric_difference" and self.objective == "topk":
            errs.append(
                "renormalize=true with support=symmetric_difference: its weights are raw probabilities, "
                "not renormalised on the support, so Eq. 5 is not defined there; set renormalize=false "
                "or choose another support"
            )
        for key in ("ppo_epochs", "score_chunk_size", "metrics_top_k"):
            if getattr(self, key) < 1:
                errs.append(f"{key}={getattr(self, key)}: must be >= 1")
        if self.teacher_temperature <= 0:
            errs.append(f"teacher_temperature={self.teacher_temperature}: must be > 0; use 1.0")
        if self.clip_eps <= 0 or self.dual_clip <= 1:
            errs.append("clip_eps must be > 0 and dual_clip > 1")
        if errs:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(errs))

    def check_runnable(self) -> None:
        """Rules that only matter when actually training (not when printing help or defaults)."""
        missing = [k for k in ("student", "teacher", "prompts") if not getattr(self, k)]
        if missing:
            raise ConfigError(
                f"missing required key(s): {', '.join(missing)}; set them in the YAML file or as "
                f"key=value, e.g. student=lab:student teacher=lab:teacher-a-plus prompts=lab:train"
            )


# --------------------------------------------------------------------------- helpers


OBJECTIVES = ("sampled", "topk", "full")
"""Values of ``OPDConfig.objective``."""

RENAMED_KEYS: dict[str, str] = {
    "top_k": "objective + support_size (top_k=K>0 -> objective=topk support_size=K; top_k=0 -> "
    "objective=sampled; top_k=-1 -> objective=full)",
    "rollout_top_k": "sample_top_k",
    "out_dir": "output_dir",
    "out": "output_dir",
}
"""Keys of earlier versions → what replaced them (named in the error for an old key)."""


def translate_old_keys(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config of an earlier version (``config.json`` of a run being resumed) in today's keys:
    ``top_k`` → ``objective`` + ``support_size``, ``rollout_top_k`` → ``sample_top_k``. New keys win."""
    out = dict(values)
    if "top_k" in out:
        k = out.pop("top_k")
        if isinstance(k, int) and "objective" not in out:
            out["objective"] = "sampled" if k == 0 else ("full" if k < 0 else "topk")
            if k > 0:
                out.setdefault("support_size", k)
    if "rollout_top_k" in out:
        out.setdefault("sample_top_k", out.pop("rollout_top_k"))
    return out


TRACKERS = ("tensorboard", "wandb", "trackio")
"""Experiment trackers ``report_to`` accepts (besides ``none``)."""


def tracking_backends(report_to: str) -> tuple[str, ...]:
    """``"tensorboard, wandb"`` → ``("tensorboard", "wandb")``; ``none`` / empty → ``()``."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    return () if names in ([], ["none"]) else tuple(names)


BUDGET_UNITS = ("none", "student_loss_tokens", "flops")
"""Units of ``budget`` (``RunConfig.budget_unit``)."""

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
"""Device strings ``device`` / ``teacher_device`` accept (``opd.runtime`` checks availability)."""


PARTS: tuple[type, ...] = (ModelsConfig, DataConfig, RolloutConfig, OptimConfig, RunConfig)
"""The shared config parts, each with a ``_check() -> list[str]`` of its own rules."""


def part_errors(cfg: Any) -> list[str]:
    """The rule violations of every shared part ``cfg`` inherits (a method's ``__post_init__`` adds its
    own rules and raises one ConfigError listing them all)."""
    errs: list[str] = []
    for part in PARTS:
        if isinstance(cfg, part):
            errs += part._check(cfg)
    return errs


def field_docs(cls: type) -> dict[str, str]:
    """Field name → docstring (the string literal right after each annotated field), inherited parts
    included (a method's config reuses the docstrings of the shared parts it inherits)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        source = textwrap.dedent(inspect.getsource(klass))  # a class defined inside a function is indented
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for prev, node in zip(body, body[1:]):
            if (
                isinstance(prev, ast.AnnAssign)
                and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _alert_threshold_errors(cfg: RunConfig) -> list[str]:
    """Validate ``cfg.alert_thresholds`` against ``opd.alerts.AlertConfig`` (keys with a did-you-mean
    hint, types, ranges) and store the type-coerced values; return the problems found."""
    hints = get_type_hints(AlertConfig)
    names = [f.name for f in fields(AlertConfig) if f.name != "stop_on_alert"]
    errs: list[str] = []
    coerced: dict[str, Any] = {}
    for key, value in cfg.alert_thresholds.items():
        if key == "stop_on_alert":
            errs.append("alert_thresholds.stop_on_alert: set the top-level key stop_on_alert=true instead")
        elif key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            errs.append(
                f"alert_thresholds: unknown key {key!r}; {hint}known keys: {', '.join(names)} (docs/metrics.md)"
            )
        else:
            try:
                coerced[key] = _coerce_value(hints[key], value, f"alert_thresholds.{key}")
            except ConfigError as e:
                errs.append(str(e))
    if errs:
        return errs
    try:
        AlertConfig(**coerced)
    except ValueError as e:
        return [f"alert_thresholds: {e}"]
    cfg.alert_thresholds = coerced
    return []


def load_yaml_text(text: str, where: str, example: str = "") -> Any:
    """``yaml.safe_load(text)``; a syntax error becomes a ConfigError naming ``where`` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}; fix the syntax there{example}") from None


def _field_type(cls: type, name: str) -> Any:
    return get_type_hints(cls)[name]


def _coerce_value(tp: Any, value: Any, key: str) -> Any:
    """Convert YAML/CLI values to the field type, with an error naming the key on failure."""
    origin = get_origin(tp)
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}: null is not allowed; give a value")
    if origin is not None and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _coerce_value(inner[0], value, key)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = load_yaml_text(value, key, f", e.g. {key}=[0.9, 0.999]")
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
                return tuple(_coerce_value(args[0], v, key) for v in value)
            return tuple(_coerce_value(a, v, key) for a, v in zip(args, value, strict=True))
        if tp is dict or origin is dict:
            if isinstance(value, str):
                value = load_yaml_text(value, key, f", e.g. {key}={{name: 1, other: 2}}") or {}
            if not isinstance(value, dict):
                raise ValueError
            return value
    except ConfigError:
        raise
    except (ValueError, TypeError):
        raise ConfigError(
            f"{key}={value!r}: expected a value of type {getattr(tp, '__name__', tp)}"
        ) from None
    return value


def _coerce_types(obj: Any) -> None:
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        setattr(obj, f.name, _coerce_value(hints[f.name], getattr(obj, f.name), f.name))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. steps=10)")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"override {item!r}: {key!r} is not a config key")
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key] = raw
        # keep strings like "lab:student" or paths as given
        if isinstance(out[key], (dict, list)) and key not in (
            "chat_template_kwargs",
            "adam_betas",
            "alert_thresholds",
        ):
            out[key] = raw
    return out


def build_config(cls: type, values: dict[str, Any], command: str = "train"):
    """Instantiate ``cls`` from a dict, rejecting unknown keys with a did-you-mean hint (and the
    ``opd <command> --help`` that lists the keys)."""
    names = {f.name for f in fields(cls)}
    unknown = [k for k in values if k not in names]
    renamed = [k for k in unknown if k in RENAMED_KEYS and RENAMED_KEYS[k].split()[0] in names]
    if renamed:
        raise ConfigError("; ".join(f"config key {k!r} was renamed: use {RENAMED_KEYS[k]}" for k in renamed))
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"unknown config key(s) for {cls.__name__}: {', '.join(hints)}; run "
            f"`opd {command} --help` for the list"
        )
    return cls(**values)


def load_config(
    cls: type,
    path: str | Path | None = None,
    overrides: list[str] | dict | None = None,
    command: str = "train",
):
    """YAML file (optional) + overrides → validated config of type ``cls`` (``command``: the CLI
    subcommand named in the error for an unknown key)."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        loaded = load_yaml_text(read_utf8(p), f"config file {str(p)!r}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping of key: value at the top level")
        values.update(loaded)
    if overrides:
        values.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return build_config(cls, values, command)


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def help_text(cls: type) -> str:
    """One line per key: name, type, default, meaning (used by ``opd train --help``)."""
    docs = field_docs(cls)
    hints = get_type_hints(cls)
    lines = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tp = hints[f.name]
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"  {f.name} ({tname}, default: {default!r})\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
