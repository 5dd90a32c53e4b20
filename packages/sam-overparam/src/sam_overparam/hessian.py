"""Hessian analysis from Hessian-vector products (no Hessian is ever formed).

All routines act on a *matvec* ``v -> A v`` over flat vectors of the model's parameter count, so
they apply equally to the full-data Hessian ``H``, a minibatch Hessian ``H_B``, powers of them and
the SAM stability operator. :class:`HessianOperator` builds those matvecs from a model, a loss and
a list of batches.

The vectors take the operator's dtype and device unless ``dtype=`` / ``device=`` are given: a
matvec that is a method of an object with ``dtype`` and ``device`` (a :class:`HessianOperator`, a
tensor's ``matmul``) or carries them itself (:func:`stability_matvec`) says what they are; for
any other callable they are read off one probe product ``matvec(ones)``.

References:

* HVP by double back-propagation: Pearlmutter, "Fast exact multiplication by the Hessian",
  Neural Computation 1994.
* Lanczos with full reorthogonalisation: Golub & Van Loan, *Matrix Computations*, 4th ed., Alg.
  10.1.1 and Sec. 10.3.1.
* Hutchinson trace estimator ``tr(A) = E[z^T A z]`` with Rademacher ``z``: Hutchinson 1990;
  applied to ``A = H^k`` for the moments ``tr(H^k)``.
* Stochastic Lanczos quadrature for the spectral density: Ubaru, Chen & Saad, SIAM J. Matrix
  Anal. Appl. 2017; Ghorbani, Krishnan & Xiao, ICML 2019 (the nodes are the Ritz values of the
  Lanczos tridiagonal ``T``, the weights the squared first components of its eigenvectors).
* Linear stability of stochastic (U)SAM and moment non-uniformity: Shin et al., "Critical
  Influence of Overparameterization on Sharpness-aware Minimization", arXiv 2311.17539, Sec. 5:
  linearised at an interpolating minimum, ``e+ = (I - eta J_B) e`` with
  ``J_B = H_B + rho H_B^2``, and mean-square stability requires
  ``lambda_max(E_B[(I - eta J_B)^2]) <= 1`` (``rho = 0`` gives SGD's condition, Wu, Ma & E,
  NeurIPS 2018). Their bounds involve ``E_B[H_B^k]`` for ``k = 2..4``, which we compare with ``H^k``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sam_overparam.optim import frozen_batchnorm_stats

log = logging.getLogger(__name__)

Matvec = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[[nn.Module, Any], torch.Tensor]

__all__ = [
    "ConvergenceWarning",
    "Eigenpair",
    "HessianOperator",
    "SpectralDensity",
    "StabilityReport",
    "hutchinson_trace",
    "lanczos",
    "linear_stability",
    "moment_nonuniformity",
    "moment_traces",
    "power_iteration",
    "spectral_density",
    "stability_report",
    "top_eigenvalue_lanczos",
    "trace_of_powers",
]


class ConvergenceWarning(RuntimeWarning):
    """An eigensolver ran out of iterations before its estimate met its tolerance."""


class Eigenpair(tuple):
    """``(eigenvalue, vector)`` -- unpacks as that pair -- with ``converged`` and ``iterations``."""

    eigenvalue = property(lambda self: self[0])
    vector = property(lambda self: self[1])

    def __new__(cls, eigenvalue: float, vector: torch.Tensor, *, converged: bool, iterations: int) -> Eigenpair:
        pair = super().__new__(cls, (eigenvalue, vector))
        pair.converged = converged
        pair.iterations = iterations
        return pair


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0])


class HessianOperator:
    """Hessian-vector products of ``loss_fn(model, batch)`` with respect to the trainable parameters.

    ``batches`` are weighted by their size, so :meth:`matvec` is the Hessian of the mean loss over
    all their examples and ``E_B`` in :meth:`expected_matvec` draws a batch with probability
    proportional to its size (uniform for equal batches). Put the model in ``eval()`` mode if it
    has dropout; BatchNorm running statistics are never modified.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any]) -> None:
        if not batches:
            raise ValueError("HessianOperator needs at least one batch")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dim = sum(p.numel() for p in self.params)
        sizes = torch.tensor([_batch_size(b) for b in self.batches], dtype=torch.float64)
        self.weights = (sizes / sizes.sum()).tolist()
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [
            chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in self.params]), self.params, strict=True)
        ]

    def batch_matvec(self, index: int, vector: torch.Tensor) -> torch.Tensor:
        """``H_B v`` for batch ``index`` (Pearlmutter's double back-propagation)."""
        with torch.enable_grad(), frozen_batchnorm_stats(self.model):
            loss = self.loss_fn(self.model, self.batches[index])
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            # d/dw <grad L, v> = H v; passing v as grad_outputs avoids building the dot product
            hv = torch.autograd.grad(grads, self.params, grad_outputs=self._split(vector))
        return torch.cat([h.reshape(-1) for h in hv]).detach()

    def _zeros(self) -> torch.Tensor:
        # products are in the operator's own dtype, whatever the vector's (autograd computes
        # them in the parameters' dtype anyway), so a probe product reveals it
        return torch.zeros(self.dim, dtype=self.dtype, device=self.device)

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``H v`` for the full-data Hessian (size-weighted mean of the batch Hessians)."""
        total = self._zeros()
        for index, weight in enumerate(self.weights):
            total.add_(self.batch_matvec(index, vector), alpha=weight)
        return total

    def batch_power_matvec(self, index: int, vector: torch.Tensor, power: int) -> torch.Tensor:
        for _ in range(power):
            vector = self.batch_matvec(index, vector)
        return vector

    def power_matvec(self, vector: torch.Tensor, power: int) -> torch.Tensor:
        """``H^k v``."""
        for _ in range(power):
            vector = self.matvec(vector)
        return vector

    def expected_matvec(self, vector: torch.Tensor, power: int) -> torch.Tensor:
        """``E_B[H_B^k] v``."""
        total = self._zeros()
        for index, weight in enumerate(self.weights):
            total.add_(self.batch_power_matvec(index, vector, power), alpha=weight)
        return total

    def random_vector(self, generator: torch.Generator, kind: str = "gaussian") -> torch.Tensor:
        if kind == "rademacher":
            z = torch.randint(0, 2, (self.dim,), generator=generator, dtype=torch.int64) * 2 - 1
            return z.to(self.dtype).to(self.device)
        return torch.randn(self.dim, generator=generator, dtype=self.dtype).to(self.device)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _vector_options(
    matvec: Matvec, dim: int, dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the vectors fed to ``matvec`` (see the module docstring)."""
    if dtype is None or device is None:
        owner = getattr(matvec, "__self__", matvec)
        dtype = dtype if dtype is not None else getattr(owner, "dtype", None)
        device = device if device is not None else getattr(owner, "device", None)
    if dtype is None or device is None:
        probe_dtype, probe_device = dtype or torch.get_default_dtype(), device or "cpu"
        try:
            probe = matvec(torch.ones(dim, dtype=probe_dtype, device=probe_device))
        except RuntimeError as err:
            raise TypeError(
                f"cannot tell the dtype and device of matvec's vectors: a probe product with {probe_dtype} "
                f"on {probe_device} failed ({err}); pass dtype= and device="
            ) from err
        dtype = dtype if dtype is not None else probe.dtype
        device = device if device is not None else probe.device
    return dtype, torch.device(device)


