"""Benchmarks, the avg@k / pass@k estimators, `opd eval` and `opd grade`."""

import csv
import itertools
import json
import math
import statistics

import pytest
from conftest import SHARED_DATA, require

from opd.benchmarks import load_benchmark
from opd.cli import main
from opd.config import ConfigError
from opd.estimators import mean_stderr, metrics_from_predictions, pass_at_k, regrade, summarize
from opd.evaluation import EvalSettings, evaluate_model, load_eval_config, read_predictions

BENCH_DIR = SHARED_DATA / "benchmarks"
SCHEMA = {"id", "prompt", "answer", "source"}


# ------------------------------------------------------------------------------------------- estimators


def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(16, 3, 1) == pytest.approx(3 / 16)  # pass@1 is the fraction correct
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 1, 16) == 1.0


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def _records(correct_by_prompt, model="m", bench="b", length=10):
    return [
        {
            "model": model,
            "benchmark": bench,
            "id": str(p),
            "sample": s,
            "prompt": "q",
            "response": "\\boxed{1}" if ok else "no box",
            "answer": "1",
            "correct": ok,
            "truncated": s == 0,
            "has_answer": ok,
            "length": length + s,
        }
        for p, row in enumerate(correct_by_prompt)
        for s, ok in enumerate(row)
    ]


def test_summarize_against_definitions():
    rows = [[1, 0, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]]
    m = summarize(_records([[bool(x) for x in r] for r in rows]))
    per_prompt = [sum(r) / 4 for r in rows]
    assert m["k"] == 4 and m["n_prompts"] == 5 and m["n_samples"] == 20
    assert m["avg@k"] == pytest.approx(statistics.mean(per_prompt))
    assert m["avg@k_stderr"] == pytest.approx(statistics.stdev(per_prompt) / math.sqrt(5))
    assert m["pass@k"] == pytest.approx(4 / 5)  # k = n: any sample correct
    pass2 = [_pass_at_k_brute(4, sum(r), 2) for r in rows]
    assert m["pass_at"]["2"] == pytest.approx(statistics.mean(pass2))
    assert m["pass_at"]["1"] == pytest.approx(m["avg@k"])
    assert m["pass@k_stderr"] == pytest.approx(statistics.stdev([float(any(r)) for r in rows]) / math.sqrt(5))
    assert m["truncated_rate"] == pytest.approx(0.25)  # sample 0 of each prompt
    assert m["mean_length"] == pytest.approx(11.5)
    assert m["no_answer_rate"] == pytest.approx(1 - sum(map(sum, rows)) / 20)


def test_stderr_undefined_for_one_prompt_and_counts_must_match():
    assert mean_stderr([0.5]) == (0.5, None)
    assert summarize(_records([[True, False]]))["avg@k_stderr"] is None
    with pytest.raises(ValueError, match="different sample counts"):
        summarize(_records([[True, False], [True]]))


def test_overall_pools_prompts_across_benchmarks():
    recs = _records([[True], [False], [False]], bench="a") + _records([[True]], bench="b")
    m = metrics_from_predictions(recs)["m"]
    assert m["benchmarks"]["a"]["avg@k"] == pytest.approx(1 / 3)
    assert m["benchmarks"]["b"]["avg@k"] == 1.0
    assert m["overall"]["avg@k"] == pytest.approx(2 / 4)  # each prompt weighs the same
    assert m["overall"]["n_prompts"] == 4


def test_regrade_recomputes_verdicts():
    recs = _records([[True, True]])
    recs[1]["response"] = "so the answer is \\boxed{2}"
    fresh = regrade(recs, progress=False)
    assert [r["correct"] for r in fresh] == [True, False]
    assert [r["has_answer"] for r in fresh] == [True, True]
    assert recs[1]["correct"] is True  # the input is not modified


