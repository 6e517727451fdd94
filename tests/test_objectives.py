"""Tests of opd.objectives: each function against a brute-force reference written from its definition
in probability space (Python loops over a tiny vocabulary), plus properties, docs/paper.md §1 identities
and pinned numbers."""

from __future__ import annotations

import math

import pytest
import torch

from opd import objectives as obj

V = 7  # tiny vocabulary: loops over it are the references


# ------------------------------------------------------------------------------------------------
# brute-force helpers (plain Python floats)
# ------------------------------------------------------------------------------------------------


def _softmax(row: list[float], tau: float = 1.0) -> list[float]:
    m = max(x / tau for x in row)
    e = [math.exp(x / tau - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b) if ai > 0)


def _logits(seed: int, *shape: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _logp(seed: int, *shape: int) -> torch.Tensor:
    return torch.log_softmax(_logits(seed, *shape), dim=-1)


def _close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * (1.0 + abs(b))


# ------------------------------------------------------------------------------------------------
# sampled-token rewards
# ------------------------------------------------------------------------------------------------


def test_sampled_token_rewards_match_definition():
    lp = _logp(1, 2, 3, V).max(dim=-1).values  # arbitrary log-probs in (-inf, 0]
    lq = _logp(2, 2, 3, V).min(dim=-1).values
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    k1 = obj.sampled_token_rewards(lp, lq, mask, "k1")
    k3 = obj.sampled_token_rewards(lp, lq, mask, "k3")
    assert k1.dtype == torch.float32 and k1.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            p, q = math.exp(lp[b, t]), math.exp(lq[b, t])
            want_k1 = (math.log(q) - math.log(p)) if mask[b, t] else 0.0
            want_k3 = -((q / p - 1) - math.log(q / p)) if mask[b, t] else 0.0
            assert _close(float(k1[b, t]), want_k1)
            assert _close(float(k3[b, t]), want_k3)
    assert (k3 <= 0).all()


def test_sampled_token_rewards_monte_carlo_estimate_minus_reverse_kl():
    """PAPER §1: E_{v~p}[r] = −KL(p‖q) for k1 and k3 (claim C1)."""
    lp_V = _logp(3, V)
    lq_V = _logp(4, V)
    p, q = lp_V.exp().tolist(), lq_V.exp().tolist()
    kl = _kl(p, q)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    v_N = torch.multinomial(lp_V.exp(), n, replacement=True, generator=g)
    student_1_N, teacher_1_N = lp_V[v_N][None], lq_V[v_N][None]
    mask_1_N = torch.ones(1, n)
    for estimator in ("k1", "k3"):
        r_N = obj.sampled_token_rewards(student_1_N, teacher_1_N, mask_1_N, estimator)[0].double()
        std_err = float(r_N.std()) / math.sqrt(n)
        assert abs(float(r_N.mean()) + kl) < 4 * std_err, (estimator, float(r_N.mean()), -kl)
    # k3 is the low-variance estimator: per-sample spread smaller than k1's here
    k1_std = obj.sampled_token_rewards(student_1_N, teacher_1_N, mask_1_N, "k1").std()
    k3_std = obj.sampled_token_rewards(student_1_N, teacher_1_N, mask_1_N, "k3").std()
    assert k3_std < k1_std


def test_sampled_token_rewards_zero_when_equal_and_masked_garbage_is_ignored():
    lp = _logp(5, 2, 4, V)[..., 0]
    for est in obj.ESTIMATORS:
        assert obj.sampled_token_rewards(lp, lp.clone(), torch.ones(2, 4), est).abs().max() == 0
    student = lp.clone().requires_grad_(True)
    teacher = lp.clone()
    teacher[0, 1] = float("inf")  # garbage at masked positions must not leak (k3 would exp() it)
    teacher[1, :] = float("nan")
    mask = torch.ones(2, 4)
    mask[0, 1] = 0
    mask[1, :] = 0  # all-masked row
    for est in obj.ESTIMATORS:
        r = obj.sampled_token_rewards(student, teacher, mask, est)
        assert torch.isfinite(r).all() and r[mask == 0].abs().max() == 0
        r.sum().backward()
        assert torch.isfinite(student.grad).all() and student.grad[mask == 0].abs().max() == 0
        student.grad = None


# ------------------------------------------------------------------------------------------------
# supports
# ------------------------------------------------------------------------------------------------


def _expected_support_set(s: set[int], q: set[int], support: str) -> set[int]:
    return {"student": s, "teacher": q, "intersection": s & q, "union": s | q, "symmetric_difference": s ^ q}[
        support
    ]


@pytest.mark.parametrize("support", obj.SUPPORTS)
def test_build_support_matches_set_definition(support):
    K = 3
    stu_ids = _logits(6, 4, 5, V).topk(K, dim=-1).indices
    tch_ids = _logits(7, 4, 5, V).topk(K, dim=-1).indices
    ids, valid = obj.build_support(stu_ids, tch_ids, support)
    S = 2 * K if support in ("union", "symmetric_difference") else K
    assert ids.shape == valid.shape == (4, 5, S) and valid.dtype == torch.bool
    overlaps = set()
    for b in range(4):
        for t in range(5):
            s, q = set(stu_ids[b, t].tolist()), set(tch_ids[b, t].tolist())
            overlaps.add(len(s & q))
            chosen = [int(i) for i, ok in zip(ids[b, t], valid[b, t]) if ok]
            assert len(chosen) == len(set(chosen)), "an id is counted twice"
            assert set(chosen) == _expected_support_set(s, q, support)
    assert len(overlaps) > 1  # the fixture exercises several overlap sizes


def test_build_support_hand_made_example():
    stu = torch.tensor([[[0, 1, 2]]])
    tch = torch.tensor([[[2, 3, 0]]])
    ids, valid = obj.build_support(stu, tch, "symmetric_difference")
    assert ids.tolist() == [[[0, 1, 2, 2, 3, 0]]]
    assert valid.tolist() == [[[False, True, False, False, True, False]]]
    ids, valid = obj.build_support(stu, tch, "union")
    assert ids.tolist() == [[[0, 1, 2, 2, 3, 0]]]
    assert valid.tolist() == [[[True, True, True, False, True, False]]]
    ids, valid = obj.build_support(stu, tch, "intersection")
    assert ids.tolist() == [[[0, 1, 2]]] and valid.tolist() == [[[True, False, True]]]


# ------------------------------------------------------------------------------------------------
# weights and top-K rewards
# ------------------------------------------------------------------------------------------------


def _support_fixture(support: str, K: int = 3, seed: int = 8):
    s_logits, t_logits = _logits(seed, 2, 3, V), _logits(seed + 1, 2, 3, V)
    lp_V, lq_V = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    ids, valid = obj.build_support(s_logits.topk(K, -1).indices, t_logits.topk(K, -1).indices, support)
    return lp_V, lq_V, ids, valid, lp_V.gather(-1, ids), lq_V.gather(-1, ids)


def _ref_weights(lp_S, lq_S, valid_S, weighting, support) -> list[float]:
    if weighting == "uniform":
        n = sum(valid_S)
        return [1.0 / n if ok else 0.0 for ok in valid_S]
    chosen = lp_S if weighting == "student_p" else lq_S
    probs = [math.exp(x) if ok else 0.0 for x, ok in zip(chosen, valid_S)]
    if support == "symmetric_difference":
        return probs  # raw probabilities, as in the reference code
    z = sum(probs)
    return [x / z if z > 0 else 0.0 for x in probs]


@pytest.mark.parametrize("support", obj.SUPPORTS)
@pytest.mark.parametrize("weighting", obj.WEIGHTINGS)
def test_support_weights_and_topk_rewards_match_definition(support, weighting):
    _, _, _, valid, lp, lq = _support_fixture(support)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    w = obj.support_weights(lp, lq, valid, weighting, support)
    r = obj.topk_rewards(lp, lq, w, valid, mask)
    r_renorm = obj.topk_rewards(lp, lq, w, valid, mask, renormalize=True)
    for renorm in (False, True):  # zero reward when student == teacher
        assert obj.topk_rewards(lp, lp.clone(), w, valid, mask, renormalize=renorm).abs().max() < 1e-6
    assert w.dtype == r.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            lp_S, lq_S, ok_S = lp[b, t].tolist(), lq[b, t].tolist(), valid[b, t].tolist()
            want_w = _ref_weights(lp_S, lq_S, ok_S, weighting, support)
            zp = sum(math.exp(x) for x, ok in zip(lp_S, ok_S) if ok)
            zq = sum(math.exp(x) for x, ok in zip(lq_S, ok_S) if ok)
            for s in range(len(ok_S)):
                assert _close(float(w[b, t, s]), want_w[s])
                live = ok_S[s] and bool(mask[b, t])
                p, q = math.exp(lp_S[s]), math.exp(lq_S[s])
                want_r = want_w[s] * (math.log(q) - math.log(p)) if live else 0.0
                want_rr = want_w[s] * (math.log(q / zq) - math.log(p / zp)) if live else 0.0
                assert _close(float(r[b, t, s]), want_r), (b, t, s)
                assert _close(float(r_renorm[b, t, s]), want_rr), (b, t, s)


def test_empty_support_rows_give_zero_weights_and_rewards_without_nan():
    lp = _logp(10, 1, 2, 4).requires_grad_(True)
    lq = _logp(11, 1, 2, 4).requires_grad_(True)
    valid = torch.tensor([[[False] * 4, [True, False, True, False]]])
    for support in ("intersection", "symmetric_difference"):
        for weighting in obj.WEIGHTINGS:
            for renorm in (False, True):
                w = obj.support_weights(lp, lq, valid, weighting, support)
                assert torch.isfinite(w).all() and w[0, 0].abs().max() == 0
                r = obj.topk_rewards(lp, lq, w, valid, torch.ones(1, 2), renormalize=renorm)
                assert torch.isfinite(r).all() and r[0, 0].abs().max() == 0
                r.sum().backward()
                assert torch.isfinite(lp.grad).all() and torch.isfinite(lq.grad).all()
                lp.grad = lq.grad = None


def test_topk_full_support_sums_to_minus_reverse_kl():
    """K = V, student support, student_p weights: Σ_v r_t(v) = −KL(p_t‖q_t), in both reward modes."""
    s_logits, t_logits = _logits(12, 2, 3, V), _logits(13, 2, 3, V)
    lp_V, lq_V = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    mask = torch.ones(2, 3)
    ids, valid = obj.build_support(s_logits.topk(V, -1).indices, t_logits.topk(V, -1).indices, "student")
    lp, lq = lp_V.gather(-1, ids), lq_V.gather(-1, ids)
    w = obj.support_weights(lp, lq, valid, "student_p", "student")
    kl = obj.full_vocab_divergence(s_logits, t_logits, mask, "reverse_kl")
    for renorm in (False, True):
        r = obj.topk_rewards(lp, lq, w, valid, mask, renormalize=renorm)
        torch.testing.assert_close(r.sum(-1), -kl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aggregation", obj.AGGREGATIONS)
def test_topk_k_equals_v_gradient_equals_full_vocab_reverse_kl_gradient(aggregation):
    """PAPER §1 claim C2: PG loss with top-K (K = V) rewards as advantages, ratio 1, has exactly the
    gradient of the full-vocabulary reverse KL (aggregated the same way)."""
    s_logits = _logits(14, 2, 3, V).requires_grad_(True)
    t_logits = _logits(15, 2, 3, V)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])

    kl_loss = obj.aggregate(
        obj.full_vocab_divergence(s_logits, t_logits, mask, "reverse_kl"), mask, aggregation
    )
    (grad_kl,) = torch.autograd.grad(kl_loss, s_logits)

    lp_V, lq_V = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    ids, valid = obj.build_support(lp_V.topk(V, -1).indices, lq_V.topk(V, -1).indices, "student")
    lp, lq = lp_V.gather(-1, ids), lq_V.gather(-1, ids)
    w = obj.support_weights(lp.detach(), lq, valid, "student_p", "student")
    adv = obj.topk_rewards(lp.detach(), lq, w, valid, mask)
    pg_loss, stats = obj.policy_gradient_loss(lp, lp.detach(), adv, mask, valid, aggregation=aggregation)
    (grad_pg,) = torch.autograd.grad(pg_loss, s_logits)

    assert stats["clip_frac"] == 0 and stats["ratio_mean"] == 1.0
    torch.testing.assert_close(grad_pg, grad_kl, atol=1e-6, rtol=1e-5)
    assert grad_kl[0, 2].abs().max() == 0  # masked position


