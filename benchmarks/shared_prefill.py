"""HF rollouts with one prefill per distinct prompt (``share_prefill=True``, the default) against one
prefill per sample (``False``), on the random Qwen2 students of ``benchmarks/vs_trl.py``.

    OMP_NUM_THREADS=1 python benchmarks/shared_prefill.py [--sizes medium,large] [--reps 5]

Per size and G: P = 4 chat-rendered prompts x G samples x L = 32 new tokens at temperature 1, fp32, one
thread; the two settings alternate, ``--reps`` times each, and the best (min) time of each is kept (the
machine is shared, so single timings are noisy). Also checks that both settings drew the same samples.
"""

from __future__ import annotations

import argparse
import time

import torch

from opd.rollout import HFGenerateBackend, stop_token_ids
from opd.tiny import build_byte_tokenizer, build_tiny_model

SIZES = {"medium": (192, 4, None), "large": (256, 4, 151_936)}  # student hidden, layers, vocab

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--sizes", default="medium,large")
ap.add_argument("--groups", default="2,8", help="samples per prompt G, comma-separated")
ap.add_argument("--reps", type=int, default=5)
args = ap.parse_args()
torch.set_num_threads(1)

print("| size | V | G | prompt tokens | unshared s | shared s | shared / unshared | same samples |")
print("|---|---|---|---|---|---|---|---|")
for size in args.sizes.split(","):
    h, layers, vocab = SIZES[size]
    tok = build_byte_tokenizer([f"<pad{i}>" for i in range(vocab - 259)] if vocab else None)
    model = build_tiny_model(
        tok,
        seed=0,
        hidden_size=h,
        num_layers=layers,
        num_heads=h // 32,
        num_kv_heads=h // 64,
        intermediate_size=2 * h,
    )
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"Add {i} and {i + 3}. Show your work."}], add_generation_prompt=True
        )["input_ids"]
        for i in range(4)
    ]
    for G in (int(g) for g in args.groups.split(",")):
        best, outs = {False: float("inf"), True: float("inf")}, {}
        for rep in range(args.reps):
            for share in (False, True):
                backend = HFGenerateBackend(model, tok, stop_token_ids(tok), share_prefill=share)
                t0 = time.perf_counter()
                outs[share] = backend.generate(prompts, n=G, max_new_tokens=32, temperature=1.0, seed=rep)
                best[share] = min(best[share], time.perf_counter() - t0)
        same = torch.equal(outs[True].input_ids_B_T, outs[False].input_ids_B_T)
        n_prompt = sum(len(p) for p in prompts)
        print(
            f"| {size} | {len(tok):,} | {G} | {n_prompt} | {best[False]:.3f} | {best[True]:.3f} | "
            f"{best[True] / best[False]:.3f} | {same} |"
        )
