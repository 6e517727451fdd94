"""`opd compare`: config validation names the run, gap-recovered and equal-budget accounting, an end-to-end
comparison of two OPD runs on the tiny pair (a fake evaluator stands in for ``opd.evaluation``, so the
numbers in the report can be checked exactly), and collecting finished runs instead of retraining."""

import json
from dataclasses import dataclass, field

import pytest

from opd import compare
from opd.cli import main
from opd.compare import (
    CompareConfig,
    aggregate,
    gap_recovered,
    load_compare_config,
    plan_runs,
    run_compare,
)
from opd.compare import run as compare_run
from opd.config import ConfigError
from opd.tracking import read_metrics

# --------------------------------------------------------------------------- a fake evaluator


@dataclass
class FakeSettings:
    samples: int = 2
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 6
    batch_size: int = 8
    speed: bool = True
    speed_batch_size: int = 8
    limit: int = 0
    seed: int = 0
    device: str = "auto"


@dataclass
class FakeBenchmark:
    name: str
    rows: list = field(default_factory=list)


class FakeEvaluation:
    """``opd.evaluation``'s contract; accuracy by model: student 0.2, teacher 0.6, any other model 0.4
    (0.5 on the second benchmark); records each call."""

    def __init__(self, teacher: str, student: str):
        self.teacher, self.student = teacher, student
        self.calls: list[str] = []
        self.EvalSettings = FakeSettings

    def load_benchmark(self, spec, data_dir=None, *, limit=0, seed=0, **kw):
        return FakeBenchmark(name=str(spec).split("/")[-1].replace(".jsonl", ""))

    def evaluate_model(self, model, benchmarks, settings, *, progress=True):
        self.calls.append(model)
        base = {self.student: 0.2, self.teacher: 0.6}.get(model, 0.4)
        out = {}
        for i, b in enumerate(benchmarks):
            acc = base + (0.1 if i == 1 and base == 0.4 else 0.0)
            out[b.name] = {"avg@k": acc, "avg@k_stderr": 0.05, "pass@k": acc, "k": settings.samples}
        return {
            "model": model,
            "params": 1234,
            "bytes": 4936,
            "benchmarks": out,
            "overall": {"avg@k": sum(v["avg@k"] for v in out.values()) / len(out), "avg@k_stderr": 0.04},
            "speed": {
                "tokens_per_s_batch1": 100.0,
                "tokens_per_s_batch": 400.0,
                "batch_size": 8,
                "ttft_s": 0.01,
                "per_token_latency_s": 0.01,
            },
            "predictions": [{"big": "x"}],
        }


@pytest.fixture
def fake_eval(tiny_pair, monkeypatch):
    student, teacher, _ = tiny_pair
    fake = FakeEvaluation(str(teacher), str(student))
    monkeypatch.setattr(compare_run, "_evaluation", lambda: fake)
    return fake


def compare_cfg(tiny_pair, tmp_path, **kw) -> CompareConfig:
    student, teacher, prompts = tiny_pair
    base = dict(
        student=str(student),
        teacher=str(teacher),
        prompts=str(prompts),
        eval_prompts=str(prompts),
        benchmarks=[str(prompts), "second"],
        budget_unit="student_loss_tokens",
        budget=30,
        output_dir=str(tmp_path / "cmp"),
        shared=dict(
            steps=20,
            prompts_per_step=2,
            rollouts_per_prompt=2,
            max_new_tokens=6,
            micro_batch_size=4,
            lr=1e-3,
            weight_decay=0.0,
            alerts=False,
            eval_every=2,
            eval_limit=4,
        ),
        runs=[
            {"name": "opd-topk", "method": "train", "overrides": {"support_size": 4}},
            {"name": "opd-sampled", "method": "train", "overrides": {"objective": "sampled"}},
        ],
        progress=False,
    )
    base.update(kw)
    return CompareConfig(**base)


# --------------------------------------------------------------------------- validation


