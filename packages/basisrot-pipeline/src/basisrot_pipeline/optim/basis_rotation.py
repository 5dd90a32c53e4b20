"""Adam in a rotated basis for 2-D weight matrices (basis rotation).

Jung, Shin, Lee, "Mitigating Staleness in Asynchronous Pipeline Parallelism via Basis Rotation",
arXiv 2602.03515 (ICML 2026), Section 4. The update is Adam run in the eigenbasis of the gradient's
left/right second-moment matrices, the same family as SOAP (Vyas et al., arXiv 2409.11321), which
is the ("second", "bi") configuration here. For a weight ``W`` (m x n) with gradient ``G``:

* statistics: ``L = b L + (1-b) G G^T`` and ``R = b R + (1-b) G^T G`` (source "second", b = 0.999);
  source "first" keeps none and reads the bases off the look-ahead momentum (:func:`first_order_refresh`);
* every ``precondition_frequency`` steps, or when no basis exists, refresh ``Q_L``/``Q_R``: a full
  symmetric eigendecomposition on cold start (eigenvalues descending, retried in float64 if the
  float32 one fails); on warm start one power-iteration step ``Q = qr(L Q_sorted)`` after sorting
  the estimated eigenvalues ``diag(Q^T L Q)`` in descending order and permuting the second moment
  ``V`` (which lives in the rotated coordinates) to match (SOAP, Algorithm 4). With the option
  ``null_space="deterministic"`` the null space of a rank-deficient statistic, which ``eigh`` and QR
  fill from round-off, is completed deterministically instead (:func:`cold_basis`, :func:`warm_basis`;
  a departure from SOAP and the authors, documented in docs); the default ``"eigh"`` keeps theirs;
* ``M = b1 M + (1-b1) G`` in original coordinates; ``G~ = Q_L^T G Q_R``, ``M~ = Q_L^T M Q_R``;
  ``V = b2 V + (1-b2) G~^2``; ``W -= lr sqrt(bc2) / bc1 * Q_L [ M~ / (sqrt(V) + eps) ] Q_R^T``, with
  Adam's bias corrections ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t`` folded into the step size as in SOAP
  and the authors' code (eps beside the raw ``sqrt(V)``; unrotated parameters keep AdamW's
  ``sqrt(V/bc2) + eps``) and decoupled weight decay ``W *= 1 - lr * wd`` (Loshchilov & Hutter 2019).

Geometry "bi" rotates both sides, "uni" only the smaller side (the right one of a square matrix). A side longer than
``max_precond_dim`` is never rotated (the size guard): on that side the update is plain Adam.
Every parameter that is not a matrix, or that sits in a group with ``rotate=False``, gets AdamW.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch

from basisrot_pipeline.optim.state_dtypes import KeepsStateDtypes

logger = logging.getLogger(__name__)

SOURCES = ("second", "first")
HALF_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a parameter's optimizer state: float32 for half-precision parameters.

    Half-precision CPU has no QR or symmetric eigendecomposition kernels, and the statistics' small
    eigenvalues would drown in bf16 round-off; the authors' code keeps the statistics and the
    refresh in float32 for the same reason. Other dtypes (float32, float64) keep their own.
    """
    return torch.float32 if param_dtype in HALF_PRECISION else param_dtype


GEOMETRIES = ("bi", "uni")
# "eigh": the null space of a rank-deficient statistic is whatever eigh/QR return (SOAP, the authors);
# "deterministic": it is completed from the coordinate axes / the previous basis (cold_basis, warm_basis)
NULL_SPACES = ("eigh", "deterministic")


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
    if group["null_space"] not in NULL_SPACES:
        raise ValueError(f"null_space must be one of {NULL_SPACES}, got {group['null_space']!r}")
    if isinstance(group["max_precond_dim"], bool) or group["max_precond_dim"] < 0:
        raise ValueError(f"max_precond_dim must be a non-negative int, got {group['max_precond_dim']!r}")


