"""Word-level KD (opd kd): the loss and its gradient against a brute-force reference, learning, resume,
budget, the SFT-data source and the CLI."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.cli import main as cli_main
from opd.errors import ConfigError
from opd.methods import kd
from opd.methods.kd import KDConfig
from opd.models import load_model, load_tokenizer
from opd.scoring import PolicyScorer, left_pad_position_ids
from opd.teacher_data import ForcedSequence, collate, write_sequences
from opd.tracking import read_metrics


def make_cfg(tiny_pair, tmp_path, **kw) -> KDConfig:
    """KD of the tiny student toward the tiny teacher on the prompts' ``answer`` field as gold text."""
    student, teacher, prompts = tiny_pair
    base = dict(
        student=str(student),
        teacher=str(teacher),
        prompts=str(prompts),
        response_field="answer",
        output_dir=str(tmp_path / "run"),
        steps=2,
        batch_size=4,
        micro_batch_size=3,
        max_new_tokens=16,
        lr=1e-3,
        weight_decay=0.0,
        progress=False,
        seed=0,
    )
    base.update(kw)
    return KDConfig(**base)


def weights(path):
    m = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.clone() for k, v in m.state_dict().items()}


def changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def _sequences(tok):
    texts = [("What is 1 + 2?", "1+2=3 so 3"), ("Hi", "12"), ("Add 4 and 5, please.", "9!")]
    return [
        ForcedSequence(i, p, tok(p)["input_ids"], r, tok(r)["input_ids"] + [258])
        for i, (p, r) in enumerate(texts)
    ]


# --------------------------------------------------------------------------- the objective


def brute_force_kd(student, teacher, batch, tau):
    """τ² · mean over response positions of Σ_v q(v)(log q(v) − log p(v)), written from the definition:
    full logits of each model, softmax at τ, an explicit loop over the vocabulary."""
    ids, attn = batch.input_ids_B_T, batch.attention_mask_B_T
    pos = left_pad_position_ids(attn)
    s_logits = student(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    total, n = 0.0, 0
    B, T = ids.shape
    for b in range(B):
        for t in range(1, T):
            if batch.response_mask_B_T[b, t] == 0:
                continue
            p = torch.softmax(s_logits[b, t - 1].double() / tau, -1)
            q = torch.softmax(t_logits[b, t - 1].double() / tau, -1)
            kl = sum(q[v] * (torch.log(q[v]) - torch.log(p[v])) for v in range(q.shape[0]))
            total = total + kl
            n += 1
    return tau**2 * total / n


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_loss_and_gradient_match_brute_force(tiny_pair, tau):
    tok = load_tokenizer(str(tiny_pair[0]))
    batch = collate(_sequences(tok), pad_id=256)
    teacher = load_model(str(tiny_pair[1]), dtype="float32")
    student_a = load_model(str(tiny_pair[0]), dtype="float32")
    student_b = load_model(str(tiny_pair[0]), dtype="float32")

    n = float(batch.response_mask_B_T.sum())
    loss, kl_sum = kd.kd_loss(PolicyScorer(student_a, temperature=tau, chunk_size=5), teacher, batch, n)
    loss.backward()
    ref = brute_force_kd(student_b, teacher, batch, tau)
    ref.backward()

    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert kl_sum / n * tau**2 == pytest.approx(loss.item(), rel=1e-6)
    for (name, pa), pb in zip(student_a.named_parameters(), student_b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad.float(), atol=1e-6, rtol=1e-4), name
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never differentiated


def test_zero_loss_and_gradient_when_student_is_teacher(tiny_pair):
    tok = load_tokenizer(str(tiny_pair[0]))
    batch = collate(_sequences(tok), pad_id=256)
    student = load_model(str(tiny_pair[0]), dtype="float32")
    twin = load_model(str(tiny_pair[0]), dtype="float32")
    loss, _ = kd.kd_loss(
        PolicyScorer(student, temperature=2.0), twin, batch, float(batch.response_mask_B_T.sum())
    )
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-6


def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_pair):
    tok = load_tokenizer(str(tiny_pair[0]))
    teacher = load_model(str(tiny_pair[1]), dtype="float32")
    grads = []
    for mbs in (1, 3):
        model = load_model(str(tiny_pair[0]), dtype="float32")
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        kd.kd_step(
            PolicyScorer(model),
            teacher,
            _sequences(tok),
            opt,
            pad_id=256,
            micro_batch_size=mbs,
            grad_clip=0,
            device="cpu",
        )
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# --------------------------------------------------------------------------- runs


