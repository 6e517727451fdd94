"""Time per phase of an OPD step on tiny models, and the overhead outside the four phases.

    python benchmarks/step_breakdown.py [--steps 12] [--support-size 16]

Overhead = loop time − Σ (rollout + score_student + score_teacher + update), i.e. everything the loop
does besides the model work: metrics, logging, data sampling, Python glue. Target: ≤ 15 % of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from opd.config import OPDConfig
from opd.methods.opd import train
from opd.tiny import save_tiny_pair
from opd.tracking import read_metrics

PHASES = ["time/rollout", "time/score_student", "time/score_teacher", "time/update"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--support-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        student, teacher = save_tiny_pair(root, hidden_size=64, num_layers=2, intermediate_size=128)
        prompts = root / "p.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"Add {i} and {i + 3}."}) + "\n" for i in range(64)))
        cfg = OPDConfig(
            student=str(student),
            teacher=str(teacher),
            prompts=str(prompts),
            steps=args.steps,
            prompts_per_step=8,
            rollouts_per_prompt=4,
            max_new_tokens=args.max_new_tokens,
            micro_batch_size=16,
            objective="topk",
            support_size=args.support_size,
            lr=1e-4,
            output_dir=str(root / "run"),
            progress=False,
            alerts=True,
        )
        summary = train(cfg)
        rows = read_metrics(root / "run" / "metrics.jsonl")
    n = len(rows)
    per_phase = {k: statistics.mean(r[k] for r in rows) for k in PHASES}
    loop_per_step = summary["loop_time_s"] / args.steps
    step_inner = statistics.mean(r["time/step"] for r in rows)
    phases = sum(per_phase.values())
    print(
        f"steps measured: {n}, support_size={args.support_size}, max_new_tokens={args.max_new_tokens}, 32 rollouts/step"
    )
    print(f"{'phase':<22}{'s/step':>10}{'share':>9}")
    for k, v in per_phase.items():
        print(f"{k:<22}{v:>10.4f}{v / loop_per_step:>9.1%}")
    print(
        f"{'overhead (in step)':<22}{step_inner - phases:>10.4f}{(step_inner - phases) / loop_per_step:>9.1%}"
    )
    print(
        f"{'overhead (whole loop)':<22}{loop_per_step - phases:>10.4f}{(loop_per_step - phases) / loop_per_step:>9.1%}"
    )
    print(f"{'loop time per step':<22}{loop_per_step:>10.4f}")
    ok = (loop_per_step - phases) / loop_per_step <= 0.15
    print(f"target overhead <= 15% of the step: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
