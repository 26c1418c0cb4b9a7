"""packratd: a daemon serving PyTorch models on CPU, one pinned worker per model instance."""

__version__ = "0.1.0"
