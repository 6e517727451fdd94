"""The seam for methods, backends and devices: method dispatch, Runtime devices, the backend factory and
its weight sync, the scoring module (in lockstep with ``scoring.score``) and the ScoredBatch."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
from opd_configs import make_cfg

import opd
from opd import cli
from opd.config import ConfigError, DataConfig, ModelsConfig, OPDConfig, RunConfig, part_errors
from opd.config_io import field_docs
from opd.methods import METHODS, method_for
from opd.methods import opd as opd_method
from opd.rollout import BACKENDS, HFGenerateBackend, RolloutBatch, make_backend, stop_token_ids
from opd.runtime import Runtime, resolve_device
from opd.scoring import PolicyScorer, full_vocab_pair, score
from opd.tiny import build_byte_tokenizer, build_tiny_model

# ----------------------------------------------------------------------------------- methods and config


def test_every_method_has_a_subcommand_and_train_dispatches_on_the_config_type():
    parser = cli.build_parser()
    for method in METHODS:
        args = parser.parse_args([method.command, "c.yaml", "steps=3"])
        assert args.method is method and args.config == "c.yaml" and args.overrides == ["steps=3"]
        assert method_for(method.config()) is method
    assert method_for(OPDConfig()).train is opd_method.train

    @dataclasses.dataclass
    class OtherConfig:
        steps: int = 1

    with pytest.raises(
        ValueError,
        match=r"config of type OtherConfig: no training method takes it; pass one of: OPDConfig \(opd train\)",
    ):
        opd.train(OtherConfig())


def test_config_parts_are_shared_and_keys_stay_flat():
    assert issubclass(OPDConfig, ModelsConfig) and issubclass(OPDConfig, RunConfig)

    # a second method's config reuses the docstrings of the parts it inherits
    @dataclasses.dataclass
    class SketchConfig(RunConfig, DataConfig, ModelsConfig):
        label_smoothing: float = 0.0
        """Label smoothing (a method's own field)."""

    docs = field_docs(SketchConfig)
    assert docs["student"] == field_docs(OPDConfig)["student"]
    assert docs["prompts"] and docs["output_dir"] and docs["label_smoothing"].startswith("Label smoothing")
    assert "objective" not in docs
    # ... and the parts' validation rules
    assert part_errors(SketchConfig()) == []
    errs = part_errors(SketchConfig(device="gpu", max_prompt_tokens=0, resume=True, overwrite=True))
    assert [e.split(":")[0].split("=")[0] for e in errs] == ["device", "max_prompt_tokens", "resume"]
    flat = {f.name for f in dataclasses.fields(OPDConfig)}
    assert {"student", "lr", "prompts", "temperature", "output_dir", "objective", "device"} <= flat


# ----------------------------------------------------------------------------------------------- devices


def test_runtime_resolves_cpu_and_auto_and_teacher_device_defaults_to_device():
    rt = Runtime.from_config(OPDConfig(device="cpu"))
    assert rt.device == torch.device("cpu") and rt.teacher_device == rt.device
    auto = Runtime.from_config(OPDConfig())
    want = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert auto.device.type == want


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CPU", "cuda:"])
def test_malformed_device_is_a_config_error(value):
    with pytest.raises(ConfigError, match=rf"device='{value}': choose auto, cpu, cuda, cuda:N or mps"):
        OPDConfig(device=value)
    with pytest.raises(ConfigError, match=rf"teacher_device='{value}'"):
        OPDConfig(teacher_device=value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_line(tiny_pair, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"device='cuda': torch sees no CUDA GPU here.*use device=cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"teacher_device='cuda:1'"):
        Runtime.from_config(OPDConfig(teacher_device="cuda:1"))
    student, teacher, prompts = tiny_pair
    out = tmp_path / "run"
    rc = cli.main(
        [
            "train",
            f"student={student}",
            f"teacher={teacher}",
            f"prompts={prompts}",
            f"output_dir={out}",
            "device=cuda",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("opd: config error: device='cuda': torch sees no CUDA GPU here")
    assert not out.exists()  # refused before the run directory is created


def test_explicit_cpu_devices_train(tiny_pair, tmp_path):
    summary = opd_method.train(make_cfg(tiny_pair, tmp_path, device="cpu", teacher_device="cpu", steps=1))
    assert summary["steps_done"] == 1 and summary["last"]["loss/pg"] == summary["last"]["loss/pg"]


def test_rollout_batch_to_moves_every_tensor():
    b = RolloutBatch(
        torch.zeros(2, 3, dtype=torch.long),
        torch.ones(2, 3, dtype=torch.long),
        torch.zeros(2, 3),
        1,
        torch.arange(2),
        torch.zeros(2, dtype=torch.bool),
        torch.zeros(2, 3),  # sampler_logprobs_B_T
    )
    moved = b.to("meta")
    tensors = [getattr(moved, f.name) for f in dataclasses.fields(moved) if f.name != "prompt_len"]
    assert all(t.device.type == "meta" for t in tensors) and moved.prompt_len == 1
    assert dataclasses.replace(b, sampler_logprobs_B_T=None).to("meta").sampler_logprobs_B_T is None


# ---------------------------------------------------------------------------------------------- backends


def test_make_backend_builds_the_hf_backend_and_refuses_unknown_names():
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok)
    backend = make_backend("hf", model, tok, batch_size=4)
    assert isinstance(backend, HFGenerateBackend) and backend.batch_size == 4
    assert backend.stop_token_ids == stop_token_ids(tok) and BACKENDS == ("hf", "vllm")
    with pytest.raises(
        ValueError, match=r"rollout_backend='sglang': unknown backend; choose one of hf, vllm"
    ):
        make_backend("sglang", model, tok)
    with pytest.raises(ConfigError, match=r"rollout_backend='sglang': choose one of hf, vllm"):
        OPDConfig(rollout_backend="sglang")
    assert OPDConfig(rollout_backend="vllm").rollout_backend == "vllm"


def test_vllm_backend_without_vllm_is_a_one_line_error_naming_the_extra():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: tests/test_rollout_vllm.py runs the backend")
    tok = build_byte_tokenizer()
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'opd\[vllm\]'") as info:
        make_backend("vllm", build_tiny_model(tok), tok)
    assert "\n" not in str(info.value)


class RecordingBackend:
    """A real HF backend that records each generate and each sync_weights, with a weight fingerprint."""

    def __init__(self, inner):
        self.inner = inner
        self.events = []

    def generate(self, prompt_ids, **kw):
        self.events.append(("generate", _fingerprint(self.inner.model)))
        return self.inner.generate(prompt_ids, **kw)

    def sync_weights(self, model):
        self.events.append(("sync", _fingerprint(model), model))
        self.inner.sync_weights(model)


def _fingerprint(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten()[:64].clone() for p in model.parameters()])


def test_sync_weights_is_called_once_per_step_after_the_update(tiny_pair, tmp_path, monkeypatch):
    made = []

    def factory(*a, **k):
        made.append(RecordingBackend(make_backend(*a, **k)))
        return made[0]

    monkeypatch.setattr(opd_method, "make_backend", factory)
    opd_method.train(make_cfg(tiny_pair, tmp_path, steps=3))
    events = made[0].events
    assert [e[0] for e in events] == ["generate", "sync"] * 3
    for gen, sync in zip(events[::2], events[1::2]):
        assert not torch.equal(gen[1], sync[1])  # synced after the optimiser step changed the weights
        assert sync[2] is made[0].inner.model  # the trained student itself


def test_resume_syncs_the_restored_weights_before_the_first_rollout(tiny_pair, tmp_path, monkeypatch):
    """A backend with its own copy of the weights is built before the checkpoint is loaded: the resumed
    run must push the restored weights before it samples."""
    made = []

    def factory(*a, **k):
        made.append(RecordingBackend(make_backend(*a, **k)))
        return made[-1]

    monkeypatch.setattr(opd_method, "make_backend", factory)
    opd_method.train(make_cfg(tiny_pair, tmp_path, steps=2, save_every=1))  # checkpoint at step 1
    opd_method.train(make_cfg(tiny_pair, tmp_path, steps=2, save_every=1, resume=True))
    events = made[1].events
    assert [e[0] for e in events] == ["sync", "generate", "sync"]
    assert torch.equal(events[0][1], events[1][1])  # sampled from the restored weights
    assert not torch.equal(events[0][1], made[0].events[0][1])  # which are not the initial ones


# ----------------------------------------------------------------------------------------- scoring module


@pytest.fixture(scope="module")
def scoring_setup():
    tok = build_byte_tokenizer()
    student = build_tiny_model(tok, hidden_size=32, num_layers=2, seed=1).eval()
    teacher = build_tiny_model(tok, hidden_size=32, num_layers=2, seed=2).eval()
    g = torch.Generator().manual_seed(0)
    V = len(tok)
    ids = torch.randint(0, V, (3, 12), generator=g)
    attn = torch.ones(3, 12, dtype=torch.long)
    attn[0, :2] = 0
    resp = torch.zeros(3, 12)
    resp[:, 6:] = 1
    resp[2, 10:] = 0
    given = torch.randint(0, V, (3, 12, 4), generator=g)
    return student, teacher, ids, attn, resp, given, V


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_policy_scorer_equals_score_outputs_and_gradients(scoring_setup):
    student, _, ids, attn, resp, given, V = scoring_setup
    kw = dict(temperature=0.7, chunk_size=5, vocab_limit=V)
    scorer = PolicyScorer(student, **kw)
    assert list(scorer.parameters()) == list(student.parameters())
    with torch.no_grad():
        mine = scorer(ids, attn, resp, given, top_k=3, entropy=True)
    ref = score(student, ids, attn, resp, top_k=3, given_ids_B_T_K=given, entropy=True, **kw)
    for f in dataclasses.fields(ref):
        torch.testing.assert_close(getattr(mine, f.name), getattr(ref, f.name), rtol=0, atol=0)
    assert not mine.token_logp_B_T.requires_grad

    student.zero_grad()
    out = scorer(ids, attn, resp, given)  # grad enabled: differentiable
    (out.given_logp_B_T_K.sum() + out.token_logp_B_T.sum()).backward()
    g_mine = _grads(student)
    student.zero_grad()
    ref = score(student, ids, attn, resp, given_ids_B_T_K=given, entropy=False, grad=True, **kw)
    (ref.given_logp_B_T_K.sum() + ref.token_logp_B_T.sum()).backward()
    g_ref = _grads(student)
    assert len(g_mine) == len(g_ref) > 0
    for a, b in zip(g_mine, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    student.zero_grad()


def _rkl(s_N_V, t_N_V):
    p = torch.log_softmax(s_N_V, -1)
    return (p.exp() * (p - torch.log_softmax(t_N_V, -1))).sum(-1)


def test_policy_scorer_full_vocab_pair_equals_full_vocab_pair(scoring_setup):
    student, teacher, ids, attn, resp, _, V = scoring_setup
    scorer = PolicyScorer(student, temperature=0.7, chunk_size=5, vocab_limit=V)
    student.zero_grad()
    mine = scorer(ids, attn, resp, teacher=teacher, divergence=_rkl, teacher_temperature=1.3)
    mine.sum().backward()
    g_mine = _grads(student)
    student.zero_grad()
    ref = full_vocab_pair(
        student,
        teacher,
        ids,
        attn,
        resp,
        _rkl,
        temperature=0.7,
        teacher_temperature=1.3,
        vocab_limit=V,
        chunk_size=5,
        grad=True,
    )
    ref.sum().backward()
    torch.testing.assert_close(mine.detach(), ref.detach(), rtol=0, atol=0)
    for a, b in zip(g_mine, _grads(student)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad()
    with pytest.raises(ValueError, match=r"needs both teacher= and divergence="):
        scorer(ids, attn, resp, teacher=teacher)


def test_a_ddp_wrapper_around_the_scorer_gets_the_same_gradients(scoring_setup, tmp_path):
    """One gloo process: DDP(PolicyScorer) runs the scorer's forward; gradients equal the bare module's."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    student, _, ids, attn, resp, given, V = scoring_setup
    scorer = PolicyScorer(student, chunk_size=5, vocab_limit=V)
    student.zero_grad()
    scorer(ids, attn, resp, given).given_logp_B_T_K.sum().backward()
    g_ref = _grads(student)
    student.zero_grad()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(scorer)
        ddp(ids, attn, resp, given).given_logp_B_T_K.sum().backward()
        # DDP's reducer holds the process group: freed after destroy_process_group, its gloo threads'
        # join can hang (seen on a loaded machine), so it goes first
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()
    g_ddp = _grads(student)
    student.zero_grad()
    assert len(g_ddp) == len(g_ref) > 0
    for a, b in zip(g_ddp, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ scored batch


def test_score_batch_returns_a_scored_batch_and_separate_timings(tiny_pair, tmp_path, monkeypatch):
    seen = []
    real = opd_method.score_batch

    def spy(*a, **k):
        scored, times = real(*a, **k)
        seen.append((scored, times))
        return scored, times

    monkeypatch.setattr(opd_method, "score_batch", spy)
    opd_method.train(
        make_cfg(tiny_pair, tmp_path, steps=1, objective="topk", support_size=4, fused_update=False)
    )
    ((scored, times),) = seen
    assert isinstance(scored, opd_method.ScoredBatch)
    assert set(times) == {"time/score_student", "time/score_teacher"} and all(v >= 0 for v in times.values())
    B, T = scored.mask_B_T.shape
    assert scored.advantages.shape[:2] == (B, T) and scored.support_ids_B_T_S.shape == scored.advantages.shape
    assert scored.token_reward_B_T.shape == (B, T)
