"""opd.scoring against a brute-force reference: the model's own full logits, shifted by hand.

The reference runs ``model(...)`` over the whole B×T×V and reads ``log_softmax(logits[b, t − 1])[ids[b, t]]``
in an explicit loop, so the alignment is checked independently of ``aligned_positions``.
"""

from __future__ import annotations

import pytest
import torch

from opd.scoring import (
    ScoreOutput,
    aligned_positions,
    check_head_path,
    left_pad_position_ids,
    score,
    score_full_logits,
)
from opd.scoring.head import make_head
from opd.tiny import build_byte_tokenizer, build_tiny_model

B, T = 3, 12


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request, tok):
    return build_tiny_model(tok, arch=request.param, hidden_size=32, num_layers=2, seed=1).eval()


def build_gpt2(tok, seed: int = 0):
    """Tiny GPT-2: learned absolute positions, so wrong position ids change the numbers (RoPE would not)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return GPT2LMHeadModel(cfg).eval()


def make_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows: left-padded, right-padded after the response (post-EOS pads), left-padded long response."""
    g = torch.Generator().manual_seed(seed)
    ids_B_T = torch.randint(0, vocab, (B, T), generator=g)
    attn_B_T = torch.ones(B, T, dtype=torch.long)
    resp_B_T = torch.zeros(B, T, dtype=torch.long)
    attn_B_T[0, :3] = 0  # 3 pads, prompt 3..6, response 7..11
    resp_B_T[0, 7:] = 1
    attn_B_T[1, 10:] = 0  # prompt 0..4, response 5..9, 2 trailing pads
    resp_B_T[1, 5:10] = 1
    attn_B_T[2, :1] = 0  # 1 pad, prompt 1..2, response 3..11
    resp_B_T[2, 3:] = 1
    ids_B_T[attn_B_T == 0] = 0
    return ids_B_T, attn_B_T, resp_B_T


def reference_logp(model, ids_B_T, attn_B_T, *, temperature=1.0, vocab_limit=None) -> torch.Tensor:
    """Unshifted full log-probs logp[b, s, v] of the token at s + 1, from the model's own forward."""
    logits = model(
        input_ids=ids_B_T,
        attention_mask=attn_B_T,
        position_ids=left_pad_position_ids(attn_B_T),
        use_cache=False,
    ).logits.float()
    if vocab_limit is not None:
        logits = logits[..., :vocab_limit]
    return (logits / temperature).log_softmax(-1)


def shifted(per_source_B_T_X: torch.Tensor, resp_B_T: torch.Tensor) -> torch.Tensor:
    """out[b, t] = x[b, t − 1] where resp[b, t] = 1, else 0 — the alignment written as a plain loop."""
    out = torch.zeros_like(per_source_B_T_X)
    for b in range(resp_B_T.shape[0]):
        for t in range(1, resp_B_T.shape[1]):
            if resp_B_T[b, t]:
                out[b, t] = per_source_B_T_X[b, t - 1]
    return out


def token_reference(logp_B_T_V, ids_B_T, resp_B_T) -> torch.Tensor:
    out = torch.zeros(ids_B_T.shape)
    for b in range(ids_B_T.shape[0]):
        for t in range(1, ids_B_T.shape[1]):
            if resp_B_T[b, t]:
                out[b, t] = logp_B_T_V[b, t - 1, ids_B_T[b, t]]
    return out


def test_aligned_positions_shift_by_one():
    resp_B_T = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])
    rows_N, tgt_N, src_N = aligned_positions(resp_B_T)
    assert rows_N.tolist() == [0, 0, 1, 1]
    assert tgt_N.tolist() == [2, 3, 1, 3]
    assert src_N.tolist() == [1, 2, 0, 2]


def test_left_pad_position_ids_match_generate_convention():
    attn_B_T = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert left_pad_position_ids(attn_B_T).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 0]]


def test_token_logp_alignment_and_masking(model, tok):
    ids, attn, resp = make_batch(len(tok))
    out = score(model, ids, attn, resp)
    assert isinstance(out, ScoreOutput)
    with torch.no_grad():
        ref = token_reference(reference_logp(model, ids, attn), ids, resp)
    assert out.token_logp_B_T.dtype == torch.float32 and out.token_logp_B_T.shape == (B, T)
    torch.testing.assert_close(out.token_logp_B_T, ref, atol=1e-6, rtol=1e-6)
    assert (out.token_logp_B_T[resp == 0] == 0).all()
    assert (out.entropy_B_T[resp == 0] == 0).all()
    assert (out.token_logp_B_T[resp == 1] < 0).all()


