"""Sampler-vs-trainer log-probs: the mismatch metrics and truncated importance sampling (TIS), against
brute-force references, on the HF backend with injected sampler log-probs (so they run in the main tier)."""

import math
from pathlib import Path

import pytest
import torch
from opd_configs import make_cfg
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd import objectives as obj
from opd.errors import ConfigError
from opd.methods import opd as opd_method
from opd.methods.opd_scoring import fused_update, score_batch
from opd.rollout import HFGenerateBackend, fixed_batch, relay_responses, stop_token_ids
from opd.scoring import PolicyScorer
from opd.tracking import read_metrics


def _random_case(seed=0, B=3, T=7, S=None):
    g = torch.Generator().manual_seed(seed)
    shape = (B, T) if S is None else (B, T, S)
    trainer = -torch.rand((B, T), generator=g) * 3
    sampler = trainer + torch.randn((B, T), generator=g)  # |Δ| up to a few nats: the cap bites
    mask = (torch.rand((B, T), generator=g) > 0.3).float()
    logp = (-torch.rand(shape, generator=g) * 3).requires_grad_()
    adv = torch.randn(shape, generator=g)
    return trainer, sampler, mask, logp, adv


def test_mismatch_and_tis_weights_match_a_loop():
    trainer, sampler, mask, _, _ = _random_case()
    got = obj.sampler_mismatch(trainer, sampler, mask)
    w = obj.truncated_is_weights(trainer, sampler, mask, cap=2.0)
    diffs, k3s = [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            r = float(trainer[b, t]) - float(sampler[b, t])
            if mask[b, t]:
                diffs.append(abs(r))
                k3s.append(math.exp(r) - 1 - r)
                assert float(w[b, t]) == pytest.approx(min(math.exp(r), 2.0), rel=1e-6)
            else:
                assert float(w[b, t]) == 1.0
    assert got["rollout/logp_mismatch"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-6)
    assert got["rollout/logp_kl"] == pytest.approx(sum(k3s) / len(k3s), rel=1e-6)
    assert (w <= 2.0).all() and (w < 2.0).any() and (w == 2.0).any()  # the cap is exercised both ways
    same = obj.sampler_mismatch(trainer, trainer.clone(), mask)
    assert same == {"rollout/logp_mismatch": 0.0, "rollout/logp_kl": 0.0}
    with pytest.raises(ValueError, match="cap"):
        obj.truncated_is_weights(trainer, sampler, mask, cap=0.0)


@pytest.mark.parametrize("S", [None, 3])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_weighted_policy_gradient_matches_brute_force(S, aggregation):
    """On-policy (old = new) loss and gradient with TIS weights = a per-token loop of −w·A·ratio."""
    trainer, sampler, mask, logp, adv = _random_case(seed=1, S=S)
    w = obj.truncated_is_weights(trainer, sampler, mask, cap=2.0)
    loss, _ = obj.policy_gradient_loss(
        logp, logp.detach(), adv, mask, aggregation=aggregation, token_weight_B_T=w, dual_clip=None
    )
    (grad,) = torch.autograd.grad(loss, logp)

    ref_logp = logp.detach().clone().requires_grad_()
    seqs = []
    for b in range(mask.shape[0]):
        terms = []
        for t in range(mask.shape[1]):
            if mask[b, t]:
                ratio = torch.exp(ref_logp[b, t] - ref_logp[b, t].detach())
                terms.append(-(float(w[b, t]) * adv[b, t] * ratio).sum())
        if terms:
            seqs.append(torch.stack(terms))
    if aggregation == "token-mean":
        ref = torch.cat(seqs).sum() / sum(len(s) for s in seqs)
    else:
        ref = torch.stack([s.mean() for s in seqs]).mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    unweighted, _ = obj.policy_gradient_loss(logp, logp.detach(), adv, mask, aggregation=aggregation)
    assert float(unweighted.detach()) != pytest.approx(float(loss.detach()), rel=1e-3)


class _FakeSampler(HFGenerateBackend):
    """HF generate, plus "sampler log-probs" = the trainer's own log-probs of the sampled tokens minus a
    known per-position offset: a stand-in for an engine whose numerics differ from the trainer's."""

    def __init__(self, model, tokenizer, temperature, offset_fn):
        super().__init__(model, tokenizer, stop_token_ids(tokenizer))
        self.temperature, self.offset_fn, self.offsets = temperature, offset_fn, []

    def generate(self, prompt_ids, **kw):
        batch = super().generate(prompt_ids, **kw)
        scorer = PolicyScorer(self.model, temperature=self.temperature)
        with torch.no_grad():
            out = scorer(batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T)
        offset = self.offset_fn(batch.input_ids_B_T.shape) * batch.response_mask_B_T
        self.offsets.append((offset, batch.response_mask_B_T))
        batch.sampler_logprobs_B_T = (out.token_logp_B_T - offset) * batch.response_mask_B_T
        return batch


def _offsets(shape):
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    return torch.rand(shape, generator=g) * 1.5 - 0.5  # r = trainer - sampler in [-0.5, 1): cap 1.5 bites


def _manual_step(tiny_pair, fused, cap, seed=0):
    """One OPD step's update on a fixed rollout batch with SGD(lr=1): returns Δθ and the reference Δθ
    (−∇ of the brute-force TIS-weighted token-mean loss)."""
    cfg = make_cfg(
        tiny_pair, Path("unused"), objective="sampled", rollout_backend="vllm", tis_cap=cap, grad_clip=0
    )
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    student = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[1])
    backend = _FakeSampler(student, tok, 1.0, _offsets)
    prompts = [tok.encode("What is 2 + 3?"), tok.encode("Hi")]
    batch = backend.generate(prompts, n=2, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, seed=seed)
    s_sc, t_sc = PolicyScorer(student), PolicyScorer(teacher)
    before = {k: v.detach().clone() for k, v in student.named_parameters()}

    # reference gradient: loss = −Σ_t w_t·A_t·log p_t / N over response tokens, in a loop
    mask = batch.response_mask_B_T
    with torch.no_grad():
        s_old = s_sc(batch.input_ids_B_T, batch.attention_mask_B_T, mask).token_logp_B_T
        t_lp = t_sc(batch.input_ids_B_T, batch.attention_mask_B_T, mask).token_logp_B_T
    new = s_sc(batch.input_ids_B_T, batch.attention_mask_B_T, mask).token_logp_B_T
    terms = []
    for b, t in mask.nonzero().tolist():
        r = float(s_old[b, t] - batch.sampler_logprobs_B_T[b, t])
        w = min(math.exp(r), cap) if cap else 1.0
        terms.append(-w * float(t_lp[b, t] - s_old[b, t]) * new[b, t])
    student.zero_grad()
    (torch.stack(terms).sum() / len(terms)).backward()
    ref = {k: -p.grad.detach().clone() for k, p in student.named_parameters()}
    student.zero_grad()

    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    if fused:
        fused_update(s_sc, t_sc, batch, opt, cfg)
    else:
        scored, _ = score_batch(s_sc, t_sc, batch, cfg)
        opd_method.update(s_sc, t_sc, batch, scored, opt, cfg)
    delta = {k: p.detach() - before[k] for k, p in student.named_parameters()}
    return delta, ref


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
def test_tis_update_equals_brute_force(tiny_pair, fused):
    delta, ref = _manual_step(tiny_pair, fused, cap=1.5)
    for k in ref:
        torch.testing.assert_close(delta[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
    plain, _ = _manual_step(tiny_pair, fused, cap=0.0)  # off: the unweighted update, not this one
    assert any(not torch.allclose(plain[k], delta[k], atol=1e-6) for k in ref)


def test_opd_run_logs_the_mismatch_and_applies_tis(tiny_pair, tmp_path, monkeypatch):
    made = []

    def fake_make_backend(name, model, tokenizer, **kw):
        assert name == "vllm"
        made.append(_FakeSampler(model, tokenizer, 1.0, _offsets))
        return made[-1]

    monkeypatch.setattr(opd_method, "make_backend", fake_make_backend)
    cfg = make_cfg(tiny_pair, tmp_path, rollout_backend="vllm", tis_cap=1.5, objective="sampled")
    opd_method.train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2
    for row, (offset, mask) in zip(rows, made[0].offsets):
        r = offset[mask > 0]
        assert row["rollout/logp_mismatch"] == pytest.approx(float(r.abs().mean()), abs=1e-5)
        assert row["rollout/logp_kl"] == pytest.approx(float((torch.expm1(r) - r).mean()), abs=1e-5)


def test_hf_run_has_no_rollout_metrics(tiny_pair, tmp_path):
    opd_method.train(make_cfg(tiny_pair, tmp_path, steps=1))
    assert not any(k.startswith("rollout/") for k in read_metrics(tmp_path / "run" / "metrics.jsonl")[0])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(tis_cap=2.0), "rollout_backend=hf"),
        (dict(tis_cap=-1.0, rollout_backend="vllm"), "tis_cap=-1.0: must be >= 0"),
        (dict(tis_cap=2.0, rollout_backend="vllm", objective="full"), "objective=full"),
        (dict(vllm_gpu_memory_utilization=1.5), "vllm_gpu_memory_utilization"),
    ],
)
def test_bad_tis_settings_are_refused(tiny_pair, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(tiny_pair, tmp_path, **kw)


def test_sampler_logprobs_follow_the_batch_through_select_and_relay():
    batch = fixed_batch([[1, 2], [3]], [[5, 6, 9], [7, 9]], stop_ids=[9], pad_id=0)
    batch.sampler_logprobs_B_T = -torch.rand(batch.input_ids_B_T.shape) * batch.response_mask_B_T
    rows = batch.select(slice(1, 2))
    assert torch.equal(rows.sampler_logprobs_B_T, batch.sampler_logprobs_B_T[1:2])
    relaid = relay_responses(batch, [[4, 4, 4, 4], [4]])
    P, P2 = batch.prompt_len, relaid.prompt_len
    assert P2 == 4 and torch.equal(relaid.sampler_logprobs_B_T[:, P2:], batch.sampler_logprobs_B_T[:, P:])
    assert (relaid.sampler_logprobs_B_T[:, :P2] == 0).all()
