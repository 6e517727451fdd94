"""The measurements of ``opd diagnose``, each built on the component that owns it.

- sampling: :class:`opd.rollout.HFGenerateBackend` (the backend ``opd train`` samples with);
- scoring: :func:`opd.scoring.score_pair` (the student at the rollout temperature, the teacher at
  ``teacher_temperature`` on the student's top-k ids), exactly what step 0 of ``opd train`` computes;
- rewards: :mod:`opd.objectives` (:func:`token_rewards`; a test holds them in lockstep with the
  training loop's ``token_reward``);
- condition (i): :mod:`opd.metrics` (overlap ratio and masses, Eq. 7 advantage, entropy gap, position
  profiles);
- accuracy and continuations: :mod:`opd.evaluate` (the one evaluator).

Every function fills the :class:`~opd.diagnose.verdict.Evidence` it measures and returns the figures
``diagnosis.json`` records. Shapes: ``_B`` rollouts, ``_T`` positions, ``_K`` top-k ids of one model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import torch

from opd import objectives as obj
from opd.data import PromptSet
from opd.diagnose.config import DiagnoseConfig
from opd.diagnose.verdict import Evidence
from opd.evaluate import evaluate_accuracy, grade_responses, sample_responses
from opd.metrics import mechanism_means, mechanism_tensors, position_profile
from opd.rollout import RolloutBatch, make_backend, stop_token_ids
from opd.scoring import PolicyScorer, ScoreOutput, score_pair
from opd.tracking import progress

__all__ = [
    "accuracy",
    "auroc",
    "condition_i",
    "continuations",
    "mean_se",
    "sample_rollouts",
    "score_rollouts",
    "template_check",
    "token_rewards",
]


# ------------------------------------------------------------------------------------------- statistics


def auroc(scores: list[float] | torch.Tensor, labels: list[bool] | torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (Mann–Whitney U / (n⁺ n⁻)).

    ``AUROC = P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)`` for a random positive and negative; computed from average
    ranks (ties share their mean rank), O(n log n). None when either class is empty.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten().bool()
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.numel()} scores but {y.numel()} labels; pass one label per score")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    if not bool(torch.isfinite(s).all()):
        raise ValueError("auroc: scores contain NaN or inf; drop those rows first")
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    ranks_sorted = torch.empty_like(sorted_s)
    # average rank of each run of equal scores (ranks are 1-based)
    _, counts = torch.unique_consecutive(sorted_s, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    starts = ends - counts.double() + 1
    ranks_sorted = torch.repeat_interleave((starts + ends) / 2, counts)
    ranks = torch.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard error (sample std / sqrt(n); 0 for n = 1); (None, None) for no values."""
    n = len(values)
    if n == 0:
        return None, None
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def _mean(xs: list) -> float | None:
    return sum(float(x) for x in xs) / len(xs) if xs else None


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    if x.numel() == 0:
        return {}
    qs = torch.quantile(x.double(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    return {f"p{int(q * 100):02d}": float(v) for q, v in zip((0.05, 0.25, 0.5, 0.75, 0.95), qs)}


def _reward_stats(r_N: torch.Tensor) -> dict[str, float]:
    if r_N.numel() == 0:
        return {}
    r = r_N.double()
    return {
        "mean": float(r.mean()),
        "std": float(r.std()) if r.numel() > 1 else 0.0,
        "abs_mean": float(r.abs().mean()),
        "frac_positive": float((r > 0).double().mean()),
        **_quantiles(r),
    }


def _profile(values_B_T, mask_B_T, bin_size, positions_B_T) -> dict[str, list]:
    starts, means, counts = position_profile(values_B_T, mask_B_T, bin_size, positions_B_T)
    return {"start": starts.tolist(), "mean": [float(x) for x in means], "count": counts.tolist()}


# ------------------------------------------------------------------------------ tokenizer and template


def template_check(
    student_tok, teacher_tok, user_text: str, assistant_text: str, cfg: DiagnoseConfig
) -> dict:
    """Render one conversation with both chat templates and diff the tokens; compare stop tokens."""
    conv = [{"role": "user", "content": user_text}, {"role": "assistant", "content": assistant_text}]
    out: dict[str, Any] = {"conversation": conv, "use_chat_template": cfg.use_chat_template}
    renders: dict[str, list[int] | None] = {}
    for who, tok in (("student", student_tok), ("teacher", teacher_tok)):
        info: dict[str, Any] = {"has_chat_template": bool(getattr(tok, "chat_template", None))}
        ids = None
        if info["has_chat_template"]:
            try:
                text = tok.apply_chat_template(conv, tokenize=False, **cfg.chat_template_kwargs)
                ids = tok.encode(text, add_special_tokens=False)
                info["rendered"] = text
            except Exception as e:  # a template may reject the roles; report, do not crash the diagnosis
                info["error"] = f"{type(e).__name__}: {e}"
        try:
            stops = stop_token_ids(tok)
        except ValueError as e:
            stops, info["stop_error"] = [], str(e)
        info["stop_token_ids"] = stops
        info["stop_tokens"] = tok.convert_ids_to_tokens(stops) if stops else []
        info["eos_token"] = tok.eos_token
        info["num_tokens"] = None if ids is None else len(ids)
        renders[who] = ids
        out[who] = info
    s_ids, t_ids = renders["student"], renders["teacher"]
    out["same_render"] = s_ids is not None and s_ids == t_ids
    both_missing = not out["student"]["has_chat_template"] and not out["teacher"]["has_chat_template"]
    out["template_differs"] = bool(cfg.use_chat_template and not both_missing and not out["same_render"])
    out["stop_ids_differ"] = set(out["student"]["stop_token_ids"]) != set(out["teacher"]["stop_token_ids"])
    # the same text through both tokenizers (ids must agree for OPD)
    probe = out["student"].get("rendered") or (user_text + "\n" + assistant_text)
    out["same_tokenization"] = student_tok.encode(probe, add_special_tokens=False) == teacher_tok.encode(
        probe, add_special_tokens=False
    )
    diff = []
    if s_ids is not None and t_ids is not None and s_ids != t_ids:
        s_toks = student_tok.convert_ids_to_tokens(s_ids)
        t_toks = teacher_tok.convert_ids_to_tokens(t_ids)
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, s_toks, t_toks, autojunk=False).get_opcodes():
            if op != "equal":
                diff.append(
                    {
                        "op": op,
                        "student_at": i1,
                        "student": s_toks[i1:i2][:24],
                        "teacher_at": j1,
                        "teacher": t_toks[j1:j2][:24],
                    }
                )
            if len(diff) >= 20:
                break
    out["token_diff"] = diff
    return out


# ------------------------------------------------------------------------------- rollouts and scoring


def sample_rollouts(student, tokenizer, prompt_ids: list[list[int]], cfg: DiagnoseConfig, vocab_limit: int):
    """``rollouts_per_prompt`` student samples per prompt at ``temperature``: one call of the training
    loop's backend (``generate`` calls of at most ``batch_size`` rows), seeded with ``cfg.seed``."""
    backend = make_backend("hf", student, tokenizer, batch_size=cfg.batch_size, vocab_limit=vocab_limit)
    with progress(total=1, desc="rollouts", enabled=cfg.progress, unit="batch") as bar:
        batch = backend.generate(
            prompt_ids,
            n=cfg.rollouts_per_prompt,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=1.0,
            top_k=0,
            seed=cfg.seed,
        )
        bar.update(1)
    return batch


def score_rollouts(
    student,
    teacher,
    batch: RolloutBatch,
    cfg: DiagnoseConfig,
    vocab_limit: int,
    teacher_batch: RolloutBatch | None = None,
) -> tuple[ScoreOutput, ScoreOutput]:
    """Student and teacher ScoreOutputs of the rollout batch (no grad), in micro-batches of ``batch_size``:
    the student at the rollout temperature (its top-k ids, log-probs, entropy), the teacher at
    ``teacher_temperature`` (log-probs at the student's top-k ids, its own top-k, entropy) — the training
    loop's scoring, through the same :func:`opd.scoring.score_pair`. ``teacher_batch``: the responses after
    the teacher's own prompts (``teacher_prompt_template`` / ``teacher_system_prompt``), scored by the
    teacher as ``opd train`` would."""
    s_scorer = PolicyScorer(
        student, temperature=cfg.temperature, chunk_size=cfg.score_chunk_size, vocab_limit=vocab_limit
    )
    t_scorer = PolicyScorer(
        teacher, temperature=cfg.teacher_temperature, chunk_size=cfg.score_chunk_size, vocab_limit=vocab_limit
    )
    B = batch.input_ids_B_T.shape[0]
    with progress(total=B, desc="score", enabled=cfg.progress, unit="seq") as bar:
        s_out, t_out, _ = score_pair(
            s_scorer,
            t_scorer,
            batch,
            cfg.batch_size,
            cfg.metrics_top_k,
            on_micro_batch=bar.update,
            teacher_batch=teacher_batch,
        )
    return s_out, t_out


def mechanism_inputs(
    s_out: ScoreOutput, t_out: ScoreOutput, mask_B_T: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The arguments of :func:`opd.metrics.mechanism_tensors` from the student's and the teacher's
    scoring of the same rollouts (the student's own top-k, the teacher's at the student's top-k ids)."""
    return (
        s_out.topk_ids_B_T_K,
        s_out.topk_logp_B_T_K,
        t_out.topk_ids_B_T_K,
        t_out.given_logp_B_T_K,
        s_out.entropy_B_T,
        t_out.entropy_B_T,
        mask_B_T,
    )


def token_rewards(
    student: ScoreOutput, teacher: ScoreOutput, mask_B_T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``(sampled_B_T, topk_B_T)`` of the scored rollouts, from :mod:`opd.objectives`:

    - sampled-token ``r_t = log q_t(ŷ_t) − log p_t(ŷ_t)`` (k1; what ``objective=sampled`` optimises);
    - top-K ``Σ_{v∈TopK(p_t)} p̄_t(v)(log q_t(v) − log p_t(v))`` (student support, ``student_p`` weights,
      K = the scored width: what ``objective=topk support_size=K`` optimises).

    Both are 0 where ``mask_B_T`` is 0; they equal the training loop's ``token_reward`` for the same
    batch and settings (tests/test_diagnose.py holds them in lockstep).
    """
    sampled_B_T = obj.sampled_token_rewards(student.token_logp_B_T, teacher.token_logp_B_T, mask_B_T, "k1")
    topk = obj.topk_advantages(
        student.topk_ids_B_T_K,
        student.topk_logp_B_T_K,
        teacher.topk_ids_B_T_K,
        teacher.topk_logp_B_T_K,
        teacher_logp_at_student_B_T_K=teacher.given_logp_B_T_K,
        student_logp_at_teacher_B_T_K=None,  # the student support needs only the student's ids
        mask_B_T=mask_B_T,
        support="student",
        weighting="student_p",
        renormalize=False,
    )
    return sampled_B_T, topk.rewards.sum(-1)


# -------------------------------------------------------------------------------------- condition (i)


def condition_i(
    s_out: ScoreOutput,
    t_out: ScoreOutput,
    batch: RolloutBatch,
    stop_ids: list[int],
    cfg: DiagnoseConfig,
    ev: Evidence,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mechanism metrics, position profiles and rewards of the scored rollouts (fills ``ev``).

    Returns ``(condition_i, rewards)``: the ``condition_i`` section of diagnosis.json, and ``stats`` (the
    reward section of condition (ii)), ``seq_sampled`` / ``seq_topk`` (sequence-mean rewards per rollout),
    ``seq_mass`` (per rollout: min of the student's and the teacher's mean mass on the overlap).
    """
    mask_B_T = batch.response_mask_B_T > 0
    mt = mechanism_tensors(*mechanism_inputs(s_out, t_out, mask_B_T))
    mech = mechanism_means(mt, position_chunk=None)
    pos, bin_size = mt.position_B_T, cfg.bin_size(int(mask_B_T.sum(-1).max()))

    r_B_T, rk_B_T = token_rewards(s_out, t_out, mask_B_T)
    n_B = mask_B_T.sum(-1).clamp(min=1)
    seq_sampled = (r_B_T.sum(-1) / n_B).tolist()
    seq_topk = (rk_B_T.sum(-1) / n_B).tolist()
    # per rollout: the smaller of the student's and the teacher's mean mass on the shared top-k set
    seq_mass = torch.minimum(
        torch.where(mask_B_T, mt.mass_student_B_T, 0.0).sum(-1) / n_B,
        torch.where(mask_B_T, mt.mass_teacher_B_T, 0.0).sum(-1) / n_B,
    ).tolist()

    first = mask_B_T & (pos == 0)
    stop_B_T = (
        mask_B_T & torch.isin(batch.input_ids_B_T, torch.tensor(stop_ids)) & ~batch.truncated_B[:, None]
    )
    profile: dict[str, Any] = {"bin_size": bin_size}
    for name, values, m in (
        ("overlap_ratio", mt.overlap_ratio_B_T, mask_B_T),
        ("overlap_mass_student", mt.mass_student_B_T, mask_B_T),
        ("overlap_mass_teacher", mt.mass_teacher_B_T, mask_B_T),
        ("overlap_adv", mt.overlap_adv_B_T, mt.adv_valid_B_T),
        ("entropy_student", mt.student_entropy_B_T, mask_B_T),
        ("entropy_teacher", mt.teacher_entropy_B_T, mask_B_T),
        ("entropy_gap", mt.entropy_gap_B_T, mask_B_T),
        ("reward", r_B_T, mask_B_T),
    ):
        profile[name] = _profile(values, m, bin_size, pos)

    def fmean(values, m):
        return float(values[m].double().mean()) if bool(m.any()) else None

    cond_i = {
        "k": cfg.metrics_top_k,
        "metrics": mech,
        "first_token": {
            "overlap_ratio": fmean(mt.overlap_ratio_B_T, first),
            "entropy_student": fmean(mt.student_entropy_B_T, first),
            "entropy_teacher": fmean(mt.teacher_entropy_B_T, first),
        },
        "stop_token": {
            "count": int(stop_B_T.sum()),
            "reward_mean": fmean(r_B_T, stop_B_T),
            "student_logp_mean": fmean(s_out.token_logp_B_T, stop_B_T),
            "teacher_logp_mean": fmean(t_out.token_logp_B_T, stop_B_T),
        },
        "profile": profile,
    }
    ev.overlap_ratio = mech.get("overlap/ratio")
    ev.overlap_mass_student = mech.get("overlap/mass_student")
    ev.overlap_mass_teacher = mech.get("overlap/mass_teacher")
    ev.overlap_adv = mech.get("overlap/adv")
    ev.entropy_gap = mech.get("entropy/gap")
    ev.first_token_entropy_student = cond_i["first_token"]["entropy_student"]
    ev.first_token_entropy_teacher = cond_i["first_token"]["entropy_teacher"]
    ev.stop_reward = cond_i["stop_token"]["reward_mean"]
    stats: dict[str, Any] = {
        "sampled_token": _reward_stats(r_B_T[mask_B_T]),
        "topk": _reward_stats(rk_B_T[mask_B_T]),
        "seq_mean_sampled_token": _reward_stats(torch.tensor(seq_sampled)),
        "kl_estimate": float(-r_B_T[mask_B_T].double().mean()) if bool(mask_B_T.any()) else None,
    }
    ev.reward_abs_mean = stats["sampled_token"].get("abs_mean")
    r_N = r_B_T[mask_B_T].double()
    if r_N.numel():
        lo, hi = float(r_N.min()), float(r_N.max())
        hi = hi if hi > lo else lo + 1e-6
        counts = torch.histc(r_N, bins=50, min=lo, max=hi)
        stats["histogram"] = {"edges": torch.linspace(lo, hi, 51).tolist(), "counts": counts.long().tolist()}
    return cond_i, {"stats": stats, "seq_sampled": seq_sampled, "seq_topk": seq_topk, "seq_mass": seq_mass}


# ------------------------------------------------------------------------------------- condition (ii)


def accuracy(
    student, teacher, tokenizer, s_stop, t_stop, prompts, cfg: DiagnoseConfig, vocab_limit: int, ev: Evidence
) -> tuple[dict[str, Any], int, int]:
    """Accuracy of both models on the prompts with answers (:func:`opd.evaluate.evaluate_accuracy`: each
    model's prompt rendering as at OPD time — the teacher's own when ``teacher_prompt_template`` /
    ``teacher_system_prompt`` give it one — decoding per ``eval_temperature``), the paired gap and its s.e.

    Returns ``(section, student_generated_tokens, teacher_generated_tokens)``; fills ``ev``.
    """
    n = cfg.eval_n
    res: dict[str, Any] = {"num_prompts": 0, "samples": n, "temperature": cfg.eval_temperature}
    per_prompt: dict[str, list[float]] = {}
    tokens = {}
    for who, model, stops in (("student", student, s_stop), ("teacher", teacher, t_stop)):
        r = evaluate_accuracy(
            model,
            tokenizer,
            teacher_rendering(prompts) if who == "teacher" else prompts,
            temperature=cfg.eval_temperature,
            n=n,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            seed=cfg.seed + 1,
            progress=cfg.progress,
            stop_ids=stops,
            vocab_limit=vocab_limit,
            desc=f"accuracy {who}",
        )
        per_prompt[who] = r["per_prompt"]
        res["num_prompts"] = r["num_prompts"]
        res[who] = {
            "accuracy": r["accuracy"],
            "length_mean": r["response_length_mean"],
            "truncated_frac": r["truncated_frac"],
        }
        tokens[who] = r["generated_tokens"]
    gap, se = mean_se([t - s for s, t in zip(per_prompt["student"], per_prompt["teacher"], strict=True)])
    res["gap"], res["gap_se"] = gap, se
    ev.accuracy_student, ev.accuracy_teacher = res["student"]["accuracy"], res["teacher"]["accuracy"]
    ev.eval_truncated_frac = max(res[who]["truncated_frac"] or 0.0 for who in ("student", "teacher"))
    ev.accuracy_gap_se = se
    return res, tokens["student"], tokens["teacher"]


def teacher_rendering(prompts: PromptSet) -> PromptSet:
    """``prompts`` with each example's ``input_ids`` replaced by the teacher's rendering of it
    (``teacher_input_ids``, set when the teacher has a prompt template or system prompt of its own);
    ``prompts`` itself when no example has one."""
    if all(e.teacher_input_ids is None for e in prompts.examples):
        return prompts
    return dataclasses.replace(
        prompts,
        examples=[
            e if e.teacher_input_ids is None else dataclasses.replace(e, input_ids=e.teacher_input_ids)
            for e in prompts.examples
        ],
    )


def continuations(
    student,
    teacher,
    tokenizer,
    s_stop,
    t_stop,
    examples,
    resp_ids: list[list[int]],
    cfg: DiagnoseConfig,
    vocab_limit: int,
    ev: Evidence,
) -> tuple[dict[str, Any], int, int]:
    """Teacher continuation advantage (docs/paper.md §5) on the first rollout of every prompt with an answer.

    The rollout is cut after each fraction f of its response tokens (stop token excluded); both models
    complete the same prefix with the budget the original rollout had (at most ``max_new_tokens − depth``
    new tokens), and prefix + completion is graded. Returns ``(section, student_tokens, teacher_tokens)``.
    """
    R, n = cfg.rollouts_per_prompt, cfg.eval_n
    rows = [p * R for p, e in enumerate(examples) if e.answer is not None]
    res: dict[str, Any] = {
        "fractions": list(cfg.prefix_fractions),
        "rollouts": len(rows),
        "samples": n,
        "by_fraction": [],
    }
    if not rows or not cfg.prefix_fractions:
        return res, 0, 0
    items = []  # (fraction, prompt ids + prefix, answer, depth, the teacher's prompt ids or None)
    stop_set = set(s_stop)
    for f in cfg.prefix_fractions:
        for b in rows:
            ids = resp_ids[b]
            content = ids[:-1] if ids and ids[-1] in stop_set else ids
            depth = int(round(f * len(content)))
            ex = examples[b // R]
            items.append((f, ex.input_ids + content[:depth], ex.answer, depth, ex.teacher_input_ids))
    per_item: dict[str, list[float]] = {"student": [0.0] * len(items), "teacher": [0.0] * len(items)}
    tokens = {"student": 0, "teacher": 0}
    for who, model, stops in (("student", student, s_stop), ("teacher", teacher, t_stop)):
        for f in cfg.prefix_fractions:
            idx = [i for i, it in enumerate(items) if it[0] == f]
            gens = sample_responses(
                model,
                tokenizer,
                # the teacher continues the same prefix after its own prompt, when it has one
                [
                    items[i][4] + items[i][1][len(items[i][1]) - items[i][3] :]
                    if who == "teacher" and items[i][4] is not None
                    else items[i][1]
                    for i in idx
                ],
                n=n,
                temperature=cfg.eval_temperature,
                max_new_tokens=max(1, cfg.max_new_tokens - min(items[i][3] for i in idx)),
                batch_size=cfg.batch_size,
                seed=cfg.seed + 2,
                stop_ids=stops,
                vocab_limit=vocab_limit,
                progress=cfg.progress,
                desc=f"continue {who} @{f:g}",
            )
            tokens[who] += gens.generated_tokens
            full, answers = [], []
            for j, r in enumerate(gens.responses):
                _, ids, answer, depth, _ = items[idx[j // n]]
                r = r[: max(1, cfg.max_new_tokens - depth)]  # this item's own budget
                full.append((ids[len(ids) - depth :] if depth else []) + r)
                answers.append(answer)
            correct = grade_responses(tokenizer, full, answers)
            for j, i in enumerate(idx):
                per_item[who][i] = sum(bool(c) for c in correct[j * n : (j + 1) * n]) / n
    all_diffs = []
    for f in cfg.prefix_fractions:
        idx = [i for i, it in enumerate(items) if it[0] == f]
        diffs = [per_item["teacher"][i] - per_item["student"][i] for i in idx]
        all_diffs += diffs
        adv, se = mean_se(diffs)
        res["by_fraction"].append(
            {
                "fraction": f,
                "depth_mean": _mean([items[i][3] for i in idx]),
                "student_accuracy": _mean([per_item["student"][i] for i in idx]),
                "teacher_accuracy": _mean([per_item["teacher"][i] for i in idx]),
                "advantage": adv,
                "advantage_se": se,
            }
        )
    res["advantage"], res["advantage_se"] = mean_se(all_diffs)
    ev.continuation_advantage, ev.continuation_advantage_se = res["advantage"], res["advantage_se"]
    return res, tokens["student"], tokens["teacher"]
