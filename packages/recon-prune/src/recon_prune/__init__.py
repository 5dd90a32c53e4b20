"""Prune Hugging Face causal LMs (magnitude, Wanda, SparseGPT; unstructured and N:M) with reconstruction error minimization and self-generated calibration data.

Implements Shin et al., "Rethinking Pruning Large Language Models: Benefits and Pitfalls of
Reconstruction Error Minimization" (EMNLP 2024, arXiv 2406.15524).

>>> from recon_prune import PruneConfig, build_calibration, prune
>>> report = prune(model, build_calibration(tokenizer=tok, nsamples=64, seq_len=512), PruneConfig(method="sparsegpt"))
>>> from recon_prune import oneshot  # llm-compressor's shape: prune, save, return the model
>>> model = oneshot("stdlib-tiny", "stdlib", {"pattern": "2:4"}, output_dir="pruned")
"""

__version__ = "0.1.0"

# Names are imported on first use (PEP 562), so the console script can refuse a bad argument or
# output directory in a fraction of a second instead of first importing torch and transformers.
_EXPORTS = {
    "CalibrationData": "recon_prune.calibration",
    "build_calibration": "recon_prune.calibration",
    "generate_self_calibration": "recon_prune.calibration",
    "DemoConfig": "recon_prune.config",
    "EvalConfig": "recon_prune.config",
    "GenerateConfig": "recon_prune.config",
    "PruneConfig": "recon_prune.config",
    "ReconstructionHParams": "recon_prune.config",
    "parse_pattern": "recon_prune.config",
    "oneshot": "recon_prune.api",
    "SPARSITY_RECORD_KEY": "recon_prune.deploy",
    "sparsity_record": "recon_prune.deploy",
    "to_semi_structured": "recon_prune.deploy",
    "prune": "recon_prune.driver",
    "heldout_ids": "recon_prune.evaluate",
    "perplexity": "recon_prune.evaluate",
    "sparsity_report": "recon_prune.evaluate",
    "UnsupportedModelError": "recon_prune.model_adapter",
    "find_decoder_blocks": "recon_prune.model_adapter",
    "find_linears": "recon_prune.model_adapter",
    "MASK_METHODS": "recon_prune.methods",
    "RECONSTRUCTIONS": "recon_prune.methods",
    "MaskMethod": "recon_prune.methods",
    "Reconstruction": "recon_prune.methods",
    "PruneReport": "recon_prune.report",
    "SparseGPT": "recon_prune.sparsegpt",
    "load_model_and_tokenizer": "recon_prune.tiny_model",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'recon_prune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "MASK_METHODS",
    "RECONSTRUCTIONS",
    "SPARSITY_RECORD_KEY",
    "CalibrationData",
    "DemoConfig",
    "EvalConfig",
    "GenerateConfig",
    "MaskMethod",
    "PruneConfig",
    "PruneReport",
    "Reconstruction",
    "ReconstructionHParams",
    "SparseGPT",
    "UnsupportedModelError",
    "__version__",
    "build_calibration",
    "find_decoder_blocks",
    "find_linears",
    "generate_self_calibration",
    "heldout_ids",
    "load_model_and_tokenizer",
    "oneshot",
    "parse_pattern",
    "perplexity",
    "prune",
    "sparsity_record",
    "sparsity_report",
    "to_semi_structured",
]