def _gaussian(dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # drawn on the CPU (the generator's device), so a seed gives the same start on every device
    return torch.randn(dim, generator=_generator(seed), dtype=dtype).to(device)


def _rademacher(dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(dtype=dtype, device=device)


def power_iteration(
    matvec: Matvec,
    dim: int,
    *,
    iters: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Eigenpair:
    """Eigenvalue of largest *magnitude* and its unit eigenvector by power iteration.

    Converged, and stopped, when the Rayleigh quotient ``theta = v^T A v`` changes by at most
    ``tol`` relative *and* the residual ``||A v - theta v||`` is at most ``sqrt(tol) ||A v||``
    (the eigenvalue error is about the squared residual, so both ask for the same accuracy). The
    residual test is what catches two eigenvalues of equal magnitude and opposite sign (+1 and -1),
    where the Rayleigh quotient stands still at a value that is no eigenvalue. Returns an
    :class:`Eigenpair` whose ``converged`` says whether the tolerance was met within ``iters``;
    a :class:`ConvergenceWarning` is issued when it was not. For a Hessian with a large negative
    eigenvalue this returns that one; use :func:`top_eigenvalue_lanczos` for the largest algebraic
    eigenvalue. (Default: iters=100, tol=1e-6, dtype and device the operator's)
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    dtype, device = _vector_options(matvec, dim, dtype, device)
    v = _gaussian(dim, seed, dtype, device)
    v /= v.norm()
    eigenvalue = 0.0
    for step in range(iters):
        w = matvec(v).to(v)
        new = float(torch.dot(v, w))
        norm = w.norm()
        if norm == 0:  # v is in the null space: 0 is an exact eigenvalue
            return Eigenpair(0.0, v, converged=True, iterations=step + 1)
        residual = float((w - new * v).norm())
        settled = step > 0 and abs(new - eigenvalue) <= tol * abs(new)
        eigenvalue, v = new, w / norm
        if settled and residual <= math.sqrt(tol) * float(norm):
            return Eigenpair(eigenvalue, v, converged=True, iterations=step + 1)
    warnings.warn(
        f"power iteration did not converge in {iters} iterations (last Rayleigh quotient {eigenvalue:.6g}); "
        "eigenvalues of nearly equal magnitude, e.g. of opposite sign, make it stall: use top_eigenvalue_lanczos",
        ConvergenceWarning,
        stacklevel=2,
    )
    return Eigenpair(eigenvalue, v, converged=False, iterations=iters)


def lanczos(
    matvec: Matvec,
    dim: int,
    steps: int,
    *,
    seed: int = 0,
    start: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``steps`` Lanczos iterations with full reorthogonalisation (Golub & Van Loan Alg. 10.1.1).

    Returns ``(alphas, betas, Q)``: the diagonal and off-diagonal of the tridiagonal ``T`` and the
    orthonormal basis (columns). Stops early, with a smaller ``T``, on an invariant subspace: when
    the new residual ``beta`` is below ``1e-10`` times the operator's scale, the largest
    ``||A q_j||`` seen so far (a lower bound of ``||A||``). The test is relative so that an
    operator of any scale -- a Hessian of 1e-11, say -- takes the same steps as its rescaled copy.
    (Default: dtype and device the operator's)
    """
    alphas, betas, basis, _ = _lanczos(matvec, dim, steps, seed=seed, start=start, dtype=dtype, device=device)
    return alphas, betas, basis


def _lanczos(
    matvec: Matvec,
    dim: int,
    steps: int,
    *,
    seed: int,
    start: torch.Tensor | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """:func:`lanczos`, and the norm of the residual after the last step (0 on an invariant
    subspace), which bounds the Ritz residuals: ``||A x_i - theta_i x_i|| = beta_m |y_i[m]|``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    steps = min(steps, dim)
    dtype, device = _vector_options(matvec, dim, dtype, device)
    q = start.to(dtype=dtype, device=device, copy=True) if start is not None else _gaussian(dim, seed, dtype, device)
    q /= q.norm()
    basis = [q]
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    scale = 0.0  # max_j ||A q_j|| <= ||A||
    for j in range(steps):
        w = matvec(basis[j]).to(dtype)
        scale = max(scale, float(w.norm()))
        alpha = torch.dot(w, basis[j])
        alphas.append(alpha)
        Q = torch.stack(basis, dim=1)
        for _ in range(2):  # twice is enough (Kahan's "twice is enough")
            w = w - Q @ (Q.T @ w)
        beta = w.norm()
        if float(beta) <= 1e-10 * scale:
            log.debug("Lanczos found an invariant subspace after %d steps", j + 1)
            final_residual = 0.0
            break
        final_residual = float(beta)
        if j == steps - 1:
            break
        betas.append(beta)
        basis.append(w / beta)
    return (
        torch.stack(alphas),
        (torch.stack(betas) if betas else torch.zeros(0, dtype=dtype, device=device)),
        torch.stack(basis, dim=1),
        final_residual,
    )


def _tridiagonal(alphas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    T = torch.diag(alphas)
    if betas.numel():
        T += torch.diag(betas, 1) + torch.diag(betas, -1)
    return T


def top_eigenvalue_lanczos(
    matvec: Matvec,
    dim: int,
    *,
    steps: int = 30,
    k: int = 1,
    seed: int = 0,
    tol: float = 1e-3,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``k`` largest (algebraic) Ritz values after ``steps`` Lanczos iterations, descending.

    Issues a :class:`ConvergenceWarning` when a returned Ritz value's residual ``||A x - theta x||``
    (``beta_m |y_m|``, Golub & Van Loan Sec. 10.1.4) exceeds ``tol`` times the largest Ritz
    magnitude; the eigenvalue error is then up to about that residual (more steps help).
    (Default: tol=1e-3, dtype and device the operator's)
    """
    dtype, device = _vector_options(matvec, dim, dtype, device)
    alphas, betas, _, final_residual = _lanczos(matvec, dim, steps, seed=seed, start=None, dtype=dtype, device=device)
    ritz, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas).double())
    if final_residual:
        top_residuals = (final_residual * vectors[-1].abs()).flip(0)[:k]
        bound = tol * float(ritz.abs().max())
        if bool((top_residuals > bound).any()):
            warnings.warn(
                f"Lanczos top Ritz values not converged after {len(alphas)} steps: residual "
                f"{float(top_residuals.max()):.3g} > tol * |lambda|max = {bound:.3g}; use more steps",
                ConvergenceWarning,
                stacklevel=2,
            )
    return ritz.flip(0)[:k].to(dtype)


@dataclass(kw_only=True)
class TraceEstimate:
    """A Hutchinson estimate: mean of ``z^T A z`` over probes and its standard error."""

    value: float
    stderr: float
    num_probes: int


def _probes(
    dim: int, num_probes: int | None, seed: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    if num_probes is None:  # exact: the standard basis (only for small models)
        return list(torch.eye(dim, dtype=dtype, device=device))
    generator = _generator(seed)
    return [_rademacher(dim, generator, dtype, device) for _ in range(num_probes)]


def hutchinson_trace(
    matvec: Matvec,
    dim: int,
    *,
    num_probes: int | None = 100,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutchinson's ``tr(A) ~ mean z^T A z`` with Rademacher probes.

    ``num_probes=None`` uses the ``dim`` standard basis vectors and gives the exact trace.
    Negative estimates are returned as they are (unlike PyHessian, which stops on them).
    (Default: dtype and device the operator's)
    """
    if num_probes is not None and num_probes < 1:
        raise ValueError(f"num_probes must be >= 1 or None, got {num_probes}")
    dtype, device = _vector_options(matvec, dim, dtype, device)
    samples = torch.stack([torch.dot(z, matvec(z).to(z)) for z in _probes(dim, num_probes, seed, dtype, device)])
    return _trace_estimate(samples, exact=num_probes is None)


def _trace_estimate(samples: torch.Tensor, *, exact: bool) -> TraceEstimate:
    """The estimate from the probes' ``z^T A z``: their sum over the standard basis when ``exact``."""
    if exact:
        return TraceEstimate(value=float(samples.sum()), stderr=0.0, num_probes=len(samples))
    stderr = float(samples.std() / math.sqrt(len(samples))) if len(samples) > 1 else float("nan")
    return TraceEstimate(value=float(samples.mean()), stderr=stderr, num_probes=len(samples))


def trace_of_powers(
    operator: HessianOperator, powers: Sequence[int] = (1, 2, 3, 4), *, num_probes: int | None = 100, seed: int = 0
) -> dict[int, TraceEstimate]:
    """``tr(H^k)`` for each ``k`` by Hutchinson, the same probes for every ``k``.

    ``H`` is symmetric, so with ``u_j = H^j z`` a probe's ``z^T H^k z`` is ``||u_{k/2}||^2`` for
    even ``k`` and ``u_{(k-1)/2}^T u_{(k+1)/2}`` for odd ``k``: one chain ``z, Hz, ..., H^c z`` with
    ``c = ceil(max k / 2)`` Hessian-vector products per probe serves every power (``k`` products
    for each power before). ``num_probes=None`` gives exact traces (standard basis probes).
    """
    if any(k < 1 for k in powers):
        raise ValueError(f"powers must be >= 1, got {', '.join(str(k) for k in powers if k < 1)}")
    if num_probes is not None and num_probes < 1:
        raise ValueError(f"num_probes must be >= 1 or None, got {num_probes}")
    depth = max((k + 1) // 2 for k in powers) if powers else 0
    samples: dict[int, list[torch.Tensor]] = {k: [] for k in powers}
    for z in _probes(operator.dim, num_probes, seed, operator.dtype, operator.device):
        chain = [z]
        for _ in range(depth):
            chain.append(operator.matvec(chain[-1]))
        for k in powers:
            samples[k].append(torch.dot(chain[k // 2], chain[k - k // 2]))
    return {k: _trace_estimate(torch.stack(values), exact=num_probes is None) for k, values in samples.items()}


def moment_traces(
    operator: HessianOperator, powers: Sequence[int] = (2, 3, 4), *, num_probes: int | None = 50, seed: int = 0
) -> tuple[dict[int, TraceEstimate], dict[int, TraceEstimate]]:
    """``tr(E_B[H_B^k])`` and ``tr(H^k)`` for each ``k``, the same probes for both and for every ``k``.

    The chain of :func:`trace_of_powers` applied to each batch Hessian as well as to ``H``: a probe
    costs ``ceil(max k / 2)`` products with each ``H_B`` for the expected moments and as many
    full-data products (one ``H_B`` product per batch each) for ``H^k``, whatever the powers.
    """
    if any(k < 1 for k in powers):
        raise ValueError(f"powers must be >= 1, got {', '.join(str(k) for k in powers if k < 1)}")
    if num_probes is not None and num_probes < 1:
        raise ValueError(f"num_probes must be >= 1 or None, got {num_probes}")
    depth = max((k + 1) // 2 for k in powers) if powers else 0

    def chain(matvec: Matvec, z: torch.Tensor) -> list[torch.Tensor]:
        vectors = [z]
        for _ in range(depth):
            vectors.append(matvec(vectors[-1]))
        return vectors

    def quadratic_form(vectors: list[torch.Tensor], k: int) -> torch.Tensor:
        # z^T A^k z for symmetric A from u_j = A^j z
        return torch.dot(vectors[k // 2], vectors[k - k // 2])

    expected: dict[int, list[torch.Tensor]] = {k: [] for k in powers}
    full: dict[int, list[torch.Tensor]] = {k: [] for k in powers}
    for z in _probes(operator.dim, num_probes, seed, operator.dtype, operator.device):
        per_batch = [chain(lambda v, i=i: operator.batch_matvec(i, v), z) for i in range(len(operator.batches))]
        whole = chain(operator.matvec, z)
        for k in powers:
            expected[k].append(sum(w * quadratic_form(c, k) for w, c in zip(operator.weights, per_batch, strict=True)))
            full[k].append(quadratic_form(whole, k))
    exact = num_probes is None
    return (
        {k: _trace_estimate(torch.stack(v), exact=exact) for k, v in expected.items()},
        {k: _trace_estimate(torch.stack(v), exact=exact) for k, v in full.items()},
    )


@dataclass(kw_only=True)
class MomentNonUniformity:
    """For one power ``k``: ``E_B[H_B^k]`` against ``H^k`` (Shin et al., Sec. 5 and their Fig. 6)."""

    power: int
    trace_expected: float  # tr(E_B[H_B^k])
    trace_full: float  # tr(H^k)
    top_expected: float  # lambda_max(E_B[H_B^k])
    top_full: float  # lambda_max(H^k)

    @property
    def trace_ratio(self) -> float:
        return self.trace_expected / self.trace_full

    @property
    def top_ratio(self) -> float:
        return self.top_expected / self.top_full


def moment_nonuniformity(
    operator: HessianOperator,
    powers: Sequence[int] = (2, 3, 4),
    *,
    num_probes: int | None = 50,
    lanczos_steps: int = 30,
    seed: int = 0,
) -> list[MomentNonUniformity]:
    """How far the per-batch moments ``E_B[H_B^k]`` exceed the full-batch ``H^k``.

    Ratios near 1 mean uniform curvature across batches; the paper reports that SAM's minima are
    more uniform than SGD's. Traces by Hutchinson (exact with ``num_probes=None``) through
    :func:`moment_traces` (``ceil(max k / 2)`` products per probe and batch for all powers; ``k``
    per power before), top eigenvalues by Lanczos (``k`` products per Lanczos step).
    """
    if any(k < 1 for k in powers):
        raise ValueError(f"powers must be >= 1, got {', '.join(str(k) for k in powers if k < 1)}")
    traces_expected, traces_full = moment_traces(operator, powers, num_probes=num_probes, seed=seed)
    results = []
    for k in powers:
        expected = lambda v, k=k: operator.expected_matvec(v, k)  # noqa: E731
        full = lambda v, k=k: operator.power_matvec(v, k)  # noqa: E731
        results.append(
            MomentNonUniformity(
                power=k,
                trace_expected=traces_expected[k].value,
                trace_full=traces_full[k].value,
                top_expected=float(
                    top_eigenvalue_lanczos(
                        expected,
                        operator.dim,
                        steps=lanczos_steps,
                        seed=seed,
                        dtype=operator.dtype,
                        device=operator.device,
                    )[0]
                ),
                top_full=float(
                    top_eigenvalue_lanczos(
                        full, operator.dim, steps=lanczos_steps, seed=seed, dtype=operator.dtype, device=operator.device
                    )[0]
                ),
            )
        )
    return results


@dataclass(kw_only=True)
class SpectralDensity:
    """Gauss quadrature nodes and weights from stochastic Lanczos quadrature, one row per probe."""

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    dim: int

    def evaluate(self, grid: torch.Tensor, sigma: float) -> torch.Tensor:
        """The density smoothed by a Gaussian of width ``sigma`` on ``grid`` (integrates to ~1)."""
        grid = grid.double()
        density = torch.zeros_like(grid)
        for nodes, weights in zip(self.nodes, self.weights, strict=True):
            diff = grid[:, None] - nodes.double()[None, :]
            kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
            density += kernel @ weights.double()
        return density / len(self.nodes)

    def moment(self, power: int) -> float:
        """``tr(H^k) ~ dim * mean_probes sum_i w_i theta_i^k`` (exact per probe when steps >= k/2+1)."""
        values = [
            float((w.double() * n.double() ** power).sum()) for n, w in zip(self.nodes, self.weights, strict=True)
        ]
        return self.dim * sum(values) / len(values)


def spectral_density(
    matvec: Matvec,
    dim: int,
    *,
    num_probes: int = 4,
    steps: int = 40,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``num_probes`` Rademacher starts, ``steps`` Lanczos steps each.

    (Default: dtype and device the operator's)
    """
    dtype, device = _vector_options(matvec, dim, dtype, device)
    generator = _generator(seed)
    nodes, weights = [], []
    for _ in range(num_probes):
        z = _rademacher(dim, generator, dtype, device)
        alphas, betas, _ = lanczos(matvec, dim, steps, start=z, dtype=dtype, device=device)
        ritz, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas).double())
        nodes.append(ritz.to(dtype))
        weights.append((vectors[0] ** 2).to(dtype))
    return SpectralDensity(nodes=nodes, weights=weights, dim=dim)


def stability_matvec(operator: HessianOperator, lr: float, rho: float) -> Matvec:
    """``v -> E_B[(I - lr J_B)^2] v`` with ``J_B = H_B + rho H_B^2`` (Shin et al., Sec. 5)."""

    def one_factor(index: int, v: torch.Tensor) -> torch.Tensor:
        hv = operator.batch_matvec(index, v)
        jv = hv + rho * operator.batch_matvec(index, hv) if rho else hv
        return v - lr * jv

    def matvec(v: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(v)
        for index, weight in enumerate(operator.weights):
            total.add_(one_factor(index, one_factor(index, v)), alpha=weight)
        return total

    # lets the eigensolvers pick the operator's dtype and device by default
    matvec.dtype = operator.dtype  # type: ignore[attr-defined]
    matvec.device = operator.device  # type: ignore[attr-defined]
    return matvec


def linear_stability(
    operator: HessianOperator, *, lr: float, rho: float = 0.0, steps: int = 30, seed: int = 0
) -> float:
    """``lambda_max(E_B[(I - lr J_B)^2])``; a minimum is mean-square stable for (U)SAM when <= 1.

    ``rho = 0`` gives SGD's condition. The operator is positive semi-definite (a mean of squares
    of symmetric matrices), so the largest Ritz value of Lanczos is its spectral radius.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    return float(top_eigenvalue_lanczos(stability_matvec(operator, lr, rho), operator.dim, steps=steps, seed=seed)[0])


# a Ritz value this close above 1 is the edge of stability in floating point, not past it
_EDGE_TOLERANCE = 1e-9


@dataclass(kw_only=True)
class StabilityReport:
    """The mean-square stability of (U)SAM at a point, with sharpness and negative curvature apart.

    ``E_B[(I - lr J_B)^2]`` exceeds 1 in a direction ``v`` for two different reasons: the step is
    too long for the curvature (``lr * v^T J v > 2``, the sharpness condition of the theory) or the
    curvature is negative (``v^T J v < 0``, any ``lr`` gives ``(1 - lr * j)^2 > 1``): the point is
    a saddle there, not the minimum that Shin et al.'s linearisation assumes. Each top Ritz
    direction of the operator is classified by the sign of ``v^T E_B[J_B] v``.
    """

    lr: float
    rho: float
    lambda_max: float  # of E_B[(I - lr J_B)^2] over all directions
    sharpness_lambda_max: float | None  # over directions of positive curvature (None: none found)
    sharpness_stable: bool
    negative_curvature: bool  # some direction with v^T E_B[J_B] v < 0 has a value > 1
    negative_curvature_lambda_max: float | None
    verdict: str


def _expected_jacobian_matvec(operator: HessianOperator, rho: float) -> Matvec:
    """``v -> E_B[J_B] v = H v + rho E_B[H_B^2] v``."""

    def matvec(v: torch.Tensor) -> torch.Tensor:
        jv = operator.matvec(v)
        return jv + rho * operator.expected_matvec(v, 2) if rho else jv

    return matvec


def stability_report(
    operator: HessianOperator, *, lr: float, rho: float = 0.0, steps: int = 30, seed: int = 0
) -> StabilityReport:
    """:func:`linear_stability` with a verdict that tells sharpness from negative curvature.

    ``rho`` is the *unnormalised* radius of USAM (``e = rho * grad f_B``), the convention of the
    theory (Shin et al., Sec. 5); ``rho = 0`` is SGD's condition. Lanczos gives the operator's top
    Ritz pairs; walking them from the top, each direction's curvature ``v^T E_B[J_B] v`` decides
    whether it counts for the sharpness condition or as negative curvature.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    matvec = stability_matvec(operator, lr, rho)
    alphas, betas, basis, _ = _lanczos(
        matvec, operator.dim, steps, seed=seed, start=None, dtype=operator.dtype, device=operator.device
    )
    ritz, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas).double())
    curvature = _expected_jacobian_matvec(operator, rho)
    sharpness: float | None = None
    negative: float | None = None
    for index in range(len(ritz) - 1, -1, -1):  # from the top
        value = float(ritz[index])
        if sharpness is not None and (negative is not None or value <= 1 + _EDGE_TOLERANCE):
            break
        direction = (basis.double() @ vectors[:, index]).to(operator.dtype)
        if float(torch.dot(direction, curvature(direction).to(direction))) >= 0:
            sharpness = value if sharpness is None else sharpness
        elif negative is None and value > 1 + _EDGE_TOLERANCE:
            negative = value
    sharpness_stable = sharpness is None or sharpness <= 1 + _EDGE_TOLERANCE
    shown = "none" if sharpness is None else f"{sharpness:.6g}"
    verdict = (
        f"stable (sharpness: lambda_max = {shown} <= 1)"
        if sharpness_stable
        else f"unstable: too sharp for lr={lr:g} (lambda_max = {shown} > 1 along positive curvature)"
    )
    if negative is not None:
        verdict += (
            f"; negative curvature: lambda = {negative:.6g} > 1 along v^T E[J_B] v < 0 "
            "(a saddle direction, not a minimum: outside the linear theory)"
        )
    return StabilityReport(
        lr=lr,
        rho=rho,
        lambda_max=float(ritz[-1]),
        sharpness_lambda_max=sharpness,
        sharpness_stable=sharpness_stable,
        negative_curvature=negative is not None,
        negative_curvature_lambda_max=negative,
        verdict=verdict,
    )
