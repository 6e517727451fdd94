"""A served teacher (``opd serve-teacher`` + ``teacher=http://...``) gives the training a local teacher
gives: the same scores, rewards and metrics, the same weights after an OPD run; and it fails clearly
(token, tokenizer, size, a server that is gone). The server runs in this process, on a free localhost port."""

from __future__ import annotations

import copy
import dataclasses
import socket
import threading
import time

import pytest
import torch
from conftest import require_module
from opd_configs import make_cfg
from transformers import AutoModelForCausalLM

from opd.config import ConfigError
from opd.data import load_prompts
from opd.methods import opd as opd_method
from opd.methods.opd_scoring import fused_update, score_batch
from opd.metrics import mechanism_metrics
from opd.models import TokenizerMismatchError, check_compatibility, load_model, load_tokenizer
from opd.remote import RemoteTeacher, TeacherServerError, tokenizer_fingerprint
from opd.remote.protocol import (
    FINGERPRINT_HEADER,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    decode_response,
    encode_request,
    encode_response,
)
from opd.remote.server import TeacherService, create_app
from opd.rollout import make_backend, relay_responses
from opd.scoring import PolicyScorer, ScoreOutput, score

TEACHER_T = "Solve carefully: {problem}\nAnswer:"


@pytest.fixture(autouse=True)
def serve_extra():
    """The serve extra is part of the dev install (make setup): missing, it skips here and fails in CI."""
    for name in ("fastapi", "uvicorn", "httpx"):
        require_module(name, "pip install 'opd[serve]'")


class Served:
    """A uvicorn server of ``service`` on a free 127.0.0.1 port, in a thread; ``stop()`` ends it."""

    def __init__(self, service: TeacherService, token: str | None = None):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            create_app(service, token=token), host="127.0.0.1", port=port, log_level="error"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the test server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def lab():
    """The lab's student and a lab teacher (same tokenizer), and lab prompts."""
    tok = load_tokenizer("lab:student")
    student = load_model("lab:student").eval()
    teacher = load_model("lab:teacher-b-plus").eval()
    return student, teacher, tok


@pytest.fixture(scope="module")
def lab_server(lab):
    _, teacher, tok = lab
    served = Served(TeacherService(teacher, tok, name="lab:teacher-b-plus"))
    yield served
    served.stop()


def lab_rollouts(lab, n=2, **load_kw):
    student, _, tok = lab
    ps = load_prompts("lab:train", tok, limit=4, **load_kw)
    backend = make_backend("hf", student, tok)
    batch = backend.generate(
        [e.input_ids for e in ps.examples],
        n=n,
        max_new_tokens=12,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        seed=5,
    )
    return ps, batch


def remote(url: str, tok, cfg, **kw) -> RemoteTeacher:
    return RemoteTeacher(
        url, tok, temperature=cfg.teacher_temperature, chunk_size=cfg.score_chunk_size, vocab_limit=None, **kw
    )


def assert_close_scores(a: ScoreOutput, b: ScoreOutput, atol=1e-5):
    for f in dataclasses.fields(ScoreOutput):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (x is None) == (y is None), f.name
        if x is not None:
            assert x.shape == y.shape and x.dtype == y.dtype, f.name
            if x.dtype.is_floating_point:
                torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=f.name)
            else:
                assert torch.equal(x, y), f.name


# ------------------------------------------------------------------------------------------ the wire


