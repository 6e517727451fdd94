"""GKD baseline (methods/gkd.py): the generalized JSD against a brute-force reference and autograd, the
streamed loss against the unstreamed one, λ choosing the data, fixed responses, learning on the lab,
exact resume, budget stop, --help and config errors."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.cli import build_parser
from opd.errors import ConfigError
from opd.methods import METHODS, gkd
from opd.objectives import full_vocab_divergence
from opd.rollout import fixed_batch
from opd.runtime import Runtime
from opd.scoring import PolicyScorer, full_vocab_pair
from opd.teacher_data import end_of_response_id
from opd.tracking import read_metrics

# --------------------------------------------------------------------------- the divergence


def brute_jsd(s_logits, t_logits, beta, tau=1.0):
    """Per-position JSD_β from the definition, loops over the vocabulary, float64 (TRL's endpoints)."""
    out = []
    for s_row, t_row in zip(s_logits, t_logits):
        p = torch.softmax(s_row.double() / tau, -1)
        q = torch.softmax(t_row.double() / tau, -1)
        V = p.shape[0]
        if beta == 0.0:  # forward KL(q‖p)
            out.append(sum(q[v] * (torch.log(q[v]) - torch.log(p[v])) for v in range(V)))
            continue
        if beta == 1.0:  # reverse KL(p‖q)
            out.append(sum(p[v] * (torch.log(p[v]) - torch.log(q[v])) for v in range(V)))
            continue
        m = [beta * q[v] + (1 - beta) * p[v] for v in range(V)]
        kl_qm = sum(q[v] * (torch.log(q[v]) - torch.log(m[v])) for v in range(V))
        kl_pm = sum(p[v] * (torch.log(p[v]) - torch.log(m[v])) for v in range(V))
        out.append(beta * kl_qm + (1 - beta) * kl_pm)
    return torch.stack(out)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_generalized_jsd_value_and_gradient_match_brute_force(beta, tau):
    g = torch.Generator().manual_seed(int(beta * 10) + int(tau * 100))
    s = (2 * torch.randn(5, 7, generator=g)).requires_grad_(True)
    t = 2 * torch.randn(5, 7, generator=g)
    got = full_vocab_divergence(s[None], t[None], torch.ones(1, 5), kind="jsd", beta=beta, temperature=tau)[0]
    s64 = s.detach().double().requires_grad_(True)
    ref = brute_jsd(s64, t, beta, tau)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    w = torch.arange(1.0, 6.0)
    (grad,) = torch.autograd.grad((got * w).sum(), s)
    (grad_ref,) = torch.autograd.grad((ref * w.double()).sum(), s64)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=1e-6)


def test_generalized_jsd_endpoints_and_properties():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 4, 9, generator=g), torch.randn(1, 4, 9, generator=g)
    ones = torch.ones(1, 4)
    fwd = full_vocab_divergence(s, t, ones, kind="forward_kl")
    rev = full_vocab_divergence(s, t, ones, kind="reverse_kl")
    torch.testing.assert_close(full_vocab_divergence(s, t, ones, kind="jsd", beta=0.0), fwd)
    torch.testing.assert_close(full_vocab_divergence(s, t, ones, kind="jsd", beta=1.0), rev)
    # the scaled limits: JSD_β/β → KL(q‖p) as β → 0 and JSD_β/(1−β) → KL(p‖q) as β → 1
    small = 1e-3
    torch.testing.assert_close(
        full_vocab_divergence(s, t, ones, kind="jsd", beta=small) / small, fwd, rtol=1e-2, atol=1e-4
    )
    torch.testing.assert_close(
        full_vocab_divergence(s, t, ones, kind="jsd", beta=1 - small) / small, rev, rtol=1e-2, atol=1e-4
    )
    jsd = full_vocab_divergence(s, t, ones, kind="jsd", beta=0.5)
    assert (jsd >= 0).all() and (jsd <= math.log(2) + 1e-6).all()
    assert full_vocab_divergence(s, s, ones, kind="jsd", beta=0.5).abs().max() < 1e-6  # zero at p == q
    masked = full_vocab_divergence(s, t, torch.tensor([[1, 0, 1, 0]]), kind="jsd", beta=0.5)
    assert masked[0, 1] == 0 and masked[0, 3] == 0
    with pytest.raises(ValueError, match="beta"):
        full_vocab_divergence(s, t, ones, kind="jsd", beta=1.5)


