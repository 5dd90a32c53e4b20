"""Synthetic generator statistics, CUB and SkinCon loaders on generated fixtures, predictions files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from cbm_intervene.data import (
    ConceptDataset,
    ConceptGroups,
    ConceptPredictions,
    SyntheticConfig,
    load_predictions,
    make_synthetic,
    save_predictions,
)
from cbm_intervene.data.cub import load_cub
from cbm_intervene.data.skincon import load_skincon
from cbm_intervene.models import TargetModelSpec

# ----------------------------------------------------------------------------- synthetic


def test_synthetic_defaults_match_the_paper():
    data = make_synthetic(SyntheticConfig(samples_per_class=20))
    assert data.concepts.shape == (100 * 20, 100) and data.features.shape == (2000, 100) and data.n_classes == 100
    base, classes = data.metadata["base_vectors"], data.metadata["class_vectors"]
    assert base.shape == (50, 100)
    assert 0.15 < base.mean() < 0.25  # P(beta >= alpha) with alpha ~ N(0.8, 0.1): about 20% ones
    for y in range(100):  # each class flips exactly one concept of its group's base vector
        assert np.abs(classes[y] - base[y // 2]).sum() == 1
    for g in range(50):  # and the two classes of a group flip different concepts
        assert np.abs(classes[2 * g] - classes[2 * g + 1]).sum() == 2
    np.testing.assert_array_equal(data.concepts, classes[data.labels])


def test_synthetic_is_deterministic_by_seed():
    a, b = make_synthetic(SyntheticConfig(samples_per_class=5)), make_synthetic(SyntheticConfig(samples_per_class=5))
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.concepts, b.concepts)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.splits[split], b.splits[split])
    c = make_synthetic(SyntheticConfig(samples_per_class=5, seed=1))
    assert not np.array_equal(a.features, c.features)


def test_synthetic_split_is_stratified_70_15_15():
    data = make_synthetic(SyntheticConfig(n_classes=10, n_groups=5, samples_per_class=20))
    all_index = np.concatenate([data.splits[s] for s in ("train", "val", "test")])
    assert sorted(all_index.tolist()) == list(range(200))
    for split, count in (("train", 14), ("val", 3), ("test", 3)):
        per_class = np.bincount(data.labels[data.splits[split]], minlength=10)
        assert (per_class == count).all(), (split, per_class)


def test_synthetic_input_model_is_linear_in_concepts():
    data = make_synthetic(
        SyntheticConfig(n_concepts=10, n_features=30, n_classes=10, n_groups=5, samples_per_class=200, noise_std=0.01)
    )
    coef, *_ = np.linalg.lstsq(data.concepts, data.features, rcond=None)
    residual = data.features - data.concepts @ coef
    assert residual.std() == pytest.approx(0.01, rel=0.1)


def test_synthetic_variants():
    hidden = make_synthetic(SyntheticConfig(samples_per_class=5, exposed_fraction=0.3))
    assert hidden.n_concepts == 30 and len(hidden.metadata["exposed_concepts"]) == 30
    full = make_synthetic(SyntheticConfig(samples_per_class=5))
    diverse = make_synthetic(SyntheticConfig(samples_per_class=50, flip_probability=0.1))
    class_vectors = diverse.metadata["class_vectors"][diverse.labels]
    assert np.mean(diverse.concepts != class_vectors) == pytest.approx(0.1, abs=0.01)
    sparse = make_synthetic(SyntheticConfig(samples_per_class=5, alpha_mean=0.5))
    assert sparse.metadata["base_vectors"].mean() > full.metadata["base_vectors"].mean() + 0.15
    similar = make_synthetic(SyntheticConfig(samples_per_class=5, n_groups=20))
    assert similar.metadata["base_vectors"].shape == (20, 100)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_groups": 30}, "multiple of n_groups"),
        ({"exposed_fraction": 0.0}, "exposed_fraction"),
        ({"flip_probability": 1.5}, "flip_probability"),
        ({"split_fractions": (0.5, 0.2, 0.2)}, "sum to 1"),
        ({"n_concepts": 0}, "n_concepts must be a positive integer"),
    ],
)
def test_synthetic_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**overrides)


# ----------------------------------------------------------------------------- groups and data sets


def test_groups_must_partition_the_concepts():
    with pytest.raises(ValueError, match="groups do not cover the concepts: 1 of 4"):
        ConceptGroups(names=["a", "b"], members=[[0, 1], [2]], n_concepts=4)
    with pytest.raises(ValueError, match="concept 1 appears in groups 'a' and 'b'"):
        ConceptGroups(names=["a", "b"], members=[[0, 1], [1, 2, 3]], n_concepts=4)
    with pytest.raises(ValueError, match="outside"):
        ConceptGroups(names=["a"], members=[[0, 4]], n_concepts=4)
    groups = ConceptGroups.from_assignment([2, 2, 0, 1, 0])
    assert groups.members == [[2, 4], [3], [0, 1]]
    assert groups.membership().sum().item() == 5


def test_dataset_shape_errors():
    with pytest.raises(ValueError, match="labels must have shape"):
        ConceptDataset(concepts=np.zeros((3, 2)), labels=np.zeros(4), n_classes=2, splits={}, concept_names=["a", "b"])
    with pytest.raises(ValueError, match="concepts must be binary"):
        ConceptDataset(
            concepts=np.full((3, 2), 0.5), labels=np.zeros(3), n_classes=2, splits={}, concept_names=["a", "b"]
        )
    with pytest.raises(ValueError, match="visibility must have shape"):
        ConceptDataset(
            concepts=np.zeros((3, 2)),
            labels=np.zeros(3),
            n_classes=2,
            splits={},
            concept_names=["a", "b"],
            visibility=np.ones((3, 3)),
        )


# ----------------------------------------------------------------------------- CUB fixture

# 4 classes x 3 images; images 1,2 of each class are official train images, image 3 is a test image.
CUB_ATTRIBUTES = [
    "has_bill_shape::curved",
    "has_bill_shape::hooked",
    "has_wing_color::blue",
    "has_wing_color::red",
    "has_size::small",
]


def write_cub(root, attributes_at_root=False):
    rng = np.random.default_rng(0)
    n_classes, per_class = 4, 3
    (root / "attributes").mkdir(parents=True)
    image_rows, class_rows, split_rows, label_rows = [], [], [], []
    truth = {}
    image_id = 0
    for y in range(n_classes):
        for j in range(per_class):
            image_id += 1
            image_rows.append(f"{image_id} {y + 1:03d}.Bird_{y}/img_{image_id}.jpg")
            class_rows.append(f"{image_id} {y + 1}")
            split_rows.append(f"{image_id} {1 if j < 2 else 0}")
            for a in range(len(CUB_ATTRIBUTES)):
                present = int(rng.random() < 0.5)
                certainty = int(rng.integers(1, 5))  # 1 = not visible
                truth[image_id, a] = (present, certainty, y, j < 2)
                extra = " 0" if (image_id + a) % 7 == 0 else ""  # some official lines carry an extra field
                label_rows.append(f"{image_id} {a + 1} {present} {certainty} 12.5{extra}")
    (root / "images.txt").write_text("\n".join(image_rows) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(class_rows) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split_rows) + "\n")
    attributes = "\n".join(f"{i + 1} {name}" for i, name in enumerate(CUB_ATTRIBUTES)) + "\n"
    (root / ("attributes.txt" if attributes_at_root else "attributes/attributes.txt")).write_text(attributes)
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(label_rows) + "\n")
    return truth


def expected_class_vectors(truth):
    votes = {}
    for (_, a), (present, certainty, y, is_train) in truth.items():
        if is_train and certainty != 1:
            votes.setdefault((y, a), []).append(present)
    out = np.zeros((4, len(CUB_ATTRIBUTES)))
    for (y, a), v in votes.items():
        out[y, a] = 1.0 if sum(v) >= len(v) - sum(v) else 0.0
    return out


@pytest.mark.parametrize("attributes_at_root", [False, True])
def test_cub_loader_majority_votes_filters_and_groups(tmp_path, attributes_at_root):
    truth = write_cub(tmp_path, attributes_at_root)
    expected = expected_class_vectors(truth)
    keep = np.flatnonzero(expected.sum(0) >= 2)
    data = load_cub(tmp_path, min_classes=2, val_fraction=0.25)
    assert data.concept_names == [CUB_ATTRIBUTES[a] for a in keep]
    np.testing.assert_array_equal(data.concepts, expected[data.labels][:, keep])
    for image in range(12):
        for col, a in enumerate(keep):
            present, certainty, _, _ = truth[image + 1, a]
            assert data.instance_concepts[image, col] == present
            assert data.visibility[image, col] == (certainty != 1)
    prefixes = list(dict.fromkeys(CUB_ATTRIBUTES[a].split("::")[0] for a in keep))
    assert data.groups.names == prefixes
    assert sum(len(m) for m in data.groups.members) == len(keep)
    assert data.labels.tolist() == [y for y in range(4) for _ in range(3)]
    np.testing.assert_array_equal(data.splits["test"], [2, 5, 8, 11])
    assert len(data.splits["val"]) == 2 and len(data.splits["train"]) == 6
    assert data.sources[0] == "001.Bird_0/img_1.jpg"


def test_cub_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images\.txt"):
        load_cub(tmp_path)
    write_cub(tmp_path)
    with pytest.raises(ValueError, match="no attribute is present in at least 99 classes"):
        load_cub(tmp_path, min_classes=99)
    lines = (tmp_path / "attributes" / "image_attribute_labels.txt").read_text().splitlines()
    (tmp_path / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="lacks 1"):
        load_cub(tmp_path, min_classes=1)


# ----------------------------------------------------------------------------- SkinCon fixture


def write_skincon(root):
    rng = np.random.default_rng(1)
    concepts = ["Papule", "Plaque", "Pustule", "Ulcer"]
    rates = [0.6, 0.4, 0.05, 0.5]
    rows, fitz = [], []
    for i in range(40):
        digest = f"{i:032x}"
        values = [int(rng.random() < r) for r in rates]
        discard = 1 if i % 10 == 9 else 0
        rows.append([str(i), f"{digest}.jpg", *map(str, values), str(discard)])
        partition = ["benign", "malignant", "non-neoplastic"][i % 3]
        fitz.append([digest, "some disease", partition])
    with (root / "annotations_fitzpatrick17k.csv").open("w", newline="") as h:
        writer = csv.writer(h)
        writer.writerow(["", "ImageID", *concepts, "Do not consider this image"])
        writer.writerows(rows)
    with (root / "fitzpatrick17k.csv").open("w", newline="") as h:
        writer = csv.writer(h)
        writer.writerow(["md5hash", "label", "three_partition_label"])
        writer.writerows(fitz)
    return concepts, rows, fitz


def test_skincon_loader(tmp_path):
    concepts, rows, fitz = write_skincon(tmp_path)
    data = load_skincon(tmp_path / "annotations_fitzpatrick17k.csv", tmp_path / "fitzpatrick17k.csv", min_positive=5)
    kept_rows = [r for r in rows if r[-1] == "0"]
    matrix = np.array([[int(v) for v in r[2:-1]] for r in kept_rows])
    keep = np.flatnonzero(matrix.sum(0) >= 5)
    assert data.concept_names == [concepts[j] for j in keep] and "Pustule" not in data.concept_names
    np.testing.assert_array_equal(data.concepts, matrix[:, keep])
    partition = {d: p for d, _, p in fitz}
    assert data.labels.tolist() == [int(partition[r[1][:-4]] == "malignant") for r in kept_rows]
    assert data.n_classes == 2 and data.groups is None and len(data.sources) == 36
    sizes = {s: len(v) for s, v in data.splits.items()}
    assert sum(sizes.values()) == 36 and sizes["train"] > sizes["test"]


def test_skincon_balanced_error_reaches_intervene_by_default(tmp_path, capsys):
    """The loader's metric travels with the predictions; intervene uses it unless --metric is given."""
    from cbm_intervene.cli import main
    from cbm_intervene.metrics import error_rate

    write_skincon(tmp_path)
    data = load_skincon(tmp_path / "annotations_fitzpatrick17k.csv", tmp_path / "fitzpatrick17k.csv", min_positive=5)
    test = data.split("test")
    values = torch.as_tensor(np.clip(test["concepts"] * 0.6 + 0.2, 0, 1))
    predictions = ConceptPredictions.from_dataset(data, "test", values=values, kind="prob")
    assert predictions.metric == "balanced_error"
    spec = TargetModelSpec(n_concepts=data.n_concepts, n_classes=2)
    torch.manual_seed(0)
    target = torch.nn.Linear(data.n_concepts, 2)
    path = save_predictions(tmp_path / "skincon.pt", predictions, target_model=target, target_spec=spec)
    assert load_predictions(path)[0].metric == "balanced_error"
    out = tmp_path / "tti"
    argv = ["intervene", "--predictions", str(path), "--criteria", "UCP", "--seeds", "0", "--no-plot", "--budgets"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    assert "metric: balanced_error (from the predictions' metadata" in capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["intervention"]["metric"] == "balanced_error"
    with torch.no_grad():
        predicted = target(values).argmax(1)
    expected = error_rate(predicted, torch.as_tensor(test["labels"]), 2, balanced=True)
    assert record["curves"]["I+S"]["UCP"]["error_mean"][0] == pytest.approx(expected)
    assert main([*argv, "--output-dir", str(tmp_path / "plain"), "--metric", "error"]) == 0
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert plain["config"]["intervention"]["metric"] == "error"
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        ConceptPredictions(**{**predictions.__dict__, "metric": "accuracy"})


def test_skincon_missing_image_in_metadata(tmp_path):
    write_skincon(tmp_path)
    lines = (tmp_path / "fitzpatrick17k.csv").read_text().splitlines()
    (tmp_path / "fitzpatrick17k.csv").write_text("\n".join([lines[0], *lines[2:]]) + "\n")  # drop image 0
    with pytest.raises(ValueError, match="has no row in"):
        load_skincon(tmp_path / "annotations_fitzpatrick17k.csv", tmp_path / "fitzpatrick17k.csv", min_positive=5)


# ----------------------------------------------------------------------------- predictions format


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_predictions_round_trip_with_target_model(tmp_path, suffix, logit_predictions):
    spec = TargetModelSpec(n_concepts=6, n_classes=4, hidden=(5,))
    model = spec.build()
    visibility = torch.rand(12, 6) > 0.2
    original = ConceptPredictions(
        **{**logit_predictions.__dict__, "visibility": visibility, "concept_names": list("abcdef")}
    )
    path = save_predictions(tmp_path / f"p{suffix}", original, target_model=model, target_spec=spec)
    loaded, target = load_predictions(path)
    for name in ("values", "true_concepts", "labels", "visibility", "reference_values"):
        torch.testing.assert_close(getattr(loaded, name), getattr(original, name))
    assert loaded.kind == "logit" and loaded.groups == original.groups and loaded.concept_names == list("abcdef")
    x = torch.randn(3, 6)
    torch.testing.assert_close(target(x), model(x))


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_predictions_round_trip_with_a_bare_linear_target(tmp_path, suffix, prob_predictions):
    """A plain nn.Linear f (keys weight/bias) is saved under a linear spec and loads back."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    spec = TargetModelSpec(n_concepts=6, n_classes=4)
    path = save_predictions(tmp_path / f"p{suffix}", prob_predictions, target_model=linear, target_spec=spec)
    _, target = load_predictions(path)
    x = torch.rand(5, 6)
    torch.testing.assert_close(target(x), linear(x))


def test_predictions_target_weights_are_checked_at_save_time(tmp_path, prob_predictions):
    linear_spec = TargetModelSpec(n_concepts=6, n_classes=4)
    with pytest.raises(ValueError, match=r"missing \['0.bias', '0.weight'\]; unexpected \['1.bias', '1.weight'\]"):
        save_predictions(
            tmp_path / "p.pt",
            prob_predictions,
            target_model=torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(6, 4)),
            target_spec=linear_spec,
        )
    with pytest.raises(ValueError, match=r"0.weight has shape \(4, 6\), expected \(5, 6\)"):
        save_predictions(
            tmp_path / "p.pt",
            prob_predictions,
            target_model=torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(5, 4)),
            target_spec=TargetModelSpec(n_concepts=6, n_classes=4, hidden=(5,)),
        )
    with pytest.raises(ValueError, match="target_spec maps 5 concepts to 4 classes, but the predictions have 6"):
        save_predictions(
            tmp_path / "p.pt",
            prob_predictions,
            target_model=torch.nn.Linear(5, 4),
            target_spec=TargetModelSpec(n_concepts=5, n_classes=4),
        )
    assert not (tmp_path / "p.pt").exists()
    with pytest.raises(FileNotFoundError, match="predictions file not found"):
        load_predictions(tmp_path / "missing.pt")


def test_predictions_bad_inputs(prob_predictions):
    fields = prob_predictions.__dict__
    with pytest.raises(ValueError, match=r"true_concepts shape \(12, 5\) does not match values shape \(12, 6\)"):
        ConceptPredictions(**{**fields, "true_concepts": torch.zeros(12, 5)})
    with pytest.raises(ValueError, match="labels shape"):
        ConceptPredictions(**{**fields, "labels": torch.zeros(11, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"outside \[0, 1\]; pass kind='logit'"):
        ConceptPredictions(**{**fields, "values": fields["values"] * 3 - 1})
    with pytest.raises(ValueError, match="true_concepts must be binary"):
        ConceptPredictions(**{**fields, "true_concepts": torch.full((12, 6), 0.5)})
    with pytest.raises(ValueError, match="labels must lie in"):
        ConceptPredictions(**{**fields, "labels": torch.full((12,), 7)})
    with pytest.raises(ValueError, match="groups cover 5 concepts"):
        ConceptPredictions(**{**fields, "groups": ConceptGroups.contiguous(5, 2)})
    with pytest.raises(ValueError, match="kind must be one of"):
        ConceptPredictions(**{**fields, "kind": "probability"})
    with pytest.raises(ValueError, match="NaN"):
        ConceptPredictions(**{**fields, "values": torch.full((12, 6), float("nan"))})
    with pytest.raises(ValueError, match="visibility shape"):
        ConceptPredictions(**{**fields, "visibility": torch.ones(12, 2)})


def test_cub_fixture_through_the_engine(tmp_path):
    """Loader -> predictions -> group-level intervention with visibility and instance-level truth."""
    from cbm_intervene.intervention import InterventionConfig, run_intervention

    write_cub(tmp_path)
    data = load_cub(tmp_path, min_classes=1)
    test = data.split("test")
    k = data.n_concepts
    probs = torch.full((len(test["labels"]), k), 0.5)
    target = torch.nn.Linear(k, data.n_classes)
    for truth in ("concepts", "instance_concepts"):
        predictions = ConceptPredictions(
            values=probs,
            kind="prob",
            true_concepts=test[truth],
            labels=test["labels"],
            n_classes=data.n_classes,
            groups=data.groups,
            visibility=test["visibility"],
        )
        # nullify named explicitly: the default became keep (what the authors ran, issue 13)
        config = InterventionConfig(criterion="UCP", level="G+S", not_visible="nullify")
        curve = run_intervention(predictions, target, config)
        assert (curve.unit_counts[-1] == data.groups.n_groups).all()
        expected = torch.where(torch.as_tensor(test["visibility"]), torch.as_tensor(test[truth]), torch.zeros(()))
        torch.testing.assert_close(curve.final_values, expected)  # not visible -> nullified
