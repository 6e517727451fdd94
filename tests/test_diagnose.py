"""opd diagnose: verdict rules on synthetic measurements, AUROC against a brute-force reference, the
tokenizer / template check, and end-to-end runs on tiny random models (all three report files)."""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import require_smollm2
from report_tables import check_diagnosis_report

from opd.config import ConfigError
from opd.diagnose import (
    FLAG_INCOMPATIBLE_PATTERN,
    FLAG_LITTLE_NEW,
    FLAG_NO_SIGNAL,
    FLAG_TOKENIZER,
    FLAG_TRUNCATED,
    FLAG_UNMEASURED,
    REMEDY_COLD_START,
    REMEDY_LONGER,
    REMEDY_PROMPTS,
    REMEDY_TEMPLATE,
    VERDICTS,
    DiagnoseConfig,
    DiagnoseThresholds,
    Evidence,
    auroc,
    decide,
    diagnose,
    template_check,
    token_rewards,
)

# ------------------------------------------------------------------------------------------- AUROC


def auroc_brute(scores, labels):
    """P(s+ > s-) + 0.5 P(s+ = s-) over all positive/negative pairs, straight from the definition."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_brute_force_with_ties(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 40)
    scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]  # many ties
    labels = [rng.random() < 0.4 for _ in range(n)]
    labels[0], labels[1] = True, False  # both classes present
    assert auroc(scores, labels) == pytest.approx(auroc_brute(scores, labels), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc([0.1, 0.2, 0.3], [False, True, True]) == 1.0
    assert auroc([0.3, 0.2, 0.1], [False, True, True]) == 0.0
    assert auroc([1.0, 1.0, 1.0, 1.0], [True, False, True, False]) == 0.5
    assert auroc([0.1, 0.2], [True, True]) is None
    assert auroc([], []) is None
    with pytest.raises(ValueError, match="one label per score"):
        auroc([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="NaN"):
        auroc([float("nan"), 0.2], [True, False])


# ----------------------------------------------------------------------------------- verdict rules


def test_verdict_module_is_pure():
    """opd/diagnose/verdict.py decides from numbers alone: loading it imports neither torch nor models."""
    import subprocess
    import sys

    import opd.diagnose.verdict as verdict

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('verdict_alone', {verdict.__file__!r})\n"
        "m = sys.modules['verdict_alone'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "assert m.decide(m.Evidence()).verdict == 'go'\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'numpy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def compatible(**kw) -> Evidence:
    """A compatible, capable teacher: every check passes."""
    base = dict(
        overlap_ratio=0.85,
        overlap_mass_student=0.98,
        overlap_mass_teacher=0.97,
        overlap_adv=-0.02,
        entropy_gap=0.1,
        first_token_entropy_student=0.3,
        first_token_entropy_teacher=0.35,
        reward_abs_mean=0.2,
        stop_reward=-0.1,
        accuracy_student=0.4,
        accuracy_teacher=0.8,
        accuracy_gap_se=0.05,
        continuation_advantage=0.3,
        continuation_advantage_se=0.05,
    )
    base.update(kw)
    return Evidence(**base)


def test_compatible_capable_teacher_is_go():
    v = decide(compatible())
    assert v.verdict == "go" and v.remedies == [] and v.flags == []
    assert all(c.passed is not False for c in v.checks)
    assert any("Condition (i) holds" in r for r in v.reasons)


def test_tokenizer_mismatch_is_no_go():
    v = decide(Evidence(tokenizer_compatible=False, tokenizer_error="token 'a': student id 1, teacher id 2"))
    assert v.verdict == "no-go" and FLAG_TOKENIZER in v.flags
    assert "student id 1" in v.reasons[0]


def test_identical_distributions_are_no_go():
    v = decide(compatible(overlap_ratio=1.0, overlap_adv=0.0, entropy_gap=0.0, reward_abs_mean=0.0))
    assert v.verdict == "no-go" and v.flags == [FLAG_NO_SIGNAL]


def test_no_capability_gap_is_no_go_flagged():
    v = decide(compatible(accuracy_teacher=0.42, continuation_advantage=0.0))
    assert v.verdict == "no-go" and FLAG_LITTLE_NEW in v.flags
    # the same holds when condition (i) also fails: nothing to learn comes first
    v = decide(compatible(accuracy_teacher=0.4, continuation_advantage=-0.1, overlap_ratio=0.2))
    assert v.verdict == "no-go" and FLAG_LITTLE_NEW in v.flags


def test_score_gap_that_vanishes_on_student_prefixes_is_little_new_capability():
    """Same-pipeline case (docs/paper.md §2): higher score, but indistinguishable from the student's view."""
    v = decide(compatible(accuracy_teacher=0.6, continuation_advantage=0.01))
    assert v.verdict == "no-go" and FLAG_LITTLE_NEW in v.flags


