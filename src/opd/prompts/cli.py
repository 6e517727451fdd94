"""``opd prompts select`` and ``opd prompts template`` (wired into :mod:`opd.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from opd.config_io import help_text, load_config

EPILOG = """\
Configuration keys (set in CONFIG.yaml or as key=value overrides, which win; the models, prompts and
teacher-prompt keys are opd train's):
{keys}
"""

SELECT_EXAMPLES = """
Examples:
  opd prompts select student=lab:student teacher=lab:teacher-a-plus prompts=lab:train num_prompts=200 \\
      rollouts_per_prompt=2 max_new_tokens=64 select_n=100 ood_share=0.1 output_dir=runs/prompts
  opd prompts select configs/prompts.yaml 'pools={easy: lab:train-easy, hard: lab:train-hard}' select_n=1
  opd prompts select student=./base teacher=./teacher prompts=pool.jsonl embedding_model=./bge-small
"""

TEMPLATE_EXAMPLES = """
Candidates file (YAML or JSON): a list of {name, teacher_prompt_template, teacher_system_prompt};
omit both keys for the student's own rendering, e.g.
  - name: plain
  - name: qa
    teacher_prompt_template: "Question: {problem}\\nWork it out one step per line.\\nAnswer:"
  - name: system
    teacher_system_prompt: You are a careful calculator.

Example:
  opd prompts template student=lab:student teacher=lab:teacher-a-qa prompts=lab:train num_prompts=16 \\
      max_new_tokens=64 --candidates configs/candidates/lab_templates.yaml output_dir=runs/template
"""


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``prompts`` command and its two subcommands."""
    from opd.prompts.config import PromptsConfig

    keys = help_text(PromptsConfig)
    p = sub.add_parser(
        "prompts",
        help="teacher-aligned prompts: select prompts by teacher-student agreement, pick the teacher's template",
        description="Teacher-aligned prompts (docs/recipe.md).",
    )
    psub = p.add_subparsers(dest="prompts_command", metavar="PROMPTS_COMMAND")
    for name, helptext, desc, examples in (
        (
            "select",
            "dedup, rank prompts (or pools) by teacher-student agreement and keep the most aligned",
            "Dedup the prompt pool(s), sample student rollouts on a prompt sample, score them with the "
            "teacher, rank prompts (or pools) by overlap ratio, overlap mass and teacher advantage, keep the "
            "most aligned plus an out-of-distribution share; writes OUTPUT_DIR/selected.jsonl, ranking.jsonl "
            "and selection.{json,md}.",
            SELECT_EXAMPLES,
        ),
        (
            "template",
            "measure candidate teacher templates on the same student rollouts and pick the best",
            "Sample student rollouts once; score them with the teacher under each candidate context; report "
            "overlap ratio, masses, teacher advantage, entropy gap and KL per candidate and the best one in "
            "OUTPUT_DIR/template.{json,md}.",
            TEMPLATE_EXAMPLES,
        ),
    ):
        s = psub.add_parser(
            name,
            help=helptext,
            description=desc,
            epilog=EPILOG.format(keys=keys) + examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        s.add_argument("config", nargs="?", help="YAML config file (optional)")
        s.add_argument("overrides", nargs="*", help="key=value overrides")
        if name == "template":
            s.add_argument(
                "--candidates", required=True, help="YAML or JSON list of candidate teacher contexts"
            )
    return p


def run(args, parser: argparse.ArgumentParser) -> int:
    from opd.prompts import PromptsConfig, load_candidates, run_select, run_template

    if args.prompts_command not in ("select", "template"):
        parser.parse_args(["prompts", "--help"])
        return 0
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no YAML file, only overrides
        overrides.insert(0, config)
        config = None
    cfg = load_config(PromptsConfig, config, overrides, command=f"prompts {args.prompts_command}")
    if args.prompts_command == "select":
        res = run_select(cfg)
        st = res["stats"]
        removed = {p: d["removed"] for p, d in res["dedup"].items()}
        print(
            f"opd prompts select: kept {st['kept']} of {st['candidates']} {st['unit']}s ({st['aligned']} aligned + "
            f"{st['ood']} out-of-distribution), {res['rows']} rows; dedup removed {removed}"
        )
        print(f"files: {res['paths']['selected']}, {res['paths']['json']}, {res['paths']['md']}")
        return 0
    candidates = load_candidates(args.candidates)
    sel = run_template(cfg, candidates)
    print(f"opd prompts template: best {sel.best.name!r} ({sel.rule})")
    for m in sel.measurements:
        print(
            f"  {m['name']}: overlap ratio {m['overlap_ratio']:.3f}, mass {m['overlap_mass_student']:.3f}, "
            f"teacher advantage {m['teacher_advantage']:.3f}, entropy gap {m['entropy_gap']:.3f}, "
            f"KL {m['kl']:.3f}, mean rank {m['mean_rank']:.2f}"
        )
    out = Path(cfg.output_dir)
    print(f"reports: {out / 'template.json'}, {out / 'template.md'}")
    return 0
