"""How far apart the same emulated training lands at 1 and at 2 BLAS threads.

Trains a 4-layer d=64 decoder at P=4 (emulated asynchronous 1F1B, stdlib bytes) for 12 minibatches
at each thread count and prints the mean and largest absolute difference of the 12 training losses
and the largest parameter difference, for AdamW and basis rotation (refresh every 10 and every 2).

    OMP_NUM_THREADS=2 python tools/bench/br_thread_gap.py
"""

from __future__ import annotations

import torch

from basisrot_pipeline.emulator import build_emulator
from basisrot_pipeline.train import TrainConfig, make_batches
from shin_common import load_config

STEPS = 12


def train_at(threads: int, optimizer: str, frequency: int) -> tuple[list[float], list[torch.Tensor]]:
    config = load_config(
        TrainConfig,
        overrides=[
            "model.n_layer=4",
            "model.n_embd=64",
            "model.n_head=4",
            "model.block_size=64",
            "batch_size=16",
            "stages=4",
            f"steps={STEPS}",
            f"optim.name={optimizer}",
            f"optim.precondition_frequency={frequency}",
            "optim.warmup_steps=2",
            "optim.lr=3e-3",
            "checkpoint_every=0",
        ],
    )
    batches, _, _ = make_batches(config)
    caller = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, emulator = build_emulator(config.model, config.optim, config.delays(), total_steps=STEPS, seed=0)
        losses = [emulator.step(*batches.batch(m)) for m in range(STEPS)]
    finally:
        torch.set_num_threads(caller)
    return losses, [p.detach().clone() for p in model.parameters()]


def main() -> None:
    for optimizer, frequency in (("adamw", 10), ("basis-rotation", 10), ("basis-rotation", 2)):
        one, params_one = train_at(1, optimizer, frequency)
        two, params_two = train_at(2, optimizer, frequency)
        gaps = [abs(a - b) for a, b in zip(one, two, strict=True)]
        weights = max(float((a - b).abs().max()) for a, b in zip(params_one, params_two, strict=True))
        print(
            f"{optimizer:>15} refresh {frequency:>2}: loss gap mean {sum(gaps) / len(gaps):.2e} "
            f"max {max(gaps):.2e}  largest weight gap {weights:.2e}"
        )


if __name__ == "__main__":
    main()
