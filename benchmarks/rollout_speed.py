"""Generation speed of each available rollout backend on the same model and settings, side by side.

    python benchmarks/rollout_speed.py                      # hf, and vllm when it is importable
    .venv-vllm/bin/python benchmarks/rollout_speed.py       # in the vLLM venv (make setup-vllm)

A random Qwen2 model (hidden 128, 4 heads of 32, 2 KV heads, 2 layers; head_dim 32 is the smallest vLLM's
CPU attention runs), or ``--model DIR`` (a Hugging Face model directory); ``--prompts`` prompts x ``--n``
samples x up to ``--max-new-tokens`` new tokens at temperature 1, through ``opd.rollout.make_backend``
exactly as training samples. Each backend: one untimed warm-up call, then ``--repeats`` timed calls;
generated tokens/s = response tokens (the stop token included) / seconds, median of the repeats. HF runs
with ``--threads`` torch threads; vLLM's CPU engine binds its own OpenMP threads (all cores but one by
default). The backend's setup (the vLLM engine start, once per run) and its weight sync (what every
optimizer step adds; median of ``--repeats``) are printed apart. Prints one line per backend and the
ratio to hf; for vLLM also the mean and max |Δ log p| of its sampled tokens against the trainer's scorer
(``rollout/logp_mismatch`` of a training step) on the last timed batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="a Hugging Face model directory (default: random Qwen2)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the HF backend")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.precision import compute_context
    from opd.rollout import make_backend
    from opd.scoring import PolicyScorer
    from opd.tiny import build_byte_tokenizer, build_tiny_model

    torch.set_num_threads(args.threads)
    if args.model:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    else:
        tok = build_byte_tokenizer()
        model = build_tiny_model(tok, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)
        model.eval()
    prompts = [
        tok.encode(f"Question {i}: what is {i} + {2 * i + 1}? Answer step by step.")
        for i in range(args.prompts)
    ]
    kw = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)

    backends = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") is not None else [])
    results = {}
    for name in backends:
        t0 = time.perf_counter()
        options = dict(dtype=args.dtype, max_model_len=max(map(len, prompts)) + args.max_new_tokens, seed=0)
        backend = make_backend(name, model, tok, engine_options=options)
        start = time.perf_counter() - t0
        speeds = []
        for rep in range(args.repeats + 1):
            t0 = time.perf_counter()
            with compute_context(model, args.dtype):
                batch = backend.generate(prompts, seed=rep, **kw)
            seconds = time.perf_counter() - t0
            if rep:  # the first call is the warm-up
                speeds.append(int(batch.response_lengths_B.sum()) / seconds)
        mismatch = ""
        if batch.sampler_logprobs_B_T is not None:  # the engine's log-probs against the trainer's scorer
            with torch.no_grad(), compute_context(model, args.dtype):
                ref = PolicyScorer(model)(
                    batch.input_ids_B_T, batch.attention_mask_B_T, batch.response_mask_B_T
                )
            diff = (batch.sampler_logprobs_B_T - ref.token_logp_B_T)[batch.response_mask_B_T > 0].abs()
            mismatch = f", |logp - trainer's| mean {float(diff.mean()):.1e} max {float(diff.max()):.1e}"
        syncs = []
        for _ in range(args.repeats):  # what every optimizer step adds (HF: nothing to copy)
            t0 = time.perf_counter()
            backend.sync_weights(model)
            syncs.append(time.perf_counter() - t0)
        if hasattr(backend, "close"):
            backend.close()
        results[name] = statistics.median(speeds)
        print(
            f"{name:5s} {results[name]:9.1f} generated tokens/s (median of {args.repeats}; "
            f"{args.prompts}x{args.n} rows, <= {args.max_new_tokens} new tokens, {args.dtype}); "
            f"setup {start:.1f} s, weight sync {statistics.median(syncs) * 1e3:.1f} ms{mismatch}",
            flush=True,
        )
    for name in backends[1:]:
        print(f"ratio {name}/hf: {results[name] / results['hf']:.2f}x")


if __name__ == "__main__":  # vLLM starts its engine in a child process
    main()