def test_incompatible_pattern_with_capability_needs_cold_start():
    for ev in (
        compatible(overlap_ratio=0.3),
        compatible(overlap_mass_teacher=0.5),
        compatible(overlap_adv=-0.5),
        compatible(entropy_gap=1.5),
        compatible(overlap_ratio=0.3, continuation_advantage=-0.2),  # teacher lost on the student's prefixes
    ):
        v = decide(ev)
        assert v.verdict == "go-after-remedy", ev
        assert v.remedies == [REMEDY_COLD_START]


def test_teacher_uncertain_on_prompts_needs_teacher_prompts():
    v = decide(
        compatible(overlap_ratio=0.3, first_token_entropy_teacher=2.0, first_token_entropy_student=0.3)
    )
    assert v.verdict == "go-after-remedy" and v.remedies == [REMEDY_PROMPTS]


def test_template_problems_need_teacher_template():
    v = decide(compatible(template_differs=True))
    assert v.verdict == "go-after-remedy" and v.remedies == [REMEDY_TEMPLATE]
    v = decide(compatible(stop_reward=-6.0))
    assert v.verdict == "go-after-remedy" and v.remedies == [REMEDY_TEMPLATE]
    v = decide(compatible(template_differs=True, overlap_ratio=0.2))
    assert v.remedies == [REMEDY_TEMPLATE, REMEDY_COLD_START]


def test_without_answers_condition_ii_is_unmeasured():
    no_answers = dict(accuracy_student=None, accuracy_teacher=None, continuation_advantage=None)
    v = decide(compatible(**no_answers))
    assert v.verdict == "go" and FLAG_UNMEASURED in v.flags
    assert any("unmeasured" in r for r in v.reasons)
    v = decide(compatible(overlap_ratio=0.2, **no_answers))
    assert v.verdict == "go-after-remedy" and v.remedies == [REMEDY_COLD_START]
    assert [c.passed for c in v.checks if c.id == "accuracy_gap"] == [None]


def test_thresholds_move_the_verdict():
    ev = compatible(overlap_ratio=0.35)
    assert decide(ev).verdict == "go-after-remedy"
    assert decide(ev, DiagnoseThresholds(overlap_ratio_min=0.3)).verdict == "go"


def test_gaps_within_sampling_noise_do_not_count():
    noisy = compatible(accuracy_teacher=0.48, accuracy_gap_se=0.1, continuation_advantage=0.08)
    noisy.continuation_advantage_se = 0.1
    v = decide(noisy)
    assert v.verdict == "no-go" and FLAG_LITTLE_NEW in v.flags
    acc = next(c for c in v.checks if c.id == "accuracy_gap")
    assert acc.threshold == pytest.approx(0.1) and acc.passed is False  # max(0.05, 1 x s.e.)
    assert decide(noisy, DiagnoseThresholds(significance_z=0.0)).verdict == "go"


def test_every_check_reports_value_and_threshold():
    v = decide(compatible())
    ids = {c.id for c in v.checks}
    assert {"overlap_ratio", "overlap_mass", "overlap_adv", "entropy_gap", "accuracy_gap"} <= ids
    assert {"continuation_advantage", "reward_size", "chat_template", "stop_reward", "tokenizer"} <= ids
    for c in v.checks:
        assert c.op in (">=", "<=", "==") and c.threshold is not None


