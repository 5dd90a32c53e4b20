"""Concept bottleneck models and test-time intervention: selection criteria, levels, costs, and synthetic data from causal graphs."""

__version__ = "0.1.0"
