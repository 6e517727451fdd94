"""One step of the fused path (one student pass) against the two-pass path (scoring pass + update) on the
same rollout batch: the same gradient, scores, rewards and loss, for every objective and support. The
training-run comparison (weights after three steps) is in test_train.py; this one compares the gradient
itself, before Adam can amplify rounding in near-zero entries."""

from __future__ import annotations

import pytest
import torch
from opd_configs import make_cfg
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.data import load_prompts
from opd.methods import opd as opd_method
from opd.methods.opd_scoring import can_fuse, fused_update, score_batch
from opd.rollout import make_backend, relay_responses
from opd.scoring import (
    PolicyScorer,
    ScoreOutput,
    full_vocab_fused,
    full_vocab_pair,
    keep_rows,
    score,
    score_backward,
    score_rescorable,
)

SETTINGS = {
    "sampled": dict(objective="sampled"),
    "topk-student": dict(objective="topk", support_size=4),
    "topk-teacher": dict(objective="topk", support_size=4, support="teacher"),
    "topk-intersection": dict(
        objective="topk", support_size=4, support="intersection", weighting="teacher_p"
    ),
    "topk-renorm-seqmean": dict(
        objective="topk", support_size=4, renormalize=True, loss_aggregation="seq-mean-token-mean"
    ),
    "topk-union": dict(objective="topk", support_size=4, support="union", weighting="teacher_p"),
    "topk-symdiff": dict(objective="topk", support_size=4, support="symmetric_difference"),
    "topk-teacher-renorm-seqmean": dict(
        objective="topk",
        support_size=3,
        support="teacher",
        renormalize=True,
        loss_aggregation="seq-mean-token-mean",
    ),
    "full": dict(objective="full"),
    "full-seqsum-mb1-chunk3": dict(
        objective="full", loss_aggregation="seq-mean-token-sum", micro_batch_size=1, score_chunk_size=3
    ),
    "full-temperatures": dict(objective="full", temperature=0.7, teacher_temperature=1.3),
}


def _batch(tiny_pair, n_prompts=3, teacher_template=None):
    student_dir, _, prompts = tiny_pair
    tok = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    kw = {} if teacher_template is None else dict(teacher_prompt_template=teacher_template)
    ps = load_prompts(prompts, tok, prompt_template="Q: {problem}\nA:", limit=n_prompts, **kw)
    batch = make_backend("hf", model, tok).generate(
        [e.input_ids for e in ps.examples], n=2, max_new_tokens=7, temperature=1.0, top_p=1.0, top_k=0, seed=5
    )
    tb = None
    if teacher_template is not None:
        tb = relay_responses(batch, [ps.examples[int(p)].teacher_input_ids for p in batch.prompt_index_B])
    return batch, tb


def _run(tiny_pair, cfg, batch, teacher_batch, fused: bool):
    student_dir, teacher_dir, _ = tiny_pair
    s = PolicyScorer(
        AutoModelForCausalLM.from_pretrained(student_dir),
        temperature=cfg.temperature,
        chunk_size=cfg.score_chunk_size,
    )
    t = PolicyScorer(
        AutoModelForCausalLM.from_pretrained(teacher_dir).eval(),
        temperature=cfg.teacher_temperature,
        chunk_size=cfg.score_chunk_size,
    )
    opt = torch.optim.SGD(s.parameters(), lr=0.0)  # the step leaves the weights and the .grad to compare
    if fused:
        scored, _, loss, norm, _, _ = fused_update(s, t, batch, opt, cfg, teacher_batch=teacher_batch)
    else:
        scored, _ = score_batch(s, t, batch, cfg, teacher_batch=teacher_batch)
        loss, norm, _, _ = opd_method.update(s, t, batch, scored, opt, cfg)
    grads = {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}
    return scored, loss, norm, grads


def _assert_scores(a: ScoreOutput, b: ScoreOutput):
    for f in ScoreOutput.__dataclass_fields__:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is None:
            continue
        if f == "topk_ids_B_T_K":
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=2e-6, rtol=0, msg=f)