def test_the_wire_carries_response_positions_only_and_round_trips(lab):
    """encode → decode gives score's own output back exactly (zeros off the mask); the reply holds N rows
    (response positions), not B×T, and never a vocabulary-sized axis."""
    _, teacher, tok = lab
    _, batch = lab_rollouts(lab)
    ids = torch.randint(0, 50, (*batch.input_ids_B_T.shape, 3))
    out = score(
        teacher,
        batch.input_ids_B_T,
        batch.attention_mask_B_T,
        batch.response_mask_B_T,
        top_k=5,
        given_ids_B_T_K=ids,
        entropy=True,
    )
    body = encode_response(out, batch.response_mask_B_T)
    back = decode_response(body, batch.response_mask_B_T, "cpu")
    assert_close_scores(out, back, atol=0)
    N, V = int(batch.response_mask_B_T.sum()), len(tok)
    floats = N * (1 + 1 + 3 + 5) + N * 5  # token_logp, entropy, given (3), top-k log-probs and ids (5)
    assert len(body) < 4 * floats + 1024 < 4 * batch.input_ids_B_T.numel() * V
    req = encode_request(
        batch.input_ids_B_T,
        batch.attention_mask_B_T,
        batch.response_mask_B_T,
        ids,
        temperature=0.7,
        top_k=5,
        entropy=True,
        vocab_limit=V,
        chunk_size=64,
    )
    assert len(req) < 1024 + batch.input_ids_B_T.numel() * (4 + 1 + 1) + N * 3 * 4


def other_tokenizer(tok):
    """``tok`` with one more token: a vocabulary the lab teacher does not have."""
    other = copy.deepcopy(tok)
    other.add_tokens(["<not-in-the-teacher>"])
    return other


def test_fingerprint_is_of_the_vocabulary_only(lab):
    _, _, tok = lab
    fp = tokenizer_fingerprint(tok)
    assert fp == tokenizer_fingerprint(load_tokenizer("lab:teacher-b-plus"))  # same vocabulary, other model
    assert tokenizer_fingerprint(other_tokenizer(tok)) != fp
    eos = copy.deepcopy(tok)
    eos.eos_token = eos.pad_token  # same ids, another end-of-sequence token: a warning, not a refusal
    assert tokenizer_fingerprint(eos) == fp


def test_a_different_eos_is_the_same_warning_with_a_local_or_a_served_teacher(
    lab, lab_server, tiny_pair, tmp_path
):
    """Both paths accept a student whose EOS differs from the teacher's (the ids mean the same strings)
    and give the same warning; a different vocabulary is refused by both."""
    _, teacher, tok = lab
    eos = copy.deepcopy(tok)
    eos.eos_token = eos.pad_token
    local = check_compatibility(eos, tok, None, teacher)
    assert [w for w in local.warnings if w.startswith("EOS differs")], local.warnings
    served = remote(lab_server.url, eos, make_cfg(tiny_pair, tmp_path))
    try:
        assert served.warnings == local.warnings
    finally:
        served.close()
    same = remote(lab_server.url, tok, make_cfg(tiny_pair, tmp_path))
    assert same.warnings == [] == check_compatibility(tok, tok).warnings
    same.close()
    other = other_tokenizer(tok)
    with pytest.raises(TokenizerMismatchError):
        remote(lab_server.url, other, make_cfg(tiny_pair, tmp_path))
    bad = copy.deepcopy(tok)
    bad.add_special_tokens({"additional_special_tokens": ["<x>"]})
    with pytest.raises(TokenizerMismatchError):
        check_compatibility(bad, other)  # the same new id means another string locally too


# ------------------------------------------------------------------------------------------ same loss


