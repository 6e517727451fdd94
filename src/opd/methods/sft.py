"""Supervised fine-tuning of the student on teacher rollouts (``opd sft``), one readable file.

The off-policy baseline and the recipe's cold start (docs/paper.md §4): the teacher answers the
prompts, bad answers are rejected, and the student is trained by maximum likelihood on the rest.

Stage 1, :func:`generate_teacher_data`: ``teacher_samples_per_prompt`` teacher responses per prompt of
the pool (``num_prompts`` of them, a seeded random subset; 0 = all) at ``teacher_temperature`` /
``teacher_top_p`` (the study: 0.7 / 0.95), through the rollout backend (``opd.rollout.make_backend``).
Responses that are truncated, have no final ``\\boxed{}`` answer, are repetitive, or (``only_correct``)
are wrong are rejected and counted by reason (the rules: :mod:`opd.teacher_data`). The accepted ones go to
``output_dir/teacher_data.jsonl`` (settings and counts in ``teacher_data.jsonl.stats.json``), written
atomically; a resumed run reads them back instead of generating again. ``sft_data=FILE`` skips stage 1
and trains on an existing file (then no teacher and no prompts are used).

Stage 2, :func:`sft_step` per optimiser step: ``batch_size`` sequences (epoch-wise shuffled, resumable),
loss = the mean negative log-likelihood of the response tokens,

    L = − (1 / Σ_b |y_b|) Σ_b Σ_{t ∈ y_b} log p_θ(y_b,t | x_b, y_b,<t),

prompt tokens (and padding) masked out; the stop token is a response token, so the student learns to
stop. Micro-batches of ``micro_batch_size`` accumulate gradients; fp32 master weights with
``student_dtype`` autocast (:mod:`opd.precision`), the float32 head and log-softmax of
:class:`opd.scoring.PolicyScorer`; AdamW, cosine schedule with warmup by default, gradient clipping, a
step with a non-finite gradient norm is skipped.

Several processes (``torchrun`` / ``accelerate launch``, :mod:`opd.runtime`): stage 1's generate calls are
dealt out to the processes (call k to process k mod N, each keeping its seed) and the accepted
responses gathered back in order; rank 0 writes the file. In stage 2 every process draws the same
global batch and trains on its contiguous share, the loss divided by the global batch's token count and
the gradients summed across processes once per step, so N processes make the update of one.

What this file deliberately leaves out: teachers with another tokenizer (the response text would have to
be re-tokenised with the student's; here teacher and student must share one, as for OPD), sequence
packing, multi-turn data, and deduplication of the prompt pool against evaluation sets.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from opd.config import DataConfig, ModelsConfig, OptimConfig, RunConfig, part_errors
from opd.config_io import _coerce_types, below, raise_errors, require_keys
from opd.cost import CostMeter, count_parameters, peak_memory_mb
from opd.data import PromptSet
from opd.errors import ConfigError
from opd.methods.common import (
    clip_and_step,
    load_models,
    load_prompt_sets,
    make_optimizer,
    make_scheduler,
    run_processes,
    write_config,
)
from opd.methods.loop import StepEnd, begin_process, open_metrics_log, resume_checkpoint
from opd.rollout import BACKENDS as ROLLOUT_BACKENDS
from opd.rollout import RolloutBatch, make_backend
from opd.runtime import Runtime
from opd.sampler import PromptSampler
from opd.scoring import PolicyScorer
from opd.teacher_data import (
    REJECTION_REASONS,
    ForcedSequence,
    collate,
    read_sequences,
    rejection_reason,
    stats_path,
    write_sequences,
)
from opd.tracking import progress

log = logging.getLogger("opd")

TEACHER_DATA = "teacher_data.jsonl"
"""The accepted teacher responses, in ``output_dir``."""


@dataclass
class SFTConfig(RunConfig, OptimConfig, DataConfig, ModelsConfig):
    """SFT of the student on rejection-sampled teacher responses (or on an existing ``sft_data`` file).

    The shared parts (models, data, optimiser, run) are inherited; the defaults below follow the study's
    cold start (lr 1e-5, cosine, warmup 5% of the default 100 steps, T = 0.7, top-p 0.95). The alert
    keys of the run part are OPD's (its failure signatures) and are not checked here.
    """

    # --- shared keys with SFT's own defaults ---
    output_dir: str = "runs/sft"
    """Where teacher_data.jsonl, metrics.jsonl, checkpoints and the final model go."""
    steps: int = 100
    """Number of optimizer steps, each on ``batch_size`` teacher sequences (epochs: steps x batch_size / sequences)."""
    lr: float = 1e-5
    """AdamW learning rate (the study's cold start: 1e-5; tiny models need far more)."""
    lr_schedule: str = "cosine"
    """constant or cosine (both with linear warmup); the study: cosine."""
    warmup_steps: int = 5
    """Linear warmup steps (the study: 5% of the steps)."""

    # --- stage 1: teacher data ---
    sft_data: str = ""
    """Train on this existing teacher_data.jsonl (of an earlier opd sft run) instead of generating; then leave teacher and prompts empty."""
    num_prompts: int = 0
    """Generate on this many prompts of ``prompts``, a seeded random subset (0 = all); their rows are in teacher_data.jsonl."""
    teacher_samples_per_prompt: int = 1
    """Teacher responses sampled per prompt (the study: 1)."""
    teacher_temperature: float = 0.7
    """Teacher sampling temperature (the study: 0.7; 0 = greedy, one sample per prompt)."""
    teacher_top_p: float = 0.95
    """Teacher nucleus sampling threshold (the study: 0.95; 1.0 = off)."""
    max_new_tokens: int = 256
    """Maximum teacher response length in tokens (longer ones are rejected as truncated); also the evaluation length."""
    generation_batch_size: int = 64
    """Sequences (prompt x sample rows) per teacher generate call."""
    rollout_backend: str = "hf"
    """Sampling backend for the teacher (``opd.rollout.make_backend``): hf."""
    repetition_ngram: int = 10
    """n of the repetition rule: a response is repetitive when more than ``max_repetition`` of its n-grams of tokens are repeats."""
    max_repetition: float = 0.5
    """Largest accepted share of repeated n-grams, 1 − distinct/total (1.0 = rule off)."""
    only_correct: bool = False
    """Keep only responses graded correct (prompts without an answer are kept if they pass the other rules)."""

    # --- stage 2: supervised fine-tuning ---
    batch_size: int = 16
    """Teacher sequences per optimizer step (gradients accumulated over micro_batch_size chunks)."""
    score_chunk_size: int = 256
    """Positions per chunk of the float32 head + log-softmax (peak memory O(chunk * vocab))."""

    def __post_init__(self) -> None:
        _coerce_types(self)
        errs = part_errors(self)
        if self.stop_on_alert:
            errs.append(
                "stop_on_alert=true: the alerts watch OPD's failure signatures (overlap, entropy gap), which "
                "SFT does not measure; leave stop_on_alert=false"
            )
        errs += below(self, ("num_prompts",), 0, " (0 = all)")
        errs += below(
            self,
            (
                "teacher_samples_per_prompt",
                "max_new_tokens",
                "generation_batch_size",
                "repetition_ngram",
                "batch_size",
                "score_chunk_size",
            ),
            1,
        )
        if self.teacher_temperature < 0:
            errs.append(f"teacher_temperature={self.teacher_temperature}: must be >= 0 (the study: 0.7)")
        if self.teacher_temperature == 0 and self.teacher_samples_per_prompt > 1:
            errs.append(
                f"teacher_temperature=0 with teacher_samples_per_prompt={self.teacher_samples_per_prompt}: "
                "greedy decoding gives identical copies; use teacher_samples_per_prompt=1 or a temperature > 0"
            )
        if not 0 < self.teacher_top_p <= 1:
            errs.append(f"teacher_top_p={self.teacher_top_p}: must be in (0, 1] (the study: 0.95)")
        if not 0 < self.max_repetition <= 1:
            errs.append(f"max_repetition={self.max_repetition}: must be in (0, 1] (1.0 = rule off)")
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            errs.append(
                f"rollout_backend={self.rollout_backend!r}: choose one of {', '.join(ROLLOUT_BACKENDS)}"
            )
        if self.sft_data and (self.teacher or self.prompts):
            given = " and ".join(k for k in ("teacher", "prompts") if getattr(self, k))
            errs.append(
                f"sft_data={self.sft_data!r} with {given} set: a run trains either on an existing file or on "
                f"data it generates; leave {given} empty, or drop sft_data to generate"
            )
        raise_errors(errs)

    def check_runnable(self) -> None:
        """Rules that only matter when actually training (not when printing help or defaults)."""
        need = ("student",) if self.sft_data else ("student", "teacher", "prompts")
        require_keys(
            self,
            need,
            "student=lab:student teacher=lab:teacher-a-plus prompts=lab:train "
            "(or student=... sft_data=RUN/teacher_data.jsonl)",
        )


# --------------------------------------------------------------------------- stage 1: teacher data


def generation_settings(cfg: SFTConfig) -> dict[str, Any]:
    """What defines a teacher-data file (recorded with it; a resumed run checks them)."""
    keys = (
        "teacher",
        "prompts",
        "prompt_field",
        "answer_field",
        "prompt_template",
        "use_chat_template",
        "chat_template_kwargs",
        "max_prompt_tokens",
        "num_prompts",
        "teacher_samples_per_prompt",
        "teacher_temperature",
        "teacher_top_p",
        "max_new_tokens",
        "repetition_ngram",
        "max_repetition",
        "only_correct",
        "seed",
    )
    return {k: getattr(cfg, k) for k in keys}


def select_prompts(prompts: PromptSet, num_prompts: int, seed: int) -> PromptSet:
    """``num_prompts`` prompts of ``prompts`` drawn at random with ``seed`` (kept in source order); all
    of them when ``num_prompts`` is 0 or covers the set."""
    if not num_prompts or num_prompts >= len(prompts):
        return prompts
    keep = sorted(random.Random(f"opd-sft-prompts:{seed}").sample(range(len(prompts)), num_prompts))
    return PromptSet(
        [prompts.examples[i] for i in keep],
        prompts.source,
        prompts.dropped_overlong,
        prompts.prompt_field,
        prompts.answer_field,
    )


def generate_teacher_data(
    teacher: torch.nn.Module,
    tokenizer,
    prompts: PromptSet,
    *,
    samples_per_prompt: int = 1,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    repetition_ngram: int = 10,
    max_repetition: float = 0.5,
    only_correct: bool = False,
    vocab_limit: int | None = None,
    backend: str = "hf",
    cost: CostMeter | None = None,
    show_progress: bool = False,
    runtime: Runtime | None = None,
) -> tuple[list[ForcedSequence], dict[str, int]]:
    """Sample ``samples_per_prompt`` teacher responses per prompt and apply the rejection rules.

    Returns the accepted sequences (prompt-major) and the counts ``generated``, ``accepted`` and
    ``rejected/<reason>`` (:data:`opd.teacher_data.REJECTION_REASONS`). Each generate call holds about
    ``batch_size`` rows; the call starting at prompt ``i`` is seeded with ``seed + i``, so the data does not
    depend on what ran before in the process. ``cost``: adds ``teacher_prefill_tokens`` (every row's
    prompt) and ``teacher_generated_tokens``. ``runtime`` with several processes: call k runs on process
    k mod N and every process gets all the accepted sequences, in order, and the summed counts and cost.
    """
    sampler = make_backend(backend, teacher, tokenizer, batch_size=batch_size, vocab_limit=vocab_limit)
    n = 1 if temperature == 0 else samples_per_prompt
    per_call = max(1, batch_size // n)
    counts = {"generated": 0, "accepted": 0, **{f"rejected/{r}": 0 for r in REJECTION_REASONS}}
    calls: list[tuple[int, list[ForcedSequence]]] = []  # (first prompt, accepted) of this process's calls
    spent = {"teacher_prefill_tokens": 0, "teacher_generated_tokens": 0}
    rank, world = (runtime.rank, runtime.world_size) if runtime is not None else (0, 1)
    bar = progress(total=len(prompts), desc="teacher data", enabled=show_progress, unit="prompt")
    for k, lo in enumerate(range(0, len(prompts), per_call)):
        if k % world != rank:
            continue
        chunk = prompts.examples[lo : lo + per_call]
        accepted: list[ForcedSequence] = []
        calls.append((lo, accepted))
        batch = sampler.generate(
            [e.input_ids for e in chunk],
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            seed=seed + lo,
        )
        spent["teacher_prefill_tokens"] += n * sum(len(e.input_ids) for e in chunk)
        spent["teacher_generated_tokens"] += int(batch.response_lengths_B.sum())
        for row in range(batch.input_ids_B_T.shape[0]):
            ex = chunk[row // n]
            ids = batch.input_ids_B_T[row][batch.response_mask_B_T[row] > 0].tolist()
            text = tokenizer.decode(ids, skip_special_tokens=True)
            reason, correct = rejection_reason(
                text,
                ids,
                truncated=bool(batch.truncated_B[row]),
                answer=ex.answer,
                repetition_ngram=repetition_ngram,
                max_repetition=max_repetition,
                only_correct=only_correct,
            )
            counts["generated"] += 1
            if reason is not None:
                counts[f"rejected/{reason}"] += 1
                continue
            counts["accepted"] += 1
            accepted.append(
                ForcedSequence(
                    ex.meta["row"], ex.text, list(ex.input_ids), text, ids, ex.answer, correct, row % n
                )
            )
        bar.update(len(chunk))
    bar.close()
    if world > 1:  # every process: all calls' sequences in prompt order, the summed counts and cost
        parts = runtime.gather_json(
            {"counts": counts, "spent": spent, "calls": [[lo, [asdict(s) for s in acc]] for lo, acc in calls]}
        )
        counts = {key: sum(p["counts"][key] for p in parts) for key in counts}
        spent = {key: sum(p["spent"][key] for p in parts) for key in spent}
        calls = sorted(
            ((lo, [ForcedSequence(**d) for d in seqs]) for p in parts for lo, seqs in p["calls"]),
            key=lambda call: call[0],
        )
    if cost is not None:
        cost.add(**spent)
    return [s for _, acc in calls for s in acc], counts


def _teacher_data(
    cfg: SFTConfig,
    models,
    prompts: PromptSet | None,
    out_dir: Path,
    cost: CostMeter,
    fresh: bool,
    runtime: Runtime | None = None,
):
    """The run's training sequences and their stats: ``sft_data``, the run's own file when it exists (a
    resumed run), else stage 1 now. ``fresh``: no checkpoint was restored, so a reused file's generation
    cost is added to ``cost`` here (a checkpoint's cost already holds it)."""
    vocab = models.compat.vocab_limit
    if cfg.sft_data:
        sequences = read_sequences(cfg.sft_data, vocab)
        stats_file = stats_path(cfg.sft_data)
        stats = _read_json(stats_file) if stats_file.is_file() else {}
        log.info("sft_data: %d sequences from %s", len(sequences), cfg.sft_data)
        return sequences, {"source": cfg.sft_data, "counts": stats.get("counts", {})}
    path = out_dir / TEACHER_DATA
    settings = generation_settings(cfg)
    if path.is_file():
        stats = _read_json(stats_path(path))
        changed = [k for k in settings if stats.get("settings", {}).get(k) != settings[k]]
        if changed:
            raise ConfigError(
                f"{path} was generated with other settings ({', '.join(changed)}): restore them to reuse it, "
                "or start over with overwrite=true"
            )
        sequences = read_sequences(path, vocab)
        if fresh:
            cost.add(**stats.get("cost", {}))
        log.info("teacher data: reusing %d sequences from %s", len(sequences), path)
        return sequences, {"source": str(path), "counts": stats["counts"]}
    assert prompts is not None and models.teacher is not None
    pool = select_prompts(prompts, cfg.num_prompts, cfg.seed)
    before = dict(cost.counts)
    t0 = time.perf_counter()
    sequences, counts = generate_teacher_data(
        models.teacher,
        models.tokenizer,
        pool,
        samples_per_prompt=cfg.teacher_samples_per_prompt,
        temperature=cfg.teacher_temperature,
        top_p=cfg.teacher_top_p,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.generation_batch_size,
        seed=cfg.seed,
        repetition_ngram=cfg.repetition_ngram,
        max_repetition=cfg.max_repetition,
        only_correct=cfg.only_correct,
        vocab_limit=vocab,
        backend=cfg.rollout_backend,
        cost=cost,
        show_progress=cfg.progress and (runtime is None or runtime.is_main),
        runtime=runtime,
    )
    spent = {k: cost.counts[k] - before[k] for k in cost.counts if cost.counts[k] != before[k]}
    log.info(
        "teacher data: %d of %d responses accepted (%s) in %.1f s",
        counts["accepted"],
        counts["generated"],
        ", ".join(f"{k} {v}" for k, v in counts.items() if k.startswith("rejected/") and v)
        or "none rejected",
        time.perf_counter() - t0,
    )
    if not sequences:
        raise ValueError(
            f"teacher data: every one of the {counts['generated']} teacher responses was rejected ({counts}); "
            "raise max_new_tokens, relax max_repetition / only_correct, or check the teacher and prompt template"
        )
    if runtime is None or runtime.is_main:
        write_sequences(path, sequences, {"settings": settings, "counts": counts, "cost": spent})
    return sequences, {"source": str(path), "counts": counts}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- stage 2: one SFT step


def sft_loss(student: PolicyScorer, batch: RolloutBatch, total_tokens: float) -> tuple[torch.Tensor, int]:
    """``(loss, n)``: −Σ log p(response tokens of ``batch``) / ``total_tokens`` and the n tokens summed.
    Only ``response_mask_B_T`` positions carry loss (prompt tokens and padding never do); dividing by
    the whole step's token count makes the micro-batches' losses add up to the step's token mean."""
    out = student(batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T)
    mask = batch.response_mask_B_T
    return -(out.token_logp_B_T * mask).sum() / total_tokens, int(mask.sum())


def sft_step(
    student: PolicyScorer,
    sequences: list[ForcedSequence],
    optimizer: torch.optim.Optimizer,
    *,
    pad_id: int,
    micro_batch_size: int,
    grad_clip: float,
    device: torch.device | str,
    total_tokens: float | None = None,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """One optimiser step of SFT on ``sequences`` (micro-batches, gradient accumulation, clipping; the
    step is skipped when the gradient norm is not finite). Returns ``loss/nll`` (mean NLL per response
    token), ``grad_norm``, ``tokens`` (response tokens) and ``skipped`` (0/1).

    Data parallel: ``sequences`` is this process's share of the step's batch, ``total_tokens`` the whole
    batch's response tokens (the loss's denominator; default: those of ``sequences``) and ``runtime``
    sums the gradients over the processes before clipping; ``loss/nll`` is then this process's share of
    the batch's mean (the shares add up to it) and ``tokens`` the whole batch's."""
    total = float(sum(len(s.response_ids) for s in sequences)) if total_tokens is None else total_tokens
    params = [p for p in student.parameters() if p.requires_grad]
    student.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for lo in range(0, len(sequences), micro_batch_size):
        mb = collate(sequences[lo : lo + micro_batch_size], pad_id).to(device)
        loss, _ = sft_loss(student, mb, total)
        loss.backward()
        loss_sum += float(loss.detach())
    norm, skipped = clip_and_step(params, optimizer, grad_clip, runtime)
    student.eval()
    return {"loss/nll": loss_sum, "grad_norm": norm, "tokens": total, "skipped": skipped}


# --------------------------------------------------------------------------- the training run


def train(cfg: SFTConfig) -> dict[str, Any]:
    """Generate (or read) the teacher data, then fine-tune the student on it. Returns the run summary
    (also written to ``output_dir/summary.json``). Interrupts and ``resume=true`` as in OPD."""
    cfg.check_runnable()
    return run_processes(cfg, _train, per_step=("batch_size", cfg.batch_size))


def _train(cfg: SFTConfig, runtime: Runtime, run, stop) -> dict[str, Any]:
    out_dir = begin_process(cfg, runtime)

    models = load_models(cfg, runtime)  # the student only, with sft_data
    student, tokenizer = models.student, models.tokenizer
    prompts, eval_set = load_prompt_sets(cfg, models)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    student_scorer = PolicyScorer(
        student,
        chunk_size=cfg.score_chunk_size,
        vocab_limit=models.compat.vocab_limit,
        compute_dtype=cfg.student_dtype,
    )
    optimizer = make_optimizer(student, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    cost = CostMeter(count_parameters(student), count_parameters(models.teacher))
    metrics_log = open_metrics_log(cfg, runtime, out_dir)

    resumed = resume_checkpoint(cfg, out_dir, student, optimizer, scheduler, cost)  # the sampler: below
    if run is not None:  # rank 0
        run.clear_previous_run()  # overwrite=true: only now that models and data have loaded
    runtime.barrier()  # no process looks for the teacher data before a cleared directory is cleared
    # before config.json: a run refused here (reused data with other settings) leaves the directory as it was
    sequences, data_info = _teacher_data(
        cfg, models, prompts, out_dir, cost, fresh=resumed.state is None, runtime=runtime
    )
    metrics_log.truncate_after(resumed.start_step)
    if runtime.is_main:
        write_config(out_dir, cfg)
    sampler = PromptSampler(sequences, seed=cfg.seed)
    if resumed.state is not None:
        sampler.load_state_dict(resumed.state["sampler"])

    ends = StepEnd(
        cfg,
        runtime,
        "sft",
        out_dir,
        student,
        tokenizer,
        optimizer,
        scheduler,
        eval_set,
        metrics_log,
        cost,
        stop,
        sampler,
        resumed,
        postfix=lambda row: dict(nll=f"{row['loss/nll']:.4f}"),
    )
    ends.start()  # step 0 of the accuracy curve; from here a signal stops at a step boundary
    for step in range(ends.start_step + 1, cfg.steps + 1):
        t_step = time.perf_counter()
        batch = [sequences[i] for i in sampler.next_batch(cfg.batch_size)]  # the same on every process
        lr = scheduler.get_last_lr()[0]
        out = sft_step(
            student_scorer,
            runtime.shard(batch),  # this process's share
            optimizer,
            pad_id=pad_id,
            micro_batch_size=cfg.micro_batch_size,
            grad_clip=cfg.grad_clip,
            device=runtime.device,
            total_tokens=float(sum(len(s.response_ids) for s in batch)),
            runtime=runtime,
        )
        scheduler.step()
        seq_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch)
        cost.add(student_train_tokens=seq_tokens, student_loss_tokens=out["tokens"])
        step_time = time.perf_counter() - t_step
        row: dict[str, Any] = {
            "step": step,
            "loss/nll": out["loss/nll"],
            "grad_norm": out["grad_norm"],
            "lr": lr,
            "response/length_mean": out["tokens"] / len(batch),
            "skipped_steps": ends.count_skipped(out["skipped"]),
            "epoch": sampler.epoch + sampler.position / sampler.size,
            "time/step": step_time,
            **cost.row(),
            "memory/peak_mb": peak_memory_mb(runtime.device),
        }
        # the loss shares add up; every other entry is the whole batch's already, but memory and time
        row = runtime.reduce_row(row, sums={"loss/nll"}, maxima=set(row) - {"loss/nll"})
        row["throughput/tokens_per_s"] = out["tokens"] / row["time/step"] if row["time/step"] > 0 else 0.0
        if ends.end_of_step(step, row):
            break
    return ends.finish(
        lora=models.lora,
        extra={"teacher_data": {**data_info, "sequences": len(sequences)}},
    )