@pytest.mark.parametrize("kw", list(SETTINGS.values()), ids=list(SETTINGS))
def test_one_fused_step_equals_the_two_pass_step(tiny_pair, tmp_path, kw):
    cfg = make_cfg(tiny_pair, tmp_path, **kw)
    assert can_fuse(cfg)
    batch, _ = _batch(tiny_pair)
    assert batch.response_mask_B_T.sum() > 8
    two, loss2, norm2, g2 = _run(tiny_pair, cfg, batch, None, fused=False)
    one, loss1, norm1, g1 = _run(tiny_pair, cfg, batch, None, fused=True)
    assert norm2 > 0 and set(g1) == set(g2)
    scale = max(float(g.abs().max()) for g in g2.values())
    for name in g2:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5 * scale, rtol=0, msg=name)
    assert norm1 == pytest.approx(norm2, rel=1e-5)
    assert loss1 == pytest.approx(loss2, rel=1e-5, abs=1e-7)
    _assert_scores(one.student, two.student)
    _assert_scores(one.teacher, two.teacher)
    torch.testing.assert_close(one.token_reward_B_T, two.token_reward_B_T, atol=2e-6, rtol=0)


def test_teacher_first_support_under_the_teachers_own_prompt(tiny_pair, tmp_path):
    """support=union scores the teacher before the student: under a teacher prompt of another length
    the kept rows and the later rescoring still land on the student's layout."""
    cfg = make_cfg(tiny_pair, tmp_path, objective="topk", support_size=4, support="union")
    batch, tb = _batch(tiny_pair, teacher_template="Solve this: {problem} Answer:")
    assert tb.prompt_len != batch.prompt_len
    two, _, _, g2 = _run(tiny_pair, cfg, batch, tb, fused=False)
    one, _, _, g1 = _run(tiny_pair, cfg, batch, tb, fused=True)
    scale = max(float(g.abs().max()) for g in g2.values())
    for name in g2:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5 * scale, rtol=0, msg=name)
    _assert_scores(one.teacher, two.teacher)


def test_rescorer_gives_the_log_probs_score_would(tiny_pair):
    """Log-probs at ids chosen after the pass (K weight rows per position) equal a pass given those ids."""
    student_dir, teacher_dir, _ = tiny_pair
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    batch, _ = _batch(tiny_pair)
    ids, am, rm = batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T
    out, rescorer = score_rescorable(teacher, ids, am, rm, top_k=5, temperature=0.8, chunk_size=4)
    ref_plain = score(teacher, ids, am, rm, top_k=5, temperature=0.8, chunk_size=4)
    _assert_scores(out, ref_plain)
    g = torch.Generator().manual_seed(0)
    V = teacher.get_output_embeddings().weight.shape[0]
    later_B_T_K = torch.randint(0, V, (*ids.shape, 6), generator=g) * rm[..., None].long()
    ref = score(teacher, ids, am, rm, given_ids_B_T_K=later_B_T_K, temperature=0.8, chunk_size=4)
    torch.testing.assert_close(rescorer.given(later_B_T_K), ref.given_logp_B_T_K, atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="ids_B_T_K"):
        rescorer.given(later_B_T_K + V)
    rows, cols = rm.nonzero(as_tuple=True)
    pick = torch.arange(0, rows.numel(), 3)  # some entries, out of order of the full pass
    at = (rows[pick].flip(0), cols[pick].flip(0))
    torch.testing.assert_close(
        rescorer.given_at(*at, later_B_T_K[at]), ref.given_logp_B_T_K[at], atol=2e-6, rtol=0
    )
    with pytest.raises(ValueError, match="rows_n/cols_n: 1 of 1 positions were not scored"):
        rescorer.given_at(torch.tensor([0]), torch.tensor([0]), later_B_T_K[0, :1])
    # kept rows without a head pass: score's values at any chunk of positions (to float rounding)
    rows = keep_rows(teacher, ids, am, rm, temperature=0.8, chunk_size=4)
    full = score(teacher, ids, am, rm, top_k=5, given_ids_B_T_K=later_B_T_K, temperature=0.8, chunk_size=4)
    tok_n, ids_n_K, lp_n_K, given_n_K, ent_n = rows.scores_at(*at, ids[at], later_B_T_K[at], 5)
    assert torch.equal(ids_n_K, full.topk_ids_B_T_K[at])
    for got, want in (
        (tok_n, full.token_logp_B_T),
        (lp_n_K, full.topk_logp_B_T_K),
        (given_n_K, full.given_logp_B_T_K),
        (ent_n, full.entropy_B_T),
    ):
        torch.testing.assert_close(got, want[at], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="kept by keep_rows"):
        rows.given_at(*at, later_B_T_K[at])


