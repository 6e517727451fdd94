"""Rollout backends: sample student responses for prompts.

CONTRACT (implemented by the rollout helper):

``RolloutBatch`` layout, B = len(prompts) · n, rows ordered prompt-major (row = p·n + g):
``[left padding | prompt tokens | response tokens | right padding]``; all prompts end at the same
column ``prompt_len`` (left-padded), so ``response_mask_B_T[:, :prompt_len] == 0``. The response
includes the stop token (EOS / end-of-turn) when one was generated; tokens after it are padding with
attention 0 and response mask 0. ``truncated_B`` is True when no stop token was produced within
``max_new_tokens``.

Sampling semantics. A rollout is a sample from the student policy itself: logits / temperature, then
optionally top-k and top-p (nucleus) filtering, nothing else. Processors a checkpoint's own
``generation_config`` may carry (repetition penalty, min length, suppressed tokens, ...) are NOT applied,
because they would make the rollouts off-policy for the objective. ``temperature == 0`` means greedy
decoding. Ids at or above the tokenizer's vocabulary size (embedding tables padded to a round size) are
never sampled, matching scoring's ``vocab_limit``.

Positions: with left padding, position ids must be ``cumsum(attention_mask) - 1`` (HF ``generate`` does
this); a scorer that recomputes log-probs of these rows must use the same positions, otherwise it scores
a different distribution from the one that was sampled.

Sampler log-probs. ``sampler_logprobs_B_T`` (optional, float32, 0 outside the response mask) holds the
engine's own log-prob of each sampled token, at ``temperature``, for an engine that keeps its own copy of
the weights (vLLM); None for HF ``generate``, which samples from the trained model itself. Scoring still
recomputes the log-probs in float32 on the same ids (what the objective needs); the engine's are only for
the sampler-vs-trainer mismatch metrics and truncated importance sampling (``tis_cap``).

Left out on purpose: beam search, and stop *strings* (stopping is on token ids only).
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import GenerationConfig


@dataclass
class RolloutBatch:
    input_ids_B_T: torch.Tensor  # long
    attention_mask_B_T: torch.Tensor  # long 0/1
    response_mask_B_T: torch.Tensor  # float 0/1
    prompt_len: int
    prompt_index_B: torch.Tensor  # long: index into the prompt list
    truncated_B: torch.Tensor  # bool
    sampler_logprobs_B_T: torch.Tensor | None = None  # float32: the engine's log p of each sampled token

    @property
    def response_lengths_B(self) -> torch.Tensor:
        return self.response_mask_B_T.sum(-1).long()

    def to(self, device: torch.device | str) -> RolloutBatch:
        """This batch with every tensor on ``device`` (the scoring model's device)."""
        return RolloutBatch(
            self.input_ids_B_T.to(device),
            self.attention_mask_B_T.to(device),
            self.response_mask_B_T.to(device),
            self.prompt_len,
            self.prompt_index_B.to(device),
            self.truncated_B.to(device),
            None if self.sampler_logprobs_B_T is None else self.sampler_logprobs_B_T.to(device),
        )

    def select(self, rows: torch.Tensor | slice) -> RolloutBatch:
        """Rows of this batch (micro-batching)."""
        return RolloutBatch(
            self.input_ids_B_T[rows],
            self.attention_mask_B_T[rows],
            self.response_mask_B_T[rows],
            self.prompt_len,
            self.prompt_index_B[rows],
            self.truncated_B[rows],
            None if self.sampler_logprobs_B_T is None else self.sampler_logprobs_B_T[rows],
        )


@runtime_checkable
class RolloutBackend(Protocol):
    """What a sampler must provide. HF ``generate`` is the default; vLLM can implement the same.
    Build one with :func:`make_backend`."""

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        prompt_seeds: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """Sample ``n`` responses per prompt; the layout is the module CONTRACT. ``prompt_seeds`` (one
        per prompt): each prompt's samples depend only on the prompt and its seed, not on the batch."""
        ...

    def sync_weights(self, model) -> None:
        """Make the sampler use ``model``'s current weights (called after every optimizer step)."""
        ...


# End-of-turn markers of common chat templates (ChatML / Qwen / SmolLM, Llama 3, Gemma, Phi-3).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS, then every end-of-turn marker in its vocab.

    A chat model ends its turn with the template's end-of-turn token, which is not always the EOS
    (Llama 3: EOS ``<|end_of_text|>``, turn end ``<|eot_id|>``), so both are needed to stop.
    """
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for token in END_OF_TURN_TOKENS:
        if token in vocab and vocab[token] not in ids:
            ids.append(int(vocab[token]))
    if not ids:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token and none of {END_OF_TURN_TOKENS}: "
            "responses could never stop. Set tokenizer.eos_token, or pass stop ids explicitly."
        )
    return ids


def tokenizer_vocab_size(tokenizer) -> int:
    """Number of token ids the tokenizer can produce (ids ``0 .. size-1``), added tokens included.

    This is the number of logit columns that are meaningful; embedding tables are often padded beyond
    it (Qwen2.5: 151,665 tokens, 151,936 or 152,064 rows).
    """
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer), max(vocab.values()) + 1 if vocab else 0)


def logit_rows(model) -> int:
    """Rows of ``model``'s output table (its logit columns); the config's ``vocab_size`` for a model
    without output embeddings."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.get_text_config().vocab_size)


def model_vocab_limit(model, tokenizer) -> int:
    """The ids a model and its tokenizer share: the tokenizer's ids (:func:`tokenizer_vocab_size`) capped at
    the model's logit rows (:func:`logit_rows`). Scoring and sampling never use a column at or past it."""
    return min(tokenizer_vocab_size(tokenizer), logit_rows(model))


def stop_and_pad(tokenizer, stop_ids: list[int], vocab_limit: int | None) -> tuple[list[int], int, int]:
    """A rollout backend's ``(stop_token_ids, vocab_limit, pad_token_id)``: ``vocab_limit`` defaults to the
    tokenizer's vocabulary size, every stop id must lie below it, and the pad id is the tokenizer's pad
    token or else the first stop id. Raises ``ValueError`` naming the bad input."""
    if not stop_ids:
        raise ValueError("stop_token_ids=[]: pass at least the EOS id, e.g. opd.rollout.stop_token_ids(tok)")
    stops = [int(i) for i in stop_ids]
    limit = tokenizer_vocab_size(tokenizer) if vocab_limit is None else int(vocab_limit)
    bad = [i for i in stops if not 0 <= i < limit]
    if bad:
        raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {limit})")
    pad = tokenizer.pad_token_id
    return stops, limit, int(pad) if pad is not None else stops[0]


