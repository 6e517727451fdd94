"""Tests for opd.data: sources, field mapping, templates, chat rendering, length filter, sampler."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import SHARED_DATA, require, require_module

from opd.data import RENDER_KEYS, PromptSet, load_prompts, rendering, resolve_prompt_field
from opd.datafiles import read_rows
from opd.lab import LabNameError, prompt_rows
from opd.sampler import PromptSampler
from opd.teacher_data import field_sequences
from opd.tiny import CHATML_TEMPLATE, build_byte_tokenizer

SHARED = SHARED_DATA
BOXED = "Please reason step by step, and put your final answer within \\boxed{}."

ROWS = [
    {"problem": "What is 1+1?", "answer": "2"},
    {"problem": "What is 2+3?", "answer": "5"},
    {"problem": "What is 7*6?", "answer": "42"},
]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def thinking_tok():
    """ChatML plus a thinking switch read from the chat_template_kwargs (like Qwen3's template)."""
    t = build_byte_tokenizer()
    t.chat_template = CHATML_TEMPLATE + (
        "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
        "<think>\n\n</think>\n\n{% endif %}"
    )
    return t


def _write(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".csv":
        import pandas as pd

        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        raise AssertionError(suffix)
    return path


# ---------------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_file_format(tmp_path, tok, suffix):
    path = _write(tmp_path / f"p{suffix}", ROWS)
    assert read_rows(path) == ROWS
    ps = load_prompts(path, tok)
    assert isinstance(ps, PromptSet) and len(ps) == 3
    assert (ps.prompt_field, ps.answer_field) == ("problem", "answer")
    assert [e.answer for e in ps.examples] == ["2", "5", "42"]
    assert ps.source == str(path)
    ex = ps[2]
    assert ex.text == "What is 7*6?"
    assert ex.rendered == "<|im_start|>user\nWhat is 7*6?<|im_end|>\n<|im_start|>assistant\n"
    assert ex.input_ids == tok(ex.rendered, add_special_tokens=False)["input_ids"]
    assert ex.meta["row"] == 2


def test_save_to_disk_directory(tmp_path, tok):
    datasets = require_module("datasets", "an optional extra: pip install 'opd[datasets]'")
    rows = [
        {"prompt": [{"role": "user", "content": r["problem"]}], "reward_model": {"ground_truth": r["answer"]}}
        for r in ROWS
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert read_rows(tmp_path / "ds") == rows
    ps = load_prompts(tmp_path / "ds", tok)
    assert [e.answer for e in ps.examples] == ["2", "5", "42"]
    assert ps[1].text == "What is 2+3?"
    # a DatasetDict with one split is read; with several, the error names the splits and the fix
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd1"))
    assert len(read_rows(tmp_path / "dd1")) == 3
    two = {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
    datasets.DatasetDict(two).save_to_disk(str(tmp_path / "dd2"))
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\].*point at one split"):
        read_rows(tmp_path / "dd2")


def test_lab_source(tok):
    ps = load_prompts("lab:test-easy", tok, limit=3)
    rows = prompt_rows("test-easy")
    assert ps.source == "lab:test-easy" and [e.answer for e in ps] == [r["answer"] for r in rows[:3]]
    assert ps[0].text == rows[0]["prompt"]


def test_lab_source_unknown_lists_the_valid_names(tok):
    with pytest.raises(LabNameError, match=r"unknown lab prompt set 'lab:arith'.*lab:train, lab:train-easy"):
        load_prompts("lab:arith", tok)
    with pytest.raises(LabNameError, match=r"'lab:student'"):  # a model, not a prompt set
        read_rows("lab:student")


def test_source_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "p.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'.*\.jsonl"):
        read_rows(tmp_path / "p.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "obj.json").write_text('{"prompt": "a"}')
    with pytest.raises(ValueError, match=r"obj.json: top-level JSON value is a dict, expected a list"):
        read_rows(tmp_path / "obj.json")
    (tmp_path / "strs.json").write_text('[{"prompt": "a"}, "b"]')
    with pytest.raises(ValueError, match=r"strs.json: row 1 is a str \('b'\), expected an object"):
        read_rows(tmp_path / "strs.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl' has no rows"):
        load_prompts(tmp_path / "empty.jsonl", tok)


# ---------------------------------------------------------------------------------------------------------
# field mapping
# ---------------------------------------------------------------------------------------------------------


def test_auto_field_precedence(tmp_path, tok):
    rows = [{"instruction": "ignored", "question": "Q?", "solution": "sol", "final_answer": "fa"}]
    ps = load_prompts(_write(tmp_path / "p.jsonl", rows), tok)
    assert (ps.prompt_field, ps.answer_field) == ("question", "solution")
    assert ps[0].text == "Q?" and ps[0].answer == "sol"


def test_no_answer_field_is_fine_with_auto(tmp_path, tok):
    ps = load_prompts(_write(tmp_path / "p.jsonl", [{"input": "hello"}]), tok)
    assert ps.answer_field is None and ps[0].answer is None
    ps = load_prompts(_write(tmp_path / "q.jsonl", ROWS), tok, answer_field=None)
    assert ps[0].answer is None


def test_verl_chat_list_dotted_answer_and_template(tmp_path, tok):
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "First question"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "What is 3+4?"},
            ],
            "reward_model": {"ground_truth": 7, "style": "rule"},
            "data_source": "toy",
        }
    ]
    path = _write(tmp_path / "v.parquet", rows)
    ps = load_prompts(path, tok, prompt_template="Q: {problem} " + BOXED)
    assert ps.answer_field == "reward_model.ground_truth"
    ex = ps[0]
    assert ex.answer == "7" and ex.meta == {"row": 0, "data_source": "toy"}
    assert ex.text == "Q: What is 3+4? " + BOXED  # template on the last user message only
    assert ex.rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nFirst question<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\nQ: What is 3+4? " + BOXED + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # explicit dotted field, too
    assert load_prompts(path, tok, answer_field="reward_model.style")[0].answer == "rule"


