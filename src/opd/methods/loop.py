"""What every method's loop shares: the start of a run on each process (:func:`begin_process`), resuming
from the newest checkpoint (:func:`resume_checkpoint`), the per-process sampling seeds
(:func:`seed_processes`), rank 0's claim on the run directory (:func:`claim_run_dir`), and the end of each
training step and of the run (:class:`StepEnd`; :meth:`StepEnd.open` does the middle three first)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opd.alerts import AlertMonitor
from opd.checkpoint import load_newest_checkpoint, save_checkpoint
from opd.config import tracking_backends
from opd.config_io import to_dict
from opd.cost import CostMeter
from opd.data import PromptSet
from opd.methods.common import (
    budget_spent,
    evaluate_during_training,
    finish_completed,
    finish_interrupted,
    seed_everything,
    write_config,
)
from opd.rundir import RunDir, RunInterrupted, StopSignals
from opd.runtime import Runtime
from opd.sampler import PromptSampler
from opd.tracking import MetricsLogger, NullMetricsLogger, progress

__all__ = ["Resumed", "StepEnd", "begin_process", "claim_run_dir", "resume_checkpoint", "seed_processes"]

log = logging.getLogger("opd")


def begin_process(cfg: Any, runtime: Runtime) -> Path:
    """The first lines of a method's run on every process: torch's thread count (``threads``, when set),
    the global seed (the same on every process, so any random initialisation, LoRA's included, agrees)
    and rank 0's log line on the runtime. Returns ``output_dir``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    if runtime.is_main:
        log.info("%s", runtime.describe())
    return Path(cfg.output_dir)


@dataclass
class Resumed:
    """Where a run starts: after ``start_step`` (0 for a fresh run) with ``skipped_steps`` skipped so far;
    ``state`` is the checkpoint's state (None for a fresh run)."""

    start_step: int = 0
    skipped_steps: int = 0
    state: dict[str, Any] | None = None


def resume_checkpoint(
    cfg: Any,
    out_dir: Path,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cost: CostMeter,
    *,
    sampler: PromptSampler | None = None,
    monitor: AlertMonitor | None = None,
    loaders: Any = None,
) -> Resumed:
    """With ``resume=true``, load the newest complete checkpoint of ``out_dir`` into the student, the
    optimizer and the scheduler (and the RNG states it saved), and restore the cost meter, the sampler and
    the alert monitor when given; without one, warn and start from scratch. ``loaders``: how a sharded
    student takes the full state (``opd.fsdp.loaders``)."""
    if not cfg.resume:
        return Resumed()
    found = load_newest_checkpoint(
        out_dir, model=student, optimizer=optimizer, scheduler=scheduler, loaders=loaders
    )
    if found is None:
        log.warning("resume=true but no complete checkpoint in %s: starting from scratch", out_dir)
        return Resumed()
    ckpt, state = found
    if sampler is not None:
        sampler.load_state_dict(state["sampler"])
    if monitor is not None and "alerts" in state:
        monitor.load_state_dict(state["alerts"])
    if state.get("cost"):
        cost.load_state_dict(state["cost"])
    log.info("resumed from %s (step %d)", ckpt, state["step"])
    return Resumed(state["step"], state.get("skipped_steps", 0), state)


def open_metrics_log(cfg: Any, runtime: Runtime, out_dir: Path) -> MetricsLogger | NullMetricsLogger:
    """Rank 0's metrics log (``metrics.jsonl`` plus the trackers of ``report_to``); a null logger elsewhere."""
    if not runtime.is_main:
        return NullMetricsLogger()
    return MetricsLogger(
        out_dir / "metrics.jsonl", backends=tracking_backends(cfg.report_to), config=to_dict(cfg)
    )


def seed_processes(cfg: Any, runtime: Runtime, start_step: int) -> None:
    """With several processes, give each its own sampling stream (after any restored RNG state), a
    function of the seed, the start step and the rank."""
    if runtime.world_size > 1:
        seed_everything(cfg.seed + 7919 * start_step + runtime.rank)


def claim_run_dir(run: RunDir | None, out_dir: Path, cfg: Any, metrics_log: Any, start_step: int) -> None:
    """Rank 0 (``run`` set): with ``overwrite=true`` clear the previous run (only now that models and data
    have loaded), drop the metrics rows after ``start_step`` and write ``config.json``."""
    if run is None:
        return
    run.clear_previous_run()
    metrics_log.truncate_after(start_step)
    write_config(out_dir, cfg)


@dataclass
class StepEnd:
    """The end of each step and of the run, the same for every method's loop.

    After a method's step has produced its (already process-reduced) metrics row, :meth:`end_of_step`:
    evaluates on ``eval_set`` every ``eval_every`` steps and at the last step (also the step that spends
    the budget, so an equal-budget curve ends at the final model), updates the alerts (``monitor``),
    logs the row (rank 0's ``metrics_log`` writes; the others hold a null logger), checkpoints every
    ``save_every`` steps (rank 0 writes with ``save``, the others wait for it), and decides whether to
    stop: a signal on any process (then with a checkpoint), ``stop_on_alert``, or the budget.
    :meth:`finish` closes the loop: ``summary.json`` and ``final/`` from rank 0 (or the interrupt's
    summary), the other processes waiting until it is written.
    """

    cfg: Any
    runtime: Runtime
    name: str
    """The method's name: the prefix of the messages (``[opd] ...``)."""
    out_dir: Path
    student: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    eval_set: PromptSet | None
    metrics_log: Any
    cost: CostMeter
    stop: StopSignals
    sampler: PromptSampler
    """The loop's sampler (its state goes into every checkpoint)."""
    resumed: Resumed
    """Where the loop starts (:func:`resume_checkpoint`)."""
    postfix: Callable[[dict[str, Any]], dict[str, str]]
    """The progress bar's postfix of a row."""
    monitor: AlertMonitor | None = None
    skipped_steps: int = field(init=False)
    """Steps skipped so far (a non-finite gradient norm); :meth:`count_skipped` adds a step's."""
    start_step: int = field(init=False)
    """The step the loop starts after (0, or the resumed checkpoint's)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: dict[str, Any] | None = None
    stopped_by_alert: int | None = None
    stopped_by_budget: int | None = None
    last_step: int = 0
    run_t0: float = field(default_factory=time.perf_counter)
    sharded: bool = False
    """The student is sharded (``opd.fsdp``): every process gathers the full state for a checkpoint and
    ``final/``, rank 0 writes it."""
    bar: Any = field(init=False)
    """The loop's progress bar (rank 0 shows it)."""

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.start_step, self.skipped_steps = self.resumed.start_step, self.resumed.skipped_steps
        self.bar = progress(
            total=cfg.steps,
            initial=self.start_step,
            desc=self.name,
            enabled=cfg.progress and self.runtime.is_main,
            unit="step",
        )

    @classmethod
    def open(
        cls,
        name: str,
        cfg: Any,
        runtime: Runtime,
        run: RunDir | None,
        stop: StopSignals,
        out_dir: Path,
        student: torch.nn.Module,
        tokenizer: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        eval_set: PromptSet | None,
        metrics_log: Any,
        cost: CostMeter,
        sampler: PromptSampler,
        *,
        postfix: Callable[[dict[str, Any]], dict[str, str]],
        monitor: AlertMonitor | None = None,
        reseed: bool = True,
        sharded: bool = False,
    ) -> StepEnd:
        """A loop's start, the same for every method that has its sampler before the run directory is
        claimed: :func:`resume_checkpoint`, :func:`seed_processes` (``reseed``: the method samples), then
        :func:`claim_run_dir`; returns the loop's :class:`StepEnd`. ``sharded``: the student is sharded
        (``opd.fsdp``): it loads and saves the full state on every process."""
        loaders = None
        if sharded:
            from opd.fsdp import loaders as fsdp_loaders

            loaders = fsdp_loaders(student, optimizer)
        resumed = resume_checkpoint(
            cfg,
            out_dir,
            student,
            optimizer,
            scheduler,
            cost,
            sampler=sampler,
            monitor=monitor,
            loaders=loaders,
        )
        if reseed:
            seed_processes(cfg, runtime, resumed.start_step)
        claim_run_dir(run, out_dir, cfg, metrics_log, resumed.start_step)
        return cls(
            cfg,
            runtime,
            name,
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
            postfix,
            monitor,
            sharded=sharded,
        )

    def count_skipped(self, skipped: int) -> int:
        """Add a step's skipped count (0 or 1); returns the run's total (the row's ``skipped_steps``)."""
        self.skipped_steps += int(skipped)
        return self.skipped_steps

    def start(self) -> None:
        """Start the loop: step 0 of the accuracy curve (a fresh run with an evaluation set; rank 0),
        then arm the stop signals (from here a first SIGINT/SIGTERM stops at the step boundary with a
        checkpoint)."""
        if self.eval_set is not None and self.start_step == 0 and self.runtime.is_main:
            self.metrics_log.log({"step": 0, **self._evaluate()})
        self.run_t0 = time.perf_counter()  # the loop's time starts after it
        self.stop.arm()

    def checkpoint(self, step: int) -> Path:
        """Rank 0 writes the checkpoint of ``step``; the others wait until it is complete."""
        model, optimizer_state = self.student, None
        if self.sharded:  # every process takes part in gathering the full state to rank 0
            model, optimizer_state = self._gathered(with_optimizer=True)
        if not self.runtime.is_main:
            self.runtime.barrier()
            return self.out_dir / "checkpoints"
        path = save_checkpoint(
            self.out_dir,
            step,
            model=model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            optimizer_state=optimizer_state,
            scheduler=self.scheduler,
            keep=self.cfg.keep_checkpoints,
            state={
                "sampler": self.sampler.state_dict(),
                "skipped_steps": self.skipped_steps,
                "alerts": self.monitor.state_dict() if self.monitor is not None else None,
                "cost": self.cost.state_dict(),
            },
        )
        self.runtime.barrier()
        return path

    def end_of_step(self, step: int, row: dict[str, Any]) -> bool:
        """Evaluate, alert, log and checkpoint after ``step``; True when the loop must stop."""
        cfg, runtime = self.cfg, self.runtime
        self.last_step = step
        last = step == cfg.steps or budget_spent(cfg, self.cost)
        if self.eval_set is not None and runtime.is_main and (step % cfg.eval_every == 0 or last):
            row.update(self._evaluate())
        if self.monitor is not None:
            for name, msg in self.monitor.update(step, row).items():
                row[name] = msg
                self.bar.write(f"[{self.name}] ALERT step {step}: {msg}")
        self.metrics_log.log(row)
        self.history.append(row)
        self.bar.set_postfix(**self.postfix(row))
        self.bar.update(1)
        saved = None
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            saved = self.checkpoint(step)
        if runtime.any(self.stop.requested is not None) and step < cfg.steps:
            signal_name = self.stop.requested or "SIGTERM"  # another process got it
            self.interrupted = {"signal": signal_name, "checkpoint": str(saved or self.checkpoint(step))}
            self.bar.write(
                f"[{self.name}] {signal_name}: stopped after step {step}, "
                f"checkpoint {self.interrupted['checkpoint']}"
            )
            return True
        if self.monitor is not None and self.monitor.should_stop:
            self.stopped_by_alert = step
            self.bar.write(f"[{self.name}] stop_on_alert: stopping after step {step}")
            return True
        if budget_spent(cfg, self.cost):
            self.stopped_by_budget = step
            self.bar.write(
                f"[{self.name}] budget of {cfg.budget:g} {cfg.budget_unit} spent: stopping after step {step}"
            )
            return True
        return False

    def finish(self, *, lora: Any = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Close the bar and the log; rank 0 writes ``summary.json`` and ``final/`` (or, after a signal,
        the interrupt's summary and raises :class:`RunInterrupted` on every process)."""
        self.bar.close()
        self.metrics_log.close()
        loop_time = time.perf_counter() - self.run_t0
        steps_done = self.history[-1]["step"] if self.history else self.start_step
        model = self.student
        if self.sharded and self.interrupted is None:
            model, _ = self._gathered(with_optimizer=False)
        if not self.runtime.is_main:  # rank 0 writes the summary and the final model
            self.runtime.barrier()
            if self.interrupted is not None:
                raise RunInterrupted(self.interrupted["signal"], {})
            return {"rank": self.runtime.rank, "steps_done": steps_done}
        if self.interrupted is not None:
            self.runtime.barrier()
            finish_interrupted(
                self.out_dir,
                self.interrupted["signal"],
                self.interrupted["checkpoint"],
                steps_done=self.last_step,
                skipped_steps=self.skipped_steps,
                loop_time=loop_time,
                history=self.history,
            )
        summary = finish_completed(
            self.out_dir,
            model,
            self.tokenizer,
            steps_done=steps_done,
            skipped_steps=self.skipped_steps,
            loop_time=loop_time,
            run_t0=self.run_t0,
            stopped_by_alert=self.stopped_by_alert,
            history=self.history,
            cost=self.cost,
            stopped_by_budget=self.stopped_by_budget,
            lora=lora,
            extra=extra,
        )
        self.runtime.barrier()
        return summary

    def _gathered(self, *, with_optimizer: bool) -> tuple[Any, dict | None]:
        """A sharded student's full model (an unsharded CPU copy, rank 0; None elsewhere) and optimiser
        state (rank 0; empty elsewhere). Every process must call it."""
        from opd.fsdp import full_state, unsharded_copy

        sd, optimizer_state = full_state(self.student, self.optimizer if with_optimizer else None)
        return (unsharded_copy(self.student, sd) if self.runtime.is_main else None), optimizer_state

    def _evaluate(self) -> dict[str, float]:
        return evaluate_during_training(self.student, self.tokenizer, self.eval_set, self.cfg)
