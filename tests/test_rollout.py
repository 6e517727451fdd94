"""Rollout layout invariants (rollout.py CONTRACT) with HF generate on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from opd.rollout import (
    HFGenerateBackend,
    RolloutBackend,
    RolloutBatch,
    logit_rows,
    model_vocab_limit,
    stop_and_pad,
    stop_token_ids,
    tokenizer_vocab_size,
)
from opd.rollout_vllm import request_seeds
from opd.tiny import IM_END, PAD, build_byte_tokenizer, build_tiny_model

MAX_NEW = 12


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, seed=0)


@pytest.fixture(scope="module")
def prompts(tok):
    """Chat-rendered prompts of different lengths (so left padding is exercised)."""
    texts = ["hi", "what is 2+2?", "a much longer question about something"]
    return [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)["input_ids"]
        for t in texts
    ]


@pytest.fixture(scope="module")
def many_stops(tok):
    """EOS plus 40 byte tokens: with a random model some rows stop early, others run to MAX_NEW."""
    return stop_token_ids(tok) + list(range(60, 100))


def _check_layout(batch: RolloutBatch, prompts, n, stops, pad_id, max_new):
    """Every invariant of the rollout.py CONTRACT, row by row."""
    n_rows, width = batch.input_ids_B_T.shape
    assert n_rows == len(prompts) * n
    assert batch.attention_mask_B_T.dtype == torch.long
    assert batch.response_mask_B_T.dtype == torch.float32
    assert batch.truncated_B.dtype == torch.bool
    assert torch.equal(batch.prompt_index_B, torch.arange(len(prompts)).repeat_interleave(n))
    plen = batch.prompt_len
    assert plen == max(len(p) for p in prompts)
    assert batch.response_mask_B_T[:, :plen].sum() == 0
    assert width == plen + int(batch.response_lengths_B.max())
    for b in range(n_rows):
        prompt = prompts[b // n]
        ids = batch.input_ids_B_T[b].tolist()
        attn = batch.attention_mask_B_T[b].tolist()
        resp_mask = batch.response_mask_B_T[b].tolist()
        # left padding, then the prompt ending exactly at prompt_len
        assert ids[plen - len(prompt) : plen] == prompt
        assert attn[: plen - len(prompt)] == [0] * (plen - len(prompt))
        assert ids[: plen - len(prompt)] == [pad_id] * (plen - len(prompt))
        assert attn[plen - len(prompt) : plen] == [1] * len(prompt)
        # one contiguous response right after the prompt, then padding
        n_resp = int(batch.response_lengths_B[b])
        assert 1 <= n_resp <= max_new
        assert resp_mask[plen:] == [1.0] * n_resp + [0.0] * (width - plen - n_resp)
        assert attn[plen:] == [1] * n_resp + [0] * (width - plen - n_resp)
        assert ids[plen + n_resp :] == [pad_id] * (width - plen - n_resp)
        response = ids[plen : plen + n_resp]
        if batch.truncated_B[b]:
            assert n_resp == max_new
            assert not set(response) & set(stops)
        else:  # the stop token is included, and it is the first one
            assert response[-1] in stops
            assert not set(response[:-1]) & set(stops)


def _greedy_reference(model, prompt, stops, max_new):
    """Greedy decoding written out: full forward of the unpadded sequence, argmax, no KV cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
            if ids[-1] in stops:
                break
    return ids[len(prompt) :]


@pytest.mark.parametrize("batch_size", [None, 4])
def test_sampled_layout_invariants(tok, model, prompts, many_stops, batch_size):
    backend = HFGenerateBackend(model, tok, many_stops, batch_size=batch_size)
    batch = backend.generate(
        prompts, n=4, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, seed=3
    )
    _check_layout(batch, prompts, 4, many_stops, tok.pad_token_id, MAX_NEW)
    # the fixture is chosen so both cases occur; otherwise the test above proves little
    assert batch.truncated_B.any() and (~batch.truncated_B).any()
    assert (batch.response_lengths_B < MAX_NEW).any()


