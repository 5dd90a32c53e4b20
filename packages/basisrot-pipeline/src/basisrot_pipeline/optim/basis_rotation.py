"""Adam in a rotated basis for 2-D weight matrices (basis rotation).

Jung, Shin, Lee, "Mitigating Staleness in Asynchronous Pipeline Parallelism via Basis Rotation",
arXiv 2602.03515 (ICML 2026), Section 4. The update is Adam run in the eigenbasis of the gradient's
left/right second-moment matrices, the same family as SOAP (Vyas et al., arXiv 2409.11321), which
is the ("second", "bi") configuration here. For a weight ``W`` (m x n) with gradient ``G``:

* statistics: ``L = b L + (1-b) G G^T`` and ``R = b R + (1-b) G^T G`` (source "second", b = 0.999)
  or ``L = M M^T``, ``R = M^T M`` of the momentum ``M`` (source "first");
* every ``precondition_frequency`` steps, or when no basis exists, refresh ``Q_L``/``Q_R``: a full
  symmetric eigendecomposition on cold start (eigenvalues descending, retried in float64 if the
  float32 one fails); on warm start one power-iteration step ``Q = qr(L Q_sorted)`` after sorting
  the estimated eigenvalues ``diag(Q^T L Q)`` in descending order and permuting the second moment
  ``V`` (which lives in the rotated coordinates) to match (SOAP, Algorithm 4);
* ``M = b1 M + (1-b1) G`` in original coordinates; ``G~ = Q_L^T G Q_R``, ``M~ = Q_L^T M Q_R``;
  ``V = b2 V + (1-b2) G~^2``; ``W -= lr * Q_L [ (M~/bc1) / (sqrt(V/bc2) + eps) ] Q_R^T``, with Adam's
  bias corrections ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t`` (Kingma & Ba 2015, Algorithm 1, written as
  in ``torch.optim.Adam``) and decoupled weight decay ``W *= 1 - lr * wd`` (Loshchilov & Hutter 2019).

Geometry "bi" rotates both sides, "uni" only the smaller side. A side longer than
``max_precond_dim`` is never rotated (the size guard): on that side the update is plain Adam.
Every parameter that is not a matrix, or that sits in a group with ``rotate=False``, gets AdamW.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCES = ("second", "first")
GEOMETRIES = ("bi", "uni")


def _check_group_options(group: dict[str, Any]) -> None:
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    for name, beta in (("betas[0]", beta1), ("betas[1]", beta2), ("shampoo_beta", group["shampoo_beta"])):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")
    freq = group["precondition_frequency"]
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise ValueError(f"precondition_frequency must be a positive int, got {freq!r}")
    if group["source"] not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {group['source']!r}")
    if group["geometry"] not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {group['geometry']!r}")
    if isinstance(group["max_precond_dim"], bool) or group["max_precond_dim"] < 0:
        raise ValueError(f"max_precond_dim must be a non-negative int, got {group['max_precond_dim']!r}")


def eigenbasis(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix, columns ordered by descending eigenvalue.

    The float32 decomposition can fail to converge on ill-conditioned statistics; it is then
    repeated in float64 and cast back.
    """
    sym = 0.5 * (matrix + matrix.T)
    try:
        _, vectors = torch.linalg.eigh(sym)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        logger.debug("eigh failed in %s, retrying in float64", sym.dtype)
        _, vectors = torch.linalg.eigh(sym.double())
        vectors = vectors.to(matrix.dtype)
    return vectors.flip(-1)


