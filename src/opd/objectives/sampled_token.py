"""Granularity 1, the sampled token: ``r_t = log q_t(ŷ_t) − log p_t(ŷ_t)`` and its k3 value estimate."""

from __future__ import annotations

import torch

from opd.objectives.checks import (
    ESTIMATORS,
    check_choice,
    check_floating,
    check_mask,
    check_rank,
    check_shape,
)


def sampled_token_rewards(
    student_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token reward (a value estimate of ``−KL(p_t‖q_t)``) for the sampled token ``ŷ_t ~ p_t``.

    With the log-ratio ``ℓ_t = log q_t(ŷ_t) − log p_t(ŷ_t)``:

    - ``"k1"``: ``r_t = ℓ_t``. ``E_{v~p}[log q(v) − log p(v)] = −KL(p‖q)``: unbiased, but each sample
      can have either sign and a high variance. **The only estimator that is a valid advantage**: with
      ``A = ℓ`` (detached), ``E_{v~p}[−A(v) ∇log p(v)] = ∇KL(p‖q)`` exactly.
    - ``"k3"``: ``r_t = −((e^{ℓ_t} − 1) − ℓ_t)``. Since ``E_{v~p}[q(v)/p(v) − 1] = 0`` its expectation is
      also ``−KL(p‖q)``; every sample is ≤ 0 (``e^x − 1 ≥ x``) and the variance is low when p ≈ q.
      A good *value* estimate for logging, but NOT an advantage: ``E_{v~p}[−k3(v) ∇log p(v)]`` is
      ``∇KL(p‖q) − ∇KL(q‖p)`` (the ``q/p`` term contributes ``−Σ_v q(v)∇log p(v) = ∇KL(q‖p)`` with the
      wrong sign), which can point against the reverse-KL gradient. The training loop therefore always
      uses k1 as the advantage and only logs the configured estimator.

    Returns float32 ``rewards_B_T``, 0 where ``mask_B_T == 0``. Autograd flows through both inputs as
    written; ``policy_gradient_loss`` detaches advantages.
    """
    check_rank("student_logp_B_T", student_logp_B_T, "B_T")
    check_rank("teacher_logp_B_T", teacher_logp_B_T, "B_T")
    check_shape("teacher_logp_B_T", teacher_logp_B_T, student_logp_B_T.shape, "student_logp_B_T")
    check_floating("student_logp_B_T", student_logp_B_T)
    check_floating("teacher_logp_B_T", teacher_logp_B_T)
    keep_B_T = check_mask(mask_B_T, student_logp_B_T.shape, "student_logp_B_T")
    check_choice("estimator", estimator, ESTIMATORS)

    # Masked entries are zeroed BEFORE exp, so padding values can never overflow or make NaN gradients.
    log_ratio_B_T = teacher_logp_B_T.float() - student_logp_B_T.float()
    log_ratio_B_T = torch.where(keep_B_T, log_ratio_B_T, torch.zeros_like(log_ratio_B_T))
    if estimator == "k1":
        return log_ratio_B_T
    # k3 = (q/p − 1) − log(q/p) ≥ 0; expm1 keeps precision when q ≈ p. Masked entries: expm1(0) − 0 = 0.
    return -(torch.expm1(log_ratio_B_T) - log_ratio_B_T)
