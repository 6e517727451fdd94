"""SFT on teacher rollouts (opd sft): the loss, the rejection rules, learning on the lab, resume, budget."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from opd.cli import main as cli_main
from opd.config import help_text
from opd.errors import ConfigError
from opd.methods import sft
from opd.methods.sft import SFTConfig
from opd.models import load_model, load_tokenizer
from opd.rollout import RolloutBatch
from opd.scoring import PolicyScorer, left_pad_position_ids
from opd.teacher_data import ForcedSequence, collate, read_sequences, rejection_reason, repetition_rate
from opd.tracking import read_metrics


def lab_cfg(tmp_path, **kw) -> SFTConfig:
    """A small SFT run on the lab: lab:student on lab:teacher-a-plus responses to 16 lab:train prompts."""
    base = dict(
        student="lab:student",
        teacher="lab:teacher-a-plus",
        prompts="lab:train",
        output_dir=str(tmp_path / "run"),
        num_prompts=16,
        max_new_tokens=64,
        steps=4,
        warmup_steps=1,
        batch_size=4,
        micro_batch_size=2,
        lr=3e-4,
        weight_decay=0.0,
        progress=False,
        threads=1,
        seed=0,
    )
    base.update(kw)
    return SFTConfig(**base)


def weights(path):
    m = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.clone() for k, v in m.state_dict().items()}


def changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def mean_nll(model_dir, sequences, pad_id) -> float:
    """Mean NLL per response token of ``sequences`` under the model in ``model_dir``."""
    scorer = PolicyScorer(load_model(model_dir, dtype="float32"))
    batch = collate(sequences, pad_id)
    with torch.no_grad():
        loss, n = sft.sft_loss(scorer, batch, total_tokens=float(batch.response_mask_B_T.sum()))
    return float(loss)


# --------------------------------------------------------------------------- the loss


def _tiny_batch(tokenizer) -> RolloutBatch:
    seqs = [
        ForcedSequence(
            0, "a", tokenizer("What is 1 + 2?")["input_ids"], "3", tokenizer("3")["input_ids"] + [258]
        ),
        ForcedSequence(1, "b", tokenizer("Hi")["input_ids"], "12", tokenizer("12 ok")["input_ids"] + [258]),
    ]
    return collate(seqs, pad_id=256)


def test_collate_layout(tiny_pair):
    tok = load_tokenizer(str(tiny_pair[0]))
    b = _tiny_batch(tok)
    P = b.prompt_len
    assert len(tok("What is 1 + 2?")["input_ids"]) == P
    assert (b.response_mask_B_T[:, :P] == 0).all()  # prompts never carry loss
    assert b.response_mask_B_T[0].sum() == 2 and b.response_mask_B_T[1].sum() == 6
    assert b.attention_mask_B_T[1, : P - 2].sum() == 0  # left padding of the short prompt
    assert b.input_ids_B_T[0, P:].tolist()[:2] == tok("3")["input_ids"] + [258]


def test_loss_is_response_token_nll_and_ignores_prompt_tokens(tiny_pair):
    """The loss equals the HF-style cross-entropy with labels -100 on prompt and padding, and puts no
    gradient on the hidden states that predict prompt tokens."""
    tok = load_tokenizer(str(tiny_pair[0]))
    model = load_model(str(tiny_pair[0]), dtype="float32")
    batch = _tiny_batch(tok)
    scorer = PolicyScorer(model)
    hidden = {}

    def keep(module, inputs, out):  # the final hidden state of the grad-carrying pass
        if out.requires_grad:
            out.retain_grad()
            hidden["h"] = out

    handle = model.model.norm.register_forward_hook(keep)
    loss, n = sft.sft_loss(scorer, batch, total_tokens=float(batch.response_mask_B_T.sum()))
    loss.backward()
    handle.remove()

    ids, attn = batch.input_ids_B_T, batch.attention_mask_B_T
    labels = torch.where(batch.response_mask_B_T > 0, ids, torch.full_like(ids, -100))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=left_pad_position_ids(attn)).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert n == 8 and torch.allclose(loss, ref, atol=1e-5)

    # h_s predicts token s+1: only s with a response token at s+1 may receive gradient
    grad_norm_B_T = hidden["h"].grad.norm(dim=-1)
    predicts_response = torch.zeros_like(batch.response_mask_B_T, dtype=torch.bool)
    predicts_response[:, :-1] = batch.response_mask_B_T[:, 1:] > 0
    assert (grad_norm_B_T[~predicts_response] == 0).all()
    assert (grad_norm_B_T[predicts_response] > 0).all()


def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_pair):
    tok = load_tokenizer(str(tiny_pair[0]))
    seqs = [
        ForcedSequence(
            i, "p", tok(f"Sum {i}+{i}?")["input_ids"], "r", tok(str(2 * i) * (i + 1))["input_ids"] + [258]
        )
        for i in range(1, 4)
    ]
    grads = []
    for mbs in (1, 3):
        model = load_model(str(tiny_pair[0]), dtype="float32")
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        out = sft.sft_step(
            PolicyScorer(model), seqs, opt, pad_id=256, micro_batch_size=mbs, grad_clip=0, device="cpu"
        )
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert out["tokens"] == sum(len(s.response_ids) for s in seqs)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# --------------------------------------------------------------------------- rejection


def test_repetition_rate():
    assert repetition_rate([1, 2, 3, 4], 2) == 0.0
    assert repetition_rate([1, 2], 3) == 0.0  # no n-grams
    assert repetition_rate([7] * 11, 2) == pytest.approx(1 - 1 / 10)
    assert repetition_rate([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)
    with pytest.raises(ValueError, match="n-gram"):
        repetition_rate([1], 0)


def test_rejection_rules_and_their_order():
    kw = dict(repetition_ngram=2, max_repetition=0.5, only_correct=True)
    ok = list(range(10))
    loop = [5, 6] * 10
    assert rejection_reason(r"so \boxed{3}", ok, truncated=False, answer="3", **kw) == (None, True)
    assert rejection_reason(r"so \boxed{3", ok, truncated=True, answer="3", **kw) == ("truncated", None)
    assert rejection_reason("so 3", ok, truncated=False, answer="3", **kw) == ("no_answer", False)
    assert rejection_reason(r"\boxed{}", ok, truncated=False, answer=None, **kw) == ("no_answer", None)
    assert rejection_reason(r"\boxed{3}", loop, truncated=False, answer="3", **kw) == ("repetitive", None)
    assert rejection_reason(r"\boxed{4}", ok, truncated=False, answer="3", **kw) == ("incorrect", False)
    # without only_correct a wrong answer is kept (and marked); without an answer it is not graded
    assert rejection_reason(
        r"\boxed{4}", ok, truncated=False, answer="3", **{**kw, "only_correct": False}
    ) == (
        None,
        False,
    )
    assert rejection_reason(r"\boxed{4}", ok, truncated=False, answer=None, **kw) == (None, None)
    # max_repetition=1 turns the rule off
    assert (
        rejection_reason(r"\boxed{3}", loop, truncated=False, answer="3", **{**kw, "max_repetition": 1.0})[0]
        is None
    )


def test_generate_teacher_data_counts_each_reason(monkeypatch):
    """Crafted teacher responses through generate_teacher_data: each is counted under its reason."""
    from opd.data import PromptExample, PromptSet
    from opd.lab import lab_tokenizer

    tok = lab_tokenizer()
    texts = [
        r"1+2=3\n\boxed{3}",
        r"1+2=3 \boxed{3",
        "no answer here",
        r"\boxed{3}" + " ab" * 20,
        r"\boxed{4}",
        r"so \boxed{3}",
    ]
    truncated = [False, True, False, False, False, False]
    prompts = PromptSet(
        [PromptExample("q", "q", tok("q")["input_ids"], "3", {"row": i}) for i in range(3)], "crafted"
    )

    class Crafted:
        def __init__(self):
            self.done = []

        def generate(self, prompt_ids, *, n, **kw):
            rows = [tok(texts[len(self.done) + r])["input_ids"] + [258] for r in range(len(prompt_ids) * n)]
            trunc = [truncated[len(self.done) + r] for r in range(len(rows))]
            self.done.extend(rows)
            seqs = [ForcedSequence(0, "", [1], "", r) for r in rows]
            b = collate(seqs, pad_id=256)
            b.truncated_B = torch.tensor(trunc)
            return b

    monkeypatch.setattr(sft, "make_backend", lambda *a, **k: Crafted())
    data, counts = sft.generate_teacher_data(
        None, tok, prompts, samples_per_prompt=2, batch_size=2, only_correct=True, repetition_ngram=3
    )
    assert counts == {
        "generated": 6,
        "accepted": 2,
        "rejected/truncated": 1,
        "rejected/no_answer": 1,
        "rejected/repetitive": 1,
        "rejected/incorrect": 1,
    }
    assert [(d.row, d.sample, d.correct) for d in data] == [(0, 0, True), (2, 1, True)]
    assert data[0].response == texts[0] and data[0].response_ids[-1] == 258


# --------------------------------------------------------------------------- runs on the lab


def test_sft_learns_the_teacher_data(tmp_path):
    """lab:student on lab:teacher-a-plus responses: the student's NLL of the teacher data goes down."""
    cfg = lab_cfg(tmp_path, steps=8, eval_every=8, eval_prompts="lab:test", eval_limit=8, max_new_tokens=64)
    summary = sft.train(cfg)
    run = tmp_path / "run"
    seqs = read_sequences(run / "teacher_data.jsonl", vocab_size=259)
    assert len(seqs) == summary["teacher_data"]["sequences"] == 16
    assert summary["teacher_data"]["counts"]["generated"] == 16
    assert all(s.correct for s in seqs)  # the capable teacher is right on train prompts
    stats = json.loads((run / "teacher_data.jsonl.stats.json").read_text())
    assert stats["settings"]["teacher_temperature"] == 0.7 and stats["settings"]["teacher_top_p"] == 0.95
    student = sft.load_models(cfg, sft.Runtime.from_config(cfg)).student
    before = mean_nll_model(student, seqs)
    after = mean_nll(summary["final_model"], seqs, 256)
    assert after < 0.9 * before, (before, after)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(9))
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    c = rows[-1]
    assert c["cost/teacher_generated_tokens"] == sum(len(s.response_ids) for s in seqs)
    assert (
        c["cost/student_loss_tokens"] > 0 and c["cost/student_train_tokens"] > c["cost/student_loss_tokens"]
    )
    assert summary["cost"]["cost/flops"] == c["cost/flops"]