def test_bad_run_key_fails_before_training_naming_the_run(tiny_pair, tmp_path):
    cfg = compare_cfg(
        tiny_pair,
        tmp_path,
        runs=[
            {"name": "good", "method": "train"},
            {"name": "bad-one", "method": "train", "overrides": {"support_sizes": 3}},
        ],
    )
    with pytest.raises(ConfigError) as e:
        plan_runs(cfg)
    msg = str(e.value)
    assert "run 'bad-one'" in msg and "'support_sizes'" in msg and "did you mean 'support_size'" in msg
    assert "\n" not in msg
    assert not (tmp_path / "cmp").exists()  # nothing trained, nothing written


def test_bad_value_and_unknown_method_name_the_run_and_the_fix(tiny_pair, tmp_path):
    cfg = compare_cfg(
        tiny_pair, tmp_path, runs=[{"name": "r1", "method": "train", "overrides": {"support": "x"}}]
    )
    with pytest.raises(
        ConfigError, match=r"run 'r1' \(opd train\): invalid config: support='x': choose one of"
    ):
        plan_runs(cfg)
    cfg = compare_cfg(tiny_pair, tmp_path, runs=[{"name": "r2", "method": "trian"}])
    with pytest.raises(
        ConfigError, match=r"run 'r2': method 'trian' is not a registered .*did you mean 'train'"
    ):
        plan_runs(cfg)


def test_runs_may_not_change_what_the_comparison_holds_fixed(tiny_pair, tmp_path):
    cfg = compare_cfg(tiny_pair, tmp_path, runs=[{"name": "r", "overrides": {"budget": 5}}])
    with pytest.raises(ConfigError, match=r"run 'r': overrides of budget are not allowed"):
        plan_runs(cfg)
    with pytest.raises(ConfigError, match=r"shared.seed: set by the comparison"):
        compare_cfg(tiny_pair, tmp_path, shared={"seed": 3})
    with pytest.raises(ConfigError, match=r"shared: key\(s\) 'stpes' \(did you mean 'steps'\?\)"):
        plan_runs(compare_cfg(tiny_pair, tmp_path, shared={"stpes": 3}))
    with pytest.raises(ConfigError, match=r"budget=0.0 with budget_unit=flops: give the budget"):
        compare_cfg(tiny_pair, tmp_path, budget_unit="flops", budget=0)
    with pytest.raises(ConfigError, match=r"name 'a' is used twice"):
        plan_runs(compare_cfg(tiny_pair, tmp_path, runs=[{"name": "a"}, {"name": "a"}]))


def test_plan_builds_one_config_per_run_and_seed(tiny_pair, tmp_path):
    cfg = compare_cfg(tiny_pair, tmp_path, seeds=[0, 1], teacher="")
    cfg.runs.append({"name": "other-teacher", "overrides": {"teacher": str(tiny_pair[0])}})
    cfg.teacher = str(tiny_pair[1])
    plan = plan_runs(cfg)
    assert [(p.name, p.seed) for p in plan] == [
        ("opd-topk", 0),
        ("opd-topk", 1),
        ("opd-sampled", 0),
        ("opd-sampled", 1),
        ("other-teacher", 0),
        ("other-teacher", 1),
    ]
    p = plan[3]
    assert (
        p.config.objective == "sampled"
        and p.config.seed == 1
        and p.config.budget == 30
        and p.config.steps == 20
    )
    assert p.out_dir == tmp_path / "cmp" / "opd-sampled" / "seed-1"
    assert plan[0].config.teacher == str(tiny_pair[1]) and plan[4].config.teacher == str(tiny_pair[0])


def test_compare_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: s\nprompts: p\nbenchmarks: [b]\nbudget: 1.0e9\nruns:\n  - {name: a}\n")
    cfg = load_compare_config(path, ["seeds=[0,1,2]", "output_dir=x"])
    assert cfg.seeds == [0, 1, 2] and cfg.output_dir == "x" and cfg.budget == 1e9
    with pytest.raises(
        ConfigError, match=r"unknown config key\(s\) for CompareConfig: 'sedes' \(did you mean 'seeds'\?\)"
    ):
        load_compare_config(path, ["sedes=[1]"])


