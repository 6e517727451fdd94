"""opd coldstart: SFT on teacher responses, then OPD on the other prompts, in one run directory."""

import json
import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.cli import main as cli_main
from opd.config_io import load_config
from opd.data import load_prompts, prompt_texts
from opd.datafiles import read_rows
from opd.errors import ConfigError
from opd.methods import METHODS, coldstart, sft
from opd.methods import opd as opd_method
from opd.methods.coldstart import SFT_KEYS, ColdstartConfig
from opd.methods.sft import SFTConfig
from opd.models import load_tokenizer
from opd.rundir import RunInterrupted
from opd.tracking import read_metrics


def lab_cfg(tmp_path, **kw) -> ColdstartConfig:
    """A small cold start on the lab: 12 prompts of teacher-b-plus data, 3 SFT steps, 3 OPD steps."""
    base = dict(
        student="lab:student",
        teacher="lab:teacher-b-plus",
        prompts="lab:train-hard",
        output_dir=str(tmp_path / "run"),
        sft_num_prompts=12,
        sft_steps=3,
        sft_batch_size=4,
        sft_warmup_steps=1,
        sft_lr=3e-4,
        steps=3,
        prompts_per_step=2,
        rollouts_per_prompt=2,
        max_new_tokens=64,
        micro_batch_size=4,
        lr=3e-4,
        weight_decay=0.0,
        progress=False,
        threads=1,
        seed=0,
    )
    base.update(kw)
    return ColdstartConfig(**base)


def weights(path):
    m = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.clone() for k, v in m.state_dict().items()}


def changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_both_stages_run_into_one_directory(tmp_path):
    cfg = lab_cfg(tmp_path, eval_every=3, sft_eval_every=2, eval_prompts="lab:test", eval_limit=8)
    summary = coldstart.train(cfg)
    run = tmp_path / "run"
    for stage in ("sft", "opd"):
        for name in ("config.json", "metrics.jsonl", "summary.json", "final"):
            assert (run / stage / name).exists(), f"{stage}/{name}"
    assert (run / "sft" / "teacher_data.jsonl").is_file()
    assert json.loads((run / "config.json").read_text())["sft_steps"] == 3
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary, default=str))

    # stage 1 used the sft_ keys, stage 2 the OPD keys, from stage 1's model
    sft_saved = json.loads((run / "sft" / "config.json").read_text())
    assert (sft_saved["steps"], sft_saved["batch_size"], sft_saved["num_prompts"]) == (3, 4, 12)
    assert (sft_saved["teacher_temperature"], sft_saved["teacher_top_p"]) == (0.7, 0.95)
    opd_saved = json.loads((run / "opd" / "config.json").read_text())
    assert opd_saved["student"] == str(run / "sft" / "final") and opd_saved["teacher_temperature"] == 1.0
    assert [r["step"] for r in read_metrics(run / "sft" / "metrics.jsonl")] == [0, 1, 2, 3]
    assert [r["step"] for r in read_metrics(run / "opd" / "metrics.jsonl")] == [0, 1, 2, 3]
    sft_evals = [r["step"] for r in read_metrics(run / "sft" / "metrics.jsonl") if "eval/accuracy" in r]
    opd_evals = [r["step"] for r in read_metrics(run / "opd" / "metrics.jsonl") if "eval/accuracy" in r]
    assert (sft_evals, opd_evals) == ([0, 2, 3], [0, 3])  # sft_eval_every, eval_every; each stage's last step

    # learning happened in both stages, and the summary adds up
    student = AutoModelForCausalLM.from_pretrained(str(_lab_dir("student"))).state_dict()
    w_sft, w_opd = weights(run / "sft" / "final"), weights(run / "opd" / "final")
    assert changed(student, w_sft) and changed(w_sft, w_opd)
    assert summary["final_model"] == str(run / "opd" / "final")
    assert (summary["steps_done"], summary["sft_steps_done"]) == (3, 3)
    stages = summary["stages"]
    for key in ("cost/flops", "cost/student_loss_tokens", "cost/teacher_generated_tokens"):
        assert summary["cost"][key] == stages["sft"]["cost"][key] + stages["opd"]["cost"][key]
    assert stages["sft"]["cost"]["cost/teacher_generated_tokens"] > 0  # the teacher data is counted
    assert stages["sft"]["teacher_data"]["counts"]["generated"] == 12


