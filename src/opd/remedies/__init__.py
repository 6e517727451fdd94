"""``opd recipe``: diagnose → choose remedies → run → watch the alerts → evaluate → report (docs/recipe.md).

- :mod:`opd.remedies.choose`: which remedies, a pure function of the diagnosis (:func:`choose_remedies`);
- :mod:`opd.remedies.config`: :class:`RecipeConfig` (``opd coldstart``'s keys plus the recipe's);
- :mod:`opd.remedies.tools`: the seam to the template and content remedies (:mod:`opd.prompts`);
- :mod:`opd.remedies.run`: :func:`recipe`, the run directory and resume;
- :mod:`opd.remedies.report`: report.md / report.html / curves.png.

``opd.recipe(config)`` is :func:`recipe`.
"""

from opd.remedies.choose import (
    COLDSTART,
    CONTENT,
    REMEDY_NAMES,
    TEMPLATE,
    Remedy,
    RemedyPlan,
    choose_remedies,
    next_remedy,
)
from opd.remedies.config import RecipeConfig
from opd.remedies.run import recipe
from opd.remedies.tools import DefaultPromptTools, PromptTools

__all__ = [
    "COLDSTART",
    "CONTENT",
    "REMEDY_NAMES",
    "TEMPLATE",
    "DefaultPromptTools",
    "PromptTools",
    "RecipeConfig",
    "Remedy",
    "RemedyPlan",
    "choose_remedies",
    "next_remedy",
    "recipe",
]