# --------------------------------------------------------------------------- accounting


def test_gap_recovered():
    assert gap_recovered(0.4, 0.2, 0.6) == pytest.approx(0.5)
    assert gap_recovered(0.1, 0.2, 0.6) == pytest.approx(-0.25)  # worse than the start: negative
    assert gap_recovered(0.7, 0.2, 0.6) == pytest.approx(1.25)  # past the teacher: over 100%
    assert gap_recovered(0.4, 0.5, 0.5) is None  # no gap to recover
    assert gap_recovered(0.4, 0.6, 0.5) is None
    assert gap_recovered(None, 0.2, 0.6) is None


def test_error_bars_over_prompts_for_one_seed_over_seeds_for_several():
    def res(a, se):
        return {"benchmarks": {"b": {"avg@k": a, "avg@k_stderr": se}}, "overall": {"avg@k": a}}

    one = aggregate([res(0.5, 0.03)], "b")
    assert one == {"mean": 0.5, "err": 0.03, "err_kind": "prompts", "per_seed": [0.5]}
    three = aggregate([res(0.4, 0.03), res(0.5, 0.03), res(0.6, 0.03)], "b")
    assert three["mean"] == pytest.approx(0.5) and three["err_kind"] == "seeds"
    assert three["err"] == pytest.approx(0.1 / 3**0.5)  # sample sd 0.1, over sqrt(3)


# --------------------------------------------------------------------------- end to end


