"""Typed configuration for opd runs.

One flat dataclass per command, composed from shared parts (``ModelsConfig``, ``DataConfig``,
``RolloutConfig``, ``OptimConfig``, ``RunConfig``) by inheritance, so YAML keys stay flat and each
shared field is documented once. Each field has a docstring (``field_docs`` extracts them for
``--help``). Configs come from YAML files plus ``key=value`` overrides (:func:`opd.config_io.load_config`); cross-field rules are
checked in ``__post_init__`` and raise :class:`ConfigError` with the fix. No runtime-derived values live
in the user config.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from opd.alerts import AlertConfig
from opd.config_io import _coerce_types, _coerce_value, below, dtype_errors, raise_errors, require_keys
from opd.errors import ConfigError
from opd.objectives import AGGREGATIONS, SUPPORTS, WEIGHTINGS
from opd.rollout import BACKENDS as ROLLOUT_BACKENDS

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
    """Teacher model (same tokenizer as the student): a local directory, hub id, .gguf file or ``lab:<name>``;
    ``opd train`` also takes a served teacher, ``http://host:port`` (``opd serve-teacher``, docs/serve.md)."""
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
        errs = dtype_errors(self, ("student_dtype", "teacher_dtype"))
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
class TeacherPromptConfig:
    """The teacher's own rendering of each prompt (template alignment: docs/recipe.md)."""

    teacher_prompt_template: str | None = None
    """Template the teacher reads the prompt with when scoring (``{problem}`` placeholder); the student samples
    and is scored under ``prompt_template``, the teacher scores the same response tokens after its own
    rendering. None = the student's ``prompt_template``. Same tokenizer required."""
    teacher_system_prompt: str | None = None
    """A system message only the teacher sees (needs use_chat_template=true). None = the student's (none)."""

    def _check(self) -> list[str]:
        if self.teacher_system_prompt is not None and not getattr(self, "use_chat_template", True):
            return [
                "teacher_system_prompt is set but use_chat_template=false: a system message needs the chat "
                "template; set use_chat_template=true or put the instruction into teacher_prompt_template"
            ]
        return []

    @property
    def teacher_prompts(self) -> bool:
        """Whether the teacher reads its own rendering of the prompts."""
        return self.teacher_prompt_template is not None or self.teacher_system_prompt is not None


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
    """Sampling backend (``opd.rollout.make_backend``): hf (Hugging Face generate on the training model) or
    vllm (a colocated vLLM engine, weights pushed after every optimizer step; ``pip install 'opd[vllm]'``,
    docs/scaling.md)."""
    vllm_gpu_memory_utilization: float = 0.3
    """rollout_backend=vllm: fraction of the GPU's memory the colocated engine may take (weights + KV cache);
    the trainer needs the rest. Ignored on CPU (``VLLM_CPU_KVCACHE_SPACE`` GiB sets the cache there)."""
    vllm_enforce_eager: bool = True
    """rollout_backend=vllm: run the engine without CUDA graphs / torch.compile (faster start, less memory)."""
    rollout_seeding: str = "stream"
    """stream: one random stream per process, prompts batched together (fastest). per_prompt: each prompt's
    samples come from a seed of (seed, step, its place in the step's batch), so a run samples the same
    rollouts at any number of processes or rollout_batch_size (one generate call per prompt: slower)."""

    def _check(self) -> list[str]:
        errs = []
        errs += below(self, ("prompts_per_step", "rollouts_per_prompt", "max_new_tokens"), 1)
        errs += below(self, ("sample_top_k", "rollout_batch_size"), 0)
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
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            errs.append(f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization}: must be in (0, 1]")
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
        errs += below(self, ("steps", "micro_batch_size"), 1)
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
        errs += below(self, ("save_every", "keep_checkpoints", "eval_every", "eval_limit", "threads"), 0)
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
class OPDConfig(RunConfig, OptimConfig, RolloutConfig, TeacherPromptConfig, DataConfig, ModelsConfig):
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
    teacher_timeout: float = 60.0
    """Served teacher (teacher=http://...) only: seconds to wait for one scoring request."""
    teacher_retries: int = 3
    """Served teacher only: further tries after a failed request (backoff 0.5 s, doubling), then a clear error."""
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
    tis_cap: float = 0.0
    """Truncated importance sampling of the policy-gradient loss for the sampler-vs-trainer mismatch (verl's
    TIS): each token's loss is weighted by min(exp(log p_trainer_old − log p_sampler), tis_cap). 0 = off.
    Needs a backend that returns its log-probs (rollout_backend=vllm); verl uses 2."""
    fused_update: bool = True
    """With ppo_epochs=1 (every objective and support): score and update the student in one forward per
    micro-batch (the old log-probs are the detached new ones; objective=full also runs the teacher once).
    False: separate no-grad scoring passes first (the same update to float tolerance, one more student
    forward; objective=full also re-runs the teacher in the update)."""
    fsdp: bool = False
    """Shard the student's weights, gradients and AdamW state across the processes with FSDP2 (under torchrun
    or accelerate launch, at least 2 processes; prompts_per_step a multiple of their number). The same
    training as data parallel (docs/scaling.md). Not with LoRA, rollout_backend=vllm or eval_every."""

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
        errs += below(self, ("ppo_epochs", "score_chunk_size", "metrics_top_k"), 1)
        if self.teacher_temperature <= 0:
            errs.append(f"teacher_temperature={self.teacher_temperature}: must be > 0; use 1.0")
        if self.clip_eps <= 0 or self.dual_clip <= 1:
            errs.append("clip_eps must be > 0 and dual_clip > 1")
        if self.tis_cap < 0:
            errs.append(f"tis_cap={self.tis_cap}: must be >= 0 (0 = off; verl uses 2)")
        if self.tis_cap > 0 and self.rollout_backend == "hf":
            errs.append(
                f"tis_cap={self.tis_cap} with rollout_backend=hf: HF generate samples from the trained model "
                "itself, so there is no sampler mismatch to correct; set tis_cap=0 or rollout_backend=vllm"
            )
        if self.tis_cap > 0 and self.objective == "full":
            errs.append(
                f"tis_cap={self.tis_cap} with objective=full: the exact KL has no policy-gradient loss to "
                "weight; set tis_cap=0 or use objective=topk / sampled"
            )
        if self.objective == "full" and self.teacher_prompts:
            errs.append(
                "objective=full with teacher_prompt_template / teacher_system_prompt: the full-vocabulary pair "
                "streams both models over one sequence, so the teacher cannot read its own prompt; use "
                "objective=topk or sampled, or drop the teacher prompt keys"
            )
        served = self.teacher.lower().startswith(("http://", "https://"))
        if served and self.objective == "full":
            errs.append(
                f"objective=full with a served teacher ({self.teacher}): the exact KL needs the teacher's full "
                "logits in the student's backward pass, which the server does not send; use objective=topk "
                "or sampled, or a local teacher"
            )
        if self.teacher_timeout <= 0 or self.teacher_retries < 0:
            errs.append(
                f"teacher_timeout={self.teacher_timeout}, teacher_retries={self.teacher_retries}: the timeout "
                "must be > 0 seconds and the retries >= 0"
            )
        errs.extend(_fsdp_errors(self))
        raise_errors(errs)

    def check_runnable(self) -> None:
        """Rules that only matter when actually training (not when printing help or defaults)."""
        require_keys(
            self,
            ("student", "teacher", "prompts"),
            "student=lab:student teacher=lab:teacher-a-plus prompts=lab:train",
        )


