"""No wasted vocabulary work: scoring projects only response positions through the V-wide head, and HF
generation's prefill projects only the last prompt position (transformers' ``logits_to_keep``)."""

from __future__ import annotations

import pytest
import torch
from opd_configs import make_cfg
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.data import load_prompts
from opd.methods.opd_scoring import fused_update
from opd.rollout import make_backend
from opd.scoring import PolicyScorer, check_head_path, full_vocab_fused, score
from opd.scoring.head import Head


@pytest.fixture
def pair_and_batch(tiny_pair):
    student_dir, teacher_dir, prompts = tiny_pair
    tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ps = load_prompts(prompts, tok, prompt_template="Q: {problem}\nA:", limit=3)
    batch = make_backend("hf", student.eval(), tok).generate(
        [e.input_ids for e in ps.examples], n=2, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, seed=1
    )
    for m in (student, teacher):
        check_head_path(m)  # its one-time 4-token probe through the model's own forward, done up front
    return student, teacher, tok, batch


class HeadRows:
    """Rows each model's head projects: ``Head.logits`` (V columns) and ``Head.logits_at`` (K columns), and
    calls of the model's own ``lm_head`` module (its full forward, which would project every position)."""

    def __init__(self, monkeypatch, models):
        self.full = {id(m.get_output_embeddings()): 0 for m in models}
        self.at = dict(self.full)
        self.module_calls = 0
        real_logits, real_at = Head.logits, Head.logits_at

        def logits(head, hidden_N_H):
            self.full[id(head.lm_head)] += hidden_N_H.shape[0]
            return real_logits(head, hidden_N_H)

        def logits_at(head, hidden_N_H, ids_N_K):
            self.at[id(head.lm_head)] += hidden_N_H.shape[0]
            return real_at(head, hidden_N_H, ids_N_K)

        monkeypatch.setattr(Head, "logits", logits)
        monkeypatch.setattr(Head, "logits_at", logits_at)
        for m in models:
            m.get_output_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.module_calls += 1

    def rows(self, model):
        return self.full[id(model.get_output_embeddings())]


def test_scoring_projects_only_response_positions(pair_and_batch, monkeypatch):
    student, teacher, _, batch = pair_and_batch
    ids, am, rm = batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T
    N = int(rm.sum())
    assert 0 < N < int(am.sum())  # prompts are longer than nothing: there is prompt work to skip
    count = HeadRows(monkeypatch, [student, teacher])
    with torch.no_grad():
        score(teacher, ids, am, rm, top_k=4, chunk_size=5)
    assert count.rows(teacher) == N
    w_B_T = rm.float()
    full_vocab_fused(student, teacher, ids, am, rm, lambda zs, zt: (zs - zt).pow(2).mean(-1), w_B_T, top_k=4)
    assert count.rows(student) == N and count.rows(teacher) == 2 * N  # each model's head once per position
    assert count.module_calls == 0  # never the model's own forward (all T positions through lm_head)


@pytest.mark.parametrize(
    "kw, student_heads, teacher_heads, teacher_rescored",
    [
        # top-K, student support: each head once (no recompute in backward: scoring.score_backward); the
        # teacher's head runs on each chunk's kept rows during the student's pass (scoring.teacher_rows)
        (dict(objective="topk", support_size=4), 1, 1, 0),
        # teacher-first support: the teacher's head once before; its log-probs at the student's top-K
        # from K weight rows per position
        (dict(objective="topk", support_size=4, support="union"), 1, 1, 1),
        # sampled token: as the student support
        (dict(objective="sampled"), 1, 1, 0),
        # full vocabulary: both heads once, no recompute
        (dict(objective="full"), 1, 1, 0),
    ],
    ids=["topk-student", "topk-union", "sampled", "full"],
)
def test_fused_step_head_work(
    pair_and_batch, monkeypatch, tiny_pair, tmp_path, kw, student_heads, teacher_heads, teacher_rescored
):
    student, teacher, _, batch = pair_and_batch
    N = int(batch.response_mask_B_T.sum())
    cfg = make_cfg(tiny_pair, tmp_path, **kw)
    s, t = PolicyScorer(student, chunk_size=cfg.score_chunk_size), PolicyScorer(teacher)
    count = HeadRows(monkeypatch, [student, teacher])
    fused_update(s, t, batch, torch.optim.SGD(student.parameters(), lr=0.0), cfg)
    assert count.rows(student) == student_heads * N
    assert count.rows(teacher) == teacher_heads * N
    assert count.at[id(teacher.get_output_embeddings())] == teacher_rescored * N
    assert count.module_calls == 0


def test_generation_prefill_projects_only_the_last_prompt_position(pair_and_batch):
    """HF ``generate`` (transformers 5) passes ``logits_to_keep=1``: the prefill's lm_head sees one
    position per row, not the whole prompt; so does every decoding step. The shared prefill of the
    distinct prompts (all but their last column) runs the decoder alone: no lm_head call at all."""
    student, _, tok, _ = pair_and_batch
    seen = []
    handle = student.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: seen.append(tuple(args[0].shape))
    )
    try:
        prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
        batch = make_backend("hf", student.eval(), tok).generate(
            prompts, n=2, max_new_tokens=5, temperature=1.0, top_p=1.0, top_k=0, seed=2
        )
    finally:
        handle.remove()
    assert seen and all(shape[:2] == (4, 1) for shape in seen), seen
    assert len(seen) == int(batch.response_lengths_B.max())  # one projection per generated position
