"""Training methods, one file each: each exposes ``train(config)``."""
