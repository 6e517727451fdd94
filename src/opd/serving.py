"""Serving speed of a model: generated tokens per second, time to first token, per-token latency.

:func:`measure_speed` times Hugging Face ``generate`` on one prompt (the same prompt repeated for a
batch, so every row has the same length and no padding enters the timing):

- **warm-up**: one short generate at each batch shape first (kernel selection, allocator, caches), not
  timed;
- **time to first token** (``ttft_s``): a generate of exactly 1 new token at batch 1 (prefill + one
  decode step);
- **batch 1** (``tokens_per_s_batch1``): a generate of exactly ``new_tokens`` tokens at batch 1;
  ``new_tokens / seconds``. **Per-token latency** (``per_token_latency_s``) is
  ``(seconds - ttft_s) / (new_tokens - 1)``: the decode time of each token after the first;
- **batch B** (``tokens_per_s_batch``): the same at ``batch_size`` rows; ``B * new_tokens / seconds``.

Every generate is greedy with ``min_new_tokens = max_new_tokens``, so the stop token cannot end a row
early and each row makes exactly the tokens counted. Each figure is the median of ``repeats`` timed
runs; on CUDA the device is synchronised before each clock read. The numbers are those of HF generate
with a KV cache in the model's dtype on its device: a serving engine (vLLM, SGLang) is faster, so
compare models measured by the same code on the same machine only.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from transformers import GenerationConfig

from opd.models import context_length
from opd.runtime import model_device
from opd.tracking import progress as progress_bar

__all__ = ["measure_speed", "model_size"]


def model_size(model: torch.nn.Module) -> tuple[int, int]:
    """``(parameters, bytes)`` of the model's parameters as loaded (tied weights counted once; buffers
    such as rotary tables left out)."""
    params = list(model.parameters())  # deduplicated by torch: a tied embedding appears once
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _timed_generate(model, prompt_ids: list[int], batch: int, new_tokens: int, pad_id: int) -> float:
    """Seconds of one greedy generate of exactly ``new_tokens`` tokens for ``batch`` copies of the prompt."""
    device = model_device(model)
    ids_B_L = torch.tensor([prompt_ids] * batch, dtype=torch.long, device=device)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=None,
    )
    _sync(device)
    start = time.perf_counter()
    out = model.generate(input_ids=ids_B_L, attention_mask=torch.ones_like(ids_B_L), generation_config=config)
    _sync(device)
    seconds = time.perf_counter() - start
    made = out.shape[1] - ids_B_L.shape[1]
    if made != new_tokens:  # a model whose generate ignores min_new_tokens would make the figure wrong
        raise RuntimeError(f"speed measurement: generate made {made} tokens, expected {new_tokens}")
    return seconds


def measure_speed(
    model,
    tokenizer,
    prompt_ids: list[int],
    *,
    batch_size: int = 8,
    new_tokens: int = 128,
    repeats: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Generated tokens/s at batch 1 and at ``batch_size``, time to first token and per-token latency
    of ``model`` on ``prompt_ids`` (module docstring for the procedure).

    Returns ``tokens_per_s_batch1``, ``tokens_per_s_batch``, ``batch_size``, ``ttft_s``,
    ``per_token_latency_s``, ``new_tokens``, ``prompt_tokens``, ``repeats``, ``device`` and ``dtype``.
    """
    if new_tokens < 2:
        raise ValueError(f"speed_new_tokens={new_tokens}: must be >= 2 (per-token latency needs a 2nd token)")
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"speed_batch_size={batch_size}, speed_repeats={repeats}: both must be >= 1")
    if not prompt_ids:
        raise ValueError("speed measurement needs a non-empty prompt")
    ctx = context_length(model)
    if ctx is not None and len(prompt_ids) + new_tokens > ctx:
        raise ValueError(
            f"speed measurement: prompt ({len(prompt_ids)} tokens) + speed_new_tokens={new_tokens} exceeds the "
            f"model's context of {ctx} tokens; lower speed_new_tokens"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = int(pad) if pad is not None else 0
    was_training = model.training
    model.eval()
    runs = [(1, 1), (1, new_tokens), (batch_size, new_tokens)]
    try:
        with progress_bar(total=len(runs) * (repeats + 1), desc="speed", enabled=progress, unit="run") as bar:
            medians = []
            for batch, tokens in runs:
                _timed_generate(model, prompt_ids, batch, min(tokens, 4), pad)  # warm-up, not timed
                bar.update(1)
                times = []
                for _ in range(repeats):
                    times.append(_timed_generate(model, prompt_ids, batch, tokens, pad))
                    bar.update(1)
                medians.append(statistics.median(times))
    finally:
        model.train(was_training)
    ttft, t1, tb = medians
    param = next(model.parameters())
    return {
        "tokens_per_s_batch1": new_tokens / t1,
        "tokens_per_s_batch": batch_size * new_tokens / tb,
        "batch_size": batch_size,
        "ttft_s": ttft,
        "per_token_latency_s": max(t1 - ttft, 0.0) / (new_tokens - 1),
        "new_tokens": new_tokens,
        "prompt_tokens": len(prompt_ids),
        "repeats": repeats,
        "device": str(param.device),
        "dtype": str(param.dtype).removeprefix("torch."),
    }
