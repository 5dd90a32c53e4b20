"""Typed, validated configuration of a pruning run.

The reconstruction hyper-parameters follow Shin et al., "Rethinking Pruning Large Language Models:
Benefits and Pitfalls of Reconstruction Error Minimization" (EMNLP 2024, arXiv 2406.15524), Sec. 4:
AdamW (lr 2e-4, weight decay 0, betas (0.9, 0.95), eps 1e-8), linear decay to 0 without warm-up,
batch 8, gradient clipping at 1000, MSE loss, 10 epochs for OPT / 5 for LLaMA, 256 calibration
samples of 1024 tokens. That is the ``"paper"`` preset; ``"cpu"`` scales it to a 2-core machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from recon_prune.methods import DENSE_PATH_TARGET, MASK_METHODS, RECONSTRUCTIONS, MaskMethod, Reconstruction

# Spellings users type; "cr" alone is CR without GP (the window objective replaces per-block BR).
_RECON_ALIASES = {
    "cr": "br+cr",
    "gp": "br+gp",
    "gp+cr": "br+gp+cr",
    "cr+gp": "br+gp+cr",
    "br+cr+gp": "br+gp+cr",
    "gp+br": "br+gp",
    "cr+br": "br+cr",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Targets of a CR window (blocks i-1, i) without GP; with GP the target is always the dense path.
DENSE_WINDOW = "dense-window"  # the dense blocks i-1, i on the sparse-path inputs of block i-1
DENSE_BLOCK_ON_RECONSTRUCTED = "dense-block-on-reconstructed"  # the authors': dense block i after the provisional i-1
CR_TARGETS = (DENSE_WINDOW, DENSE_BLOCK_ON_RECONSTRUCTED)
# Tokens behind each expert's mask statistics (recon_prune.experts): the routed ones, or all (llm-compressor)
ROUTED = "routed"
ALL_TOKENS = "all-tokens"
EXPERT_CALIBRATIONS = (ROUTED, ALL_TOKENS)
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True, kw_only=True)
class ReconstructionHParams:
    """Optimizer settings for BR / GP / CR (see the module docstring for the paper's values)."""

    lr: float
    epochs: int
    batch_size: int
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1000.0


PRESETS = {
    # Paper Sec. 4; epochs are 10 for OPT and 5 otherwise (resolved per model in ``resolve``).
    "paper": {"lr": 2e-4, "epochs": None, "batch_size": 8, "nsamples": 256, "seq_len": 1024},
    # Two CPU cores: 4x fewer samples, half the length, a few epochs at a larger step size.
    "cpu": {"lr": 1e-3, "epochs": 3, "batch_size": 8, "nsamples": 64, "seq_len": 512},
}


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4). Raises ValueError for anything else."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string such as 'unstructured' or '2:4', got {pattern!r}")
    if pattern.strip().lower() == "unstructured":
        return None
    match = _PATTERN.match(pattern)
    if match is None:
        raise ValueError(f"pattern {pattern!r} is malformed; expected 'unstructured' or 'N:M' such as '2:4' or '4:8'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: N:M needs 0 < N < M (prune N of every M weights), got N={n}, M={m}")
    return n, m


def check_device(name: object, field_name: str = "device", *, allow_auto: bool = True) -> None:
    """Raise ValueError unless ``name`` parses as a torch device that exists on this machine."""
    examples = "'auto', 'cpu', 'cuda' or 'cuda:1'" if allow_auto else "'cpu', 'cuda' or 'cuda:1'"
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{field_name} must be a device string such as {examples}, got {name!r}")
    if (allow_auto and name == "auto") or name == "cpu":  # the defaults: valid without importing torch
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{field_name}={name!r} is not a device; expected a device string such as {examples}") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{field_name}={name!r} but CUDA is not available on this machine; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{field_name}={name!r} but this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{field_name}={name!r} but MPS is not available on this machine; use 'cpu' or 'auto'")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{field_name}={name!r}: device type {device.type!r} is not supported; expected {examples}")


def normalize_reconstruction(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"reconstruction must be a string, got {name!r}")
    key = name.strip().lower().replace(" ", "")
    key = _RECON_ALIASES.get(key, key)
    if key not in RECONSTRUCTIONS:
        raise ValueError(
            f"unknown reconstruction {name!r}; expected one of {', '.join(RECONSTRUCTIONS)} (or 'cr' = CR without GP)"
        )
    return key


