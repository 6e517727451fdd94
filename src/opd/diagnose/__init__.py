"""Pre-flight diagnosis: will on-policy distillation of this student toward this teacher work?

``diagnose(DiagnoseConfig(student=..., teacher=..., prompts=...))`` (CLI: ``opd diagnose``) measures, on
a small prompt sample and before any training, the two conditions under which OPD works (docs/paper.md §2)
and the token-level signature that predicts success (§3), and returns a verdict with its evidence:

1. **Tokenizer / chat template / EOS.** ``opd.models.check_compatibility`` (a different vocabulary is
   fatal: the teacher must score the student's token ids). One conversation (the first prompt and a
   student response) is rendered with both chat templates and tokenised with both tokenizers; the token
   diff and both stop-token sets are reported, and on the rollouts the reward at the student's stop
   token, ``log q(stop) − log p(stop)``, shows whether the teacher accepts the student's end of turn.
2. **Student rollouts.** ``rollouts_per_prompt`` samples per prompt from the student at ``temperature``; both
   models score them once (student: top-k ids, log-probs, entropy; teacher: log-probs at the student's
   top-k ids, its own top-k, entropy) — exactly what step 0 of ``opd train`` computes.
3. **Condition (i), compatible thinking patterns** (``opd.metrics``): overlap ratio ``E|I_t|/k``
   (Eq. 6), overlap masses ``E Σ_{v∈I_t} p_t(v)`` and ``… q_t(v)``, the Eq. 7 advantage (≤ 0, → 0 when
   compatible) and the per-state entropy gap ``E|H(q_t) − H(p_t)|``, overall and by response position.
4. **Condition (ii), new capability** (needs answers in the prompt data): greedy accuracy of both
   models on the prompts (``eval_temperature = 0``: deterministic, one decode per prompt; a sampled
   avg@``eval_samples`` otherwise), and the **teacher continuation advantage** (docs/paper.md §5): the first
   rollout of each prompt is cut after a fraction f of its response tokens (``prefix_fractions``); the
   teacher and the student each complete the same prefix (same decoding as the accuracy check), and the
   advantage is ``acc(teacher completions) − acc(student completions)``. It asks whether the teacher can
   do better than the student *from the student's own states*, which is where OPD supervises. Also the
   size and spread of the per-token reward ``r_t = log q_t(ŷ_t) − log p_t(ŷ_t)`` (sampled token) and
   of the top-K reward ``Σ_{v∈TopK(p_t)} p̄_t(v)(log q_t(v) − log p_t(v))`` (student support,
   ``student_p`` weights, K = ``metrics_top_k``: what ``opd train`` with ``top_k=K`` optimises).
5. **Context:** the AUROC of the sequence-mean reward against the correctness of the student's
   rollouts (docs/paper.md §5 finds ≈ 0.73–0.75 for working and failing teachers alike, so it is reported,
   never used for the verdict).

Verdict (:func:`decide`, a pure function of the measured :class:`Evidence` and the
:class:`DiagnoseThresholds`; names and paths of the models are never looked at):

- ``no-go`` — the tokenizers are incompatible; or the reward is ~0 (the teacher's distribution equals
  the student's on its own rollouts); or, with answers, the teacher adds nothing the student can learn:
  neither an accuracy gap nor a continuation advantage, or an accuracy gap that vanishes from the
  student's own prefixes although the two models agree token by token (condition (i) holds) — the
  same-pipeline case of docs/paper.md §2, flagged ``little-new-capability``;
- ``go-after-remedy`` — the teacher has something to teach but condition (i) or the template check
  fails; the remedy is named: ``teacher-aligned template`` (chat templates render differently, or the
  teacher rejects the student's stop token), ``teacher-aligned prompts`` (the teacher is less certain
  than the student already at the first response token, i.e. the prompts are off its distribution),
  otherwise ``off-policy cold start`` (the teacher is confident but disagrees: a different thinking
  pattern; SFT on teacher responses first, docs/paper.md §4);
- ``go`` — everything else (without answers condition (ii) is unmeasured, and the reasons say so);
- ``inconclusive`` — a no-go other than the tokenizer one, measured on truncated evidence: more than
  ``truncated_frac_max`` of the rollouts or accuracy responses hit ``max_new_tokens``, so answers were
  cut off before grading and the reward seen only on the first tokens; remedy ``larger
  max_new_tokens``. Every other verdict on truncated evidence carries the ``truncated-evidence`` flag
  and a reason saying so.

Outputs in ``output_dir``: ``diagnosis.json`` (top-level ``verdict``, ``reasons``, ``remedies``,
``flags``, ``checks`` and every measured figure), ``diagnosis.md`` and a self-contained
``diagnosis.html`` with plots. Cost (docs/diagnose.md): 2 scoring passes over ``N·R`` rollouts, and at
most ``N·M·(R + 2E·(1 + F))`` generated tokens for N prompts, R rollouts, M = max_new_tokens,
E = eval samples, F = number of prefix fractions; ``diagnosis.json["cost"]`` records the actual counts.

Deliberately left out: any training step (the diagnosis is step 0 only; the per-step alerts of
``opd.alerts`` watch a real run), multi-GPU sharding, vLLM sampling, and comparing several teachers in
one call (run it once per teacher; the JSON files are comparable).

Modules: :mod:`~opd.diagnose.config` (``DiagnoseConfig``), :mod:`~opd.diagnose.measure` (the
measurements, on ``opd.rollout``, ``opd.scoring``, ``opd.objectives``, ``opd.metrics`` and
``opd.evaluate``), :mod:`~opd.diagnose.verdict` (the pure rules), :mod:`~opd.diagnose.report` (markdown
and HTML) and :mod:`~opd.diagnose.run` (``diagnose``, top to bottom).
"""

from opd.diagnose.config import DiagnoseConfig
from opd.diagnose.measure import auroc, template_check, token_rewards
from opd.diagnose.report import render_markdown, write_html
from opd.diagnose.run import diagnose
from opd.diagnose.verdict import (
    FLAG_INCOMPATIBLE_PATTERN,
    FLAG_LITTLE_NEW,
    FLAG_NO_SIGNAL,
    FLAG_TEMPLATE,
    FLAG_TOKENIZER,
    FLAG_TRUNCATED,
    FLAG_UNMEASURED,
    REMEDY_COLD_START,
    REMEDY_LONGER,
    REMEDY_PROMPTS,
    REMEDY_TEMPLATE,
    VERDICTS,
    Check,
    DiagnoseThresholds,
    Evidence,
    Verdict,
    decide,
)

__all__ = [
    "FLAG_INCOMPATIBLE_PATTERN",
    "FLAG_LITTLE_NEW",
    "FLAG_NO_SIGNAL",
    "FLAG_TEMPLATE",
    "FLAG_TOKENIZER",
    "FLAG_TRUNCATED",
    "FLAG_UNMEASURED",
    "REMEDY_COLD_START",
    "REMEDY_LONGER",
    "REMEDY_PROMPTS",
    "REMEDY_TEMPLATE",
    "VERDICTS",
    "Check",
    "DiagnoseConfig",
    "DiagnoseThresholds",
    "Evidence",
    "Verdict",
    "auroc",
    "decide",
    "diagnose",
    "render_markdown",
    "template_check",
    "token_rewards",
    "write_html",
]