def test_no_stop_all_truncated(tok, model, prompts):
    backend = HFGenerateBackend(model, tok, stop_token_ids(tok))
    batch = backend.generate(prompts, n=2, max_new_tokens=3, temperature=1.0, top_p=1.0, top_k=0, seed=0)
    _check_layout(batch, prompts, 2, stop_token_ids(tok), tok.pad_token_id, 3)


def test_greedy_matches_reference_decoding_and_copies_n(tok, model, prompts, many_stops):
    """Left padding + KV cache give the same tokens as decoding each prompt alone without a cache."""
    backend = HFGenerateBackend(model, tok, many_stops)
    batch = backend.generate(
        prompts, n=3, max_new_tokens=MAX_NEW, temperature=0, top_p=1.0, top_k=0, seed=None
    )
    _check_layout(batch, prompts, 3, many_stops, tok.pad_token_id, MAX_NEW)
    L = batch.prompt_len
    for b in range(len(prompts) * 3):
        n_resp = int(batch.response_lengths_B[b])
        got = batch.input_ids_B_T[b, L : L + n_resp].tolist()
        assert got == _greedy_reference(model, prompts[b // 3], many_stops, MAX_NEW)
    again = backend.generate(
        prompts, n=3, max_new_tokens=MAX_NEW, temperature=0, top_p=1.0, top_k=0, seed=None
    )
    assert torch.equal(batch.input_ids_B_T, again.input_ids_B_T)


def test_greedy_draws_nothing_from_the_global_stream_on_either_backend(tok, model, prompts):
    """A greedy call leaves torch's global stream where it was, with HF generate and in the seeds the
    vLLM backend gives its requests, so what is sampled after it does not depend on the backend."""
    backend = HFGenerateBackend(model, tok, stop_token_ids(tok))
    state = torch.get_rng_state()
    backend.generate(prompts, n=2, max_new_tokens=4, temperature=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert request_seeds(3, greedy=True, seed=None, prompt_seeds=None) == [None] * 3
    assert request_seeds(2, greedy=True, seed=None, prompt_seeds=[5, 6]) == [None] * 2
    assert torch.equal(torch.get_rng_state(), state)
    # sampling without a seed draws from the global stream; a seed or per-prompt seeds do not
    seeded = request_seeds(3, greedy=False, seed=4, prompt_seeds=None)
    assert seeded == request_seeds(3, greedy=False, seed=4, prompt_seeds=None)
    assert request_seeds(2, greedy=False, seed=None, prompt_seeds=[5, 2**31 + 1]) == [5, 2]
    assert torch.equal(torch.get_rng_state(), state)
    request_seeds(3, greedy=False, seed=None, prompt_seeds=None)
    assert not torch.equal(torch.get_rng_state(), state)


def test_stop_and_pad_checks_stop_ids_and_falls_back_to_the_first_stop_for_padding(tok):
    assert stop_and_pad(tok, [int(tok.eos_token_id)], None) == (
        [int(tok.eos_token_id)],
        tokenizer_vocab_size(tok),
        int(tok.pad_token_id),
    )
    with pytest.raises(ValueError, match=r"stop_token_ids=\[\]: pass at least the EOS id"):
        stop_and_pad(tok, [], None)
    with pytest.raises(ValueError, match=r"stop_token_ids \[10\] are outside the vocabulary \[0, 10\)"):
        stop_and_pad(tok, [3, 10], 10)

    class NoPad:
        pad_token_id = None

    assert stop_and_pad(NoPad(), [7, 3], 10) == ([7, 3], 10, 7)


def test_model_vocab_limit_is_the_tokenizer_ids_capped_at_the_logit_rows(tok):
    size = tokenizer_vocab_size(tok)
    padded = build_tiny_model(tok, vocab_size=size + 200, seed=0)
    assert logit_rows(padded) == size + 200 and model_vocab_limit(padded, tok) == size

    class Short:  # a head with fewer rows than the tokenizer has ids, and a head-less model
        def __init__(self, head):
            self.head = head
            self.config = padded.config

        def get_output_embeddings(self):
            return self.head

    short = Short(torch.nn.Linear(4, size - 5, bias=False))
    assert logit_rows(short) == size - 5 and model_vocab_limit(short, tok) == size - 5
    assert logit_rows(Short(None)) == size + 200  # the config's vocab_size


def test_seed_reproducible_and_caller_rng_untouched(tok, model, prompts):
    backend = HFGenerateBackend(model, tok, stop_token_ids(tok), batch_size=5)
    kw = dict(n=4, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, top_k=50)
    state = torch.get_rng_state()
    a = backend.generate(prompts, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    b = backend.generate(prompts, seed=7, **kw)
    c = backend.generate(prompts, seed=8, **kw)
    assert torch.equal(a.input_ids_B_T, b.input_ids_B_T)
    assert not torch.equal(a.input_ids_B_T, c.input_ids_B_T)
    # n samples of one prompt are distinct draws, not copies
    L = a.prompt_len
    assert len({tuple(a.input_ids_B_T[g, L:].tolist()) for g in range(4)}) > 1


def test_stops_on_extra_stop_id(tok, model, prompts):
    """A stop id that is not the EOS (e.g. an end-of-turn token) ends the response and is kept."""
    eos = tok.eos_token_id
    kw = dict(n=1, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, seed=11)
    plain = HFGenerateBackend(model, tok, [eos]).generate(prompts[:1], **kw)
    sampled = plain.input_ids_B_T[0, plain.prompt_len :].tolist()
    # the last position whose token is new in this (seeded) sample: declare that token a stop id
    k = max(i for i, t in enumerate(sampled) if t not in sampled[:i] and t != eos)
    assert k >= 2, f"fixture sample {sampled} repeats too early to test a late stop"
    batch = HFGenerateBackend(model, tok, [eos, sampled[k]]).generate(prompts[:1], **kw)
    assert batch.response_lengths_B.tolist() == [k + 1]
    assert batch.input_ids_B_T[0, batch.prompt_len :].tolist() == sampled[: k + 1]
    assert not batch.truncated_B.any()


def test_restores_mode_and_generation_config(tok, prompts, many_stops):
    model = build_tiny_model(tok, seed=1)
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    # generation settings a checkpoint may ship; rollouts must ignore them (on-policy sampling)
    baseline = HFGenerateBackend(model, tok, many_stops).generate(
        prompts, n=2, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, seed=0
    )
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.min_new_tokens = MAX_NEW
    model.generation_config.top_k = 5
    before = model.generation_config.to_dict()
    modes = [m.training for m in model.modules()]
    batch = HFGenerateBackend(model, tok, many_stops).generate(
        prompts, n=2, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, seed=0
    )
    assert [m.training for m in model.modules()] == modes
    assert model.generation_config.to_dict() == before
    assert torch.equal(batch.input_ids_B_T, baseline.input_ids_B_T)


def test_never_samples_padded_embedding_rows(tok, prompts):
    """A table padded past the tokenizer (Qwen-style) must not yield ids the tokenizer cannot decode."""
    model = build_tiny_model(tok, vocab_size=len(tok) + 200, seed=2)
    backend = HFGenerateBackend(model, tok, stop_token_ids(tok))
    batch = backend.generate(
        prompts, n=4, max_new_tokens=MAX_NEW, temperature=1.5, top_p=1.0, top_k=0, seed=0
    )
    assert int(batch.input_ids_B_T.max()) < len(tok)


def test_stop_token_ids_finds_end_of_turn_tokens():
    tok = build_byte_tokenizer()
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids(IM_END)]
    tok.eos_token = PAD  # a base model: EOS <|endoftext|>, chat turns end with <|im_end|>
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids(PAD), tok.convert_tokens_to_ids(IM_END)]
    llama3 = build_byte_tokenizer(extra_tokens=["<|eot_id|>"])
    assert llama3.convert_tokens_to_ids("<|eot_id|>") in stop_token_ids(llama3)


def test_protocol_sync_and_argument_errors(tok, model, prompts):
    backend = HFGenerateBackend(model, tok, stop_token_ids(tok))
    assert isinstance(backend, RolloutBackend)
    other = build_tiny_model(tok, seed=5)
    backend.sync_weights(other)
    assert backend.model is other
    kw = dict(n=1, max_new_tokens=2, temperature=1.0, top_p=1.0, top_k=0, seed=0)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        backend.generate([prompts[0], []], **kw)
    with pytest.raises(ValueError, match="outside"):
        backend.generate([[10**6]], **kw)
    with pytest.raises(ValueError, match="top_p=0"):
        backend.generate(prompts, **{**kw, "top_p": 0})
    with pytest.raises(ValueError, match="n=0"):
        backend.generate(prompts, **{**kw, "n": 0})
    with pytest.raises(ValueError, match="stop_token_ids"):
        HFGenerateBackend(model, tok, [])


@pytest.mark.parametrize(
    "kw",
    [dict(seed=4), dict(prompt_seeds=[11, 12, 13]), dict(seed=4, batch_size=4)],
    ids=["stream", "per-prompt", "batch-size-splits-groups"],
)
def test_shared_prefill_gives_the_unshared_samples(tok, model, prompts, many_stops, kw, monkeypatch):
    """One prefill per distinct prompt, its KV cache repeated n times: the same samples as n prefills
    (the prefill draws no random numbers), with prompts of different lengths (left padding)."""
    batch_size = kw.pop("batch_size", None)
    shared_calls = []
    real = HFGenerateBackend._shared_prefill

    def counted(self, *a, **k):
        shared_calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(HFGenerateBackend, "_shared_prefill", counted)
    out = {}
    for share in (False, True):
        backend = HFGenerateBackend(model, tok, many_stops, batch_size=batch_size, share_prefill=share)
        out[share] = backend.generate(prompts, n=3, max_new_tokens=MAX_NEW, **kw)
        assert bool(shared_calls) == share  # the shared path really ran (and only when asked for)
    _check_layout(out[True], prompts, 3, many_stops, tok.pad_token_id, MAX_NEW)
    assert out[True].response_lengths_B.float().std() > 0  # rows stop at different lengths
    for f in ("input_ids_B_T", "attention_mask_B_T", "response_mask_B_T", "truncated_B"):
        assert torch.equal(getattr(out[True], f), getattr(out[False], f)), f


def test_shared_prefill_runs_each_prompt_once(tok, model, prompts):
    """The prompt columns go through the backbone once per distinct prompt, not once per sample."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda m, a, o: seen.append(tuple(a[0].shape))
    )
    try:
        HFGenerateBackend(model, tok, stop_token_ids(tok)).generate(prompts, n=4, max_new_tokens=3, seed=0)
    finally:
        handle.remove()
    width = max(len(p) for p in prompts)
    assert seen[0] == (3, width - 1)  # the shared prefill: 3 prompts, all but the last column
    assert all(shape[0] == 12 and shape[1] == 1 for shape in seen[1:])  # then 12 rows, one column each


def test_group_size_of_a_call_follows_the_prompt_major_layout():
    """Rows [start, start + count) of prompts repeated n times: the per-prompt count when it is uniform."""
    from opd.rollout import _group_size

    assert _group_size(0, 6, 3) == 3  # two whole prompts
    assert _group_size(0, 4, 3) == 1  # 3 + 1: not uniform, no sharing
    assert _group_size(4, 4, 3) == 2  # the tail of prompt 1 and the head of prompt 2, 2 rows each
    assert _group_size(8, 1, 3) == 1
    assert _group_size(0, 5, 1) == 1
