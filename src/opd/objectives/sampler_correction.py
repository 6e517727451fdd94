"""The rollout engine's log-probs against the trainer's: mismatch metrics and truncated importance sampling.

A rollout engine with its own copy of the weights and its own kernels (vLLM) samples from a policy
``π_sampler`` that differs slightly from the trainer's ``π_old`` (the same weights, scored by the trainer
before the update). With ``r_t = log π_old(ŷ_t) − log π_sampler(ŷ_t)`` at each sampled token:

- :func:`sampler_mismatch`: ``logp_mismatch = mean_t |r_t|`` and ``logp_kl = mean_t (e^{r_t} − 1 − r_t)``,
  the k3 estimate of KL(π_sampler ‖ π_old) on the sampler's own tokens (non-negative per token, zero when
  the two agree);
- :func:`truncated_is_weights`: truncated importance sampling (TIS, as verl's ``tis_imp_ratio_cap``): the
  per-token weight ``min(e^{r_t}, C)``, detached, that multiplies the per-token policy-gradient loss so its
  expectation under the sampler's tokens is the one under ``π_old``'s, with the variance bounded by ``C``.
"""

from __future__ import annotations

import torch

from opd.objectives.checks import check_floating, check_mask, check_rank, check_shape


def _log_ratio(trainer_logp_B_T, sampler_logp_B_T, mask_B_T):
    check_rank("trainer_logp_B_T", trainer_logp_B_T, "B_T")
    check_floating("trainer_logp_B_T", trainer_logp_B_T)
    check_rank("sampler_logp_B_T", sampler_logp_B_T, "B_T")
    check_shape("sampler_logp_B_T", sampler_logp_B_T, trainer_logp_B_T.shape, "trainer_logp_B_T")
    keep_B_T = check_mask(mask_B_T, trainer_logp_B_T.shape, "trainer_logp_B_T")
    diff = trainer_logp_B_T.detach().float() - sampler_logp_B_T.detach().float()
    return torch.where(keep_B_T, diff, torch.zeros_like(diff)), keep_B_T


def sampler_mismatch(
    trainer_logp_B_T: torch.Tensor, sampler_logp_B_T: torch.Tensor, mask_B_T: torch.Tensor
) -> dict[str, float]:
    """``{"rollout/logp_mismatch": mean |r|, "rollout/logp_kl": mean (e^r − 1 − r)}`` over kept tokens,
    ``r = trainer − sampler`` log-prob of each sampled token (module docstring). No kept token: both 0."""
    r_B_T, keep_B_T = _log_ratio(trainer_logp_B_T, sampler_logp_B_T, mask_B_T)
    n = keep_B_T.sum().clamp_min(1).float()
    k3_B_T = torch.where(keep_B_T, torch.expm1(r_B_T) - r_B_T, torch.zeros_like(r_B_T))
    return {
        "rollout/logp_mismatch": float(r_B_T.abs().sum() / n),
        "rollout/logp_kl": float(k3_B_T.sum() / n),
    }


def truncated_is_weights(
    trainer_logp_B_T: torch.Tensor, sampler_logp_B_T: torch.Tensor, mask_B_T: torch.Tensor, cap: float
) -> torch.Tensor:
    """Detached float32 weights ``min(exp(trainer − sampler), cap)`` per token (1 where the mask is 0).

    ``cap`` > 0: the truncation C (verl's default 2). The log-ratio is clamped to ±20 before ``exp``."""
    if not cap > 0:
        raise ValueError(f"cap={cap!r}: the truncation of the importance weights must be > 0 (e.g. 2.0)")
    r_B_T, keep_B_T = _log_ratio(trainer_logp_B_T, sampler_logp_B_T, mask_B_T)
    w_B_T = r_B_T.clamp(-20.0, 20.0).exp().clamp(max=float(cap))
    return torch.where(keep_B_T, w_B_T, torch.ones_like(w_B_T))
