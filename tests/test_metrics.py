"""Mechanism metrics against brute-force references written from docs/paper.md §3 (loops over V = 9, k = 3)."""

from __future__ import annotations

import math

import pytest
import torch

from opd.metrics import (
    mechanism_means,
    mechanism_metrics,
    mechanism_tensors,
    position_profile,
    response_positions,
)

V, K = 9, 3


def _scoring(student_logits_B_T_V, teacher_logits_B_T_V, mask_B_T):
    """What scoring returns: top-k ids / full-vocab log-probs, log q at the student's ids, entropies."""
    logp_B_T_V = student_logits_B_T_V.log_softmax(-1)
    logq_B_T_V = teacher_logits_B_T_V.log_softmax(-1)
    s_logp, s_ids = logp_B_T_V.topk(K, dim=-1)
    _, t_ids = logq_B_T_V.topk(K, dim=-1)
    q_at_s = logq_B_T_V.gather(-1, s_ids)
    h_p = -(logp_B_T_V.exp() * logp_B_T_V).sum(-1)
    h_q = -(logq_B_T_V.exp() * logq_B_T_V).sum(-1)
    return dict(
        student_topk_ids_B_T_K=s_ids,
        student_topk_logp_B_T_K=s_logp,
        teacher_topk_ids_B_T_K=t_ids,
        teacher_logp_at_student_topk_B_T_K=q_at_s,
        student_entropy_B_T=h_p,
        teacher_entropy_B_T=h_q,
        mask_B_T=mask_B_T,
    ), (logp_B_T_V, logq_B_T_V)


