"""The loop start every method shares (opd.methods.loop): resume restores what a checkpoint saved, a
fresh run starts at 0, each process gets its own sampling stream. The methods' resume-equals-uninterrupted
tests (test_train, test_gkd, test_kd, test_sft, test_grpo) run it end to end."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from opd.checkpoint import save_checkpoint
from opd.cost import CostMeter
from opd.methods.common import make_optimizer, make_scheduler
from opd.methods.loop import Resumed, begin_process, claim_run_dir, resume_checkpoint, seed_processes
from opd.sampler import PromptSampler
from opd.tiny import build_byte_tokenizer, build_tiny_model


def _cfg(tmp_path, **kw):
    base = dict(
        resume=True, output_dir=str(tmp_path), seed=3, threads=0, lr=1e-3, adam_betas=(0.9, 0.99),
        weight_decay=0.0, lr_schedule="constant", warmup_steps=0, steps=10,
    )  # fmt: skip
    return SimpleNamespace(**(base | kw))


def _parts(cfg):
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=0)
    opt = make_optimizer(model, cfg)
    return tok, model, opt, make_scheduler(opt, cfg), CostMeter(10, 20), PromptSampler(range(7), seed=1)


def test_resume_restores_step_skips_sampler_cost_and_weights(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    tok, model, opt, sched, cost, sampler = _parts(cfg)
    with caplog.at_level(logging.WARNING, logger="opd"):
        assert resume_checkpoint(cfg, tmp_path, model, opt, sched, cost, sampler=sampler) == Resumed()
    assert "no complete checkpoint" in caplog.text
    assert resume_checkpoint(_cfg(tmp_path, resume=False), tmp_path, model, opt, sched, cost) == Resumed()

    sampler.next_batch(5)
    cost.add(student_train_tokens=123)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    for p in model.parameters():  # one optimiser and schedule step: state a fresh optimizer does not have
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    sched.step()
    state = {"sampler": sampler.state_dict(), "skipped_steps": 2, "cost": cost.state_dict()}
    save_checkpoint(tmp_path, 4, model=model, tokenizer=tok, optimizer=opt, scheduler=sched, state=state)
    expected_batch = PromptSampler(range(7), seed=1)
    expected_batch.load_state_dict(sampler.state_dict())

    _, fresh, opt2, sched2, cost2, sampler2 = _parts(cfg)
    resumed = resume_checkpoint(cfg, tmp_path, fresh, opt2, sched2, cost2, sampler=sampler2)
    assert (resumed.start_step, resumed.skipped_steps) == (4, 2) and resumed.state["step"] == 4
    assert sampler2.next_batch(3) == expected_batch.next_batch(3)
    assert cost2.row() == cost.row()
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert sched2.last_epoch == sched.last_epoch == 1
    saved, loaded = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert len(loaded) == len(saved) > 0
    for i in saved:
        assert torch.equal(loaded[i]["exp_avg"], saved[i]["exp_avg"])


def test_processes_get_their_own_stream_and_rank_0_claims_the_directory(tmp_path):
    cfg = _cfg(tmp_path)
    assert begin_process(cfg, SimpleNamespace(is_main=False)) == tmp_path
    first = torch.rand(3)
    begin_process(cfg, SimpleNamespace(is_main=False))
    assert torch.equal(torch.rand(3), first)  # the same seed on every process
    draws = []
    for rank in (0, 1):
        begin_process(cfg, SimpleNamespace(is_main=False))
        seed_processes(cfg, SimpleNamespace(world_size=2, rank=rank), start_step=4)
        draws.append(torch.rand(3))
    assert not torch.equal(draws[0], draws[1])
    begin_process(cfg, SimpleNamespace(is_main=False))
    seed_processes(cfg, SimpleNamespace(world_size=1, rank=0), start_step=4)  # one process: untouched
    assert torch.equal(torch.rand(3), first)

    calls = []
    run = SimpleNamespace(clear_previous_run=lambda: calls.append("clear"))
    log = SimpleNamespace(truncate_after=lambda step: calls.append(("truncate", step)))
    claim_run_dir(None, tmp_path, cfg, log, 4)  # not rank 0: nothing
    assert calls == [] and not (tmp_path / "config.json").exists()
    claim_run_dir(run, tmp_path, _Config(), log, 4)
    assert calls == ["clear", ("truncate", 4)]
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}


@dataclass
class _Config:
    a: int = 1
