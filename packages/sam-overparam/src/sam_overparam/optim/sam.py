"""Sharpness-aware minimization (SAM) as a ``torch.optim.Optimizer`` that wraps any base optimizer.

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
ICLR 2021, Algorithm 1) takes two passes per step::

    g     = grad L_B(w)                              # clean pass
    e     = rho * g / (||g||_2 + eps)                # ascent, norm over *all* parameters
    g_sam = grad L_B(w + e)                          # perturbed pass
    w     = base_step(w, g_sam [+ wd * w])           # descent from the *unperturbed* weights

Variants, selected per parameter group:

* ``adaptive=True`` -- ASAM (Kwon et al., ICML 2021, eq. 9 and their Algorithm 1):
  ``T = |w| + adaptive_eta``, ``e = rho * T^2 g / ||T g||``. (Unlike davda54/sam, which uses
  ``T = |w|``, the ``eta`` offset of the official ASAM is kept so zero weights still move.) As in
  the official implementation (SamsungLabs/ASAM, ``asam.py``), only *weights* are rescaled:
  parameters whose name contains ``"weight"``; biases use ``T = 1``. Names come from ``model=``
  or from named parameters (``model.named_parameters()``); without names a parameter counts as
  a weight when it has more than one dimension (which leaves 1-D normalisation weights
  unscaled, unlike the name rule). ``adaptive_scope="all"`` rescales every parameter.
* ``unnormalized=True`` -- USAM, ``e = rho * g`` (Andriushchenko & Flammarion, ICML 2022), the form
  analysed by Shin et al. (arXiv 2311.17539, Sec. 5): linearised at a minimum it gives
  ``e+ = (I - eta (H_B + rho H_B^2)) e``.

Weight decay, following Shin et al.'s training details (and the authors' code), is applied
*outside* the ascent by default: the descent gradient gets ``wd * w`` at the unperturbed
weights, after any gradient clipping (exactly where ``torch.optim.SGD`` adds its own
``weight_decay``), and the ascent uses the plain loss gradient. ``weight_decay_in_ascent=True``
instead behaves as if ``wd/2 ||w||^2`` were part of the loss (google-research/sam): both passes
see it, the second at ``w + e``, and it is clipped with the loss gradient. A base optimizer that
*decouples* its decay from the gradient (``torch.optim.AdamW``, or any whose defaults say
``decoupled_weight_decay=True``; Loshchilov & Hutter, ICLR 2019) gets ``weight_decay`` as its own
decay instead, as davda54/sam passes it, so ``rho = 0`` is that optimizer exactly.

Two ways to call :meth:`SAM.step`: with a closure that computes the loss and calls backward, which
SAM runs twice (clean pass, then perturbed pass); or davda54/sam's form, ``loss.backward()`` first
and then ``step(closure)``, where SAM finds gradients written since its last step, takes them as
the clean pass and runs the closure once, as the perturbed pass.

BatchNorm: only with ``model=`` does SAM know which modules to freeze in the perturbed pass.
Without it (the default, since an optimizer only sees parameters) BatchNorm running statistics
are updated by *both* passes, the second time with statistics of the perturbed network.

The unperturbed weights are restored by *copy*, not by subtracting ``e``, so ``rho = 0`` (and
any rho in exact arithmetic) returns the base optimizer's update bit for bit.

``m``-sharpness (Foret et al., Sec. 4.1) is available through :meth:`SAM.step_chunked`: each
chunk of the batch gets its own perturbation and the perturbed gradients are averaged; in data
parallel training each device's shard is such a chunk (the first pass must not synchronise
gradients, see ``model=`` below).

The class holds the algorithm (SAM, ASAM, USAM, weight decay); what surrounds a step lives in
helpers beside it: :mod:`~sam_overparam.optim.amp` (GradScaler), :mod:`~sam_overparam.optim.distributed`
(the unsynchronised clean pass and the overflow agreement), :mod:`~sam_overparam.optim.msharpness`
(per-chunk perturbations) and :mod:`~sam_overparam.optim.batchnorm` (frozen running statistics).
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sam_overparam.optim.amp import scaled_second_half
from sam_overparam.optim.batchnorm import frozen_batchnorm_stats
from sam_overparam.optim.distributed import local_gradients
from sam_overparam.optim.msharpness import chunked_step

log = logging.getLogger(__name__)

__all__ = ["SAM"]

ADAPTIVE_SCOPES = ("weights", "all")
# SAM's own per-group settings (the rest of a group belongs to the base optimizer)
SAM_GROUP_KEYS = (
    "rho",
    "adaptive",
    "adaptive_eta",
    "adaptive_scope",
    "unnormalized",
    "sam_weight_decay",
    "weight_decay_in_ascent",
)


def _check_base_optimizer(base_optimizer: Any) -> None:
    if isinstance(base_optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"base_optimizer must be an optimizer class such as torch.optim.SGD, got the instance "
            f"{type(base_optimizer).__name__}(...); pass the class and its keyword arguments to SAM"
        )
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(
            f"base_optimizer must be a subclass of torch.optim.Optimizer (e.g. torch.optim.SGD), got {base_optimizer!r}"
        )


def _decouples_weight_decay(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` applies its ``weight_decay`` to the weights rather than to the gradient."""
    return isinstance(optimizer, torch.optim.AdamW) or bool(optimizer.defaults.get("decoupled_weight_decay", False))


