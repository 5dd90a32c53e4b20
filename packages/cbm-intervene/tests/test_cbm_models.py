"""Training strategies, early stopping, checkpoints; metrics and summaries."""

from __future__ import annotations

import copy
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from torch import nn

from cbm_intervene import models
from cbm_intervene.data import SyntheticConfig, make_synthetic
from cbm_intervene.metrics import area_under_curve, error_at, error_rate, interventions_to_reach, mean_std, summarize
from cbm_intervene.models import (
    BOTTLENECK_KIND,
    ConceptBottleneckModel,
    TargetModelSpec,
    TrainConfig,
    TrainedCBM,
    check_module_widths,
    fit,
    load_cbm,
    mlp,
    mlp_sizes,
    save_cbm,
    train_cbm,
)
from shin_common import CorruptFileError, UnsafeFileError


@pytest.fixture(scope="module")
def small_data():
    return make_synthetic(
        SyntheticConfig(
            n_concepts=12,
            n_features=16,
            n_classes=6,
            n_groups=3,
            samples_per_class=40,
            weight_std=1.0,
            noise_std=0.5,
            seed=3,
        )
    )


@pytest.mark.parametrize("strategy", ["IND", "SEQ", "JNT", "JNT+P"])
def test_strategies_train_and_round_trip(strategy, small_data, tmp_path):
    config = TrainConfig(strategy=strategy, concept_hidden=(16,), max_epochs=40, patience=5, learning_rate=1e-2)
    trained = train_cbm(small_data, config, checkpoint_dir=tmp_path)
    assert trained.model.kind == BOTTLENECK_KIND[strategy]
    test = small_data.split("test")
    x = torch.as_tensor(test["features"])
    with torch.no_grad():
        logits, out = trained.model(x)
    assert ((logits > 0).float() == torch.as_tensor(test["concepts"])).float().mean() > 0.85
    assert (out.argmax(1) == torch.as_tensor(test["labels"])).float().mean() > 0.8  # chance is 1/6
    values = trained.bottleneck(x)
    if trained.model.kind == "prob":
        assert values.min() >= 0 and values.max() <= 1
    reloaded = load_cbm(tmp_path / "cbm.pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(x)[1], out)
    expected = {"IND": ["concept_model", "target_model"], "SEQ": ["concept_model", "target_model"]}.get(
        strategy, ["joint_model"]
    )
    for name in expected:
        assert (tmp_path / f"{name}.pt").is_file()


class ConvConcepts(nn.Module):
    """A concept predictor the package does not build: a 1-D convolution over the features."""

    def __init__(self, n_features: int, n_concepts: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4 * n_features, n_concepts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x[:, None, :])).flatten(1))


class TwoLayerTarget(nn.Module):
    def __init__(self, n_concepts: int, n_classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_concepts, 16)
        self.out = nn.Linear(16, n_classes)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(c)))


@pytest.mark.parametrize("strategy", ["IND", "JNT"])
def test_custom_concept_and_target_modules_train_and_reload(strategy, small_data, tmp_path):
    torch.manual_seed(0)
    g, f = ConvConcepts(16, 12), TwoLayerTarget(12, 6)
    config = TrainConfig(strategy=strategy, max_epochs=40, patience=5, learning_rate=1e-2)
    trained = train_cbm(small_data, config, concept_model=g, target_model=f, checkpoint_dir=tmp_path)
    assert trained.model.concept_model is g and trained.model.target_model is f
    assert trained.target_spec is None and trained.concept_sizes is None
    test = small_data.split("test")
    x = torch.as_tensor(test["features"])
    with torch.no_grad():
        logits, out = trained.model(x)
    assert ((logits > 0).float() == torch.as_tensor(test["concepts"])).float().mean() > 0.8
    assert (out.argmax(1) == torch.as_tensor(test["labels"])).float().mean() > 0.6  # chance is 1/6
    with pytest.raises(ValueError, match=r"custom concept model \(ConvConcepts\); pass load_cbm\(path, concept_model="):
        load_cbm(tmp_path / "cbm.pt")
    with pytest.raises(ValueError, match=r"custom target model \(TwoLayerTarget\)"):
        load_cbm(tmp_path / "cbm.pt", concept_model=ConvConcepts(16, 12))
    with pytest.raises(ValueError, match="the concept_model passed does not match the saved weights"):
        load_cbm(tmp_path / "cbm.pt", concept_model=ConvConcepts(16, 10), target_model=TwoLayerTarget(12, 6))
    reloaded = load_cbm(tmp_path / "cbm.pt", concept_model=ConvConcepts(16, 12), target_model=TwoLayerTarget(12, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(x)[1], out)
    predictions = trained.concept_predictions(small_data, "test")
    torch.testing.assert_close(predictions.values, trained.bottleneck(x))


def _hand_built(concept_model: nn.Module) -> TrainedCBM:
    torch.manual_seed(0)
    spec = TargetModelSpec(n_concepts=12, n_classes=6)
    model = ConceptBottleneckModel(concept_model, spec.build(), "prob").eval()
    return TrainedCBM(model, TrainConfig(concept_hidden=(8,)), spec, {"concept": [1.0]})


def test_hand_built_cbm_with_the_default_mlp_saves_a_loadable_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = _hand_built(mlp([16, 8, 12]))
    assert trained.concept_sizes is None
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = trained.model(x)
    reloaded = load_cbm(save_cbm(trained, tmp_path / "cbm.pt"))
    assert reloaded.concept_sizes == [16, 8, 12]
    with torch.no_grad():
        for got, want in zip(reloaded.model(x), expected, strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "concept_model",
    [
        nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 12)),  # not ReLU
        nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 12)),  # other keys
        nn.Sequential(nn.Linear(16, 12, bias=False)),
        ConvConcepts(16, 12),
    ],
)
def test_hand_built_cbm_with_another_g_needs_the_module_to_load(concept_model, tmp_path):
    assert mlp_sizes(concept_model) is None
    path = save_cbm(_hand_built(concept_model), tmp_path / "cbm.pt")
    with pytest.raises(ValueError, match="custom concept model"):
        load_cbm(path)
    load_cbm(path, concept_model=copy.deepcopy(concept_model))