def test_compare_end_to_end_equal_budget_and_report(tiny_pair, tmp_path, fake_eval):
    cfg = compare_cfg(tiny_pair, tmp_path)
    summary = run_compare(cfg)
    out = tmp_path / "cmp"

    # equal budget: every run stopped by the budget, within one of its steps of it, exact amounts shown
    assert [r["name"] for r in summary["runs"]] == ["opd-topk", "opd-sampled"]
    spent = []
    for r in summary["runs"]:
        (s,) = r["seeds"]
        rows = read_metrics(out / r["name"] / "seed-0" / "metrics.jsonl")
        assert s["stopped_by_budget"] == s["steps_done"] < 20
        assert s["budget_spent"] == rows[-1]["cost/student_loss_tokens"]
        assert 30 <= s["budget_spent"] < 30 + s["largest_step"]
        assert rows[-2]["cost/student_loss_tokens"] < 30  # the step before had not reached it
        spent.append(s["budget_spent"])
        # training time: the timed train call (loading included), not only the summary's loop time
        assert s["train_time_measures"] == "call" and s["train_time_s"] >= s["wall_time_s"] > 0
        assert s["flops"] == rows[-1]["cost/flops"] > 0
    assert summary["budget_check"] == []
    md = (out / "report.md").read_text()
    for amount in spent:
        assert f"| {amount:.6g} |" in md

    # accuracy, error bars and gap recovered from the (fake) evaluations
    r = summary["runs"][0]
    bench = summary["benchmarks"]
    assert bench == ["prompts", "second"]
    assert r["accuracy"]["prompts"]["mean"] == pytest.approx(0.4) and r["accuracy"]["prompts"]["err"] == 0.05
    assert r["gap_recovered"]["prompts"] == pytest.approx(0.5)  # (0.4 - 0.2) / (0.6 - 0.2)
    assert r["gap_recovered"]["second"] == pytest.approx(0.75)  # (0.5 - 0.2) / (0.6 - 0.2)
    assert r["params"] == 1234 and r["speed"]["tokens_per_s_batch1"] == 100.0
    assert "0.400 ± 0.050" in md and "50.0%" in md and "75.0%" in md

    # the accuracy-vs-FLOPs curve comes from metrics.jsonl eval rows
    rows = read_metrics(out / "opd-topk" / "seed-0" / "metrics.jsonl")
    curve = compare.accuracy_curve(rows)
    assert curve[0][0] == 0.0 and len(curve) == len([x for x in rows if "eval/accuracy" in x])
    assert all(b[0] > a[0] for a, b in zip(curve, curve[1:]))

    # files: md, self-contained html, png plots, compare.json without predictions
    for name in ("report.md", "report.html", "accuracy.png", "accuracy_vs_flops.png", "compare.json"):
        assert (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and 'src="http' not in html
    assert "predictions" not in (out / "compare.json").read_text()
    # student, teacher, two final models: each evaluated once
    assert len(fake_eval.calls) == 4


def test_finished_runs_are_collected_not_retrained(tiny_pair, tmp_path, fake_eval, monkeypatch):
    cfg = compare_cfg(
        tiny_pair, tmp_path, budget=12, shared={**compare_cfg(tiny_pair, tmp_path).shared, "eval_every": 0}
    )
    first = run_compare(cfg)
    n_calls = len(fake_eval.calls)

    from opd.methods import opd as opd_method

    def no_training(cfg):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(opd_method, "train", no_training)
    import opd.methods

    methods = tuple(
        m.__class__(m.command, m.config, no_training, m.help, m.description) for m in opd.methods.METHODS
    )
    monkeypatch.setattr(opd.methods, "METHODS", methods)
    second = run_compare(cfg)
    assert [r["seeds"] for r in second["runs"]] == [r["seeds"] for r in first["runs"]]  # times kept too
    assert len(fake_eval.calls) == n_calls  # evaluations collected too

    # a changed setting: refused without overwrite, naming the run and the fix
    changed = compare_cfg(tiny_pair, tmp_path, budget=12, shared={**cfg.shared, "lr": 2e-3})
    with pytest.raises(
        ConfigError, match=r"run 'opd-topk' seed 0: .* other settings \(lr: 0.001 -> 0.002\).*overwrite=true"
    ):
        run_compare(changed)


def test_interrupted_run_is_resumed(tiny_pair, tmp_path, fake_eval):
    cfg = compare_cfg(tiny_pair, tmp_path, runs=[{"name": "a", "overrides": {"support_size": 4}}], budget=30)
    cfg.shared.update(save_every=1, eval_every=0)
    (p,) = plan_runs(cfg)
    assert compare.run_state(p) == ("train", "new")
    # an interrupted run: a checkpoint after step 1, no final model, the summary of an interruption
    import dataclasses
    import shutil

    from opd.methods import opd as opd_method

    opd_method.train(dataclasses.replace(p.config, steps=2, progress=False))
    first_row = read_metrics(p.out_dir / "metrics.jsonl")[0]
    shutil.rmtree(p.out_dir / "final")
    (p.out_dir / "summary.json").write_text(json.dumps({"final_model": None, "interrupted": "SIGTERM"}))
    assert compare.run_state(p)[0] == "resume"

    summary = run_compare(cfg)
    (s,) = summary["runs"][0]["seeds"]
    rows = read_metrics(p.out_dir / "metrics.jsonl")
    assert rows[0] == first_row  # step 1 kept: continued from the checkpoint, not retrained
    assert [r["step"] for r in rows] == list(range(1, s["steps_done"] + 1))
    assert s["stopped_by_budget"] == s["steps_done"] and s["budget_spent"] >= 30


def test_cli_compare_reports_config_errors_in_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        "student: s\nteacher: t\nprompts: p\nbenchmarks: [b]\nbudget: 10\nruns:\n"
        "  - {name: x, method: train, overrides: {learning_rate: 1}}\n"
    )
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opd: config error: run 'x' (opd train): unknown config key(s)") and "\n" not in err
    assert "'learning_rate'" in err
    assert main(["compare"]) == 2
    assert "opd compare needs a compare config" in capsys.readouterr().err