def test_truncated_evidence_turns_a_no_go_into_inconclusive():
    """Cut-off answers cannot be graded: 'the teacher adds nothing' is then not established."""
    trunc = dict(truncated_frac=0.9, eval_truncated_frac=0.95, max_new_tokens=8)
    assert decide(compatible(accuracy_teacher=0.42, continuation_advantage=0.0)).verdict == "no-go"
    v = decide(compatible(accuracy_teacher=0.42, continuation_advantage=0.0, **trunc))
    assert v.verdict == "inconclusive" and v.remedies == [REMEDY_LONGER]
    assert FLAG_TRUNCATED in v.flags and FLAG_LITTLE_NEW in v.flags
    assert (
        "90% of the student's rollouts and up to 95% of the accuracy-check responses hit max_new_tokens=8"
        in (v.reasons[0])
    )
    assert "Rerun with a larger max_new_tokens (e.g. 32)" in v.reasons[0]
    assert "Without truncation this would read: The teacher adds nothing" in v.reasons[1]
    check = next(c for c in v.checks if c.id == "truncation")
    assert (check.value, check.op, check.threshold, check.passed) == (0.95, "<=", 0.5, False)
    # other verdicts keep their outcome and say the evidence is truncated
    v = decide(compatible(**trunc))
    assert v.verdict == "go" and FLAG_TRUNCATED in v.flags and "evidence is truncated" in v.reasons[-1]
    v = decide(compatible(overlap_ratio=0.3, **trunc))
    assert v.verdict == "go-after-remedy" and v.remedies == [REMEDY_COLD_START, REMEDY_LONGER]
    # the reward seen on the first few tokens only (often boilerplate both models agree on) is no proof
    v = decide(compatible(reward_abs_mean=0.001, **trunc))
    assert v.verdict == "inconclusive" and FLAG_NO_SIGNAL in v.flags and FLAG_TRUNCATED in v.flags
    # a tokenizer mismatch does not depend on lengths: it stays no-go
    v = decide(Evidence(tokenizer_compatible=False, **trunc))
    assert v.verdict == "no-go" and FLAG_TRUNCATED not in v.flags
    # at or under the threshold nothing changes; the threshold is configurable
    v = decide(compatible(accuracy_teacher=0.42, continuation_advantage=0.0, truncated_frac=0.5))
    assert v.verdict == "no-go" and FLAG_TRUNCATED not in v.flags
    th = DiagnoseThresholds(truncated_frac_max=0.96)
    assert (
        decide(compatible(accuracy_teacher=0.42, continuation_advantage=0.0, **trunc), th).verdict == "no-go"
    )


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="prefix_fractions"):
        DiagnoseConfig(prefix_fractions=(0.5, 1.0))
    with pytest.raises(ConfigError, match="temperature=0"):
        DiagnoseConfig(temperature=0)
    with pytest.raises(ConfigError, match="num_prompts"):
        DiagnoseConfig(num_prompts=0)
    with pytest.raises(ConfigError, match="overlap_ratio_min"):
        DiagnoseThresholds(overlap_ratio_min=1.5)
    with pytest.raises(ConfigError, match="missing required"):
        DiagnoseConfig().check_runnable()
    with pytest.raises(ConfigError, match=r"thresholds.significance_z='high': expected a number"):
        DiagnoseConfig(thresholds={"significance_z": "high"})
    assert DiagnoseConfig(thresholds="{truncated_frac_max: 1}").thresholds.truncated_frac_max == 1.0
    assert DiagnoseConfig(prefix_fractions=0.5).prefix_fractions == (0.5,)
    assert DiagnoseConfig(prefix_fractions="[]").prefix_fractions == ()
    assert DiagnoseConfig(max_new_tokens=100).bin_size(35) == 3
    assert DiagnoseConfig(position_bin=4).bin_size(35) == 4


# ------------------------------------------------------------------------------ template check