@pytest.mark.parametrize(
    "kw",
    [
        dict(objective="sampled"),
        dict(objective="topk", support_size=4, support="union", teacher_temperature=0.8),
        dict(objective="topk", support_size=4, teacher_prompt_template=TEACHER_T),
    ],
    ids=["sampled", "topk-union-T0.8", "topk-teacher-prompt"],
)
def test_served_teacher_scores_rewards_and_metrics_equal_local(lab, lab_server, tiny_pair, tmp_path, kw):
    student, teacher, tok = lab
    load_kw = (
        {"teacher_prompt_template": kw["teacher_prompt_template"]} if "teacher_prompt_template" in kw else {}
    )
    ps, batch = lab_rollouts(lab, **load_kw)
    tb = None
    if load_kw:
        tb = relay_responses(batch, [ps.examples[int(p)].teacher_input_ids for p in batch.prompt_index_B])
    cfg = make_cfg(tiny_pair, tmp_path, micro_batch_size=3, **kw)
    s = PolicyScorer(student, temperature=cfg.temperature, chunk_size=cfg.score_chunk_size)
    local_t = PolicyScorer(teacher, temperature=cfg.teacher_temperature, chunk_size=cfg.score_chunk_size)
    served_t = remote(lab_server.url, tok, cfg)
    local, _ = score_batch(s, local_t, batch, cfg, teacher_batch=tb)
    served, _ = score_batch(s, served_t, batch, cfg, teacher_batch=tb)
    assert_close_scores(local.teacher, served.teacher)
    for f in ("token_reward_B_T", "old_logp", "advantages"):
        x, y = getattr(local, f), getattr(served, f)
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=f)

    def metrics(sc):
        k = cfg.metrics_top_k
        st, t = sc.student, sc.teacher
        return mechanism_metrics(
            st.topk_ids_B_T_K[..., :k],
            st.topk_logp_B_T_K[..., :k],
            t.topk_ids_B_T_K[..., :k],
            t.given_logp_B_T_K[..., :k],
            st.entropy_B_T,
            t.entropy_B_T,
            sc.mask_B_T,
        )

    m_local, m_served = metrics(local), metrics(served)
    assert m_local.keys() == m_served.keys() and len(m_local) > 3
    for key in m_local:
        assert m_served[key] == pytest.approx(m_local[key], abs=1e-5), key
    # the rewards are not trivially zero: the comparison could fail
    assert float(local.token_reward_B_T.abs().sum()) > 1e-3


@pytest.mark.parametrize("support", ["student", "union"])
def test_fused_update_with_a_served_teacher_equals_local(lab, lab_server, tiny_pair, tmp_path, support):
    """The fused path (the default) scores the teacher inside the student's graph pass: same loss and step.
    ``union`` needs the teacher's top-K before the student's pass: a served teacher is asked twice."""
    student, teacher, tok = lab
    _, batch = lab_rollouts(lab)
    cfg = make_cfg(tiny_pair, tmp_path, micro_batch_size=3, objective="topk", support_size=4, support=support)
    results = []
    for t in (
        PolicyScorer(teacher, temperature=cfg.teacher_temperature, chunk_size=cfg.score_chunk_size),
        remote(lab_server.url, tok, cfg),
    ):
        model = AutoModelForCausalLM.from_config(student.config)
        model.load_state_dict(student.state_dict())
        s = PolicyScorer(model, temperature=cfg.temperature, chunk_size=cfg.score_chunk_size)
        # SGD at lr 1: the weight change is the gradient itself (Adam's first step would turn ~1e-8
        # rounding of a near-zero gradient entry into a difference of up to lr)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        scored, _, loss, norm, _, _ = fused_update(s, t, batch, opt, cfg)
        results.append(
            (scored.token_reward_B_T, loss, norm, {k: v.clone() for k, v in model.state_dict().items()})
        )
    (r0, l0, n0, w0), (r1, l1, n1, w1) = results
    torch.testing.assert_close(r0, r1, atol=1e-5, rtol=0)
    assert l1 == pytest.approx(l0, abs=1e-5) and n1 == pytest.approx(n0, abs=1e-5)
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_two_step_opd_run_with_a_served_teacher_ends_with_the_local_weights(tiny_pair, tmp_path):
    _, teacher_dir, _ = tiny_pair
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tok = load_tokenizer(teacher_dir)
    served = Served(TeacherService(teacher, tok, name=str(teacher_dir)))
    try:
        kw = dict(objective="topk", support_size=4)
        local = opd_method.train(make_cfg(tiny_pair, tmp_path / "local", **kw))
        res = opd_method.train(make_cfg(tiny_pair, tmp_path / "served", teacher=served.url, **kw))
    finally:
        served.stop()
    start = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).state_dict()
    wl = AutoModelForCausalLM.from_pretrained(local["final_model"]).state_dict()
    ws = AutoModelForCausalLM.from_pretrained(res["final_model"]).state_dict()
    assert any(not torch.equal(start[k], wl[k]) for k in start)  # it learned: the comparison can fail
    for k in wl:
        torch.testing.assert_close(ws[k], wl[k], atol=1e-6, rtol=0, msg=k)
    assert res["last"]["kl/sampled"] == pytest.approx(local["last"]["kl/sampled"], abs=1e-5)
    assert res["cost"]["cost/teacher_forward_tokens"] == local["cost"]["cost/teacher_forward_tokens"]