def power_iteration_refresh(
    statistic: torch.Tensor, basis: torch.Tensor, second_moment: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One warm-start step: sort by estimated eigenvalue, permute ``V`` along ``dim``, then QR.

    Returns the new basis and the permuted second moment (SOAP, Algorithm 4).
    """
    estimated = torch.diagonal(basis.T @ statistic @ basis)
    order = torch.argsort(estimated, descending=True)
    basis = basis[:, order]
    second_moment = second_moment.index_select(dim, order)
    q, _ = torch.linalg.qr(statistic @ basis)
    return q, second_moment


class BasisRotation(torch.optim.Optimizer):
    """Adam in the rotated eigenbasis of each weight matrix's gradient statistics; AdamW elsewhere.

    Args:
        params: parameters or parameter groups. A group may override every option below, e.g.
            ``{"params": ..., "rotate": False}`` for embeddings/norms/head, or a per-stage
            ``precondition_frequency`` (the stage-aware variant).
        lr: learning rate. (Default: 1e-3)
        betas: Adam's (b1, b2). (Default: (0.9, 0.999))
        eps: Adam's epsilon. (Default: 1e-8)
        weight_decay: decoupled weight decay. (Default: 0.01)
        precondition_frequency: refresh the bases every this many steps. (Default: 10)
        source: "second" (EMA of G G^T, G^T G) or "first" (momentum M M^T, M^T M). (Default: "second")
        geometry: "bi" (both sides) or "uni" (the smaller side only). (Default: "bi")
        shampoo_beta: EMA coefficient of the statistics for source "second". (Default: 0.999)
        max_precond_dim: sides longer than this are not rotated. (Default: 4096)
        rotate: whether 2-D parameters of the group are rotated at all. (Default: True)
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        source: str = "second",
        geometry: str = "bi",
        shampoo_beta: float = 0.999,
        max_precond_dim: int = 4096,
        rotate: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            source=source,
            geometry=geometry,
            shampoo_beta=shampoo_beta,
            max_precond_dim=max_precond_dim,
            rotate=rotate,
        )
        _check_group_options(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group_options(group)

    @staticmethod
    def rotated_sides(shape: torch.Size, group: dict[str, Any]) -> tuple[bool, bool]:
        """Which of (left, right) are rotated for a parameter of ``shape`` in ``group``."""
        if not group["rotate"] or len(shape) != 2:
            return False, False
        rows, cols = shape
        fits_left, fits_right = rows <= group["max_precond_dim"], cols <= group["max_precond_dim"]
        if group["geometry"] == "bi":
            return fits_left, fits_right
        return (fits_left, False) if rows <= cols else (False, fits_right)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
        left, right = self.rotated_sides(p.shape, group)
        state["stat_left"] = torch.zeros(p.shape[0], p.shape[0], dtype=p.dtype, device=p.device) if left else None
        state["stat_right"] = torch.zeros(p.shape[1], p.shape[1], dtype=p.dtype, device=p.device) if right else None
        state["basis_left"] = None
        state["basis_right"] = None
        return state

    @staticmethod
    def _refresh(state: dict[str, Any], step: int, frequency: int) -> None:
        for side, dim in (("left", 0), ("right", 1)):
            statistic = state[f"stat_{side}"]
            if statistic is None:
                continue
            basis = state[f"basis_{side}"]
            if basis is None:
                state[f"basis_{side}"] = eigenbasis(statistic)
            elif step % frequency == 0:
                state[f"basis_{side}"], state["exp_avg_sq"] = power_iteration_refresh(
                    statistic, basis, state["exp_avg_sq"], dim
                )

    @staticmethod
    def _rotate(matrix: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        if state["basis_left"] is not None:
            matrix = state["basis_left"].T @ matrix
        if state["basis_right"] is not None:
            matrix = matrix @ state["basis_right"]
        return matrix

    @staticmethod
    def _unrotate(matrix: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        if state["basis_left"] is not None:
            matrix = state["basis_left"] @ matrix
        if state["basis_right"] is not None:
            matrix = matrix @ state["basis_right"].T
        return matrix

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("BasisRotation does not support sparse gradients")
                state = self.state[p] if self.state[p] else self._init_state(p, group)
                state["step"] += 1
                step = state["step"]
                exp_avg, rotated = state["exp_avg"], state["stat_left"] is not None or state["stat_right"] is not None

                exp_avg.lerp_(grad, 1.0 - beta1)
                if rotated:
                    source = exp_avg if group["source"] == "first" else grad
                    for side in ("left", "right"):
                        statistic = state[f"stat_{side}"]
                        if statistic is None:  # guarded or "uni" side: its m x m product is never formed
                            continue
                        product = source @ source.T if side == "left" else source.T @ source
                        if group["source"] == "first":
                            statistic.copy_(product)
                        else:
                            statistic.lerp_(product, 1.0 - group["shampoo_beta"])
                    self._refresh(state, step, group["precondition_frequency"])
                    grad, moment = self._rotate(grad, state), self._rotate(exp_avg, state)
                else:
                    moment = exp_avg

                exp_avg_sq = state["exp_avg_sq"]
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias_correction1 = 1.0 - beta1**step
                bias_correction2 = 1.0 - beta2**step
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                direction = moment / denom
                if rotated:
                    direction = self._unrotate(direction, state)
                if group["weight_decay"] != 0.0:
                    p.mul_(1.0 - lr * group["weight_decay"])
                p.add_(direction, alpha=-lr / bias_correction1)
        return loss

    def extra_memory_floats(self) -> int:
        """Floats held for statistics and bases (2 (m^2 + n^2) per matrix for "bi")."""
        total = 0
        for state in self.state.values():
            for key in ("stat_left", "stat_right", "basis_left", "basis_right"):
                if state.get(key) is not None:
                    total += state[key].numel()
        return total
