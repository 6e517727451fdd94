"""Command line: ``opd <command>``. Each command builds a typed config and calls the same function the
Python API exposes (``opd train`` → :func:`opd.methods.opd.train`). Training methods get their
subcommands from the registry :data:`opd.methods.METHODS` (one line per method)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from opd.compare import CompareConfig, RunSpec, load_compare_config, run_compare
from opd.config import ConfigError, OPDConfig
from opd.config_io import help_text, load_config
from opd.diagnose import DiagnoseConfig, DiagnoseThresholds, diagnose
from opd.eval_report import accuracy_rows
from opd.evaluation import EvalConfig, load_eval_config, run_eval, run_grade
from opd.lab import zoo
from opd.lab.build import build as build_zoo
from opd.lab.demo import run_demo
from opd.methods import METHODS, Method
from opd.prompts import cli as prompts_cli
from opd.remedies import RecipeConfig, recipe
from opd.report import markdown_table
from opd.rundir import RunInterrupted

METHOD_EPILOG = """\
Configuration keys (set in CONFIG.yaml or as key=value overrides, which win):
{keys}
"""

TRAIN_EXAMPLES = """
Examples:
  opd train configs/lab.yaml steps=50
  opd train student=lab:student teacher=lab:teacher-a-plus prompts=lab:train max_new_tokens=96 output_dir=runs/x
"""


DIAGNOSE_EPILOG = """\
Verdicts: go | go-after-remedy (remedy named: off-policy cold start, teacher-aligned template or
prompts) | no-go (the teacher adds nothing the student can learn) | inconclusive (most responses hit
max_new_tokens: rerun with a larger one). Exit status 0 for every verdict.

