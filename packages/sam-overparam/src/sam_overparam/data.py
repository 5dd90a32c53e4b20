"""Offline data: mnist1d generated locally, symmetric label noise, teacher-student regression.

* mnist1d (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024) is generated
  with ``mnist1d.data.make_dataset`` from its default argument object, with our own sample count
  and seed. ``get_dataset`` is never called: it downloads first.
* Symmetric label noise (Shin et al., Sec. 4.2; the usual definition of e.g. Zhang et al. 2017):
  an exact fraction of training labels is replaced by a different class drawn uniformly.
* Teacher-student regression: targets are the outputs of a random one-hidden-layer ReLU teacher,
  so any student at least as wide as the teacher can interpolate exactly (the interpolation
  assumption of the paper's convergence result, Sec. 5).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from sam_overparam.models import ReLUNet1D

log = logging.getLogger(__name__)

MNIST1D_LENGTH = 40
MNIST1D_CLASSES = 10


@dataclass(kw_only=True)
class Split:
    """Tensors of one dataset: ``x_train``, ``y_train``, ``x_test``, ``y_test``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None = None
    noisy: torch.Tensor | None = None  # which training labels were corrupted

    def describe(self) -> dict[str, object]:
        return {
            "num_train": len(self.y_train),
            "num_test": len(self.y_test),
            "input_shape": list(self.x_train.shape[1:]),
            "num_classes": self.num_classes,
            "noisy_labels": int(self.noisy.sum()) if self.noisy is not None else 0,
        }


def mnist1d(num_train: int = 4000, num_test: int = 1000, *, seed: int = 42) -> Split:
    """Generate mnist1d locally: ``num_train`` + ``num_test`` sequences of length 40, 10 classes.

    The default (4000, 1000, seed 42) is the standard split. Python's and NumPy's global random
    states, which ``make_dataset`` reseeds, are restored afterwards.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train} and {num_test}")
    from mnist1d.data import get_dataset_args, make_dataset

    total = math.ceil((num_train + num_test) / MNIST1D_CLASSES) * MNIST1D_CLASSES
    args = get_dataset_args()
    args.num_samples = total
    args.train_split = 1.0  # we split ourselves, so sizes are exact
    args.seed = seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    x = torch.from_numpy(np.asarray(generated["x"], dtype=np.float32))
    y = torch.from_numpy(np.asarray(generated["y"], dtype=np.int64))
    return Split(
        x_train=x[:num_train],
        y_train=y[:num_train],
        x_test=x[total - num_test :],
        y_test=y[total - num_test :],
        num_classes=MNIST1D_CLASSES,
    )


def symmetric_label_noise(
    labels: torch.Tensor, fraction: float, num_classes: int, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace exactly ``round(fraction * n)`` labels by a different, uniformly drawn class.

    Returns ``(noisy_labels, corrupted_mask)``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise fraction must lie in [0, 1], got {fraction!r}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    generator = torch.Generator().manual_seed(seed)
    n = labels.numel()
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[torch.randperm(n, generator=generator)[: round(fraction * n)]] = True
    shift = torch.randint(1, num_classes, (n,), generator=generator)  # never 0: always a different class
    noisy = torch.where(corrupted, (labels + shift) % num_classes, labels)
    return noisy, corrupted


def with_label_noise(split: Split, fraction: float, *, seed: int = 0) -> Split:
    """A copy of a classification split whose training labels carry symmetric noise."""
    if split.num_classes is None:
        raise ValueError("label noise needs a classification split (num_classes is None)")
    noisy, corrupted = symmetric_label_noise(split.y_train, fraction, split.num_classes, seed=seed)
    return Split(
        x_train=split.x_train, y_train=noisy, x_test=split.x_test, y_test=split.y_test,
        num_classes=split.num_classes, noisy=corrupted,
    )  # fmt: skip


def teacher_student_regression(
    num_train: int = 32,
    num_test: int = 256,
    *,
    teacher_width: int = 4,
    in_features: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Split, ReLUNet1D]:
    """Inputs uniform on ``[-1, 1]^d``, targets ``teacher(x)`` exactly (no noise).

    Returns the split (``num_classes=None``) and the teacher network.
    """
    if num_train < 1 or num_test < 1 or teacher_width < 1:
        raise ValueError(f"sizes must be >= 1, got {num_train=}, {num_test=}, {teacher_width=}")
    generator = torch.Generator().manual_seed(seed)
    teacher = ReLUNet1D(teacher_width, in_features).to(dtype)
    with torch.no_grad():
        for param in teacher.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=dtype))
    teacher.requires_grad_(False)
    x = (torch.rand(num_train + num_test, in_features, generator=generator, dtype=dtype) * 2) - 1
    with torch.no_grad():
        y = teacher(x)
    split = Split(x_train=x[:num_train], y_train=y[:num_train], x_test=x[num_train:], y_test=y[num_train:])
    return split, teacher


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split tensors into minibatches (the last may be smaller), optionally shuffled."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(len(y), generator=generator) if shuffle else torch.arange(len(y))
    return [(x[order[i : i + batch_size]], y[order[i : i + batch_size]]) for i in range(0, len(y), batch_size)]
