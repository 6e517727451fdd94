"""``opd eval`` / ``opd grade``: accuracy, response statistics and serving speed of models on benchmarks.

Library layer (``opd compare`` and the CLI call these):

- :func:`evaluate_model(model, benchmarks, settings)` — load one model, render each benchmark's
  prompts exactly as training does (:func:`opd.data.load_prompts` with the DataConfig fields
  ``prompt_template``, ``use_chat_template``, ``chat_template_kwargs``, ``max_prompt_tokens``), sample
  ``samples`` responses per prompt (:func:`opd.evaluate.sample_responses`), grade them
  (:func:`opd.evaluate.grade_responses`), summarise (:func:`summarize`) and time it
  (:func:`opd.serving.measure_speed`);
- :func:`summarize` / :func:`metrics_from_predictions` — the metrics of per-sample prediction records;
  ``opd eval`` and ``opd grade`` compute every accuracy figure through them, so re-grading a
  predictions file with an unchanged grader reproduces the numbers exactly;
- :func:`regrade` — grade saved predictions again (after a grader change);
- :func:`run_eval` (``opd eval``) and :func:`run_grade` (``opd grade``) — the commands: several models
  and benchmarks, ``eval.json`` / ``eval.md`` / ``eval.html`` and ``predictions.jsonl`` in ``output_dir``.

The estimators (avg@k, the unbiased pass@k, standard errors, ``overall``) are :mod:`opd.estimators`'s;
the report tables :mod:`opd.eval_report`'s.

Greedy decoding (``temperature=0``) takes one sample per prompt (k = 1). With fewer than 2 prompts a
standard error is None (undefined).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opd.benchmarks import Benchmark, load_benchmark
from opd.config import DEVICE_PATTERN, ConfigError
from opd.config_io import _coerce_types, build_config, config_values, dtype_errors, load_yaml_text, to_dict
from opd.data import load_prompts
from opd.estimators import _has_answer, metrics_from_predictions, regrade
from opd.eval_report import write_eval_report
from opd.evaluate import grade_responses, sample_responses
from opd.models import load_model, load_tokenizer, prompt_token_cap
from opd.report import write_text_atomic
from opd.rundir import locked_run_dir
from opd.runtime import resolve_device
from opd.serving import measure_speed, model_size
from opd.textfiles import read_utf8

__all__ = [
    "EvalConfig",
    "EvalSettings",
    "Benchmark",
    "evaluate_model",
    "load_benchmark",
    "load_eval_config",
    "read_predictions",
    "run_eval",
    "run_grade",
]

log = logging.getLogger("opd.eval")

TINY_MODEL_PARAMS = 10_000_000
"""Below this many parameters, ``threads = 0`` runs a CPU model with one torch thread."""
PREDICTION_KEYS = (
    "model",
    "benchmark",
    "id",
    "sample",
    "prompt",
    "response",
    "answer",
    "correct",
    "truncated",
    "has_answer",
    "length",
)
"""The fields of one record of ``predictions.jsonl`` (one sampled response)."""


# ---------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------

_GREATER_EQUAL = {
    "samples": 1,
    "max_new_tokens": 1,
    "batch_size": 1,
    "speed_batch_size": 1,
    "speed_new_tokens": 2,
    "speed_repeats": 1,
    "limit": 0,
    "threads": 0,
    "max_prompt_tokens": 1,
}


@dataclass
class EvalSettings:
    """How models are evaluated. The defaults are the study's (avg@16 at temperature 0.7, top-p 0.95,
    7168-token responses); :meth:`quick` is a CPU preset."""

    samples: int = 16
    """Responses sampled per prompt: the n (and k) of avg@k / pass@k. Greedy (temperature=0) takes 1."""
    temperature: float = 0.7
    """Sampling temperature; 0 = greedy (one deterministic response per prompt)."""
    top_p: float = 0.95
    """Nucleus sampling threshold (1.0 = off)."""
    max_new_tokens: int = 7168
    """Maximum response length in tokens; longer responses are cut and counted in truncated_rate."""
    batch_size: int = 64
    """Sequences (prompt x sample rows) per generate call; lower it if memory runs out."""
    speed: bool = True
    """Measure serving speed (tokens/s at batch 1 and speed_batch_size, time to first token, per-token latency)."""
    speed_batch_size: int = 8
    """The batch size of the second throughput figure."""
    speed_new_tokens: int = 128
    """Tokens generated per timed run of the speed measurement."""
    speed_repeats: int = 3
    """Timed runs per speed figure (the median is reported), after one warm-up run."""
    limit: int = 0
    """Evaluate a seeded random sample of this many prompts per benchmark; 0 = all."""
    seed: int = 0
    """Seed of the prompt sample and of the sampling."""
    device: str = "auto"
    """Where the model runs: auto (cuda if torch sees a GPU, else mps, else cpu), cpu, cuda, cuda:N or mps."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16 (bfloat16 on a GPU for models of 1B+ parameters)."""
    threads: int = 0
    """torch CPU threads; 0 = auto: 1 for a model under 10M parameters on the CPU, else the torch default."""
    trust_remote_code: bool = False
    """Allow model repos to run their own Python code. Off unless you trust the source."""
    prompt_template: str | None = None
    """Template applied to the prompt text; ``{problem}`` is replaced by the prompt. None = use as is."""
    use_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (as training does)."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for apply_chat_template, e.g. {enable_thinking: false}."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this many tokens are dropped (counted in n_dropped)."""

    def __post_init__(self) -> None:
        _coerce_types(self)
        errs = [
            f"{key}={getattr(self, key)}: must be >= {low}"
            for key, low in _GREATER_EQUAL.items()
            if getattr(self, key) < low
        ]
        if self.temperature < 0:
            errs.append(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            errs.append(f"top_p={self.top_p}: must be in (0, 1]; 1.0 turns nucleus sampling off")
        errs += dtype_errors(self, ("dtype",))
        if not DEVICE_PATTERN.fullmatch(self.device):
            errs.append(f"device={self.device!r}: choose auto, cpu, cuda, cuda:N or mps")
        if errs:
            raise ConfigError("invalid eval settings:\n  - " + "\n  - ".join(errs))

    @property
    def n(self) -> int:
        """Samples per prompt actually drawn (1 when greedy)."""
        return 1 if self.temperature == 0 else self.samples

    @classmethod
    def quick(cls, **overrides: Any):
        """The CPU preset: 4 samples of at most 512 tokens on 20 prompts per benchmark, a short speed
        test. A smoke-level estimate (wide standard errors), not the study's protocol."""
        return cls(**{**QUICK, **overrides})


