"""Sharpness-aware minimization and the experiments and Hessian analysis of how overparameterization, sparsity and label noise shape its benefit."""

__version__ = "0.1.0"

from sam_overparam.optim import SAM, frozen_batchnorm_stats

__all__ = ["SAM", "__version__", "frozen_batchnorm_stats"]