def _detached(loss: Any) -> Any:
    # the graph is gone after backward; callers log the value
    return loss.detach() if isinstance(loss, torch.Tensor) else loss


def _check_number(name: str, value: Any, where: str = "") -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}{where}")


class SAM(torch.optim.Optimizer):
    """SAM / ASAM / USAM around any base optimizer.

    Args:
        params: parameters or parameter groups (groups may override ``rho``, ``adaptive`` ...).
        base_optimizer: an optimizer *class*, e.g. ``torch.optim.SGD``; it is built on the same
            parameter groups, so LR schedulers may wrap either SAM or the base optimizer.
        rho: perturbation radius, >= 0. (Default: 0.05, Shin et al. / Foret et al.)
        adaptive: ASAM scaling ``T = |w| + adaptive_eta``. (Default: False)
        adaptive_eta: ASAM's offset. (Default: 0.01, Kwon et al.)
        adaptive_scope: which parameters ASAM rescales: ``"weights"`` (the official ASAM: names
            containing ``"weight"`` when names are known from ``model=`` or named parameters,
            otherwise parameters with ``ndim > 1``; the rest get ``T = 1``) or ``"all"``.
            (Default: "weights")
        unnormalized: USAM, ``e = rho * g``. (Default: False)
        eps: added to the gradient norm. (Default: 1e-12, as in the authors' code)
        weight_decay: L2 coefficient handled by SAM. With ``weight_decay_in_ascent=False`` it is
            added at the unperturbed weights after clipping, so it is equivalent to the base
            optimizer's own ``weight_decay`` (for SGD, Adam). A decoupled base optimizer (AdamW)
            receives it as its own ``weight_decay`` instead; not given, such a base keeps its
            default (AdamW's 0.01). (Default: None, i.e. 0 for a coupled base)
        weight_decay_in_ascent: apply ``weight_decay`` in both passes as part of the loss instead
            of once at the unperturbed weights; it is then clipped with the loss gradient.
            (Default: False)
        max_grad_norm: clip the descent gradient (after unscaling, before the base step) to this
            total norm. (Default: None)
        model: the module being trained (possibly DDP-wrapped). **Pass it whenever the model has
            BatchNorm or runs under DDP**: :meth:`step` then runs the first pass under
            ``model.no_sync()`` (each device perturbs with its own gradient, as in the paper) and
            the second pass with BatchNorm running statistics frozen. Without it both passes
            update the running statistics and the first pass synchronises gradients (one
            global perturbation). Its parameter names also select ASAM's weights.
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
        _check_base_optimizer(base_optimizer)
        for name, value in (("rho", rho), ("adaptive_eta", adaptive_eta), ("eps", eps), ("weight_decay", weight_decay)):
            if value is not None:
                _check_number(name, value)
        if adaptive_scope not in ADAPTIVE_SCOPES:
            raise ValueError(f"adaptive_scope must be one of {ADAPTIVE_SCOPES}, got {adaptive_scope!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        defaults = dict(
            rho=rho,
            adaptive=adaptive,
            adaptive_eta=adaptive_eta,
            adaptive_scope=adaptive_scope,
            unnormalized=unnormalized,
            sam_weight_decay=weight_decay or 0.0,
            weight_decay_in_ascent=weight_decay_in_ascent,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.eps = eps
        self.max_grad_norm = max_grad_norm
        self.model = model
        # parameter -> name, for ASAM's "weights only" rule; named param groups take precedence
        self._param_names: dict[torch.Tensor, str] = (
            {p: name for name, p in model.named_parameters()} if model is not None else {}
        )
        for group in self.param_groups:
            self._record_names(group)
        # a group's own "weight_decay" is the base optimizer's; "sam_weight_decay" (or SAM's argument) is SAM's
        decay_keys = [("weight_decay" in g, weight_decay is not None) for g in self.param_groups]
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One list of group dicts for both, so schedulers and clipping act on what the base uses.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.decoupled_weight_decay = _decouples_weight_decay(self.base_optimizer)
        if self.decoupled_weight_decay:
            for group, (own, given) in zip(self.param_groups, decay_keys, strict=True):
                self._hand_decay_to_base(group, own_decay=own, sam_decay_given=given)
            if weight_decay is not None:  # groups added later get it the same way
                self.defaults.update(weight_decay=weight_decay, sam_weight_decay=0.0)
        self._perturbed = False
        # the gradients SAM's own last step left behind, to tell them from a user's clean pass
        self._left_gradients: dict[torch.Tensor, tuple[weakref.ref, int]] = {}

    def _hand_decay_to_base(self, group: dict[str, Any], *, own_decay: bool, sam_decay_given: bool) -> None:
        """Move SAM's decay of ``group`` to a decoupled base optimizer's ``weight_decay``.

        davda54/sam passes ``weight_decay`` to the base optimizer, so ``AdamW`` decays decoupled
        there too; adding it to the gradient as well would decay twice (L2 plus AdamW's default).
        """
        if not (group["sam_weight_decay"] or sam_decay_given):
            return  # nothing of SAM's: the base optimizer keeps its own (default) decay
        if group["weight_decay_in_ascent"] and group["sam_weight_decay"]:
            raise ValueError(
                "weight_decay_in_ascent=True makes the decay an L2 term of the loss, but the base optimizer "
                f"{type(self.base_optimizer).__name__} decouples its weight decay from the gradient: use a "
                "coupled base (SGD, Adam) for decay in the ascent, or drop weight_decay_in_ascent"
            )
        if own_decay:
            if group["sam_weight_decay"]:
                raise ValueError(
                    f"a parameter group sets weight_decay={group['weight_decay']!r} for the decoupled base "
                    f"optimizer and SAM has weight_decay={group['sam_weight_decay']!r}: give one, not both"
                )
            return
        group["weight_decay"] = group["sam_weight_decay"]
        group["sam_weight_decay"] = 0.0

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        checked = [("rho", "rho"), ("adaptive_eta", "adaptive_eta"), ("sam_weight_decay", "weight_decay")]
        if "weight_decay" in group:  # the base optimizer's own decay, set per group
            checked.append(("weight_decay", "weight_decay"))
        for key, shown in checked:
            _check_number(shown, group[key], f" in a parameter group (key {key!r})")
        if group["adaptive_scope"] not in ADAPTIVE_SCOPES:
            raise ValueError(
                f"adaptive_scope must be one of {ADAPTIVE_SCOPES}, got {group['adaptive_scope']!r} in a parameter group"
            )

    def _record_names(self, group: dict[str, Any]) -> None:
        if "param_names" not in group:
            return
        names, params = group["param_names"], group["params"]
        if len(names) != len(params):
            raise ValueError(
                f"a parameter group has {len(names)} param_names for {len(params)} params; "
                "expected one name per parameter"
            )
        for name, p in zip(names, params, strict=True):
            self._param_names[p] = name

    def _is_asam_weight(self, p: torch.Tensor) -> bool:
        name = self._param_names.get(p)
        # SamsungLabs/ASAM rescales parameters named "...weight..." and leaves biases alone
        return "weight" in name if name is not None else p.ndim > 1

    # ----------------------------------------------------------------------------- two-step API
    def _params(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    @torch.no_grad()
    def _grad_scale(self, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor | None:
        """ASAM's ``T`` for ``p``, or None for ``T = 1``."""
        if not group["adaptive"]:
            return None
        if group["adaptive_scope"] == "weights" and not self._is_asam_weight(p):
            return None
        return p.abs() + group["adaptive_eta"]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_inv_scale: float = 1.0) -> float:
        """Move to ``w + e`` using the current gradients; returns the ascent gradient norm.

        ``grad_inv_scale`` multiplies the gradients first (``1 / scaler.get_scale()`` when the
        clean pass was run with a ``torch.amp.GradScaler``).
        """
        if self._perturbed:
            raise RuntimeError("first_step() called twice without second_step() in between")
        grads: dict[torch.Tensor, torch.Tensor] = {}
        for group, p in self._params():
            g = p.grad * grad_inv_scale if grad_inv_scale != 1.0 else p.grad
            if group["weight_decay_in_ascent"] and group["sam_weight_decay"]:
                g = g.add(p, alpha=group["sam_weight_decay"])
            grads[p] = g
        norm_terms = []
        for group, p in self._params():
            scale = self._grad_scale(group, p)
            scaled = grads[p] if scale is None else grads[p] * scale
            norm_terms.append(
                torch.linalg.vector_norm(scaled, 2, dtype=torch.promote_types(scaled.dtype, torch.float32))
            )
        grad_norm = torch.linalg.vector_norm(torch.stack(norm_terms), 2) if norm_terms else torch.zeros(())
        for group, p in self._params():
            self.state[p]["unperturbed"] = p.detach().clone()
            scale = self._grad_scale(group, p)
            e = grads[p] if scale is None else grads[p] * scale * scale
            factor = group["rho"] if group["unnormalized"] else group["rho"] / (grad_norm + self.eps)
            p.add_((e * factor).to(p.dtype))
        self._perturbed = True
        if zero_grad:
            self.zero_grad()
        return float(grad_norm)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the unperturbed weights back (no optimizer step)."""
        if not self._perturbed:
            raise RuntimeError("second_step()/restore() called without a preceding first_step()")
        for group, p in self._params():
            if group["weight_decay_in_ascent"] and group["sam_weight_decay"]:
                # the loss term wd/2 ||w||^2 differentiated at the perturbed point
                p.grad.add_(p.detach(), alpha=group["sam_weight_decay"])
        self._copy_back_unperturbed()

    @torch.no_grad()
    def _copy_back_unperturbed(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                saved = self.state[p].pop("unperturbed", None)
                if saved is not None:
                    p.copy_(saved)
        self._perturbed = False

    @contextlib.contextmanager
    def perturbed_pass(self) -> Iterator[None]:
        """The block that runs the forward and backward at ``w + e``: BatchNorm running statistics
        are frozen (with ``model=``), and if the block raises (an out-of-memory error, say) the
        unperturbed weights are copied back before the exception leaves, so the model and the
        optimizer stay usable (the partial gradients are left as they are)."""
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
        """One SAM step. ``closure`` zeroes nothing, computes the loss on the batch, calls
        ``backward`` (``grad_scaler.scale(loss).backward()`` when a scaler is used) and returns the
        loss. With a scaler, call ``grad_scaler.update()`` afterwards as usual; a non-finite clean
        gradient skips the step. With ``chunks`` the step is m-sharpness: see :meth:`step_chunked`.

        Two forms, told apart by the gradients present when ``step`` is called:

        * ``optimizer.step(closure)`` alone: SAM zeroes the gradients and runs the closure twice,
          at ``w`` (under ``model.no_sync()`` with a DDP ``model=``) and at ``w + e``. Returns the
          clean-pass loss. Gradients left by SAM's own previous step, or zero-filled ones, do not
          count as a clean pass.
        * davda54/sam's ``loss.backward(); optimizer.step(closure)``: gradients written since SAM's
          last step are the clean pass, and the closure runs once, at ``w + e`` (with ``model=``,
          with BatchNorm statistics frozen, so they take one update per step, from the user's
          clean pass). Returns the perturbed-pass loss (the clean one is the caller's). The clean
          backward is the caller's, so under DDP it synchronises unless the caller wraps it in
          ``model.no_sync()``. Call ``zero_grad()`` after the step, as davda54/sam's README does.
        """
        if closure is None:
            raise ValueError(
                "SAM.step() needs a closure that computes the loss and calls backward(); it is run "
                "twice (at w and at w + e). Without one, call first_step() and second_step() yourself."
            )
        clean_pass_done = self._has_fresh_gradients()
        try:
            if chunks is not None:
                if grad_scaler is not None:
                    raise ValueError("m-sharpness chunks with a GradScaler are not supported")
                if clean_pass_done:
                    raise ValueError(
                        "step_chunked() runs each chunk's clean pass itself, but gradients were computed before "
                        "it; call zero_grad() before step_chunked()"
                    )
                return chunked_step(self, closure, chunks, chunk_weights)
            loss = None
            if clean_pass_done:
                log.debug("SAM.step(closure) after backward(): the closure is the perturbed pass only")
            else:
                self.zero_grad()
                with torch.enable_grad(), local_gradients(self.model):
                    loss = _detached(closure())
            if grad_scaler is not None and grad_scaler.is_enabled():
                return scaled_second_half(self, closure, loss, grad_scaler)
            self.first_step(zero_grad=True)
            with self.perturbed_pass():
                perturbed_loss = _detached(closure())
            self.second_step()
            return loss if loss is not None else perturbed_loss
        finally:
            self._remember_left_gradients()

    def _has_fresh_gradients(self) -> bool:
        """Whether a backward wrote gradients since SAM's last step (davda54/sam's form of ``step``):
        a gradient that is not the very tensor, unmodified, that SAM's last step left, and is not
        all zeros (``zero_grad(set_to_none=False)``)."""
        for _, p in self._params():
            left = self._left_gradients.get(p)
            unchanged = left is not None and left[0]() is p.grad and left[1] == p.grad._version
            if not unchanged and bool(p.grad.any()):
                return True
        return False

    def _remember_left_gradients(self) -> None:
        self._left_gradients = {p: (weakref.ref(p.grad), p.grad._version) for _, p in self._params()}

    def step_chunked(
        self, closure: Callable[[Any], torch.Tensor], chunks: Sequence[Any], weights: Sequence[float]
    ) -> torch.Tensor:
        """m-sharpness: one perturbation per chunk, one base step with the averaged gradient.

        ``closure(chunk)`` computes the chunk's mean loss and calls backward; ``weights`` (usually
        chunk size / batch size) combine the chunks' perturbed gradients
        ``sum_k weights[k] * grad L_k(w + e_k)`` with ``e_k`` from ``grad L_k(w)`` (Foret et al.,
        Sec. 4.1). Returns the weighted clean loss. (Goes through :meth:`step`, so LR schedulers
        see the step.) BatchNorm and DDP behaviour: see :mod:`sam_overparam.optim.msharpness`.
        """
        return self.step(closure, chunks=chunks, chunk_weights=weights)

    # ----------------------------------------------------------------------------- state
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; its param groups carry SAM's settings too."""
        if self._perturbed:
            raise RuntimeError("state_dict() between first_step() and second_step(): the weights are perturbed")
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`. torch replaces every group with the saved one, so SAM
        settings missing from an older checkpoint (one written before ``adaptive_scope``
        existed) are taken from this optimizer's constructor arguments, not silently changed."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict rebinds the list
        for group in self.param_groups:
            for key in SAM_GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
            self._check_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):
            super().add_param_group(param_group)
            return
        own_decay, sam_decay_given = "weight_decay" in param_group, "sam_weight_decay" in param_group
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self._check_group(param_group)
        if self.decoupled_weight_decay:
            self._hand_decay_to_base(param_group, own_decay=own_decay, sam_decay_given=sam_decay_given)
        self.base_optimizer.add_param_group(param_group)
        self._record_names(self.param_groups[-1])