def test_template_check_shows_the_token_diff():
    from opd.tiny import build_byte_tokenizer

    student_tok, teacher_tok = build_byte_tokenizer(), build_byte_tokenizer()
    same = template_check(student_tok, teacher_tok, "What is 2+3?", "5", DiagnoseConfig())
    assert same["same_render"] and not same["template_differs"] and same["token_diff"] == []
    assert same["same_tokenization"] and not same["stop_ids_differ"]
    assert same["student"]["stop_tokens"] == ["<|im_end|>"]

    teacher_tok.chat_template = "<|im_start|>system\nBe brief.<|im_end|>\n" + student_tok.chat_template
    diff = template_check(student_tok, teacher_tok, "What is 2+3?", "5", DiagnoseConfig())
    assert diff["template_differs"] and not diff["same_render"]
    assert diff["token_diff"][0]["op"] == "insert" and diff["token_diff"][0]["student"] == []
    assert "".join(diff["token_diff"][0]["teacher"]).startswith("<|im_start|>system")
    # prompts rendered without a chat template: a template difference does not matter
    raw = template_check(student_tok, teacher_tok, "q", "a", DiagnoseConfig(use_chat_template=False))
    assert not raw["template_differs"]


# -------------------------------------------------------------------------------- end to end


def _cfg(student, teacher, prompts, out, **kw):
    base = dict(
        student=str(student),
        teacher=str(teacher),
        prompts=str(prompts),
        output_dir=str(out),
        num_prompts=5,
        rollouts_per_prompt=2,
        max_new_tokens=8,
        prefix_fractions=(0.0, 0.5),
        progress=False,
        seed=0,
    )
    base.update(kw)
    return DiagnoseConfig(**base)


def _check_outputs(out, result):
    for name in ("diagnosis.json", "diagnosis.md", "diagnosis.html"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "diagnosis.json").read_text())
    assert on_disk["verdict"] == result["verdict"] and on_disk["verdict"] in VERDICTS
    assert isinstance(on_disk["reasons"], list) and on_disk["reasons"]
    md = (out / "diagnosis.md").read_text()
    assert f"**Verdict: `{result['verdict']}`**" in md
    html = (out / "diagnosis.html").read_text()
    assert result["verdict"] in html
    assert not re.search(r'(src|href)="(?!data:)', html)
    return on_disk, md, html


@pytest.mark.parametrize(
    "objective, temperature", [("sampled", 1.0), ("topk", 1.0), ("sampled", 0.7), ("topk", 0.7)]
)
def test_rewards_in_lockstep_with_the_training_loop(tiny_pair, objective, temperature):
    """diagnose's per-token reward on a rollout batch equals the training loop's ``token_reward`` for the
    same settings (objective=sampled, or student-support top-K with student_p weights and K = 4, the
    student scored at the rollout temperature), although the two score in different micro-batch sizes."""
    from opd.config import OPDConfig
    from opd.diagnose.measure import sample_rollouts, score_rollouts
    from opd.methods.opd import score_batch
    from opd.models import load_model, load_tokenizer
    from opd.scoring import PolicyScorer

    student_dir, teacher_dir, _ = tiny_pair
    tok = load_tokenizer(str(student_dir))
    student, teacher = load_model(str(student_dir)), load_model(str(teacher_dir))
    prompts = [tok.encode(t) for t in ("What is 2 + 3?", "a", "a longer prompt here")]
    dcfg = DiagnoseConfig(
        rollouts_per_prompt=2,
        max_new_tokens=7,
        metrics_top_k=4,
        temperature=temperature,
        teacher_temperature=0.8,
        batch_size=4,
    )
    batch = sample_rollouts(student, tok, prompts, replace(dcfg, progress=False), len(tok))
    assert batch.input_ids_B_T.shape[0] == 6 and batch.response_mask_B_T.sum() > 6
    s_out, t_out = score_rollouts(student, teacher, batch, replace(dcfg, progress=False), len(tok))
    sampled_B_T, topk_B_T = token_rewards(s_out, t_out, batch.response_mask_B_T > 0)

    ocfg = OPDConfig(
        student=str(student_dir),
        teacher=str(teacher_dir),
        objective=objective,
        support_size=4,
        metrics_top_k=4,
        teacher_temperature=dcfg.teacher_temperature,
        temperature=dcfg.temperature,
        micro_batch_size=5,
    )
    scorers = [
        PolicyScorer(m, temperature=t, chunk_size=ocfg.score_chunk_size, vocab_limit=len(tok))
        for m, t in ((student, ocfg.temperature), (teacher, ocfg.teacher_temperature))
    ]
    loop = score_batch(*scorers, batch, ocfg)[0].token_reward_B_T
    ours = topk_B_T if objective == "topk" else sampled_B_T
    assert bool((ours != 0).any())
    torch.testing.assert_close(ours, loop, rtol=0, atol=1e-6)


