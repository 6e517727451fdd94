"""Bad inputs (configs, data files, models, prompts) get a clear one-line error naming the input and the
fix, a counted and logged skip, or a warning; never a raw traceback or a silently wrong run."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from opd.alerts import AlertConfig
from opd.cli import main
from opd.config import ConfigError, OPDConfig
from opd.config_io import load_config
from opd.data import load_prompts, template_variables
from opd.datafiles import read_rows
from opd.lab import resolve
from opd.methods import opd as opd_method
from opd.models import (
    NonFiniteModelError,
    check_compatibility,
    check_finite_logp,
    load_model,
    load_tokenizer,
    prompt_token_cap,
    same_model_warning,
    save_model,
)
from opd.textfiles import TextEncodingError
from opd.tiny import CHATML_TEMPLATE, build_byte_tokenizer, build_tiny_model
from opd.tracking import read_metrics

LAB_STUDENT, LAB_TEACHER = "lab:student", "lab:teacher-a-plus"


def lab_dir(name: str) -> Path:
    return resolve(f"lab:{name}", kind="model").require_built()


def copy_model(name_or_dir: str | Path, dst: Path) -> Path:
    src = lab_dir(name_or_dir[4:]) if str(name_or_dir).startswith("lab:") else Path(name_or_dir)
    shutil.copytree(src, dst)
    return dst


def edit_weights(model_dir: Path, fn) -> None:
    """Load model.safetensors, let ``fn`` edit the tensor dict in place, save it back."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def train_cfg(tmp_path: Path, **kw) -> OPDConfig:
    base = dict(
        student=LAB_STUDENT,
        teacher=LAB_TEACHER,
        prompts="lab:train",
        output_dir=str(tmp_path / "run"),
        steps=1,
        prompts_per_step=2,
        rollouts_per_prompt=2,
        max_new_tokens=16,
        micro_batch_size=4,
        lr=1e-3,
        progress=False,
        alerts=False,
    )
    base.update(kw)
    return OPDConfig(**base)


