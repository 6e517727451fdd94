"""Template alignment on the lab, over seeds (docs/recipe.md, "Teacher-aligned prompts").

    python benchmarks/template_seeds.py --seeds 0 1 2 --output-dir runs/template-seeds            # all
    python benchmarks/template_seeds.py --seeds 0 1 2 --output-dir runs/template-seeds --no-opd   # overlap only

1. Initial overlap: per seed, ``opd prompts template`` (:func:`opd.prompts.select_template`) with
   student ``lab:student`` (plain lab prompt) and the candidates of configs/candidates/lab_templates.yaml, for the
   teacher trained under the "Question: ... Answer:" template (``lab:teacher-a-qa``) and, as a control,
   for ``lab:teacher-a-plus`` (trained on the plain prompt): 32 prompts of lab:train × 4 rollouts, 96 new
   tokens, one thread. Same student rollouts for every candidate of a seed.
2. OPD (unless ``--no-opd``): per seed S, the aligned and the misaligned arm (at most ``--jobs`` at once),
   unless the run's summary.json exists:

       opd train configs/template_lab.yaml seed=S steps=STEPS eval_every=STEPS threads=1 progress=false \\
           output_dir=OUT/aligned-sS
       opd train configs/template_lab.yaml teacher_prompt_template=null seed=S steps=STEPS \\
           eval_every=STEPS threads=1 progress=false output_dir=OUT/misaligned-sS

Prints markdown tables (per seed, and mean (min–max)).
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
TEACHERS = ("lab:teacher-a-qa", "lab:teacher-a-plus")


def measure(seeds: list[int], out: Path) -> dict:
    from opd.prompts import PromptsConfig, load_candidates, select_template

    cands = load_candidates(ROOT / "configs" / "candidates" / "lab_templates.yaml")
    res: dict = {}
    for teacher in TEACHERS:
        for s in seeds:
            f = out / f"template-{teacher.split(':')[1]}-s{s}.json"
            if not f.is_file():
                cfg = PromptsConfig(
                    student="lab:student",
                    teacher=teacher,
                    prompts="lab:train",
                    num_prompts=32,
                    rollouts_per_prompt=4,
                    max_new_tokens=96,
                    seed=s,
                    threads=1,
                    progress=False,
                )
                t0 = time.time()
                sel = select_template(cfg, cands)
                d = sel.to_dict() | {"seconds": round(time.time() - t0, 1)}
                out.mkdir(parents=True, exist_ok=True)
                f.write_text(json.dumps(d, indent=1) + "\n")
                print(f"measured {teacher} seed {s}: best {sel.best.name} ({d['seconds']} s)", flush=True)
            res[(teacher, s)] = json.loads(f.read_text())
    return res


def overlap_table(res: dict, seeds: list[int]) -> str:
    keys = ("overlap_ratio", "overlap_mass_student", "teacher_advantage", "entropy_gap", "kl")
    lines = [
        "| teacher | candidate | picked (seeds) | " + " | ".join(keys) + " |",
        "|---|---|---|" + "---:|" * len(keys),
    ]
    for teacher in TEACHERS:
        names = [c["name"] for c in res[(teacher, seeds[0])]["candidates"]]
        for name in names:
            per = [next(c for c in res[(teacher, s)]["candidates"] if c["name"] == name) for s in seeds]
            picked = sum(res[(teacher, s)]["best"]["name"] == name for s in seeds)
            cells = []
            for k in keys:
                v = [p[k] for p in per]
                cells.append(f"{statistics.mean(v):.3f} ({min(v):.3f}–{max(v):.3f})")
            lines.append(f"| {teacher} | {name} | {picked}/{len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def commands(seed: int, out: Path, steps: int) -> dict[str, list[str]]:
    common = [f"seed={seed}", f"steps={steps}", f"eval_every={steps}", "threads=1", "progress=false"]
    base = [*OPD, "train", "configs/template_lab.yaml", *common]
    return {
        f"aligned-s{seed}": [*base, f"output_dir={out / f'aligned-s{seed}'}"],
        f"misaligned-s{seed}": [
            *base,
            "teacher_prompt_template=null",
            f"output_dir={out / f'misaligned-s{seed}'}",
        ],
    }


def run_all(seeds: list[int], out: Path, jobs: int, steps: int) -> None:
    todo = [
        (name, cmd)
        for s in seeds
        for name, cmd in commands(s, out, steps).items()
        if not (out / name / "summary.json").is_file()
    ]
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as logs:
        running: list[tuple[str, subprocess.Popen, float]] = []
        while todo or running:
            while todo and len(running) < jobs:
                name, cmd = todo.pop(0)
                log = logs.enter_context(open(out / f"{name}.log", "w"))
                print(f"start {name}: {' '.join(cmd[2:])}", flush=True)
                running.append(
                    (name, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), time.time())
                )
            time.sleep(5)
            for item in list(running):
                name, proc, t0 = item
                if proc.poll() is not None:
                    running.remove(item)
                    print(f"done {name}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _window(m: list[dict], key: str, lo: int, hi: int) -> float:
    v = [r[key] for r in m if lo <= r["step"] <= hi and r.get(key) is not None]
    return statistics.mean(v) if v else float("nan")


def opd_table(out: Path, seeds: list[int], steps: int) -> str:
    lines = [
        "| seed | arm | accuracy before | accuracy after | overlap ratio 1-5 | teacher mass 1-5 | KL 1-5 | "
        f"KL {steps - 4}-{steps} | entropy gap 1-5 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in seeds:
        for arm in ("aligned", "misaligned"):
            f = out / f"{arm}-s{s}" / "metrics.jsonl"
            if not f.is_file():
                continue
            m = _rows(f)
            acc = {r["step"]: r["eval/accuracy"] for r in m if "eval/accuracy" in r}
            lines.append(
                f"| {s} | {arm} | {acc.get(0, float('nan')):.3f} | {acc.get(steps, float('nan')):.3f} | "
                f"{_window(m, 'overlap/ratio', 1, 5):.3f} | {_window(m, 'overlap/mass_teacher', 1, 5):.3f} | "
                f"{_window(m, 'kl/sampled', 1, 5):.3f} | {_window(m, 'kl/sampled', steps - 4, steps):.3f} | "
                f"{_window(m, 'entropy/gap', 1, 5):.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--output-dir", type=Path, default=Path("runs/template-seeds"))
    ap.add_argument("--steps", type=int, default=50, help="OPD steps per run")
    ap.add_argument("--jobs", type=int, default=2, help="OPD runs at once (one thread each)")
    ap.add_argument("--no-opd", action="store_true", help="only the initial overlap measurement")
    ap.add_argument("--no-run", action="store_true", help="only print the tables of existing results")
    args = ap.parse_args()
    out = args.output_dir.resolve()
    if not args.no_run:
        res = measure(args.seeds, out)
        print(overlap_table(res, args.seeds), flush=True)
        if not args.no_opd:
            run_all(args.seeds, out, args.jobs, args.steps)
    else:
        print(overlap_table(measure(args.seeds, out), args.seeds))
    if not args.no_opd:
        print(opd_table(out, args.seeds, args.steps))


if __name__ == "__main__":
    main()