def test_tiny_models_end_to_end(tiny_pair, tmp_path):
    student, teacher, prompts = tiny_pair
    out = tmp_path / "diag"
    threads = torch.get_num_threads()
    result = diagnose(_cfg(student, teacher, prompts, out))
    assert torch.get_num_threads() == threads  # restored
    d, md, html = _check_outputs(out, result)
    check_diagnosis_report(d, md, html)
    assert d["cost"]["threads"] == 1  # tiny models run single-threaded by default
    # every measured figure is there
    for key in (
        "overlap/ratio",
        "overlap/mass_student",
        "overlap/mass_teacher",
        "overlap/adv",
        "entropy/gap",
    ):
        assert key in d["condition_i"]["metrics"], key
    prof = d["condition_i"]["profile"]
    assert prof["bin_size"] == 1 and prof["overlap_ratio"]["start"][:2] == [0, 1]
    assert d["condition_ii"]["has_answers"] is True
    acc = d["condition_ii"]["accuracy"]
    assert 0 <= acc["student"]["accuracy"] <= 1 and 0 <= acc["teacher"]["accuracy"] <= 1
    cont = d["condition_ii"]["continuation"]
    assert [c["fraction"] for c in cont["by_fraction"]] == [0.0, 0.5]
    assert cont["by_fraction"][0]["depth_mean"] == 0
    assert d["condition_ii"]["reward"]["sampled_token"]["abs_mean"] > 0  # two random models disagree
    assert len(d["context"]["seq_mean_reward"]) == 10
    masses = d["context"]["seq_overlap_mass"]  # per rollout: min(student, teacher) mean mass on the overlap
    assert len(masses) == 10 and all(0 <= m <= 1 for m in masses)
    assert (
        min(masses)
        <= min(d["evidence"]["overlap_mass_student"], d["evidence"]["overlap_mass_teacher"]) + 1e-6
    )
    assert d["rollouts"]["num"] == 10
    g = d["cost"]["generated_tokens"]
    assert g["student_rollouts"] <= 10 * 8 and g["total"] <= d["cost"]["bound_generated_tokens"]
    assert d["cost"]["scored_sequences"] == {"student": 10, "teacher": 10}
    # plots: position profile, reward distribution, accuracy bars
    assert html.count('src="data:image/png;base64,') == 3
    assert (
        "## Condition (i)" in md and "## Condition (ii)" in md and "## Tokenizer, chat template and EOS" in md
    )


def test_teacher_equal_to_student_is_no_go(tiny_pair, tmp_path):
    """Measured, not read from the names: a copy of the student under another path is still no-go.
    Random tiny models never stop, so every rollout is truncated; the truncation rule (which would make
    the verdict inconclusive) is switched off to look at the measured evidence alone."""
    student, _, prompts = tiny_pair
    clone = tmp_path / "teacher-a-plus"
    shutil.copytree(student, clone)
    out = tmp_path / "same"
    th = DiagnoseThresholds(truncated_frac_max=1.0)
    result = diagnose(_cfg(student, clone, prompts, out, thresholds=th))
    _check_outputs(out, result)
    assert result["verdict"] == "no-go"
    assert FLAG_NO_SIGNAL in result["flags"]
    m = result["condition_i"]["metrics"]
    assert m["overlap/ratio"] == pytest.approx(1.0)
    assert m["overlap/adv"] == pytest.approx(0.0, abs=1e-6)
    assert m["entropy/gap"] == pytest.approx(0.0, abs=1e-5)
    assert result["condition_ii"]["accuracy"]["gap"] == 0
    assert result["condition_ii"]["continuation"]["advantage"] == 0


