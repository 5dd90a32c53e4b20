"""Parameter counts in closed form, and the width that meets a parameter budget.

Shin et al. (arXiv 2311.17539, Sec. 4.3) compare networks at a *fixed* number of parameters:
wider but sparser against narrower and dense. :func:`width_for_budget` picks, for a sparsity, the
width whose effective (unmasked) parameter count is closest to the budget, for the two sweep
families: the MLP ``[w, w // 3]`` (the paper's 3:1 MNIST shape) and the CIFAR-style ResNet with
``w`` first-stage filters. Counts follow :mod:`sam_overparam.models` exactly: only Linear and Conv
weights are masked, ``random`` and ``magnitude`` keep ``round((1 - s) n)`` weights per layer and
``snip`` ``round((1 - s) N)`` over all of them; biases and BatchNorm parameters stay dense.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["effective_parameters", "layer_sizes", "mlp_widths", "width_for_budget"]

FAMILIES = ("mlp", "resnet")


def mlp_widths(width: int) -> list[int]:
    """The sweep's MLP hidden widths for first width ``width``: ``[w, w // 3]`` (at least 1)."""
    return [width, max(1, width // 3)]


def layer_sizes(
    model: str,
    width: int,
    *,
    in_features: int = 40,
    num_classes: int = 10,
    blocks: Sequence[int] = (1, 1, 1, 1),
    in_channels: int = 1,
) -> tuple[list[int], int]:
    """``(prunable weight sizes, dense parameter count)`` of a model family at ``width``.

    (Defaults: mnist1d's 40 features and 10 classes, the trainer's ResNet blocks and one channel.)
    """
    if model not in FAMILIES:
        raise ValueError(f"model={model!r}: parameter counts are known for {', '.join(FAMILIES)}")
    if width < 1:
        raise ValueError(f"width={width}: expected >= 1")
    if model == "mlp":
        prunable, dense, previous = [], 0, in_features
        for hidden in [*mlp_widths(width), num_classes]:
            prunable.append(previous * hidden)
            dense += hidden  # the bias
            previous = hidden
        return prunable, dense
    prunable, dense = [in_channels * width * 9], 2 * width  # 3x3 stem and its BatchNorm
    in_planes = width
    for index, count in enumerate(blocks):
        planes = width * 2**index
        for block in range(count):
            stride = 2 if index > 0 and block == 0 else 1
            prunable += [in_planes * planes * 9, planes * planes * 9]
            dense += 4 * planes  # two BatchNorms
            if stride != 1 or in_planes != planes:  # 1x1 projection shortcut and its BatchNorm
                prunable.append(in_planes * planes)
                dense += 2 * planes
            in_planes = planes
    prunable.append(in_planes * num_classes)
    return prunable, dense + num_classes


def effective_parameters(
    model: str, width: int, *, sparsity: float = 0.0, method: str = "random", **shape: object
) -> int:
    """Trainable parameters left after masking a fraction ``sparsity`` of the weights with ``method``."""
    prunable, dense = layer_sizes(model, width, **shape)  # type: ignore[arg-type]
    if not sparsity:
        return dense + sum(prunable)
    density = 1.0 - sparsity
    if method == "snip":  # one global selection
        return dense + round(density * sum(prunable))
    return dense + sum(round(density * n) for n in prunable)


def width_for_budget(
    budget: int, *, model: str = "mlp", sparsity: float = 0.0, method: str = "random", **shape: object
) -> int:
    """The width whose effective parameter count is closest to ``budget`` (the smaller on a tie).

    The count grows with the width, so the search doubles an upper bound and bisects.
    """
    if budget < 1:
        raise ValueError(f"budget={budget}: expected a parameter count >= 1")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity}: expected a value in [0, 1)")

    def count(width: int) -> int:
        return effective_parameters(model, width, sparsity=sparsity, method=method, **shape)

    high = 1
    while count(high) < budget:
        high *= 2
    low = high // 2  # count(low) < budget <= count(high), or high == 1
    while high - low > 1:
        middle = (low + high) // 2
        if count(middle) < budget:
            low = middle
        else:
            high = middle
    if low >= 1 and budget - count(low) <= count(high) - budget:
        return low
    return high
