"""Nothing lost, nothing silent: the run directory, interrupts and checkpoints under faults.

Real processes where the behaviour depends on them (a concurrent run holding the lock, SIGINT/SIGTERM
to a running ``opd train``); the rest in-process through ``train()`` or ``opd.cli.main`` on lab models.
"""

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd import cli
from opd.checkpoint import UnsafeFileError, list_checkpoints
from opd.config import ConfigError, OPDConfig
from opd.lab import resolve
from opd.methods import opd as opd_method
from opd.rundir import (
    LOCK_NAME,
    RESUME_MAY_CHANGE,
    RunDirError,
    RunInterrupted,
    RunLock,
    StopSignals,
    check_output_dir,
)
from opd.tracking import read_metrics

ARGS = dict(
    student="lab:student",
    teacher="lab:teacher-a-plus",
    prompts="lab:train",
    steps=3,
    prompts_per_step=2,
    rollouts_per_prompt=2,
    max_new_tokens=12,
    micro_batch_size=4,
    lr=1e-3,
    weight_decay=0.0,
    threads=1,
    progress=False,
    alerts=False,
)


def cfg(out, **kw) -> OPDConfig:
    return OPDConfig(**{**ARGS, "output_dir": str(out), **kw})


def overrides(out, **kw) -> list[str]:
    return [f"{k}={v}" for k, v in {**ARGS, "output_dir": str(out), **kw}.items()]


def weights(path):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what earlier calls printed
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


class EvilPickle:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line(err: str) -> str:
    """The one message line of a failed command (progress bars may share stderr)."""
    lines = [ln for ln in err.splitlines() if re.search(r"opd: (error|config error|interrupted|aborted)", ln)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- processes: lock + signals


def _start(out, tmp_path, name, **kw):
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed by the caller via proc.log
    cmd = [sys.executable, "-m", "opd.cli", "train", *overrides(out, steps=1000, **kw)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    proc.log_path = tmp_path / f"{name}.log"
    return proc


def _wait_for_step(proc, out, timeout=120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip():
            return
        if proc.poll() is not None:
            raise AssertionError(proc.log_path.read_text())
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("opd train did not finish a step in time")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_stops_at_step_boundary_with_checkpoint_and_resume_is_exact(tmp_path, capsys, sig):
    out = tmp_path / "run"
    proc = _start(out, tmp_path, "a")
    try:
        _wait_for_step(proc, out)
        if sig == "SIGINT":  # while it runs, a second run into the same directory is refused
            code, err = run_cli(["train", *overrides(out, overwrite="true")], capsys)
            assert code == 2
            assert (
                f"is in use by another opd run (pid {proc.pid}, on host {socket.gethostname()}"
                in one_line(err)
            )
            assert (out / "metrics.jsonl").exists()  # overwrite=true did not touch the running run
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.log.close()
    text = proc.log_path.read_text()
    assert code == {"SIGINT": 130, "SIGTERM": 143}[sig], text
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].startswith(f"opd: interrupted by {sig} after step ")
    summary = json.loads((out / "summary.json").read_text())
    n = summary["steps_done"]
    assert summary["interrupted"] == sig and summary["final_model"] is None
    assert [s for s, _ in list_checkpoints(out)][-1] == n
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, n + 1))
    assert not (out / LOCK_NAME).exists() and not (out / "final").exists()

    # resuming (one more step) equals an uninterrupted run of n + 1 steps, bit for bit
    res = opd_method.train(cfg(out, steps=n + 1, resume=True))
    ref = opd_method.train(cfg(tmp_path / "ref", steps=n + 1))
    assert same_weights(weights(ref["final_model"]), weights(res["final_model"]))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, n + 2))


def test_stop_signals_in_process():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        with pytest.raises(RunInterrupted, match="before training started"):  # not armed: abort at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):  # a second one aborts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored


def test_lock_is_exclusive_released_and_stale_locks_are_handled(tmp_path, caplog):
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunDirError, match="in use by another opd run"):
            RunLock(tmp_path).acquire()  # a second open file description conflicts like a second process
    assert not (tmp_path / LOCK_NAME).exists()

    # a lock file left by a dead process on this host is taken over, with a log line
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level("WARNING", logger="opd"), RunLock(tmp_path):
        pass
    assert "stale lock" in caplog.text and f"pid {dead.pid}" in caplog.text

    # one left by another host cannot be checked: refused, with the file to delete
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunDirError, match=f"another host .*delete '{tmp_path / LOCK_NAME}'"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).exists()