# ------------------------------------------------------------------------------------------------
# full-vocabulary divergences
# ------------------------------------------------------------------------------------------------


def _ref_divergence(s_row, t_row, kind, beta, tau) -> float:
    p, q = _softmax(s_row, tau), _softmax(t_row, tau)
    if kind == "reverse_kl":
        return _kl(p, q)
    if kind == "forward_kl":
        return _kl(q, p)
    if kind == "tv":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    m = [beta * qi + (1 - beta) * pi for pi, qi in zip(p, q)]
    return beta * _kl(q, m) + (1 - beta) * _kl(p, m)


@pytest.mark.parametrize("kind", obj.DIVERGENCES)
def test_full_vocab_divergence_matches_definition(kind):
    s, t = _logits(16, 2, 3, V), _logits(17, 2, 3, V)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    beta, tau = 0.3, 0.7
    div = obj.full_vocab_divergence(s, t, mask, kind, beta=beta, temperature=tau)
    assert div.dtype == torch.float32 and div.shape == (2, 3)
    for b in range(2):
        for i in range(3):
            want = _ref_divergence(s[b, i].tolist(), t[b, i].tolist(), kind, beta, tau) if mask[b, i] else 0.0
            assert _close(float(div[b, i]), want, 1e-4), (b, i, float(div[b, i]), want)


