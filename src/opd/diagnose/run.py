"""``diagnose(config)``: load the models → sample the student's rollouts → measure → decide → write.

Reads top to bottom; each measurement lives in :mod:`opd.diagnose.measure`, the verdict in
:mod:`opd.diagnose.verdict`, the report in :mod:`opd.diagnose.report`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from opd.config_io import to_dict
from opd.data import load_prompts, prompt_texts, rendering
from opd.diagnose import measure
from opd.diagnose.config import DiagnoseConfig
from opd.diagnose.report import render_markdown, write_html
from opd.diagnose.verdict import Evidence, decide
from opd.evaluate import grade_responses
from opd.models import (
    TokenizerMismatchError,
    check_compatibility,
    load_model,
    load_tokenizer,
    prompt_token_cap,
)
from opd.report import write_text_atomic
from opd.rollout import relay_responses, stop_token_ids
from opd.rundir import locked_run_dir
from opd.runtime import Runtime

log = logging.getLogger("opd.diagnose")

__all__ = ["TINY_MODEL_PARAMS", "diagnose", "load_pair"]

TINY_MODEL_PARAMS = 10_000_000
"""Below this many parameters (both models), ``threads = 0`` runs torch with one CPU thread."""


def diagnose(config: DiagnoseConfig) -> dict[str, Any]:
    """Run the pre-flight diagnosis (:mod:`opd.diagnose`) and write the three report files.

    Returns the content of ``diagnosis.json``: ``verdict``, ``reasons``, ``remedies``, ``flags``,
    ``checks``, the measured figures (``tokenizer``, ``rollouts``, ``condition_i``, ``condition_ii``,
    ``context``), ``evidence``, ``cost`` and ``config``. The output directory is locked for the run
    (:mod:`opd.rundir`); torch's thread count is restored afterwards.
    """
    config.check_runnable()
    threads = torch.get_num_threads()
    try:
        models = {"student": config.student, "teacher": config.teacher}
        data = {"prompts": config.prompts}
        with locked_run_dir(config.output_dir, models=models, data=data, key="output_dir"):
            return _run(config)
    finally:
        torch.set_num_threads(threads)


def load_pair(cfg: DiagnoseConfig) -> tuple[Any, Any, torch.nn.Module, torch.nn.Module]:
    """``(student tokenizer, teacher tokenizer, student, teacher)`` as the diagnosis loads them: each
    model in its configured dtype on ``device`` / ``teacher_device`` (as in opd train), in eval mode. Sets
    torch's thread count: ``cfg.threads`` when set, else one thread when both models are under
    :data:`TINY_MODEL_PARAMS` on the CPU; the caller restores it."""
    tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    teacher_tok = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    runtime = Runtime.from_config(cfg)
    student = load_model(
        cfg.student, dtype=cfg.student_dtype, trust_remote_code=cfg.trust_remote_code, device=runtime.device
    )
    teacher = load_model(
        cfg.teacher,
        dtype=cfg.teacher_dtype,
        trust_remote_code=cfg.trust_remote_code,
        device=runtime.teacher_device,
    )
    student.eval()
    teacher.eval()
    n_params = max(sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif n_params < TINY_MODEL_PARAMS and next(student.parameters()).device.type == "cpu":
        torch.set_num_threads(1)
    return tok, teacher_tok, student, teacher


class _Clock:
    """Seconds per phase (``lap(name)`` adds the time since the previous lap)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now


