"""Why a rollout inside the trainer is slower than the same ``generate`` alone: one HF rollout, timed
fresh and right after a training step, under candidate fixes, side by side.

    OMP_NUM_THREADS=1 python benchmarks/rollout_after_step.py [--size large] [--reps 3]

The model is ``benchmarks/vs_trl.py``'s student of that size (``large``: 256-wide, 4 layers, V = 151,936,
random), the rollout is opd's HF backend (``opd.rollout.make_backend("hf", ...)``, shared prefill on) with
vs_trl's P = 4 prompts x G = 2 samples x L = 32 new tokens at temperature 1, one torch thread. A
"training step" is what opd's loop does between two rollouts: forward + backward of a token
log-likelihood over the rolled-out batch, then an AdamW step (lr 1e-4; its state allocated on the first), and the
``.grad`` tensors kept until the next step's ``zero_grad`` (as ``fused_update`` leaves them).

Each timed rollout uses the same sampling seed; the time is divided by the number of decoding steps
(the widest response: finished rows ride along), so runs that stop at other lengths compare; the last
column also gives the share of the decoding rows spent on rows that had already finished
(1 − Σ_b R_b / (B · max_b R_b)).
Conditions (each rollout timed alone; the conditions are alternated ``--reps`` times, best and median kept):

- ``fresh``: no training step right before (the first repetition's is a process-fresh model);
- ``after step``: right after a training step (how the trainer's rollout runs);
- ``after step, grads freed``: the same, ``zero_grad(set_to_none=True)`` before the rollout;
- ``after step, malloc_trim``: the same, glibc's ``malloc_trim(0)`` before the rollout;
- ``after step, inference_mode``: the rollout under ``torch.inference_mode()``;
- ``after step, flush denormals``: ``torch.set_flush_denormal(True)`` during the rollout;
- ``after step, train mode``: the model left in ``train()`` before the call (the backend switches to eval);
- ``after fused step``: after opd's own step instead (``fused_update``: the teacher's scoring and the
  student's top-K update, lr 1e-4), and the same with ``malloc_trim(0)`` before the rollout;
- ``inside opd.methods.opd.train (top-K)``: the rollouts of opd's own loop on this student and its
  teacher (vs_trl's opd top-K run), timed around the backend's ``generate``, the first step dropped.

Wall and CPU time (``time.process_time``) are both printed: on a shared machine a rollout that is slower
on the wall clock but not in CPU time waited for a core (other processes), it did not do more work.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import SIZES, build_pair, prompts  # noqa: E402

from opd.config import OPDConfig  # noqa: E402
from opd.methods.opd_scoring import fused_update  # noqa: E402
from opd.rollout import make_backend  # noqa: E402
from opd.scoring import PolicyScorer  # noqa: E402


def in_trainer(root: Path, student_dir: Path, teacher_dir: Path, steps: int) -> list:
    """The rollouts of opd's own loop (vs_trl's opd top-K run: P=4, G=2, L=32, fp32, 1 thread), timed
    around ``HFGenerateBackend.generate`` (wall and CPU), the first step dropped."""
    import json

    from opd.config import OPDConfig
    from opd.methods.opd import train
    from opd.rollout import HFGenerateBackend

    rows, real = [], HFGenerateBackend.generate

    def timed(self, *a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        batch = real(self, *a, **k)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        lengths = batch.response_lengths_B.float()
        n = int(lengths.max())
        rows.append((wall / n, cpu / n, (n, round(1 - float(lengths.sum() / (lengths.numel() * n)), 3))))
        return batch

    p = root / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts(64)))
    HFGenerateBackend.generate = timed
    try:
        train(
            OPDConfig(
                student=str(student_dir),
                teacher=str(teacher_dir),
                prompts=str(p),
                steps=steps,
                prompts_per_step=4,
                rollouts_per_prompt=2,
                max_new_tokens=32,
                micro_batch_size=8,
                lr=1e-4,
                output_dir=str(root / "run"),
                progress=False,
                alerts=False,
                threads=1,
            )
        )
    finally:
        HFGenerateBackend.generate = real
    return rows[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="large", choices=list(SIZES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps of the in-trainer run (the first dropped)")
    ap.add_argument("--only", default="", help="semicolon-separated condition names to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(tempfile.mkdtemp())
    student_dir, teacher_dir, n_params, _, vocab = build_pair(root, args.size)
    tok = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    backend = make_backend("hf", model, tok)
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in prompts(4)
    ]
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # as vs_trl.py's runs
    libc = ctypes.CDLL("libc.so.6")
    seed = [0]

    def rollout(wrap=None, fixed=False):
        seed[0] += 1
        kw = dict(n=2, max_new_tokens=32, temperature=1.0, top_p=1.0, top_k=0, seed=0 if fixed else seed[0])
        t0, c0 = time.perf_counter(), time.process_time()
        if wrap is None:
            batch = backend.generate(prompt_ids, **kw)
        else:
            with wrap():
                batch = backend.generate(prompt_ids, **kw)
        return (time.perf_counter() - t0, time.process_time() - c0), batch

    def per_step(seconds, batch):  # decoding steps = the widest response (finished rows ride along)
        lengths = batch.response_lengths_B.float()
        wasted = 1 - float(lengths.sum() / (lengths.numel() * lengths.max()))  # finished rows' share
        steps = int(lengths.max())
        return seconds[0] / steps, seconds[1] / steps, (steps, round(wasted, 3))

    def train_step(batch):
        model.train()
        opt.zero_grad(set_to_none=True)
        ids, am = batch.input_ids_B_T, batch.attention_mask_B_T
        logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
        loss = -(torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * am[:, 1:]).mean()
        loss.backward()
        opt.step()
        model.eval()

    class FlushDenormal:
        def __enter__(self):
            torch.set_flush_denormal(True)

        def __exit__(self, *a):
            torch.set_flush_denormal(False)

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    fused_cfg = OPDConfig(student=str(student_dir), teacher=str(teacher_dir), prompts="unused", lr=1e-4)
    s_scorer, t_scorer = PolicyScorer(model), PolicyScorer(teacher)

    def fused_step(batch):  # what opd's loop runs between rollouts (top-K, student support, lr 1e-4)
        fused_update(s_scorer, t_scorer, batch, opt, fused_cfg)
        model.eval()

    def condition(name):
        _, batch = rollout()  # a batch to train on
        if name.startswith("after fused step"):
            fused_step(batch)
            if name.endswith("malloc_trim"):
                libc.malloc_trim(0)
        elif name != "fresh":
            train_step(batch)
        wrap = None
        if name == "after step, grads freed":
            opt.zero_grad(set_to_none=True)
        elif name == "after step, malloc_trim":
            libc.malloc_trim(0)
        elif name == "after step, inference_mode":
            wrap = torch.inference_mode
        elif name == "after step, flush denormals":
            wrap = FlushDenormal
        elif name == "after step, train mode":
            model.train()
        return per_step(*rollout(wrap, fixed=True))

    names = [
        "fresh",
        "after step",
        "after step, grads freed",
        "after step, malloc_trim",
        "after step, inference_mode",
        "after step, flush denormals",
        "after step, train mode",
        "after fused step",
        "after fused step, malloc_trim",
    ]
    if args.only:
        names = [n for n in names if n in args.only.split(";")]
    rollout()  # warm-up
    times = {n: [] for n in names}
    print(f"{args.size}: {n_params / 1e6:.2f}M params, V={vocab:,}, 4 prompts x 2 x 32 new tokens, 1 thread")
    print("load before:", os.getloadavg())
    for _ in range(args.reps):
        for n in names:
            times[n].append(condition(n))
    times["inside opd.methods.opd.train (top-K)"] = in_trainer(root, student_dir, teacher_dir, args.steps)
    base = min(t for t, _, _ in times["fresh"])
    cpu_base = min(c for _, c, _ in times["fresh"])
    print(
        "| condition | best wall ms/decoding step | median wall | best / fresh | best CPU ms/decoding step | CPU / fresh | (steps, finished rows' share) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, rows in times.items():
        best, med = min(t for t, _, _ in rows), statistics.median(t for t, _, _ in rows)
        cpu = min(c for _, c, _ in rows)
        info = sorted({k for _, _, k in rows})
        print(
            f"| {n} | {1e3 * best:.1f} | {1e3 * med:.1f} | {best / base:.2f} | {1e3 * cpu:.1f} | "
            f"{cpu / cpu_base:.2f} | {info} |"
        )
    print("load after:", os.getloadavg())


if __name__ == "__main__":
    main()
