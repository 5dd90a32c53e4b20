"""Sharpness-aware minimization: the :class:`SAM` optimizer (SAM, ASAM, USAM) and the helpers around its step.

``sam.py`` holds the algorithm; around it: ``groups.py`` (checking and completing parameter groups,
who applies the weight decay), ``asam.py`` (ASAM's rescaling and which parameters it applies to),
``fresh_gradients.py`` (telling davda54/sam's ``loss.backward(); step(closure)`` form apart),
``amp.py`` (GradScaler), ``distributed.py`` (DDP), ``msharpness.py`` (per-chunk perturbations) and
``batchnorm.py`` (frozen running statistics).
"""

from sam_overparam.optim.batchnorm import frozen_batchnorm_stats
from sam_overparam.optim.distributed import found_inf_on_any_rank
from sam_overparam.optim.sam import SAM

# the name the tests (and earlier code) used for the overflow agreement
_found_inf_on_any_rank = found_inf_on_any_rank

__all__ = ["SAM", "found_inf_on_any_rank", "frozen_batchnorm_stats"]