# --------------------------------------------------------------------------- directories


def test_finished_run_is_not_overwritten_and_resume_refuses_a_different_teacher(tmp_path, capsys):
    out = tmp_path / "run"
    opd_method.train(cfg(out, steps=2, save_every=1))
    before = (out / "metrics.jsonl").read_text(), weights(out / "final")

    code, err = run_cli(["train", *overrides(out, steps=2, save_every=1)], capsys)
    assert code == 2 and "is not empty" in one_line(err) and "overwrite=true" in err
    code, err = run_cli(
        ["train", *overrides(out, steps=2, save_every=1, teacher="lab:teacher-b-plus", resume="true")], capsys
    )
    assert code == 2
    assert "teacher: 'lab:teacher-a-plus' -> 'lab:teacher-b-plus'" in one_line(err)
    assert (out / "metrics.jsonl").read_text() == before[0]
    assert same_weights(before[1], weights(out / "final"))

    # fields that may change on resume: steps, checkpoint cadence, logging...
    opd_method.train(cfg(out, steps=3, save_every=2, resume=True, progress=True))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]

    # overwrite=true replaces opd's files only, and only once the new run has loaded
    (out / "notes.txt").write_text("mine")
    code, err = run_cli(["train", *overrides(out, overwrite="true", teacher=str(tmp_path / "nope"))], capsys)
    assert code == 2 and "not found" in one_line(err)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3] and (out / "final").is_dir()
    opd_method.train(cfg(out, steps=1, overwrite=True))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert not (out / "checkpoints").exists() and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="choose one"):
        cfg(out, resume=True, overwrite=True)


def test_resume_of_a_finished_run_without_checkpoints_is_refused(tmp_path):
    out = tmp_path / "run"
    opd_method.train(cfg(out, steps=1))
    with pytest.raises(RunDirError, match="no checkpoint to continue from"):
        opd_method.train(cfg(out, steps=1, resume=True))


def test_resume_may_change_names_real_fields():
    assert set(OPDConfig.__dataclass_fields__) >= RESUME_MAY_CHANGE
    for key in (
        "student",
        "teacher",
        "prompts",
        "objective",
        "support_size",
        "seed",
        "prompts_per_step",
        "lr",
    ):
        assert key not in RESUME_MAY_CHANGE


def test_output_dir_that_is_an_input_empty_or_a_file_is_refused(tmp_path, capsys):
    student = tmp_path / "models" / "student"
    shutil.copytree(_lab_dir("student"), student)
    files = sorted(p.name for p in student.iterdir())
    prompts = tmp_path / "data" / "p.jsonl"
    prompts.parent.mkdir()
    prompts.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    cases = [
        (dict(student=str(student), output_dir=str(student)), "is the student model"),
        (dict(student=str(student), output_dir=str(tmp_path / "models")), "contains the student model"),
        (dict(prompts=str(prompts), output_dir=str(prompts.parent)), "contains the prompts data"),
        (dict(output_dir=""), "output_dir is empty"),
        (dict(output_dir=str(prompts)), "is an existing file"),
    ]
    for kw, expect in cases:
        code, err = run_cli(["train", *overrides(kw.pop("output_dir"), **kw)], capsys)
        assert code == 2 and expect in one_line(err), (kw, err)
    assert sorted(p.name for p in student.iterdir()) == files  # nothing written into the model
    assert sorted(p.name for p in prompts.parent.iterdir()) == ["p.jsonl"]
    # opd diagnose applies the same rules to its output_dir
    code, err = run_cli(
        ["diagnose", f"student={student}", "teacher=lab:teacher-a-plus", "prompts=lab:train"]
        + [f"output_dir={student}"],
        capsys,
    )
    assert code == 2 and "output_dir=" in one_line(err) and "is the student model" in err
    assert sorted(p.name for p in student.iterdir()) == files
    # lab models resolve to their directories too
    with pytest.raises(RunDirError, match="contains the teacher model"):
        check_output_dir(_lab_dir("teacher-a-plus").parent, models={"teacher": "lab:teacher-a-plus"})


