"""Sharpness-aware minimization and the experiments and Hessian analysis of how overparameterization, sparsity and label noise shape its benefit."""

__version__ = "0.1.0"

from sam_overparam.analysis import analyze_run, hessian_analysis
from sam_overparam.budget import width_for_budget
from sam_overparam.config import AnalysisConfig, DemoConfig, PlotConfig, SweepConfig, TrainConfig
from sam_overparam.experiments import run_demo, summarize_sweep
from sam_overparam.hessian import HessianOperator
from sam_overparam.optim import SAM, frozen_batchnorm_stats
from sam_overparam.registries import MODELS, OPTIMIZERS, register_model, register_optimizer
from sam_overparam.runs import train_in_directory
from sam_overparam.sweep import plot_store, run_sweep_share, sweep_configs
from sam_overparam.train import run_sweep

# The function sam_overparam.train.train is not exported here: the name `train` stays the module.

__all__ = [
    "MODELS",
    "OPTIMIZERS",
    "SAM",
    "AnalysisConfig",
    "DemoConfig",
    "HessianOperator",
    "PlotConfig",
    "SweepConfig",
    "TrainConfig",
    "__version__",
    "analyze_run",
    "frozen_batchnorm_stats",
    "hessian_analysis",
    "plot_store",
    "register_model",
    "register_optimizer",
    "run_demo",
    "run_sweep",
    "run_sweep_share",
    "summarize_sweep",
    "sweep_configs",
    "train_in_directory",
    "width_for_budget",
]
