"""CUB-200-2011 concepts as used by Koh et al. (ICML 2020) and Shin et al. (ICML 2023, Sec. 4.1).

Reads the official directory layout (``images.txt``, ``image_class_labels.txt``,
``train_test_split.txt``, ``attributes/image_attribute_labels.txt``, and ``attributes.txt`` either
at the root or under ``attributes/``). Processing, as the papers describe it:

1. Class-level labels by majority voting over the *training* images of each class, skipping labels
   whose certainty id is 1 ("not visible"); a tie goes to "present" (Koh et al.'s rule), a class
   with no visible label for an attribute gets "absent".
2. Keep attributes present in at least ``min_classes`` (10) classes: 112 of the 312 on the real data.
3. Group the kept concepts by attribute-name prefix (``has_bill_shape::...`` -> ``has_bill_shape``):
   28 groups on the real data.
4. Every image takes its class's vector; instance-level labels and visibility are kept beside it.

Images are not decoded here (the paper's Inception-v3 backbone needs a GPU); ``sources`` lists the
image paths so that concept predictions made elsewhere can be aligned by order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cbm_intervene.data.core import ConceptDataset, ConceptGroups

log = logging.getLogger(__name__)

NOT_VISIBLE_CERTAINTY = 1


def _read_pairs(path: Path, n_fields: int) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"CUB file not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=n_fields - 1) if n_fields == 2 else line.split()
        if len(parts) < n_fields:
            raise ValueError(f"{path}:{lineno}: expected {n_fields} fields, got {line!r}")
        rows.append(parts)
    return rows


def _attributes_file(root: Path) -> Path:
    for candidate in (root / "attributes" / "attributes.txt", root / "attributes.txt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no attributes.txt under {root} or {root / 'attributes'}")


def load_cub(
    root: str | Path,
    *,
    min_classes: int = 10,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> ConceptDataset:
    """Load CUB-200-2011 from ``root`` (the folder holding ``images.txt``).

    Splits: the official test images form ``test``; ``val_fraction`` of the official training images
    (drawn with ``seed``) form ``val`` (Koh et al. hold out 20%). Majority voting uses the official
    training images (train and val), never the test images.
    """
    root = Path(root)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    images = _read_pairs(root / "images.txt", 2)
    image_ids = [int(i) for i, _ in images]
    position = {image_id: n for n, image_id in enumerate(image_ids)}
    paths = [p.strip() for _, p in images]
    labels = np.full(len(image_ids), -1, dtype=np.int64)
    for image_id, class_id in _read_pairs(root / "image_class_labels.txt", 2):
        labels[position[int(image_id)]] = int(class_id) - 1
    is_train = np.full(len(image_ids), -1, dtype=np.int64)
    for image_id, flag in _read_pairs(root / "train_test_split.txt", 2):
        is_train[position[int(image_id)]] = int(flag)
    if (labels < 0).any() or (is_train < 0).any():
        raise ValueError("image_class_labels.txt and train_test_split.txt must list every image of images.txt")

    attribute_rows = _read_pairs(_attributes_file(root), 2)
    attribute_ids = [int(a) for a, _ in attribute_rows]
    attribute_names = [name.strip() for _, name in attribute_rows]
    attr_pos = {a: n for n, a in enumerate(attribute_ids)}
    n_images, n_attributes = len(image_ids), len(attribute_ids)
    present = np.zeros((n_images, n_attributes), dtype=np.float32)
    visible = np.zeros((n_images, n_attributes), dtype=bool)
    seen = np.zeros((n_images, n_attributes), dtype=bool)
    for row in _read_pairs(root / "attributes" / "image_attribute_labels.txt", 4):
        # some lines of the official file carry extra fields; the first four are always these
        image, attribute, is_present, certainty = (int(v) for v in row[:4])
        i, a = position[image], attr_pos[attribute]
        present[i, a] = float(is_present)
        visible[i, a] = certainty != NOT_VISIBLE_CERTAINTY
        seen[i, a] = True
    if not seen.all():
        missing = int((~seen).sum())
        raise ValueError(f"image_attribute_labels.txt lacks {missing} (image, attribute) labels")

    n_classes = int(labels.max()) + 1
    train_mask = is_train == 1
    votes_for = np.zeros((n_classes, n_attributes))
    votes_against = np.zeros((n_classes, n_attributes))
    counted = train_mask[:, None] & visible
    np.add.at(votes_for, labels, (counted & (present == 1)).astype(float))
    np.add.at(votes_against, labels, (counted & (present == 0)).astype(float))
    class_vectors = ((votes_for >= votes_against) & (votes_for + votes_against > 0)).astype(np.float32)
    keep = np.flatnonzero(class_vectors.sum(0) >= min_classes)
    if not keep.size:
        raise ValueError(f"no attribute is present in at least {min_classes} classes")
    names = [attribute_names[a] for a in keep]
    prefixes = [name.split("::")[0] for name in names]
    group_names = list(dict.fromkeys(prefixes))
    groups = ConceptGroups(
        names=group_names,
        members=[[i for i, p in enumerate(prefixes) if p == g] for g in group_names],
        n_concepts=len(keep),
    )
    rng = np.random.default_rng(seed)
    official_train = np.flatnonzero(train_mask)
    shuffled = rng.permutation(official_train)
    n_val = round(val_fraction * len(official_train))
    splits = {
        "train": np.sort(shuffled[n_val:]),
        "val": np.sort(shuffled[:n_val]),
        "test": np.flatnonzero(~train_mask),
    }
    log.info(
        "CUB: %d images, %d classes, %d of %d attributes kept, %d groups",
        n_images,
        n_classes,
        len(keep),
        n_attributes,
        groups.n_groups,
    )
    return ConceptDataset(
        concepts=class_vectors[labels][:, keep],
        labels=labels,
        n_classes=n_classes,
        splits=splits,
        concept_names=names,
        groups=groups,
        visibility=visible[:, keep],
        instance_concepts=present[:, keep],
        sources=paths,
        metadata={
            "source": "CUB-200-2011",
            "root": str(root),
            "image_ids": image_ids,
            "kept_attribute_ids": [attribute_ids[a] for a in keep],
        },
    )