@dataclass(kw_only=True)
class PruneConfig:
    """What to prune, how, and how to reconstruct.

    Attributes:
        method: a registered mask method (:data:`recon_prune.methods.MASK_METHODS`): ``magnitude``,
            ``wanda`` or ``sparsegpt`` built in. (Default: sparsegpt)
        sparsity: fraction of weights of every linear layer in the decoder blocks set to zero, in
            [0, 1). For an N:M pattern it is N/M and may be left out. (Default: 0.5)
        pattern: ``unstructured`` or ``N:M`` (prune N of every M consecutive input weights per row).
        reconstruction: a registered technique (:data:`recon_prune.methods.RECONSTRUCTIONS`):
            ``none``, ``lr`` (SparseGPT's closed-form update; nothing for magnitude and Wanda),
            ``br``, ``br+gp``, ``br+gp+cr`` or ``br+cr`` (alias ``cr``: CR without GP).
            For SparseGPT every option but ``none`` starts from the LR-updated weights. (Default: br+gp)
        preset: reconstruction/calibration preset, ``cpu`` or ``paper``. (Default: cpu)
        lr, epochs, batch_size, weight_decay, grad_clip: override the preset's value when set.
        nsamples, seq_len: calibration size and length in tokens. :func:`recon_prune.prune` refuses a
            calibration of another shape when they are set; unset, the preset's values are used to
            build calibration and the report records the calibration's actual shape.
        blocksize: SparseGPT column block. (Default: 128)
        percdamp: SparseGPT damping as a fraction of mean(diag H). (Default: 0.01)
        seed: seeds calibration sampling and reconstruction shuffles. (Default: 0)
        device: compute device, ``auto`` = CUDA when present, else CPU; checked on construction
            (it must parse and exist on this machine). (Default: auto)
        offload_device: where the activation buffers and the CR window's idle blocks live. Finished
            blocks go back to the device they were on before the run. (Default: cpu)
        dtype: dtype of the saved model; ``auto`` keeps the model's. Pruning math runs in float32.
        cr_target: what a CR window (blocks ``i-1, i``) trains towards without GP (``br+cr``):
            ``dense-window``, the dense blocks ``i-1, i`` on the sparse-path inputs of block ``i-1``, or
            ``dense-block-on-reconstructed``, the authors' target (rethinking-LLM-pruning): the dense
            block ``i`` on the output of the already reconstructed block ``i-1`` (as trained in the
            previous window). Ignored with GP, whose target is the dense path. (Default: dense-window)
        expert_calibration: which tokens give each expert of a mixture-of-experts layer (fused
            transformers 5 experts) its mask statistics: ``routed``, the tokens the model's own router
            sends it, or ``all-tokens``, every calibration token through every expert, as
            llm-compressor calibrates MoE models. Under ``routed`` an expert that no token reaches is
            calibrated on all tokens and the report says so. The router stays dense. (Default: routed)
    """

    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str = "unstructured"
    reconstruction: str = "br+gp"
    preset: str = "cpu"
    lr: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    nsamples: int | None = None
    seq_len: int | None = None
    blocksize: int = 128
    percdamp: float = 0.01
    seed: int = 0
    device: str = "auto"
    offload_device: str = "cpu"
    dtype: str = "auto"
    cr_target: str = DENSE_WINDOW
    expert_calibration: str = ROUTED

    def __post_init__(self) -> None:
        if self.method not in MASK_METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(MASK_METHODS)}")
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"sparsity={self.sparsity!r} contradicts pattern {self.pattern!r} (which means {implied}); "
                    "leave sparsity out for N:M patterns"
                )
            self.sparsity = implied
            self.pattern = f"{nm[0]}:{nm[1]}"
        elif self.sparsity is None:
            self.sparsity = 0.5
        else:
            self.pattern = "unstructured"
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity!r}")
        self.sparsity = float(self.sparsity)
        self.reconstruction = normalize_reconstruction(self.reconstruction)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, (int, float)) or value < 0 or (name != "weight_decay" and value == 0)
            ):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("epochs", "batch_size", "nsamples", "seq_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize must be a positive integer, got {self.blocksize!r}")
        if nm is not None and self.blocksize % nm[1]:
            raise ValueError(f"blocksize={self.blocksize} must be a multiple of M={nm[1]} for pattern {self.pattern!r}")
        if not self.percdamp >= 0.0:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp!r}")
        if self.cr_target not in CR_TARGETS:
            raise ValueError(f"unknown cr_target {self.cr_target!r}; expected one of {', '.join(CR_TARGETS)}")
        if self.expert_calibration not in EXPERT_CALIBRATIONS:
            raise ValueError(
                f"unknown expert_calibration {self.expert_calibration!r}; expected one of {', '.join(EXPERT_CALIBRATIONS)}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        check_device(self.device, "device", allow_auto=True)
        check_device(self.offload_device, "offload_device", allow_auto=False)

    # ------------------------------------------------------------------ derived
    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def mask_method(self) -> MaskMethod:
        """The registered :class:`~recon_prune.methods.MaskMethod` named by ``method``."""
        return MASK_METHODS.get(self.method)

    @property
    def technique(self) -> Reconstruction:
        """The registered :class:`~recon_prune.methods.Reconstruction` named by ``reconstruction``."""
        return RECONSTRUCTIONS.get(self.reconstruction)

    @property
    def uses_block_training(self) -> bool:
        return self.technique.target is not None

    @property
    def uses_gp(self) -> bool:
        return self.technique.target == DENSE_PATH_TARGET

    @property
    def uses_cr(self) -> bool:
        return self.technique.window == 2

    @property
    def reconstruction_is_a_no_op(self) -> bool:
        """``lr`` is SparseGPT's closed-form OBS update (the spec's LR); magnitude and Wanda have none."""
        technique = self.technique
        return technique.target is None and technique.keeps_weight_update and not self.mask_method.updates_weights

    @property
    def uses_obs_update(self) -> bool:
        """SparseGPT's closed-form weight update (LR) is applied unless reconstruction is none."""
        return self.mask_method.updates_weights and self.technique.keeps_weight_update

    def resolved_nsamples(self) -> int:
        return self.nsamples if self.nsamples is not None else PRESETS[self.preset]["nsamples"]

    def resolved_seq_len(self) -> int:
        return self.seq_len if self.seq_len is not None else PRESETS[self.preset]["seq_len"]

    def hparams(self, model_type: str | None = None) -> ReconstructionHParams:
        preset = PRESETS[self.preset]
        epochs = self.epochs if self.epochs is not None else preset["epochs"]
        if epochs is None:  # paper: 10 epochs for OPT, 5 for LLaMA
            epochs = 10 if model_type == "opt" else 5
        return ReconstructionHParams(
            lr=float(self.lr if self.lr is not None else preset["lr"]),
            epochs=int(epochs),
            batch_size=int(self.batch_size if self.batch_size is not None else preset["batch_size"]),
            weight_decay=float(self.weight_decay if self.weight_decay is not None else 0.0),
            grad_clip=float(self.grad_clip if self.grad_clip is not None else 1000.0),
        )


def _check_count_key(config: object, key: str, *, minimum: int, optional: bool = False) -> None:
    """An integer key of at least ``minimum``; the message names the flag and the config key."""
    value = getattr(config, key)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = {0: "0 or a positive integer", 1: "a positive integer"}.get(minimum, f"at least {minimum}")
        raise ValueError(f"--{key.replace('_', '-')} must be {expected}, got {value!r} (config key {key})")


@dataclass(kw_only=True)
class EvalConfig:
    """What ``recon-prune eval`` measures.

    Attributes:
        dataset: held-out text: ``stdlib`` (test split), ``wikitext2``, ``c4``, ``ptb`` or ``file:PATH``.
            (Default: stdlib)
        seq_len: perplexity chunk length in tokens; unset, the model's recorded pretraining window,
            else its context capped at 4096. (Default: None)
        max_chunks: evaluate at most this many chunks; unset, the whole wikitext2/PTB test set or file,
            256 chunks of C4 (SparseGPT/Wanda), 64 of the stdlib test split. (Default: None)
        tasks: lm-evaluation-harness zero-shot tasks (needs the ``lm-eval`` extra). (Default: none)
    """

    dataset: str = "stdlib"
    seq_len: int | None = None
    max_chunks: int | None = None
    tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ValueError(f"dataset must be a source name such as 'stdlib' or 'file:PATH', got {self.dataset!r}")
        _check_count_key(self, "seq_len", minimum=2, optional=True)
        _check_count_key(self, "max_chunks", minimum=1, optional=True)
        self.tasks = tuple(task.strip() for task in self.tasks if task.strip())


@dataclass(kw_only=True)
class GenerateConfig:
    """What ``recon-prune generate-calibration`` samples from the dense model.

    Attributes:
        count: number of sequences. (Default: 16)
        seq_len: tokens per sequence, at least 6 (longer than the 5-token greedy prefix). (Default: 256)
        seed: seeds the sampling. (Default: 0)
    """

    count: int = 16
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _check_count_key(self, "count", minimum=1)
        _check_count_key(self, "seq_len", minimum=6)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r} (config key seed)")


@dataclass(kw_only=True)
class DemoConfig:
    """The setting of ``recon-prune demo`` (50% unstructured, SparseGPT and Wanda, every reconstruction).

    Attributes:
        nsamples: calibration samples from the stdlib train split. (Default: 32)
        seq_len: calibration sequence length in tokens (at least 6 with self-generated samples, whose
            text starts from a 5-token prefix; else at least 2). (Default: 256)
        eval_chunks: held-out chunks of the stdlib test split. (Default: 64)
        self_generated: add a SparseGPT BR+GP+CR run with this many self-generated samples; 0 skips
            it. (Default: 32)
    """

    nsamples: int = 32
    seq_len: int = 256
    eval_chunks: int = 64
    self_generated: int = 32

    def __post_init__(self) -> None:
        _check_count_key(self, "nsamples", minimum=1)
        _check_count_key(self, "eval_chunks", minimum=1)
        _check_count_key(self, "self_generated", minimum=0)
        _check_count_key(self, "seq_len", minimum=6 if self.self_generated else 2)
