"""``opd compare CONFIG.yaml`` — several training methods from one student, on the same prompts, at equal
compute, evaluated side by side in one report.

A comparison config (:class:`CompareConfig`) names the student, the teacher, the prompts, the compute
budget (``budget_unit`` / ``budget``: equal student-trained tokens or equal FLOPs, :mod:`opd.cost`), the
seeds, the benchmarks and evaluation settings, and a list of ``runs`` — each a name, a training method (an
``opd <command>`` from :data:`opd.methods.METHODS`: ``train`` for OPD, ``sft``, ``kd``, ...) and
``overrides`` of that method's config keys. :func:`run_compare` then:

1. **plans**: builds every run's config through its method's config class (the same validation as
   ``opd <command>``), for every seed, before anything trains; a bad key, value or method fails here as
   one line naming the run and the fix;
2. **trains** each run in ``output_dir/<name>/seed-<s>``: a finished run whose saved config equals the
   planned one is collected, not retrained; an interrupted one is resumed (``resume=true``); a finished
   run with other settings is refused unless ``overwrite: true``;
3. **evaluates** (:func:`opd.evaluation.evaluate_model`) the initial student, every teacher the runs use
   and each run's final model on the benchmarks; results are cached in ``output_dir/evaluations/`` and
   reused while the model, benchmarks and settings are unchanged;
4. **reports**: ``compare.json``, ``report.md``, the self-contained ``report.html`` and PNG plots —
   accuracy per benchmark with error bars, gap recovered, params, serving speed, training wall time and
   FLOPs, the exact budget each run spent, and accuracy against training FLOPs from each run's periodic
   evaluation (``metrics.jsonl`` rows with ``eval/accuracy`` and ``cost/flops``).

Gap recovered = (acc − acc_student_initial) / (acc_teacher − acc_student_initial), with the run's own
teacher (a run without a teacher key, e.g. GRPO, is measured against the comparison's ``teacher``).

Error bars: with one seed, the standard error over prompts of avg@k (the evaluator's ``avg@k_stderr``);
with several seeds, the standard error of the mean over seeds.

Deliberately left out: running methods in parallel (each run takes the machine; runs are sequential),
significance tests, and tuning each method's hyperparameters (the config states them; the comparison is
only as fair as those choices).
"""

from opd.compare.config import (
    CompareConfig,
    PlannedRun,
    RunSpec,
    load_compare_config,
    plan_runs,
)
from opd.compare.report import accuracy_curve, write_compare_report
from opd.compare.run import (
    aggregate,
    budget_check,
    gap_recovered,
    run_compare,
    run_state,
    train_or_collect,
)

__all__ = [
    "CompareConfig",
    "PlannedRun",
    "RunSpec",
    "accuracy_curve",
    "aggregate",
    "budget_check",
    "gap_recovered",
    "load_compare_config",
    "plan_runs",
    "run_compare",
    "run_state",
    "train_or_collect",
    "write_compare_report",
]
