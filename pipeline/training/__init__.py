"""Training and evaluation: patch datasets, losses, fitting, cross-validation, baselines, metrics."""