def test_mostly_truncated_lab_rollouts_give_an_inconclusive_verdict(tmp_path):
    """Lab models with max_new_tokens=3: no answer fits (both accuracies read 0) and the reward is seen on
    3 tokens only (it reads ~0 there): the verdict must not be a firm no-go but say the evidence is
    truncated and ask for a larger max_new_tokens."""
    out = tmp_path / "short"
    cfg = _cfg("lab:student", "lab:teacher-a-plus", "lab:test", out, max_new_tokens=3, num_prompts=6)
    result = diagnose(cfg)
    _check_outputs(out, result)
    assert result["rollouts"]["truncated_frac"] > 0.5
    assert result["evidence"]["truncated_frac"] == result["rollouts"]["truncated_frac"]
    assert result["verdict"] == "inconclusive" and result["remedies"] == [REMEDY_LONGER]
    assert FLAG_TRUNCATED in result["flags"]
    assert "max_new_tokens=3" in result["reasons"][0] and "larger max_new_tokens" in result["reasons"][0]
    # with room to answer, the same pair is judged on its evidence (the lab's working teacher: go)
    full = diagnose(
        _cfg(
            "lab:student",
            "lab:teacher-a-plus",
            "lab:test",
            tmp_path / "full",
            max_new_tokens=64,
            num_prompts=6,
        )
    )
    assert full["rollouts"]["truncated_frac"] <= 0.5 and FLAG_TRUNCATED not in full["flags"]


def test_tokenizer_mismatch_gives_no_go_report(tiny_pair, tmp_path):
    from opd.tiny import build_byte_tokenizer, build_tiny_model

    student, _, prompts = tiny_pair
    tok = build_byte_tokenizer(extra_tokens=["hello"])  # shifts the special-token ids
    other = tmp_path / "other"
    build_tiny_model(tok).save_pretrained(other)
    tok.save_pretrained(other)
    out = tmp_path / "mismatch"
    result = diagnose(_cfg(student, other, prompts, out))
    _check_outputs(out, result)
    assert result["verdict"] == "no-go" and FLAG_TOKENIZER in result["flags"]
    assert "different ids" in result["reasons"][0]


def test_cli_runs_diagnose(tiny_pair, tmp_path, capsys):
    """``opd diagnose`` takes opd train's style: an optional YAML file, then key=value overrides."""
    from opd.cli import main

    student, teacher, prompts = tiny_pair
    out = tmp_path / "cli"
    yaml_file = tmp_path / "diag.yaml"
    yaml_file.write_text(f"student: {student}\nteacher: {teacher}\nnum_prompts: 5\nmax_new_tokens: 6\n")
    # fmt: off
    rc = main(["diagnose", str(yaml_file), f"prompts={prompts}", f"output_dir={out}", "num_prompts=3",
               "rollouts_per_prompt=2", "prefix_fractions=[0.5]", "metrics_top_k=4", "progress=false",
               "thresholds={overlap_ratio_min: 0.05}"])
    # fmt: on
    assert rc == 0
    printed = capsys.readouterr().out
    d = json.loads((out / "diagnosis.json").read_text())
    assert f"verdict {d['verdict']}" in printed and str(out / "diagnosis.html") in printed
    assert d["config"]["metrics_top_k"] == 4 and d["config"]["prefix_fractions"] == [0.5]
    assert d["config"]["num_prompts"] == 3 and d["config"]["max_new_tokens"] == 6  # override wins over YAML
    assert d["config"]["thresholds"]["overlap_ratio_min"] == 0.05
    assert d["rollouts"]["num"] == 6
    base = ["diagnose", "student=x", "teacher=y", "prompts=z"]
    assert main([*base, "thresholds={overlap_ratio: 1}"]) == 2
    assert "did you mean 'overlap_ratio_min'?" in capsys.readouterr().err
    assert main([*base, "rollouts=2"]) == 2
    assert "unknown config key(s) for DiagnoseConfig: 'rollouts'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ slow: a real model