def test_kd_learns_kl_to_teacher_goes_down(tiny_pair, tmp_path):
    # all 15 prompts in every step: each step's kl/forward is measured on the same sequences
    summary = kd.train(make_cfg(tiny_pair, tmp_path, steps=8, batch_size=15, micro_batch_size=8, lr=3e-3))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["kl/forward"] < 0.8 * rows[0]["kl/forward"], [r["kl/forward"] for r in rows]
    for r in rows:
        assert math.isfinite(r["loss/kd"]) and r["loss/kd"] == pytest.approx(
            r["kl/forward"], rel=1e-5
        )  # τ = 1
    assert changed(weights(tiny_pair[0]), weights(summary["final_model"]))
    c = rows[0]
    assert (
        c["cost/teacher_forward_tokens"] == c["cost/student_train_tokens"] > c["cost/student_loss_tokens"] > 0
    )
    assert summary["sequences"]["count"] == 15


def test_resume_equals_uninterrupted_run(tiny_pair, tmp_path, monkeypatch):
    ref = kd.train(make_cfg(tiny_pair, tmp_path / "a", steps=6, save_every=2))
    real_step = kd.kd_step
    calls = {"n": 0}

    def dying_step(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kw)

    monkeypatch.setattr(kd, "kd_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        kd.train(make_cfg(tiny_pair, tmp_path / "b", steps=6, save_every=2))
    monkeypatch.undo()
    res = kd.train(make_cfg(tiny_pair, tmp_path / "b", steps=6, save_every=2, resume=True))
    assert not changed(weights(ref["final_model"]), weights(res["final_model"]))
    assert res["cost"] == ref["cost"]
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_budget_stops_the_run(tiny_pair, tmp_path):
    kd.train(make_cfg(tiny_pair, tmp_path / "a", steps=4))
    budget = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")[1]["cost/flops"]
    res = kd.train(make_cfg(tiny_pair, tmp_path / "b", steps=4, budget_unit="flops", budget=budget))
    assert res["stopped_by_budget"] == 2 and res["cost"]["cost/flops"] == budget


def test_distils_on_sft_teacher_data(tiny_pair, tmp_path):
    tok = load_tokenizer(str(tiny_pair[0]))
    data = tmp_path / "teacher_data.jsonl"
    write_sequences(data, _sequences(tok), {"counts": {}})
    res = kd.train(make_cfg(tiny_pair, tmp_path, prompts="", response_field="", sft_data=str(data)))
    assert res["sequences"] == {"source": str(data), "count": 3} and res["steps_done"] == 2


def test_missing_response_field_names_the_row(tiny_pair, tmp_path):
    with pytest.raises(ValueError, match="response_field='solution'.*fields of that row: answer, question"):
        kd.train(make_cfg(tiny_pair, tmp_path, response_field="solution"))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(kd_temperature=0.0), "kd_temperature"),
        (dict(response_field="a", sft_data="x.jsonl"), "choose one source"),
        (dict(sft_data="x.jsonl", prompts="lab:train"), "leave prompts empty"),
        (dict(score_chunk_size=0), "score_chunk_size"),
        (dict(stop_on_alert=True), "stop_on_alert"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        KDConfig(**kw)


def test_no_sequence_source_names_the_fix():
    with pytest.raises(ConfigError, match="response_field=FIELD"):
        KDConfig(student="s", teacher="t", prompts="p").check_runnable()


def test_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit):
        cli_main(["kd", "--help"])
    out = capsys.readouterr().out
    for key in ("kd_temperature", "response_field", "sft_data", "score_chunk_size", "batch_size"):
        assert key in out
