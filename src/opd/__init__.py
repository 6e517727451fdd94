"""opd: on-policy distillation of large language models."""

__version__ = "0.1.0"

__all__ = ["__version__", "train"]


def train(config):
    """Run the training method named by ``config`` (see :func:`opd.methods.opd.train`)."""
    from opd.methods.opd import train as _train

    return _train(config)