def _run(cfg: DiagnoseConfig) -> dict[str, Any]:
    clock = _Clock()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # -- 1. models (tiny ones run single-threaded unless threads is set)
    tok, teacher_tok, student, teacher = load_pair(cfg)
    clock.lap("load")

    config = to_dict(cfg) | {"thresholds": dataclasses.asdict(cfg.thresholds)}
    config["prefix_fractions"] = config.pop("prefix_fractions")  # listed last, as before
    result: dict[str, Any] = {"config": config}
    ev = Evidence()

    # -- 2. the tokenizers must agree (otherwise: no-go, nothing else to measure)
    try:
        compat = check_compatibility(tok, teacher_tok, student, teacher)
    except TokenizerMismatchError as e:
        ev.tokenizer_compatible, ev.tokenizer_error = False, str(e)
        result["tokenizer"] = {"compatible": False, "error": str(e)}
        return _finish(result, ev, cfg, clock, out_dir, cost={})
    vocab_limit = compat.vocab_limit

    # -- 3. prompts, rendered as opd train renders them
    max_prompt_tokens, cap_why = prompt_token_cap(cfg.max_prompt_tokens, cfg.max_new_tokens, student, teacher)
    prompts = load_prompts(
        cfg.prompts,
        tok,
        **rendering(cfg),
        teacher_prompt_template=cfg.teacher_prompt_template,
        teacher_system_prompt=cfg.teacher_system_prompt,
        max_prompt_tokens=max_prompt_tokens,
        limit=cfg.num_prompts,
        seed=cfg.seed,
        max_prompt_tokens_why=cap_why,
        exclude=prompt_texts(cfg.exclude_prompts) if cfg.exclude_prompts else None,
    )
    examples = prompts.examples
    N, R, M = len(examples), cfg.rollouts_per_prompt, cfg.max_new_tokens
    has_answers = any(e.answer is not None for e in examples)
    s_stop, t_stop = stop_token_ids(tok), stop_token_ids(teacher_tok)
    clock.lap("load")

    # -- 4. student rollouts (what OPD step 0 samples), graded where there are answers
    batch = measure.sample_rollouts(student, tok, [e.input_ids for e in examples], cfg, vocab_limit)
    mask_B_T = batch.response_mask_B_T > 0
    resp_ids = [batch.input_ids_B_T[b][mask_B_T[b]].tolist() for b in range(batch.input_ids_B_T.shape[0])]
    rollout_correct = grade_responses(tok, resp_ids, [examples[int(p)].answer for p in batch.prompt_index_B])
    clock.lap("rollouts")

    # -- 5. tokenizer / template / EOS check on one conversation: the first prompt and its first rollout
    tmpl = measure.template_check(
        tok, teacher_tok, examples[0].text, tok.decode(resp_ids[0], skip_special_tokens=True), cfg
    )
    tmpl["compatible"] = True
    tmpl["compat_warnings"] = compat.warnings
    tmpl["vocab_limit"] = vocab_limit
    ev.template_differs, ev.stop_ids_differ = tmpl["template_differs"], tmpl["stop_ids_differ"]
    result["tokenizer"] = tmpl

    # -- 6. scoring by both models → condition (i) and the rewards
    teacher_batch = None  # teacher_prompt_template / teacher_system_prompt: the teacher scores after its own
    if examples[0].teacher_input_ids is not None:
        teacher_batch = relay_responses(
            batch, [examples[int(p)].teacher_input_ids for p in batch.prompt_index_B]
        )
    s_out, t_out = measure.score_rollouts(student, teacher, batch, cfg, vocab_limit, teacher_batch)
    clock.lap("scoring")
    cond_i, rewards = measure.condition_i(s_out, t_out, batch, s_stop, cfg, ev)
    graded = [c for c in rollout_correct if c is not None]
    result["rollouts"] = {
        "num": len(resp_ids),
        "prompts": N,
        "per_prompt": R,
        "length_mean": float(batch.response_lengths_B.float().mean()),
        "truncated_frac": float(batch.truncated_B.float().mean()),
        "student_sampled_accuracy": (sum(float(c) for c in graded) / len(graded) if graded else None)
        if has_answers
        else None,
    }
    result["condition_i"] = cond_i
    ev.truncated_frac, ev.max_new_tokens = result["rollouts"]["truncated_frac"], cfg.max_new_tokens

    # -- 7. condition (ii): accuracy and the teacher continuation advantage (needs answers)
    cond_ii: dict[str, Any] = {"has_answers": has_answers, "reward": rewards["stats"]}
    gen_tokens = {
        "student_rollouts": sum(len(r) for r in resp_ids),
        "student_eval": 0,
        "teacher_eval": 0,
        "student_continuations": 0,
        "teacher_continuations": 0,
    }
    if has_answers:
        cond_ii["accuracy"], n_s, n_t = measure.accuracy(
            student, teacher, tok, s_stop, t_stop, prompts, cfg, vocab_limit, ev
        )
        gen_tokens["student_eval"], gen_tokens["teacher_eval"] = n_s, n_t
        clock.lap("accuracy")
        cond_ii["continuation"], n_s, n_t = measure.continuations(
            student, teacher, tok, s_stop, t_stop, examples, resp_ids, cfg, vocab_limit, ev
        )
        gen_tokens["student_continuations"], gen_tokens["teacher_continuations"] = n_s, n_t
        clock.lap("continuations")
    result["condition_ii"] = cond_ii

    # -- 8. context: AUROC of the sequence-mean reward against the rollouts' correctness (never decides)
    ctx: dict[str, Any] = {}
    if has_answers:
        labels = [bool(c) for c in rollout_correct]
        ctx["auroc_sampled_token"] = measure.auroc(rewards["seq_sampled"], labels)
        ctx["auroc_topk"] = measure.auroc(rewards["seq_topk"], labels)
        ctx["num_correct"], ctx["num_wrong"] = sum(labels), len(labels) - sum(labels)
        ctx["note"] = (
            "docs/paper.md §5: about 0.73-0.75 for working and failing teachers alike; context only."
        )
    ctx["seq_mean_reward"] = rewards["seq_sampled"]
    ctx["seq_overlap_mass"] = rewards["seq_mass"]
    ctx["rollout_correct"] = rollout_correct
    result["context"] = ctx

    # -- 9. cost, then decide and write
    scored_tokens = int(batch.attention_mask_B_T.sum())
    cost = {
        "generated_tokens": gen_tokens | {"total": sum(gen_tokens.values())},
        "scored_sequences": {"student": len(resp_ids), "teacher": len(resp_ids)},
        "scored_tokens": {"student": scored_tokens, "teacher": scored_tokens},
        "bound_generated_tokens": N * M * (R + 2 * cfg.eval_n * (1 + len(cfg.prefix_fractions)))
        if has_answers
        else N * M * R,
    }
    return _finish(result, ev, cfg, clock, out_dir, cost=cost)


def _finish(
    result: dict[str, Any], ev: Evidence, cfg: DiagnoseConfig, clock: _Clock, out_dir: Path, *, cost
) -> dict[str, Any]:
    """Decide, assemble diagnosis.json (verdict first) and write the three report files."""
    v = decide(ev, cfg.thresholds)
    seconds = clock.seconds | {"total": time.perf_counter() - clock.start}
    head = {
        "verdict": v.verdict,
        "reasons": v.reasons,
        "remedies": v.remedies,
        "flags": v.flags,
        "checks": [dataclasses.asdict(c) for c in v.checks],
        "student": cfg.student,
        "teacher": cfg.teacher,
        "prompts": cfg.prompts,
    }
    result = _jsonable(
        head
        | result
        | {
            "evidence": dataclasses.asdict(ev),
            "cost": cost | {"seconds": seconds, "threads": torch.get_num_threads()},
        }
    )
    write_text_atomic(out_dir / "diagnosis.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out_dir / "diagnosis.md", render_markdown(result))
    write_html(out_dir / "diagnosis.html", result)
    log.info("diagnosis: %s (%s) -> %s", v.verdict, ", ".join(v.remedies) or "no remedy", out_dir)
    return result


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    return x
