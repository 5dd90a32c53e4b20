"""Two-process gloo run of one SAM step through accelerate (launched by test_sam_ddp.py).

Run as ``python sam_ddp_worker.py OUT_DIR PORT``; rank 0 writes the updated parameters to
``OUT_DIR/ddp.pt``. Not collected by pytest (no ``test_`` prefix).

The ``amp_overflow`` mode uses a GradScaler and makes the clean pass overflow on rank 1 only in
the first step: both ranks must skip that step (a rank that went on would wait in the perturbed
pass's all-reduce), then take the second one normally.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

WORLD_SIZE = 2
OVERFLOW_RANK = 1
INIT_SCALE = 2.0**12


def build_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(16, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (16,), generator=generator)


def worker(rank: int, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_WORLD_SIZE=str(WORLD_SIZE),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from accelerate import Accelerator, InitProcessGroupKwargs

    from sam_overparam.optim import SAM

    # a short collective timeout turns a rank waiting for a skipped pass into an error, not a hang
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60))
    accelerator = Accelerator(cpu=True, kwargs_handlers=[timeout])
    assert accelerator.num_processes == WORLD_SIZE, accelerator.state
    x, y = global_batch()
    shard = slice(rank * 8, (rank + 1) * 8)
    results = {}
    for mode in ("per_device", "chunked"):
        model = accelerator.prepare(build_model())
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9, model=model)
        opt = accelerator.prepare(opt)

        def closure(chunk=(x[shard], y[shard]), model=model):
            loss = F.cross_entropy(model(chunk[0]), chunk[1])
            accelerator.backward(loss)
            return loss

        for _ in range(2):
            if mode == "per_device":
                opt.step(closure)
            else:  # two chunks of 4 per device: m = 4
                xs, ys = x[shard], y[shard]
                opt.optimizer.step_chunked(closure, [(xs[:4], ys[:4]), (xs[4:], ys[4:])], [0.5, 0.5])
        unwrapped = accelerator.unwrap_model(model)
        results[mode] = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
    results["amp_overflow"] = amp_overflow_run(accelerator, rank, x[shard], y[shard], SAM)
    results["decay_in_ascent"] = decay_in_ascent_run(accelerator, x[shard], y[shard], SAM)
    results["all_reduces_per_step"] = count_all_reduces(accelerator, x[shard], y[shard], SAM)
    gathered = [None] * WORLD_SIZE
    torch.distributed.all_gather_object(gathered, results["amp_overflow"])
    results["amp_overflow_all_ranks"] = gathered
    gathered = [None] * WORLD_SIZE
    torch.distributed.all_gather_object(gathered, results["decay_in_ascent"])
    results["decay_in_ascent_all_ranks"] = gathered
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "ddp.pt"))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def amp_overflow_run(accelerator, rank: int, x: torch.Tensor, y: torch.Tensor, sam_class) -> dict:
    model = accelerator.prepare(build_model())
    opt = sam_class(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        loss = F.cross_entropy(model(x), y)
        if rank == OVERFLOW_RANK and calls["n"] == 1:
            loss = loss * float("inf")  # the first clean pass overflows here only
        scaler.scale(loss).backward()
        return loss

    scales = []
    for _ in range(2):
        opt.step(closure, grad_scaler=scaler)
        scaler.update()
        scales.append(float(scaler.get_scale()))
    params = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).named_parameters()}
    return {"params": params, "scales": scales, "closure_calls": calls["n"]}


DECAY_STEPS = 3


def decay_in_ascent_run(accelerator, x: torch.Tensor, y: torch.Tensor, sam_class) -> dict:
    """``weight_decay_in_ascent=True`` for a few steps, through the closure form, the two-step form
    and m-sharpness chunks; returns each form's parameters (the test compares the ranks)."""
    out = {}
    for form in ("step", "two_step", "chunked"):
        model = accelerator.prepare(build_model())
        opt = sam_class(
            model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9, model=model,
            weight_decay=0.1, weight_decay_in_ascent=True,
        )  # fmt: skip

        def closure(chunk=(x, y), model=model):
            loss = F.cross_entropy(model(chunk[0]), chunk[1])
            loss.backward()
            return loss

        for _ in range(DECAY_STEPS):
            if form == "step":
                opt.step(closure)
            elif form == "two_step":
                with model.no_sync():  # the clean pass per device, as SAM's closure form runs it
                    closure()
                opt.first_step(zero_grad=True)
                closure()
                opt.second_step(zero_grad=True)
            else:
                opt.step_chunked(closure, [(x[:4], y[:4]), (x[4:], y[4:])], [0.5, 0.5])
        out[form] = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).named_parameters()}
    return out


def count_all_reduces(accelerator, x: torch.Tensor, y: torch.Tensor, sam_class) -> dict:
    """All-reduces of gradients per SAM step: DDP's bucket reductions (a comm hook sees each) and
    any ``torch.distributed.all_reduce`` issued from Python outside the hook, for ``step`` and for
    ``step_chunked`` with four chunks per device."""
    plain_all_reduce = torch.distributed.all_reduce
    counts: dict = {}

    def counted_all_reduce(*args, **kwargs):
        counts["python"][-1] += 1
        return plain_all_reduce(*args, **kwargs)

    def counted_hook(state, bucket):
        # the average DDP's default hook takes, with the unpatched all_reduce so it counts once
        counts["bucket"][-1] += 1
        tensor = bucket.buffer().div_(torch.distributed.get_world_size())
        return plain_all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    results = {}
    torch.distributed.all_reduce = counted_all_reduce
    try:
        for mode in ("step", "chunked"):
            model = accelerator.prepare(build_model())
            model.register_comm_hook(None, counted_hook)
            opt = sam_class(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9, model=model)

            def closure(chunk=(x, y), model=model):
                loss = F.cross_entropy(model(chunk[0]), chunk[1])
                loss.backward()
                return loss

            counts.update(bucket=[], python=[])
            for _ in range(2):
                counts["bucket"].append(0)
                counts["python"].append(0)
                if mode == "step":
                    opt.step(closure)
                else:
                    opt.step_chunked(closure, [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)], [0.25] * 4)
            results[mode] = {key: list(value) for key, value in counts.items()}
    finally:
        torch.distributed.all_reduce = plain_all_reduce
    return results


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=WORLD_SIZE, join=True)
