"""One OPD training step (no rollout) of this checkout against another checkout: peak memory and time.

    git worktree add /tmp/opd-base <commit>        # the revision to compare with
    python benchmarks/step_ab.py --base /tmp/opd-base [--variants topk-fused,full-fused] [--V 32768]
        [--T 1024] [--batch 2] [--repeats 3]

Each cell is ``benchmarks/score_memory.py --train-child VARIANT V T B`` of that checkout (its own script and
its own ``src`` first on ``PYTHONPATH``), in a fresh subprocess with one torch thread: one training step
after a warm-up step, through the loop's own functions (``topk-fused`` / ``full-fused``: ``fused_update``;
``topk`` / ``full``: the two-pass ``score_batch`` + ``update``). Peak = growth of the process's peak RSS
across the step; time = wall clock of the step. The two checkouts are alternated ``--repeats`` times and
the best (lowest) of each is printed, with the ratio new / base; ``uptime``'s load average is printed
before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run(root: Path, variant: str, V: int, T: int, B: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        str(root / "benchmarks" / "score_memory.py"),
        "--train-child",
        variant,
        str(V),
        str(T),
        str(B),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{root}: {variant} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the other checkout (a git worktree of the base revision)")
    ap.add_argument("--variants", default="topk-fused", help="comma-separated score_memory.py train variants")
    ap.add_argument("--V", type=int, default=32_768)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = Path(args.base).resolve()
    if not (base / "benchmarks" / "score_memory.py").exists():
        raise SystemExit(f"--base {base}: no benchmarks/score_memory.py there. Fix: pass an opd checkout.")
    print("load before:", os.getloadavg())
    print(
        f"one training step, V={args.V:,}, T={args.T:,} (128 prompt), B={args.batch}, 1 thread, best of {args.repeats} alternated"
    )
    print("| variant | base peak | new peak | new/base | base s | new s | new/base |")
    print("|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        runs = {"base": [], "new": []}
        for _ in range(args.repeats):
            for name, root in (("base", base), ("new", HERE)):
                runs[name].append(run(root, variant, args.V, args.T, args.batch))
        peak = {k: min(r["peak_bytes"] for r in v) for k, v in runs.items()}
        secs = {k: min(r["seconds"] for r in v) for k, v in runs.items()}
        print(
            f"| {variant} | {peak['base'] / 2**20:,.0f} MiB | {peak['new'] / 2**20:,.0f} MiB | "
            f"{peak['new'] / peak['base']:.2f} | {secs['base']:.2f} | {secs['new']:.2f} | {secs['new'] / secs['base']:.2f} |"
        )
    print("load after:", os.getloadavg())


if __name__ == "__main__":
    main()
