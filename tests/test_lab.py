"""The lab: task world, prompt sets, tokenizer, zoo loading and reproducible zoo builds."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import require

from opd.lab import (
    PROMPT_SETS,
    LabModel,
    LabNameError,
    LabPrompts,
    lab_tokenizer,
    prompt_rows,
    resolve,
    world,
)
from opd.lab.build import build as build_zoo
from opd.lab.train import ModelSpec, encode_example, train_model

A_LINE = re.compile(r"(\d+)([+-]\d)=(\d+)")
B_LINE = re.compile(r"([+-]\d) -> (\d+)")


def _check_solution(p: world.Problem, pattern: str) -> None:
    """Recompute a solution line by line, independently of how it was generated."""
    text = p.solution(pattern)
    lines = text.split("\n")
    assert lines[-1] == f"\\boxed{{{p.answer}}}"
    v = p.start
    steps = lines[:-1]
    if pattern == "b":
        assert steps[0] == f"at {p.start}"
        steps = steps[1:]
    assert len(steps) == len(p.ops)
    for line, op in zip(steps, p.ops):
        if pattern == "a":
            m = A_LINE.fullmatch(line)
            assert m and int(m[1]) == v, line
            assert int(m[2]) == op and int(m[3]) == v + op, line
        else:
            m = B_LINE.fullmatch(line)
            assert m and int(m[1]) == op and int(m[2]) == v + op, line
        v += op
    assert str(v) == p.answer == str(eval(p.expr))  # the expression is plain Python arithmetic


@pytest.mark.parametrize("difficulty", world.DIFFICULTIES)
def test_solutions_compute_the_answer_for_many_seeds(difficulty):
    from opd.grading import grade

    for seed in range(300):
        p = world.sample_problem(random.Random(seed), difficulty)
        assert p.difficulty == difficulty
        assert world.N_OPS[0] <= len(p.ops) <= world.N_OPS[1]
        assert len(set(p.ops)) == len(p.ops)
        assert all(world.VALUE_RANGE[0] <= t <= world.VALUE_RANGE[1] for t in [p.start, *p.totals])
        mags = {abs(o) for o in p.ops}
        if difficulty == "easy":
            assert mags <= set(world.SMALL)
        else:
            assert mags & set(world.LARGE)
        for pattern in world.PATTERNS:
            _check_solution(p, pattern)
            assert grade(p.solution(pattern), p.answer)
            assert world.detect_pattern(p.solution(pattern)) == pattern


def test_patterns_differ_from_the_first_token():
    tok = lab_tokenizer()
    for seed in range(50):
        p = world.sample_problem(random.Random(seed), "hard")
        a, b = (tok.encode(p.solution(x), add_special_tokens=False) for x in world.PATTERNS)
        assert a[0] != b[0]


def test_generation_is_deterministic():
    assert world.sample_problem(random.Random(7), "hard") == world.sample_problem(random.Random(7), "hard")
    s1, s2 = world.problem_stream(3, "train"), world.problem_stream(3, "train")
    assert [next(s1) for _ in range(50)] == [next(s2) for _ in range(50)]
    assert prompt_rows("test") == prompt_rows("lab:test")


def test_prompt_sets_shape_and_disjoint_splits():
    sets = {name: prompt_rows(name) for name in PROMPT_SETS}
    assert len(sets["train"]) == 4000 and len(sets["test"]) == 400
    assert sets["test"] == sets["test-easy"] + sets["test-hard"]
    assert sets["train"] == sets["train-easy"] + sets["train-hard"]
    for name, rows in sets.items():
        if name.endswith(("-easy", "-hard")):
            assert {r["difficulty"] for r in rows} == {name.rsplit("-", 1)[1]}
        assert len({r["expr"] for r in rows}) == len(rows), f"{name} has duplicates"
        for r in rows[:20]:
            assert r["prompt"] == world.PROMPT_TEMPLATE.format(expr=r["expr"])
            assert "\\boxed{}" in r["prompt"] and r["answer"] == str(eval(r["expr"]))
    test = {r["expr"] for r in sets["test"]}
    assert not test & {r["expr"] for r in sets["train"]}
    # the zoo's training stream never yields a test problem
    stream = world.problem_stream(0, "train")
    assert not test & {next(stream).expr for _ in range(5000)}
    with pytest.raises(ValueError, match="lab:test-hard"):
        prompt_rows("validation")


def test_sequences_are_short():
    tok = lab_tokenizer()
    rows = prompt_rows("test")
    for pattern in world.PATTERNS:
        n = max(len(encode_example(tok, r["prompt"], r[f"solution_{pattern}"])[0]) for r in rows)
        assert n <= 112, (pattern, n)  # prompt + response + EOS, chat template included


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = lab_tokenizer()
    tok.save_pretrained(tmp_path)
    re_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert re_tok.eos_token == "<|im_end|>" and re_tok.eos_token_id == tok.eos_token_id
    assert re_tok.pad_token_id == tok.pad_token_id and len(re_tok) == len(tok)
    row = prompt_rows("test-hard")[0]
    msgs = [{"role": "user", "content": row["prompt"]}]
    for t in (tok, re_tok):
        head = t.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert head == f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
    for text in (row["prompt"], row["solution_a"], row["solution_b"], " a  b\n\n c\t{}\\"):
        ids = tok.encode(text, add_special_tokens=False)
        assert re_tok.encode(text, add_special_tokens=False) == ids
        assert re_tok.decode(ids) == text
    full, n_prompt = encode_example(re_tok, row["prompt"], row["solution_a"])
    assert full == encode_example(tok, row["prompt"], row["solution_a"])[0]
    assert full[-1] == re_tok.eos_token_id
    assert re_tok.decode(full[n_prompt:-1]) == row["solution_a"]


def test_resolve_is_the_one_lab_parser(tmp_path, monkeypatch):
    from opd.lab import zoo

    assert resolve("some/dir") is None and resolve(Path("lab")) is None and resolve("org/lab:x") is None
    model = resolve("lab:teacher-a-plus")
    assert isinstance(model, LabModel) and model.directory == zoo.zoo_dir() / "teacher-a-plus"
    prompts = resolve("lab:test-hard", kind="prompts")
    assert isinstance(prompts, LabPrompts) and prompts.rows() == prompt_rows("test-hard")
    # one message for every unknown or wrong-kind name, listing the valid ones
    for spec, kind in (("lab:teacher-c", None), ("lab:train", "model"), ("lab:student", "prompts")):
        with pytest.raises(LabNameError, match=r"lab models: lab:student, .*lab prompt sets: lab:train, "):
            resolve(spec, kind=kind)
    monkeypatch.setenv(zoo.ZOO_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="opd lab build"):
        resolve("lab:student", kind="model").require_built()


def _zoo_or_skip():
    from opd.lab import zoo

    try:
        return {n: resolve(f"lab:{n}").require_built() for n in zoo.MODEL_NAMES}
    except FileNotFoundError as e:
        require(False, f"zoo not built: {e}")


def test_zoo_models_load_and_answer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.lab import zoo
    from opd.lab.evaluate import evaluate_model

    paths = _zoo_or_skip()
    info = zoo.build_info()
    rows = prompt_rows("test-easy")[:16]
    for name, path in paths.items():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert tok.eos_token == "<|im_end|>" and model.config.eos_token_id == tok.eos_token_id
        assert zoo.weights_sha256(path) == info["models"][name]["sha256"]
        if name == "student":
            assert evaluate_model(model, tok, rows)["accuracy"] >= 0.5


def test_zoo_models_load_through_opd_models():
    from opd import models

    _zoo_or_skip()
    from opd.lab import zoo

    tok = models.load_tokenizer("lab:student")
    student = models.load_model("lab:student")
    assert tok.eos_token == "<|im_end|>"
    for name in zoo.MODEL_NAMES:
        teacher = models.load_model(f"lab:{name}")
        report = models.check_compatibility(
            tok, models.load_tokenizer(f"lab:{name}"), student, teacher, strict=True
        )
        assert report.vocab_limit == len(tok)


TINY = ModelSpec("tiny", "a", 0.5, hidden_size=32, num_layers=2, intermediate_size=64, steps=4)


def test_training_is_deterministic_and_learns():
    tok = lab_tokenizer()
    torch.set_num_threads(1)
    m1, log1 = train_model(TINY, tok, seed=0)
    m2, log2 = train_model(TINY, tok, seed=0)
    m3, _ = train_model(TINY, tok, seed=1)
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not all(torch.equal(sd1[k], sd3[k]) for k in sd1)
    assert log1["loss"] == log2["loss"]
    longer, log = train_model(replace(TINY, steps=30, lr=1e-2), tok, seed=0)
    assert log["loss"][-1][1] < log["loss"][0][1]


def test_build_rebuilds_identical_weights(tmp_path):
    """Two builds from the same seed (worker processes) give bit-identical weights and a loadable zoo."""
    from transformers import AutoModelForCausalLM

    from opd.lab import zoo

    specs = {"tiny": TINY, "tiny-plus": replace(TINY, name="tiny-plus", init_from="tiny", seed_offset=1)}
    kw = dict(seed=0, progress=False, workers=1, evaluate=False, specs=specs)
    info1 = build_zoo(tmp_path / "z1", **kw)
    info2 = build_zoo(tmp_path / "z2", **kw)
    for name in specs:
        assert info1["models"][name]["sha256"] == info2["models"][name]["sha256"]
        assert zoo.weights_sha256(tmp_path / "z1" / name) == info1["models"][name]["sha256"]
    assert info1["models"]["tiny"]["sha256"] != info1["models"]["tiny-plus"]["sha256"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "z1" / "tiny-plus")


@pytest.mark.slow
@pytest.mark.rebuild
def test_full_student_rebuild_matches_shipped_weights(tmp_path):
    """Retrain the shipped student from scratch: bit-identical on the machine/torch build that made it."""
    from opd.lab import zoo

    _zoo_or_skip()
    shipped = zoo.build_info()
    names = ["student-base", "student"]  # the student continues student-base
    info = build_zoo(tmp_path, seed=shipped["seed"], only=names, progress=False, evaluate=False)
    for name in names:
        assert info["models"][name]["sha256"] == shipped["models"][name]["sha256"], name
