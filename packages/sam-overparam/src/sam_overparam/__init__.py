"""Sharpness-aware minimization and the experiments and Hessian analysis of how overparameterization, sparsity and label noise shape its benefit."""

__version__ = "0.1.0"