@pytest.mark.parametrize("kind", obj.DIVERGENCES)
def test_full_vocab_divergence_properties(kind):
    s = _logits(18, 2, 3, V).requires_grad_(True)
    t = _logits(19, 2, 3, V).requires_grad_(True)
    # zero when student == teacher
    assert obj.full_vocab_divergence(s, s.detach().clone(), torch.ones(2, 3), kind).abs().max() < 1e-6
    # gradients reach the student only; masked positions contribute nothing
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])  # second row all masked
    div = obj.full_vocab_divergence(s, t, mask, kind, beta=0.4)
    assert div[mask == 0].abs().max() == 0
    div.sum().backward()
    assert t.grad is None
    assert torch.isfinite(s.grad).all() and s.grad[mask == 0].abs().max() == 0 and s.grad.abs().max() > 0
    # changing logits at masked positions changes nothing
    s2 = s.detach().clone()
    s2[1] += 5.0
    torch.testing.assert_close(obj.full_vocab_divergence(s2, t, mask, kind, beta=0.4), div.detach())
    # fully masked batch: zeros, finite zero gradients
    s.grad = None
    obj.full_vocab_divergence(s, t, torch.zeros(2, 3), kind).sum().backward()
    assert s.grad.abs().max() == 0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_aggregation_weights_are_the_gradient_of_aggregate(mode):
    """The closed-form per-token weights equal autograd's d aggregate / d values, and weight the values to
    the aggregate itself; an empty row and an all-masked batch included."""
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    for m in (mask, torch.zeros_like(mask)):
        v = torch.randn(m.shape, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
        agg = obj.aggregate(v, m, mode)
        (g,) = torch.autograd.grad(agg, v)
        agg = agg.detach()
        w = obj.aggregation_weights(m, mode)
        torch.testing.assert_close(w, g, atol=1e-7, rtol=0)
        assert float((w * v.detach()).sum()) == pytest.approx(float(agg), abs=1e-6)
    want = {"token-mean": 1 / 4, "seq-mean-token-sum": 1 / 2, "seq-mean-token-mean": 1 / 6}[mode]
    assert float(obj.aggregation_weights(mask, mode)[0, 0]) == pytest.approx(want, rel=1e-6)


def test_reverse_kl_from_logp_equals_the_definition_and_its_gradient():
    """The fused step's KL from log-probs: value against the probability-space definition, gradient (through
    the log-softmax that made the log-probs) equal to full_vocab_divergence's on the logits; 0 at p = q."""
    s = _logits(24, 1, 4, V)[0].requires_grad_(True)
    t = _logits(25, 1, 4, V)[0]
    div = obj.reverse_kl_from_logp(torch.log_softmax(s, -1), torch.log_softmax(t, -1))
    for i in range(4):
        want = _ref_divergence(s[i].tolist(), t[i].tolist(), "reverse_kl", 0.5, 1.0)
        assert _close(float(div[i].detach()), want, 1e-4), (i, float(div[i].detach()), want)
    (g,) = torch.autograd.grad((div * torch.arange(1.0, 5.0)).sum(), s)
    s_ref = s.detach().clone().requires_grad_(True)
    ref = obj.full_vocab_divergence(s_ref[None], t[None], torch.ones(1, 4), "reverse_kl")[0]
    (g_ref,) = torch.autograd.grad((ref * torch.arange(1.0, 5.0)).sum(), s_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    same = torch.log_softmax(s.detach(), -1)
    assert obj.reverse_kl_from_logp(same, same).abs().max() == 0


def test_full_vocab_divergence_padded_vocab_column_is_nan_free():
    """A −inf logit in both models (padded embedding rows) gives 0·log 0 = 0, not NaN."""
    s = _logits(20, 1, 2, V).requires_grad_(True)
    t = _logits(21, 1, 2, V)
    pad = torch.zeros(1, 2, V, dtype=torch.bool)
    pad[..., -1] = True
    t_pad = t.masked_fill(pad, float("-inf"))
    for kind in obj.DIVERGENCES:
        s_pad = s.masked_fill(pad, float("-inf"))
        div = obj.full_vocab_divergence(s_pad, t_pad, torch.ones(1, 2), kind)
        ref = obj.full_vocab_divergence(s[..., :-1], t[..., :-1], torch.ones(1, 2), kind)
        torch.testing.assert_close(div, ref)
        div.sum().backward()
        assert torch.isfinite(s.grad).all()
        s.grad = None


def test_jsd_beta_limits():
    s, t = _logits(22, 2, 3, V), _logits(23, 2, 3, V)
    mask = torch.ones(2, 3)
    fwd = obj.full_vocab_divergence(s, t, mask, "forward_kl")
    rev = obj.full_vocab_divergence(s, t, mask, "reverse_kl")
    # endpoints are defined explicitly
    torch.testing.assert_close(obj.full_vocab_divergence(s, t, mask, "jsd", beta=0.0), fwd)
    torch.testing.assert_close(obj.full_vocab_divergence(s, t, mask, "jsd", beta=1.0), rev)
    # interior: JSD_β/β → KL(q‖p) as β → 0 and JSD_β/(1−β) → KL(p‖q) as β → 1
    errors = []
    for eps in (1e-2, 1e-4):
        near0 = obj.full_vocab_divergence(s, t, mask, "jsd", beta=eps) / eps
        near1 = obj.full_vocab_divergence(s, t, mask, "jsd", beta=1 - eps) / eps
        errors.append((float((near0 - fwd).abs().max()), float((near1 - rev).abs().max())))
    torch.testing.assert_close(near0, fwd, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(near1, rev, rtol=1e-2, atol=1e-3)
    assert errors[1][0] < errors[0][0] and errors[1][1] < errors[0][1]  # converging
    # β = 0.5 is symmetric in the two models
    half = obj.full_vocab_divergence(s, t, mask, "jsd", beta=0.5)
    torch.testing.assert_close(half, obj.full_vocab_divergence(t, s, mask, "jsd", beta=0.5))
    assert (half <= math.log(2) + 1e-6).all()


# ------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------


def test_aggregate_modes_against_hand_computation():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")], [7.0, 8.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # row 2 empty, masked NaN ignored
    # token-mean: (1+2+3+4)/4 ; seq-mean-token-sum: (6 + 4)/2 ; seq-mean-token-mean: (2 + 4)/2
    expected = {"token-mean": 2.5, "seq-mean-token-sum": 5.0, "seq-mean-token-mean": 3.0}
    for mode, want in expected.items():
        out = obj.aggregate(values, mask, mode)
        assert out.dim() == 0 and float(out.detach()) == pytest.approx(want)
        (g,) = torch.autograd.grad(out, values)
        assert torch.isfinite(g).all() and g[mask == 0].abs().max() == 0
    (g,) = torch.autograd.grad(obj.aggregate(values, mask, "seq-mean-token-mean"), values)
    assert g[0].tolist() == pytest.approx([1 / 6] * 3) and float(g[1, 0]) == pytest.approx(0.5)


@pytest.mark.parametrize("mode", obj.AGGREGATIONS)
def test_aggregate_all_masked_is_zero_and_differentiable(mode):
    values = torch.full((2, 3), float("nan")).requires_grad_(True)
    out = obj.aggregate(values, torch.zeros(2, 3, dtype=torch.bool), mode)
    assert float(out.detach()) == 0.0
    out.backward()
    assert values.grad.abs().max() == 0


# ------------------------------------------------------------------------------------------------
# policy-gradient loss
# ------------------------------------------------------------------------------------------------


def _ref_pg(log_ratio: float, adv: float, eps_lo: float, eps_hi: float, c: float | None):
    """(loss, d loss / d logp, eps-clipped?, dual-clipped?) for one entry, from the definition."""
    ratio = math.exp(log_ratio)
    unclipped, clipped = -adv * ratio, -adv * min(max(ratio, 1 - eps_lo), 1 + eps_hi)
    loss, grad, is_clip = (clipped, 0.0, True) if clipped > unclipped else (unclipped, -adv * ratio, False)
    is_dual = c is not None and adv < 0 and loss > -adv * c
    if is_dual:
        loss, grad = -adv * c, 0.0
    return loss, grad, is_clip, is_dual


@pytest.mark.parametrize("clip_eps_high", [None, 0.28])
def test_policy_gradient_loss_clipping_against_definition(clip_eps_high):
    ratios = [0.5, 0.79, 0.9, 1.0, 1.1, 1.21, 1.25, 2.0, 5.0]
    advs = [1.0, -1.0, 0.5, -2.0]
    cells = [(r, a) for r in ratios for a in advs]  # one position per (ratio, advantage)
    old = _logp(24, 1, len(cells), V)[..., 0]
    log_ratio = torch.tensor([[math.log(r) for r, _ in cells]])
    logp = (old + log_ratio).requires_grad_(True)
    adv = torch.tensor([[a for _, a in cells]])
    mask = torch.ones(1, len(cells))
    loss, stats = obj.policy_gradient_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=clip_eps_high)
    loss.backward()
    eps_hi = 0.2 if clip_eps_high is None else clip_eps_high
    refs = [_ref_pg(float(lr), a, 0.2, eps_hi, 3.0) for lr, (_, a) in zip(log_ratio[0], cells)]
    n = len(cells)
    assert loss.item() == pytest.approx(sum(x[0] for x in refs) / n, rel=1e-5)
    torch.testing.assert_close(logp.grad[0], torch.tensor([x[1] / n for x in refs]), atol=1e-7, rtol=1e-5)
    assert stats["clip_frac"] == pytest.approx(sum(x[2] for x in refs) / n)
    assert stats["dual_clip_frac"] == pytest.approx(sum(x[3] for x in refs) / n)
    assert stats["ratio_mean"] == pytest.approx(sum(r for r, _ in cells) / n, rel=1e-5)
    for (r, a), (_, _, is_clip, is_dual) in zip(cells, refs):
        # clipping fires only outside [1 − ε, 1 + ε_high], in the direction that would grow the objective
        assert is_clip == ((a > 0 and r > 1 + eps_hi) or (a < 0 and r < 0.8))
        # the dual clip caps the loss of negative advantages at −A·c once ratio > c
        assert is_dual == (a < 0 and r > 3.0)
    assert any(x[3] for x in refs) and any(x[2] for x in refs)


def test_policy_gradient_loss_support_inputs_sum_over_valid_entries():
    logp = _logp(25, 2, 3, 4).requires_grad_(True)
    adv = _logits(26, 2, 3, 4)
    valid = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)) > 0.3
    adv_garbage = adv.masked_fill(~valid, float("nan"))  # invalid entries must not leak
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for agg in obj.AGGREGATIONS:
        loss, stats = obj.policy_gradient_loss(logp, logp.detach(), adv_garbage, mask, valid, aggregation=agg)
        per_token = -(adv * valid).sum(-1)  # ratio 1: loss per token = −Σ_valid A
        assert loss.item() == pytest.approx(float(obj.aggregate(per_token, mask, agg)), rel=1e-5)
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(g).all()
        if agg == "token-mean":
            torch.testing.assert_close(g, -(adv * valid * mask[..., None]) / mask.sum())
        assert stats == {"clip_frac": 0.0, "dual_clip_frac": 0.0, "ratio_mean": 1.0}