def _lab_dir(name):
    return resolve(f"lab:{name}", kind="model").require_built()


def test_failed_run_leaves_no_empty_output_dir(tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "run"
    code, err = run_cli(["train", *overrides(out, teacher=str(tmp_path / "missing"))], capsys)
    assert code == 2 and "not found" in one_line(err)
    assert not (tmp_path / "new").exists()

    # failing in the first step: the config.json it wrote is removed too, so a rerun is not refused
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(opd_method, "opd_step", boom)
    with pytest.raises(RuntimeError, match="boom"):
        opd_method.train(cfg(out))
    assert not (tmp_path / "new").exists()

    # a directory that existed before the run is kept (emptied of what the run wrote)
    out.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="boom"):
        opd_method.train(cfg(out))
    assert out.is_dir() and not any(out.iterdir())


# --------------------------------------------------------------------------- checkpoints


def test_truncated_newest_checkpoint_falls_back_and_resume_is_exact(tmp_path, caplog):
    out = tmp_path / "run"
    ref = opd_method.train(cfg(tmp_path / "ref", steps=3))
    opd_method.train(cfg(out, steps=3, save_every=1))
    newest = out / "checkpoints" / "step-000002" / "model" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level("INFO", logger="opd"):
        res = opd_method.train(cfg(out, steps=3, save_every=1, resume=True))
    assert "step-000002 is unusable (model/model.safetensors is" in caplog.text
    assert "step-000001 (step 1)" in caplog.text  # "resumed from ..."
    assert same_weights(weights(ref["final_model"]), weights(res["final_model"]))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_malicious_pickles_are_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    opd_method.train(cfg(out, steps=2, save_every=1))
    marker = tmp_path / "pwned"
    ckpt = out / "checkpoints" / "step-000001"
    with open(ckpt / "optimizer.pt", "wb") as f:
        pickle.dump(EvilPickle(marker), f, protocol=2)
    # a swapped file alone fails the size check; here the COMPLETE marker is doctored to match
    listed = json.loads((ckpt / "COMPLETE").read_text())
    listed["files"]["optimizer.pt"] = (ckpt / "optimizer.pt").stat().st_size
    (ckpt / "COMPLETE").write_text(json.dumps(listed))
    code, err = run_cli(["train", *overrides(out, steps=2, save_every=1, resume="true")], capsys)
    line = one_line(err)
    assert code == 2 and "refused to load" in line and "optimizer.pt' as unsafe" in line
    assert "weights_only=False" not in err and not marker.exists()

    student = tmp_path / "evil-student"
    shutil.copytree(_lab_dir("student"), student)
    (student / "model.safetensors").unlink()
    with open(student / "pytorch_model.bin", "wb") as f:
        pickle.dump(EvilPickle(marker), f, protocol=2)
    code, err = run_cli(["train", *overrides(tmp_path / "run2", student=str(student))], capsys)
    line = one_line(err)
    assert code == 2 and "pytorch_model.bin' as unsafe" in line and "posix.system" in line
    assert "weights_only=False" not in err and not marker.exists()
    with pytest.raises(UnsafeFileError):
        from opd.models import load_model

        load_model(student)


def test_resume_reads_a_run_saved_with_the_old_key_names(tmp_path):
    """A run saved before ``top_k`` / ``rollout_top_k`` were renamed resumes with today's names, and a
    real change of objective is still refused."""
    out = tmp_path / "run"
    opd_method.train(cfg(out, steps=2, save_every=1, objective="topk", support_size=4))
    saved = json.loads((out / "config.json").read_text())
    old = {k: v for k, v in saved.items() if k not in ("objective", "support_size", "sample_top_k")}
    old.update(top_k=4, rollout_top_k=0)
    (out / "config.json").write_text(json.dumps(old))
    res = opd_method.train(cfg(out, steps=3, save_every=1, objective="topk", support_size=4, resume=True))
    assert res["steps_done"] == 3
    (out / "config.json").write_text(json.dumps({**old, "top_k": 0}))
    with pytest.raises(RunDirError, match="objective: 'sampled' -> 'topk'"):
        opd_method.train(cfg(out, steps=4, save_every=1, objective="topk", support_size=4, resume=True))
