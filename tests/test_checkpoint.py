import json
import random

import numpy as np
import pytest
import torch

from opd.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from opd.tiny import build_byte_tokenizer, build_tiny_model


@pytest.fixture()
def parts():
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    sched.step()
    return tok, model, opt, sched


def test_round_trip_restores_everything(tmp_path, parts):
    tok, model, opt, sched = parts
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    save_checkpoint(tmp_path, 7, model=model, tokenizer=tok, optimizer=opt, scheduler=sched, state={"x": 1})
    expect = (random.random(), np.random.rand(), torch.rand(1).item())

    tok2 = build_byte_tokenizer()
    model2 = build_tiny_model(tok2, seed=99)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    state = load_checkpoint(latest_checkpoint(tmp_path), model=model2, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 7, "x": 1}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.state_dict()["last_epoch"] == 1
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_keeps_only_the_newest(tmp_path, parts):
    tok, model, opt, sched = parts
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]


def test_crash_mid_write_leaves_previous_checkpoint_usable(tmp_path, parts, monkeypatch):
    tok, model, opt, sched = parts
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr("opd.checkpoint.torch.save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    monkeypatch.undo()
    # the half-written step 2 is invisible; step 1 is still the newest complete one
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert any(p.name.startswith(".tmp-step-000002") for p in (tmp_path / "checkpoints").iterdir())
    # the next save cleans the debris
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    assert json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["step"] == 2


def test_verify_names_what_is_wrong(tmp_path, parts):
    from opd.checkpoint import verify_checkpoint

    tok, model, opt, sched = parts
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)
    assert verify_checkpoint(path) is None
    (path / "state.json").write_text('{"step": 1')  # a changed file fails the size check
    assert "state.json is" in verify_checkpoint(path)

    path = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    (path / "COMPLETE").write_text("ok\n")  # an older checkpoint's bare marker: no sizes to compare
    st = path / "model" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-10])
    assert verify_checkpoint(path).startswith("model/model.safetensors is unreadable")
    (path / "COMPLETE").unlink()
    assert "no COMPLETE marker" in verify_checkpoint(path)


def test_load_newest_falls_back_then_fails_clearly(tmp_path, parts, caplog):
    from opd.checkpoint import CheckpointError, load_newest_checkpoint

    tok, model, opt, sched = parts
    assert load_newest_checkpoint(tmp_path, model=model) is None  # nothing saved yet
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, keep=3)
    bad = tmp_path / "checkpoints" / "step-000002" / "scheduler.pt"
    bad.write_bytes(bad.read_bytes()[:5])
    model2 = build_tiny_model(build_byte_tokenizer(), seed=5)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    with caplog.at_level("WARNING", logger="opd"):
        path, state = load_newest_checkpoint(tmp_path, model=model2, optimizer=opt2)
    assert path.name == "step-000001" and state["step"] == 1
    assert "step-000002 is unusable (scheduler.pt is 5 bytes" in caplog.text
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)

    (tmp_path / "checkpoints" / "step-000001" / "rng.json").write_text("")
    with pytest.raises(CheckpointError, match="no usable checkpoint .*step-000002: .*step-000001: "):
        load_newest_checkpoint(tmp_path, model=model2)