def test_streamed_loss_equals_the_unstreamed_one(tiny_pair):
    """full_vocab_pair with gkd.generalized_jsd (chunks of 3 positions, checkpointed) gives the value and
    gradient of the divergence computed on the models' whole logits."""
    student_dir, teacher_dir, _ = tiny_pair
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    batch = fixed_batch([[3, 4, 5, 6], [7, 8]], [[9, 10, 11, 2], [12, 13]], stop_ids=[2], pad_id=0)
    tau, beta = 0.9, 0.3
    div = full_vocab_pair(
        student,
        teacher,
        batch.input_ids_B_T,
        batch.attention_mask_B_T,
        batch.response_mask_B_T,
        gkd.generalized_jsd(beta),
        temperature=tau,
        teacher_temperature=tau,
        chunk_size=3,
        grad=True,
    )
    loss = (div * batch.response_mask_B_T).sum() / batch.response_mask_B_T.sum()
    grads = torch.autograd.grad(loss, list(student.parameters()))

    pos = (batch.attention_mask_B_T.cumsum(-1) - 1).clamp_min(0)
    kw = dict(attention_mask=batch.attention_mask_B_T, position_ids=pos)
    s_logits = student(batch.input_ids_B_T, **kw).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(batch.input_ids_B_T, **kw).logits[:, :-1]
    mask = batch.response_mask_B_T[:, 1:]
    ref = full_vocab_divergence(s_logits, t_logits, mask, kind="jsd", beta=beta, temperature=tau)
    torch.testing.assert_close(div[:, 1:], ref, rtol=1e-5, atol=1e-7)
    ref_loss = (ref * mask).sum() / mask.sum()
    ref_grads = torch.autograd.grad(ref_loss, list(student.parameters()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- data


def test_lambda_draw_is_per_step_and_has_rate_lambda():
    assert not any(gkd.on_policy_step(0, s, 0.0) for s in range(1, 500))
    assert all(gkd.on_policy_step(0, s, 1.0) for s in range(1, 500))
    rate = sum(gkd.on_policy_step(3, s, 0.3) for s in range(1, 4001)) / 4000
    assert abs(rate - 0.3) < 0.03
    assert [gkd.on_policy_step(1, s, 0.5) for s in range(10)] == [
        gkd.on_policy_step(1, s, 0.5) for s in range(10)
    ]


def test_fixed_responses_are_the_solution_then_end_of_turn(tmp_path):
    from opd.lab import prompt_rows
    from opd.methods.common import load_models, load_prompt_sets

    cfg = gkd.GKDConfig(
        student="lab:student",
        teacher="lab:teacher-a-plus",
        prompts="lab:test-easy",
        response_field="solution_a",
        max_new_tokens=64,
    )
    models = load_models(cfg, Runtime.from_config(cfg))
    prompts, _ = load_prompt_sets(cfg, models)
    fixed = gkd.load_fixed_responses(cfg, prompts, models.tokenizer)
    rows = prompt_rows("test-easy")
    ex = prompts.examples[5]
    assert rows[ex.meta["row"]]["prompt"] == ex.text  # the response is read from this prompt's own row
    assert models.tokenizer.decode(fixed[5]) == rows[ex.meta["row"]]["solution_a"] + "<|im_end|>"
    with pytest.raises(ConfigError, match="response_field='solution_c'"):
        gkd.load_fixed_responses(
            gkd.GKDConfig(**{**cfg.__dict__, "response_field": "solution_c"}), prompts, models.tokenizer
        )


def make_gkd_cfg(tiny_pair, tmp_path, **kw) -> gkd.GKDConfig:
    student, teacher, prompts = tiny_pair
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    with_responses = tmp_path / "with_responses.jsonl"
    with_responses.parent.mkdir(parents=True, exist_ok=True)
    with_responses.write_text(
        "".join(json.dumps({**r, "response": f"It is {r['answer']}."}) + "\n" for r in rows)
    )
    base = dict(
        student=str(student),
        teacher=str(teacher),
        prompts=str(with_responses),
        response_field="response",
        output_dir=str(tmp_path / "run"),
        steps=2,
        prompts_per_step=2,
        rollouts_per_prompt=2,
        max_new_tokens=6,
        micro_batch_size=3,
        lr=1e-2,
        weight_decay=0.0,
        progress=False,
        seed=0,
    )
    base.update(kw)
    return gkd.GKDConfig(**base)


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_lambda_chooses_fixed_or_on_policy_data(tiny_pair, tmp_path, lmbda):
    summary = gkd.train(make_gkd_cfg(tiny_pair, tmp_path, lmbda=lmbda, steps=3))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["data/on_policy"] for r in rows] == [int(lmbda)] * 3
    cost = summary["cost"]
    if lmbda == 0:
        assert cost["cost/student_generated_tokens"] == 0
        assert all(r["response/length_mean"] == 6 for r in rows)  # "It is N." + end of turn, cut at 6
    else:
        assert cost["cost/student_generated_tokens"] > 0
    assert cost["cost/teacher_forward_tokens"] == cost["cost/student_train_tokens"] > 0
    assert cost["cost/teacher_generated_tokens"] == 0


def test_seq_kd_samples_the_teacher(tiny_pair, tmp_path):
    summary = gkd.train(make_gkd_cfg(tiny_pair, tmp_path, lmbda=0.0, seq_kd=True, response_field=""))
    cost = summary["cost"]
    assert cost["cost/teacher_generated_tokens"] > 0 and cost["cost/student_generated_tokens"] == 0


# --------------------------------------------------------------------------- end to end


def test_gkd_learns_on_the_lab(tmp_path):
    """lab:student toward lab:teacher-a-plus, λ = 0.5 mixing gold solutions and the student's samples, 60
    steps of 8 prompts: the JSD_0.5 to the teacher on held-out gold solutions (lab:test-hard, 32 prompts)
    goes down (about 30 s on one thread)."""
    cfg = gkd.GKDConfig(
        student="lab:student",
        teacher="lab:teacher-a-plus",
        prompts="lab:train",
        response_field="solution_a",
        output_dir=str(tmp_path / "run"),
        steps=60,
        prompts_per_step=8,
        max_new_tokens=64,
        lr=3e-4,
        weight_decay=0.0,
        threads=1,
        progress=False,
    )
    held = gkd.GKDConfig(**{**cfg.__dict__, "prompts": "lab:test-hard"})

    def held_out_jsd(student_dir: str) -> float:
        from opd.methods.common import load_models, load_prompt_sets

        models = load_models(
            gkd.GKDConfig(**{**held.__dict__, "student": student_dir}), Runtime.from_config(held)
        )
        prompts, _ = load_prompt_sets(held, models)
        fixed = gkd.load_fixed_responses(held, prompts, models.tokenizer)
        n = 32
        eot = end_of_response_id(models.tokenizer, use_chat_template=True)
        batch = fixed_batch(
            [e.input_ids for e in prompts.examples[:n]], fixed[:n], stop_ids=[eot], pad_id=eot
        )
        scorer = PolicyScorer(models.student, temperature=0.9, vocab_limit=models.compat.vocab_limit)
        with torch.no_grad():
            div = scorer(
                batch.input_ids_B_T,
                batch.attention_mask_B_T,
                batch.response_mask_B_T,
                teacher=models.teacher,
                divergence=gkd.generalized_jsd(0.5),
                teacher_temperature=0.9,
            )
        return float(div.sum() / batch.response_mask_B_T.sum())

    from opd.lab import resolve

    before = held_out_jsd(str(resolve("lab:student").directory))
    summary = gkd.train(cfg)
    after = held_out_jsd(summary["final_model"])
    assert after < 0.9 * before, (before, after)  # measured: 0.0285 -> 0.0240


def test_resume_equals_uninterrupted_run(tiny_pair, tmp_path, monkeypatch):
    kw = dict(steps=4, save_every=2, lmbda=0.5)
    ref = gkd.train(make_gkd_cfg(tiny_pair, tmp_path / "a", **kw))
    assert {r["data/on_policy"] for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")} == {0, 1}
    real_step = gkd.gkd_step

    def dying_step(*args, **kw):
        if args[-2] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kw)

    monkeypatch.setattr(gkd, "gkd_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        gkd.train(make_gkd_cfg(tiny_pair, tmp_path / "b", **kw))
    monkeypatch.setattr(gkd, "gkd_step", real_step)
    res = gkd.train(make_gkd_cfg(tiny_pair, tmp_path / "b", resume=True, **kw))
    wa = AutoModelForCausalLM.from_pretrained(ref["final_model"]).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(res["final_model"]).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ref["cost"] == res["cost"]
    rows = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_budget_stops_the_run(tiny_pair, tmp_path):
    res = gkd.train(make_gkd_cfg(tiny_pair, tmp_path, steps=4, budget_unit="student_loss_tokens", budget=1))
    assert res["stopped_by_budget"] == 1 and res["steps_done"] == 1


# --------------------------------------------------------------------------- config and CLI


def test_help_lists_every_key(capsys):
    assert any(m.command == "gkd" for m in METHODS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gkd", "--help"])
    out = capsys.readouterr().out
    for name in gkd.GKDConfig.__dataclass_fields__:
        assert f"  {name} (" in out, name


def test_config_errors_name_the_fix(tiny_pair, tmp_path):
    with pytest.raises(ConfigError, match="beta=1.5"):
        make_gkd_cfg(tiny_pair, tmp_path, beta=1.5)
    with pytest.raises(ConfigError, match="lmbda=-0.1"):
        make_gkd_cfg(tiny_pair, tmp_path, lmbda=-0.1)
    with pytest.raises(ConfigError, match="response_field=solution_a"):
        make_gkd_cfg(tiny_pair, tmp_path, response_field="").check_runnable()
    make_gkd_cfg(tiny_pair, tmp_path, response_field="", lmbda=1.0).check_runnable()  # on-policy only: fine
    with pytest.raises(ConfigError, match="teacher"):
        gkd.GKDConfig(student="lab:student", prompts="lab:train", lmbda=1.0).check_runnable()


def test_unused_random_state():  # the λ draw never touches the global RNGs (sampling stays reproducible)
    state = random.getstate()
    gkd.on_policy_step(0, 1, 0.5)
    assert random.getstate() == state
