"""The teacher scores the student's response under its own prompt (``teacher_prompt_template`` /
``teacher_system_prompt``): prompts rendered twice, the responses re-laid after the teacher's prompt
(``relay_responses``), the teacher's outputs back in the student's layout, token for token."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from opd_configs import make_cfg
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.config import ConfigError
from opd.data import load_prompts
from opd.diagnose.config import DiagnoseConfig
from opd.diagnose.measure import score_rollouts
from opd.methods import opd as opd_method
from opd.methods.coldstart import ColdstartConfig
from opd.methods.opd_scoring import fused_update, score_batch
from opd.rollout import make_backend, relay_responses, shift_positions
from opd.scoring import PolicyScorer, ScoreOutput

STUDENT_T = "Q: {problem}\nA:"
TEACHER_T = "You are a careful calculator. Solve: {problem} Answer with the number only."


@pytest.fixture(scope="module")
def models(tiny_pair):
    student_dir, teacher_dir, _ = tiny_pair
    tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    return student, teacher, tok


def rollouts(models, prompts_path, n=2, **load_kw):
    """4 prompts x ``n`` student samples under ``STUDENT_T`` (seeded), and the prompt set."""
    student, _, tok = models
    ps = load_prompts(prompts_path, tok, prompt_template=STUDENT_T, limit=4, **load_kw)
    backend = make_backend("hf", student, tok)
    batch = backend.generate(
        [e.input_ids for e in ps.examples], n=n, max_new_tokens=7, temperature=1.0, top_p=1.0, top_k=0, seed=3
    )
    return ps, batch


def teacher_batch_of(ps, batch):
    return relay_responses(batch, [ps.examples[int(p)].teacher_input_ids for p in batch.prompt_index_B])


def scorers(models, cfg):
    student, teacher, _ = models
    return (
        PolicyScorer(student, temperature=cfg.temperature, chunk_size=cfg.score_chunk_size),
        PolicyScorer(teacher, temperature=cfg.teacher_temperature, chunk_size=cfg.score_chunk_size),
    )


def assert_scores_equal(a: ScoreOutput, b: ScoreOutput):
    for f in dataclasses.fields(ScoreOutput):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (x is None) == (y is None), f.name
        if x is not None:
            assert torch.equal(x, y), f.name


# ------------------------------------------------------------------------------------------ prompts


def test_prompts_are_rendered_twice_only_when_a_teacher_key_is_set(tiny_pair, models):
    _, _, tok = models
    path = tiny_pair[2]
    plain = load_prompts(path, tok, prompt_template=STUDENT_T)
    assert all(e.teacher_input_ids is None for e in plain.examples)

    both = load_prompts(path, tok, prompt_template=STUDENT_T, teacher_prompt_template=TEACHER_T)
    as_teacher = load_prompts(path, tok, prompt_template=TEACHER_T)
    assert [e.input_ids for e in both.examples] == [e.input_ids for e in plain.examples]
    assert [e.teacher_input_ids for e in both.examples] == [e.input_ids for e in as_teacher.examples]

    # a teacher system prompt alone: the student's template, plus a system message only the teacher sees
    sys = load_prompts(path, tok, prompt_template=STUDENT_T, teacher_system_prompt="Be exact.")
    with_sys = load_prompts(path, tok, prompt_template=STUDENT_T, system_prompt="Be exact.")
    assert [e.input_ids for e in sys.examples] == [e.input_ids for e in plain.examples]
    assert [e.teacher_input_ids for e in sys.examples] == [e.input_ids for e in with_sys.examples]

    # each teacher key left None falls back to the student's setting
    kept = load_prompts(path, tok, system_prompt="Be exact.", teacher_prompt_template=TEACHER_T)
    want = load_prompts(path, tok, system_prompt="Be exact.", prompt_template=TEACHER_T)
    assert [e.teacher_input_ids for e in kept.examples] == [e.input_ids for e in want.examples]

    # the length cap applies to both renderings (here the teacher's is the longer one)
    t_cap = max(len(e.input_ids) for e in as_teacher.examples)
    assert t_cap > max(len(e.input_ids) for e in plain.examples)
    kw = dict(prompt_template=STUDENT_T, teacher_prompt_template=TEACHER_T)
    assert len(load_prompts(path, tok, max_prompt_tokens=t_cap, **kw)) == len(plain)
    with pytest.raises(ValueError, match="no prompts left"):
        load_prompts(path, tok, max_prompt_tokens=t_cap - 1, **kw)


def test_teacher_prompt_errors_name_the_key_and_the_fix(tiny_pair, tmp_path, models):
    _, _, tok = models
    with pytest.raises(ValueError, match="teacher_system_prompt is set but use_chat_template=False"):
        load_prompts(tiny_pair[2], tok, use_chat_template=False, teacher_system_prompt="x")
    with pytest.raises(ValueError, match="has no placeholder"):
        load_prompts(tiny_pair[2], tok, teacher_prompt_template="no placeholder here")
    with pytest.raises(ConfigError, match="objective=full with teacher_prompt_template"):
        make_cfg(tiny_pair, tmp_path, objective="full", teacher_prompt_template=TEACHER_T)
    with pytest.raises(ConfigError, match="teacher_system_prompt is set but use_chat_template=false"):
        make_cfg(tiny_pair, tmp_path, use_chat_template=False, teacher_system_prompt="x")
    with pytest.raises(ConfigError, match="opd coldstart does not support them"):
        ColdstartConfig(teacher_prompt_template=TEACHER_T)
    with pytest.raises(ConfigError, match="teacher_system_prompt is set but use_chat_template=false"):
        DiagnoseConfig(use_chat_template=False, teacher_system_prompt="x")


# ------------------------------------------------------------------------------------------ layout


def test_relay_keeps_every_response_token_in_place(tiny_pair, models):
    ps, batch = rollouts(models, tiny_pair[2], teacher_prompt_template=TEACHER_T)
    tb = teacher_batch_of(ps, batch)
    P, P2 = batch.prompt_len, tb.prompt_len
    assert P2 > P and tb.input_ids_B_T.shape[1] - P2 == batch.input_ids_B_T.shape[1] - P
    assert torch.equal(tb.input_ids_B_T[:, P2:], batch.input_ids_B_T[:, P:])
    assert torch.equal(tb.response_mask_B_T[:, P2:], batch.response_mask_B_T[:, P:])
    assert tb.response_mask_B_T[:, :P2].sum() == 0
    for b in range(batch.input_ids_B_T.shape[0]):
        tp = ps.examples[int(batch.prompt_index_B[b])].teacher_input_ids
        assert tb.input_ids_B_T[b, P2 - len(tp) : P2].tolist() == tp
        assert tb.attention_mask_B_T[b, : P2 - len(tp)].sum() == 0  # left padding
        assert torch.equal(
            tb.input_ids_B_T[b][tb.response_mask_B_T[b] > 0],
            batch.input_ids_B_T[b][batch.response_mask_B_T[b] > 0],
        )
    # shift_positions maps the response part across and back
    x = torch.randn(*batch.input_ids_B_T.shape, 3) * batch.response_mask_B_T[..., None]
    assert torch.equal(shift_positions(shift_positions(x, P, P2), P2, P), x)
    # identical prompts: the very same batch
    same = relay_responses(batch, [ps.examples[int(p)].input_ids for p in batch.prompt_index_B])
    for f in ("input_ids_B_T", "attention_mask_B_T", "response_mask_B_T"):
        assert torch.equal(getattr(same, f), getattr(batch, f))
    with pytest.raises(ValueError, match="pass one prompt per row"):
        relay_responses(batch, [[1, 2]])


# ------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize(
    "kw",
    [dict(objective="sampled"), dict(objective="topk", support_size=4, support="union")],
    ids=["sampled", "topk-union"],
)
def test_same_prompt_scores_bit_identically(tiny_pair, tmp_path, models, kw):
    """The teacher's template equal to the student's: the relayed batch scores exactly as today's path."""
    ps, batch = rollouts(models, tiny_pair[2], teacher_prompt_template=STUDENT_T)
    cfg = make_cfg(tiny_pair, tmp_path, micro_batch_size=3, **kw)
    s, t = scorers(models, cfg)
    today, _ = score_batch(s, t, batch, cfg)
    relaid, _ = score_batch(s, t, batch, cfg, teacher_batch=teacher_batch_of(ps, batch))
    assert_scores_equal(today.teacher, relaid.teacher)
    assert_scores_equal(today.student, relaid.student)
    assert torch.equal(today.advantages, relaid.advantages)
    assert torch.equal(today.token_reward_B_T, relaid.token_reward_B_T)