def test_full_vocab_fused_gradient_equals_autograd_through_the_pair(tiny_pair):
    """The chunk-by-chunk backward of full_vocab_fused is the gradient of Σ w·div of full_vocab_pair."""
    student_dir, teacher_dir, _ = tiny_pair
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    batch, _ = _batch(tiny_pair)
    ids, am, rm = batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T
    w_B_T = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) * rm

    def kl(zs, zt):  # of logits: full_vocab_pair's contract
        ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
        return (ls.exp() * (ls - lt)).sum(-1)

    def kl_of_logp(ls, lt):  # of log-probs: full_vocab_fused's contract (no log_softmax, so logits fail)
        return (ls.exp() * (ls - lt)).sum(-1)

    grads, divs = [], []
    for fused in (False, True):
        student = AutoModelForCausalLM.from_pretrained(student_dir)
        if fused:
            div, s_out, t_out = full_vocab_fused(
                student, teacher, ids, am, rm, kl_of_logp, w_B_T, top_k=3, chunk_size=5
            )
            assert not div.requires_grad and s_out.topk_ids_B_T_K.shape[-1] == 3
            torch.testing.assert_close(s_out.token_logp_B_T, score(student, ids, am, rm).token_logp_B_T)
            torch.testing.assert_close(
                t_out.given_logp_B_T_K,
                score(teacher, ids, am, rm, given_ids_B_T_K=s_out.topk_ids_B_T_K).given_logp_B_T_K,
            )
        else:
            div = full_vocab_pair(student, teacher, ids, am, rm, kl, chunk_size=5, grad=True)
            (div * w_B_T).sum().backward()
        divs.append(div.detach())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    torch.testing.assert_close(divs[1], divs[0], atol=1e-6, rtol=0)
    assert set(grads[0]) == set(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("temperature, vocab_limit", [(1.0, None), (0.7, 200)])
def test_score_backward_gradient_equals_autograd_through_score(tiny_pair, temperature, vocab_limit):
    """score_backward's closed-form chunk gradient (scatter(g) − Σg·p through the head, then the hidden rows
    through the backbone) is autograd's gradient of the same loss through score(grad=True), with token,
    top-k (fewer gradient columns than top_k) and given log-probs in it and ids shared between them."""
    student_dir, _, _ = tiny_pair
    batch, _ = _batch(tiny_pair)
    ids, am, rm = batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T
    if vocab_limit:
        ids = ids.clamp(max=vocab_limit - 1)  # every scored token inside the limited vocabulary
    g = torch.Generator().manual_seed(3)
    V = (
        vocab_limit
        or AutoModelForCausalLM.from_pretrained(student_dir).get_output_embeddings().weight.shape[0]
    )
    given_B_T_K = torch.randint(0, V, (*ids.shape, 3), generator=g) * rm[..., None].long()
    given_B_T_K[..., 0] = ids * rm.long()  # a given id equal to the scored token
    a_B_T, b_B_T_K, c_B_T_K = (
        torch.randn(shape, generator=g) for shape in (ids.shape, (*ids.shape, 2), (*ids.shape, 3))
    )
    kw = dict(
        temperature=temperature, vocab_limit=vocab_limit, top_k=4, given_ids_B_T_K=given_B_T_K, chunk_size=5
    )

    ref_model = AutoModelForCausalLM.from_pretrained(student_dir)
    ref = score(ref_model, ids, am, rm, grad=True, **kw)
    loss = (a_B_T * ref.token_logp_B_T).sum() + (b_B_T_K * ref.topk_logp_B_T_K[..., :2]).sum()
    loss = loss + (c_B_T_K * ref.given_logp_B_T_K).sum()
    loss.backward()

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    seen = []

    def chunk_loss(c):
        seen.append(c.rows_n.numel())
        at = (c.rows_n, c.tgt_n)
        assert torch.equal(c.topk_ids_n_K, ref.topk_ids_B_T_K[at])
        for got, want in (
            (c.token_logp_n, ref.token_logp_B_T),
            (c.topk_logp_n_K, ref.topk_logp_B_T_K),
            (c.given_logp_n_K, ref.given_logp_B_T_K),
            (c.entropy_n, ref.entropy_B_T),
        ):  # the chunk's scores are the ones score gives at its positions
            torch.testing.assert_close(got, want.detach()[at], atol=1e-5, rtol=1e-5)
        assert torch.equal(c.given_ids_n_K, given_B_T_K[at])
        return a_B_T[at], b_B_T_K[at], c_B_T_K[at]

    out = score_backward(model, ids, am, rm, chunk_loss, **kw)
    assert seen and max(seen) <= 5 and sum(seen) == int(rm.sum())
    _assert_scores(
        out, ScoreOutput(**{f: _detach(getattr(ref, f)) for f in ScoreOutput.__dataclass_fields__})
    )
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads) and grads
    scale = max(float(x.abs().max()) for x in ref_grads.values())
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5 * scale, rtol=0, msg=n)


def _detach(x):
    return None if x is None else x.detach()