def mean_nll_model(model, sequences) -> float:
    batch = collate(sequences, 256)
    with torch.no_grad():
        loss, _ = sft.sft_loss(PolicyScorer(model), batch, float(batch.response_mask_B_T.sum()))
    return float(loss)


def test_resume_equals_uninterrupted_run_and_reuses_the_teacher_data(tmp_path, monkeypatch):
    ref = sft.train(lab_cfg(tmp_path / "a", steps=6, save_every=2))

    real_step = sft.sft_step
    calls = {"n": 0}

    def dying_step(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kw)

    monkeypatch.setattr(sft, "sft_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        sft.train(lab_cfg(tmp_path / "b", steps=6, save_every=2))
    monkeypatch.undo()
    data_file = tmp_path / "b" / "run" / "teacher_data.jsonl"
    written = data_file.read_text()

    def no_generation(*a, **k):
        raise AssertionError("teacher data regenerated on resume")

    monkeypatch.setattr(sft, "generate_teacher_data", no_generation)
    res = sft.train(lab_cfg(tmp_path / "b", steps=6, save_every=2, resume=True))
    assert not changed(weights(ref["final_model"]), weights(res["final_model"]))
    assert data_file.read_text() == written == (tmp_path / "a" / "run" / "teacher_data.jsonl").read_text()
    assert res["cost"] == ref["cost"] and res["teacher_data"]["counts"] == ref["teacher_data"]["counts"]
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_sft_data_file_trains_without_teacher(tmp_path):
    first = sft.train(lab_cfg(tmp_path / "a", steps=2))
    data = tmp_path / "a" / "run" / "teacher_data.jsonl"
    res = sft.train(lab_cfg(tmp_path / "b", teacher="", prompts="", sft_data=str(data), steps=2))
    assert res["teacher_data"]["source"] == str(data) and res["teacher_data"]["sequences"] == 16
    assert res["cost"]["cost/teacher_generated_tokens"] == 0  # the file's generation is not this run's cost
    # same data, same seed: the same model as the run that generated it
    assert not changed(weights(first["final_model"]), weights(res["final_model"]))


def test_budget_stops_the_run(tmp_path):
    full = sft.train(lab_cfg(tmp_path / "a", steps=4))
    rows = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    budget = rows[1]["cost/student_loss_tokens"]
    res = sft.train(lab_cfg(tmp_path / "b", steps=4, budget_unit="student_loss_tokens", budget=budget))
    assert full["stopped_by_budget"] is None and res["stopped_by_budget"] == 2
    assert res["cost"]["cost/student_loss_tokens"] == budget


def test_all_rejected_is_an_error_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match="every one of the 16 teacher responses was rejected"):
        sft.train(lab_cfg(tmp_path, max_new_tokens=4))


# --------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(teacher_top_p=0.0), "teacher_top_p"),
        (dict(max_repetition=0.0), "max_repetition"),
        (dict(teacher_temperature=0, teacher_samples_per_prompt=2), "greedy"),
        (dict(sft_data="x.jsonl", teacher="lab:teacher-a-plus"), "leave teacher empty"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_prompts=-1), "num_prompts"),
        (dict(stop_on_alert=True), "stop_on_alert"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        SFTConfig(**kw)


def test_missing_keys_name_the_fix():
    with pytest.raises(ConfigError, match="missing required key"):
        SFTConfig(student="lab:student").check_runnable()
    SFTConfig(student="lab:student", sft_data="x.jsonl").check_runnable()


def test_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit):
        cli_main(["sft", "--help"])
    out = capsys.readouterr().out
    for key in (
        "teacher_samples_per_prompt",
        "teacher_temperature",
        "only_correct",
        "sft_data",
        "max_repetition",
    ):
        assert key in out
    assert "repetition" in help_text(SFTConfig)