def test_teacher_scores_equal_a_direct_forward_of_its_prompt_and_the_response(tiny_pair, tmp_path, models):
    """Brute force: teacher(teacher_prompt + response), one unpadded row at a time, read off at each response
    token; the scoring pass (micro-batched, left-padded, re-laid) must give the same per-token log-probs,
    log-probs at the student's top-K ids and entropy, at the student's response positions."""
    student, teacher, _ = models
    ps, batch = rollouts(models, tiny_pair[2], teacher_prompt_template=TEACHER_T)
    cfg = make_cfg(tiny_pair, tmp_path, micro_batch_size=3, objective="topk", support_size=4)
    s, t = scorers(models, cfg)
    scored, _ = score_batch(s, t, batch, cfg, teacher_batch=teacher_batch_of(ps, batch))
    today, _ = score_batch(s, t, batch, cfg)
    P = batch.prompt_len
    mask = batch.response_mask_B_T
    assert not torch.allclose(scored.teacher.token_logp_B_T, today.teacher.token_logp_B_T)  # it matters
    assert torch.equal(scored.teacher.token_logp_B_T * (1 - mask), torch.zeros_like(mask))
    K = scored.student.topk_ids_B_T_K.shape[-1]
    for b in range(batch.input_ids_B_T.shape[0]):
        tp = ps.examples[int(batch.prompt_index_B[b])].teacher_input_ids
        resp = batch.input_ids_B_T[b][mask[b] > 0].tolist()
        with torch.no_grad():
            logits = teacher(torch.tensor([tp + resp])).logits[0].float()
        logp = torch.log_softmax(logits / cfg.teacher_temperature, -1)
        for j, token in enumerate(resp):
            row = logp[len(tp) + j - 1]  # the logits before token j predict it
            got = scored.teacher
            assert got.token_logp_B_T[b, P + j].item() == pytest.approx(row[token].item(), abs=1e-5)
            ids = scored.student.topk_ids_B_T_K[b, P + j]
            torch.testing.assert_close(got.given_logp_B_T_K[b, P + j], row[ids], atol=1e-5, rtol=0)
            torch.testing.assert_close(got.topk_logp_B_T_K[b, P + j], row.topk(K).values, atol=1e-5, rtol=0)
            entropy = -(row.exp() * row).sum()
            assert got.entropy_B_T[b, P + j].item() == pytest.approx(entropy.item(), abs=1e-5)
        # the student is still scored under its own prompt
        assert torch.equal(scored.student.token_logp_B_T[b], today.student.token_logp_B_T[b])