def test_first_format_checkpoint_still_loads(tmp_path):
    """The 0.1.0 layout: one state_dict of the whole CBM, MLP sizes and a target spec."""
    trained = _hand_built(mlp([16, 8, 12]))
    torch.save(
        {
            "config": asdict(trained.config),
            "target_spec": asdict(trained.target_spec),
            "concept_sizes": [16, 8, 12],
            "kind": "prob",
            "state_dict": trained.model.state_dict(),
            "history": trained.history,
        },
        tmp_path / "old.pt",
    )
    reloaded = load_cbm(tmp_path / "old.pt")
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(x)[1], trained.model(x)[1])
    assert reloaded.history == trained.history and reloaded.config == trained.config


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    # load_cbm unpickles only tensors and plain containers (weights_only=True)
    torch.save({"config": TrainConfig()}, tmp_path / "pickled.pt")
    with pytest.raises(UnsafeFileError, match=r"pickled\.pt"):
        load_cbm(tmp_path / "pickled.pt")


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_unreadable_checkpoint_is_named_as_corrupt(small_data, tmp_path, damage):
    path = tmp_path / "cbm.pt"
    if damage == "truncated":
        trained = train_cbm(small_data, TrainConfig(concept_hidden=(8,), max_epochs=1))
        data = save_cbm(trained, path).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # loadable by torch, but not a CBM checkpoint
        torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(CorruptFileError, match=r"cbm\.pt.* corrupt") as info:
        load_cbm(path)
    assert "\n" not in str(info.value)