# --------------------------------------------------------------------------- helpers


def _fsdp_errors(cfg: OPDConfig) -> list[str]:
    """What ``fsdp=true`` cannot be combined with (opd.fsdp's module docstring says why)."""
    if not cfg.fsdp:
        return []
    refused = {
        f"lora_r={cfg.lora_r}": (
            cfg.lora_r > 0,
            "LoRA keeps the base frozen (it fits unsharded); set lora_r=0",
        ),
        "rollout_backend=vllm": (
            cfg.rollout_backend == "vllm",
            "the engine would need the full weights every step; use rollout_backend=hf",
        ),
        f"eval_every={cfg.eval_every}": (
            cfg.eval_every > 0,
            "evaluation runs on rank 0 only, and the sharded student needs every process; set eval_every=0 "
            "and evaluate final/ with opd eval",
        ),
    }
    return [f"fsdp=true with {key}: {why}" for key, (bad, why) in refused.items() if bad]


OBJECTIVES = ("sampled", "topk", "full")
"""Values of ``OPDConfig.objective``."""


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


PARTS: tuple[type, ...] = (
    ModelsConfig,
    DataConfig,
    TeacherPromptConfig,
    RolloutConfig,
    OptimConfig,
    RunConfig,
)
"""The shared config parts, each with a ``_check() -> list[str]`` of its own rules."""


def part_errors(cfg: Any) -> list[str]:
    """The rule violations of every shared part ``cfg`` inherits (a method's ``__post_init__`` adds its
    own rules and raises one ConfigError listing them all)."""
    errs: list[str] = []
    for part in PARTS:
        if isinstance(cfg, part):
            errs += part._check(cfg)
    return errs


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
