"""Cold start + OPD vs plain OPD toward the lab's incompatible teacher, over seeds (docs/recipe.md).

    python benchmarks/coldstart_seeds.py --seeds 0 1 2 --output-dir runs/coldstart-seeds          # run + table
    python benchmarks/coldstart_seeds.py --seeds 0 1 2 --output-dir runs/coldstart-seeds --no-run # table only

Per seed S it runs (at most ``--jobs`` at once, one thread each), unless the run's summary.json exists:

    opd train configs/lab.yaml teacher=lab:teacher-b-plus steps=100 eval_every=25 eval_limit=0 \\
        seed=S threads=1 progress=false output_dir=OUT/plain-sS
    opd coldstart configs/coldstart_lab.yaml seed=S threads=1 progress=false output_dir=OUT/cold-sS

then prints a markdown table from the runs' metrics.jsonl: greedy accuracy on all 400 lab:test problems
(before, after SFT, during and after OPD), and means over OPD steps of the overlap ratio (k = 16), the
teacher's probability mass on the overlap, the sampled-token KL and the entropy gap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPD = [sys.executable, "-m", "opd.cli"]
EVAL_STEPS = (25, 50, 75, 100)


def commands(seed: int, out: Path) -> dict[str, list[str]]:
    common = [f"seed={seed}", "threads=1", "progress=false"]
    return {
        f"plain-s{seed}": [
            *OPD,
            "train",
            "configs/lab.yaml",
            "teacher=lab:teacher-b-plus",
            "steps=100",
            "eval_every=25",
            "eval_limit=0",
            *common,
            f"output_dir={out / f'plain-s{seed}'}",
        ],
        f"cold-s{seed}": [
            *OPD,
            "coldstart",
            "configs/coldstart_lab.yaml",
            *common,
            f"output_dir={out / f'cold-s{seed}'}",
        ],
    }


def run_all(seeds: list[int], out: Path, jobs: int) -> None:
    todo = [
        (name, cmd)
        for s in seeds
        for name, cmd in commands(s, out).items()
        if not (out / name / "summary.json").is_file()
    ]
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as logs:  # each run's stdout + stderr in OUT/<name>.log
        running: list[tuple[str, subprocess.Popen, float]] = []
        while todo or running:
            while todo and len(running) < jobs:
                name, cmd = todo.pop(0)
                log = logs.enter_context(open(out / f"{name}.log", "w"))
                print(f"start {name}: {' '.join(cmd[2:])}", flush=True)
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                running.append((name, proc, time.time()))
            time.sleep(5)
            for item in list(running):
                name, proc, t0 = item
                if proc.poll() is not None:
                    running.remove(item)
                    print(f"done {name}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accuracy(metrics: list[dict]) -> dict[int, float]:
    return {r["step"]: r["eval/accuracy"] for r in metrics if "eval/accuracy" in r}


def window(metrics: list[dict], key: str, lo: int, hi: int) -> float:
    vals = [r[key] for r in metrics if lo <= r["step"] <= hi and r.get(key) is not None]
    return statistics.mean(vals) if vals else float("nan")


def summarise(out: Path, seeds: list[int]) -> str:
    table: dict[str, list[dict]] = {"plain OPD": [], "cold start + OPD": []}
    for s in seeds:
        plain = rows(out / f"plain-s{s}" / "metrics.jsonl")
        sft = rows(out / f"cold-s{s}" / "sft" / "metrics.jsonl")
        cold = rows(out / f"cold-s{s}" / "opd" / "metrics.jsonl")
        for name, opd, before in (
            ("plain OPD", plain, accuracy(plain)[0]),
            ("cold start + OPD", cold, accuracy(sft)[0]),
        ):
            acc = accuracy(opd)
            table[name].append(
                {
                    "before": before,
                    "start of OPD": acc[0],
                    **{f"step {k}": acc.get(k, float("nan")) for k in EVAL_STEPS},
                    "overlap 1-5": window(opd, "overlap/ratio", 1, 5),
                    "overlap 96-100": window(opd, "overlap/ratio", 96, 100),
                    "teacher mass 1-5": window(opd, "overlap/mass_teacher", 1, 5),
                    "KL 1-5": window(opd, "kl/sampled", 1, 5),
                    "entropy gap 1-5": window(opd, "entropy/gap", 1, 5),
                    "entropy gap 46-50": window(opd, "entropy/gap", 46, 50),
                    "entropy gap 96-100": window(opd, "entropy/gap", 96, 100),
                }
            )
    cols = list(next(iter(table.values()))[0])
    lines = [
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean (min–max)",
        "",
        "| run | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, per_seed in table.items():
        cells = []
        for c in cols:
            v = [r[c] for r in per_seed]
            cells.append(
                f"{statistics.mean(v):.3f} ({min(v):.3f}–{max(v):.3f})" if len(v) > 1 else f"{v[0]:.3f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--output-dir", type=Path, default=Path("runs/coldstart-seeds"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--no-run", action="store_true", help="only print the table of existing runs")
    args = ap.parse_args()
    if not args.no_run:
        run_all(args.seeds, args.output_dir.resolve(), args.jobs)
    print(summarise(args.output_dir, args.seeds))


if __name__ == "__main__":
    main()
