"""One student pass per step (fused_update=true) against scoring passes + an update pass (false).

    python benchmarks/fused_update.py [--settings topk,union,full]

Tiny random Qwen2 pair (student hidden 128, 2 layers; teacher 3 layers), 8 prompts x 4 rollouts x 48 new
tokens per step, one torch thread, 5 steps per run (the first dropped), the two paths alternated twice,
best of 2. Settings: ``topk`` (top-16, student support, the default), ``union`` (top-16, union support:
the teacher is scored first), ``full`` (the exact full-vocabulary KL). Prints the mean per-phase seconds
and the ratio of step times for each.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from opd.config import OPDConfig
from opd.methods.opd import train
from opd.tiny import save_tiny_pair
from opd.tracking import read_metrics

SETTINGS = {
    "topk": dict(objective="topk"),
    "union": dict(objective="topk", support="union"),
    "full": dict(objective="full"),
}
PHASES = ("time/step", "time/score_student", "time/score_teacher", "time/update", "time/rollout")

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--settings", default="topk,union,full", help=f"comma-separated, of {', '.join(SETTINGS)}")
args = ap.parse_args()
torch.set_num_threads(1)

root = Path(tempfile.mkdtemp())
s, t = save_tiny_pair(root, hidden_size=128, num_layers=2)
p = root / "p.jsonl"
p.write_text("".join(json.dumps({"prompt": f"Add {i} and {i + 3}."}) + "\n" for i in range(64)))
for name in args.settings.split(","):
    res = {True: [], False: []}
    for rep in range(2):
        for fused in (False, True):
            out = root / f"{name}{rep}{fused}"
            train(
                OPDConfig(
                    student=str(s),
                    teacher=str(t),
                    prompts=str(p),
                    steps=5,
                    prompts_per_step=8,
                    rollouts_per_prompt=4,
                    max_new_tokens=48,
                    micro_batch_size=16,
                    lr=1e-4,
                    output_dir=str(out),
                    progress=False,
                    alerts=False,
                    fused_update=fused,
                    threads=1,
                    **SETTINGS[name],
                )
            )
            rows = read_metrics(out / "metrics.jsonl")[1:]
            res[fused].append({k: statistics.mean(r[k] for r in rows) for k in PHASES})
    for fused in (False, True):
        best = min(res[fused], key=lambda d: d["time/step"])
        print(name, "fused" if fused else "two-pass", {k: round(v, 4) for k, v in best.items()})
    ratio = min(r["time/step"] for r in res[True]) / min(r["time/step"] for r in res[False])
    print(name, f"ratio step fused/two-pass {ratio:.3f}")
