"""Data-parallel SAM (accelerate, two gloo processes on CPU) equals single-process m-sharpness."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from sam_overparam.optim import SAM

WORKER = Path(__file__).with_name("sam_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_worker_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sam_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """One two-process run serves every test here (process start-up dominates its cost)."""
    out_dir = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(WORKER), str(out_dir), str(_free_port())], check=True, env=env, timeout=240)
    return torch.load(out_dir / "ddp.pt")


def test_ddp_step_equals_single_process_on_same_global_batch(ddp_results):
    ddp_states = ddp_results
    worker = _load_worker_module()
    x, y = worker.global_batch()

    # Single process: each device's shard is one m-sharpness chunk (the perturbation is per device,
    # Shin et al.'s training details); the descent gradient is the average over shards.
    shards = [(x[:8], y[:8]), (x[8:], y[8:])]
    quarters = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    for mode, chunks in (("per_device", shards), ("chunked", quarters)):
        model = worker.build_model()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9, model=model)

        def closure(chunk, model=model):
            loss = F.cross_entropy(model(chunk[0]), chunk[1])
            loss.backward()
            return loss

        for _ in range(2):
            opt.step_chunked(closure, chunks, [1 / len(chunks)] * len(chunks))
        for name, value in model.state_dict().items():
            if "running" in name or "num_batches" in name:
                continue  # DDP broadcasts rank 0's buffers; single-process saw every shard
            torch.testing.assert_close(ddp_states[mode][name], value, rtol=1e-10, atol=1e-12, msg=f"{mode}: {name}")


def test_ddp_amp_overflow_on_one_rank_skips_the_step_on_every_rank(ddp_results):
    # The clean pass runs without gradient sync, so only rank 1 sees the overflow of the first
    # step; both ranks must agree to skip it. The second step is then the first real update.
    ranks = ddp_results["amp_overflow_all_ranks"]
    worker = _load_worker_module()
    x, y = worker.global_batch()
    model = worker.build_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9, model=model)

    def closure(chunk, model=model):
        loss = F.cross_entropy(model(chunk[0]), chunk[1])
        loss.backward()
        return loss

    opt.step_chunked(closure, [(x[:8], y[:8]), (x[8:], y[8:])], [0.5, 0.5])
    for rank, result in enumerate(ranks):
        # skipped step: the scale backs off once (x0.5) and then stays; 1 + 2 closure calls
        assert result["scales"] == [worker.INIT_SCALE / 2, worker.INIT_SCALE / 2], rank
        assert result["closure_calls"] == 3, rank
        for name, value in model.named_parameters():
            torch.testing.assert_close(result["params"][name], value.detach(), rtol=1e-10, atol=1e-12, msg=name)


def test_ddp_decay_in_ascent_keeps_ranks_identical_and_equal_to_single_process(ddp_results):
    # With weight_decay_in_ascent the decay wd * (w + e) is part of the perturbed gradient; each rank
    # has its own e, so the term must be averaged with the rest (it used to be added after the
    # all-reduce, and the ranks' weights drifted apart).
    worker = _load_worker_module()
    x, y = worker.global_batch()
    ranks = ddp_results["decay_in_ascent_all_ranks"]
    shards = [(x[:8], y[:8]), (x[8:], y[8:])]
    quarters = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    for form, chunks in (("step", shards), ("two_step", shards), ("chunked", quarters)):
        model = worker.build_model()
        opt = SAM(
            model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9, model=model,
            weight_decay=0.1, weight_decay_in_ascent=True,
        )  # fmt: skip

        def closure(chunk, model=model):
            loss = F.cross_entropy(model(chunk[0]), chunk[1])
            loss.backward()
            return loss

        for _ in range(worker.DECAY_STEPS):
            opt.step_chunked(closure, chunks, [1 / len(chunks)] * len(chunks))
        for name, value in model.named_parameters():
            for rank, result in enumerate(ranks):
                torch.testing.assert_close(
                    result[form][name], value.detach(), rtol=1e-10, atol=1e-12, msg=f"{form} rank {rank}: {name}"
                )


def test_one_gradient_all_reduce_per_step_also_with_m_sharpness_chunks(ddp_results):
    # The tiny model's gradients fit in one DDP bucket: one all-reduce per step whatever the chunk
    # count (each chunk's perturbed pass used to all-reduce: four per step here), and none besides.
    for mode in ("step", "chunked"):
        assert ddp_results["all_reduces_per_step"][mode] == {"bucket": [1, 1], "python": [0, 0]}, mode


def test_per_device_perturbation_differs_from_global_one():
    # Negative control for the test above: one perturbation from the global batch gives another
    # update, so agreement there is not automatic.
    worker = _load_worker_module()
    x, y = worker.global_batch()
    chunked, whole = worker.build_model(), worker.build_model()
    opt_chunked = SAM(chunked.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, model=chunked)
    opt_whole = SAM(whole.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, model=whole)

    def closure_for(model):
        def closure(chunk=(x, y)):
            loss = F.cross_entropy(model(chunk[0]), chunk[1])
            loss.backward()
            return loss

        return closure

    opt_chunked.step_chunked(closure_for(chunked), [(x[:8], y[:8]), (x[8:], y[8:])], [0.5, 0.5])
    opt_whole.step(closure_for(whole))
    assert not torch.allclose(chunked[0].weight, whole[0].weight, rtol=0, atol=1e-9)
