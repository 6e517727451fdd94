"""GRPO baseline (methods/grpo.py): group advantages by hand, the update's gradient against autograd of
the documented loss, learning on the lab, exact resume, budget stop, --help and config errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from opd.cli import build_parser
from opd.errors import ConfigError
from opd.methods import METHODS, grpo
from opd.methods.common import load_models
from opd.objectives import group_advantages
from opd.rollout import make_backend
from opd.scoring import PolicyScorer
from opd.tracking import read_metrics


def make_grpo_cfg(tiny_pair, tmp_path, **kw) -> grpo.GRPOConfig:
    student, _, prompts = tiny_pair
    base = dict(
        student=str(student),
        prompts=str(prompts),
        output_dir=str(tmp_path / "run"),
        steps=2,
        prompts_per_step=2,
        rollouts_per_prompt=3,
        max_new_tokens=6,
        micro_batch_size=4,
        lr=1e-2,
        weight_decay=0.0,
        progress=False,
        seed=0,
    )
    base.update(kw)
    return grpo.GRPOConfig(**base)


def parity_reward(monkeypatch):
    """Replace the grader by a deterministic reward a random tiny model gets right half the time
    (1 when the response's first token id is even), so groups are rarely all-equal."""

    def grade(tokenizer, responses, answers):
        return [r[0] % 2 == 0 for r in responses]

    monkeypatch.setattr(grpo, "grade_responses", grade)


def weights(path):
    m = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.clone() for k, v in m.state_dict().items()}


# --------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    eps = 1e-4
    # group 1: mean 0.5, sample std sqrt(4 * 0.25 / 3); group 2: all equal; group 3: mean 0.25, std 0.5
    s1 = math.sqrt(1.0 / 3.0)
    expected = torch.tensor(
        [
            [0.5 / (s1 + eps), -0.5 / (s1 + eps), -0.5 / (s1 + eps), 0.5 / (s1 + eps)],
            [0.0, 0.0, 0.0, 0.0],
            [-0.25 / (0.5 + eps)] * 3 + [0.75 / (0.5 + eps)],
        ]
    )
    got = group_advantages(r, scale=True, eps=eps)
    torch.testing.assert_close(got, expected)
    assert (got[1] == 0).all()  # all-equal group: exactly zero, not eps-noise
    dr = group_advantages(r, scale=False)  # Dr. GRPO: centred only
    torch.testing.assert_close(dr, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25] * 3 + [0.75]]))
    assert (group_advantages(torch.zeros(2, 3)) == 0).all()


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="rank 2"):
        group_advantages(torch.ones(6))
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.ones(2, 2), eps=0.0)


def test_rewards_and_advantages_follow_the_prompt_major_layout(tiny_pair, tmp_path, monkeypatch):
    cfg = make_grpo_cfg(tiny_pair, tmp_path)
    from opd.runtime import Runtime

    models = load_models(cfg, Runtime.from_config(cfg))
    backend = make_backend("hf", models.student, models.tokenizer, vocab_limit=models.compat.vocab_limit)
    batch = backend.generate(
        [[1, 2, 3], [4, 5]], n=3, max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=0, seed=0
    )
    seen = []

    def grade(tokenizer, responses, answers):
        seen.extend(answers)
        return [a == "x" for a in answers]  # prompt 0 always right, prompt 1 always wrong

    monkeypatch.setattr(grpo, "grade_responses", grade)
    reward, adv = grpo.rewards_and_advantages(models.tokenizer, batch, ["x", "y"], cfg)
    assert seen == ["x", "x", "x", "y", "y", "y"]
    assert reward.tolist() == [1, 1, 1, 0, 0, 0]
    assert (adv == 0).all()  # both groups all-equal


# --------------------------------------------------------------------------- the loss and its gradient