class _Interrupt:
    """Replaces ``models._batches``: Ctrl-C at the start of epoch number ``at`` (counted over stages)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, n, batch_size, generator):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return list(torch.randperm(n, generator=generator).split(batch_size))


@pytest.mark.parametrize("stage", ["concept", "target"])
def test_interrupted_training_resumes_to_the_result_of_an_uninterrupted_run(small_data, tmp_path, monkeypatch, stage):
    config = TrainConfig(strategy="SEQ", concept_hidden=(8,), max_epochs=12, patience=3, learning_rate=1e-2)
    reference = train_cbm(small_data, config, checkpoint_dir=tmp_path / "reference")
    at = 4 if stage == "concept" else len(reference.history["concept"]) + 3
    monkeypatch.setattr(models, "_batches", _Interrupt(at))
    with pytest.raises(KeyboardInterrupt):
        train_cbm(small_data, config, checkpoint_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "cbm.pt").exists()
    monkeypatch.undo()
    resumed = train_cbm(small_data, config, checkpoint_dir=tmp_path / "run", resume=True)
    assert resumed.history == reference.history
    for mine, theirs in zip(resumed.model.state_dict().values(), reference.model.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    # another config does not pick up this run's progress
    with pytest.raises(ValueError, match=r"concept_model\.progress\.pt.* another training config"):
        train_cbm(small_data, replace(config, learning_rate=1e-3), checkpoint_dir=tmp_path / "run", resume=True)


def test_custom_modules_of_wrong_width_are_rejected(small_data):
    with pytest.raises(
        ValueError, match=r"concept_model maps \(2, 16\) inputs to \(2, 10\), expected a tensor of shape \(2, 12\)"
    ):
        train_cbm(small_data, TrainConfig(max_epochs=1), concept_model=ConvConcepts(16, 10))
    with pytest.raises(
        ValueError, match=r"target_model expects 8 inputs \(its first nn.Linear layer\), but the data set has 12"
    ):
        train_cbm(small_data, TrainConfig(max_epochs=1), target_model=TwoLayerTarget(8, 6))


class TupleTarget(nn.Module):
    """Returns (logits, hidden) -- not the class-logit tensor the package expects of f."""

    def __init__(self, n_concepts: int, n_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_concepts, n_classes)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(c), c


def test_custom_module_returning_a_tuple_is_rejected(small_data):
    with pytest.raises(ValueError, match=r"target_model maps \(2, 12\) inputs to a tuple, expected a tensor"):
        train_cbm(small_data, TrainConfig(max_epochs=1), target_model=TupleTarget(12, 6))


def test_width_check_leaves_batchnorm_statistics_and_training_flags_alone():
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    module.train()
    module[2].eval()  # mixed flags must come back as they were
    with torch.no_grad():
        module[1].running_mean.fill_(0.25)
    before = {name: buffer.clone() for name, buffer in module.named_buffers()}
    check_module_widths(module, "m", 3, 2, source="3 features", outputs="2 logits", probe=torch.randn(5, 3) + 7)
    after = dict(module.named_buffers())
    assert set(after) == set(before)
    for name, buffer in before.items():
        torch.testing.assert_close(after[name], buffer, msg=name)
    assert [m.training for m in module.modules()] == [True, True, True, False, True]


def test_fit_stops_early_and_restores_best_weights():
    module = nn.Linear(2, 1)
    losses = iter([3.0, 1.0, 2.0, 2.5, 2.7, 2.8, 2.9])
    best_weights = {}

    def val_loss():
        value = next(losses)
        if value == 1.0:
            best_weights["w"] = module.weight.detach().clone()
        return value

    x = torch.randn(8, 2)
    history = fit(
        module,
        lambda i: module(x[i]).pow(2).mean(),
        val_loss,
        8,
        TrainConfig(max_epochs=50, patience=3, batch_size=4),
        name="m",
    )
    assert history == [3.0, 1.0, 2.0, 2.5, 2.7]  # stopped 3 epochs after the best
    torch.testing.assert_close(module.weight, best_weights["w"])


def test_train_config_errors(small_data):
    with pytest.raises(ValueError, match="unknown training strategy 'XYZ'"):
        TrainConfig(strategy="XYZ")
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        TrainConfig(learning_rate=0)
    no_features = make_synthetic(
        SyntheticConfig(n_concepts=4, n_features=4, n_classes=2, n_groups=1, samples_per_class=5)
    )
    no_features.features = None
    with pytest.raises(ValueError, match="needs a data set with features"):
        train_cbm(no_features, TrainConfig())


def test_error_rates_against_hand_counts():
    predicted = torch.tensor([0, 0, 1, 1, 1, 2])
    labels = torch.tensor([0, 1, 1, 1, 1, 1])
    assert error_rate(predicted, labels, 3) == pytest.approx(2 / 6)
    # recalls: class 0 -> 1/1, class 1 -> 3/5; class 2 absent from labels
    assert error_rate(predicted, labels, 3, balanced=True) == pytest.approx(1 - (1 + 0.6) / 2)
    with pytest.raises(ValueError, match="does not match"):
        error_rate(predicted[:3], labels, 3)


def test_curve_summaries():
    x = np.array([0.0, 1.0, 2.0, 4.0])
    error = np.array([0.5, 0.3, 0.2, 0.0])
    assert area_under_curve(x, error) == pytest.approx((0.4 * 1 + 0.25 * 1 + 0.1 * 2) / 4)
    assert error_at(x, error, 3.0) == 0.2
    assert interventions_to_reach(x, error, 0.25) == 2.0
    assert interventions_to_reach(x, error, -0.1) is None
    with pytest.raises(ValueError, match="below the first point"):
        error_at(x, error, -1)
    summary = summarize(x, error, budgets=[1, 4], target_error=0.1, reference_error=np.zeros(4))
    assert summary["error_at"] == {"1": 0.3, "4": 0.0}
    assert summary["interventions_to_target"] == 4.0
    assert summary["gap_to_reference_auc"] == pytest.approx(area_under_curve(x, error))
    mean, std = mean_std([np.array([1.0, 2.0]), np.array([3.0, 2.0])])
    np.testing.assert_allclose(mean, [2, 2])
    np.testing.assert_allclose(std, [1, 0])