Configuration keys (set in CONFIG.yaml or as key=value overrides, which win; the models and prompts
keys are opd train's):
{keys}

Decision thresholds (thresholds={{name: value, ...}}):
{thresholds}

Examples:
  opd diagnose student=lab:student teacher=lab:teacher-a-plus prompts=lab:test output_dir=runs/diag
  opd diagnose student=Qwen/Qwen3-1.7B-Base teacher=./my-teacher prompts=data/math.jsonl \\
      num_prompts=32 rollouts_per_prompt=2 max_new_tokens=2048 teacher_dtype=bfloat16 batch_size=8 \\
      'thresholds={{overlap_ratio_min: 0.5}}'
"""


EVAL_EPILOG = """\
Numbers (docs/evaluation.md): avg@k and pass@k (unbiased, Chen et al. 2021) per benchmark and overall,
with standard errors over prompts; mean response length, truncated and no-answer rates; model size and
serving speed (tokens/s at batch 1 and speed_batch_size, time to first token, per-token latency).
Writes OUTPUT_DIR/eval.{{json,md,html}} and predictions.jsonl (re-grade it with `opd grade`).

Configuration keys (set in CONFIG.yaml or as key=value overrides; the flags set models, benchmarks,
data_dir, output_dir and preset):
{keys}

Examples:
  opd eval --model lab:student --benchmark lab:test --quick --output-dir runs/eval-lab
  opd eval --model ./run/final --model Qwen/Qwen3-1.7B --benchmark aime24 --benchmark amc23 \\
      --data-dir data/benchmarks dtype=bfloat16 --output-dir runs/eval
"""


RECIPE_EPILOG = """\
What it does (docs/recipe.md, "opd recipe"): opd diagnose → remedies from the verdict (none for go; cold
start for incompatible thinking patterns; template alignment for a template mismatch when
template_candidates are given; content alignment when the overlap is low on part of the pool; refused
for no-go) → the run (opd train or opd coldstart) with the failure-signature alerts watched: an alert
stops it and the next remedy is applied, at most max_remedies in all → evaluation → diagnosis of the
result → OUTPUT_DIR/report.{{md,html}}, curves.png, recipe.json. Exit status 0, or 3 when refused.

Configuration keys (opd coldstart's, then the recipe's own):
{keys}

Examples:
  opd recipe configs/recipe_lab.yaml
  opd recipe configs/recipe_lab.yaml teacher=lab:teacher-a-plus output_dir=runs/recipe-a-plus
  opd recipe configs/recipe_lab.yaml resume=true      # continue where it stopped
"""


COMPARE_EPILOG = """\
Compare keys (set in CONFIG.yaml or as key=value overrides, which win):
{keys}

Each entry of runs:
{run_keys}

Example:
  opd compare configs/compare_lab.yaml seeds=[0,1,2] output_dir=runs/compare-3seeds
"""


def _config_parser(sub, name: str, epilog: str, **kw) -> argparse.ArgumentParser:
    """A subcommand that takes an optional YAML file and key=value overrides (``opd train``, ``opd diagnose``)."""
    p = sub.add_parser(name, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


def _method_parser(sub, method: Method) -> argparse.ArgumentParser:
    """A training method's subcommand (from :data:`opd.methods.METHODS`)."""
    examples = TRAIN_EXAMPLES if method.config is OPDConfig else ""
    p = _config_parser(
        sub,
        method.command,
        METHOD_EPILOG.format(keys=help_text(method.config)) + examples,
        help=method.help,
        description=method.description,
    )
    p.set_defaults(method=method)
    return p


def _load(cls: type, args):
    """The config of a ``_config_parser`` command: the YAML file (if any) plus the key=value overrides."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no YAML file, only overrides
        overrides.insert(0, config)
        config = None
    return load_config(cls, config, overrides, command=args.command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd",
        description="opd: on-policy distillation of LLMs (engine, diagnosis, lab). "
        "Run `opd <command> --help` for each command's options.",
        epilog="OPD config keys (opd train):\n" + help_text(OPDConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error instead of one line (or set OPD_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for method in METHODS:
        _method_parser(sub, method)
    _config_parser(
        sub,
        "diagnose",
        DIAGNOSE_EPILOG.format(keys=help_text(DiagnoseConfig), thresholds=help_text(DiagnoseThresholds)),
        help="pre-flight go/no-go: will OPD of this student toward this teacher work?",
        description="Sample student rollouts on a prompt sample, score them with both models and report "
        "condition (i) (compatible thinking patterns), condition (ii) (new capability) and a verdict, with "
        "evidence, in OUTPUT_DIR/diagnosis.{json,md,html}.",
    )
    _config_parser(
        sub,
        "recipe",
        RECIPE_EPILOG.format(keys=help_text(RecipeConfig)),
        help="diagnose, apply the remedy the diagnosis calls for, train, watch the alerts, evaluate, report",
        description="The recipe for a pair: diagnose it, choose remedies from the verdict, run OPD (or the "
        "cold start then OPD), escalate to the next remedy when a failure-signature alert fires, evaluate "
        "and write one report.",
    )
    e = _config_parser(
        sub,
        "eval",
        EVAL_EPILOG.format(keys=help_text(EvalConfig)),
        help="accuracy (avg@k, pass@k), response statistics and serving speed of models on benchmarks",
        description="Evaluate every --model on every --benchmark with the study's sampling (avg@16, T=0.7, "
        "top-p 0.95) or the --quick CPU preset.",
    )
    e.add_argument("--model", action="append", default=[], help="a model to evaluate (repeatable)")
    e.add_argument(
        "--benchmark", action="append", default=[], help="a benchmark path, name or lab:<set> (repeatable)"
    )
    e.add_argument("--data-dir", default=None, help="folder of benchmark files named by --benchmark NAME")
    e.add_argument("--output-dir", default=None, help="output directory (output_dir)")
    e.add_argument("--quick", action="store_true", help="the CPU preset (preset=quick)")
    g = sub.add_parser("grade", help="re-grade an opd eval predictions.jsonl and report the same metrics")
    g.add_argument("predictions", help="predictions.jsonl written by opd eval")
    g.add_argument(
        "--output-dir", default=None, help="output directory (default: the predictions file's folder)"
    )
    g.add_argument("--no-progress", action="store_true")
    _config_parser(
        sub,
        "compare",
        COMPARE_EPILOG.format(keys=help_text(CompareConfig), run_keys=help_text(RunSpec)),
        help="train several methods at equal compute, evaluate them and the teacher, one report",
        description="Run (or collect finished runs of) several training methods from the same student, "
        "prompts and compute budget; evaluate them, the initial student and the teacher(s); write "
        "OUTPUT_DIR/report.{md,html} with PNG plots and compare.json.",
    )
    d = sub.add_parser("demo", help="the main job: OPD end to end on CPU-sized models, with a report")
    d.add_argument("--smoke", action="store_true", help="a reduced, fast version (CI)")
    d.add_argument("--output-dir", default=None, help="output directory (default runs/demo-<time>)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--steps", type=int, default=None, help="OPD steps per run (default: the demo's own)")
    d.add_argument("--no-progress", action="store_true")
    st = sub.add_parser(
        "serve-teacher",
        help="serve a teacher model over HTTP for `opd train teacher=http://host:port` (needs opd[serve])",
        description="Score token-id batches for OPD training on another machine (docs/serve.md). The bearer "
        "token can also come from the OPD_TEACHER_TOKEN environment variable (kept out of the process list).",
    )
    st.add_argument(
        "--model", required=True, help="the teacher: a directory, .gguf file, hub id or lab:<name>"
    )
    st.add_argument("--port", type=int, default=8000)
    st.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    st.add_argument(
        "--token", default=None, help="require Authorization: Bearer TOKEN (or OPD_TEACHER_TOKEN)"
    )
    st.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    st.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    st.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body (413 above it)")
    lab = sub.add_parser("lab", help="the model organism: build the zoo, list it")
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND")
    b = lab_sub.add_parser("build", help="train the lab zoo from scratch (fixed seeds)")
    b.add_argument(
        "--output-dir", default=None, help="where to write the zoo (default: the package's zoo folder)"
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--only", nargs="*", default=None, help="build only these models")
    lab_sub.add_parser("list", help="list zoo models and lab prompt sets")
    prompts_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[%(name)s] %(levelname)s %(message)s",
    )
    try:
        if getattr(args, "method", None) is not None:
            return _cmd_method(args, args.method)
        if args.command == "demo":
            run_demo(
                smoke=args.smoke,
                output_dir=args.output_dir,
                seed=args.seed,
                steps=args.steps,
                progress=not args.no_progress,
            )
            return 0
        if args.command == "diagnose":
            return _cmd_diagnose(args)
        if args.command == "compare":
            return _cmd_compare(args)
        if args.command == "recipe":
            return _cmd_recipe(args)
        if args.command == "lab":
            return _cmd_lab(args, parser)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "grade":
            return _cmd_grade(args)
        if args.command == "serve-teacher":
            return _cmd_serve_teacher(args)
        if args.command == "prompts":
            return prompts_cli.run(args, parser)
        parser.print_help()
        return 0
    except ConfigError as e:
        if _debug(args):
            raise
        print(f"opd: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError) as e:
        if _debug(args):
            raise
        print(f"opd: error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        print(f"opd: {e.message()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one outside a training loop
        if _debug(args):
            raise
        what = f" ({e.args[0]})" if e.args else " (KeyboardInterrupt)"
        print(f"opd: aborted{what}", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permission denied, ... on a file opd reads or writes
        if _debug(args):
            raise
        print(f"opd: error: {e}", file=sys.stderr)
        return 1


def _debug(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("OPD_DEBUG", "") not in ("", "0")


def _cmd_method(args, method: Method) -> int:
    summary = method.train(_load(method.config, args))
    if summary.get("rank", 0) == 0:  # multi-process: rank 0 reports (it wrote the final model)
        print(f"opd: done: {summary['steps_done']} steps, final model in {summary['final_model']}")
    return 0


def _cmd_serve_teacher(args) -> int:
    from opd.remote.server import serve  # FastAPI / uvicorn: the optional extra opd[serve]

    serve(
        args.model,
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get("OPD_TEACHER_TOKEN") or None,
        dtype=args.dtype,
        device=args.device,
        max_request_mb=args.max_request_mb,
    )
    return 0


def _cmd_diagnose(args) -> int:
    """Run, print the verdict and where the reports are; exit status 0 for any verdict."""
    cfg = _load(DiagnoseConfig, args)
    result = diagnose(cfg)
    remedy = f" (remedy: {', '.join(result['remedies'])})" if result["remedies"] else ""
    print(f"opd diagnose: verdict {result['verdict']}{remedy}")
    for r in result["reasons"]:
        print(f"  - {r}")
    out = Path(cfg.output_dir)
    print(f"reports: {out / 'diagnosis.json'}, {out / 'diagnosis.md'}, {out / 'diagnosis.html'}")
    return 0


def _cmd_recipe(args) -> int:
    """Run the recipe; print what it decided and where the report is. Exit status 3 when refused."""
    cfg = _load(RecipeConfig, args)
    state = recipe(cfg)
    before = state["diagnosis"]["before"]
    print(
        f"opd recipe: diagnosis {before['verdict']}"
        + (f" ({', '.join(before['remedies'])})" if before["remedies"] else "")
    )
    if state["status"] == "refused":
        print(f"opd recipe: refused: {state['refused']}")
    else:
        for a in state["attempts"]:
            names = ", ".join(r["name"] for r in a["remedies"]) or "no remedy"
            stop = (
                f", stopped by {', '.join(a['alerts'])} at step {a['stopped_by_alert']}"
                if a["stopped_by_alert"]
                else ""
            )
            print(f"  attempt {a['attempt']}: {names}: {a['method']}, {a['steps_done']} OPD steps{stop}")
        ev = state["evaluation"]
        if ev["final"] is not None and ev["student"] is not None:
            print(f"  accuracy: {ev['student']:.3f} (student) -> {ev['final']:.3f} (final model)")
        print(f"opd recipe: final model in {state['final_model']}")
    out = Path(cfg.output_dir)
    print(f"report: {out / 'report.md'}, {out / 'report.html'}")
    return 3 if state["status"] == "refused" else 0


def _cmd_compare(args) -> int:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no YAML file, only overrides
        overrides.insert(0, config)
        config = None
    if config is None and not overrides:
        raise ConfigError(
            "opd compare needs a compare config: `opd compare CONFIG.yaml [key=value ...]` "
            "(configs/compare_lab.yaml is an example; `opd compare --help` lists the keys)"
        )
    run_compare(load_compare_config(config, overrides))
    return 0


def _cmd_eval(args) -> int:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no YAML file, only overrides
        overrides.insert(0, config)
        config = None
    cfg = load_eval_config(
        config,
        overrides,
        models=args.model,
        benchmarks=args.benchmark,
        data_dir=args.data_dir,
        output_dir=args.output_dir,
        quick=args.quick,
    )
    summary = run_eval(cfg)
    _print_accuracy(summary["models"])
    out = Path(cfg.output_dir)
    print(
        f"reports: {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.html'}; {out / 'predictions.jsonl'}"
    )
    return 0


def _cmd_grade(args) -> int:
    summary = run_grade(args.predictions, args.output_dir, progress=not args.no_progress)
    print(f"opd grade: {summary['changed']} response(s) changed verdict")
    _print_accuracy(summary["models"])
    out = Path(args.output_dir) if args.output_dir else Path(args.predictions).parent
    print(f"reports: {out / 'grade.json'}, {out / 'grade.md'}, {out / 'grade.html'}")
    return 0


def _print_accuracy(models: list[dict]) -> None:
    headers, rows = accuracy_rows(models)
    print(markdown_table(rows, headers), end="")


def _cmd_lab(args, parser) -> int:
    if args.lab_command == "build":
        build_zoo(output_dir=args.output_dir, seed=args.seed, only=args.only)
        return 0
    if args.lab_command == "list":
        for name in zoo.MODEL_NAMES:
            print(f"lab:{name}")
        return 0
    parser.parse_args(["lab", "--help"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