# ------------------------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize(
    "name,count", [("aime24", 30), ("aime25", 30), ("amc23", 83), ("math500", 500), ("gsm8k", 1319)]
)
def test_real_benchmark_files_load_into_the_schema(name, count):
    require(BENCH_DIR.is_dir(), f"benchmark files not found in {BENCH_DIR}")
    bench = load_benchmark(name, BENCH_DIR)
    assert len(bench.rows) == count
    assert all(set(r) == SCHEMA for r in bench.rows)
    assert len({r["id"] for r in bench.rows}) == count
    assert all(isinstance(r["answer"], str) and r["answer"] for r in bench.rows)
    assert all(isinstance(r["prompt"], (str, list)) and r["prompt"] for r in bench.rows)
    by_path = load_benchmark(bench.path)
    assert by_path.rows == bench.rows and by_path.name == bench.name


def test_gsm8k_answer_is_the_number_after_the_hashes():
    require((BENCH_DIR / "gsm8k-test.jsonl").is_file(), "gsm8k-test.jsonl not found")
    bench = load_benchmark("gsm8k", BENCH_DIR)
    assert bench.name == "gsm8k-test"
    raw = json.loads((BENCH_DIR / "gsm8k-test.jsonl").read_text().splitlines()[0])
    assert bench.rows[0]["answer"] == raw["answer"].rsplit("####", 1)[1].strip()
    assert all("####" not in r["answer"] for r in bench.rows)
    assert all(r["answer"].replace(",", "").lstrip("-").replace(".", "").isdigit() for r in bench.rows)


def test_lab_sets_load_with_answers():
    bench = load_benchmark("lab:test")
    assert bench.name == "lab:test" and bench.path is None
    assert len(bench.rows) == 400
    assert {r["source"] for r in bench.rows} == {"lab:test"}
    assert all(set(r) == SCHEMA for r in bench.rows)


def test_limit_is_a_seeded_sample_in_file_order():
    full = load_benchmark("lab:test")
    a = load_benchmark("lab:test", limit=10, seed=1)
    assert len(a.rows) == 10
    assert a.rows == load_benchmark("lab:test", limit=10, seed=1).rows
    assert a.rows != load_benchmark("lab:test", limit=10, seed=2).rows
    pos = [full.rows.index(r) for r in a.rows]
    assert pos == sorted(pos)
    assert {r["answer"] for r in a.rows} <= {r["answer"] for r in full.rows}
    assert full.subset(10, seed=1).rows == a.rows  # evaluate_model's settings.limit draws the same sample
    assert a.subset(10, seed=1) is a and full.subset(0) is full


def test_user_jsonl_and_csv_with_a_field_mapping(tmp_path):
    rows = [{"q": f"What is {i} + 1?", "sol": str(i + 1), "data_source": "toy"} for i in range(5)]
    jsonl = tmp_path / "toy.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "toy2.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["q", "sol"])
        w.writeheader()
        w.writerows({"q": r["q"], "sol": r["sol"]} for r in rows)
    for spec, source in ((str(jsonl), "toy"), ("toy2", "toy2")):
        bench = load_benchmark(spec, tmp_path, prompt_field="q", answer_field="sol")
        assert [r["answer"] for r in bench.rows] == ["1", "2", "3", "4", "5"]
        assert [r["id"] for r in bench.rows] == ["0", "1", "2", "3", "4"]
        assert bench.rows[2] == {"id": "2", "prompt": "What is 2 + 1?", "answer": "3", "source": source}
    with pytest.raises(ValueError, match="answer_field=<name>"):  # auto finds no answer field
        load_benchmark(str(jsonl), prompt_field="q")
    with pytest.raises(ValueError, match="prompt_field=<name>"):
        load_benchmark(str(jsonl), answer_field="sol")


