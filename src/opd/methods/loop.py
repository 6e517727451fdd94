"""The end of each training step and of the run, the same for every method's loop (:class:`StepEnd`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opd.alerts import AlertMonitor
from opd.checkpoint import save_checkpoint
from opd.cost import CostMeter
from opd.data import PromptSet
from opd.methods.common import budget_spent, evaluate_during_training, finish_completed, finish_interrupted
from opd.rundir import RunInterrupted, StopSignals
from opd.runtime import Runtime
from opd.tracking import progress

__all__ = ["StepEnd"]


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
    start_step: int
    """The step the loop starts after (0, or the resumed checkpoint's)."""
    checkpoint_state: Callable[[], dict[str, Any]]
    """The method's own state for a checkpoint (sampler, skipped steps, ...); the cost meter's and the
    alert monitor's are added here."""
    postfix: Callable[[dict[str, Any]], dict[str, str]]
    """The progress bar's postfix of a row."""
    monitor: AlertMonitor | None = None
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
        self.bar = progress(
            total=cfg.steps,
            initial=self.start_step,
            desc=self.name,
            enabled=cfg.progress and self.runtime.is_main,
            unit="step",
        )

    def log_start(self) -> None:
        """Step 0 of the accuracy curve (a fresh run with an evaluation set; rank 0)."""
        if self.eval_set is not None and self.start_step == 0 and self.runtime.is_main:
            self.metrics_log.log({"step": 0, **self._evaluate()})
        self.run_t0 = time.perf_counter()  # the loop's time starts after it

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
                **self.checkpoint_state(),
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

    def finish(
        self, *, skipped_steps: int, lora: Any = None, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
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
                skipped_steps=skipped_steps,
                loop_time=loop_time,
                history=self.history,
            )
        summary = finish_completed(
            self.out_dir,
            model,
            self.tokenizer,
            steps_done=steps_done,
            skipped_steps=skipped_steps,
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