def test_explicit_missing_field_names_file_row_and_fields(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(
        ValueError, match=r"p.jsonl: row 0 has no prompt field 'query' \(fields: \['answer', 'problem'\]\)"
    ):
        load_prompts(path, tok, prompt_field="query")
    with pytest.raises(
        ValueError, match=r"p.jsonl: row 0 has no answer field 'gt' \(fields: \['answer', 'problem'\]\)"
    ):
        load_prompts(path, tok, answer_field="gt")
    with pytest.raises(ValueError, match=r"row 0 has none of the prompt fields .*pass prompt_field"):
        load_prompts(_write(tmp_path / "x.jsonl", [{"text": "a"}]), tok)
    rows = [*ROWS, {"problem": "no answer here"}]
    with pytest.raises(ValueError, match=r"row 3 has no answer field 'answer'"):
        load_prompts(_write(tmp_path / "q.jsonl", rows), tok)


def test_gsm8k_answer(tmp_path, tok):
    rows = [{"question": "Q", "answer": "She has 48/2 = <<48/2=24>>24.\nThen 48+24 = 72.\n#### 72"}]
    assert load_prompts(_write(tmp_path / "g.jsonl", rows), tok)[0].answer == "72"


def test_real_gsm8k_file(tok):
    path = SHARED / "benchmarks" / "gsm8k-test.jsonl"
    require(path.exists(), f"{path} not present (the shared data)")
    ps = load_prompts(path, tok, limit=5, max_prompt_tokens=None)
    assert ps.prompt_field == "question" and all(e.answer.lstrip("-").isdigit() for e in ps.examples)


# ---------------------------------------------------------------------------------------------------------
# templates
# ---------------------------------------------------------------------------------------------------------


def test_template_keeps_literal_boxed_and_fixes_artefact(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", [{"problem": "Find {x}."}, {"problem": "Say \\boxed{{}} now."}])
    ps = load_prompts(path, tok, prompt_template="{problem} " + BOXED, use_chat_template=False)
    assert ps[0].text == "Find {x}. " + BOXED  # braces in the problem and in the template survive
    assert ps[1].text == "Say \\boxed{} now. " + BOXED  # the {{}} artefact in data is normalised
    ps = load_prompts(path, tok, prompt_template="Q: {prompt} within \\boxed{{}}.", use_chat_template=False)
    assert ps[0].text == "Q: Find {x}. within \\boxed{}."  # ... and in the template
    with pytest.raises(ValueError, match=r"has no placeholder; put \{problem\}"):
        load_prompts(path, tok, prompt_template="no placeholder \\boxed{}")


def test_real_dapo_boxed_artefact(tok):
    path = SHARED / "prompts" / "dapo-math-17k-boxed.parquet"
    require(path.exists(), f"{path} not present (the shared data)")
    ps = load_prompts(path, tok, limit=4, seed=0)
    assert len(ps) == 4 and ps.answer_field == "reward_model.ground_truth"
    for ex in ps.examples:
        assert ex.text.endswith("within \\boxed{}.") and "{{}}" not in ex.rendered
        assert ex.answer


def test_chat_template_kwargs_and_system_prompt(tmp_path, thinking_tok):
    path = _write(tmp_path / "p.jsonl", ROWS[:1])
    plain = load_prompts(path, thinking_tok)[0]
    off = load_prompts(path, thinking_tok, chat_template_kwargs={"enable_thinking": False})[0]
    assert plain.rendered.endswith("<|im_start|>assistant\n")
    assert off.rendered == plain.rendered + "<think>\n\n</think>\n\n"
    assert off.input_ids == thinking_tok(off.rendered, add_special_tokens=False)["input_ids"]
    sys_ex = load_prompts(path, thinking_tok, system_prompt="You are terse.")[0]
    assert sys_ex.rendered.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    assert sys_ex.text == "What is 1+1?"


def test_raw_text_without_chat_template(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", ROWS[:1])
    ex = load_prompts(path, tok, use_chat_template=False)[0]
    assert ex.rendered == ex.text == "What is 1+1?"
    assert ex.input_ids == tok("What is 1+1?")["input_ids"]
    with pytest.raises(ValueError, match="system_prompt is set but use_chat_template=False"):
        load_prompts(path, tok, use_chat_template=False, system_prompt="s")
    no_tmpl = build_byte_tokenizer()
    no_tmpl.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template; pass use_chat_template=False"):
        load_prompts(path, no_tmpl)


# ---------------------------------------------------------------------------------------------------------
# length filter, malformed rows, limit / seed
# ---------------------------------------------------------------------------------------------------------


def test_overlong_dropped_counted_and_logged_once(tmp_path, tok, caplog):
    rows = [{"problem": "x" * n, "answer": str(n)} for n in (5, 200, 10, 300, 400)]
    path = _write(tmp_path / "p.jsonl", rows)
    overhead = len(load_prompts(path, tok, limit=1)[0].input_ids) - 5
    with caplog.at_level(logging.WARNING, logger="opd.data"):
        ps = load_prompts(path, tok, max_prompt_tokens=overhead + 100)
    assert [e.answer for e in ps.examples] == ["5", "10"]
    assert ps.dropped_overlong == 3
    msgs = [r.getMessage() for r in caplog.records if r.name == "opd.data"]
    assert len(msgs) == 1 and "dropped 3 prompt(s)" in msgs[0]
    with pytest.raises(ValueError, match=r"all 5 visited prompt\(s\) are longer than max_prompt_tokens=3"):
        load_prompts(path, tok, max_prompt_tokens=3)


@pytest.mark.parametrize(
    "bad, match",
    [
        (12, r"row 1: prompt field 'prompt' is a int \(12\)"),
        ("   ", r"row 1: prompt field 'prompt' is empty"),
        ([], r"row 1: prompt field 'prompt' is an empty message list"),
        ([{"role": "user"}], r"row 1: message 0 of prompt field 'prompt' is \{'role': 'user'\}"),
        (["hello"], r"row 1: message 0 of prompt field 'prompt' is 'hello'"),
        (
            [{"role": "system", "content": "s"}],
            r"row 1: prompt field 'prompt' is a message list without a 'user'",
        ),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path, tok, bad, match):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": bad}])
    with pytest.raises(ValueError, match=r"bad.jsonl: " + match):
        load_prompts(path, tok)


def test_limit_and_seed(tmp_path, tok):
    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(20)]
    path = _write(tmp_path / "p.jsonl", rows)
    assert [e.answer for e in load_prompts(path, tok, limit=3).examples] == ["0", "1", "2"]
    a = [e.answer for e in load_prompts(path, tok, limit=5, seed=7).examples]
    b = [e.answer for e in load_prompts(path, tok, limit=5, seed=7).examples]
    c = [e.answer for e in load_prompts(path, tok, limit=5, seed=8).examples]
    assert a == b and a != c and a != ["0", "1", "2", "3", "4"]
    assert [e.meta["row"] for e in load_prompts(path, tok, limit=5, seed=7).examples] == [int(x) for x in a]


# ---------------------------------------------------------------------------------------------------------
# PromptSampler
# ---------------------------------------------------------------------------------------------------------


def test_sampler_epochs_are_permutations_and_deterministic():
    data = list(range(10))
    s1, s2 = PromptSampler(data, seed=3), PromptSampler(data, seed=3)
    draws1 = [s1.next_batch(4) for _ in range(5)]  # 20 indices = 2 epochs, batches cross the boundary
    draws2 = [s2.next_batch(4) for _ in range(5)]
    assert draws1 == draws2
    flat = [i for b in draws1 for i in b]
    assert sorted(flat[:10]) == data and sorted(flat[10:]) == data
    assert flat[:10] != flat[10:]  # each epoch reshuffles
    assert flat[:10] != [i for b in [PromptSampler(data, seed=4).next_batch(10)] for i in b]
    assert s1.state_dict() == {"epoch": 1, "position": 10, "seed": 3, "size": 10}


def test_sampler_state_round_trip_resumes_exactly():
    data = list(range(7))
    ref = PromptSampler(data, seed=0)
    ref.next_batch(5)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON checkpoint
    expected = [ref.next_batch(3) for _ in range(6)]
    resumed = PromptSampler(data, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(3) for _ in range(6)] == expected
    with pytest.raises(ValueError, match="checkpoint has size=7 but this sampler has size=8"):
        PromptSampler(list(range(8)), seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="n must be a positive"):
        ref.next_batch(0)


def test_rendering_is_the_configs_data_keys_and_load_prompts_takes_them(tmp_path, tok):
    from opd.config import OPDConfig

    cfg = OPDConfig(prompt_field="problem", prompt_template="Q: {problem}", use_chat_template=False)
    kw = rendering(cfg)
    assert set(kw) == set(RENDER_KEYS) and kw["prompt_template"] == "Q: {problem}"
    ps = load_prompts(_write(tmp_path / "p.jsonl", ROWS), tok, **kw)
    assert ps.examples[0].text == "Q: " + ROWS[0]["problem"] and ps.prompt_field == "problem"


def test_resolve_prompt_field_skips_empty_fields_and_names_the_source():
    assert resolve_prompt_field({"prompt": None, "question": "q"}, "auto", "x") == "question"
    assert resolve_prompt_field({"a": {"b": "q"}}, "a.b", "x") == "a.b"
    with pytest.raises(ValueError, match=r"^benchmark 'b.jsonl': row 0 has none of the prompt fields"):
        resolve_prompt_field({"text": "q"}, "auto", "benchmark 'b.jsonl'")


def test_field_sequences_read_a_dotted_response_field(tmp_path, tok):
    rows = [{"problem": "1+1?", "answer": "2", "ref": {"solution": "It is 2."}}]
    ps = load_prompts(_write(tmp_path / "p.jsonl", rows), tok)
    (seq,) = field_sequences(ps, tok, "ref.solution", use_chat_template=True)
    assert seq.response == "It is 2."
    with pytest.raises(ValueError, match=r"response_field='ref.other'.*got NoneType"):
        field_sequences(ps, tok, "ref.other", use_chat_template=True)
