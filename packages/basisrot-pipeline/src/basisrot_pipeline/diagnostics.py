"""Misalignment diagnostic: the Hessian (1,1)-norm of one weight matrix's block, before and after rotation.

arXiv 2602.03515, Section 3: the harm of delayed gradients to coordinate-wise adaptive methods
grows with ``||H||_(1,1) = sum_ij |H_ij|``, which is small when the Hessian's eigenbasis is aligned
with the coordinate axes. For a weight ``W`` (m x n) and bases ``Q_L`` (m x m), ``Q_R`` (n x n)
the rotated coordinates are ``W~ = Q_L^T W Q_R``; with row-major ``vec``,
``vec(W) = (Q_L kron Q_R) vec(W~)``, so the rotated block is ``K^T H K`` with
``K = Q_L kron Q_R`` (Van Loan, "The ubiquitous Kronecker product", 2000, eq. (2)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def block_hessian(loss_of_weight: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The ``(mn, mn)`` Hessian of ``loss_of_weight`` at ``weight`` (row-major flattening)."""
    rows, cols = weight.shape
    flat = weight.detach().reshape(-1)
    hessian = torch.func.hessian(lambda v: loss_of_weight(v.reshape(rows, cols)))(flat)
    return hessian.reshape(rows * cols, rows * cols)


def rotate_hessian(hessian: torch.Tensor, basis_left: torch.Tensor | None, basis_right: torch.Tensor | None):
    """``K^T H K`` with ``K = Q_L kron Q_R`` (an identity stands in for a missing side)."""
    rows = basis_left.shape[0] if basis_left is not None else None
    cols = basis_right.shape[0] if basis_right is not None else None
    if rows is None and cols is None:
        return hessian
    size = hessian.shape[0]
    rows = rows if rows is not None else size // cols
    cols = cols if cols is not None else size // rows
    if rows * cols != size:
        raise ValueError(f"bases of sizes {rows} and {cols} do not fit a Hessian of size {size}")
    left = basis_left if basis_left is not None else torch.eye(rows, dtype=hessian.dtype)
    right = basis_right if basis_right is not None else torch.eye(cols, dtype=hessian.dtype)
    kron = torch.kron(left.to(hessian.dtype), right.to(hessian.dtype))
    return kron.T @ hessian @ kron


def one_one_norm(matrix: torch.Tensor) -> float:
    return float(matrix.abs().sum())


def misalignment(
    loss_of_weight: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    basis_left: torch.Tensor | None,
    basis_right: torch.Tensor | None,
) -> dict[str, float]:
    """(1,1)-norms of the weight's Hessian block in the original and the rotated coordinates."""
    hessian = block_hessian(loss_of_weight, weight)
    rotated = rotate_hessian(hessian, basis_left, basis_right)
    original_norm, rotated_norm = one_one_norm(hessian), one_one_norm(rotated)
    return {
        "original": original_norm,
        "rotated": rotated_norm,
        "ratio": rotated_norm / original_norm if original_norm else float("nan"),
        "trace": float(torch.trace(hessian)),
    }


def parameter_misalignment(
    model: torch.nn.Module,
    parameter_name: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Misalignment of one weight matrix of ``model`` on a batch, in the bases ``optimizer`` holds for it.

    The loss is the model's next-token cross-entropy with only ``parameter_name`` varied
    (``torch.func.functional_call``). Without an optimizer, or before its first refresh, the rotated
    coordinates are the original ones.
    """
    from basisrot_pipeline.model import lm_loss

    params = dict(model.named_parameters())
    if parameter_name not in params:
        raise ValueError(f"model has no parameter {parameter_name!r}")
    weight = params[parameter_name]
    if weight.ndim != 2:
        raise ValueError(f"{parameter_name!r} has shape {tuple(weight.shape)}; expected a matrix")
    fixed = {k: v.detach() for k, v in params.items() if k != parameter_name}

    def loss_of_weight(w: torch.Tensor) -> torch.Tensor:
        return lm_loss(torch.func.functional_call(model, {**fixed, parameter_name: w}, (inputs,)), targets)

    state = optimizer.state.get(weight, {}) if optimizer is not None else {}
    # torch.func.hessian is forward-over-reverse; only the math attention kernel has forward AD
    with sdpa_kernel(SDPBackend.MATH):
        return misalignment(loss_of_weight, weight, state.get("basis_left"), state.get("basis_right"))