def _batch(seed: int = 0):
    """B = 4 rows, T = 7: prompt columns, right padding, a hole, and one row with no response at all.

    Teacher logits at a few positions are the negated student logits, so TopK(p) ∩ TopK(q) = ∅ there.
    """
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 7
    s = torch.randn(B, T, V, generator=g) * 2.0
    t = s + torch.randn(B, T, V, generator=g) * 1.5
    t[0, 3] = -s[0, 3]
    t[2, 5] = -s[2, 5]
    mask = torch.tensor(
        [
            [0, 1, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 0, 0],
            [0, 1, 1, 0, 1, 1, 1],  # a hole at t = 3
            [0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.float32,
    )
    return s, t, mask


def _reference(logp_B_T_V, logq_B_T_V, mask_B_T, chunk):
    """Every metric from its definition, with Python loops and sets over a 9-token vocabulary."""
    B, T, _ = logp_B_T_V.shape
    rows = []  # one dict per response position
    for b in range(B):
        first = next((t for t in range(T) if mask_B_T[b, t] > 0), None)
        for t in range(T):
            if mask_B_T[b, t] <= 0:
                continue
            p = [math.exp(float(x)) for x in logp_B_T_V[b, t]]
            q = [math.exp(float(x)) for x in logq_B_T_V[b, t]]
            top_p = set(sorted(range(V), key=lambda v: -p[v])[:K])
            top_q = set(sorted(range(V), key=lambda v: -q[v])[:K])
            inter = top_p & top_q
            r = dict(
                pos=t - first,
                ratio=len(inter) / K,
                mass_p=sum(p[v] for v in inter),
                mass_q=sum(q[v] for v in inter),
                h_p=-sum(x * math.log(x) for x in p),
                h_q=-sum(x * math.log(x) for x in q),
            )
            if inter:
                zp = sum(p[v] for v in inter)
                zq = sum(q[v] for v in inter)
                r["adv"] = sum(
                    (p[v] / zp) * (math.log(q[v] / zq) - math.log(p[v] / zp)) for v in inter
                ) / len(inter)
                r["adv_verl"] = sum(-q[v] * (math.log(q[v]) - math.log(p[v])) for v in inter) / len(inter)
                # extreme tokens: the default top-k advantage p/Σ_{TopK(p)} p · (log q − log p) on I_t
                zk = sum(p[v] for v in top_p)
                a = {v: p[v] / zk * (math.log(q[v]) - math.log(p[v])) for v in inter}
                for tag, v in (("max", max(a, key=a.get)), ("min", min(a, key=a.get))):
                    r[f"{tag}_adv"], r[f"p_at_{tag}"], r[f"q_at_{tag}"] = a[v], p[v], q[v]
            rows.append(r)

    def mean(key, sel=rows):
        vals = [r[key] for r in sel if key in r]
        return sum(vals) / len(vals)

    out = {
        "overlap/ratio": mean("ratio"),
        "overlap/adv": mean("adv"),
        "overlap/adv_verl": mean("adv_verl"),
        "overlap/mass_student": mean("mass_p"),
        "overlap/mass_teacher": mean("mass_q"),
        "entropy/student": mean("h_p"),
        "entropy/teacher": mean("h_q"),
        "entropy/gap": sum(abs(r["h_q"] - r["h_p"]) for r in rows) / len(rows),
        "entropy/gap_of_means": abs(mean("h_q") - mean("h_p")),
    }
    for tag in ("max", "min"):
        out[f"extreme/{tag}_adv"] = mean(f"{tag}_adv")
        out[f"extreme/p_at_{tag}_adv"] = mean(f"p_at_{tag}")
        out[f"extreme/q_at_{tag}_adv"] = mean(f"q_at_{tag}")
    for start in range(0, max(r["pos"] for r in rows) + 1, chunk):
        sel = [r for r in rows if start <= r["pos"] < start + chunk]
        if not sel:
            continue
        out[f"overlap/ratio@{start}-{start + chunk}"] = mean("ratio", sel)
        out[f"entropy/student@{start}-{start + chunk}"] = mean("h_p", sel)
        out[f"entropy/teacher@{start}-{start + chunk}"] = mean("h_q", sel)
    return out, rows


@pytest.mark.parametrize("chunk", [2, 3, 256])
def test_every_metric_matches_brute_force_reference(chunk):
    s, t, mask = _batch()
    inputs, (logp, logq) = _scoring(s, t, mask)
    got = mechanism_metrics(**inputs, position_chunk=chunk)
    want, rows = _reference(logp, logq, mask, chunk)
    assert any(r["ratio"] == 0 for r in rows), "fixture must exercise the |I_t| = 0 rule"
    assert any(0 < r["ratio"] < 1 for r in rows)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize("chunk", [None, 3])
def test_means_of_computed_tensors_are_the_metrics(chunk):
    """A caller holding the per-position tensors gets the same metrics without computing them again."""
    s, t, mask = _batch(seed=2)
    inputs, _ = _scoring(s, t, mask)
    mt = mechanism_tensors(**inputs)
    assert mechanism_means(mt, position_chunk=chunk) == mechanism_metrics(**inputs, position_chunk=chunk)
    with pytest.raises(ValueError, match="position_chunk must be a positive number"):
        mechanism_means(mt, position_chunk=0)


def test_empty_overlap_positions_are_excluded_from_advantages_only():
    s, t, mask = _batch()
    inputs, _ = _scoring(s, t, mask)
    mt = mechanism_tensors(**inputs)
    assert not mt.adv_valid_B_T[0, 3] and not mt.adv_valid_B_T[2, 5]
    assert mt.overlap_ratio_B_T[0, 3] == 0 and mt.mass_teacher_B_T[0, 3] == 0
    assert mt.overlap_adv_B_T[0, 3] == 0 and mt.overlap_adv_verl_B_T[0, 3] == 0
    # excluding those positions by hand reproduces the reported mean
    valid = mt.adv_valid_B_T
    got = mechanism_metrics(**inputs)
    assert got["overlap/adv"] == pytest.approx(float(mt.overlap_adv_B_T[valid].mean()), rel=1e-5)


def test_identical_models_give_ratio_one_zero_advantage_zero_gap_and_topk_mass():
    s, _, mask = _batch(seed=1)
    inputs, (logp, _) = _scoring(s, s.clone(), mask)
    got = mechanism_metrics(**inputs, position_chunk=2)
    topk_mass_B_T = logp.exp().topk(K, dim=-1).values.sum(-1)
    m = mask > 0
    assert got["overlap/ratio"] == pytest.approx(1.0)
    assert got["overlap/adv"] == pytest.approx(0.0, abs=1e-7)
    assert got["overlap/adv_verl"] == pytest.approx(0.0, abs=1e-7)
    assert got["entropy/gap"] == pytest.approx(0.0, abs=1e-7)
    assert got["entropy/gap_of_means"] == pytest.approx(0.0, abs=1e-7)
    assert got["overlap/mass_student"] == pytest.approx(float(topk_mass_B_T[m].mean()), rel=1e-5)
    assert got["overlap/mass_teacher"] == pytest.approx(got["overlap/mass_student"], rel=1e-6)
    assert all(v == pytest.approx(1.0) for n, v in got.items() if n.startswith("overlap/ratio@"))


def test_masked_positions_are_ignored():
    s, t, mask = _batch()
    inputs, _ = _scoring(s, t, mask)
    ref = mechanism_metrics(**inputs, position_chunk=2)
    # garbage (including NaN, duplicate ids) where the mask is 0 must not change anything
    off = mask == 0
    junk = dict(inputs)
    junk["student_topk_logp_B_T_K"] = inputs["student_topk_logp_B_T_K"].masked_fill(
        off[..., None], float("nan")
    )
    junk["teacher_logp_at_student_topk_B_T_K"] = inputs["teacher_logp_at_student_topk_B_T_K"].masked_fill(
        off[..., None], 5.0
    )
    junk["student_topk_ids_B_T_K"] = inputs["student_topk_ids_B_T_K"].masked_fill(off[..., None], 0)
    junk["student_entropy_B_T"] = inputs["student_entropy_B_T"].masked_fill(off, float("inf"))
    junk["teacher_entropy_B_T"] = inputs["teacher_entropy_B_T"].masked_fill(off, 1e6)
    assert mechanism_metrics(**junk, position_chunk=2) == pytest.approx(ref)
    assert all(math.isfinite(v) for v in ref.values())


def test_all_masked_batch_gives_no_metrics_and_no_nan():
    s, t, mask = _batch()
    inputs, _ = _scoring(s, t, torch.zeros_like(mask))
    assert mechanism_metrics(**inputs) == {}
    starts, means, counts = position_profile(torch.ones(2, 3), torch.zeros(2, 3), 4)
    assert starts.numel() == means.numel() == counts.numel() == 0


def test_extreme_tokens_are_per_position_and_averaged_over_the_overlap():
    """Per position: the max / min advantage token of I_t (not one batch-wide argmax), then a mean."""
    s, t, mask = _batch()
    inputs, (logp, logq) = _scoring(s, t, mask)
    mt = mechanism_tensors(**inputs)
    got = mechanism_metrics(**inputs)
    valid = mt.adv_valid_B_T
    # every position contributes its own extreme token: max ≥ min everywhere, and the batch value is
    # the mean over positions with |I_t| > 0, not the value at one batch-wide argmax
    assert bool((mt.max_adv_B_T[valid] >= mt.min_adv_B_T[valid]).all())
    assert int(valid.sum()) > 3 and len(set(mt.max_adv_B_T[valid].tolist())) == int(valid.sum())
    assert got["extreme/max_adv"] == pytest.approx(float(mt.max_adv_B_T[valid].mean()), rel=1e-6)
    assert got["extreme/max_adv"] < float(mt.max_adv_B_T[valid].max())
    # positions without overlap and masked positions hold 0
    assert mt.max_adv_B_T[0, 3] == 0 and mt.p_at_min_adv_B_T[2, 5] == 0 and mt.q_at_max_adv_B_T[3, 1] == 0
    # identical models: every advantage is 0, and p = q at both extreme tokens
    same, _ = _scoring(s, s.clone(), mask)
    got_same = mechanism_metrics(**same)
    assert got_same["extreme/max_adv"] == pytest.approx(0.0, abs=1e-7)
    assert got_same["extreme/min_adv"] == pytest.approx(0.0, abs=1e-7)
    assert got_same["extreme/p_at_max_adv"] == pytest.approx(got_same["extreme/q_at_max_adv"], rel=1e-6)


def test_position_profile_and_response_positions_match_loops():
    s, t, mask = _batch()
    pos = response_positions(mask)
    assert pos[2].tolist() == [0, 0, 1, 0, 3, 4, 5]  # the hole at t = 3 keeps later offsets
    assert pos[3].tolist() == [0] * 7
    values = torch.randn(4, 7, generator=torch.Generator().manual_seed(5))
    starts, means, counts = position_profile(values, mask, 2)
    want = {}
    for b in range(4):
        for tt in range(7):
            if mask[b, tt] > 0:
                want.setdefault(int(pos[b, tt]) // 2 * 2, []).append(float(values[b, tt]))
    assert starts.tolist() == sorted(want)
    assert counts.tolist() == [len(want[k]) for k in sorted(want)]
    assert means.tolist() == pytest.approx([sum(want[k]) / len(want[k]) for k in sorted(want)], rel=1e-6)
    assert means.dtype == torch.float32


def test_bad_inputs_name_the_tensor_and_the_fix():
    s, t, mask = _batch()
    inputs, _ = _scoring(s, t, mask)
    with pytest.raises(ValueError, match="teacher_topk_ids_B_T_K has shape"):
        mechanism_metrics(**{**inputs, "teacher_topk_ids_B_T_K": inputs["teacher_topk_ids_B_T_K"][..., :2]})
    dup = inputs["student_topk_ids_B_T_K"].clone()
    dup[0, 2, 1] = dup[0, 2, 0]
    with pytest.raises(ValueError, match="distinct"):
        mechanism_metrics(**{**inputs, "student_topk_ids_B_T_K": dup})
    nan = inputs["student_entropy_B_T"].clone()
    nan[0, 2] = float("nan")
    with pytest.raises(ValueError, match="student_entropy_B_T has 1 non-finite"):
        mechanism_metrics(**{**inputs, "student_entropy_B_T": nan})
    with pytest.raises(ValueError, match="position_chunk"):
        mechanism_metrics(**inputs, position_chunk=0)


def test_frozen_numbers():
    """Pins the metrics on a seeded batch so a refactor cannot silently change them."""
    s, t, mask = _batch(seed=11)
    inputs, _ = _scoring(s, t, mask)
    got = mechanism_metrics(**inputs, position_chunk=None)
    frozen = {
        "overlap/ratio": 0.52381,
        "overlap/adv": -0.069712,
        "overlap/adv_verl": -0.14383,
        "overlap/mass_student": 0.568385,
        "overlap/mass_teacher": 0.658501,
        "entropy/student": 1.144117,
        "entropy/teacher": 0.973866,
        "entropy/gap": 0.374336,
        "entropy/gap_of_means": 0.170251,
        "extreme/max_adv": 0.127461,
        "extreme/p_at_max_adv": 0.357605,
        "extreme/q_at_max_adv": 0.549099,
        "extreme/min_adv": -0.15304,
        "extreme/p_at_min_adv": 0.428952,
        "extreme/q_at_min_adv": 0.351279,
    }
    assert got == pytest.approx(frozen, abs=2e-6)