def test_missing_answer_in_a_row_names_the_row(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"problem": "a", "answer": "1"}) + "\n" + json.dumps({"problem": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1 has no answer in field 'answer'"):
        load_benchmark(str(f))


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_benchmark("aime24")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_benchmark(str(tmp_path / "nope.parquet"))
    (tmp_path / "aime24.parquet").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"it holds: aime24\.parquet"):
        load_benchmark("aime99", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_benchmark("aime24", tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown lab prompt set"):
        load_benchmark("lab:nope")


# ------------------------------------------------------------------------------------------- settings


def test_settings_defaults_are_the_study_and_quick_is_smaller():
    s = EvalSettings()
    assert (s.samples, s.temperature, s.top_p) == (16, 0.7, 0.95)
    q = EvalSettings.quick()
    assert q.samples < s.samples and q.limit > 0 and q.max_new_tokens < s.max_new_tokens
    assert EvalSettings(temperature=0).n == 1
    with pytest.raises(ConfigError, match="samples=0"):
        EvalSettings(samples=0)
    with pytest.raises(ConfigError, match="top_p"):
        EvalSettings(top_p=0)


def test_eval_config_flags_overrides_and_preset(tmp_path):
    cfg = load_eval_config(
        None,
        ["samples=3", "models=lab:student"],
        models=["lab:teacher-a-plus"],
        benchmarks=["lab:test"],
        quick=True,
    )
    assert cfg.models == ("lab:student", "lab:teacher-a-plus")
    assert cfg.benchmarks == ("lab:test",)
    assert cfg.samples == 3  # an explicit key wins over the preset
    assert cfg.limit == EvalSettings.quick().limit
    with pytest.raises(ConfigError, match="did you mean 'samples'"):
        load_eval_config(None, ["sample=3"])
    yaml_file = tmp_path / "eval.yaml"
    yaml_file.write_text("models: [lab:student, lab:teacher-a-plus]\nbenchmarks: lab:test\npreset: quick\n")
    cfg = load_eval_config(yaml_file, ["limit=5"], benchmarks=["lab:test-hard"])
    assert cfg.models == ("lab:student", "lab:teacher-a-plus")
    assert cfg.benchmarks == ("lab:test", "lab:test-hard")
    assert (cfg.limit, cfg.samples) == (5, EvalSettings.quick().samples)
    assert load_eval_config(None, ["models=[a, b]"]).models == ("a", "b")
    with pytest.raises(ConfigError, match="preset='fast'"):
        load_eval_config(None, ["preset=fast"])


# ------------------------------------------------------------------------------------------- end to end


def test_evaluate_model_greedy_on_lab_agrees_with_the_trainer_evaluator():
    from opd.data import load_prompts
    from opd.evaluate import evaluate_accuracy
    from opd.models import load_model, load_tokenizer

    bench = load_benchmark("lab:test", limit=6, seed=0)
    settings = EvalSettings(temperature=0, max_new_tokens=96, speed=False)
    res = evaluate_model("lab:student", [bench], settings, progress=False)
    assert set(res) == {"model", "params", "bytes", "benchmarks", "overall", "speed", "predictions"}
    assert res["speed"] is None and res["params"] > 0 and res["bytes"] == 4 * res["params"]
    m = res["benchmarks"]["lab:test"]
    assert m["k"] == 1 and m["n_prompts"] == 6 and len(res["predictions"]) == 6
    assert [p["id"] for p in res["predictions"]] == [r["id"] for r in bench.rows]

    tok = load_tokenizer("lab:student")
    ps = load_prompts("lab:test", tok, prompt_field="prompt", answer_field="answer", rows=bench.rows)
    ref = evaluate_accuracy(load_model("lab:student"), tok, ps, max_new_tokens=96, progress=False)
    assert m["avg@k"] == pytest.approx(ref["accuracy"])
    assert m["mean_length"] == pytest.approx(ref["response_length_mean"])
    assert m["truncated_rate"] == pytest.approx(ref["truncated_frac"])


def test_opd_eval_and_grade_end_to_end(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "--model",
            "lab:student",
            "--benchmark",
            "lab:test",
            "--quick",
            "--output-dir",
            str(out),
            "limit=4",
            "samples=2",
            "max_new_tokens=96",
            "speed_new_tokens=4",
            "speed_batch_size=2",
            "speed_repeats=1",
            "progress=false",
        ]
    )
    assert rc == 0
    for name in ("eval.json", "eval.md", "eval.html", "predictions.jsonl"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "eval.json").read_text())
    (res,) = summary["models"]
    assert res["model"] == "lab:student"
    m = res["benchmarks"]["lab:test"]
    assert m["k"] == 2 and m["n_prompts"] == 4
    for key in ("avg@k", "avg@k_stderr", "pass@k", "mean_length", "truncated_rate", "no_answer_rate"):
        assert isinstance(m[key], float), key
    assert 0 <= m["avg@k"] <= m["pass@k"] <= 1
    speed = res["speed"]
    assert speed["batch_size"] == 2 and speed["new_tokens"] == 4
    for key in ("tokens_per_s_batch1", "tokens_per_s_batch", "ttft_s", "per_token_latency_s"):
        assert speed[key] > 0, key
    preds = read_predictions(out / "predictions.jsonl")
    assert len(preds) == 8 and {p["sample"] for p in preds} == {0, 1}
    assert "avg@k" in (out / "eval.md").read_text() and "<table>" in (out / "eval.html").read_text()
    assert "lab:student" in capsys.readouterr().out

    rc = main(
        ["grade", str(out / "predictions.jsonl"), "--output-dir", str(tmp_path / "grade"), "--no-progress"]
    )
    assert rc == 0
    graded = json.loads((tmp_path / "grade" / "grade.json").read_text())
    assert graded["changed"] == 0
    (g,) = graded["models"]
    assert g["benchmarks"]["lab:test"] == {k: v for k, v in m.items() if k != "n_dropped"}
    assert g["overall"]["avg@k"] == res["overall"]["avg@k"]
    assert (tmp_path / "grade" / "grade.md").is_file() and (tmp_path / "grade" / "grade.html").is_file()


def test_opd_eval_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "--model", "lab:student", "--output-dir", str(tmp_path / "x")]) == 2
    assert "give at least one model and one benchmark" in capsys.readouterr().err
    assert (
        main(["eval", "--model", "lab:student", "--benchmark", "aime24", "--output-dir", str(tmp_path / "x")])
        == 2
    )
    assert "--data-dir" in capsys.readouterr().err
    assert main(["grade", str(tmp_path / "missing.jsonl")]) == 2
    assert "predictions file" in capsys.readouterr().err