def test_left_padding_does_not_change_scores(model, tok):
    """A row scored with 3 left pads gives the same numbers as the unpadded row (position ids restart at 0).

    With RoPE (Qwen2, Llama) a constant position shift cancels anyway; the GPT-2 variant below is the one
    that fails if scoring passed the wrong position ids.
    """
    g = torch.Generator().manual_seed(3)
    row_T = torch.randint(0, len(tok), (8,), generator=g)
    resp_T = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    plain = score(model, row_T[None], torch.ones(1, 8, dtype=torch.long), resp_T[None], top_k=2)
    pad = torch.zeros(1, 3, dtype=torch.long)
    padded = score(
        model,
        torch.cat([pad, row_T[None]], 1),
        torch.cat([pad, torch.ones(1, 8, dtype=torch.long)], 1),
        torch.cat([pad, resp_T[None]], 1),
        top_k=2,
    )
    torch.testing.assert_close(padded.token_logp_B_T[:, 3:], plain.token_logp_B_T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.entropy_B_T[:, 3:], plain.entropy_B_T, atol=1e-5, rtol=1e-5)


def test_left_padding_absolute_positions(tok):
    test_left_padding_does_not_change_scores(build_gpt2(tok, seed=6), tok)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_matches_generate_logits(tok, arch):
    """Scoring a left-padded rollout reproduces the distributions HF generate sampled from."""
    model = build_tiny_model(tok, seed=5).eval() if arch == "qwen2" else build_gpt2(tok, seed=5)
    prompts = ["ab", "hello there", "x"]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    P = enc.input_ids.shape[1]
    torch.manual_seed(0)
    gen = model.generate(
        **enc, do_sample=True, max_new_tokens=6, output_logits=True, return_dict_in_generate=True, top_k=0
    )
    seq_B_T = gen.sequences
    new_T = seq_B_T.shape[1] - P
    attn = torch.cat([enc.attention_mask, torch.ones(len(prompts), new_T, dtype=torch.long)], 1)
    resp = torch.zeros_like(seq_B_T)
    resp[:, P:] = 1
    out = score(model, seq_B_T, attn, resp)
    for step, logits_B_V in enumerate(gen.logits):
        ref_B = logits_B_V.float().log_softmax(-1).gather(-1, seq_B_T[:, P + step, None]).squeeze(-1)
        torch.testing.assert_close(out.token_logp_B_T[:, P + step], ref_B, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 10_000])