class HFGenerateBackend:
    """Sampling with Hugging Face ``model.generate`` (CPU or one GPU).

    ``stop_token_ids``: generation of a row stops at the first of these ids (see ``stop_token_ids()``).
    ``batch_size``: at most this many sequences (prompt × sample rows) per ``generate`` call; rows are
    cut in prompt-major order. ``None``: everything in one call.
    ``vocab_limit``: never sample ids ``>= vocab_limit``; default: the tokenizer's vocabulary size.
    ``share_prefill``: when a ``generate`` call holds each prompt ``n`` times in a row (n > 1 samples per
    prompt), run the prompts' prefill once per distinct prompt (all but the last prompt token), repeat its
    KV cache ``n`` times (``DynamicCache.batch_repeat_interleave``) and let ``generate`` continue from it.
    The sampling calls and their random numbers are unchanged (prefill draws none), so the samples are the
    ones of the unshared call up to float rounding in the prefill (tests/test_rollout.py). Used only for
    models whose ``generate`` builds a ``DynamicCache`` and with prompts of at least 2 tokens.

    The backend holds a reference to the live model, so it always samples from the current weights;
    ``generate`` puts the model in eval mode and restores each submodule's train/eval flag afterwards,
    and never modifies ``model.generation_config``. Returned tensors are on the CPU.
    """

    def __init__(
        self,
        model,
        tokenizer,
        stop_token_ids: list[int],
        batch_size: int | None = None,
        *,
        vocab_limit: int | None = None,
        share_prefill: bool = True,
    ):
        self.stop_token_ids, self.vocab_limit, self.pad_token_id = stop_and_pad(
            tokenizer, stop_token_ids, vocab_limit
        )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected None (one call) or a positive int")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.share_prefill = share_prefill

    def sync_weights(self, model) -> None:
        """HF generate runs on the training model itself; just follow a replaced model object."""
        self.model = model

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        prompt_seeds: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """Sample ``n`` responses per prompt (module CONTRACT). ``top_k = 0``: no top-k filtering.

        With ``seed`` set, the global torch RNG is forked: the same seed gives the same samples (for the
        same ``batch_size``), and the caller's RNG state is left untouched. With ``prompt_seeds`` (one
        per prompt) each prompt's ``n`` rows are generated in their own call under their own seed, so a
        prompt's samples are the same whatever else is in the batch (e.g. at any number of processes);
        the caller's RNG state is left untouched.
        """
        if prompt_seeds is not None and len(prompt_seeds) != len(prompt_ids):
            raise ValueError(f"prompt_seeds: {len(prompt_seeds)} seeds for {len(prompt_ids)} prompts")
        _check_generate_args(prompt_ids, n, max_new_tokens, temperature, top_p, top_k, self.vocab_limit)
        greedy = temperature == 0
        # Greedy decoding gives n identical samples: decode each prompt once, copy it n times.
        rows = list(prompt_ids) if greedy else [p for p in prompt_ids for _ in range(n)]
        gen_config = self._generation_config(max_new_tokens, temperature, top_p, top_k)
        device = next(self.model.parameters()).device
        step = self.batch_size or len(rows)

        modes = [(m, m.training) for m in self.model.modules()]
        saved_gen_config = self.model.generation_config
        fork_devices = []
        if device.type == "cuda":
            fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
        try:
            self.model.eval()
            # A bare config on the model, so nothing of the checkpoint's generation_config leaks in.
            self.model.generation_config = type(saved_gen_config)()
            if prompt_seeds is not None and not greedy:
                responses = []
                for p, prompt_seed in enumerate(prompt_seeds):
                    with torch.random.fork_rng(devices=fork_devices):
                        torch.manual_seed(prompt_seed)
                        responses.append(
                            self._generate_rows(rows[p * n : (p + 1) * n], gen_config, device, group=n)
                        )
            else:
                with torch.random.fork_rng(devices=fork_devices, enabled=seed is not None):
                    if seed is not None:
                        torch.manual_seed(seed)
                    group = 1 if greedy else n  # greedy: each prompt once
                    responses = [
                        self._generate_rows(
                            rows[i : i + step],
                            gen_config,
                            device,
                            _group_size(i, len(rows[i : i + step]), group),
                        )
                        for i in range(0, len(rows), step)
                    ]
        finally:
            self.model.generation_config = saved_gen_config
            for module, training in modes:
                module.training = training

        resp_B_R = _cat_right_padded(responses, self.pad_token_id)
        generated_B = torch.tensor([c.shape[1] for c in responses for _ in range(c.shape[0])])
        if greedy and n > 1:
            resp_B_R = resp_B_R.repeat_interleave(n, dim=0)
            generated_B = generated_B.repeat_interleave(n)
            rows = [p for p in prompt_ids for _ in range(n)]
        return _assemble(rows, resp_B_R, generated_B, self.stop_token_ids, self.pad_token_id, n)

    def _generation_config(self, max_new_tokens, temperature, top_p, top_k):
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            num_beams=1,
            num_return_sequences=1,
            return_dict_in_generate=False,
        )
        if temperature == 0:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(
                do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k)
            )
        rows = logit_rows(self.model)
        if rows > self.vocab_limit:
            kwargs.update(suppress_tokens=list(range(self.vocab_limit, rows)))
        return GenerationConfig(**kwargs)

    def _generate_rows(self, rows: Sequence[list[int]], gen_config, device, group: int = 1) -> torch.Tensor:
        """One ``generate`` call on left-padded rows -> new tokens ``[len(rows), R]`` (R <= max_new).
        ``group``: the rows are their prompts ``group`` times each in a row (for the shared prefill)."""
        width = max(len(r) for r in rows)
        ids_B_L = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask_B_L = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids_B_L[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask_B_L[b, width - len(r) :] = 1
        ids_B_L, mask_B_L = ids_B_L.to(device), mask_B_L.to(device)
        extra = {}
        n = group if self.share_prefill and gen_config.do_sample else 1
        if n > 1 and width >= 2 and min(len(r) for r in rows) >= 2 and _dynamic_cache_ok(self.model):
            extra = {_cache_kwarg(self.model): self._shared_prefill(ids_B_L[::n], mask_B_L[::n], n)}
        out = self.model.generate(
            input_ids=ids_B_L, attention_mask=mask_B_L, generation_config=gen_config, **extra
        )
        return out[:, width:].cpu()

    def _shared_prefill(self, ids_P_L: torch.Tensor, mask_P_L: torch.Tensor, n: int):
        """The KV cache of each distinct prompt's first L − 1 columns, computed once by the decoder (no head)
        and repeated ``n`` times row-wise; ``generate`` then feeds only the last column (its cache position
        follows the cache)."""
        from transformers import DynamicCache

        from opd.scoring.head import backbone, left_pad_position_ids

        cache = DynamicCache(config=self.model.config)
        mask = mask_P_L[:, :-1]
        # the decoder alone (scoring's): these columns' logits are never used, so the V-wide head is not run
        try:
            decoder, kwargs = backbone(self.model), {}
        except TypeError:  # no separate decoder: the whole model, its head on one position
            decoder, kwargs = self.model, {"logits_to_keep": 1}
        decoder(
            input_ids=ids_P_L[:, :-1],
            attention_mask=mask,
            position_ids=left_pad_position_ids(mask),
            use_cache=True,
            **kwargs,
            **{_cache_kwarg(decoder): cache},
        )
        cache.batch_repeat_interleave(n)
        return cache


def _group_size(start: int, count: int, n: int) -> int:
    """Rows ``[start, start + count)`` of a prompt-major list holding every prompt ``n`` times in a row: how
    many rows each of their prompts has there, if that is the same for all of them (a call may cut a
    prompt's rows, ``batch_size``), else 1."""
    sizes = set(Counter((start + k) // n for k in range(count)).values())
    return sizes.pop() if len(sizes) == 1 else 1


def _dynamic_cache_ok(model) -> bool:
    """Whether ``generate`` would give this model a plain ``DynamicCache`` (not a model-specific cache)."""
    check = getattr(model, "_supports_default_dynamic_cache", None)
    return (
        callable(check) and bool(check()) and "logits_to_keep" in inspect.signature(model.forward).parameters
    )


def _cache_kwarg(model) -> str:
    """The KV-cache keyword of this transformers version's forward / generate (``cache`` since 5.25,
    ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prompt_seed(seed: int, step: int, slot: int) -> int:
    """The sampling seed of the prompt in place ``slot`` of step ``step``'s batch (``rollout_seeding=per_prompt``)."""
    return (seed * 1_000_003 + step) * 100_003 + slot


BACKENDS = ("hf", "vllm")
"""Names :func:`make_backend` knows (the ``rollout_backend`` config field)."""


def make_backend(
    name: str,
    model,
    tokenizer,
    *,
    stop_ids: list[int] | None = None,
    batch_size: int | None = None,
    vocab_limit: int | None = None,
    engine_options: dict | None = None,
) -> RolloutBackend:
    """The rollout backend called ``name``, sampling from ``model`` — the one way methods build a sampler.

    ``stop_ids``: default :func:`stop_token_ids` of ``tokenizer``; ``batch_size``: sequences per generate
    call (None = all at once); ``vocab_limit``: never sample ids at or above it (default: the tokenizer's
    vocabulary). The loop calls ``backend.sync_weights(model)`` after every optimiser step.

    A new backend (e.g. vLLM) is a class implementing :class:`RolloutBackend` plus one branch here and
    its name in :data:`BACKENDS`; a backend holding its own copy of the weights must copy them in
    ``sync_weights``, or it samples from a stale policy. ``vllm``: :class:`opd.rollout_vllm.VLLMBackend`
    (imported only when chosen), configured by ``engine_options`` (its keyword arguments: dtype,
    max_model_len, gpu_memory_utilization, enforce_eager, seed); ``batch_size`` does not apply to it.
    """
    if name == "vllm":
        from opd.rollout_vllm import VLLMBackend

        return VLLMBackend(
            model,
            tokenizer,
            stop_token_ids(tokenizer) if stop_ids is None else stop_ids,
            vocab_limit=vocab_limit,
            **(engine_options or {}),
        )
    if name == "hf":
        return HFGenerateBackend(
            model,
            tokenizer,
            stop_token_ids(tokenizer) if stop_ids is None else stop_ids,
            batch_size=batch_size,
            vocab_limit=vocab_limit,
        )
    raise ValueError(f"rollout_backend={name!r}: unknown backend; choose one of {', '.join(BACKENDS)}")


def fixed_batch(
    prompt_ids: list[list[int]], response_ids: list[list[int]], *, stop_ids: list[int], pad_id: int
) -> RolloutBatch:
    """Given (not sampled) responses in the :class:`RolloutBatch` layout of the module CONTRACT: row ``b``
    is ``prompt_ids[b]`` then ``response_ids[b]`` cut after its first stop id (``truncated_B``: no stop id
    in it). For training on fixed sequences (gold solutions, cached teacher outputs) with the same code
    that scores rollouts."""
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ValueError(
            f"fixed_batch: {len(prompt_ids)} prompts and {len(response_ids)} responses; pass one response "
            "per prompt (at least one)"
        )
    for b, r in enumerate(response_ids):
        if not r:
            raise ValueError(f"fixed_batch: response_ids[{b}] is empty; every response needs a token")
    width = max(len(r) for r in response_ids)
    resp_B_R = torch.full((len(response_ids), width), pad_id, dtype=torch.long)
    for b, r in enumerate(response_ids):
        resp_B_R[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    generated_B = torch.tensor([len(r) for r in response_ids])
    return _assemble(list(prompt_ids), resp_B_R, generated_B, stop_ids, pad_id, 1)


def relay_responses(batch: RolloutBatch, prompt_ids: list[list[int]]) -> RolloutBatch:
    """``batch``'s responses re-laid after other prompts (the teacher's rendering of each row's prompt).

    Row ``b`` of the result is ``[left padding | prompt_ids[b] | the response tokens of row b | right
    padding]`` in the module CONTRACT's layout, with the new ``prompt_len`` P' = the longest of
    ``prompt_ids``. The response part is copied column for column: position ``P' + j`` of the result holds
    the token at ``batch.prompt_len + j`` (same response mask, attention, padding), so response position
    ``j`` is the same token in both batches and :func:`shift_positions` moves per-position tensors between
    them. Padding uses ``batch``'s own pad id (its first masked-out id; 0 when nothing is padded).
    Identical prompts give back an identical batch."""
    B, T = batch.input_ids_B_T.shape
    if len(prompt_ids) != B:
        raise ValueError(
            f"relay_responses: {len(prompt_ids)} prompts for a batch of {B} rows; pass one prompt per row "
            "(repeat each prompt rollouts_per_prompt times)"
        )
    empty = [b for b, p in enumerate(prompt_ids) if not p]
    if empty:
        raise ValueError(f"relay_responses: prompt_ids[{empty[0]}] is empty; every prompt needs a token")
    pads = batch.input_ids_B_T[batch.attention_mask_B_T == 0]
    pad_id = int(pads[0]) if pads.numel() else 0
    P, P2 = batch.prompt_len, max(len(p) for p in prompt_ids)
    R = T - P
    dev = batch.input_ids_B_T.device
    input_ids_B_T = torch.full((B, P2 + R), pad_id, dtype=batch.input_ids_B_T.dtype, device=dev)
    attention_mask_B_T = torch.zeros((B, P2 + R), dtype=batch.attention_mask_B_T.dtype, device=dev)
    for b, p in enumerate(prompt_ids):
        input_ids_B_T[b, P2 - len(p) : P2] = torch.tensor(p, dtype=input_ids_B_T.dtype, device=dev)
        attention_mask_B_T[b, P2 - len(p) : P2] = 1
    input_ids_B_T[:, P2:] = batch.input_ids_B_T[:, P:]
    attention_mask_B_T[:, P2:] = batch.attention_mask_B_T[:, P:]
    return RolloutBatch(
        input_ids_B_T=input_ids_B_T,
        attention_mask_B_T=attention_mask_B_T,
        response_mask_B_T=shift_positions(batch.response_mask_B_T, P, P2),
        prompt_len=P2,
        prompt_index_B=batch.prompt_index_B,
        truncated_B=batch.truncated_B,
        sampler_logprobs_B_T=None
        if batch.sampler_logprobs_B_T is None
        else shift_positions(batch.sampler_logprobs_B_T, P, P2),
    )


def shift_positions(x_B_T: torch.Tensor, prompt_len: int, new_prompt_len: int) -> torch.Tensor:
    """A per-position tensor (dim 1 = positions, any trailing dims) of a batch with ``prompt_len`` moved to
    the layout of the same responses after ``new_prompt_len`` prompt columns (:func:`relay_responses`):
    ``out[:, new_prompt_len + j] = x_B_T[:, prompt_len + j]``; the new prompt columns are 0 (scoring's
    value at non-response positions). The same layout gives ``x_B_T`` itself."""
    if prompt_len == new_prompt_len:
        return x_B_T
    R = x_B_T.shape[1] - prompt_len
    out = x_B_T.new_zeros((x_B_T.shape[0], new_prompt_len + R, *x_B_T.shape[2:]))
    out[:, new_prompt_len:] = x_B_T[:, prompt_len:]
    return out


def _check_generate_args(prompt_ids, n, max_new_tokens, temperature, top_p, top_k, vocab_limit) -> None:
    if not prompt_ids:
        raise ValueError("prompt_ids=[]: pass at least one prompt (a list of token ids)")
    for p, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt_ids[{p}] is empty: every prompt needs at least one token")
        if min(ids) < 0 or max(ids) >= vocab_limit:
            raise ValueError(
                f"prompt_ids[{p}] has ids outside [0, {vocab_limit}) (min {min(ids)}, max {max(ids)}): "
                "tokenize prompts with the student's tokenizer"
            )
    if n < 1:
        raise ValueError(f"n={n}: expected at least 1 sample per prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected a positive int")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: expected >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: expected 0 < top_p <= 1 (1 = off)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: expected >= 0 (0 = off)")


def _cat_right_padded(chunks: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    width = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks])


def _assemble(
    rows: list[list[int]],
    resp_B_R: torch.Tensor,
    generated_B: torch.Tensor,
    stop_ids: list[int],
    pad_id: int,
    n: int,
) -> RolloutBatch:
    """Cut each response after its first stop token and lay rows out as in the module CONTRACT.

    ``generated_B``: columns of ``resp_B_R`` that ``generate`` produced for the row (its call's width);
    a row without a stop token among them ran to ``max_new_tokens`` (generate only ends a call early
    when every row has stopped), so it is truncated and keeps all of them.
    """
    B, R = resp_B_R.shape
    produced_B_R = torch.arange(R)[None, :] < generated_B[:, None]
    is_stop_B_R = torch.isin(resp_B_R, torch.tensor(stop_ids, dtype=resp_B_R.dtype)) & produced_B_R
    has_stop_B = is_stop_B_R.any(-1)
    first_stop_B = is_stop_B_R.long().argmax(-1)  # argmax returns the first maximal index
    resp_len_B = torch.where(has_stop_B, first_stop_B + 1, generated_B)
    R = int(resp_len_B.max())
    in_resp_B_R = torch.arange(R)[None, :] < resp_len_B[:, None]

    prompt_len = max(len(r) for r in rows)
    T = prompt_len + R
    input_ids_B_T = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask_B_T = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids_B_T[b, prompt_len - len(r) : prompt_len] = torch.tensor(r, dtype=torch.long)
        attention_mask_B_T[b, prompt_len - len(r) : prompt_len] = 1
    input_ids_B_T[:, prompt_len:] = torch.where(in_resp_B_R, resp_B_R[:, :R], pad_id)
    attention_mask_B_T[:, prompt_len:] = in_resp_B_R.long()
    response_mask_B_T = torch.zeros((B, T), dtype=torch.float32)
    response_mask_B_T[:, prompt_len:] = in_resp_B_R.float()
    return RolloutBatch(
        input_ids_B_T=input_ids_B_T,
        attention_mask_B_T=attention_mask_B_T,
        response_mask_B_T=response_mask_B_T,
        prompt_len=prompt_len,
        prompt_index_B=torch.arange(B // n).repeat_interleave(n),
        truncated_B=~has_stop_B,
    )
