"""Why OPD after the cold start collapses on the lab: the OPD stage rerun with other objectives (docs/recipe.md).

Needs the cold-start runs of benchmarks/coldstart_seeds.py (their ``sft/final`` and ``sft/teacher_data.jsonl``):

    python benchmarks/coldstart_objectives.py --cold-dir runs/coldstart-seeds --seeds 0 1 2 \\
        --variants full union sampled --output-dir runs/coldstart-objectives
    python benchmarks/coldstart_objectives.py ... --no-run        # table only

Per seed S and variant V it runs (at most ``--jobs`` at once, one thread each), unless its summary.json exists:

    opd train configs/lab.yaml teacher=lab:teacher-b-plus student=COLD/cold-sS/sft/final \\
        exclude_prompts=COLD/cold-sS/sft/teacher_data.jsonl steps=100 eval_every=E eval_limit=0 \\
        seed=S threads=1 progress=false output_dir=OUT/V-sS <V's keys>

(E = ``--eval-every``, 25 by default; exactly stage 2 of ``opd coldstart configs/coldstart_lab.yaml seed=S`` with V's keys; ``--plain`` runs the
same from ``lab:student`` on all of ``lab:train`` instead: plain OPD), then prints, per variant, greedy
accuracy on all 400 ``lab:test`` problems and means over OPD steps of the student's entropy, the entropy
gap, the teacher's mass on the top-16 overlap, the sampled-token KL and the response length; the
baseline row ``topk`` is the cold-start run's own OPD stage (``COLD/cold-sS/opd``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from coldstart_seeds import OPD, ROOT, accuracy, rows, window  # noqa: E402

VARIANTS = {
    "full": ["objective=full"],
    "union": ["support=union"],
    "sampled": ["objective=sampled"],
    "lr1e-4": ["lr=1e-4"],
    "full-lr1e-4": ["objective=full", "lr=1e-4"],
}
"""Variant name → the keys it changes (everything else: configs/lab.yaml, as the cold start's stage 2)."""


def command(seed: int, variant: str, cold: Path, out: Path, plain: bool, eval_every: int) -> list[str]:
    start = (
        []
        if plain
        else [
            f"student={cold / f'cold-s{seed}' / 'sft' / 'final'}",
            f"exclude_prompts={cold / f'cold-s{seed}' / 'sft' / 'teacher_data.jsonl'}",
        ]
    )
    return [
        *OPD,
        "train",
        "configs/lab.yaml",
        "teacher=lab:teacher-b-plus",
        *start,
        "steps=100",
        f"eval_every={eval_every}",
        "eval_limit=0",
        f"seed={seed}",
        "threads=1",
        "progress=false",
        f"output_dir={out / f'{variant}-s{seed}'}",
        *VARIANTS[variant],
    ]


def summarise(cold: Path, out: Path, seeds: list[int], variants: list[str], plain: bool) -> str:
    table: dict[str, list[dict]] = {}
    base = ("topk (plain OPD)", "plain") if plain else ("topk (the cold start's stage 2)", None)
    for name, variant in [base, *((v, v) for v in variants)]:
        per_seed = []
        for s in seeds:
            if variant is None:
                path = cold / f"cold-s{s}" / "opd" / "metrics.jsonl"
            elif variant == "plain":
                path = cold / f"plain-s{s}" / "metrics.jsonl"
            else:
                path = out / f"{variant}-s{s}" / "metrics.jsonl"
            if not path.is_file():
                break
            m = rows(path)
            acc = accuracy(m)
            per_seed.append(
                {
                    "start": acc.get(0, float("nan")),
                    **{f"acc {k}": acc.get(k, float("nan")) for k in (25, 50, 75, 100)},
                    "H(p) 1-5": window(m, "entropy/student", 1, 5),
                    "H(p) 96-100": window(m, "entropy/student", 96, 100),
                    "gap 1-5": window(m, "entropy/gap", 1, 5),
                    "gap 96-100": window(m, "entropy/gap", 96, 100),
                    "mass 1-5": window(m, "overlap/mass_teacher", 1, 5),
                    "mass 96-100": window(m, "overlap/mass_teacher", 96, 100),
                    "KL 96-100": window(m, "kl/sampled", 96, 100),
                    "len 96-100": window(m, "response/length_mean", 96, 100),
                }
            )
        if len(per_seed) == len(seeds):
            table[name] = per_seed
    if not table:
        return "no finished runs"
    cols = list(next(iter(table.values()))[0])
    lines = [
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): per seed, then mean",
        "",
        "| variant | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, per_seed in table.items():
        for s, r in zip(seeds, per_seed, strict=True):
            lines.append(f"| {name}, seed {s} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
        lines.append(
            f"| {name}, mean | "
            + " | ".join(f"{statistics.mean(r[c] for r in per_seed):.3f}" for c in cols)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold-dir", type=Path, default=Path("runs/coldstart-seeds"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["full"], choices=sorted(VARIANTS))
    ap.add_argument("--plain", action="store_true", help="from lab:student (plain OPD), not the cold start")
    ap.add_argument("--output-dir", type=Path, default=Path("runs/coldstart-objectives"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--eval-every", type=int, default=25, help="OPD steps between evaluations")
    ap.add_argument("--no-run", action="store_true", help="only print the table of existing runs")
    args = ap.parse_args()
    cold, out = args.cold_dir.resolve(), args.output_dir.resolve()
    if not args.no_run:
        todo = [
            (f"{v}-s{s}", command(s, v, cold, out, args.plain, args.eval_every))
            for v in args.variants
            for s in args.seeds
            if not (out / f"{v}-s{s}" / "summary.json").is_file()
        ]
        out.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as logs:
            running: list = []
            while todo or running:
                while todo and len(running) < args.jobs:
                    name, cmd = todo.pop(0)
                    log = logs.enter_context(open(out / f"{name}.log", "w"))
                    print(f"start {name}: {' '.join(cmd[2:])}", flush=True)
                    running.append(
                        (
                            name,
                            subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                            time.time(),
                        )
                    )
                time.sleep(5)
                for item in list(running):
                    name, proc, t0 = item
                    if proc.poll() is not None:
                        running.remove(item)
                        print(
                            f"done {name}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True
                        )
    print(summarise(cold, out, args.seeds, args.variants, args.plain))


if __name__ == "__main__":
    main()