def test_chunked_equals_unchunked(model, tok, chunk_size):
    ids, attn, resp = make_batch(len(tok), seed=1)
    given = torch.randint(0, len(tok), (B, T, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(top_k=5, given_ids_B_T_K=given, entropy=True)
    ref = score(model, ids, attn, resp, chunk_size=10_000, **kw)
    out = score(model, ids, attn, resp, chunk_size=chunk_size, **kw)
    for name in ("token_logp_B_T", "topk_logp_B_T_K", "given_logp_B_T_K", "entropy_B_T"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=1e-6, rtol=1e-6)
    assert torch.equal(out.topk_ids_B_T_K, ref.topk_ids_B_T_K)


def test_given_topk_entropy_match_reference(model, tok):
    ids, attn, resp = make_batch(len(tok), seed=4)
    given = torch.randint(0, len(tok), (B, T, 3), generator=torch.Generator().manual_seed(5))
    out = score(model, ids, attn, resp, top_k=4, given_ids_B_T_K=given, chunk_size=5)
    with torch.no_grad():
        logp_B_T_V = reference_logp(model, ids, attn)
    ref_given = torch.zeros(B, T, 3)
    for b in range(B):
        for t in range(1, T):
            if resp[b, t]:
                ref_given[b, t] = logp_B_T_V[b, t - 1, given[b, t]]
    torch.testing.assert_close(out.given_logp_B_T_K, ref_given, atol=1e-6, rtol=1e-6)

    ref_vals, ref_ids = logp_B_T_V.topk(4, dim=-1)
    m = resp[..., None].bool()
    torch.testing.assert_close(out.topk_logp_B_T_K, shifted(ref_vals, resp), atol=1e-6, rtol=1e-6)
    assert torch.equal(out.topk_ids_B_T_K, shifted(ref_ids, resp) * m)
    assert out.topk_ids_B_T_K.dtype == torch.long

    ref_ent = -(logp_B_T_V.exp() * logp_B_T_V).sum(-1)
    torch.testing.assert_close(out.entropy_B_T, shifted(ref_ent, resp), atol=1e-6, rtol=1e-6)


def test_temperature_divides_logits(model, tok):
    ids, attn, resp = make_batch(len(tok), seed=6)
    out = score(model, ids, attn, resp, temperature=0.7, top_k=3)
    with torch.no_grad():
        logp_B_T_V = reference_logp(model, ids, attn, temperature=0.7)
    torch.testing.assert_close(
        out.token_logp_B_T, token_reference(logp_B_T_V, ids, resp), atol=1e-6, rtol=1e-6
    )
    ref_ent = -(logp_B_T_V.exp() * logp_B_T_V).sum(-1)
    torch.testing.assert_close(out.entropy_B_T, shifted(ref_ent, resp), atol=1e-6, rtol=1e-6)
    plain = score(model, ids, attn, resp)
    assert (out.entropy_B_T[resp == 1] < plain.entropy_B_T[resp == 1]).all()  # sharper at τ < 1


def test_vocab_limit_with_padded_table(tok):
    V = len(tok)
    model = build_tiny_model(tok, vocab_size=V + 13, seed=2).eval()
    ids, attn, resp = make_batch(V, seed=7)
    out = score(model, ids, attn, resp, top_k=V, vocab_limit=V)  # K = V: every real token
    with torch.no_grad():
        logp_B_T_V = reference_logp(model, ids, attn, vocab_limit=V)
    torch.testing.assert_close(
        out.token_logp_B_T, token_reference(logp_B_T_V, ids, resp), atol=1e-6, rtol=1e-6
    )
    assert int(out.topk_ids_B_T_K.max()) < V
    probs = out.topk_logp_B_T_K.exp().sum(-1)
    torch.testing.assert_close(probs[resp == 1], torch.ones(int(resp.sum())), atol=1e-5, rtol=0)
    full = score(model, ids, attn, resp)  # over the padded table the numbers differ
    assert not torch.allclose(full.token_logp_B_T, out.token_logp_B_T)
    bad = ids.clone()
    bad[0, -1] = V + 5  # a padded-row id at a response position cannot be scored under vocab_limit
    with pytest.raises(ValueError, match="input_ids_B_T"):
        score(model, bad, attn, resp, vocab_limit=V)
    with pytest.raises(ValueError, match="vocab_limit"):
        score(model, ids, attn, resp, vocab_limit=V + 14)


def test_all_masked_gives_zeros_without_nan(model, tok):
    ids, attn, _ = make_batch(len(tok))
    out = score(
        model,
        ids,
        attn,
        torch.zeros_like(ids),
        top_k=2,
        given_ids_B_T_K=torch.zeros(B, T, 3, dtype=torch.long),
    )
    assert out.token_logp_B_T.shape == (B, T) and not out.token_logp_B_T.any()
    assert out.topk_ids_B_T_K.shape == (B, T, 2) and out.given_logp_B_T_K.shape == (B, T, 3)
    assert not out.entropy_B_T.isnan().any()
    assert out.given_logp_B_T_K is not None and out.topk_logp_B_T_K is not None


def test_grad_matches_naive(model, tok):
    """grad=True (checkpointed chunks) gives the same parameter gradients as autograd through full logits."""
    ids, attn, resp = make_batch(len(tok), seed=8)
    given = torch.randint(0, len(tok), (B, T, 3), generator=torch.Generator().manual_seed(9))
    w_B_T = torch.randn(B, T, generator=torch.Generator().manual_seed(10))
    w_B_T_K = torch.randn(B, T, 3, generator=torch.Generator().manual_seed(11))

    def loss_of(token_logp, given_logp, ent):
        return (token_logp * w_B_T).sum() + (given_logp * w_B_T_K).sum() + 0.1 * ent.sum()

    model.zero_grad()
    out = score(model, ids, attn, resp, given_ids_B_T_K=given, top_k=2, grad=True, chunk_size=3)
    assert out.token_logp_B_T.requires_grad and out.given_logp_B_T_K.requires_grad
    loss_of(out.token_logp_B_T, out.given_logp_B_T_K, out.entropy_B_T).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    logp_B_T_V = reference_logp(model, ids, attn)
    tok_ref = shifted(logp_B_T_V.gather(-1, ids.roll(-1, 1)[..., None]).squeeze(-1), resp)
    given_ref = shifted(logp_B_T_V.gather(-1, given.roll(-1, 1)), resp)
    ent_ref = shifted(-(logp_B_T_V.exp() * logp_B_T_V).sum(-1), resp)
    loss_of(tok_ref, given_ref, ent_ref).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    assert any(g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()


def test_no_grad_mode_builds_no_graph(model, tok):
    ids, attn, resp = make_batch(len(tok))
    out = score(model, ids, attn, resp, top_k=2)
    assert not out.token_logp_B_T.requires_grad and not out.topk_logp_B_T_K.requires_grad


def test_bf16_model_returns_float32(tok):
    model = build_tiny_model(tok, seed=3).to(torch.bfloat16).eval()
    ids, attn, resp = make_batch(len(tok), seed=12)
    out = score(model, ids, attn, resp, top_k=3, chunk_size=4)
    for t in (out.token_logp_B_T, out.topk_logp_B_T_K, out.entropy_B_T):
        assert t.dtype == torch.float32
    with torch.no_grad():
        logp_B_T_V = reference_logp(model, ids, attn)  # bf16 logits upcast, then log-softmax
    torch.testing.assert_close(out.token_logp_B_T, token_reference(logp_B_T_V, ids, resp), atol=2e-2, rtol=0)


def test_gemma2_final_logit_softcapping(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.05,  # small so the cap bends these tiny logits
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
    )
    model = Gemma2ForCausalLM(cfg).eval()
    ids, attn, resp = make_batch(len(tok), seed=13)
    out = score(model, ids, attn, resp)
    with torch.no_grad():
        logp_B_T_V = reference_logp(model, ids, attn)
        raw = model.lm_head(model.model(input_ids=ids[:1, :4]).last_hidden_state)
    assert raw.abs().max() > 0.05  # the cap is active, so ignoring it would be caught
    torch.testing.assert_close(
        out.token_logp_B_T, token_reference(logp_B_T_V, ids, resp), atol=1e-6, rtol=1e-6
    )
    # the few-rows head (the fused step's teacher at given ids) applies the same cap and temperature
    head, _ = make_head(model, 0.7, None)
    h = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    some = torch.randint(0, len(tok), (5, 3), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(head.logits_at(h, some), head.logits(h).gather(-1, some), atol=1e-6, rtol=1e-6)


def test_head_check_refuses_unknown_logit_quirk(tok):
    model = build_tiny_model(tok, seed=4).eval()
    model.config.logits_scaling = 8.0  # scoring would divide, Qwen2's forward does not
    with pytest.raises(RuntimeError, match="does not reproduce"):
        check_head_path(model)
    ok = build_tiny_model(tok, seed=4).eval()
    assert check_head_path(ok) == len(tok)


def test_score_full_logits_chunks(model, tok):
    ids, attn, resp = make_batch(len(tok), seed=14)
    with torch.no_grad():
        ref_logits = model(
            input_ids=ids, attention_mask=attn, position_ids=left_pad_position_ids(attn), use_cache=False
        ).logits
    chunks = list(score_full_logits(model, ids, attn, resp, temperature=2.0, chunk_size=4))
    assert all(len(r) <= 4 for r, _, _ in chunks)
    rows = torch.cat([r for r, _, _ in chunks])
    cols = torch.cat([c for _, c, _ in chunks])
    logits = torch.cat([z for _, _, z in chunks])
    assert logits.dtype == torch.float32 and not logits.requires_grad
    assert torch.equal(torch.stack([rows, cols], 1), resp.nonzero())
    torch.testing.assert_close(logits, ref_logits[rows, cols - 1] / 2.0, atol=1e-6, rtol=1e-6)

    with torch.no_grad():  # grad=True makes differentiable chunks without leaking grad mode to the caller
        _, _, z = next(iter(score_full_logits(model, ids, attn, resp, grad=True, chunk_size=4)))
        assert z.requires_grad and not torch.is_grad_enabled()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=10**6), "top_k"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_options_raise(model, tok, kwargs, match):
    ids, attn, resp = make_batch(len(tok))
    with pytest.raises(ValueError, match=match):
        score(model, ids, attn, resp, **kwargs)


def test_bad_masks_raise(model, tok):
    ids, attn, resp = make_batch(len(tok))
    first = resp.clone()
    first[1, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        score(model, ids, attn, first)
    outside = resp.clone()
    outside[0, 1] = 1  # a left-pad position
    with pytest.raises(ValueError, match="attention_mask_B_T == 0"):
        score(model, ids, attn, outside)
