"""The lab's model zoo: tiny Qwen2 models trained from scratch on the lab world, shipped in the package.

Every model is trained on worked solutions (:mod:`opd.lab.train`); "easy"/"hard" and the patterns A/B
are defined in :mod:`opd.lab.world`. The student's pipeline has two stages: ``student-base`` learns
easy problems only, then a brief exposure (80 small steps on half easy, half hard problems) gives
``student``, which solves few hard problems but puts some probability on the right digits of hard
steps. That shared support is what OPD needs (docs/paper.md §3): ``student-base`` is confidently wrong on
hard steps and OPD barely moves it.

================  ===========================================  ==========================================
name              how it is made                               role in the study (docs/paper.md §2)
================  ===========================================  ==========================================
student           small; A; ``student-base`` + brief exposure  the student
teacher-a-plus    ``teacher-a-same`` trained on easy + hard, A  compatible pattern, new capability
teacher-b-plus    larger; B; easy + hard from scratch          incompatible pattern, about equal score
teacher-a-same    larger; A; the student's pipeline            same pipeline: higher score
student-plus      ``student`` trained on easy + hard, A        the "after RL" student (reverse
                                                               distillation toward ``student``)
student-base      small; A; easy only                          a student with no support on hard steps
teacher-a-base    larger; A; easy only                         a teacher that knows nothing new
================  ===========================================  ==========================================

Each model directory holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
shared tokenizer (byte-level ``Qwen2Tokenizer``, ChatML chat template, EOS ``<|im_end|>``), so it loads
with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` like any checkpoint. ``build_info.json``
next to them records every spec, parameter count, accuracy (greedy and sampled at temperature 1, per
difficulty and number of steps), the solution pattern the model writes, weight hashes and build times.

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
# the brief exposure that turns a *-base model into the student / teacher-a-same (constant small lr)
_EXPOSURE = dict(hard_fraction=0.5, steps=80, lr=3e-4, warmup=0.0, min_lr_ratio=1.0)

SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("student-base", "a", 0.0, **_STUDENT, steps=1000, seed_offset=1, notes="easy only"),
        ModelSpec(
            "student",
            "a",
            **_EXPOSURE,
            **_STUDENT,
            init_from="student-base",
            seed_offset=2,
            notes="student-base + brief exposure to hard problems",
        ),
        ModelSpec(
            "student-plus",
            "a",
            0.5,
            **_STUDENT,
            steps=500,
            batch_size=32,
            lr=1e-3,
            init_from="student",
            seed_offset=3,
            notes="student trained further on easy + hard: the 'after RL' student",
        ),
        ModelSpec("teacher-a-base", "a", 0.0, **_TEACHER, steps=1000, seed_offset=4, notes="easy only"),
        ModelSpec(
            "teacher-a-same",
            "a",
            **_EXPOSURE,
            **_TEACHER,
            init_from="teacher-a-base",
            seed_offset=5,
            notes="teacher-a-base + the student's brief exposure: the student's pipeline, larger",
        ),
        ModelSpec(
            "teacher-a-plus",
            "a",
            0.5,
            **_TEACHER,
            steps=800,
            batch_size=32,
            lr=1e-3,
            init_from="teacher-a-same",
            seed_offset=6,
            notes="teacher-a-same trained further on easy + hard: compatible, new capability",
        ),
        ModelSpec(
            "teacher-b-plus",
            "b",
            0.5,
            **_TEACHER,
            steps=1500,
            batch_size=32,
            seed_offset=7,
            notes="pattern B, easy + hard from scratch: incompatible pattern, same score",
        ),
    )
}
MODEL_NAMES: tuple[str, ...] = (
    "student",
    "teacher-a-plus",
    "teacher-b-plus",
    "teacher-a-same",
    "student-plus",
    "student-base",
    "teacher-a-base",
)
assert set(MODEL_NAMES) == set(SPECS)


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
            r["pattern_usage"] = {
                str(p or "other"): round(usage.count(p) / len(usage), 4) for p in (*world.PATTERNS, None)
            }
            info[label] = r
    return info


def _cost(spec: ModelSpec) -> float:
    return spec.steps * spec.batch_size * spec.hidden_size**2


def _chain_cost(name: str, specs: dict[str, ModelSpec], names: list[str]) -> float:
    """Cost of ``name`` plus its most expensive chain of models that continue it."""
    children = [n for n in names if specs[n].init_from == name]
    return _cost(specs[name]) + max((_chain_cost(c, specs, names) for c in children), default=0.0)


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

        bar = tqdm(
            total=sum(specs[n].steps for n in names), desc="opd lab build", unit="step", smoothing=0.05
        )
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending = list(names)
        running: dict = {}
        while pending or running:
            ready = [n for n in pending if specs[n].init_from not in names or specs[n].init_from in results]
            # longest chain of dependent work first, so the last model finishes as early as possible
            for n in sorted(ready, key=lambda n: -_chain_cost(n, specs, names))[: workers - len(running)]:
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