def one_line_cli_error(argv: list[str], capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "Loading weights" not in ln]  # not ours: HF bars
    assert len(lines) == 1 and lines[0].startswith("opd: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------- config


def test_invalid_yaml_file_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\nalert_thresholds: {window: 3\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad\.yaml': invalid YAML at line 3, column 3"):
        load_config(OPDConfig, path)
    err = one_line_cli_error(["train", str(path)], capsys)
    assert "bad.yaml" in err and "line 3" in err


@pytest.mark.parametrize(
    "override",
    ["alert_thresholds={window: 3", "chat_template_kwargs={enable_thinking: [1}", "adam_betas=[0.9, 0.99"],
)
def test_invalid_yaml_override_names_the_key(override, capsys):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: invalid YAML at line 1, column \d+: .*e\.g\. {key}="):
        load_config(OPDConfig, None, [override])
    assert key in one_line_cli_error(["train", override], capsys)


@pytest.mark.parametrize(
    "value, match",
    [
        ("{bogus: 3}", r"alert_thresholds: unknown key 'bogus'; known keys: window, "),
        ("{windw: 3}", r"unknown key 'windw'; did you mean 'window'\?"),
        ("{window: many}", r"alert_thresholds\.window='many': expected a value of type int"),
        ("{truncated_frac_max: high}", r"alert_thresholds\.truncated_frac_max='high': expected .* float"),
        ("{window: 1}", r"alert_thresholds: AlertConfig\.window must be at least 2"),
        ("{entropy_spike_factor: 0.5}", r"entropy_spike_factor must be > 1"),
        ("{stop_on_alert: true}", r"set the top-level key stop_on_alert=true instead"),
    ],
)
def test_alert_thresholds_are_validated_with_the_config(value, match):
    """Before any model loads: building the config is what fails (it used to be a TypeError mid-run)."""
    with pytest.raises(ConfigError, match=match):
        load_config(OPDConfig, None, [f"alert_thresholds={value}"])


def test_valid_alert_thresholds_are_coerced_and_used(tmp_path):
    cfg = load_config(OPDConfig, None, ["alert_thresholds={window: '20', truncated_frac_max: null}"])
    assert cfg.alert_thresholds == {"window": 20, "truncated_frac_max": None}
    assert AlertConfig(**cfg.alert_thresholds).window == 20


def test_temperature_zero_is_refused_for_training_but_greedy_eval_is_allowed(capsys):
    with pytest.raises(
        ConfigError, match=r"temperature=0\.0: OPD trains on sampled rollouts .*temperature=1\.0"
    ):
        OPDConfig(temperature=0)
    assert OPDConfig(eval_temperature=0).eval_temperature == 0
    with pytest.raises(ConfigError, match=r"eval_temperature=-1\.0: must be >= 0"):
        OPDConfig(eval_temperature=-1)
    with pytest.raises(ConfigError, match=r"teacher_temperature=0\.0"):
        OPDConfig(teacher_temperature=0)


# --------------------------------------------------------------------------------------- data files


def test_csv_byte_order_mark_is_stripped(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffquestion,answer\nWhat is 1 + 1?,2\nWhat is 2 + 2?,4\n".encode())
    rows = read_rows(path)
    assert list(rows[0]) == ["question", "answer"]  # not "\ufeffquestion"
    ps = load_prompts(path, build_byte_tokenizer(), use_chat_template=False)
    assert ps.prompt_field == "question" and [e.answer for e in ps.examples] == ["2", "4"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_byte_order_mark_is_stripped(tmp_path, suffix):
    rows = [{"prompt": "a", "answer": "1"}]
    text = json.dumps(rows[0]) + "\n" if suffix == ".jsonl" else json.dumps(rows)
    path = tmp_path / f"p{suffix}"
    path.write_bytes(("\ufeff" + text).encode())
    assert read_rows(path) == rows


@pytest.mark.parametrize(
    "suffix, content",
    [
        (".jsonl", b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n'),
        (".csv", b"prompt,answer\na,1\ncaf\xe9,2\n"),
        (".json", b'[{"prompt": "a", "answer": "1"},\n {"prompt": "caf\xe9", "answer": "2"}]'),
    ],
)
def test_non_utf8_data_names_the_file_line_and_byte(tmp_path, suffix, content):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(content)
    offset = content.index(b"\xe9")
    line, column = content.count(b"\n", 0, offset) + 1, offset - content.rindex(b"\n", 0, offset)
    with pytest.raises(
        TextEncodingError,
        match=rf"latin1\{suffix}: not UTF-8 text: byte 0xe9 at line {line}, column {column} \(byte offset {offset}\)"
        r".*re-save the file as UTF-8",
    ):
        read_rows(path)


def test_non_utf8_config_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"steps: 3\nstudent: caf\xe9\n")
    with pytest.raises(
        TextEncodingError, match=r"latin1\.yaml: not UTF-8 text: byte 0xe9 at line 2, column 13"
    ):
        load_config(OPDConfig, path)
    assert "line 2" in one_line_cli_error(["train", str(path)], capsys)


THINKING_TEMPLATE = CHATML_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}<think></think>"
    "{% endif %}{% endif %}",
)


def test_chat_template_kwargs_the_template_never_reads_are_warned(tmp_path, caplog):
    tok = build_byte_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "answer": "1"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="opd.data"):
        ps = load_prompts(path, tok, chat_template_kwargs={"enable_thinkin": False})
    msgs = [r.getMessage() for r in caplog.records if r.name == "opd.data"]
    assert len(msgs) == 1
    assert "'enable_thinkin'" in msgs[0] and "never read" in msgs[0]
    assert "the template reads 'enable_thinking'" in msgs[0] and "did you mean 'enable_thinking'" in msgs[0]
    assert "<think>" not in ps.examples[0].rendered  # the typo changed nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="opd.data"):
        ps = load_prompts(path, tok, chat_template_kwargs={"enable_thinking": False})
    assert not [r for r in caplog.records if r.name == "opd.data"]
    assert ps.examples[0].rendered.endswith("<think></think>")


def test_template_variables_reads_the_jinja_source():
    src = (
        "{% for m in messages %}{% if loop.index > 9 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}"
        "{% set ns = namespace(x=1) %}{% for i in range(2) %}{{ bos_token }}{% endfor %}{{ custom_flag }}"
    )
    assert template_variables(src) == {"messages", "bos_token", "custom_flag"}
    assert template_variables({"default": "{{ a }}", "tool_use": "{{ b }}"}) == {"a", "b"}
    assert template_variables("{% if %}") is None and template_variables(None) is None


# ------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("where", ["all", "one_row"])
def test_nan_weights_are_refused_naming_the_model(tmp_path, capsys, role, where):
    bad = copy_model(LAB_TEACHER if role == "teacher" else LAB_STUDENT, tmp_path / f"nan-{role}")

    def poison(t):
        w = t["model.embed_tokens.weight"]
        if where == "all":
            for v in t.values():
                v.fill_(float("nan"))
        else:
            w[97] = float("nan")  # one embedding row (byte 'a')

    edit_weights(bad, poison)
    cfg = train_cfg(tmp_path, **{role: str(bad)})
    match = rf"model '{bad}' has non-finite \(NaN/inf\) weights in " + (
        r"50 tensor\(s\)"
        if where == "all"
        else r"1 tensor\(s\): model\.embed_tokens\.weight \(\d+ value\(s\) in 1 row"
    )
    with pytest.raises(NonFiniteModelError, match=match):
        opd_method.train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused at load, before any step
    err = one_line_cli_error(
        ["train", *(f"{k}={getattr(cfg, k)}" for k in ("student", "teacher", "prompts", "max_new_tokens"))]
        + [f"output_dir={tmp_path / 'cli'}", "progress=false"],
        capsys,
    )
    assert str(bad) in err


def test_weight_check_finds_infinities_and_ignores_finite_overflowing_sums():
    from opd.models import check_finite_weights

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    check_finite_weights(model, "ok")
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite, but its float32 sum overflows: exact check says fine
    check_finite_weights(model, "big")
    with torch.no_grad():
        model[1].weight[0, 1], model[1].weight[1, 2] = float("inf"), -float("inf")  # sum is NaN
    with pytest.raises(
        NonFiniteModelError, match=r"^m has .* in 1 tensor\(s\): 1\.weight \(2 value\(s\) in 2 row"
    ):
        check_finite_weights(model, "m")


def untied_tiny_model(tok, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg)


def test_nonfinite_teacher_logprobs_stop_the_run_before_any_update(tmp_path, monkeypatch):
    """Weights that pass the load check but score NaN (an input-embedding row the load-time probe never
    touches, with the load check bypassed): the step fails in scoring, naming the teacher, with no update."""
    tok = build_byte_tokenizer()
    dirs = {}
    for name, model in (("student", build_tiny_model(tok)), ("teacher", untied_tiny_model(tok, seed=1))):
        dirs[name] = tmp_path / name
        save_model(model, tok, dirs[name])
    im_start = tok.convert_tokens_to_ids("<|im_start|>")  # in every rendered prompt
    edit_weights(dirs["teacher"], lambda t: t["model.embed_tokens.weight"][im_start].fill_(float("nan")))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1"}) + "\n" for i in range(4)))
    monkeypatch.setattr("opd.models.check_finite_weights", lambda model, what: None)
    calls = []
    real_update = opd_method.update
    monkeypatch.setattr(opd_method, "update", lambda *a, **k: calls.append(1) or real_update(*a, **k))
    cfg = train_cfg(
        tmp_path,
        student=str(dirs["student"]),
        teacher=str(dirs["teacher"]),
        prompts=str(prompts),
        max_new_tokens=4,
    )
    with pytest.raises(
        NonFiniteModelError,
        match=rf"teacher '{dirs['teacher']}' produced non-finite log-probs at (\d+) of \1 scored positions "
        r"\(in 4 of 4 sequences\); no update was made",
    ):
        opd_method.train(cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert calls == [] and (not metrics.exists() or read_metrics(metrics) == [])


def test_finite_logp_check_counts_only_scored_positions():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(5, 7, generator=g)
    mask = (torch.rand(5, 7, generator=g) > 0.3).float()
    logp = logp * mask
    check_finite_logp("student", "s", logp, mask)  # finite: no error
    bad = torch.zeros(5, 7, dtype=torch.bool)
    bad[0, 1] = bad[2, 3] = bad[2, 6] = bad[4, 0] = True
    logp = logp.masked_fill(bad, float("nan"))
    expected = int((bad & (mask > 0)).sum())
    rows = int((bad & (mask > 0)).any(-1).sum())
    with pytest.raises(
        NonFiniteModelError,
        match=rf"student 's' produced non-finite log-probs at {expected} of {int(mask.sum())} scored "
        rf"positions \(in {rows} of 5 sequences\)",
    ):
        check_finite_logp("student", "s", logp, mask)


def test_auto_map_without_trust_remote_code_is_warned_and_not_saved(tmp_path, caplog):
    model_dir = copy_model(LAB_STUDENT, tmp_path / "custom")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with caplog.at_level(logging.WARNING, logger="opd.models"):
        summary = opd_method.train(train_cfg(tmp_path, student=str(model_dir)))
    msgs = [r.getMessage() for r in caplog.records if "auto_map" in r.getMessage()]
    assert len(msgs) == 2
    model_msg = next(m for m in msgs if m.startswith("model"))
    assert "modeling_custom.CustomForCausalLM" in model_msg and "NOT used" in model_msg
    assert "Qwen2ForCausalLM" in model_msg and "trust_remote_code" in model_msg
    tok_msg = next(m for m in msgs if m.startswith("tokenizer"))
    assert "tokenization_custom.CustomTokenizer" in tok_msg and "Qwen2Tokenizer" in tok_msg
    final = Path(summary["final_model"])
    assert "auto_map" not in json.loads((final / "config.json").read_text())
    assert "auto_map" not in json.loads((final / "tokenizer_config.json").read_text())
    assert load_model(final).config.model_type == "qwen2"  # loads without the code


def test_same_student_and_teacher_is_warned(tmp_path, caplog):
    student = load_model(LAB_STUDENT)
    assert "same model path" in same_model_warning(LAB_STUDENT, LAB_STUDENT, student, load_model(LAB_STUDENT))
    clone = copy_model(LAB_STUDENT, tmp_path / "clone")
    msg = same_model_warning(LAB_STUDENT, str(clone), student, load_model(clone))
    assert "identical weights" in msg and "every reward is ~0" in msg
    # same architecture, different weights: no warning (student-plus is the student after SFT)
    assert (
        same_model_warning(LAB_STUDENT, "lab:student-plus", student, load_model("lab:student-plus")) is None
    )
    # identical except one tensor the three-tensor probe does not look at: the full comparison sees it
    edited = copy_model(LAB_STUDENT, tmp_path / "edited")
    edit_weights(edited, lambda t: t["model.layers.1.mlp.up_proj.weight"].mul_(1.001))
    assert same_model_warning(LAB_STUDENT, str(edited), student, load_model(edited)) is None
    with caplog.at_level(logging.WARNING, logger="opd"):
        opd_method.train(train_cfg(tmp_path, teacher=str(clone)))
    assert sum("every reward is ~0" in r.getMessage() for r in caplog.records) == 1


def test_padded_teacher_vocabulary_trains_and_is_noted_once(tmp_path, caplog):
    tok = build_byte_tokenizer()
    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"
    save_model(build_tiny_model(tok, seed=0), tok, student_dir)
    save_model(build_tiny_model(tok, vocab_size=len(tok) + 37, seed=1, num_layers=3), tok, teacher_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1"}) + "\n" for i in range(4)))
    with caplog.at_level(logging.INFO, logger="opd"):
        summary = opd_method.train(
            train_cfg(
                tmp_path, student=str(student_dir), teacher=str(teacher_dir), prompts=str(prompts), steps=2
            )
        )
    notes = [
        r.getMessage() for r in caplog.records if "rows" in r.getMessage() and "ignored" in r.getMessage()
    ]
    n = len(tok)
    assert notes == [
        f"teacher's embedding / output table has {n + 37} rows, more than the {n} token ids the tokenizers "
        f"share: ids 0-{n - 1} are scored and sampled, rows {n}-{n + 36} are ignored (padding past the "
        "tokenizer; this is fine)."
    ]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["kl/sampled"] > 0 for r in rows)
    before, after = load_model(student_dir).state_dict(), load_model(summary["final_model"]).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it learned


def test_padded_tables_are_reported_by_check_compatibility():
    tok = build_byte_tokenizer()
    report = check_compatibility(
        tok, tok, build_tiny_model(tok), build_tiny_model(tok, vocab_size=len(tok) + 5)
    )
    assert report.warnings == [] and len(report.notes) == 1 and report.notes[0].startswith("teacher's")


# ------------------------------------------------------------------------------------ prompt length


def fake_model(positions: int | None):
    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=positions))


