"""Sharpness-aware minimization (SAM) as a ``torch.optim.Optimizer`` that wraps any base optimizer.

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
ICLR 2021, Algorithm 1) takes two passes per step::

    g     = grad L_B(w)                              # clean pass
    e     = rho * g / (||g||_2 + eps)                # ascent, norm over *all* parameters
    g_sam = grad L_B(w + e)                          # perturbed pass
    w     = base_step(w, g_sam [+ wd * w])           # descent from the *unperturbed* weights

Variants, selected per parameter group:

* ``adaptive=True`` -- ASAM (Kwon et al., ICML 2021): ``e = rho * T^2 g / ||T g||`` with
  ``T = |w| + adaptive_eta`` for weights; which parameters count as weights, and why the offset
  is kept: :mod:`~sam_overparam.optim.asam`.
* ``unnormalized=True`` -- USAM, ``e = rho * g`` (Andriushchenko & Flammarion, ICML 2022), the form
  analysed by Shin et al. (arXiv 2311.17539, Sec. 5): linearised at a minimum it gives
  ``e+ = (I - eta (H_B + rho H_B^2)) e``.

Weight decay, following Shin et al.'s training details (and the authors' code), is applied
*outside* the ascent by default: the descent gradient gets ``wd * w`` at the unperturbed
weights, after any gradient clipping (exactly where ``torch.optim.SGD`` adds its own
``weight_decay``), and the ascent uses the plain loss gradient. ``weight_decay_in_ascent=True``
instead behaves as if ``wd/2 ||w||^2`` were part of the loss (google-research/sam): both passes
see it, the second at ``w + e``, and it is clipped with the loss gradient. A base optimizer that
*decouples* its decay from the gradient (``torch.optim.AdamW``) gets ``weight_decay`` as its own
decay instead, as davda54/sam passes it, so ``rho = 0`` is that optimizer exactly
(:func:`~sam_overparam.optim.groups.hand_decay_to_base`).

Two ways to call :meth:`SAM.step`: with a closure that computes the loss and calls backward, which
SAM runs twice (clean pass, then perturbed pass); or davda54/sam's form, ``loss.backward()`` first
and then ``step(closure)``, where SAM finds gradients written since its last step, takes them as
the clean pass and runs the closure once, as the perturbed pass
(:mod:`~sam_overparam.optim.fresh_gradients`). :meth:`SAM.first_step` and :meth:`SAM.second_step`
are the two halves for callers that run the passes themselves.

BatchNorm: only with ``model=`` does SAM know which modules to freeze in the perturbed pass.
Without it (the default, since an optimizer only sees parameters) BatchNorm running statistics
are updated by *both* passes, the second time with statistics of the perturbed network.

The unperturbed weights are restored by *copy*, not by subtracting ``e``, so ``rho = 0`` (and
any rho in exact arithmetic) returns the base optimizer's update bit for bit.

The class holds the algorithm (SAM, ASAM, USAM, weight decay); what surrounds a step lives in
modules beside it: :mod:`~sam_overparam.optim.groups` (checking and completing parameter groups,
who applies the decay), :mod:`~sam_overparam.optim.asam` (ASAM's ``T``),
:mod:`~sam_overparam.optim.amp` (GradScaler), :mod:`~sam_overparam.optim.distributed` (the
unsynchronised clean pass and the overflow agreement), :mod:`~sam_overparam.optim.msharpness`
(m-sharpness: per-chunk perturbations, Foret et al., Sec. 4.1) and
:mod:`~sam_overparam.optim.batchnorm` (frozen running statistics).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sam_overparam.optim import groups
from sam_overparam.optim.amp import scaled_second_half
from sam_overparam.optim.asam import AsamScaling
from sam_overparam.optim.batchnorm import frozen_batchnorm_stats
from sam_overparam.optim.distributed import local_gradients
from sam_overparam.optim.fresh_gradients import LeftGradients
from sam_overparam.optim.msharpness import chunked_step

log = logging.getLogger(__name__)

__all__ = ["SAM"]


def _detached(loss: Any) -> Any:
    # the graph is gone after backward; callers log the value
    return loss.detach() if isinstance(loss, torch.Tensor) else loss


def _norm(g: torch.Tensor) -> torch.Tensor:
    # a half-precision gradient's norm is taken in float32, where its square cannot overflow
    return torch.linalg.vector_norm(g, 2, dtype=torch.promote_types(g.dtype, torch.float32))


class SAM(torch.optim.Optimizer):
    """SAM / ASAM / USAM around any base optimizer (see the module docstring).

    Args:
        params: parameters or parameter groups (groups may override ``rho``, ``adaptive`` ...).
        base_optimizer: an optimizer *class*, e.g. ``torch.optim.SGD``, built on the same parameter
            groups (so an LR scheduler may wrap SAM or the base optimizer).
        rho: perturbation radius, >= 0. (Default: 0.05, Shin et al. / Foret et al.)
        adaptive: ASAM. (Default: False)
        adaptive_eta: ASAM's offset in ``T = |w| + eta``. (Default: 0.01, Kwon et al.)
        adaptive_scope: what ASAM rescales, ``"weights"`` (official ASAM) or ``"all"``. (Default: "weights")
        unnormalized: USAM, ``e = rho * g``. (Default: False)
        eps: added to the gradient norm. (Default: 1e-12, as in the authors' code)
        weight_decay: L2 coefficient applied by SAM at the unperturbed weights after clipping (as
            SGD's own); a decoupled base (AdamW) gets it as its own decay, and keeps its default
            when it is not given. (Default: None, i.e. 0 for a coupled base)
        weight_decay_in_ascent: the decay as part of the loss, in both passes. (Default: False)
        max_grad_norm: clip the descent gradient to this total norm. (Default: None)
        model: the module trained (possibly DDP-wrapped): **pass it whenever the model has BatchNorm
            or runs under DDP**. The clean pass then runs under ``model.no_sync()`` (a perturbation
            per device, as in the paper), the perturbed pass with the running statistics of its
            BatchNorm and InstanceNorm layers frozen, and its names select ASAM's weights. (Default: None)
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        adaptive_scope: str = "weights",
        unnormalized: bool = False,
        eps: float = 1e-12,
        weight_decay: float | None = None,
        weight_decay_in_ascent: bool = False,
        max_grad_norm: float | None = None,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        groups.check_base_optimizer(base_optimizer)
        groups.check_arguments(
            rho=rho, adaptive_eta=adaptive_eta, eps=eps, weight_decay=weight_decay,
            adaptive_scope=adaptive_scope, max_grad_norm=max_grad_norm,
        )  # fmt: skip
        defaults = dict(
            rho=rho, adaptive=adaptive, adaptive_eta=adaptive_eta, adaptive_scope=adaptive_scope,
            unnormalized=unnormalized, sam_weight_decay=weight_decay or 0.0, weight_decay_in_ascent=weight_decay_in_ascent,
        )  # fmt: skip
        super().__init__(params, defaults)
        self.eps, self.max_grad_norm, self.model = eps, max_grad_norm, model
        for group in self.param_groups:
            groups.check_group(group)
        self._asam = AsamScaling(model, self.param_groups)
        own_decay = ["weight_decay" in g for g in self.param_groups]  # set per group for the base optimizer
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one list, so schedulers and clipping act on both
        self.defaults.update(self.base_optimizer.defaults)
        self.decoupled_weight_decay = groups.settle_weight_decay(
            self.base_optimizer, self.defaults, own_decay, weight_decay
        )
        self._perturbed = False
        self._left_gradients = LeftGradients()  # to tell a caller's clean pass from SAM's leftovers

    def _params(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    # ----------------------------------------------------------------------------- two-step API
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_inv_scale: float = 1.0) -> float:
        """Move to ``w + e`` using the current gradients; returns the ascent gradient norm.
        ``grad_inv_scale`` multiplies the gradients first (``1 / scaler.get_scale()`` for a GradScaler)."""
        if self._perturbed:
            raise RuntimeError("first_step() called twice without second_step() in between")
        grads, scales = {}, {}
        for group, p in self._params():
            g = p.grad * grad_inv_scale if grad_inv_scale != 1.0 else p.grad
            if group["weight_decay_in_ascent"] and group["sam_weight_decay"]:
                g = g.add(p, alpha=group["sam_weight_decay"])
            grads[p], scales[p] = g, self._asam.scale(group, p)
        norms = [_norm(g if scales[p] is None else g * scales[p]) for p, g in grads.items()]
        grad_norm = torch.linalg.vector_norm(torch.stack(norms), 2) if norms else torch.zeros(())
        for group, p in self._params():
            self.state[p]["unperturbed"] = p.detach().clone()
            e = grads[p] if scales[p] is None else grads[p] * scales[p] * scales[p]
            factor = group["rho"] if group["unnormalized"] else group["rho"] / (grad_norm + self.eps)
            p.add_((e * factor).to(p.dtype))
        self._perturbed = True
        if zero_grad:
            self.zero_grad()
            self._seed_ascent_decay(1.0 / grad_inv_scale)
        return float(grad_norm)

    @torch.no_grad()
    def _seed_ascent_decay(self, scale: float) -> None:
        """With ``weight_decay_in_ascent``, start the perturbed gradient at ``wd * (w + e)`` (times
        the GradScaler's scale, as the backward's gradients are scaled), the decay term of the loss
        at the perturbed point. The perturbed backward accumulates onto it, so under DDP it is
        averaged with the rest: each rank has its own ``e``, and a term added after the all-reduce
        would leave the ranks with different weights."""
        for group in self.param_groups:
            wd = group["sam_weight_decay"]
            if not (group["weight_decay_in_ascent"] and wd):
                continue
            for p in group["params"]:
                if "unperturbed" in self.state[p]:
                    p.grad = p.detach().mul(wd * scale)
                    self.state[p]["ascent_decay_seeded"] = True

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the unperturbed weights back (no optimizer step)."""
        if not self._perturbed:
            raise RuntimeError("second_step()/restore() called without a preceding first_step()")
        for group, p in self._params():
            seeded = self.state[p].pop("ascent_decay_seeded", False)
            if group["weight_decay_in_ascent"] and group["sam_weight_decay"] and not seeded:
                # the loss term wd/2 ||w||^2 differentiated at the perturbed point; only reached when
                # first_step() left the gradients to the caller (zero_grad=False), see _seed_ascent_decay
                p.grad.add_(p.detach(), alpha=group["sam_weight_decay"])
        self._copy_back_unperturbed()

    @torch.no_grad()
    def _copy_back_unperturbed(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].pop("ascent_decay_seeded", None)
                saved = self.state[p].pop("unperturbed", None)
                if saved is not None:
                    p.copy_(saved)
        self._perturbed = False

    @contextlib.contextmanager
    def perturbed_pass(self) -> Iterator[None]:
        """The block of the forward and backward at ``w + e``: BatchNorm running statistics frozen
        (with ``model=``); if it raises (out of memory, Ctrl-C), ``w`` is copied back first."""
        try:
            with torch.enable_grad(), frozen_batchnorm_stats(self.model):
                yield
        except BaseException:  # KeyboardInterrupt too: a resumed run must not start from w + e
            if self._perturbed:
                self._copy_back_unperturbed()
            raise

    def _descent_gradient_ready(self) -> None:
        # Clip first, then decay: this is where torch.optim.SGD adds its own weight_decay (inside
        # step()), so SAM's weight_decay and the base optimizer's give the same update.
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self._params()], self.max_grad_norm)
        for group, p in self._params():
            if group["sam_weight_decay"] and not group["weight_decay_in_ascent"]:
                p.grad.add_(p.detach(), alpha=group["sam_weight_decay"])

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and take the base optimizer's step with the gradient taken at ``w + e``."""
        self.restore()
        self._descent_gradient_ready()
        self.base_optimizer.step()
        # torch's LR schedulers wrap step() to learn that the optimizer stepped (and warn if not);
        # this half steps it without step(), so it says so itself
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    # ----------------------------------------------------------------------------- closure API
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], torch.Tensor] | None = None,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        chunks: Sequence[Any] | None = None,
        chunk_weights: Sequence[float] | None = None,
    ) -> torch.Tensor | None:
        """One SAM step. ``closure`` zeroes nothing, computes the loss, calls ``backward``
        (``grad_scaler.scale(loss).backward()`` with a scaler; a non-finite clean gradient then
        skips the step) and returns the loss. With ``chunks``: :meth:`step_chunked`.

        * ``optimizer.step(closure)`` alone: SAM zeroes the gradients and runs the closure twice, at
          ``w`` (under ``model.no_sync()`` with a DDP ``model=``) and at ``w + e``; returns the
          clean-pass loss.
        * davda54/sam's ``loss.backward(); optimizer.step(closure)``: gradients written since SAM's
          last step are the clean pass (under DDP it synchronises unless the caller wraps it in
          ``model.no_sync()``); the closure runs once, at ``w + e``; returns the perturbed-pass loss.
        """
        if closure is None:
            raise ValueError(
                "SAM.step() needs a closure that computes the loss and calls backward(); it is run "
                "twice (at w and at w + e). Without one, call first_step() and second_step() yourself."
            )
        callers_clean_pass = self._left_gradients.fresh(p for _, p in self._params())
        try:
            if chunks is not None:
                return chunked_step(self, closure, chunks, chunk_weights, grad_scaler, callers_clean_pass)
            loss = None if callers_clean_pass else self._clean_pass(closure)
            if grad_scaler is not None and grad_scaler.is_enabled():
                return scaled_second_half(self, closure, loss, grad_scaler)
            self.first_step(zero_grad=True)
            with self.perturbed_pass():
                perturbed_loss = _detached(closure())
            self.second_step()
            return loss if loss is not None else perturbed_loss
        finally:
            self._left_gradients.remember(p for _, p in self._params())

    def _clean_pass(self, closure: Callable[..., torch.Tensor], *args: Any) -> Any:
        self.zero_grad()
        # the clean pass stays local, so under DDP each device perturbs with its own gradient
        with torch.enable_grad(), local_gradients(self.model):
            return _detached(closure(*args))

    def step_chunked(
        self, closure: Callable[[Any], torch.Tensor], chunks: Sequence[Any], weights: Sequence[float]
    ) -> torch.Tensor:
        """m-sharpness (Foret et al., Sec. 4.1): ``closure(chunk)`` computes a chunk's mean loss and
        calls backward; each chunk gets its own perturbation and the base step takes
        ``sum_k weights[k] * grad L_k(w + e_k)``. Returns the weighted clean loss. Goes through
        :meth:`step`, so LR schedulers see it; details in :mod:`~sam_overparam.optim.msharpness`."""
        return self.step(closure, chunks=chunks, chunk_weights=weights)

    # ----------------------------------------------------------------------------- state
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:  # a seeded decay term is gone with the gradients: restore() adds it
            for p in group["params"]:
                self.state[p].pop("ascent_decay_seeded", None)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; its param groups carry SAM's settings too."""
        if self._perturbed:
            raise RuntimeError("state_dict() between first_step() and second_step(): the weights are perturbed")
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict rebinds the list
        for group in self.param_groups:
            groups.complete_loaded_group(group, self.defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # torch's Optimizer.__init__ adds the first groups
            super().add_param_group(param_group)
            return
        decoupled_base = type(self.base_optimizer).__name__ if self.decoupled_weight_decay else None
        groups.complete_group(param_group, self.defaults, decoupled_base=decoupled_base)
        self.base_optimizer.add_param_group(param_group)
        self._asam.add_group(self.param_groups[-1])
