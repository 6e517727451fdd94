"""Integration tests through ``opd.train()`` that fail when training goes the wrong way.

- Direction: three OPD steps from ``lab:student`` toward ``lab:teacher-a-plus`` lower the reverse KL to
  the teacher on a fixed set of prefixes the loop never trains on (the reference solutions of the
  training prompts; the loop trains on the student's own samples), in every objective mode and for every
  top-K support. The KL is measured here, independently of the training loop: a plain forward of both
  models, ``log_softmax`` and ``Σ_v p (log p − log q)`` at the response positions. Negating the
  advantages makes every case fail (the student moves away from the teacher).
- The configured ``estimator`` only changes what is logged: k3 trains exactly like k1.
- Micro-batch accumulation: the gradient of one step is the same for every ``micro_batch_size``, for
  each ``loss_aggregation`` and objective mode.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.config import OPDConfig
from opd.lab import lab_tokenizer, prompt_rows, resolve
from opd.lab.train import encode_example
from opd.methods import opd as opd_method
from opd.objectives import AGGREGATIONS, SUPPORTS


def _train_rows():
    rows = prompt_rows("train")
    return rows[:8] + rows[-8:]  # 8 easy and 8 hard problems


@pytest.fixture(scope="module")
def lab_prompts(tmp_path_factory):
    """The training prompts (a small file, fast to load)."""
    path = tmp_path_factory.mktemp("lab") / "train.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in _train_rows())
    )
    return path


@pytest.fixture(scope="module")
def held_out():
    """Fixed prefixes: the training prompts with their pattern-A reference solutions, right-padded."""
    tok = lab_tokenizer()
    encoded = [encode_example(tok, r["prompt"], r["solution_a"]) for r in _train_rows()]
    T = max(len(ids) for ids, _ in encoded)
    ids_B_T = torch.full((len(encoded), T), tok.pad_token_id)
    attn_B_T = torch.zeros(len(encoded), T, dtype=torch.long)
    resp_B_T = torch.zeros(len(encoded), T, dtype=torch.bool)
    for b, (ids, prompt_len) in enumerate(encoded):
        ids_B_T[b, : len(ids)] = torch.tensor(ids)
        attn_B_T[b, : len(ids)] = 1
        resp_B_T[b, prompt_len : len(ids)] = True
    return ids_B_T, attn_B_T, resp_B_T


def reverse_kl(student_path, held_out) -> float:
    """Mean over held-out response tokens of KL(p_t ‖ q_t), teacher = lab:teacher-a-plus (plain forward)."""
    ids, attn, resp = held_out
    student = AutoModelForCausalLM.from_pretrained(student_path).float().eval()
    teacher = (
        AutoModelForCausalLM.from_pretrained(resolve("lab:teacher-a-plus").require_built()).float().eval()
    )
    with torch.no_grad():
        logp = torch.log_softmax(student(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
        logq = torch.log_softmax(teacher(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    kl_B_T = (logp.exp() * (logp - logq)).sum(-1)
    at = resp[:, 1:]  # logits at t − 1 predict token t
    return float(kl_B_T[at].mean())


@pytest.fixture(scope="module")
def kl_before(held_out):
    return reverse_kl(resolve("lab:student").require_built(), held_out)


def lab_cfg(lab_prompts, out, **kw):
    base = dict(
        student="lab:student",
        teacher="lab:teacher-a-plus",
        prompts=str(lab_prompts),
        output_dir=str(out),
        steps=3,
        prompts_per_step=16,
        rollouts_per_prompt=4,
        max_new_tokens=36,
        micro_batch_size=64,
        lr=1e-4,
        weight_decay=0.0,
        alerts=False,
        progress=False,
        seed=0,
    )
    base.update(kw)
    return OPDConfig(**base)


DIRECTION_CASES = [
    dict(objective="sampled"),
    dict(objective="full"),
    dict(objective="topk", support_size=4, renormalize=True),
] + [dict(objective="topk", support_size=4, support=s) for s in SUPPORTS]


@pytest.mark.parametrize("kw", DIRECTION_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_opd_lowers_the_reverse_kl_to_the_teacher_on_held_out_prefixes(
    lab_prompts, held_out, kl_before, tmp_path, kw
):
    summary = opd_method.train(lab_cfg(lab_prompts, tmp_path / "run", **kw))
    kl_after = reverse_kl(summary["final_model"], held_out)
    assert kl_after < 0.95 * kl_before, (kw, kl_before, kl_after)


def test_estimator_only_changes_what_is_logged(tiny_pair, tmp_path):
    """estimator=k3 trains exactly like k1 (the advantage is always the k1 log-ratio)."""
    student, teacher, prompts = tiny_pair
    runs = {}
    for est in ("k1", "k3"):
        cfg = OPDConfig(
            student=str(student),
            teacher=str(teacher),
            prompts=str(prompts),
            output_dir=str(tmp_path / est),
            steps=2,
            prompts_per_step=2,
            rollouts_per_prompt=2,
            max_new_tokens=6,
            objective="sampled",
            estimator=est,
            lr=1e-3,
            alerts=False,
            progress=False,
            seed=0,
        )
        summary = opd_method.train(cfg)
        runs[est] = (
            AutoModelForCausalLM.from_pretrained(summary["final_model"]).state_dict(),
            summary["last"],
        )
    (w1, last1), (w3, last3) = runs["k1"], runs["k3"]
    w0 = AutoModelForCausalLM.from_pretrained(student).state_dict()
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)  # it trained
    assert all(torch.equal(w1[k], w3[k]) for k in w1)
    assert last1["loss/pg"] == last3["loss/pg"] and last1["kl/sampled"] == last3["kl/sampled"]
    assert last3["reward/mean"] <= 0 and last3["reward/mean"] != last1["reward/mean"]  # k3 values are ≤ 0


# --------------------------------------------------------------------------- micro-batch accumulation


class _RecordingSGD(torch.optim.SGD):
    """Stands in for AdamW: records the (accumulated) gradients it is asked to apply."""

    grads: list[list[torch.Tensor]] = []

    def __init__(self, params, lr, betas=None, weight_decay=0.0):
        super().__init__(params, lr=lr)

    def step(self, closure=None):
        _RecordingSGD.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


@pytest.mark.parametrize("objective", ["sampled", "topk", "full"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradient_is_the_same_for_every_micro_batch_size(
    tiny_pair, tmp_path, monkeypatch, aggregation, objective
):
    student, teacher, prompts = tiny_pair
    monkeypatch.setattr(torch.optim, "AdamW", _RecordingSGD)
    grads = {}
    for mbs in (1, 3, 6):
        _RecordingSGD.grads = []
        cfg = OPDConfig(
            student=str(student),
            teacher=str(teacher),
            prompts=str(prompts),
            output_dir=str(tmp_path / f"mbs{mbs}"),
            steps=1,
            prompts_per_step=3,
            rollouts_per_prompt=2,
            max_new_tokens=8,
            micro_batch_size=mbs,
            loss_aggregation=aggregation,
            objective=objective,
            support_size=4,
            grad_clip=0.0,  # clipping would hide a wrongly scaled gradient
            lr=1e-3,
            alerts=False,
            progress=False,
            seed=0,
        )
        opd_method.train(cfg)
        (grads[mbs],) = _RecordingSGD.grads
    for mbs in (3, 6):
        for a, b in zip(grads[1], grads[mbs]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (
                aggregation,
                objective,
                mbs,
                float((a - b).abs().max()),
            )
    assert max(float(g.abs().max()) for g in grads[1]) > 1e-4  # a real gradient, not zeros