def test_policy_gradient_loss_gradient_reaches_logp_only():
    logp = _logp(27, 2, 3, 4).requires_grad_(True)
    old = (logp.detach() + 0.1).requires_grad_(True)
    adv = _logits(28, 2, 3, 4).requires_grad_(True)
    loss, _ = obj.policy_gradient_loss(logp, old, adv, torch.ones(2, 3))
    loss.backward()
    assert logp.grad.abs().max() > 0 and old.grad is None and adv.grad is None


def test_policy_gradient_loss_all_masked_and_no_dual_clip():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = obj.policy_gradient_loss(logp, logp.detach(), torch.ones(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0 and all(math.isfinite(v) for v in stats.values())
    loss.backward()
    assert logp.grad.abs().max() == 0
    # dual_clip=None: a negative advantage with a huge ratio is only ε-clipped (unbounded loss)
    loss, stats = obj.policy_gradient_loss(
        torch.tensor([[math.log(10.0)]]),
        torch.zeros(1, 1),
        torch.tensor([[-1.0]]),
        torch.ones(1, 1),
        dual_clip=None,
    )
    assert loss.item() == pytest.approx(10.0) and stats["dual_clip_frac"] == 0.0


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input_raises_value_error_naming_it():
    lp2, m2 = torch.zeros(2, 3), torch.ones(2, 3)
    lp3, ids3 = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long)
    valid3 = torch.ones(2, 3, 4, dtype=torch.bool)
    logits = torch.zeros(2, 3, V)
    with pytest.raises(ValueError, match="estimator='k2'"):
        obj.sampled_token_rewards(lp2, lp2, m2, "k2")
    with pytest.raises(ValueError, match="support='only_stu'.*'student'"):
        obj.build_support(ids3, ids3, "only_stu")
    with pytest.raises(ValueError, match="weighting='none'.*'uniform'"):
        obj.support_weights(lp3, lp3, valid3, "none", "student")
    with pytest.raises(ValueError, match="support='topk'"):
        obj.support_weights(lp3, lp3, valid3, "student_p", "topk")
    with pytest.raises(ValueError, match="mode='mean'"):
        obj.aggregate(lp2, m2, "mean")
    with pytest.raises(ValueError, match="aggregation='sum'"):
        obj.policy_gradient_loss(lp2, lp2, lp2, m2, aggregation="sum")
    with pytest.raises(ValueError, match="kind='kl'"):
        obj.full_vocab_divergence(logits, logits, m2, "kl")
    with pytest.raises(ValueError, match="beta"):
        obj.full_vocab_divergence(logits, logits, m2, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        obj.full_vocab_divergence(logits, logits, m2, temperature=0.0)
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        obj.full_vocab_divergence(logits, torch.zeros(2, 3, V + 1), m2)
    with pytest.raises(ValueError, match="teacher_logp_B_T has shape"):
        obj.sampled_token_rewards(lp2, torch.zeros(2, 4), m2)
    with pytest.raises(ValueError, match="mask_B_T has shape"):
        obj.topk_rewards(lp3, lp3, lp3, valid3, torch.ones(3, 2))
    with pytest.raises(ValueError, match="student_logp_B_T must have rank 2"):
        obj.sampled_token_rewards(lp3, lp3, m2)
    with pytest.raises(ValueError, match="teacher_topk_ids_B_T_K has shape"):
        obj.build_support(ids3, ids3[..., :2], "union")
    with pytest.raises(ValueError, match="K=0"):
        obj.build_support(ids3[..., :0], ids3[..., :0], "student")
    with pytest.raises(ValueError, match="must hold integer token ids"):
        obj.build_support(lp3, lp3, "union")
    with pytest.raises(ValueError, match="weights_B_T_S has shape"):
        obj.topk_rewards(lp3, lp3, lp3[..., :2], valid3, m2)
    with pytest.raises(ValueError, match="old_logp has shape"):
        obj.policy_gradient_loss(lp3, lp3[..., :2], lp3, m2)
    with pytest.raises(ValueError, match="valid_B_T_S was given"):
        obj.policy_gradient_loss(lp2, lp2, lp2, m2, valid_B_T_S=valid3)
    with pytest.raises(ValueError, match="dual_clip"):
        obj.policy_gradient_loss(lp2, lp2, lp2, m2, dual_clip=0.5)


# ------------------------------------------------------------------------------------------------
# renormalised advantages and the top-K composition of the training loop
# ------------------------------------------------------------------------------------------------


def _topk_inputs(seed: int, K: int = 3):
    lp_V, lq_V = _logp(seed, 2, 4, V), _logp(seed + 1, 2, 4, V)
    s_lp, s_ids = lp_V.topk(K, -1)
    t_lp, t_ids = lq_V.topk(K, -1)
    return lp_V, lq_V, (s_ids, s_lp, t_ids, t_lp, lq_V.gather(-1, s_ids), lp_V.gather(-1, t_ids))


def test_renormalized_advantages_match_definition_and_are_centred():
    lp_V, lq_V, inputs = _topk_inputs(3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    for weighting in obj.WEIGHTINGS:
        out = obj.topk_advantages(*inputs, mask, "union", weighting, renormalize=True)
        for b in range(2):
            for t in range(4):
                adv = out.advantages[b, t]
                if not mask[b, t]:
                    assert adv.abs().max() == 0
                    continue
                S = [int(v) for v, ok in zip(out.support_ids[b, t], out.valid[b, t]) if ok]
                p = {v: math.exp(lp_V[b, t, v]) for v in S}
                q = {v: math.exp(lq_V[b, t, v]) for v in S}
                zp, zq = sum(p.values()), sum(q.values())
                w = {"student_p": {v: p[v] / zp for v in S}, "teacher_p": {v: q[v] / zq for v in S}}.get(
                    weighting, {v: 1 / len(S) for v in S}
                )
                r = {v: w[v] * (math.log(q[v] / zq) - math.log(p[v] / zp)) for v in S}
                total = sum(r.values())
                for slot, v in enumerate(out.support_ids[b, t].tolist()):
                    want = r[v] - p[v] / zp * total if out.valid[b, t, slot] else 0.0
                    assert _close(float(adv[slot]), want), (weighting, b, t, slot)
                assert abs(float(adv.sum())) < 1e-6
                assert _close(float(out.rewards[b, t].sum()), total)


def test_topk_advantages_properties_and_errors():
    lp_V, _, inputs = _topk_inputs(5)
    same = (inputs[0], inputs[1], inputs[0], inputs[1], inputs[1], inputs[1])  # teacher == student
    mask = torch.ones(2, 4)
    for support in obj.SUPPORTS:
        for renorm in (False, True) if support != "symmetric_difference" else (False,):
            out = obj.topk_advantages(*same, mask, support, "student_p", renorm)
            assert out.advantages.abs().max() < 1e-6, (support, renorm)
            empty = obj.topk_advantages(*inputs, torch.zeros(2, 4), support, "teacher_p", renorm)
            assert torch.isfinite(empty.advantages).all() and empty.advantages.abs().max() == 0
    with pytest.raises(
        ValueError, match="renormalize=True is not defined for support='symmetric_difference'"
    ):
        obj.topk_advantages(*inputs, mask, "symmetric_difference", "student_p", renormalize=True)
    with pytest.raises(ValueError, match="needs student_logp_at_teacher_B_T_K"):
        obj.topk_advantages(*inputs[:5], None, mask, "teacher")
    # student / intersection only read the student's ids: the student-at-teacher input is optional
    a = obj.topk_advantages(*inputs[:5], None, mask, "intersection")
    b = obj.topk_advantages(*inputs, mask, "intersection")
    assert torch.equal(a.advantages, b.advantages)


# ------------------------------------------------------------------------------------------------
# pinned numbers: a refactor must not silently change what is optimised
# ------------------------------------------------------------------------------------------------


def test_pinned_values():
    torch.manual_seed(1234)
    s_logits = torch.randn(2, 4, V) * 2
    t_logits = torch.randn(2, 4, V) * 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    tokens = torch.randint(0, V, (2, 4))
    lp_V, lq_V = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    lp_tok, lq_tok = lp_V.gather(-1, tokens[..., None])[..., 0], lq_V.gather(-1, tokens[..., None])[..., 0]

    got = {
        "k1": obj.sampled_token_rewards(lp_tok, lq_tok, mask, "k1").sum(),
        "k3": obj.sampled_token_rewards(lp_tok, lq_tok, mask, "k3").sum(),
    }
    for kind in obj.DIVERGENCES:
        got[kind] = obj.full_vocab_divergence(s_logits, t_logits, mask, kind, beta=0.3, temperature=0.8).sum()
    for support in obj.SUPPORTS:
        ids, valid = obj.build_support(lp_V.topk(3, -1).indices, lq_V.topk(3, -1).indices, support)
        lp, lq = lp_V.gather(-1, ids), lq_V.gather(-1, ids)
        w = obj.support_weights(lp, lq, valid, "student_p", support)
        adv = obj.topk_rewards(lp, lq, w, valid, mask)
        got[f"{support}/rewards"] = adv.sum()
        got[f"{support}/renorm"] = obj.topk_rewards(lp, lq, w, valid, mask, renormalize=True).sum()
        got[f"{support}/pg"] = obj.policy_gradient_loss(
            lp, lp - 0.3 * torch.tanh(lq), adv, mask, valid, aggregation="seq-mean-token-mean"
        )[0]
    # frozen from this implementation (7 significant digits); change only with a reason in the commit
    pinned = {
        "k1": 3.009348,
        "k3": -7.904704,
        "forward_kl": 14.08896,
        "reverse_kl": 17.01663,
        "jsd": 1.721986,
        "tv": 3.413914,
        "student/rewards": -14.089,
        "student/renorm": -7.062475,
        "student/pg": 2.273158,
        "teacher/rewards": -0.02684152,
        "teacher/renorm": -5.345259,
        "teacher/pg": 0.08572976,
        "intersection/rewards": -2.124529,
        "intersection/renorm": -0.006162364,
        "intersection/pg": 0.4403974,
        "union/rewards": -12.89179,
        "union/renorm": -13.00673,
        "union/pg": 2.086453,
        "symmetric_difference/rewards": -11.05149,
        "symmetric_difference/renorm": -11.39121,
        "symmetric_difference/pg": 1.746116,
    }
    assert set(pinned) == set(got)
    for key, want in pinned.items():
        assert float(got[key]) == pytest.approx(want, rel=1e-5, abs=1e-6), key
