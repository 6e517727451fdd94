"""Peak memory and time of chunked scoring (opd.scoring.score) vs a naive full-vocabulary log-softmax.

Both variants compute the same quantities for a B×T batch (prompt of 128 tokens, the rest response):
token log-probs, top-16 ids and log-probs, and entropy, in float32, from a tiny bf16 Qwen2-style model
(hidden 64, 1 layer) whose vocabulary is V. The small hidden size keeps the backbone cheap, so the
numbers isolate the vocabulary-sized part that chunking is about.

- naive:   ``model(...).logits`` (B×T×V bf16) → ``.float().log_softmax(-1)`` → gather / topk / entropy.
- chunked: ``score(model, ..., top_k=16, entropy=True, chunk_size=256)``.

Each (variant, V, T) runs in a fresh subprocess; its extra peak memory is the growth of ``ru_maxrss``
(peak resident set size) across the one scoring call, after the model is built and warmed up on a short
input. This counts everything the call allocates, backbone activations included. Time is wall-clock
of that one call (CPU; noisy on a shared machine). CPU allocator behaviour makes single RSS readings
vary, so each cell is the median of ``--repeats`` fresh runs. The chunked variant is also measured
with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc's default (dynamic) threshold keeps freed chunk-sized blocks
in the heap, so part of the default-RSS peak is allocator retention rather than live tensors. The naive
variant is skipped where its estimated peak (≈ 14 bytes × B·T·V) exceeds a budget, and the table says so.

Training step, full vocabulary vs top-K (``--section train``). One OPD training step without the rollout,
through the loop's own functions (``opd.methods.opd.score_batch`` + ``update``, one micro-batch of B
sequences, AdamW already stepped once so its state exists): no-grad scoring of both models, rewards,
then the update's forward + backward + optimizer step. Student float32 (hidden 64, 1 layer), teacher
bf16 (hidden 64, 2 layers), V = 32,768, T = 1,024 (128 prompt + 896 response tokens).

- topk:     ``objective=topk support_size=16`` (student support, student_p weights), the default objective;
- full:     ``objective=full``, the exact full-vocabulary KL, streamed (``opd.scoring.full_vocab_pair``);
- full-old: the former full-vocabulary loss, kept here only to show what streaming saves: every teacher
  chunk in a list and every student chunk's logits alive in the graph until backward (O(B·T·V));
- topk-fused / full-fused: the same objectives through the loop's single-pass step
  (``opd.methods.opd_scoring.fused_update``, the default with ``ppo_epochs=1``).

The full/topk peak ratio must stay <= 2 (printed with a verdict).

Usage: python benchmarks/score_memory.py [--section all|score|train] [--batch 2] [--repeats 3]
       [--naive-budget-gib 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VOCABS = (32_768, 151_936)
LENGTHS = (1024, 4096)
PROMPT = 128
HIDDEN = 64
TOP_K = 16
CHUNK = 256
TRAIN_VARIANTS = ("topk", "full", "full-old", "topk-fused", "full-fused")
TRAIN_V, TRAIN_T = 32_768, 1024
MAX_FULL_TO_TOPK = 2.0
NAIVE_BYTES_PER_ENTRY = 14  # bf16 logits (2) + float32 log-probs (4) + exp (4) + product (4)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(variant: str, V: int, T: int, B: int) -> dict:
    """Build the model, warm up, run one scoring call; return extra peak RSS (bytes) and seconds."""
    import torch

    from opd.scoring import left_pad_position_ids, score
    from opd.tiny import build_byte_tokenizer, build_tiny_model

    torch.manual_seed(0)
    tok = build_byte_tokenizer()
    model = build_tiny_model(
        tok,
        hidden_size=HIDDEN,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=2 * HIDDEN,
        max_positions=T,
        vocab_size=V,
    )
    model = model.to(torch.bfloat16).eval()
    ids_B_T = torch.randint(0, V, (B, T))
    attn_B_T = torch.ones(B, T, dtype=torch.long)
    resp_B_T = torch.zeros(B, T, dtype=torch.long)
    resp_B_T[:, PROMPT:] = 1

    def naive(ids, attn, resp):
        with torch.no_grad():
            logits_B_T_V = model(
                input_ids=ids, attention_mask=attn, position_ids=left_pad_position_ids(attn), use_cache=False
            ).logits
            logp_B_T_V = logits_B_T_V.float().log_softmax(-1)
            del logits_B_T_V
            token_logp = logp_B_T_V[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * resp[:, 1:]
            top_logp, top_ids = logp_B_T_V.topk(TOP_K, dim=-1)
            ent = -(logp_B_T_V.exp() * logp_B_T_V).sum(-1)
            return token_logp, top_logp, top_ids, ent

    def chunked(ids, attn, resp):
        return score(model, ids, attn, resp, top_k=TOP_K, entropy=True, chunk_size=CHUNK)

    fn = naive if variant == "naive" else chunked
    fn(ids_B_T[:1, : PROMPT + 8], attn_B_T[:1, : PROMPT + 8], resp_B_T[:1, : PROMPT + 8])  # warm-up
    before = _maxrss_bytes()
    t0 = time.perf_counter()
    out = fn(ids_B_T, attn_B_T, resp_B_T)
    seconds = time.perf_counter() - t0
    peak = _maxrss_bytes() - before
    del out
    return {"variant": variant, "V": V, "T": T, "B": B, "peak_bytes": peak, "seconds": seconds}


def train_child(variant: str, V: int, T: int, B: int) -> dict:
    """Extra peak RSS (bytes) and seconds of one OPD training step (score_batch + update), no rollout."""
    import torch

    from opd import objectives as obj
    from opd.config import OPDConfig
    from opd.methods import opd as opd_method
    from opd.methods.opd_scoring import fused_update
    from opd.rollout import RolloutBatch
    from opd.scoring import PolicyScorer
    from opd.tiny import build_byte_tokenizer, build_tiny_model

    torch.manual_seed(0)
    tok = build_byte_tokenizer()
    kw = dict(
        hidden_size=HIDDEN,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=2 * HIDDEN,
        max_positions=T,
        vocab_size=V,
    )
    student = build_tiny_model(tok, num_layers=1, seed=0, **kw).eval()
    teacher = build_tiny_model(tok, num_layers=2, seed=1, **kw).to(torch.bfloat16).eval()
    teacher.requires_grad_(False)
    objective = "topk" if variant.startswith("topk") else "full"
    cfg = OPDConfig(objective=objective, support_size=16, micro_batch_size=B, score_chunk_size=CHUNK)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)

    if variant == "full-old":

        def old_full_vocab_loss(student, teacher, mb, mask, cfg):
            from opd.scoring import score_full_logits

            args = (mb.input_ids_B_T, mb.attention_mask_B_T, mb.response_mask_B_T)
            with torch.no_grad():
                t_chunks = list(score_full_logits(teacher.model, *args, chunk_size=cfg.score_chunk_size))
            per_token = torch.zeros_like(mask)
            s_iter = score_full_logits(student.model, *args, grad=True, chunk_size=cfg.score_chunk_size)
            for (rows, cols, s_logits), (_, _, t_logits) in zip(s_iter, t_chunks, strict=True):
                ones = torch.ones(1, s_logits.shape[0])
                div = obj.full_vocab_divergence(s_logits[None], t_logits[None], ones, kind="reverse_kl")[0]
                per_token = per_token.index_put((rows, cols), div)
            return obj.aggregate(per_token, mask, cfg.loss_aggregation)

        opd_method._full_vocab_loss = old_full_vocab_loss

    def batch(t: int) -> RolloutBatch:
        resp = torch.zeros(B, t)
        resp[:, PROMPT:] = 1
        return RolloutBatch(
            input_ids_B_T=torch.randint(0, V, (B, t)),
            attention_mask_B_T=torch.ones(B, t, dtype=torch.long),
            response_mask_B_T=resp,
            prompt_len=PROMPT,
            prompt_index_B=torch.arange(B),
            truncated_B=torch.zeros(B, dtype=torch.bool),
        )

    s_scorer = PolicyScorer(student, chunk_size=cfg.score_chunk_size, vocab_limit=V)
    t_scorer = PolicyScorer(teacher, chunk_size=cfg.score_chunk_size, vocab_limit=V)

    def step(b: RolloutBatch) -> float:
        if variant.endswith("-fused"):
            return fused_update(s_scorer, t_scorer, b, optimizer, cfg)[2]
        scored, _ = opd_method.score_batch(s_scorer, t_scorer, b, cfg)
        loss, *_ = opd_method.update(s_scorer, t_scorer, b, scored, optimizer, cfg)
        return loss

    step(batch(PROMPT + 8))  # warm-up; allocates AdamW's state
    b = batch(T)
    before = _maxrss_bytes()
    t0 = time.perf_counter()
    step(b)
    seconds = time.perf_counter() - t0
    peak = _maxrss_bytes() - before
    return {"variant": variant, "V": V, "T": T, "B": B, "peak_bytes": peak, "seconds": seconds}


def run_child(variant: str, V: int, T: int, B: int, repeats: int, mmap_threshold: int | None = None) -> dict:
    """Median peak and median time over ``repeats`` fresh subprocesses.

    ``mmap_threshold`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` in the child: blocks above it are mapped and
    unmapped directly, so RSS follows the live tensors instead of what the heap retains.
    """
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    runs = []
    for _ in range(repeats):
        flag = "--train-child" if variant in TRAIN_VARIANTS else "--child"
        cmd = [sys.executable, __file__, flag, variant, str(V), str(T), str(B)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"{variant} V={V} T={T} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return {
        "peak_bytes": statistics.median(r["peak_bytes"] for r in runs),
        "seconds": statistics.median(r["seconds"] for r in runs),
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2, help="sequences per batch B")
    ap.add_argument("--repeats", type=int, default=3, help="fresh runs per cell; the median is shown")
    ap.add_argument(
        "--naive-budget-gib", type=float, default=8.0, help="skip naive runs estimated above this"
    )
    ap.add_argument("--section", choices=("all", "score", "train"), default="all", help="which table(s)")
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "V", "T", "B"), help=argparse.SUPPRESS)
    ap.add_argument("--train-child", nargs=4, metavar=("VARIANT", "V", "T", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child or args.train_child:
        one = args.child or args.train_child
        variant, V, T, B = one[0], *map(int, one[1:])
        print(json.dumps((child if args.child else train_child)(variant, V, T, B)))
        return
    if args.section in ("all", "score"):
        score_table(args)
    if args.section in ("all", "train"):
        train_table(args)


def train_table(args) -> None:
    """Training-step peaks of top-K, streamed full vocabulary and the former full-vocab loss."""
    B, V, T = args.batch, TRAIN_V, TRAIN_T
    print(
        f"\nOne training step (score_batch + update), B={B}, T={T:,} ({T - PROMPT} response), V={V:,}, "
        f"chunk_size={CHUNK}, median of {args.repeats} runs per cell"
    )
    print("| objective | peak | peak, 64 KiB mmap threshold | time |")
    print("|---|---|---|---|")
    res = {}
    for variant in TRAIN_VARIANTS:
        d = run_child(variant, V, T, B, args.repeats)
        m = run_child(variant, V, T, B, args.repeats, mmap_threshold=65536)
        res[variant] = (d["peak_bytes"], m["peak_bytes"])
        name = {
            "topk": "top-K (K=16)",
            "full": "full vocabulary",
            "full-old": "full vocabulary, former",
            "topk-fused": "top-K (K=16), fused step",
            "full-fused": "full vocabulary, fused step",
        }
        print(
            f"| {name[variant]} | {_mib(d['peak_bytes'])} | {_mib(m['peak_bytes'])} | {d['seconds']:.2f} s |"
        )
    for label, i in (("default allocator", 0), ("64 KiB mmap threshold", 1)):
        ratio = res["full"][i] / max(res["topk"][i], 1)
        old = res["full-old"][i] / max(res["topk"][i], 1)
        verdict = "OK" if ratio <= MAX_FULL_TO_TOPK else f"FAIL (> {MAX_FULL_TO_TOPK:g})"
        print(f"full / top-K peak ratio ({label}): {ratio:.2f} {verdict}; former full / top-K: {old:.2f}")
        fused = res["full-fused"][i] / max(res["topk-fused"][i], 1)
        verdict = "OK" if fused <= MAX_FULL_TO_TOPK else f"FAIL (> {MAX_FULL_TO_TOPK:g})"
        print(f"fused steps, full / top-K peak ratio ({label}): {fused:.2f} {verdict}")


def score_table(args) -> None:
    import torch

    B = args.batch
    print(
        f"B={B}, prompt={PROMPT}, response=T-{PROMPT}, support_size={TOP_K}, chunk_size={CHUNK}, hidden={HIDDEN}, "
        f"bf16 model, float32 log-probs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} runs per cell"
    )
    header = (
        "| V | T | naive peak | chunked peak | peak ratio | chunked peak, 64 KiB mmap threshold | ratio "
        "| naive time | chunked time | time ratio |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    notes = []
    for V in VOCABS:
        for T in LENGTHS:
            chunked = run_child("chunked", V, T, B, args.repeats)
            chunked_mmap = run_child("chunked", V, T, B, args.repeats, mmap_threshold=65536)
            estimate = NAIVE_BYTES_PER_ENTRY * B * T * V
            if estimate > args.naive_budget_gib * 2**30:
                notes.append(
                    f"naive skipped at V={V}, T={T}: estimated peak {estimate / 2**30:.1f} GiB "
                    f"> budget {args.naive_budget_gib:g} GiB (this 24 GiB machine is shared)"
                )
                naive = None
            else:
                naive = run_child("naive", V, T, B, args.repeats)
            c, cm = chunked["peak_bytes"], chunked_mmap["peak_bytes"]
            if naive is None:
                cells = [f"skipped (~{estimate / 2**30:.1f} GiB est.)", _mib(c), "–", _mib(cm), "–", "–"]
                cells += [f"{chunked['seconds']:.2f} s", "–"]
            else:
                n = max(naive["peak_bytes"], 1)
                cells = [
                    _mib(n),
                    _mib(c),
                    f"{c / n:.3f}",
                    _mib(cm),
                    f"{cm / n:.3f}",
                    f"{naive['seconds']:.2f} s",
                ]
                cells += [f"{chunked['seconds']:.2f} s", f"{chunked['seconds'] / naive['seconds']:.2f}"]
            print(f"| {V:,} | {T:,} | " + " | ".join(cells) + " |", flush=True)
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