QUICK: dict[str, Any] = {
    "samples": 4,
    "max_new_tokens": 512,
    "batch_size": 32,
    "limit": 20,
    "speed_batch_size": 4,
    "speed_new_tokens": 32,
    "speed_repeats": 2,
}
"""The values :meth:`EvalSettings.quick` (``preset=quick``, ``opd eval --quick``) changes."""


@dataclass
class EvalConfig(EvalSettings):
    """``opd eval``: several models on several benchmarks (EvalSettings plus what to run and where)."""

    models: tuple[str, ...] = ()
    """Models: local directories, hub ids (online only), .gguf files or lab:<name> (--model, repeatable)."""
    benchmarks: tuple[str, ...] = ()
    """Benchmarks: file paths, names in data_dir (aime24 -> DATA_DIR/aime24.parquet) or lab:<set> (--benchmark)."""
    data_dir: str = ""
    """Folder of benchmark files for benchmarks given by name (--data-dir)."""
    prompt_field: str = "auto"
    """Field holding the prompt in every benchmark file; 'auto' tries prompt/problem/question/..."""
    answer_field: str = "auto"
    """Field holding the ground truth (dotted paths allowed); 'auto' tries reward_model.ground_truth/answer/..."""
    output_dir: str = "runs/eval"
    """Where eval.json, eval.md, eval.html and predictions.jsonl are written (--output-dir)."""
    preset: str = "study"
    """study (the defaults) or quick (EvalSettings.quick: a CPU-sized run; keys you set still win; --quick)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        for key in ("models", "benchmarks"):  # one name given as a plain string
            if isinstance(getattr(self, key), str):
                value = getattr(self, key)
                setattr(self, key, value if value.startswith("[") else (value,) if value else ())
        super().__post_init__()
        if self.preset not in ("study", "quick"):
            raise ConfigError(f"preset={self.preset!r}: choose study or quick")

    def check_runnable(self) -> None:
        """The keys a run needs (not needed to print help)."""
        if not self.models or not self.benchmarks:
            raise ConfigError(
                "give at least one model and one benchmark, e.g. opd eval --model lab:student --benchmark "
                "lab:test --quick (or models=[...] benchmarks=[...])"
            )

    def settings(self) -> EvalSettings:
        """The :class:`EvalSettings` part of this config."""
        names = {f.name for f in dataclasses.fields(EvalSettings)}
        return EvalSettings(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def load_eval_config(
    path: str | Path | None = None,
    overrides: list[str] | dict | None = None,
    *,
    models: Sequence[str] = (),
    benchmarks: Sequence[str] = (),
    data_dir: str | None = None,
    output_dir: str | None = None,
    quick: bool = False,
) -> EvalConfig:
    """YAML file (optional) + ``key=value`` overrides + the ``opd eval`` flags → :class:`EvalConfig`.

    ``--model`` / ``--benchmark`` flags are appended to the ``models`` / ``benchmarks`` keys; with
    ``preset=quick`` (or ``quick``) the values of :data:`QUICK` fill every key not set explicitly.
    """
    values = config_values(path, overrides)
    for key, extra in (("models", models), ("benchmarks", benchmarks)):
        if extra:
            have = values.get(key, ())
            have = [have] if isinstance(have, str) and not have.startswith("[") else have
            if isinstance(have, str):
                have = load_yaml_text(have, key) or []
            values[key] = (*have, *extra)
    if data_dir is not None:
        values["data_dir"] = data_dir
    if output_dir is not None:
        values["output_dir"] = output_dir
    if quick:
        values["preset"] = "quick"
    if values.get("preset") == "quick":
        values = {**QUICK, **values}
    return build_config(EvalConfig, values, command="eval")


# ---------------------------------------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------------------------------------


def evaluate_model(
    model: str, benchmarks: list[Benchmark], settings: EvalSettings, *, progress: bool = True
) -> dict[str, Any]:
    """Evaluate ``model`` on ``benchmarks`` (module docstring), each limited to ``settings.limit`` prompts
    (:meth:`~opd.benchmarks.Benchmark.subset`: a no-op on a benchmark loaded with the same limit and seed).
    Returns a JSON-able dict:

    ``model``, ``params``, ``bytes`` (of the weights as loaded), ``benchmarks`` (``{name: metrics}``, the
    keys of :func:`summarize` plus ``n_dropped``: prompts over ``max_prompt_tokens``), ``overall`` (the
    same over all prompts), ``speed`` (:func:`opd.serving.measure_speed`, or None when
    ``settings.speed`` is off) and ``predictions`` (one record per response, :data:`PREDICTION_KEYS`).
    """
    if not benchmarks:
        raise ValueError("evaluate_model: no benchmarks; load some with load_benchmark(spec, data_dir)")
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluate_model: benchmark names repeat ({names}); give each benchmark once")
    threads = torch.get_num_threads()
    try:
        return _evaluate_model(model, benchmarks, settings, progress)
    finally:
        torch.set_num_threads(threads)


def _evaluate_model(
    model: str, benchmarks: list[Benchmark], settings: EvalSettings, progress: bool
) -> dict[str, Any]:
    device = resolve_device(settings.device)
    tok = load_tokenizer(model, trust_remote_code=settings.trust_remote_code)
    lm = load_model(model, dtype=settings.dtype, trust_remote_code=settings.trust_remote_code, device=device)
    lm.eval()
    params, nbytes = model_size(lm)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    elif params < TINY_MODEL_PARAMS and device.type == "cpu":
        torch.set_num_threads(1)
    max_prompt_tokens, cap_why = prompt_token_cap(settings.max_prompt_tokens, settings.max_new_tokens, lm, lm)
    n = settings.n

    predictions: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    first_prompt: list[int] | None = None
    for bench in benchmarks:
        bench = bench.subset(settings.limit, settings.seed)
        prompts = load_prompts(
            bench.name,
            tok,
            prompt_field="prompt",
            answer_field="answer",
            prompt_template=settings.prompt_template,
            use_chat_template=settings.use_chat_template,
            chat_template_kwargs=settings.chat_template_kwargs,
            max_prompt_tokens=max_prompt_tokens,
            max_prompt_tokens_why=cap_why,
            rows=bench.rows,
        )
        dropped[bench.name] = prompts.dropped_overlong
        examples = prompts.examples
        if not any("\\boxed" in e.rendered for e in examples):
            log.warning(
                "benchmark %s: no prompt asks for a \\boxed{} answer, and the grader reads only the last "
                "\\boxed{}: set prompt_template (e.g. '{problem} Please reason step by step, and put your "
                "final answer within \\boxed{}.') or expect a high no_answer_rate",
                bench.name,
            )
        if first_prompt is None:
            first_prompt = examples[0].input_ids
        gens = sample_responses(
            lm,
            tok,
            [e.input_ids for e in examples],
            n=n,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            seed=settings.seed,
            progress=progress,
            desc=f"{model} on {bench.name}",
        )
        answers = [e.answer for e in examples for _ in range(n)]
        correct = grade_responses(tok, gens.responses, answers)
        for row, ids in enumerate(gens.responses):
            ex = examples[row // n]
            text = tok.decode(ids, skip_special_tokens=True)
            predictions.append(
                {
                    "model": model,
                    "benchmark": bench.name,
                    "id": bench.rows[ex.meta["row"]]["id"],
                    "sample": row % n,
                    "prompt": ex.text,
                    "response": text,
                    "answer": ex.answer,
                    "correct": bool(correct[row]),
                    "truncated": gens.truncated[row],
                    "has_answer": _has_answer(text),
                    "length": len(ids),
                }
            )

    metrics = metrics_from_predictions(predictions)[model]
    for name, m in metrics["benchmarks"].items():
        m["n_dropped"] = dropped[name]
    metrics["overall"]["n_dropped"] = sum(dropped.values())
    speed = None
    if settings.speed:
        assert first_prompt is not None
        speed = measure_speed(
            lm,
            tok,
            first_prompt,
            batch_size=settings.speed_batch_size,
            new_tokens=settings.speed_new_tokens,
            repeats=settings.speed_repeats,
            progress=progress,
        )
    return {
        "model": model,
        "params": params,
        "bytes": nbytes,
        "benchmarks": metrics["benchmarks"],
        "overall": metrics["overall"],
        "speed": speed,
        "predictions": predictions,
    }


# ---------------------------------------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------------------------------------


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """``opd eval``: every model on every benchmark; writes ``eval.json`` (settings and each model's
    result without its predictions), ``eval.md``, ``eval.html`` and ``predictions.jsonl`` into
    ``config.output_dir``. Returns the content of ``eval.json``."""
    config.check_runnable()
    data_dir = config.data_dir or None
    benchmarks = [
        load_benchmark(
            spec,
            data_dir,
            prompt_field=config.prompt_field,
            answer_field=config.answer_field,
            limit=config.limit,
            seed=config.seed,
        )
        for spec in config.benchmarks
    ]
    settings = config.settings()
    models = {f"model {i}": m for i, m in enumerate(config.models)}
    data = {f"benchmark {b.name}": b.path for b in benchmarks if b.path}
    with locked_run_dir(config.output_dir, models=models, data=data, key="output_dir"):
        out = Path(config.output_dir)
        results, predictions = [], []
        for model in config.models:
            res = evaluate_model(model, benchmarks, settings, progress=config.progress)
            predictions += res.pop("predictions")
            results.append(res)
        write_predictions(out / "predictions.jsonl", predictions)
        summary = {
            "config": to_dict(config),
            "benchmarks": {b.name: {"path": b.path, "rows": len(b.rows)} for b in benchmarks},
            "models": results,
        }
        write_text_atomic(out / "eval.json", json.dumps(summary, indent=2) + "\n")
        write_eval_report(out / "eval", "opd eval", summary)
    return summary


def write_predictions(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """One JSON object per line (:data:`PREDICTION_KEYS`), written atomically."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``predictions.jsonl`` written by ``opd eval`` (each must have :data:`PREDICTION_KEYS`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"predictions file {str(p)!r} not found; pass the predictions.jsonl that opd eval wrote"
        )
    records = []
    for lineno, line in enumerate(read_utf8(p).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{p}: line {lineno} is not valid JSON ({e.msg}); is it opd eval's output?"
            ) from e
        missing = (
            [k for k in PREDICTION_KEYS if k not in rec] if isinstance(rec, dict) else list(PREDICTION_KEYS)
        )
        if missing:
            raise ValueError(
                f"{p}: line {lineno} lacks field(s) {missing}; pass a predictions.jsonl written by opd eval"
            )
        records.append(rec)
    if not records:
        raise ValueError(f"{p}: no predictions; pass a predictions.jsonl written by opd eval")
    return records


def run_grade(
    predictions: str | Path, output_dir: str | Path | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """``opd grade``: re-grade a ``predictions.jsonl`` with the current grader and write ``grade.json``,
    ``grade.md``, ``grade.html`` and the re-graded ``predictions.regraded.jsonl`` into ``output_dir``
    (default: the predictions file's folder). Returns the content of ``grade.json``: per model the
    accuracy metrics of ``opd eval`` (speed and size are not re-measured) and ``changed``, the number of
    responses whose verdict differs from the file's."""
    records = read_predictions(predictions)
    fresh = regrade(records, progress=progress)
    changed = sum(a["correct"] != b["correct"] for a, b in zip(records, fresh, strict=True))
    metrics = metrics_from_predictions(fresh)
    out = Path(output_dir) if output_dir is not None else Path(predictions).parent
    summary = {
        "predictions": str(predictions),
        "changed": changed,
        "models": [
            {"model": m, "params": None, "bytes": None, **v, "speed": None} for m, v in metrics.items()
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.regraded.jsonl", fresh)
    write_text_atomic(out / "grade.json", json.dumps(summary, indent=2) + "\n")
    write_eval_report(out / "grade", "opd grade", summary)
    return summary