# ------------------------------------------------------------------------------------------ failures


def _post(url, **kw):
    import httpx

    return httpx.post(url, **kw)


def test_a_wrong_or_missing_token_is_refused_with_401(lab, tiny_pair, tmp_path):
    _, teacher, tok = lab
    served = Served(TeacherService(teacher, tok), token="s3cret")
    cfg = make_cfg(tiny_pair, tmp_path)
    try:
        with pytest.raises(PermissionError, match="bearer token"):
            remote(served.url, tok, cfg, token="wrong")
        r = _post(f"{served.url}/score", content=b"x")
        assert r.status_code == 401
        ok = remote(served.url, tok, cfg, token="s3cret")  # the right token works
        _, batch = lab_rollouts(lab)
        out = ok(
            batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T, top_k=2, entropy=True
        )
        assert out.topk_ids_B_T_K.shape[-1] == 2
    finally:
        served.stop()


def test_a_tokenizer_mismatch_is_refused_before_scoring(lab, lab_server, tiny_pair, tmp_path):
    other = other_tokenizer(lab[2])
    cfg = make_cfg(tiny_pair, tmp_path)
    with pytest.raises(TokenizerMismatchError, match="tokenizer .*Fix: serve a teacher of the student's"):
        remote(lab_server.url, other, cfg)
    _, batch = lab_rollouts(lab)
    body = encode_request(
        batch.input_ids_B_T,
        batch.attention_mask_B_T,
        batch.response_mask_B_T,
        None,
        temperature=1.0,
        top_k=0,
        entropy=False,
        vocab_limit=10,
        chunk_size=8,
    )
    headers = {PROTOCOL_HEADER: str(PROTOCOL_VERSION), FINGERPRINT_HEADER: tokenizer_fingerprint(other)}
    r = _post(f"{lab_server.url}/score", content=body, headers=headers)
    assert r.status_code == 409 and "tokenizer fingerprint mismatch" in r.json()["detail"]
    r = _post(f"{lab_server.url}/score", content=body, headers={**headers, PROTOCOL_HEADER: "0"})
    assert r.status_code == 426 and "install the same opd version" in r.json()["detail"]


def test_oversized_and_malformed_requests_get_413_and_400(lab, tiny_pair, tmp_path):
    _, teacher, tok = lab
    served = Served(TeacherService(teacher, tok, max_request_bytes=2048))
    headers = {PROTOCOL_HEADER: str(PROTOCOL_VERSION), FINGERPRINT_HEADER: tokenizer_fingerprint(tok)}
    try:
        r = _post(f"{served.url}/score", content=b"\0" * 4096, headers=headers)
        assert r.status_code == 413 and "--max-request-mb" in r.json()["detail"]
        chunks = iter([b"\0" * 1500] * 3)  # no declared length (chunked): the read stops at the limit
        r = _post(f"{served.url}/score", content=chunks, headers=headers)
        assert r.status_code == 413
        r = _post(f"{served.url}/score", content=b"not safetensors", headers=headers)
        assert r.status_code == 400 and "safetensors" in r.json()["detail"]
        big = torch.full((2, 4), 10**6)
        body = encode_request(
            big, torch.ones_like(big), torch.ones_like(big), None, temperature=1.0, top_k=0, entropy=False,
            vocab_limit=10**7, chunk_size=8,
        )  # fmt: skip
        r = _post(f"{served.url}/score", content=body, headers=headers)
        assert r.status_code == 400 and "vocab_limit" in r.json()["detail"]
        cfg = make_cfg(tiny_pair, tmp_path)
        client = remote(served.url, tok, cfg)
        _, batch = lab_rollouts(lab)
        with pytest.raises(ValueError, match="HTTP 413.*micro_batch_size"):
            client(batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T, top_k=4)
    finally:
        served.stop()


