"""Models, sparsity masks and offline data."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sam_overparam import data, models
from sam_overparam.optim import SAM


def test_mlp_and_resnet_shapes_and_width_scaling():
    small, large = models.MLP(40, [30, 10], 10), models.MLP(40, [300, 100], 10)
    assert models.count_parameters(small) == 40 * 30 + 30 + 30 * 10 + 10 + 10 * 10 + 10
    assert models.count_parameters(large) > 10 * models.count_parameters(small)
    assert small(torch.randn(3, 40)).shape == (3, 10)
    resnet = models.CifarResNet(4, blocks=(1, 1), num_classes=5, in_channels=1)
    assert resnet(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    assert models.count_parameters(models.CifarResNet(8)) > 3 * models.count_parameters(models.CifarResNet(4))
    net = models.ReLUNet1D(10)
    assert net(torch.randn(7, 1)).shape == (7,)
    with pytest.raises(ValueError, match=r"hidden width must be >= 1"):
        models.MLP(4, [0], 2)
    with pytest.raises(ValueError, match=r"filters must be >= 1"):
        models.CifarResNet(0)


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_per_layer_masks_have_exact_density(method):
    torch.manual_seed(0)
    model = models.MLP(40, [50, 20], 10)
    masks = models.compute_masks(model, method, 0.8, generator=torch.Generator().manual_seed(1))
    for name, module in models.prunable_weights(model).items():
        assert int(masks[name].sum()) == round(0.2 * module.weight.numel())
    if method == "magnitude":
        first = model.net[0].weight.detach().abs()
        kept, dropped = first[masks["net.0"]], first[~masks["net.0"]]
        assert kept.min() >= dropped.max()


def test_snip_is_global_top_grad_times_weight():
    torch.manual_seed(0)
    model = models.MLP(6, [8], 3)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    masks = models.compute_masks(model, "snip", 0.75, batch=(x, y), loss_fn=loss_fn)
    loss_fn(model, (x, y)).backward()
    scores = torch.cat([(m.weight.grad * m.weight).abs().reshape(-1) for m in models.prunable_weights(model).values()])
    keep = round(0.25 * scores.numel())
    threshold = scores.sort(descending=True).values[keep - 1]
    flat_masks = torch.cat([masks[n].reshape(-1) for n in models.prunable_weights(model)])
    assert int(flat_masks.sum()) == keep
    assert bool((scores[flat_masks] >= threshold).all()) and bool((scores[~flat_masks] <= threshold).all())
    # global: layers end up with different densities
    densities = {n: float(m.float().mean()) for n, m in masks.items()}
    assert len({round(d, 3) for d in densities.values()}) > 1


def test_snip_scoring_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = models.CifarResNet(4, blocks=(1, 1), num_classes=3, in_channels=1)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    buffers = {name: value.clone() for name, value in model.named_buffers()}
    scorer = copy.deepcopy(model)
    masks = models.compute_masks(model, "snip", 0.5, batch=(x, y), loss_fn=loss_fn)
    assert model.training
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name
    # the scores still come from a training-mode forward (batch statistics), as in SNIP
    loss_fn(scorer, (x, y)).backward()
    layers = models.prunable_weights(scorer)
    scores = torch.cat([(m.weight.grad * m.weight).abs().reshape(-1) for m in layers.values()])
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.topk(round(0.5 * scores.numel())).indices] = True
    assert torch.equal(torch.cat([masks[name].reshape(-1) for name in layers]), keep)


def test_masks_apply_in_every_forward_and_survive_sam_training():
    torch.manual_seed(0)
    model = models.MLP(40, [32, 16], 10)
    models.sparsify(model, "random", 0.9, generator=torch.Generator().manual_seed(3))
    layer = model.net[0]
    mask = layer.parametrizations.weight[0].mask.bool()
    assert bool((layer.weight[~mask] == 0).all())
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    out = model(x)
    with torch.no_grad():  # masked entries of the stored weight have no effect on the output
        layer.parametrizations.weight.original[~mask] = 123.0
    torch.testing.assert_close(model(x), out)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    assert bool((layer.weight[~mask] == 0).all())
    dense = sum(p.numel() for p in model.parameters())
    assert models.count_parameters(model) == dense - sum(
        int((m.parametrizations.weight[0].mask == 0).sum()) for m in models.prunable_weights(model).values()
    )
    state = model.state_dict()  # masks are saved with the model
    assert any(key.endswith("weight.0.mask") for key in state)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    model = models.MLP(4, [4], 2)
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        models.sparsify(model, "random", bad)
    with pytest.raises(ValueError, match=r"unknown sparsity method 'lottery'"):
        models.compute_masks(model, "lottery", 0.5)


def test_snip_without_batch_is_rejected():
    with pytest.raises(ValueError, match=r"snip masks need a batch"):
        models.compute_masks(models.MLP(4, [4], 2), "snip", 0.5)


def test_mnist1d_generated_locally_any_size_and_seeded(monkeypatch):
    import mnist1d.data

    def no_download(*args, **kwargs):
        raise AssertionError("get_dataset downloads; it must not be called")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    random.seed(123)
    np.random.seed(123)
    expected_python, expected_numpy = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    split = data.mnist1d(num_train=203, num_test=57, seed=5)
    assert (random.random(), np.random.rand()) == (expected_python, expected_numpy)  # global RNGs untouched
    assert split.x_train.shape == (203, 40) and split.x_test.shape == (57, 40)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert set(split.y_train.tolist()) <= set(range(10))
    again = data.mnist1d(num_train=203, num_test=57, seed=5)
    assert torch.equal(split.x_train, again.x_train) and torch.equal(split.y_test, again.y_test)
    other = data.mnist1d(num_train=203, num_test=57, seed=6)
    assert not torch.equal(split.x_train, other.x_train)


def test_symmetric_label_noise_flips_exact_fraction_to_other_classes():
    labels = torch.arange(1000) % 10
    noisy, corrupted = data.symmetric_label_noise(labels, 0.3, 10, seed=1)
    assert int(corrupted.sum()) == 300
    assert bool((noisy[corrupted] != labels[corrupted]).all())
    assert torch.equal(noisy[~corrupted], labels[~corrupted])
    counts = torch.bincount(noisy[corrupted], minlength=10)
    assert int(counts.min()) > 10  # every class receives flipped labels
    with pytest.raises(ValueError, match=r"label noise fraction must lie in \[0, 1\], got 1.5"):
        data.symmetric_label_noise(labels, 1.5, 10)


def test_teacher_student_regression_interpolates_exactly():
    split, teacher = data.teacher_student_regression(20, 30, teacher_width=3, seed=2, dtype=torch.float64)
    student = models.ReLUNet1D(10).double()
    with torch.no_grad():  # the teacher embedded in a wider student, extra neurons silent
        student.hidden.weight.zero_()
        student.hidden.bias.zero_()
        student.out.weight.zero_()
        student.hidden.weight[:3] = teacher.hidden.weight
        student.hidden.bias[:3] = teacher.hidden.bias
        student.out.weight[:, :3] = teacher.out.weight
        student.out.bias.copy_(teacher.out.bias)
    assert float(((student(split.x_train).detach() - split.y_train) ** 2).mean()) == 0.0
    assert split.x_train.abs().max() <= 1.0
    again, _ = data.teacher_student_regression(20, 30, teacher_width=3, seed=2, dtype=torch.float64)
    assert torch.equal(again.y_test, split.y_test)


def test_models_are_plain_modules():
    assert isinstance(models.mlp_for_budget(40, 10, 300), nn.Module)
    assert [m.out_features for m in models.mlp_for_budget(40, 10, 300).net if isinstance(m, nn.Linear)] == [
        300,
        100,
        10,
    ]