def null_tolerance(size: int, largest: float, dtype: torch.dtype) -> float:
    """Eigenvalues (or QR pivots) at or below this are round-off: ``size * eps(dtype) * largest``.

    The bound of ``torch.linalg.matrix_rank``'s default tolerance: a direction whose energy is this
    small relative to the largest one cannot be told apart from the kernel's own rounding.
    """
    return size * torch.finfo(dtype).eps * max(float(largest), 0.0)


def complete_null_space(kept: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The orthonormal frame of the complement of ``kept``'s columns closest to ``reference``'s columns.

    ``reference`` (one column per missing direction) is projected onto the complement of ``kept``
    and replaced by its polar factor ``U V^T`` (from the SVD ``U S V^T`` of the projection), which
    is the closest orthonormal frame in Frobenius norm and a continuous function of ``kept`` and
    ``reference``: unlike the null vectors of ``eigh`` or the trailing columns of a QR, it does not
    change with round-off. Runs in float64 when the float32 SVD fails.
    """
    projected = reference - kept @ (kept.T @ reference)
    try:
        u, _, vh = torch.linalg.svd(projected, full_matrices=False)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        u, _, vh = (x.to(projected.dtype) for x in torch.linalg.svd(projected.double(), full_matrices=False))
    return u @ vh


def _eigh_descending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(symmetrised matrix, eigenvalues, eigenvectors)``, descending; float64 retry if float32 fails."""
    sym = 0.5 * (matrix + matrix.T)
    try:
        values, vectors = torch.linalg.eigh(sym)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        logger.debug("eigh failed in %s, retrying in float64", sym.dtype)
        values, vectors = torch.linalg.eigh(sym.double())
        values, vectors = values.to(matrix.dtype), vectors.to(matrix.dtype)
    return sym, values.flip(-1), vectors.flip(-1)


def cold_basis(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic cold start: :func:`eigenbasis` with its null space completed, and the null mask.

    The eigenvectors of eigenvalues at the round-off level (the null space of a rank-deficient
    statistic) are replaced by :func:`complete_null_space` of the coordinate axes, so the basis does
    not depend on round-off (option ``null_space="deterministic"``; a departure from SOAP and the
    authors' code, which keep whatever ``eigh`` returns there; see docs).
    """
    sym, values, vectors = _eigh_descending(matrix)
    null = values <= null_tolerance(sym.shape[0], values[0], sym.dtype)
    if not bool(null.any()):
        return vectors, null  # full rank: eigh's basis, as SOAP and the authors' code
    # the null eigenvectors are any orthonormal basis of the kernel, picked by round-off; take the one
    # closest to the coordinate axes the statistic touches least (its smallest diagonal entries)
    count = int(null.sum())
    axes = torch.sort(torch.argsort(torch.diagonal(sym), stable=True)[:count]).values
    reference = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)[:, axes]
    kept = vectors[:, ~null]
    return torch.cat([kept, complete_null_space(kept, reference)], dim=1), null


def eigenbasis(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix, columns ordered by descending eigenvalue.

    The float32 decomposition can fail to converge on ill-conditioned statistics; it is then
    repeated in float64 and cast back. SOAP's and the authors' cold start (option ``null_space="eigh"``).
    """
    return _eigh_descending(matrix)[2]


def power_iteration_refresh(
    statistic: torch.Tensor, basis: torch.Tensor, second_moment: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One warm-start step: sort by estimated eigenvalue, permute ``V`` along ``dim``, then QR.

    Returns the new basis and the permuted second moment (SOAP, Algorithm 4), the arithmetic of the
    option ``null_space="eigh"``. Runs in the statistic's dtype, float32 for half-precision parameters
    (see :func:`state_dtype`).
    """
    basis, second_moment = _sort_by_estimated_eigenvalue(statistic, basis, second_moment, dim)
    q, _ = torch.linalg.qr(statistic @ basis)
    return q, second_moment


def _sort_by_estimated_eigenvalue(
    statistic: torch.Tensor, basis: torch.Tensor, second_moment: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    estimated = torch.diagonal(basis.T @ statistic @ basis)
    order = torch.argsort(estimated, descending=True)
    return basis[:, order], second_moment.index_select(dim, order)


def warm_basis(
    statistic: torch.Tensor, basis: torch.Tensor, second_moment: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deterministic warm start: :func:`power_iteration_refresh` with its null space completed.

    Also returns the mask of the columns in the null space. Runs in the statistic's dtype, float32 for half-precision parameters (see :func:`state_dtype`).
    When the statistic is rank-deficient, the QR's columns whose pivot is at the round-off level
    are any basis of the null space; they are replaced by :func:`complete_null_space` of the old
    basis's columns at the same positions, so the new basis continues the old one there instead
    of following round-off (option ``null_space="deterministic"``). With full rank the arithmetic is SOAP's.
    """
    basis, second_moment = _sort_by_estimated_eigenvalue(statistic, basis, second_moment, dim)
    q, r = torch.linalg.qr(statistic @ basis)
    pivots = torch.diagonal(r).abs()
    null = pivots <= null_tolerance(statistic.shape[0], pivots.max(), statistic.dtype)
    if bool(null.any()):
        q[:, null] = complete_null_space(q[:, ~null], basis[:, null])
    return q, second_moment, null


def _qr(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix, mode="complete").Q


def first_order_refresh(
    momentum: torch.Tensor,
    basis_left: torch.Tensor | None,
    basis_right: torch.Tensor | None,
    second_moment: torch.Tensor,
    sides: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The first-order source's bases from the momentum ``M`` (the authors' code, arXiv 2602.03515, S = 1st).

    Cold start (no basis yet): the singular vectors of ``M`` (descending), retried in float64 if the
    float32 SVD fails. Warm start: one step of subspace iteration for the singular vectors from the
    *old* bases, ``Q_L = qr(M Q_R[:, o_R])`` and ``Q_R = qr(M^T Q_L[:, o_L])``, where ``o_R`` orders
    the columns by the estimated singular values ``||M q_j||`` (descending); ``V`` is permuted by
    ``o_R`` along its columns and by ``o_L`` along its rows, as the authors do (the "other" axis: a
    left singular vector pairs with the right one of the same rank). A side that is not rotated
    stands in as the identity and ``V`` is not permuted along it (the authors permute it, which
    reorders second moments of unrotated coordinates; see docs). Returns ``(Q_L, Q_R, V)``.
    """
    left, right = sides
    if (left and basis_left is None) or (right and basis_right is None):
        # a one-sided rotation needs only the square factor of its side, which the thin SVD already is
        both = left and right
        try:
            u, _, vh = torch.linalg.svd(momentum, full_matrices=both)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            logger.debug("svd failed in %s, retrying in float64", momentum.dtype)
            u, _, vh = (x.to(momentum.dtype) for x in torch.linalg.svd(momentum.double(), full_matrices=both))
        return (u if left else None), (vh.T if right else None), second_moment
    new_left, new_right = basis_left, basis_right
    if left:
        columns = momentum @ basis_right if right else momentum
        order = torch.argsort(columns.square().sum(0), descending=True)
        if right:
            second_moment = second_moment.index_select(1, order)
        new_left = _qr(columns[:, order])
    if right:
        columns = momentum.T @ basis_left if left else momentum.T
        order = torch.argsort(columns.square().sum(0), descending=True)
        if left:
            second_moment = second_moment.index_select(0, order)
        new_right = _qr(columns[:, order])
    return new_left, new_right, second_moment


class BasisRotation(KeepsStateDtypes):
    """Adam in the rotated eigenbasis of each weight matrix's gradient statistics; AdamW elsewhere.

    The state of half-precision parameters is float32 (:func:`state_dtype`) and stays float32 through
    ``load_state_dict`` (:class:`KeepsStateDtypes`).

    Args:
        params: parameters or parameter groups. A group may override every option below, e.g.
            ``{"params": ..., "rotate": False}`` for embeddings/norms/head, or a per-stage
            ``precondition_frequency`` (the stage-aware variant).
        lr: learning rate. (Default: 1e-3)
        betas: Adam's (b1, b2). (Default: (0.9, 0.999))
        eps: Adam's epsilon. (Default: 1e-8)
        weight_decay: decoupled weight decay. (Default: 0.01)
        precondition_frequency: refresh the bases every this many steps. (Default: 10)
        source: "second" (EMA of G G^T, G^T G) or "first" (SVD / subspace iteration of the momentum, the
            authors' first-order source). (Default: "second")
        geometry: "bi" (both sides) or "uni" (the smaller side only). (Default: "bi")
        shampoo_beta: EMA coefficient of the statistics for source "second". (Default: 0.999)
        max_precond_dim: sides longer than this are not rotated. (Default: 4096)
        null_space: "eigh" (the null space of a rank-deficient statistic is whatever ``eigh``/QR return,
            as SOAP and the authors) or "deterministic" (completed from the coordinate axes on cold
            start and from the previous basis on warm refreshes, round-off-sized entries along it
            dropped; source "second" only). (Default: "eigh")
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
        null_space: str = "eigh",
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
            null_space=null_space,
            rotate=rotate,
        )
        _check_group_options(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group_options(group)

    @staticmethod
    def rotated_sides(shape: torch.Size, group: dict[str, Any]) -> tuple[bool, bool]:
        """Which of (left, right) are rotated for a parameter of ``shape`` in ``group``.

        "uni" rotates the smaller side; on a tie (a square matrix) the right side, as the authors'
        code does (it rotates the right side whenever rows >= cols).
        """
        if not group["rotate"] or len(shape) != 2:
            return False, False
        rows, cols = shape
        fits_left, fits_right = rows <= group["max_precond_dim"], cols <= group["max_precond_dim"]
        if group["geometry"] == "bi":
            return fits_left, fits_right
        return (fits_left, False) if rows < cols else (False, fits_right)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = 0
        dtype = state_dtype(p.dtype)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        left, right = self.rotated_sides(p.shape, group)
        # the first-order source reads its bases off the momentum itself and keeps no statistics
        second = group["source"] == "second"
        state["stat_left"] = (
            torch.zeros(p.shape[0], p.shape[0], dtype=dtype, device=p.device) if left and second else None
        )
        state["stat_right"] = (
            torch.zeros(p.shape[1], p.shape[1], dtype=dtype, device=p.device) if right and second else None
        )
        state["basis_left"] = None
        state["basis_right"] = None
        # the columns of each basis that span its statistic's null space (None: full rank)
        state["null_left"] = None
        state["null_right"] = None
        return state

    @staticmethod
    def _refresh(state: dict[str, Any], step: int, frequency: int, null_space: str) -> None:
        deterministic = null_space == "deterministic"
        for side, dim in (("left", 0), ("right", 1)):
            statistic = state[f"stat_{side}"]
            if statistic is None:
                continue
            basis = state[f"basis_{side}"]
            if basis is not None and step % frequency != 0:
                continue
            if not deterministic:  # SOAP's and the authors' arithmetic; no null mask is kept
                if basis is None:
                    state[f"basis_{side}"] = eigenbasis(statistic)
                else:
                    state[f"basis_{side}"], state["exp_avg_sq"] = power_iteration_refresh(
                        statistic, basis, state["exp_avg_sq"], dim
                    )
                continue
            if basis is None:
                state[f"basis_{side}"], null = cold_basis(statistic)
            else:
                state[f"basis_{side}"], state["exp_avg_sq"], null = warm_basis(
                    statistic, basis, state["exp_avg_sq"], dim
                )
            # kept only while the statistic is rank-deficient (None once it has full rank)
            state[f"null_{side}"] = null if bool(null.any()) else None

    @staticmethod
    def _drop_round_off(rotated: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Zero the entries of a rotated matrix that lie in a null direction and are round-off sized.

        In exact arithmetic the gradient and the momentum have no component along a null direction
        of the statistic at its refresh (the statistic contains them), but in float32 they get one
        of the kernel's round-off size, which Adam's normalisation (over a second moment of the
        same size) turns into a full step of random sign. Entries above the round-off floor are new
        gradient energy in that direction and are kept.
        """
        masks = [state.get("null_left"), state.get("null_right")]
        if masks[0] is None and masks[1] is None:
            return rotated
        in_null = torch.zeros(rotated.shape, dtype=torch.bool, device=rotated.device)
        if masks[0] is not None:
            in_null |= masks[0].bool()[:, None]  # a loaded state_dict holds the mask cast to the parameter's dtype
        if masks[1] is not None:
            in_null |= masks[1].bool()[None, :]
        floor = null_tolerance(max(rotated.shape), rotated.abs().max(), rotated.dtype)
        return rotated.masked_fill(in_null & (rotated.abs() <= floor), 0.0)

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
            lr, eps, frequency = group["lr"], group["eps"], group["precondition_frequency"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BasisRotation does not support sparse gradients")
                state = self.state[p] if self.state[p] else self._init_state(p, group)
                grad = p.grad.to(state["exp_avg"].dtype)  # a no-op unless the parameter is half precision
                state["step"] += 1
                step = state["step"]
                exp_avg, sides = state["exp_avg"], self.rotated_sides(p.shape, group)
                rotated = any(sides)

                exp_avg.lerp_(grad, 1.0 - beta1)  # the look-ahead momentum the first-order source reads
                if rotated and group["source"] == "first":
                    if (state["basis_left"] is None and state["basis_right"] is None) or step % frequency == 0:
                        state["basis_left"], state["basis_right"], state["exp_avg_sq"] = first_order_refresh(
                            exp_avg, state["basis_left"], state["basis_right"], state["exp_avg_sq"], sides
                        )
                elif rotated:
                    for side in ("left", "right"):
                        statistic = state[f"stat_{side}"]
                        if statistic is None:  # guarded or "uni" side: its m x m product is never formed
                            continue
                        product = grad @ grad.T if side == "left" else grad.T @ grad
                        statistic.lerp_(product, 1.0 - group["shampoo_beta"])
                    self._refresh(state, step, frequency, group["null_space"])
                if rotated:
                    grad = self._drop_round_off(self._rotate(grad, state), state)
                    moment = self._drop_round_off(self._rotate(exp_avg, state), state)
                else:
                    moment = exp_avg

                exp_avg_sq = state["exp_avg_sq"]
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias_correction1 = 1.0 - beta1**step
                bias_correction2 = 1.0 - beta2**step
                if rotated:
                    # SOAP's and the authors' placement: eps beside the raw sqrt(V), the bias corrections in
                    # the step size (at t = 1 an eps 1/sqrt(1 - b2) times larger than Adam's)
                    denom = exp_avg_sq.sqrt().add_(eps)
                    step_size = lr * math.sqrt(bias_correction2) / bias_correction1
                else:  # AdamW's placement, which the authors' unrotated parameters get from torch.optim.AdamW
                    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                    step_size = lr / bias_correction1
                direction = moment / denom
                if rotated:
                    direction = self._unrotate(direction, state)
                if group["weight_decay"] != 0.0:
                    p.mul_(1.0 - lr * group["weight_decay"])
                # rounded to the parameter's dtype once, after the whole update is formed in the state's
                p.add_(direction.to(p.dtype), alpha=-step_size)
        return loss

    def extra_memory_floats(self) -> int:
        """Floats held for statistics and bases (2 (m^2 + n^2) per matrix for "bi")."""
        total = 0
        for state in self.state.values():
            for key in ("stat_left", "stat_right", "basis_left", "basis_right"):
                if state.get(key) is not None:
                    total += state[key].numel()
        return total
