"""opd's OPD step against TRL's ``DistillationTrainer`` on the same random Qwen2 pairs, side by side.

    pip install -e ".[bench]"   # trl==1.16.0, a benchmark dependency only (opd never imports trl)
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py [--sizes small,medium] [--steps 4] [--reps 2]

TRL side: ``trl.DistillationTrainer`` (on-policy: the student samples the completions, then a generalized
JSD over the full vocabulary; ``beta=1`` is the reverse KL(p_student || p_teacher), opd's ``objective=full``)
with fp32, no gradient checkpointing, no dropout, HF ``generate`` sampling at temperature 1 (top-p 1,
top-k 0), one optimiser step per generation batch. TRL samples one completion per prompt, so each prompt
appears G times in a row in its dataset (no shuffling) and the batch is P x G rows.

opd side: ``opd.methods.opd.train`` with ``objective=full`` (the same loss) and with the default
``objective=topk`` (K = 16, student support, fused update), the same P, G, L, lr, AdamW, fp32, 1 thread.

Floor: what any such trainer must do per step, timed alone with plain transformers/torch: ``generate``
of the same batch, one no-grad teacher forward, one student forward + backward (a token log-likelihood
loss; the optimiser step is left out).

Each (trainer, size) runs ``--steps`` steps per run, the first step dropped; the runs are alternated and
the best of ``--reps`` is kept. Tokens/s counts the generated (response) tokens of the step. All models
are random (no hub); ``large`` uses a byte tokenizer padded with placeholder tokens to V = 151,936.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from opd.config import OPDConfig
from opd.methods.opd import train as opd_train
from opd.tiny import build_byte_tokenizer, build_tiny_model
from opd.tracking import read_metrics

# (student kwargs, teacher kwargs, vocab size); intermediate = 2 x hidden unless given
SIZES = {
    "small": (dict(hidden_size=64, num_layers=2), dict(hidden_size=96, num_layers=3), None),
    "medium": (dict(hidden_size=192, num_layers=4), dict(hidden_size=320, num_layers=5), None),
    "large": (dict(hidden_size=256, num_layers=4), dict(hidden_size=384, num_layers=6), 151_936),
}
TIMES = ("time/rollout", "time/score_student", "time/score_teacher", "time/update")


def build_pair(root: Path, size: str) -> tuple[Path, Path, int, int, int]:
    skw, tkw, vocab = SIZES[size]
    extra = [f"<pad{i}>" for i in range(vocab - 259)] if vocab else None
    tok = build_byte_tokenizer(extra)
    dirs, params = [], []
    for name, kw, seed in (("student", skw, 0), ("teacher", tkw, 1)):
        h = kw["hidden_size"]
        model = build_tiny_model(
            tok,
            seed=seed,
            num_heads=h // 32 or 2,
            num_kv_heads=max(1, h // 64),
            intermediate_size=2 * h,
            **kw,
        )
        d = root / size / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
        params.append(sum(p.numel() for p in model.parameters()))
    return dirs[0], dirs[1], params[0], params[1], len(tok)


def prompts(n: int) -> list[str]:
    return [f"Add {i} and {i + 3}." for i in range(n)]


def run_opd(student, teacher, root: Path, args, objective: str, tag: str) -> dict:
    p = root / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts(64)))
    out = root / tag
    opd_train(
        OPDConfig(
            student=str(student),
            teacher=str(teacher),
            prompts=str(p),
            steps=args.steps,
            prompts_per_step=args.prompts,
            rollouts_per_prompt=args.rollouts,
            max_new_tokens=args.new_tokens,
            micro_batch_size=args.prompts * args.rollouts,
            objective=objective,
            lr=1e-4,
            output_dir=str(out),
            progress=False,
            alerts=False,
            threads=1,
        )
    )
    rows = read_metrics(out / "metrics.jsonl")[1:]
    res = {k: statistics.mean(r[k] for r in rows) for k in ("time/step", *TIMES)}
    tokens = statistics.mean(r["response/length_mean"] for r in rows) * args.prompts * args.rollouts
    res["tokens/s"] = tokens / res["time/step"]
    return res


def run_trl(student, teacher, root: Path, args, tag: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    class Timed(DistillationTrainer):
        gen_times: list[float] = []
        gen_tokens: list[int] = []

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.gen_times.append(time.perf_counter() - t0)
            self.gen_tokens.append(int(out["completion_mask"].sum()))
            return out

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    n = args.prompts * args.steps
    rows = [{"prompt": [{"role": "user", "content": q}]} for q in prompts(n) for _ in range(args.rollouts)]
    tok = AutoTokenizer.from_pretrained(student)
    tok.padding_side = "left"
    cfg = DistillationConfig(
        output_dir=str(root / tag),
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts * args.rollouts,
        gradient_accumulation_steps=1,
        max_completion_length=args.new_tokens,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
        beta=1.0,
        temperature=1.0,
        bf16=False,
        gradient_checkpointing=False,
        disable_dropout=True,
        shuffle_dataset=False,
        use_cpu=True,
        report_to=[],
        logging_steps=10_000,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    timer = StepTimer()
    Timed.gen_times, Timed.gen_tokens = [], []
    trainer = Timed(
        model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32),
        args=cfg,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[timer],
    )
    torch.set_num_threads(1)
    trainer.train()
    step = statistics.mean(timer.times[1:])
    return {
        "time/step": step,
        "time/rollout": statistics.mean(Timed.gen_times[1:]),
        "tokens/s": statistics.mean(Timed.gen_tokens[1:]) / step,
    }


def run_floor(student, teacher, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    tok.padding_side = "left"
    s = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in prompts(args.prompts)
        for _ in range(args.rollouts)
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        s.eval()
        with torch.no_grad():
            seq = s.generate(
                **enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens
            )
        t1 = time.perf_counter()
        mask = (seq != tok.pad_token_id).long()
        mask[:, : enc["attention_mask"].shape[1]] = enc["attention_mask"]
        with torch.no_grad():
            t(input_ids=seq, attention_mask=mask)
        t2 = time.perf_counter()
        s.train()
        logits = s(input_ids=seq, attention_mask=mask).logits[:, :-1].float()
        loss = -torch.log_softmax(logits, -1).gather(-1, seq[:, 1:, None]).mean()
        loss.backward()
        s.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        times.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
    step, gen, tf, sfb = (statistics.mean(x[i] for x in times[1:]) for i in range(4))
    ntok = (seq.shape[1] - enc["input_ids"].shape[1]) * seq.shape[0]
    return {
        "time/step": step,
        "time/rollout": gen,
        "teacher_fwd": tf,
        "student_fwd_bwd": sfb,
        "tokens/s": ntok / step,
    }


TRL, FULL, TOPK, FLOOR = (
    "TRL DistillationTrainer (beta=1)",
    "opd objective=full",
    "opd objective=topk",
    "floor (gen + teacher fwd + student fwd/bwd)",
)
RUNNERS = (TRL, FULL, TOPK, FLOOR)


def run_one(name: str, student, teacher, root: Path, args, tag: str) -> dict:
    if name == TRL:
        return run_trl(student, teacher, root, args, tag)
    if name == FLOOR:
        return run_floor(student, teacher, args)
    return run_opd(student, teacher, root, args, "full" if name == FULL else "topk", tag)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,medium", help="comma list of: " + ",".join(SIZES))
    ap.add_argument("--steps", type=int, default=4, help="steps per run; the first is dropped")
    ap.add_argument("--reps", type=int, default=2, help="alternated runs per trainer; best kept")
    ap.add_argument("--prompts", type=int, default=4, help="P, prompts per step")
    ap.add_argument("--rollouts", type=int, default=2, help="G, rollouts per prompt")
    ap.add_argument("--new-tokens", type=int, default=32, help="L, max new tokens")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers
    import trl

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    print(
        f"P={args.prompts} x G={args.rollouts} rollouts x L={args.new_tokens} new tokens, fp32, 1 thread, "
        f"{args.steps} steps/run (first dropped), best of {args.reps} alternated runs; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    )
    root = Path(tempfile.mkdtemp())
    header = "| size | params student/teacher | V | trainer | s/step | tokens/s | opd / TRL | / floor | rollout s |"
    lines = [header, "|" + "---|" * 9]
    breakdown = []
    for size in args.sizes.split(","):
        student, teacher, ps, pt, vocab = build_pair(root, size)
        res: dict[str, list[dict]] = {k: [] for k in RUNNERS}
        for r in range(args.reps):
            for i, name in enumerate(RUNNERS):
                torch.set_num_threads(1)
                res[name].append(run_one(name, student, teacher, root, args, f"{size}-{i}-{r}"))
        best = {k: min(v, key=lambda d: d["time/step"]) for k, v in res.items()}
        trl_t = best[TRL]["time/step"]
        floor_t = best[FLOOR]["time/step"]
        for name, b in best.items():
            ratio = f"{b['time/step'] / trl_t:.2f}" if name.startswith("opd") else "–"
            lines.append(
                f"| {size} | {ps / 1e6:.2f}M/{pt / 1e6:.2f}M | {vocab:,} | {name} | {b['time/step']:.3f} | "
                f"{b['tokens/s']:.0f} | {ratio} | {b['time/step'] / floor_t:.2f} | {b['time/rollout']:.3f} |"
            )
            if name.startswith("opd"):
                breakdown.append(f"{size} {name}: " + ", ".join(f"{k} {b[k]:.3f}" for k in TIMES))
        f = best[FLOOR]
        breakdown.append(
            f"{size} floor: generate {f['time/rollout']:.3f}, teacher fwd {f['teacher_fwd']:.3f}, "
            f"student fwd+bwd {f['student_fwd_bwd']:.3f}"
        )
        print("\n".join(lines[-4:]), flush=True)
    print()
    print("\n".join(lines))
    print("opd phases (s/step, metrics.jsonl):")
    print("\n".join(breakdown))


if __name__ == "__main__":
    main()