@pytest.mark.parametrize("ppo_epochs,kl_coef", [(1, 0.0), (2, 0.0), (1, 0.5)])
def test_update_gradient_equals_autograd_of_the_documented_loss(tiny_pair, tmp_path, ppo_epochs, kl_coef):
    """First pass of update(): grad of -(1/N) Σ_{b,t} A_b log π(y_bt) + β_KL (1/N) Σ_{b,t} k3_bt
    (token-mean, k3 = r − log r − 1 with r = π_ref(y)/π(y)), micro-batched."""
    cfg = make_grpo_cfg(
        tiny_pair, tmp_path, micro_batch_size=2, grad_clip=0.0, ppo_epochs=ppo_epochs, kl_coef=kl_coef
    )
    from opd.runtime import Runtime

    models = load_models(cfg, Runtime.from_config(cfg))
    model, V = models.student, models.compat.vocab_limit
    backend = make_backend("hf", model, models.tokenizer, vocab_limit=V)
    batch = backend.generate(
        [[5, 6, 7], [8, 9]], n=3, max_new_tokens=5, temperature=1.0, top_p=1.0, top_k=0, seed=1
    )
    adv_B = torch.tensor([0.7, -1.2, 0.5, 0.0, 2.0, -0.3])
    scorer = PolicyScorer(model, temperature=0.8, vocab_limit=V)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_pair[1])  # any frozen model on the same vocabulary
    reference = PolicyScorer(ref_model, temperature=0.8, vocab_limit=V) if kl_coef else None
    grads = {}

    class Recorder(torch.optim.SGD):  # records the first pass's gradient, then does not move the weights
        def step(self, closure=None):
            if not grads:
                grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    _, _, _, stats = grpo.update(scorer, batch, adv_B, Recorder(model.parameters(), lr=0.0), cfg, reference)

    def token_logp(m):
        pos = (batch.attention_mask_B_T.cumsum(-1) - 1).clamp_min(0)
        logits = m(batch.input_ids_B_T, attention_mask=batch.attention_mask_B_T, position_ids=pos).logits
        logp = F.log_softmax(logits[:, :-1, :V].double() / 0.8, dim=-1)
        return logp.gather(-1, batch.input_ids_B_T[:, 1:, None])[..., 0]

    model.zero_grad()
    mask = batch.response_mask_B_T[:, 1:].double()
    tok = token_logp(model)
    loss = -(adv_B[:, None].double() * tok * mask).sum() / mask.sum()
    if kl_coef:
        with torch.no_grad():
            ref = token_logp(ref_model)
        k3 = torch.exp(ref - tok) - (ref - tok) - 1
        loss = loss + kl_coef * (k3 * mask).sum() / mask.sum()
        assert stats["kl/ref"] == pytest.approx(float((k3.detach() * mask).sum() / mask.sum()), rel=1e-4)
        assert stats["kl/ref"] > 0
    loss.backward()
    assert grads
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad.float(), rtol=1e-4, atol=1e-6)


def test_kl_to_the_initial_student_starts_at_zero_and_costs_a_forward(tiny_pair, tmp_path, monkeypatch):
    parity_reward(monkeypatch)
    summary = grpo.train(make_grpo_cfg(tiny_pair, tmp_path, steps=3, kl_coef=0.1))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["kl/ref"] == 0.0  # the reference is the student before its first update
    assert rows[-1]["kl/ref"] > 0
    cost = summary["cost"]
    assert cost["cost/student_forward_tokens"] == cost["cost/student_train_tokens"]  # one reference pass each


# --------------------------------------------------------------------------- end to end