def _lab_dir(name):
    from opd.lab import resolve

    return resolve(f"lab:{name}").directory


def test_opd_prompts_are_the_pool_minus_the_sft_prompts(tmp_path, monkeypatch):
    seen = {}
    real = opd_method.load_prompt_sets

    def spy(cfg, models):
        prompts, eval_set = real(cfg, models)
        seen["prompts"] = prompts
        return prompts, eval_set

    monkeypatch.setattr(opd_method, "load_prompt_sets", spy)
    coldstart.train(lab_cfg(tmp_path, steps=1))
    sft_texts = prompt_texts(tmp_path / "run" / "sft" / "teacher_data.jsonl")
    pool = [r["prompt"] for r in read_rows("lab:train-hard")]
    opd_texts = [e.text for e in seen["prompts"].examples]
    assert len(sft_texts) == 12
    assert not set(opd_texts) & sft_texts
    assert opd_texts == [t for t in pool if t not in sft_texts]  # everything else, in order
    assert seen["prompts"].excluded == len(pool) - len(opd_texts) == 12


def test_load_prompts_exclude_is_exact_text_before_or_after_the_template(tmp_path):
    tok = load_tokenizer("lab:student")
    rows = [{"prompt": p, "answer": "1"} for p in ["a b", "a  b", "c", "d", "c"]]
    src = tmp_path / "pool.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keep = load_prompts(src, tok, exclude={"a b", "c"})
    assert [e.text for e in keep.examples] == ["a  b", "d"] and keep.excluded == 3  # no normalisation
    tmpl = "Q: {problem}"
    keep = load_prompts(src, tok, prompt_template=tmpl, exclude={"Q: d", "a b"})  # after / before it
    assert [e.text for e in keep.examples] == ["Q: a  b", "Q: c", "Q: c"] and keep.excluded == 2
    assert load_prompts(src, tok, exclude=set()).excluded == 0
    with pytest.raises(ValueError, match=r"all 5 prompt\(s\) are in the exclusion set"):
        load_prompts(src, tok, exclude={"a b", "a  b", "c", "d"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 0 has no prompt text"):
        prompt_texts(bad)


def test_resume_in_stage_two_does_not_redo_stage_one_and_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    ref = coldstart.train(lab_cfg(tmp_path / "a", steps=4, save_every=2))

    real_step = opd_method.opd_step

    def dying_step(*args, **kw):
        if args[-1] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kw)

    monkeypatch.setattr(opd_method, "opd_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        coldstart.train(lab_cfg(tmp_path / "b", steps=4, save_every=2))
    monkeypatch.undo()
    run = tmp_path / "b" / "run"
    sft_final = {p.name: p.read_bytes() for p in (run / "sft" / "final").iterdir() if p.is_file()}

    def not_again(*a, **k):
        raise AssertionError("stage 1 redone on resume")

    monkeypatch.setattr(sft, "train", not_again)
    res = coldstart.train(lab_cfg(tmp_path / "b", steps=4, save_every=2, resume=True))
    assert {p.name: p.read_bytes() for p in (run / "sft" / "final").iterdir() if p.is_file()} == sft_final
    assert not changed(weights(ref["final_model"]), weights(res["final_model"]))
    assert [r["step"] for r in read_metrics(run / "opd" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert res["cost"] == ref["cost"]


def test_a_signal_in_stage_two_stops_with_a_checkpoint_and_names_the_coldstart_directory(
    tmp_path, monkeypatch
):
    real_step = opd_method.opd_step

    def signalled_step(*args, **kw):
        if args[-1] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C during step 1: it finishes, then stops
        return real_step(*args, **kw)

    monkeypatch.setattr(opd_method, "opd_step", signalled_step)
    with pytest.raises(RunInterrupted) as e:
        coldstart.train(lab_cfg(tmp_path))
    monkeypatch.undo()
    run = tmp_path / "run"
    assert f"output_dir={run}" in e.value.message() and "resume=true" in e.value.message()
    res = coldstart.train(lab_cfg(tmp_path, resume=True))
    assert [r["step"] for r in read_metrics(run / "opd" / "metrics.jsonl")] == [1, 2, 3]
    assert res["steps_done"] == 3


def test_budget_is_for_both_stages(tmp_path):
    full = coldstart.train(lab_cfg(tmp_path / "a"))
    sft_tokens = full["stages"]["sft"]["cost"]["cost/student_loss_tokens"]
    opd_rows = read_metrics(tmp_path / "a" / "run" / "opd" / "metrics.jsonl")
    assert opd_rows[0]["step"] == 1
    budget = sft_tokens + opd_rows[0]["cost/student_loss_tokens"]  # stage 1 and one OPD step
    res = coldstart.train(lab_cfg(tmp_path / "b", budget_unit="student_loss_tokens", budget=budget))
    assert res["stages"]["opd"]["stopped_by_budget"] == 1
    assert res["budget"]["opd_stage"] == budget - sft_tokens
    assert res["cost"]["cost/student_loss_tokens"] == budget
    # a budget stage 1 spends: no OPD stage, stage 1's model is the result
    res = coldstart.train(lab_cfg(tmp_path / "c", budget_unit="student_loss_tokens", budget=1))
    assert res["stages"]["sft"]["stopped_by_budget"] == 1 and res["stages"]["opd"] is None
    assert res["final_model"] == str(tmp_path / "c" / "run" / "sft" / "final")


# --------------------------------------------------------------------------- config and CLI


def test_every_sft_key_is_set_from_the_coldstart_config():
    from dataclasses import fields

    cs = {f.name for f in fields(ColdstartConfig)}
    for f in fields(SFTConfig):
        assert f.name in SFT_KEYS or f.name in cs or f.name == "sft_data", f.name
    assert set(SFT_KEYS.values()) <= cs
    assert any(m.command == "coldstart" and m.config is ColdstartConfig for m in METHODS)


def test_a_bad_sft_key_is_a_one_line_error(capsys):
    with pytest.raises(ConfigError) as e:
        load_config(ColdstartConfig, overrides=["sft_stpes=3"], command="coldstart")
    assert "\n" not in str(e.value) and "'sft_stpes' (did you mean 'sft_steps'?)" in str(e.value)
    assert cli_main(["coldstart", "student=lab:student", "sft_stpes=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "opd coldstart --help" in err[0]
    # a bad value of an sft_ key is named with its sft_ name
    with pytest.raises(ConfigError, match=r"sft_warmup_steps=50 exceeds sft_steps=10"):
        ColdstartConfig(sft_steps=10, sft_warmup_steps=50)
    with pytest.raises(ConfigError, match=r"sft_teacher_top_p=0.0: must be in \(0, 1\]"):
        ColdstartConfig(sft_teacher_top_p=0)
    with pytest.raises(ConfigError, match="exclude_prompts"):
        ColdstartConfig(exclude_prompts="x.jsonl")


def test_help_lists_the_sft_keys(capsys):
    with pytest.raises(SystemExit):
        cli_main(["coldstart", "--help"])
    out = capsys.readouterr().out
    for key in ("sft_steps", "sft_lr", "sft_num_prompts", "sft_only_correct", "support_size", "steps"):
        assert f"  {key} (" in out
