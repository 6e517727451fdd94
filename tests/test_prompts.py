"""Teacher-aligned prompts (``opd.prompts``): dedup, per-prompt figures vs the batch metrics, selection
counts, template selection on the lab (the teacher's own training template wins), the CLI end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from opd.cli import main
from opd.config import ConfigError
from opd.data import load_prompts
from opd.lab import prompt_rows
from opd.lab.world import QA_TEMPLATE
from opd.prompts import (
    PromptRanking,
    PromptsConfig,
    PromptScore,
    TemplateCandidate,
    dedup,
    load_candidates,
    normalize_text,
    select_prompts,
    select_template,
)
from opd.prompts.dedup import embed_texts, prompt_text
from opd.prompts.measure import batch_metrics, mean_rank, per_prompt

SYSTEM = "You are a careful calculator."
LAB = dict(student="lab:student", rollouts_per_prompt=2, max_new_tokens=48, progress=False, seed=0)


# ------------------------------------------------------------------------------------------------ dedup


def test_normalize_text():
    assert (
        normalize_text("  Compute\t47+8.\n Answer in \\boxed{{}}. ") == "compute 47+8. answer in \\boxed{}."
    )
    assert normalize_text("ＡＢＣ") == "abc"  # NFKC + casefold


def test_prompt_text_finds_the_field_as_load_prompts_does():
    """Dotted paths walk nested dicts; ``auto`` skips a field whose value is None, as opd.data does."""
    rows = [{"prompt": None, "problem": "Compute 1+2.", "meta": {"q": "Compute 3+4."}}]
    assert prompt_text(rows[0]) == "Compute 1+2."
    assert prompt_text(rows[0], "meta.q") == "Compute 3+4."
    for field in ("auto", "meta.q"):
        ps = load_prompts("rows", _WordTok(), rows=rows, prompt_field=field, use_chat_template=False)
        assert ps.examples[0].text == prompt_text(rows[0], field)
    with pytest.raises(ValueError, match="no prompt field 'meta.x'.*pass prompt_field=<name>"):
        prompt_text(rows[0], "meta.x")
    with pytest.raises(ValueError, match="no prompt field 'auto'"):
        prompt_text({"text": "x"})


class _WordTok:
    """Just enough of a tokenizer for load_prompts without a chat template: one id per character."""

    chat_template = None

    def __call__(self, text, **kw):
        return {"input_ids": [ord(c) for c in text]}


def test_dedup_exact_counts_and_keeps_first():
    rows = [
        {"prompt": "Compute 47+8-3+6.", "id": 0},
        {"prompt": "compute  47+8-3+6. ", "id": 1},  # exact after normalisation
        {"prompt": "Compute 12+3.", "id": 2},
        {"prompt": [{"role": "user", "content": "Compute 12+3."}], "id": 3},  # chat messages: same text
        {"prompt": "Compute 12+4.", "id": 4},
        {"prompt": "COMPUTE 12+4.", "id": 5},
    ]
    r = dedup(rows)
    assert [x["id"] for x in r.rows] == [0, 2, 4]
    assert r.counts == {"exact": 3, "near": 0}
    assert [(i, why, of) for i, why, of, _ in r.removed] == [
        (1, "exact", 0),
        (3, "exact", 2),
        (5, "exact", 4),
    ]
    assert r.summary() == {"rows_in": 6, "rows_out": 3, "removed": {"exact": 3, "near": 0}}
    assert dedup(rows, exact=False).rows == rows


def test_dedup_near_duplicates_with_a_local_embedding_model(tiny_pair, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub call would fail
    model_dir = tiny_pair[0]
    texts = [
        "Compute 47+8-3+6. Answer in \\boxed{}.",
        "Compute 47+8-3+7. Answer in \\boxed{}.",  # one character apart: the near duplicate
        "Write a short poem about the sea, its colours and the wind over it, in four lines.",
        "List three prime numbers greater than one hundred and explain why each of them is prime.",
    ]
    rows = [{"question": t} for t in texts]
    emb = embed_texts([normalize_text(t) for t in texts], model_dir)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    sim = emb @ emb.T
    near = float(sim[0, 1])
    others = max(float(sim[i, j]) for i in range(4) for j in range(i + 1, 4) if (i, j) != (0, 1))
    assert near > others, "the crafted near duplicate must be the most similar pair"
    thr = (near + others) / 2
    r = dedup(rows, embedding_model=str(model_dir), threshold=thr)
    assert r.counts == {"exact": 0, "near": 1}
    assert [row["question"] for row in r.rows] == [texts[0], texts[2], texts[3]]
    assert r.removed[0][:3] == (1, "near", 0) and r.removed[0][3] == pytest.approx(near, abs=1e-5)
    # brute-force reference: greedy, each row against every earlier kept row
    for t in (0.5, 0.9, 0.99, thr):
        kept = []
        for i in range(4):
            if all(float(sim[i, j]) < t for j in kept):
                kept.append(i)
        assert dedup(rows, embedding_model=str(model_dir), threshold=t).kept_index == kept
    with pytest.raises(ValueError, match="never downloads"):
        dedup(rows, embedding_model="someone/some-model")


# ------------------------------------------------------------------------------------- per-prompt figures


def _fake_scores(B=6, T=7, K=3, V=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[:, :2] = 0  # prompt
    mask[1, 5:] = 0  # a short response
    mask[4, 4:] = 0

    def out(logits):
        logp = logits.log_softmax(-1)
        top = logp.topk(K, dim=-1)
        return logp, top

    s_logp, s_top = out(torch.randn(B, T, V, generator=g) * 2)
    t_logp, t_top = out(torch.randn(B, T, V, generator=g) * 2)
    tokens = torch.randint(0, V, (B, T), generator=g)

    def ent(lp):
        return -(lp.exp() * lp).sum(-1)

    s_out = SimpleNamespace(
        topk_ids_B_T_K=s_top.indices,
        topk_logp_B_T_K=s_top.values,
        token_logp_B_T=s_logp.gather(-1, tokens[..., None])[..., 0],
        entropy_B_T=ent(s_logp),
    )
    t_out = SimpleNamespace(
        topk_ids_B_T_K=t_top.indices,
        topk_logp_B_T_K=t_top.values,
        given_logp_B_T_K=t_logp.gather(-1, s_top.indices),
        token_logp_B_T=t_logp.gather(-1, tokens[..., None])[..., 0],
        entropy_B_T=ent(t_logp),
    )
    batch = SimpleNamespace(response_mask_B_T=mask, prompt_index_B=torch.tensor([0, 0, 1, 2, 2, 2]))
    return s_out, t_out, batch


def _rows(ns, rows):
    return SimpleNamespace(**{k: (v[rows] if torch.is_tensor(v) else v) for k, v in vars(ns).items()})


def test_per_prompt_figures_equal_the_batch_metrics_of_each_prompts_rollouts():
    s_out, t_out, batch = _fake_scores()
    got = per_prompt(s_out, t_out, batch, 3)
    for p in range(3):
        rows = (batch.prompt_index_B == p).nonzero().flatten()
        ref = batch_metrics(_rows(s_out, rows), _rows(t_out, rows), _rows(batch, rows))
        for k in ("overlap_ratio", "overlap_mass_student", "overlap_mass_teacher", "entropy_gap", "kl"):
            assert got[p][k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), (p, k)
        if ref["teacher_advantage"] is not None:
            assert got[p]["teacher_advantage"] == pytest.approx(ref["teacher_advantage"], rel=1e-5, abs=1e-6)
        assert got[p]["tokens"] == int(batch.response_mask_B_T[rows].sum())
        # an independent reference: the sampled-token KL estimate, mean over the prompt's response tokens
        m = batch.response_mask_B_T[rows] > 0
        ref_kl = (s_out.token_logp_B_T[rows] - t_out.token_logp_B_T[rows])[m].double().mean()
        assert got[p]["kl"] == pytest.approx(float(ref_kl), rel=1e-5, abs=1e-6), p


def test_mean_rank_ties_and_missing():
    items = [
        {"overlap_ratio": 0.5, "overlap_mass_student": 0.9, "teacher_advantage": -0.1},
        {"overlap_ratio": 0.5, "overlap_mass_student": 0.8, "teacher_advantage": -0.3},
        {"overlap_ratio": 0.4, "overlap_mass_student": 0.95, "teacher_advantage": None},
    ]
    # ratio ranks 1.5, 1.5, 3; mass 2, 3, 1; advantage 1, 2, 3 (missing last)
    assert mean_rank(items) == pytest.approx([(1.5 + 2 + 1) / 3, (1.5 + 3 + 2) / 3, (3 + 1 + 3) / 3])


# --------------------------------------------------------------------------------------------- selection


def _ranking(n=20, pools=("p",)):
    scores = []
    for i in range(n):
        pool = pools[i % len(pools)]
        m = {"overlap_ratio": 1 - i / n, "overlap_mass_student": 1 - i / n, "teacher_advantage": -i / n}
        scores.append(PromptScore(pool, i, {"prompt": f"q{i}", "answer": str(i), "pool": pool}, m, i + 1.0))
    pool_rows = {p: [s.row for s in scores if s.pool == p] for p in pools}
    pool_stats = [{"pool": p, "mean_rank": r + 1.0} for r, p in enumerate(pools)]
    return PromptRanking(scores, pool_stats, pool_rows)


@pytest.mark.parametrize("n,share", [(10, 0.2), (10, 0.0), (7, 0.3), (20, 0.5), (1, 0.4)])
def test_select_prompts_respects_n_and_ood_share(n, share):
    r = _ranking()
    sel = select_prompts(r, n=n, ood_share=share, seed=3)
    n_ood = round(n * share)
    assert len(sel.rows) == n and sel.origin.count("ood") == n_ood
    top = [f"q{i}" for i in range(n - n_ood)]
    assert [row["prompt"] for row, o in zip(sel.rows, sel.origin) if o == "aligned"] == top
    ood = [row["prompt"] for row, o in zip(sel.rows, sel.origin) if o == "ood"]
    assert not set(ood) & set(top) and len(set(ood)) == n_ood
    assert sel.stats["aligned"] == n - n_ood and sel.stats["ood"] == n_ood
    least = select_prompts(r, n=n, ood_share=share, ood="least")
    assert [row["prompt"] for row, o in zip(least.rows, least.origin) if o == "ood"] == [
        f"q{i}" for i in range(20 - n_ood, 20)
    ]
    again = select_prompts(r, n=n, ood_share=share, seed=3)
    assert again.rows == sel.rows  # seeded


def test_select_prompts_fraction_random_ood_varies_with_seed_and_pools():
    r = _ranking()
    assert len(select_prompts(r, fraction=0.5, ood_share=0.2).rows) == 10
    picks = {tuple(select_prompts(r, n=10, ood_share=0.5, seed=s).ood) for s in range(8)}
    assert len(picks) > 1
    with pytest.raises(ValueError, match="exactly one of n"):
        select_prompts(r, n=3, fraction=0.5)
    with pytest.raises(ValueError, match="ood_share"):
        select_prompts(r, n=3, ood_share=1.0)
    pools = _ranking(pools=("easy", "hard"))
    assert pools.unit == "pool"
    sel = select_prompts(pools, n=1, ood_share=0.0)
    assert sel.unit == "pool" and sel.aligned == ["easy"] and len(sel.rows) == 10
    assert {row["pool"] for row in sel.rows} == {"easy"}


# ---------------------------------------------------------------------------------- template alignment


def test_load_candidates(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("- name: plain\n- template: 'Q: {problem}'\n- {name: sys, system_prompt: Be brief.}\n")
    c = load_candidates(f)
    assert c == [
        TemplateCandidate("plain"),
        TemplateCandidate("candidate-1", "Q: {problem}"),
        TemplateCandidate("sys", None, "Be brief."),
    ]
    j = tmp_path / "c.json"
    j.write_text(json.dumps([{"name": "a", "teacher_prompt_template": "{problem}!"}]))
    assert load_candidates(j)[0].teacher_prompt_template == "{problem}!"
    from pathlib import Path

    shipped = load_candidates(
        Path(__file__).resolve().parents[1] / "configs" / "candidates" / "lab_templates.yaml"
    )
    assert [c.name for c in shipped] == ["plain", "qa", "system"] and shipped[
        1
    ].teacher_prompt_template == QA_TEMPLATE
    f.write_text("- template: 'no placeholder'\n")
    with pytest.raises(ConfigError, match="placeholder"):
        load_candidates(f)
    f.write_text("- {name: a}\n- {name: a}\n")
    with pytest.raises(ConfigError, match="repeat"):
        load_candidates(f)


def test_select_template_picks_the_teachers_training_template():
    """teacher-a-plus was trained on the plain prompt: it wins over a template and a system message the
    teacher never saw; a candidate rendering the same prompt differently-spelt ('{problem}') measures
    exactly what the plain one does (same rollouts for every candidate)."""
    cfg = PromptsConfig(teacher="lab:teacher-a-plus", prompts="lab:train", num_prompts=8, **LAB)
    cands = [
        TemplateCandidate("qa", QA_TEMPLATE),
        TemplateCandidate("plain"),
        TemplateCandidate("system", None, SYSTEM),
        TemplateCandidate("same", "{problem}"),
    ]
    sel = select_template(cfg, cands)
    assert sel.best.name == "plain"
    assert sel.best.config_keys() == {"teacher_prompt_template": None, "teacher_system_prompt": None}
    by = {m["name"]: m for m in sel.measurements}
    for k in ("overlap_ratio", "overlap_mass_student", "teacher_advantage", "kl", "entropy_gap"):
        assert by["same"][k] == by["plain"][k]
    for other in ("qa", "system"):
        assert by["plain"]["overlap_mass_student"] > by[other]["overlap_mass_student"]
        assert by["plain"]["teacher_advantage"] > by[other]["teacher_advantage"]
    assert sel.sample["rollouts"] == 16


def test_select_template_picks_qa_for_the_teacher_trained_under_it():
    from opd.lab import resolve

    try:
        resolve("lab:teacher-a-qa", kind="model").require_built()
    except Exception as e:  # noqa: BLE001 - the zoo model is part of the package; say what is missing
        pytest.fail(f"lab:teacher-a-qa missing: {e}")
    cfg = PromptsConfig(teacher="lab:teacher-a-qa", prompts="lab:train", num_prompts=8, **LAB)
    sel = select_template(cfg, [TemplateCandidate("plain"), TemplateCandidate("qa", QA_TEMPLATE)])
    assert sel.best.name == "qa"


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_select_and_template_end_to_end_on_the_lab(tmp_path, capsys):
    rows = prompt_rows("train")[:10] + prompt_rows("train-hard")[:2]
    rows.insert(3, dict(rows[0], prompt="  " + rows[0]["prompt"].upper()))  # an exact duplicate
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sel"
    keys = [f"{k}={v}" for k, v in LAB.items()] + ["teacher=lab:teacher-a-plus", "num_prompts=0"]
    rc = main(
        ["prompts", "select", f"prompts={pool}", "select_n=4", "ood_share=0.25", f"output_dir={out}", *keys]
    )
    assert rc == 0
    assert "kept 4 of 12 prompts (3 aligned + 1 out-of-distribution)" in capsys.readouterr().out
    kept = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert len(kept) == 4 and all(set(k) == set(rows[0]) for k in kept) and all(k in rows for k in kept)
    stats = json.loads((out / "selection.json").read_text())
    assert stats["dedup"]["prompts"] == {"rows_in": 13, "rows_out": 12, "removed": {"exact": 1, "near": 0}}
    assert stats["selection"]["aligned"] == 3 and stats["selection"]["ood"] == 1
    ranking = [json.loads(x) for x in (out / "ranking.jsonl").read_text().splitlines()]
    assert len(ranking) == 12 and [r["mean_rank"] for r in ranking] == sorted(r["mean_rank"] for r in ranking)
    assert "Teacher-aligned prompts" in (out / "selection.md").read_text()

    cand = tmp_path / "cands.yaml"
    cand.write_text(f"- name: qa\n  teacher_prompt_template: {json.dumps(QA_TEMPLATE)}\n- name: plain\n")
    tout = tmp_path / "tmpl"
    rc = main(
        [
            "prompts",
            "template",
            "prompts=lab:train",
            "num_prompts=6",
            f"output_dir={tout}",
            *keys[:-1],
            "--candidates",
            str(cand),
        ]
    )
    assert rc == 0
    assert json.loads((tout / "template.json").read_text())["best"]["name"] == "plain"
    assert "best 'plain'" in capsys.readouterr().out

    # bad input: one line naming the key and the fix
    assert main(["prompts", "select", f"prompts={pool}", "ood_shar=0.2", *keys]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'ood_share'" in err
    assert main(["prompts", "select", f"prompts={pool}", "pools={a: x.jsonl}", *keys]) == 2
    assert "not both" in capsys.readouterr().err
    assert (
        main(["prompts", "template", f"prompts={pool}", *keys, "--candidates", str(tmp_path / "none.yaml")])
        == 2
    )
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prompts", "select", "--help"])
    assert "ood_share" in capsys.readouterr().out


def test_config_errors():
    with pytest.raises(ConfigError, match="ood_pick"):
        PromptsConfig(ood_pick="worst")
    with pytest.raises(ConfigError, match="select_fraction"):
        PromptsConfig(select_fraction=0.0)
    with pytest.raises(ConfigError, match="missing required"):
        PromptsConfig().check_runnable()
    assert PromptsConfig(pools="{a: x.jsonl}").pools == {"a": "x.jsonl"}


def test_the_qa_teacher_is_trained_on_exactly_what_teacher_prompt_template_renders():
    """``ModelSpec.prompt_template`` (how lab:teacher-a-qa was trained) and opd's
    ``teacher_prompt_template`` give the teacher the same prompt tokens."""
    from opd.data import apply_template, load_prompts
    from opd.lab import lab_tokenizer
    from opd.lab.train import encode_example
    from opd.lab.zoo import SPECS

    assert SPECS["teacher-a-qa"].prompt_template == QA_TEMPLATE
    tok = lab_tokenizer()
    rows = prompt_rows("train-hard")[:3]
    ps = load_prompts("lab:train-hard", tok, rows=rows, teacher_prompt_template=QA_TEMPLATE)
    for row, ex in zip(rows, ps.examples):
        ids, n_prompt = encode_example(tok, apply_template(row["prompt"], QA_TEMPLATE), row["solution_a"])
        assert ex.teacher_input_ids == ids[:n_prompt]
        assert ex.input_ids == encode_example(tok, row["prompt"], row["solution_a"])[0][: len(ex.input_ids)]
        assert ex.teacher_input_ids != ex.input_ids


def test_lab_training_batches_use_the_specs_prompt_template():
    import dataclasses

    from opd.lab import lab_tokenizer, world
    from opd.lab.train import ModelSpec, make_batch, train_model

    tok = lab_tokenizer()
    probs = world.problem_set(0, "train", "hard", 2)
    for template, present in ((None, False), (QA_TEMPLATE, True)):
        b = make_batch(tok, probs, "a", template)
        text = tok.decode(b["input_ids"][0][b["attention_mask"][0] > 0])
        assert ("Question: Compute" in text) is present and probs[0].prompt() in text
    spec = ModelSpec("t", "a", 0.5, hidden_size=32, num_layers=1, intermediate_size=64, steps=2)
    m1, _ = train_model(spec, tok, seed=0)
    m2, _ = train_model(dataclasses.replace(spec, prompt_template=QA_TEMPLATE), tok, seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
