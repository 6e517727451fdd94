"""The demo over several seeds: mean and spread of each teacher's outcome (the numbers in docs/lab.md).

    python benchmarks/demo_seeds.py --seeds 0 1 2 --output-dir runs/demo-seeds      # runs `opd demo` per seed
    python benchmarks/demo_seeds.py --from runs/demo-seeds/seed-0 runs/...    # only aggregates

Spread is (min, max) over seeds. The zoo is fixed; a seed changes OPD's sampling and data order.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def aggregate(summaries: list[dict]) -> str:
    lines = [
        "| student ← teacher | accuracy after | gap recovered | overlap ratio first → last | verdicts | minutes |",
        "|---|---|---|---|---|---|",
    ]
    teachers = [r["teacher"] for r in summaries[0]["results"]]
    before = [s["results"][0]["accuracy_before"] for s in summaries]
    for i, t in enumerate(teachers):
        rs = [s["results"][i] for s in summaries]
        acc = [r["accuracy_after"] for r in rs]
        gap = [r["gap_recovered"] for r in rs if r["gap_recovered"] is not None]
        o0 = statistics.mean(r["overlap_ratio_first"] for r in rs)
        o1 = statistics.mean(r["overlap_ratio_last"] for r in rs)
        verdicts = ", ".join(sorted({r["verdict"] for r in rs}))
        mins = statistics.mean(s["wall_time_s"] for s in summaries) / 60
        lines.append(
            f"| {t} | {statistics.mean(acc):.3f} ({min(acc):.3f}–{max(acc):.3f}) | "
            f"{100 * statistics.mean(gap):.1f}% ({100 * min(gap):.1f}–{100 * max(gap):.1f}) | "
            f"{o0:.3f} → {o1:.3f} | {verdicts} | {mins:.1f} |"
        )
    head = f"{len(summaries)} seeds; student accuracy before: {statistics.mean(before):.3f}"
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--output-dir", default="runs/demo-seeds")
    ap.add_argument("--from", dest="existing", nargs="*", default=None, help="demo output dirs to aggregate")
    args = ap.parse_args()
    if args.existing:
        dirs = [Path(d) for d in args.existing]
    else:
        from opd.lab.demo import run_demo

        dirs = []
        for s in args.seeds:
            d = Path(args.output_dir) / f"seed-{s}"
            run_demo(output_dir=str(d), seed=s, progress=False)
            dirs.append(d)
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    print(aggregate(summaries))


if __name__ == "__main__":
    main()