def test_shipped_lab_config_is_valid_and_lists_every_method():
    from pathlib import Path

    cfg = load_compare_config(Path(__file__).resolve().parents[1] / "configs" / "compare_lab.yaml")
    plan = plan_runs(cfg)  # every run's config validates through its method's config class
    assert {p.method.command for p in plan} == {"train", "sft", "kd", "gkd", "grpo"}
    teachers = {p.name: getattr(p.config, "teacher", "") for p in plan}
    assert teachers["opd-b-plus"] == "lab:teacher-b-plus" and teachers["grpo"] == ""
    assert {t for n, t in teachers.items() if n not in ("opd-b-plus", "grpo")} == {"lab:teacher-a-plus"}
    assert {p.config.objective for p in plan if p.name.startswith("opd-")} == {"topk", "sampled"}
    assert cfg.budget_unit == "flops" and cfg.budget > 0
    assert all(p.config.budget == cfg.budget and p.config.steps >= 1000 for p in plan)


def test_compare_with_the_real_evaluator(tiny_pair, tmp_path):
    """The same pipeline through opd.evaluation (random tiny models: the numbers are near 0; this checks
    the wiring of the evaluator's result into the report)."""
    cfg = compare_cfg(
        tiny_pair,
        tmp_path,
        benchmarks=[str(tiny_pair[2])],
        evaluation=dict(
            samples=2,
            max_new_tokens=6,
            batch_size=8,
            limit=4,
            speed_new_tokens=4,
            speed_repeats=1,
            device="cpu",
        ),
    )
    summary = run_compare(cfg)
    (bench,) = summary["benchmarks"]
    student = summary["baselines"]["student"]
    assert student["params"] > 0 and student["speed"]["tokens_per_s_batch1"] > 0
    for r in summary["runs"]:
        acc = r["accuracy"][bench]
        assert 0.0 <= acc["mean"] <= 1.0 and acc["err_kind"] == "prompts"
        assert r["params"] == student["params"] and r["speed"]["per_token_latency_s"] > 0
        assert r["seeds"][0]["budget_spent"] >= 30
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert f"{bench} acc" in md and "opd-topk" in md and "opd-sampled" in md
    cached = sorted(p.name for p in (tmp_path / "cmp" / "evaluations").iterdir())
    assert cached == [
        "opd-sampled-seed-0.json",
        "opd-topk-seed-0.json",
        "student.json",
        compare_run._slug(f"teacher-{tiny_pair[1]}") + ".json",
    ]


def test_collect_only_names_the_runs_that_are_not_finished(tiny_pair, tmp_path):
    cfg = compare_cfg(tiny_pair, tmp_path, collect_only=True)
    with pytest.raises(
        ConfigError, match=r"collect_only=true but .*opd-topk seed 0 \(new\), opd-sampled seed 0 \(new\)"
    ):
        compare.train_or_collect(cfg, plan_runs(cfg))
    assert not (tmp_path / "cmp").exists()


def test_flops_to_reach_an_accuracy():
    from opd.compare.report import flops_to_reach, reach_rows

    curve = [(0.0, 0.5), (10.0, 0.55), (20.0, 0.7), (30.0, 0.65)]
    assert flops_to_reach(curve, 0.55) == 10.0 and flops_to_reach(curve, 0.6) == 20.0
    assert flops_to_reach(curve, 0.8) is None
    summary = {"runs": [{"name": "a", "seeds": [{"seed": 0}, {"seed": 1}]}]}
    rows_a = [{"step": 0, "eval/accuracy": 0.5}, {"step": 2, "eval/accuracy": 0.7, "cost/flops": 40.0}]
    rows_b = [{"step": 0, "eval/accuracy": 0.5}, {"step": 2, "eval/accuracy": 0.6, "cost/flops": 20.0}]
    headers, rows = reach_rows(summary, {("a", 0): rows_a, ("a", 1): rows_b}, [0.6, 0.7])
    assert headers[1:] == ["FLOPs to eval/accuracy ≥ 0.6", "FLOPs to eval/accuracy ≥ 0.7"]
    assert rows == [["a", "30 (2/2 seeds)", "40 (1/2 seeds)"]]
