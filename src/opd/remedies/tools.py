"""The prompt remedies the recipe calls: template alignment and content alignment (:mod:`opd.prompts`).

:class:`PromptTools` is the seam: :func:`opd.remedies.run.recipe` calls ``align_template`` and
``align_content`` on it and nothing else, so a test (or a user with their own selection) can pass any
object with these two methods. :class:`DefaultPromptTools` calls :mod:`opd.prompts`.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

from opd.config import OPDConfig

__all__ = ["DefaultPromptTools", "PromptTools"]


class PromptTools(Protocol):
    def align_template(self, cfg: OPDConfig, candidates: list[str], out_dir: Path) -> dict[str, Any]:
        """Pick the candidate template under which the teacher and student agree most at the start of
        training. Returns a JSON-able dict with at least ``template`` (the chosen one) and ``why``."""
        ...

    def align_content(
        self, cfg: OPDConfig, out_dir: Path, *, num_prompts: int, fraction: float, ood_share: float, seed: int
    ) -> dict[str, Any]:
        """Rank ``num_prompts`` prompts of ``cfg.prompts`` by teacher–student agreement and write the
        selection (``fraction`` of them, ``ood_share`` of those from the rest) as a JSONL file under
        ``out_dir``. Returns a JSON-able dict with at least ``prompts`` (that file) and ``why``."""
        ...


class DefaultPromptTools:
    """The remedies of :mod:`opd.prompts`: ``select_template`` over the candidates as teacher templates,
    and ``rank_prompts`` / ``select_prompts`` / ``write_selection`` on the recipe's prompt pool. Each
    measures on the recipe's models with its prompts' rendering, ``rollouts_per_prompt`` and
    ``max_new_tokens``, and writes its report into ``out_dir``."""

    def _prompts(self):
        try:
            import opd.prompts as prompts
        except ImportError as e:  # pragma: no cover - depends on the installed version
            raise RuntimeError(
                f"this remedy needs opd.prompts, which this opd version lacks ({e}); leave it out with "
                "remedies=[coldstart]"
            ) from None
        return prompts

    def _config(self, cfg: OPDConfig, out_dir: Path, **keys: Any):
        prompts = self._prompts()
        names = {f.name for f in fields(prompts.PromptsConfig)}
        skip = {
            "output_dir",
            "student_dtype",
            "num_prompts",
            "pools",
        }  # opd train's student_dtype is a compute dtype
        values = {k: getattr(cfg, k) for k in names - skip if hasattr(cfg, k)}
        return prompts.PromptsConfig(**values, output_dir=str(out_dir), **keys)

    def align_template(self, cfg: OPDConfig, candidates: list[str], out_dir: Path) -> dict[str, Any]:
        prompts = self._prompts()
        pcfg = self._config(cfg, out_dir)
        selection = prompts.select_template(pcfg, prompts.load_candidates(list(candidates)))
        prompts.write_template_report(selection, out_dir)
        best = selection.best
        return {
            "template": best.teacher_prompt_template,
            "name": best.name,
            "why": f"the best of {len(candidates)} candidate(s): {selection.rule}",
            "measurements": selection.measurements,
        }

    def align_content(
        self, cfg: OPDConfig, out_dir: Path, *, num_prompts: int, fraction: float, ood_share: float, seed: int
    ) -> dict[str, Any]:
        prompts = self._prompts()
        pcfg = self._config(cfg, out_dir, num_prompts=num_prompts)
        ranking = prompts.rank_prompts(pcfg)
        sel = prompts.select_prompts(ranking, fraction=fraction, ood_share=ood_share, seed=seed)
        paths = prompts.write_selection(sel, ranking, out_dir)
        return {
            "prompts": str(paths["selected"]),
            "kept": len(sel.rows),
            "why": f"the {len(sel.aligned)} best-agreeing of {len(ranking.prompts)} measured prompts plus "
            f"{len(sel.ood)} out-of-distribution ones",
            "stats": sel.stats,
        }
