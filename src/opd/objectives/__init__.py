"""On-policy distillation objectives as pure tensor functions (no models, no I/O).

Notation (docs/paper.md §1): at every student-visited prefix the student gives ``p_t(v)`` and the teacher
``q_t(v)`` over the shared vocabulary. OPD minimises ``Σ_t KL(p_t ‖ q_t)`` on the student's own samples,
through one of three granularities:

1. sampled-token: ``r_t = log q_t(ŷ_t) − log p_t(ŷ_t)`` for the sampled token (:func:`sampled_token_rewards`,
   in ``sampled_token.py``);
2. top-K: a support ``S_t`` (:func:`build_support`), weights ``w_t`` (:func:`support_weights`) and a
   reward per support token ``r_t(v) = w_t(v)·(log q_t(v) − log p_t(v))`` (:func:`topk_rewards`),
   turned into advantages by :func:`topk_advantages` (the composition the training loop uses; all in
   ``topk.py``);
3. full vocabulary: an exact divergence per position (:func:`full_vocab_divergence`, in ``full_vocab.py``).

The k1 rewards of 1. and the advantages of 2. drive a PPO-clipped policy-gradient loss
(:func:`policy_gradient_loss`); per-token values become one scalar through :func:`aggregate` (both in
``policy_loss.py``). ``checks.py`` holds the accepted names (``SUPPORTS``, ``WEIGHTINGS``, ...) and the
input checks every function runs at entry. This package is the public face: callers write
``from opd import objectives as obj`` and ``obj.topk_advantages(...)``. Which
per-state divergence each objective's expected update is the exact gradient of is written in
docs/objectives.md (and checked by tests/test_exact_gradients.py).

Axis suffixes: ``_B`` sequences, ``_T`` positions, ``_K`` top-K ids of one model, ``_S`` support
entries, ``_V`` vocabulary. Every ``[b, t]`` entry is about the distribution that predicts token ``t``
(the logits/tokens shift is done once, in scoring). Log-probs are full-vocabulary log-probs, computed
and returned in float32. Masks are 0/1 (bool, int or float); any non-zero entry counts as kept.

Deliberately left out: models and scoring (see :mod:`opd.scoring`), baselines / GAE / discounting /
entropy bonus / KL-to-reference terms (OPD uses none of them), chunking over positions (callers chunk),
and cross-process reduction (``aggregate`` normalises by the local token count only).
"""

from opd.objectives.checks import AGGREGATIONS, DIVERGENCES, ESTIMATORS, SUPPORTS, WEIGHTINGS
from opd.objectives.full_vocab import full_vocab_divergence, reverse_kl_from_logp
from opd.objectives.policy_loss import (
    aggregate,
    aggregation_weights,
    group_advantages,
    loss_denominator,
    micro_batch_weight,
    policy_gradient_loss,
)
from opd.objectives.sampled_token import sampled_token_rewards
from opd.objectives.sampler_correction import sampler_mismatch, truncated_is_weights
from opd.objectives.topk import (
    TopKAdvantages,
    build_support,
    renormalized_advantages,
    support_weights,
    topk_advantages,
    topk_rewards,
)

__all__ = [
    "AGGREGATIONS",
    "TopKAdvantages",
    "DIVERGENCES",
    "ESTIMATORS",
    "SUPPORTS",
    "WEIGHTINGS",
    "aggregate",
    "aggregation_weights",
    "sampler_mismatch",
    "truncated_is_weights",
    "build_support",
    "full_vocab_divergence",
    "reverse_kl_from_logp",
    "group_advantages",
    "loss_denominator",
    "micro_batch_weight",
    "policy_gradient_loss",
    "sampled_token_rewards",
    "renormalized_advantages",
    "support_weights",
    "topk_advantages",
    "topk_rewards",
]
