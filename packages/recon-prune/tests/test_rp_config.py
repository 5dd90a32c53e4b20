"""Every bad configuration gets a clear error before any work."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from rp_models import make_model

from recon_prune import prune
from recon_prune.config import PruneConfig, parse_pattern


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "obs"}, "unknown method 'obs'; expected one of magnitude, wanda, sparsegpt"),
        ({"sparsity": 1.0}, r"sparsity must lie in \[0, 1\), got 1.0"),
        ({"sparsity": -0.1}, r"sparsity must lie in \[0, 1\), got -0.1"),
        ({"sparsity": "half"}, "sparsity must be a number"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "4:4"}, "0 < N < M"),
        ({"pattern": "0:4"}, "0 < N < M"),
        ({"pattern": "2-4"}, "malformed"),
        ({"pattern": "2:4:8"}, "malformed"),
        ({"pattern": "2:4", "sparsity": 0.7}, "contradicts pattern '2:4'"),
        ({"pattern": "2:3"}, "blocksize=128 must be a multiple of M=3"),
        ({"reconstruction": "full"}, "unknown reconstruction 'full'"),
        ({"preset": "gpu"}, "unknown preset 'gpu'"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


def test_pattern_and_reconstruction_normalization() -> None:
    config = PruneConfig(pattern=" 2 : 4 ", reconstruction="CR")
    assert config.pattern == "2:4" and config.sparsity == 0.5 and config.nm == (2, 4)
    assert config.reconstruction == "br+cr" and config.uses_cr and not config.uses_gp
    assert PruneConfig(reconstruction="gp+cr").reconstruction == "br+gp+cr"
    assert parse_pattern("unstructured") is None
    assert PruneConfig(pattern="4:8").sparsity == 0.5


def test_presets() -> None:
    paper = PruneConfig(preset="paper")
    hp = paper.hparams("opt")
    assert (hp.lr, hp.epochs, hp.batch_size, hp.betas, hp.eps, hp.grad_clip, hp.weight_decay) == (
        2e-4,
        10,
        8,
        (0.9, 0.95),
        1e-8,
        1000.0,
        0.0,
    )
    assert paper.hparams("llama").epochs == 5
    assert (paper.resolved_nsamples(), paper.resolved_seq_len()) == (256, 1024)
    cpu = PruneConfig(preset="cpu", epochs=7)
    assert cpu.hparams("llama").epochs == 7 and cpu.resolved_seq_len() == 512


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device": "gpu"}, "device='gpu' is not a device; expected a device string such as 'auto', 'cpu'"),
        ({"device": ""}, "device must be a device string"),
        ({"device": "meta"}, "device='meta': device type 'meta' is not supported"),
        ({"offload_device": "auto"}, "offload_device='auto' is not a device"),
        ({"offload_device": "gpu:0"}, "offload_device='gpu:0' is not a device"),
    ],
)
def test_bad_device(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


def test_cuda_device_must_exist() -> None:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        with pytest.raises(ValueError, match="device='cuda' but CUDA is not available on this machine"):
            PruneConfig(device="cuda")
    else:
        PruneConfig(device="cuda")
    with pytest.raises(ValueError, match=f"device='cuda:{count}' but"):
        PruneConfig(device=f"cuda:{count}")
    assert PruneConfig(device="cpu", offload_device="cpu").device == "cpu"


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_lr_without_sparsegpt_warns_once_that_it_changes_nothing(
    method: str, calib_ids: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    fast = {"device": "cpu", "blocksize": 16}
    with caplog.at_level("WARNING", logger="recon_prune"):
        config = dataclasses.replace(PruneConfig(method=method, reconstruction="lr", **fast), seq_len=16)
        prune(make_model("llama"), calib_ids, config)
    warnings = [r.getMessage() for r in caplog.records if "equals reconstruction='none'" in r.getMessage()]
    assert len(warnings) == 1 and repr(method) in warnings[0]  # building and copying the config says nothing
    caplog.clear()
    with caplog.at_level("WARNING", logger="recon_prune"):
        prune(make_model("llama"), calib_ids, PruneConfig(method="sparsegpt", reconstruction="lr", **fast))
    assert not [r for r in caplog.records if "equals reconstruction='none'" in r.getMessage()]
