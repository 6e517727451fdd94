"""``opd lab build``: retrain the lab zoo (:mod:`opd.lab.zoo`) from scratch.

Models train in parallel worker processes, one thread each, so the weights do not depend on the number
of cores; the same seed gives bit-identical weights on the same machine and torch build. Each model is
saved with :func:`opd.models.save_model` and evaluated on ``lab:test``; ``build_info.json`` records it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from opd.data import apply_template
from opd.lab import lab_tokenizer, prompt_rows, world
from opd.lab.evaluate import evaluate_model
from opd.lab.train import ModelSpec, train_model
from opd.lab.zoo import MODEL_NAMES, PACKAGE_ZOO, SPECS, weights_sha256
from opd.models import save_model


def _job(name: str, spec: ModelSpec, out_dir: str, seed: int, evaluate: bool, queue=None) -> dict:
    """Train, save and evaluate one model (runs in a worker process)."""
    torch.set_num_threads(1)
    tok = lab_tokenizer()
    init = None
    if spec.init_from is not None:
        init = AutoModelForCausalLM.from_pretrained(Path(out_dir) / spec.init_from, dtype=torch.float32)
    model, log = train_model(spec, tok, seed=seed, init_model=init, progress_queue=queue)
    d = Path(out_dir) / name
    save_model(model, tok, d)
    info = {
        "spec": asdict(spec),
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(log["seconds"], 1),
        "train_tokens": log["tokens"],
        "loss": log["loss"],
        "sha256": weights_sha256(d),
    }
    if evaluate:
        plain = prompt_rows("test")
        rows = [r | {"prompt": apply_template(r["prompt"], spec.prompt_template)} for r in plain]
        runs = [("greedy", 0.0, rows), ("sampled_t1", 1.0, rows)]
        if spec.prompt_template is not None:  # and under the plain prompt it was never trained with
            runs.append(("greedy_plain_prompt", 0.0, plain))
        for label, temp, rows in runs:
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
    output_dir: str | Path | None = None,
    *,
    seed: int = 0,
    only: list[str] | None = None,
    progress: bool = True,
    workers: int | None = None,
    evaluate: bool = True,
    specs: dict[str, ModelSpec] | None = None,
) -> dict:
    """Train the zoo from scratch into ``output_dir`` (default: the package's zoo) and write build_info.json.

    ``only`` restricts the build to some names (a model that continues another, e.g. ``student-plus``,
    reads that one from ``output_dir``, which must then hold it or be built in the same call). ``workers``
    parallel processes (default: min(cpu count, 4)) train one model each, single-threaded. ``specs``
    replaces :data:`SPECS` (tests build reduced models). Returns the build info.
    """
    specs = dict(specs or SPECS)
    names = list(only) if only else list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown lab model(s) {unknown}; available: {', '.join(specs)}")
    out = Path(output_dir) if output_dir is not None else PACKAGE_ZOO
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
    """``opd lab build [--output-dir DIR] [--seed N] [--only NAME ...]`` (for launchers without the main CLI)."""
    p = argparse.ArgumentParser(prog="opd lab build", description=build.__doc__)
    p.add_argument("--output-dir", default=None, help="output directory (default: the package's zoo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help=f"subset of {', '.join(MODEL_NAMES)}")
    a = p.parse_args(argv)
    build(a.output_dir, seed=a.seed, only=a.only)
    return 0