def test_fused_update_scores_the_teacher_as_score_batch(tiny_pair, tmp_path, models):
    student_dir = tiny_pair[0]
    ps, batch = rollouts(models, tiny_pair[2], teacher_prompt_template=TEACHER_T)
    tb = teacher_batch_of(ps, batch)
    cfg = make_cfg(tiny_pair, tmp_path, micro_batch_size=3, objective="topk", support_size=4)
    s, t = scorers(models, cfg)
    two, _ = score_batch(s, t, batch, cfg, teacher_batch=tb)
    fresh = AutoModelForCausalLM.from_pretrained(student_dir)  # fused_update steps the student: a copy
    s2 = PolicyScorer(fresh, temperature=cfg.temperature, chunk_size=cfg.score_chunk_size)
    opt = torch.optim.SGD(fresh.parameters(), lr=0.0)
    one, *_ = fused_update(s2, t, batch, opt, cfg, teacher_batch=tb)
    for f in ("token_logp_B_T", "given_logp_B_T_K", "topk_logp_B_T_K", "entropy_B_T"):
        torch.testing.assert_close(getattr(one.teacher, f), getattr(two.teacher, f), atol=1e-6, rtol=0)
    torch.testing.assert_close(one.token_reward_B_T, two.token_reward_B_T, atol=1e-6, rtol=0)


def test_diagnose_scores_the_teacher_under_its_prompt(tiny_pair, tmp_path, models):
    student, teacher, _ = models
    ps, batch = rollouts(models, tiny_pair[2], teacher_prompt_template=TEACHER_T)
    tb = teacher_batch_of(ps, batch)
    cfg = make_cfg(tiny_pair, tmp_path, objective="topk", support_size=16, micro_batch_size=3)
    s, t = scorers(models, cfg)
    scored, _ = score_batch(s, t, batch, cfg, teacher_batch=tb)
    dcfg = DiagnoseConfig(batch_size=3, metrics_top_k=16, progress=False)
    s_out, t_out = score_rollouts(student, teacher, batch, dcfg, vocab_limit=None, teacher_batch=tb)
    assert_scores_equal(t_out, scored.teacher)


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-pass"])
def test_training_with_the_teacher_prompt(tiny_pair, tmp_path, fused):
    """Equal templates: the very same run as without the key; a different one: a different run that learns."""
    kw = dict(objective="topk", support_size=4, fused_update=fused, prompt_template=STUDENT_T)
    base = opd_method.train(make_cfg(tiny_pair, tmp_path / "base", **kw))
    same = opd_method.train(make_cfg(tiny_pair, tmp_path / "same", teacher_prompt_template=STUDENT_T, **kw))
    other = opd_method.train(make_cfg(tiny_pair, tmp_path / "other", teacher_prompt_template=TEACHER_T, **kw))
    wb, ws, wo = (load_weights(r["final_model"]) for r in (base, same, other))
    w0 = load_weights(tiny_pair[0])
    assert all(torch.equal(wb[k], ws[k]) for k in wb)
    assert any(not torch.equal(w0[k], wo[k]) for k in wo)  # learned
    assert any(not torch.equal(wb[k], wo[k]) for k in wo)  # toward a differently prompted teacher


def load_weights(path):
    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}