def test_grpo_learns_on_the_lab(tmp_path):
    """lab:student on 8 hard problems of lab:train (its sampled accuracy there is about 0.1): 20 GRPO
    steps of 8 x 8 samples raise the training reward and the sampled accuracy (avg@16, T = 1) on those
    prompts (measured: 0.12 -> 0.54 in about 35 s on one thread)."""
    from opd.data import load_prompts
    from opd.evaluate import evaluate_accuracy
    from opd.lab import prompt_rows, resolve
    from opd.models import load_model, load_tokenizer

    prompts = tmp_path / "hard8.jsonl"
    rows = prompt_rows("train-hard")[:8]
    prompts.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows)
    )

    def sampled_accuracy(model_dir) -> float:
        tok = load_tokenizer(str(model_dir))
        model = load_model(str(model_dir), dtype="float32")
        res = evaluate_accuracy(
            model, tok, load_prompts(prompts, tok), temperature=1.0, n=16, max_new_tokens=64, progress=False
        )
        return res["accuracy"]

    cfg = grpo.GRPOConfig(
        student="lab:student",
        prompts=str(prompts),
        output_dir=str(tmp_path / "run"),
        steps=20,
        prompts_per_step=8,
        rollouts_per_prompt=8,
        max_new_tokens=64,
        lr=3e-4,
        weight_decay=0.0,
        threads=1,
        progress=False,
        seed=0,
    )
    before = sampled_accuracy(resolve("lab:student").directory)
    summary = grpo.train(cfg)
    after = sampled_accuracy(summary["final_model"])
    assert after > before + 0.2, (before, after)
    rewards = [r["reward/mean"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.15, rewards
    assert summary["cost"]["cost/teacher_flops"] == 0


def test_run_layout_metrics_and_cost(tiny_pair, tmp_path, monkeypatch):
    parity_reward(monkeypatch)
    summary = grpo.train(make_grpo_cfg(tiny_pair, tmp_path))
    run = tmp_path / "run"
    assert (run / "config.json").is_file() and (run / "final").is_dir()
    assert json.loads((run / "summary.json").read_text())["steps_done"] == 2
    rows = read_metrics(run / "metrics.jsonl")
    for key in ("reward/mean", "reward/std", "reward/zero_adv_group_frac", "response/length_mean", "loss/pg"):
        assert all(math.isfinite(r[key]) for r in rows), key
    cost = summary["cost"]
    assert cost["cost/student_generated_tokens"] > 0 and cost["cost/student_train_tokens"] > 0
    assert cost["cost/teacher_forward_tokens"] == 0 and cost["cost/teacher_flops"] == 0
    assert cost["cost/student_forward_tokens"] == 0  # ppo_epochs=1: no separate old-log-prob pass
    assert not all(
        torch.equal(a, b) for a, b in zip(weights(tiny_pair[0]).values(), weights(run / "final").values())
    )


def test_report_to_is_honoured_by_a_baseline_too(tiny_pair, tmp_path, monkeypatch):
    """``report_to`` is a key of every method's config: GRPO's TensorBoard scalars are its metrics.jsonl."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    parity_reward(monkeypatch)
    grpo.train(make_grpo_cfg(tiny_pair, tmp_path, report_to="tensorboard"))
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [e.value for e in acc.Scalars("reward/mean")] == pytest.approx([r["reward/mean"] for r in rows])


def test_resume_equals_uninterrupted_run(tiny_pair, tmp_path, monkeypatch):
    parity_reward(monkeypatch)
    ref = grpo.train(make_grpo_cfg(tiny_pair, tmp_path / "a", steps=4, save_every=2, ppo_epochs=2))
    real_step = grpo.grpo_step

    def dying_step(*args, **kw):
        if args[-2] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kw)

    monkeypatch.setattr(grpo, "grpo_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        grpo.train(make_grpo_cfg(tiny_pair, tmp_path / "b", steps=4, save_every=2, ppo_epochs=2))
    monkeypatch.setattr(grpo, "grpo_step", real_step)
    res = grpo.train(
        make_grpo_cfg(tiny_pair, tmp_path / "b", steps=4, save_every=2, ppo_epochs=2, resume=True)
    )
    wa, wb = weights(ref["final_model"]), weights(res["final_model"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ref["cost"] == res["cost"]
    rows = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_budget_stops_the_run(tiny_pair, tmp_path, monkeypatch):
    parity_reward(monkeypatch)
    res = grpo.train(make_grpo_cfg(tiny_pair, tmp_path, steps=4, budget_unit="student_loss_tokens", budget=1))
    assert res["stopped_by_budget"] == 1 and res["steps_done"] == 1


# --------------------------------------------------------------------------- config and CLI


def test_help_lists_every_key(capsys):
    assert any(m.command == "grpo" for m in METHODS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["grpo", "--help"])
    out = capsys.readouterr().out
    for name in grpo.GRPOConfig.__dataclass_fields__:
        assert f"  {name} (" in out, name


def test_config_errors_name_the_fix(tiny_pair, tmp_path):
    with pytest.raises(ConfigError, match="loads no teacher"):
        make_grpo_cfg(tiny_pair, tmp_path, teacher="lab:teacher-a-plus")
    with pytest.raises(ConfigError, match="rollouts_per_prompt=1"):
        make_grpo_cfg(tiny_pair, tmp_path, rollouts_per_prompt=1)
    with pytest.raises(ConfigError, match="kl_coef=-0.1"):
        make_grpo_cfg(tiny_pair, tmp_path, kl_coef=-0.1)
    with pytest.raises(ConfigError, match="loss_aggregation"):
        make_grpo_cfg(tiny_pair, tmp_path, loss_aggregation="sum")
    with pytest.raises(ConfigError, match="student=lab:student prompts=lab:train"):
        grpo.GRPOConfig().check_runnable()


def test_prompts_without_answers_are_refused(tiny_pair, tmp_path):
    no_answers = tmp_path / "q.jsonl"
    no_answers.write_text(json.dumps({"question": "What is 1 + 1?"}) + "\n")
    with pytest.raises(ConfigError, match="no answer"):
        grpo.train(make_grpo_cfg(tiny_pair, tmp_path, prompts=str(no_answers)))


def test_prompt_cap_without_a_teacher_uses_the_student_context():
    from types import SimpleNamespace

    from opd.models import prompt_token_cap

    student = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=256))
    cap, why = prompt_token_cap(1024, 64, student, None)
    assert cap == 192 and "student 256" in why and "teacher" not in why