def test_a_server_that_is_gone_fails_clearly_after_bounded_retries(lab, tiny_pair, tmp_path):
    _, teacher, tok = lab
    served = Served(TeacherService(teacher, tok))
    cfg = make_cfg(tiny_pair, tmp_path)
    client = remote(served.url, tok, cfg, retries=2, backoff=0.05, timeout=2.0)
    served.stop()
    _, batch = lab_rollouts(lab)
    t0 = time.perf_counter()
    with pytest.raises(TeacherServerError, match=rf"teacher={served.url}: no answer .* after 3 tries"):
        client(batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(TeacherServerError, match="after 1 tries"):  # nothing there from the start
        remote(served.url, tok, cfg, retries=0)


def test_training_refuses_what_a_served_teacher_cannot_do(tiny_pair, tmp_path):
    with pytest.raises(ConfigError, match="objective=full with a served teacher"):
        make_cfg(tiny_pair, tmp_path, objective="full", teacher="http://127.0.0.1:9")
    from opd.methods.common import load_models
    from opd.methods.kd import KDConfig
    from opd.runtime import Runtime

    cfg = KDConfig(student=str(tiny_pair[0]), teacher="http://127.0.0.1:9", prompts=str(tiny_pair[2]))
    with pytest.raises(ConfigError, match="served teacher works with opd train"):
        load_models(cfg, Runtime.from_config(cfg))
    # every other place a model is loaded (diagnose, eval, compare): one line, not a hub lookup
    with pytest.raises(ValueError, match="is a URL: a served teacher .* works as `opd train teacher="):
        load_tokenizer("http://127.0.0.1:9")


def test_serve_teacher_names_the_extra_when_it_is_missing(monkeypatch, capsys):
    import sys

    from opd.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    assert main(["serve-teacher", "--model", "lab:teacher-b-plus", "--port", "1"]) == 2
    assert "pip install 'opd[serve]'" in capsys.readouterr().err


@pytest.mark.smoke
def test_cli_serve_teacher_and_train_against_it_then_a_clear_error_once_it_is_killed(tiny_pair, tmp_path):
    """The real commands: `opd serve-teacher` in its own process (with a token), `opd train
    teacher=http://...` learns through it; killed, the next run stops with one line naming the URL."""
    import os
    import signal
    import subprocess
    import sys

    from opd.cli import main

    student, teacher, prompts = tiny_pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OPD_TEACHER_TOKEN": "tok-123"}
    cmd = [sys.executable, "-m", "opd.cli", "serve-teacher", "--model", str(teacher), "--port", str(port)]
    server = subprocess.Popen(cmd + ["--device", "cpu"], env=env, stderr=subprocess.PIPE)
    args = [
        "train",
        f"student={student}",
        f"teacher={url}",
        f"prompts={prompts}",
        f"output_dir={tmp_path / 'run'}",
        "steps=1",
        "prompts_per_step=2",
        "rollouts_per_prompt=2",
        "max_new_tokens=4",
        "progress=false",
        "alerts=false",
        "teacher_timeout=5",
        "teacher_retries=1",
    ]
    try:
        deadline = time.monotonic() + 60
        while True:  # until the server answers
            try:
                r = _post(f"{url}/score", content=b"")
                if r.status_code == 401:  # up, and it wants the token
                    break
            except Exception:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[
                -2000:
            ]
            time.sleep(0.2)
        os.environ["OPD_TEACHER_TOKEN"] = "tok-123"
        try:
            assert main(args) == 0
            assert (tmp_path / "run" / "final" / "model.safetensors").exists()
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=30)
            t0 = time.perf_counter()
            assert main(args + ["overwrite=true"]) == 1
            assert time.perf_counter() - t0 < 30
        finally:
            os.environ.pop("OPD_TEACHER_TOKEN", None)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
