"""Prune Hugging Face causal LMs (magnitude, Wanda, SparseGPT; unstructured and N:M) with reconstruction error minimization and self-generated calibration data."""

__version__ = "0.1.0"
