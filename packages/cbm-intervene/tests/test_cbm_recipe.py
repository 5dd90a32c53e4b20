"""The authors' training recipe (``TrainConfig(recipe="authors")``): each ingredient against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from cbm_tiny import TINY
from torch import nn

from cbm_intervene.cli import main
from cbm_intervene.data import SyntheticConfig, make_synthetic
from cbm_intervene.models import (
    RECIPES,
    TrainConfig,
    concept_imbalance_weights,
    concept_loss,
    fit,
    joint_loss,
    learning_rate_at,
    train_cbm,
)
from shin_common import load_json


@pytest.fixture(scope="module")
def small_data():
    config = SyntheticConfig(
        n_concepts=12, n_features=16, n_classes=6, n_groups=3, samples_per_class=40, weight_std=1.0, noise_std=0.5
    )
    return make_synthetic(config)


def test_authors_recipe_fills_every_unset_ingredient_and_keeps_what_is_given():
    config = TrainConfig(recipe="authors")
    assert (config.optimizer, config.momentum, config.weight_decay) == ("sgd", 0.9, 5e-5)
    assert (config.lr_gamma, config.min_learning_rate) == (0.1, 1e-4)
    assert config.weighted_concept_loss and config.normalize_joint_loss
    assert config.select_best_by == "val_accuracy"
    assert config.batch_size == 64 and config.patience == 100
    overridden = TrainConfig(recipe="authors", max_epochs=7, momentum=0.5)
    assert (overridden.max_epochs, overridden.momentum, overridden.optimizer) == (7, 0.5, "sgd")
    package = TrainConfig()  # the package's own recipe is unchanged
    assert (package.optimizer, package.learning_rate, package.select_best_by) == ("adam", 1e-3, "val_loss")
    assert not package.weighted_concept_loss and not package.normalize_joint_loss
    # a resolved config (as checkpoints store it) reads back equal
    assert TrainConfig(**{k: getattr(config, k) for k in RECIPES["authors"]} | {"recipe": "authors"}) == config


def test_recipe_errors_name_the_value():
    with pytest.raises(ValueError, match=r"recipe 'koh'.*expected one of"):
        TrainConfig(recipe="koh")
    with pytest.raises(ValueError, match=r"optimizer 'rmsprop'.*expected one of"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"select_best_by .val_f1."):
        TrainConfig(select_best_by="val_f1")
    with pytest.raises(ValueError, match=r"lr_gamma 1\.5"):
        TrainConfig(lr_gamma=1.5)


def test_imbalance_weights_are_negatives_over_positives_per_concept():
    concepts = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1], [1, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.float32)
    # column 0: 2 of 5 present -> 3/2; column 1 never present -> 1 (the authors map inf to 1);
    # column 2: 1 of 5 -> 4; column 3 always present -> 0
    expected = torch.tensor([1.5, 1.0, 4.0, 0.0])
    torch.testing.assert_close(concept_imbalance_weights(concepts), expected)


def _hand_bce(logit: float, label: float) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(label * math.log(p) + (1.0 - label) * math.log(1.0 - p))


def test_weighted_concept_loss_against_a_hand_written_formula():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.randint(0, 2, (6, 3)).float()
    weights = torch.tensor([0.5, 2.0, 3.0])
    per_concept = [
        weights[k].item() * sum(_hand_bce(logits[i, k].item(), labels[i, k].item()) for i in range(6)) / 6
        for k in range(3)
    ]
    # the concept stage (the authors' X->C model) averages the weighted per-concept losses over concepts
    assert concept_loss(logits, labels, weights).item() == pytest.approx(sum(per_concept) / 3, rel=1e-6)
    unweighted = sum(_hand_bce(logits[i, k].item(), labels[i, k].item()) for i in range(6) for k in range(3)) / 18
    assert concept_loss(logits, labels, None).item() == pytest.approx(unweighted, rel=1e-6)


def test_joint_loss_normalised_by_one_plus_lambda_k():
    torch.manual_seed(1)
    logits, labels = torch.randn(5, 4), torch.randint(0, 2, (5, 4)).float()
    class_logits, targets = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    weights, lam = torch.tensor([1.0, 0.25, 2.0, 4.0]), 0.3
    ce = sum(
        -class_logits[i, targets[i]].item() + math.log(sum(math.exp(v) for v in class_logits[i].tolist()))
        for i in range(5)
    )
    ce /= 5
    bce_sum = sum(
        weights[k].item() * sum(_hand_bce(logits[i, k].item(), labels[i, k].item()) for i in range(5)) / 5
        for k in range(4)
    )
    normalised = (ce + lam * bce_sum) / (1 + lam * 4)
    got = joint_loss(class_logits, targets, logits, labels, lam, weights=weights, normalize=True)
    assert got.item() == pytest.approx(normalised, rel=1e-6)
    plain = joint_loss(class_logits, targets, logits, labels, lam, weights=None, normalize=False)
    unweighted = ce + lam * sum(
        sum(_hand_bce(logits[i, k].item(), labels[i, k].item()) for i in range(5)) / 5 for k in range(4)
    )
    assert plain.item() == pytest.approx(unweighted, rel=1e-6)


def test_step_schedule_decays_tenfold_until_the_floor():
    config = TrainConfig(recipe="authors", learning_rate=0.01, lr_step=2)
    # 0.01 twice, 0.001 twice, then held at the floor 1e-4 (the authors stop stepping StepLR there)
    expected = [0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4]
    assert [learning_rate_at(config, e) for e in range(8)] == pytest.approx(expected)
    assert learning_rate_at(TrainConfig(learning_rate=0.01), 500) == 0.01  # no schedule in the package recipe


def test_fit_applies_sgd_with_momentum_decay_and_the_schedule_as_written_by_hand():
    """One batch per epoch on ``loss = sum(w * a)``: the gradient is ``a``, so the trajectory of
    SGD with momentum mu, L2 decay wd and the step schedule can be written out by hand."""
    a = torch.tensor([[1.0, -2.0, 0.5]])
    module = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[0.3, 0.1, -0.2]]))
    config = TrainConfig(recipe="authors", learning_rate=0.1, lr_step=2, min_learning_rate=1e-3, batch_size=4)
    config.max_epochs, config.patience = 5, 100
    trajectory = []

    def val_loss():
        trajectory.append(module.weight.detach().clone())
        return 0.0

    fit(module, lambda i: (module.weight * a).sum(), val_loss, 4, config, name="m", val_accuracy=lambda: 0.0)
    w, velocity = torch.tensor([[0.3, 0.1, -0.2]]), torch.zeros(1, 3)
    for epoch, lr in enumerate([0.1, 0.1, 0.01, 0.01, 1e-3]):
        gradient = a + 5e-5 * w
        velocity = 0.9 * velocity + gradient if epoch else gradient
        w = w - lr * velocity
        torch.testing.assert_close(trajectory[epoch], w)


def test_best_checkpoint_by_validation_accuracy_on_a_crafted_history():
    """Loss is best at epoch 3, accuracy at epoch 1 (first of a tie with epoch 2): the authors keep epoch 1."""
    module = nn.Linear(2, 1)
    x = torch.randn(8, 2)
    losses = iter([3.0, 2.0, 1.5, 1.0, 1.2, 1.3, 1.4, 1.6])
    accuracies = iter([0.2, 0.6, 0.6, 0.5, 0.4, 0.55, 0.3, 0.1])
    states = []

    def val_loss():
        states.append(module.weight.detach().clone())
        return next(losses)

    config = TrainConfig(recipe="authors", max_epochs=50, patience=4, batch_size=4, learning_rate=0.1)
    history = fit(
        module,
        lambda i: module(x[i]).pow(2).mean(),
        val_loss,
        8,
        config,
        name="m",
        val_accuracy=lambda: next(accuracies),
    )
    assert len(history) == 6  # four epochs after epoch 1 without a higher accuracy
    torch.testing.assert_close(module.weight, states[1])
    by_loss = TrainConfig(recipe="authors", max_epochs=50, patience=4, batch_size=4, select_best_by="val_loss")
    losses, states = iter([3.0, 2.0, 1.5, 1.0, 1.2, 1.3, 1.4, 1.6]), []
    fit(module, lambda i: module(x[i]).pow(2).mean(), val_loss, 8, by_loss, name="m", val_accuracy=lambda: 0.0)
    torch.testing.assert_close(module.weight, states[3])


def test_accuracy_selection_needs_an_accuracy():
    module = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="select_best_by 'val_accuracy' needs a val_accuracy"):
        fit(module, lambda i: module.weight.sum(), lambda: 0.0, 4, TrainConfig(recipe="authors"), name="m")


@pytest.mark.parametrize("strategy", ["IND", "SEQ", "JNT", "JNT+P"])
def test_every_strategy_trains_under_the_authors_recipe(small_data, strategy):
    config = TrainConfig(recipe="authors", strategy=strategy, concept_hidden=(8,), max_epochs=3, learning_rate=0.05)
    trained = train_cbm(small_data, config)
    assert all(len(h) == 3 for h in trained.history.values())
    assert trained.config.select_best_by == "val_accuracy"


def test_recipe_is_selectable_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "--output-dir", str(out), *[f"--set={s}" for s in TINY], "--set", "train.recipe=authors"]) == 0
    )
    record = load_json(out / "results.json")
    train = record["config"]["train"]
    assert (train["recipe"], train["optimizer"], train["momentum"], train["select_best_by"]) == (
        "authors",
        "sgd",
        0.9,
        "val_accuracy",
    )