@pytest.fixture(scope="module")
def smollm2_pair(tmp_path_factory):
    """(student_dir, teacher_dir): SmolLM2-135M-Instruct and a 12-layer copy of it, as checkpoints."""
    gguf_path = require_smollm2()
    from opd.models import drop_layers, load_model, load_tokenizer, save_model

    root = tmp_path_factory.mktemp("smollm2-diag")
    teacher = load_model(gguf_path, dtype="bfloat16")
    tokenizer = load_tokenizer(gguf_path)
    teacher_dir = save_model(teacher, tokenizer, root / "teacher")
    student = drop_layers(teacher, [0, 1, 2, 3, 4, 5, 24, 25, 26, 27, 28, 29])
    student_dir = save_model(student, tokenizer, root / "student")
    return student_dir, teacher_dir


@pytest.mark.slow
def test_real_model_pair(smollm2_pair, tmp_path):
    """The same code on a real HF checkpoint pair (Llama architecture, 49k vocabulary, real chat template)."""
    student, teacher = smollm2_pair
    prompts = tmp_path / "arith.jsonl"
    rows = [
        {"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 3), (4, 4), (7, 1), (6, 3)]
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(
        num_prompts=3,
        rollouts_per_prompt=2,
        max_new_tokens=24,
        prefix_fractions=(0.5,),
        student_dtype="bfloat16",
        teacher_dtype="bfloat16",
        prompt_template="{problem} Put the final answer in \\boxed{}.",
        batch_size=8,
    )
    out = tmp_path / "real"
    result = diagnose(_cfg(student, teacher, prompts, out, **common))
    check_diagnosis_report(*_check_outputs(out, result))
    tk = result["tokenizer"]
    assert tk["compatible"] and tk["same_render"] and not tk["template_differs"]
    assert "<|im_end|>" in tk["student"]["stop_tokens"]
    m = result["condition_i"]["metrics"]
    assert 0 < m["overlap/ratio"] < 1  # a 12-of-30-layer copy agrees only partly with the full model
    assert result["condition_ii"]["reward"]["sampled_token"]["abs_mean"] > 0.01

    out = tmp_path / "same"
    # 24 new tokens truncate most responses; switch the truncation rule off to judge the evidence itself
    no_trunc = dict(num_prompts=2, thresholds=DiagnoseThresholds(truncated_frac_max=1.0))
    same = diagnose(_cfg(teacher, teacher, prompts, out, **(common | no_trunc)))
    _check_outputs(out, same)
    assert same["verdict"] == "no-go" and FLAG_NO_SIGNAL in same["flags"]
    assert same["condition_i"]["metrics"]["overlap/ratio"] == pytest.approx(1.0)


# ------------------------------------------------------------------ slow: the lab zoo's known verdicts

LAB_VERDICTS = {  # README and docs/diagnose.md: each pair's outcome is known by construction
    "teacher-a-plus": ("go", [], []),
    "teacher-b-plus": ("go-after-remedy", [REMEDY_COLD_START], [FLAG_INCOMPATIBLE_PATTERN]),
    "teacher-a-same": ("no-go", [], [FLAG_LITTLE_NEW]),
}


@pytest.mark.slow
@pytest.mark.parametrize("teacher", list(LAB_VERDICTS))
def test_lab_teacher_verdicts(teacher, tmp_path):
    """Each lab teacher gets its documented verdict, at the size docs/diagnose.md validated (the demo's
    setting: lab:train, 32 prompts x 2 rollouts, 96 new tokens, seed 0); ~15-25 s per teacher."""
    out = tmp_path / teacher
    cfg = DiagnoseConfig(
        student="lab:student",
        teacher=f"lab:{teacher}",
        prompts="lab:train",
        num_prompts=32,
        rollouts_per_prompt=2,
        max_new_tokens=96,
        output_dir=str(out),
        seed=0,
        progress=False,
    )
    result = diagnose(cfg)
    d, md, html = _check_outputs(out, result)
    check_diagnosis_report(d, md, html)
    verdict, remedies, flags = LAB_VERDICTS[teacher]
    assert (result["verdict"], result["remedies"], result["flags"]) == (verdict, remedies, flags), result[
        "reasons"
    ]
