"""The prompt remedies the recipe calls: template alignment and content alignment (:mod:`opd.prompts`).

:class:`PromptTools` is the seam: :func:`opd.remedies.run.recipe` calls ``align_template`` and
``align_content`` on it and nothing else, so a test (or a user with their own selection) can pass any
object with these two methods. :class:`DefaultPromptTools` calls :mod:`opd.prompts`.
"""

from __future__ import annotations

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
        self, cfg: OPDConfig, out_dir: Path, *, fraction: float, ood_share: float, seed: int
    ) -> dict[str, Any]:
        """Rank ``cfg.prompts`` by teacher–student agreement and write the selection (``fraction`` of the
        pool, ``ood_share`` of it from the rest) as a JSONL file under ``out_dir``. Returns a JSON-able
        dict with at least ``prompts`` (that file) and ``why``."""
        ...


class DefaultPromptTools:
    """The remedies of :mod:`opd.prompts` (``select_template``, ``rank_prompts`` / ``select_prompts``)."""

    def _prompts(self):
        try:
            import opd.prompts as prompts
        except ImportError as e:  # pragma: no cover - depends on the installed version
            raise RuntimeError(
                f"this remedy needs opd.prompts, which this opd version lacks ({e}); leave it out with "
                "remedies=[coldstart]"
            ) from None
        return prompts

    def align_template(self, cfg: OPDConfig, candidates: list[str], out_dir: Path) -> dict[str, Any]:
        prompts = self._prompts()
        selection = prompts.select_template(cfg, list(candidates))
        return _jsonable(selection) | {"template": selection.template}

    def align_content(
        self, cfg: OPDConfig, out_dir: Path, *, fraction: float, ood_share: float, seed: int
    ) -> dict[str, Any]:
        prompts = self._prompts()
        ranking = prompts.rank_prompts(cfg)
        rows = prompts.select_prompts(ranking, fraction=fraction, ood_share=ood_share, seed=seed)
        path = out_dir / "prompts.jsonl"
        prompts.write_prompts(rows, path)
        return {"prompts": str(path), "kept": len(rows), "ranking": _jsonable(ranking)}


def _jsonable(obj: Any) -> dict[str, Any]:
    """A result object's plain fields (dataclass or mapping), for recipe.json."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, dict):
        return {"result": repr(obj)}
    return {k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}
