"""Asynchronous pipeline-parallel training with stale gradients, and basis-rotation optimizers that cure the staleness."""

__version__ = "0.1.0"
