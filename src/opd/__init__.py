"""opd: on-policy distillation of large language models."""

__version__ = "0.1.0"

__all__ = ["__version__", "recipe", "train"]


def train(config):
    """Run the training method whose config type ``config`` is (:data:`opd.methods.METHODS`), e.g.
    ``opd.train(OPDConfig(...))`` runs :func:`opd.methods.opd.train`. Returns the run summary."""
    # imported here so that ``import opd`` stays light (no torch / transformers until a run starts)
    from opd.methods import method_for

    return method_for(config).train(config)


def recipe(config, **kw):
    """``opd recipe``: diagnose, apply the remedies the diagnosis calls for, train, watch the alerts (the
    next remedy when one stops a run), evaluate and report (:func:`opd.remedies.recipe`; config:
    :class:`opd.remedies.RecipeConfig`). Returns the recipe's state (also ``output_dir/recipe.json``)."""
    from opd.remedies import recipe as run_recipe

    return run_recipe(config, **kw)
