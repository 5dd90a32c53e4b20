"""Prune Hugging Face causal LMs (magnitude, Wanda, SparseGPT; unstructured and N:M) with reconstruction error minimization and self-generated calibration data.

Implements Shin et al., "Rethinking Pruning Large Language Models: Benefits and Pitfalls of
Reconstruction Error Minimization" (EMNLP 2024, arXiv 2406.15524).

>>> from recon_prune import PruneConfig, build_calibration, prune
>>> report = prune(model, build_calibration(tokenizer=tok, nsamples=64, seq_len=512), PruneConfig(method="sparsegpt"))
"""

__version__ = "0.1.0"

from recon_prune.calibration import CalibrationData, build_calibration, generate_self_calibration
from recon_prune.config import PruneConfig, ReconstructionHParams, parse_pattern
from recon_prune.driver import PruneReport, prune
from recon_prune.evaluate import perplexity, sparsity_report
from recon_prune.model_adapter import UnsupportedModelError, find_decoder_blocks, find_linears
from recon_prune.sparsegpt import SparseGPT

__all__ = [
    "CalibrationData",
    "PruneConfig",
    "PruneReport",
    "ReconstructionHParams",
    "SparseGPT",
    "UnsupportedModelError",
    "__version__",
    "build_calibration",
    "find_decoder_blocks",
    "find_linears",
    "generate_self_calibration",
    "parse_pattern",
    "perplexity",
    "prune",
    "sparsity_report",
]
