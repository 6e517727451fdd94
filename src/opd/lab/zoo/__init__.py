"""The lab's model zoo: tiny Qwen2 models trained from scratch on the lab world, shipped in the package.

=================  ======================================  ============================================
name               trained on                              role in the study (PAPER.md §2)
=================  ======================================  ============================================
student            pattern A, easy only, small             the student
teacher-a-plus     pattern A, easy + hard, larger          compatible pattern + new capability
teacher-b-plus     pattern B, easy + hard, larger          incompatible pattern, about equal score
teacher-a-same     pattern A, easy only, larger            same pipeline: higher score, nothing new
student-plus       the student, further trained on A,      the "after RL" checkpoint for reverse
                   easy + hard                             distillation toward ``student``
=================  ======================================  ============================================

Each model directory holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
shared tokenizer (byte-level ``Qwen2Tokenizer``, ChatML chat template, EOS ``<|im_end|>``), so it loads
with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` like any checkpoint. ``build_info.json``
next to them records every spec, parameter count, accuracy (greedy and sampled at temperature 1, per
difficulty and number of steps), weight hash and the build time.

``opd lab build`` (:func:`build`) retrains the zoo: models train in parallel worker processes, one
thread each, so the weights do not depend on the number of cores; the same seed gives bit-identical
weights on the same machine and torch build. Set ``OPD_LAB_ZOO`` to use a zoo built elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

from opd.lab.train import ModelSpec

PACKAGE_ZOO = Path(__file__).resolve().parent
ZOO_ENV = "OPD_LAB_ZOO"

_STUDENT = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256)
_TEACHER = dict(hidden_size=96, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384)
STUDENT_HARD_FRACTION = 0.04
"""Share of hard problems in the student's data: enough that the student puts some probability on the
right digits of hard steps (OPD can only move mass the student already gives, PAPER.md §3), too little
to solve them. With 0 the student is confidently wrong on hard steps and OPD barely moves it."""

SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "student",
            "a",
            STUDENT_HARD_FRACTION,
            **_STUDENT,
            steps=1000,
            seed_offset=1,
            notes="small; pattern A, the student's data (easy, 4% hard)",
        ),
        ModelSpec(
            "teacher-a-same",
            "a",
            STUDENT_HARD_FRACTION,
            **_TEACHER,
            steps=1000,
            seed_offset=2,
            notes="larger; pattern A, exactly the student's data mix: same pipeline",
        ),
        ModelSpec(
            "teacher-a-plus",
            "a",
            0.5,
            **_TEACHER,
            steps=800,
            lr=1e-3,
            init_from="teacher-a-same",
            seed_offset=3,
            notes="teacher-a-same trained further on easy + hard, pattern A: compatible, new capability",
        ),
        ModelSpec(
            "teacher-b-plus",
            "b",
            0.5,
            **_TEACHER,
            steps=2000,
            seed_offset=4,
            notes="larger; pattern B, easy + hard from scratch: incompatible pattern, same score",
        ),
        ModelSpec(
            "student-plus",
            "a",
            0.5,
            **_STUDENT,
            steps=500,
            lr=1e-3,
            init_from="student",
            seed_offset=5,
            notes="the student trained further on easy + hard: the 'after RL' checkpoint",
        ),
    )
}
MODEL_NAMES: tuple[str, ...] = tuple(SPECS)


def zoo_dir() -> Path:
    """Where the zoo is read from: ``$OPD_LAB_ZOO`` if set, else the copy inside the package."""
    env = os.environ.get(ZOO_ENV)
    return Path(env) if env else PACKAGE_ZOO


def model_path(name: str) -> Path:
    """Directory of the built zoo model ``name`` (``lab:`` prefix allowed), loadable with ``from_pretrained``."""
    key = name[len("lab:") :] if name.startswith("lab:") else name
    if key not in SPECS:
        raise ValueError(
            f"unknown lab model {name!r}; available: {', '.join('lab:' + n for n in MODEL_NAMES)}"
        )
    d = zoo_dir() / key
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"lab model {key!r} is not built (no config.json/model.safetensors in {d}); "
            "run `opd lab build` to train the zoo (minutes on a CPU)"
        )
    return d


def build_info(zoo: str | Path | None = None) -> dict:
    """The ``build_info.json`` of a built zoo (default: :func:`zoo_dir`)."""
    p = Path(zoo) if zoo is not None else zoo_dir()
    f = p / "build_info.json"
    if not f.is_file():
        raise FileNotFoundError(f"no build_info.json in {p}; run `opd lab build` to train the zoo")
    return json.loads(f.read_text())


def weights_sha256(model_dir: str | Path) -> str:
    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()


def _job(name: str, spec: ModelSpec, out_dir: str, seed: int, evaluate: bool, queue=None) -> dict:
    """Train, save and evaluate one model (runs in a worker process)."""
    import torch
    from transformers import AutoModelForCausalLM

    from opd.lab import evaluate_model, lab_tokenizer, prompt_rows, world

    torch.set_num_threads(1)
    tok = lab_tokenizer()
    init = None
    if spec.init_from is not None:
        init = AutoModelForCausalLM.from_pretrained(Path(out_dir) / spec.init_from, dtype=torch.float32)
    from opd.lab.train import train_model

    model, log = train_model(spec, tok, seed=seed, init_model=init, progress_queue=queue)
    d = Path(out_dir) / name
    model.save_pretrained(d)
    tok.save_pretrained(d)
    info = {
        "spec": asdict(spec),
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(log["seconds"], 1),
        "train_tokens": log["tokens"],
        "loss": log["loss"],
        "sha256": weights_sha256(d),
    }
    if evaluate:
        rows = prompt_rows("test")
        for label, temp in (("greedy", 0.0), ("sampled_t1", 1.0)):
            r = evaluate_model(model, tok, rows, temperature=temp, seed=seed, return_responses=True)
            usage = [world.detect_pattern(x) for x in r.pop("responses")]
            r.pop("correct")
            r["pattern_usage"] = {p: round(usage.count(p) / len(usage), 4) for p in (*world.PATTERNS, None)}
            info[label] = r
    return info


def build(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    only: list[str] | None = None,
    progress: bool = True,
    workers: int | None = None,
    evaluate: bool = True,
    specs: dict[str, ModelSpec] | None = None,
) -> dict:
    """Train the zoo from scratch into ``out_dir`` (default: the package's zoo) and write build_info.json.

    ``only`` restricts the build to some names (a model that continues another, e.g. ``student-plus``,
    reads that one from ``out_dir``, which must then hold it or be built in the same call). ``workers``
    parallel processes (default: min(cpu count, 4)) train one model each, single-threaded. ``specs``
    replaces :data:`SPECS` (tests build reduced models). Returns the build info.
    """
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    specs = dict(specs or SPECS)
    names = list(only) if only else list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown lab model(s) {unknown}; available: {', '.join(specs)}")
    out = Path(out_dir) if out_dir is not None else PACKAGE_ZOO
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        dep = specs[n].init_from
        if dep and dep not in names and not (out / dep / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"lab model {n!r} continues {dep!r}, which is neither built in {out} nor in only={names}; "
                f"add {dep!r} to only"
            )
    workers = workers or max(1, min(os.cpu_count() or 1, 4))
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    queue = manager.Queue()
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(specs[n].steps for n in names), desc="opd lab build", unit="step")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending = sorted(names, key=lambda n: -specs[n].steps * specs[n].hidden_size ** 2)
        running: dict = {}
        while pending or running:
            for n in list(pending):
                dep = specs[n].init_from
                if dep in names and dep not in results:
                    continue  # wait for the model it continues
                pending.remove(n)
                running[pool.submit(_job, n, specs[n], str(out), seed, evaluate, queue)] = n
            done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            while not queue.empty():
                k = queue.get()
                if bar is not None:
                    bar.update(k)
            for f in done:
                n = running.pop(f)
                results[n] = f.result()
                if bar is not None:
                    g = results[n].get("greedy", {})
                    bar.write(
                        f"  {n}: {results[n]['params']:,} params, {results[n]['train_seconds']:.0f} s, "
                        f"greedy acc {g.get('accuracy', float('nan')):.3f} {g.get('by_difficulty', '')}"
                    )
    if bar is not None:
        bar.close()
    manager.shutdown()
    import torch
    import transformers

    info_path = out / "build_info.json"
    old = json.loads(info_path.read_text()).get("models", {}) if info_path.is_file() else {}
    info = {
        "seed": seed,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "built": names,
        "workers": workers,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "models": {**old, **{n: results[n] for n in names}},
    }
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return info


def main_build(argv: list[str] | None = None) -> int:
    """``opd lab build [--out DIR] [--seed N] [--only NAME ...]`` (for launchers without the main CLI)."""
    import argparse

    p = argparse.ArgumentParser(prog="opd lab build", description=build.__doc__)
    p.add_argument("--out", default=None, help="output directory (default: the package's zoo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help=f"subset of {', '.join(MODEL_NAMES)}")
    a = p.parse_args(argv)
    build(a.out, seed=a.seed, only=a.only)
    return 0