def test_a_benchmark_that_never_asks_for_a_box_is_warned_about(tmp_path, caplog):
    f = tmp_path / "plain.jsonl"
    f.write_text(
        "".join(json.dumps({"question": f"Compute {i}+1.", "answer": str(i + 1)}) + "\n" for i in range(2))
    )
    settings = EvalSettings(temperature=0, max_new_tokens=8, speed=False)
    with caplog.at_level("WARNING", logger="opd.eval"):
        res = evaluate_model("lab:student", [load_benchmark(str(f))], settings, progress=False)
    assert "no prompt asks for a \\boxed{} answer" in caplog.text
    assert res["benchmarks"]["plain"]["n_prompts"] == 2
    templated = EvalSettings(
        temperature=0, max_new_tokens=8, speed=False, prompt_template="{problem} \\boxed{}"
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="opd.eval"):
        evaluate_model("lab:student", [load_benchmark(str(f))], templated, progress=False)
    assert "no prompt asks" not in caplog.text


def test_speed_measurement_counts_exact_tokens_and_rejects_bad_settings():
    from opd.models import load_model, load_tokenizer
    from opd.serving import measure_speed, model_size

    model, tok = load_model("lab:student"), load_tokenizer("lab:student")
    params, nbytes = model_size(model)
    assert params == sum(p.numel() for p in model.parameters()) and nbytes == 4 * params
    prompt = tok("Compute 1+2.")["input_ids"]
    s = measure_speed(model, tok, prompt, batch_size=3, new_tokens=5, repeats=1, progress=False)
    assert (s["batch_size"], s["new_tokens"], s["prompt_tokens"]) == (3, 5, len(prompt))
    assert s["tokens_per_s_batch1"] > 0 and s["tokens_per_s_batch"] > 0 and s["ttft_s"] > 0
    assert s["device"] == "cpu" and s["dtype"] == "float32"
    with pytest.raises(ValueError, match="speed_new_tokens=1"):
        measure_speed(model, tok, prompt, new_tokens=1, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        measure_speed(model, tok, prompt, new_tokens=300, progress=False)