def test_prompt_cap_is_the_shorter_context_minus_max_new_tokens():
    cap, why = prompt_token_cap(1024, 64, fake_model(256), fake_model(512))
    assert cap == 256 - 64
    assert why == (
        "capped from 1024: context 256 (max_position_embeddings: student 256, teacher 512) minus "
        "max_new_tokens=64"
    )
    assert prompt_token_cap(100, 64, fake_model(256), fake_model(512)) == (100, None)  # already fits
    assert prompt_token_cap(1024, 64, fake_model(None), fake_model(None)) == (1024, None)  # unknown
    assert prompt_token_cap(1024, 64, fake_model(None), fake_model(300))[0] == 236
    with pytest.raises(
        ValueError, match=r"max_new_tokens=256 leaves no room for a prompt: the models' context is 256"
    ):
        prompt_token_cap(1024, 256, fake_model(256), fake_model(512))


def test_prompts_longer_than_the_lab_models_context_are_dropped_and_counted(tmp_path, caplog):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    rows += [{"prompt": "1 + " * 100 + "1 = ?", "answer": "101"}] * 2  # > 256 - 32 tokens
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_tokenizer(LAB_STUDENT)("1 + " * 100)["input_ids"]) > 256  # too long for the context
    with caplog.at_level(logging.INFO, logger="opd"):
        opd_method.train(
            train_cfg(tmp_path, prompts=str(prompts), max_new_tokens=32)
        )  # max_prompt_tokens 1024
    msgs = [r.getMessage() for r in caplog.records]
    why = "capped from 1024: context 256 (max_position_embeddings: student 256, teacher 256) minus max_new_tokens=32"
    assert f"max_prompt_tokens=224 ({why})" in msgs
    assert (
        sum(f"dropped 2 prompt(s) longer than max_prompt_tokens=224 ({why}); 4 kept" in m for m in msgs) == 1
    )
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_max_new_tokens_filling_the_context_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"max_new_tokens=256 leaves no room .* context is 256 positions"):
        opd_method.train(train_cfg(tmp_path, max_new_tokens=256))
    argv = ["train", f"student={LAB_STUDENT}", f"teacher={LAB_TEACHER}", "prompts=lab:train"]
    err = one_line_cli_error(argv + [f"output_dir={tmp_path / 'cli'}", "max_new_tokens=300"], capsys)
    assert "max_new_tokens=300" in err and "256" in err


def test_diagnose_applies_the_same_prompt_cap_and_yaml_errors(tmp_path, capsys):
    from opd.diagnose import DiagnoseConfig, diagnose

    cfg = DiagnoseConfig(
        student=LAB_STUDENT,
        teacher=LAB_TEACHER,
        prompts="lab:test",
        output_dir=str(tmp_path / "d"),
        progress=False,
    )  # the default max_new_tokens=256 fills the lab models' 256 positions
    with pytest.raises(ValueError, match=r"max_new_tokens=256 leaves no room .* context is 256 positions"):
        diagnose(cfg)
    argv = ["diagnose", f"student={LAB_STUDENT}", f"teacher={LAB_TEACHER}", "prompts=lab:test"]
    err = one_line_cli_error(argv + ["chat_template_kwargs={enable_thinking: false"], capsys)
    assert "chat_template_kwargs: invalid YAML at line 1" in err
    err = one_line_cli_error(argv + ["thresholds={overlap_ratio_min: 0.5"], capsys)
    assert "thresholds: invalid YAML at line 1" in err
