"""SkinCon concepts on Fitzpatrick 17k images (Daneshjou et al., 2022), as Shin et al. use them.

Inputs: the SkinCon annotation CSV (a leading row-index column, ``ImageID`` = ``<md5hash>.<ext>``,
one 0/1 column per concept, and ``Do not consider this image``) and the Fitzpatrick 17k metadata
CSV (``md5hash`` and ``three_partition_label`` in {benign, malignant, non-neoplastic}).
Images flagged "do not consider" are dropped; concepts present in at least ``min_positive`` (50)
images are kept (22 on the real data); the target is malignant (1) against the rest (0), so the
metric is ``1 - balanced accuracy``. There are no concept groups. The split is stratified
70/15/15 by the binary label, drawn with ``seed``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from cbm_intervene.data.core import ConceptDataset, stratified_split

log = logging.getLogger(__name__)

IMAGE_COLUMN = "ImageID"
DISCARD_COLUMN = "Do not consider this image"


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"SkinCon file not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty")
        return header, [row for row in reader if row]


def load_skincon(
    annotations_csv: str | Path,
    fitzpatrick_csv: str | Path,
    *,
    min_positive: int = 50,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> ConceptDataset:
    header, rows = _read_csv(Path(annotations_csv))
    for required in (IMAGE_COLUMN, DISCARD_COLUMN):
        if required not in header:
            raise ValueError(f"{annotations_csv}: missing column {required!r}; found {header[:5]}...")
    image_col, discard_col = header.index(IMAGE_COLUMN), header.index(DISCARD_COLUMN)
    concept_cols = [j for j, name in enumerate(header) if j not in (image_col, discard_col) and name.strip()]
    fitz_header, fitz_rows = _read_csv(Path(fitzpatrick_csv))
    for required in ("md5hash", "three_partition_label"):
        if required not in fitz_header:
            raise ValueError(f"{fitzpatrick_csv}: missing column {required!r}")
    hash_col, label_col = fitz_header.index("md5hash"), fitz_header.index("three_partition_label")
    partition = {row[hash_col]: row[label_col].strip().lower() for row in fitz_rows}

    images, concept_rows, labels = [], [], []
    for lineno, row in enumerate(rows, 2):
        if float(row[discard_col] or 0) == 1:
            continue
        image = row[image_col]
        digest = image.rsplit(".", 1)[0]
        if digest not in partition:
            raise ValueError(f"{annotations_csv}:{lineno}: image {image!r} has no row in {fitzpatrick_csv}")
        try:
            values = [float(row[j]) for j in concept_cols]
        except ValueError as exc:
            raise ValueError(f"{annotations_csv}:{lineno}: concept values must be 0/1 ({exc})") from None
        images.append(image)
        concept_rows.append(values)
        labels.append(1 if partition[digest] == "malignant" else 0)
    concepts = np.asarray(concept_rows, dtype=np.float32)
    keep = np.flatnonzero(concepts.sum(0) >= min_positive)
    if not keep.size:
        raise ValueError(f"no SkinCon concept is present in at least {min_positive} images")
    labels_arr = np.asarray(labels, dtype=np.int64)
    splits = stratified_split(labels_arr, split_fractions, np.random.default_rng(seed))
    log.info(
        "SkinCon: %d images, %d of %d concepts kept, %d malignant",
        len(images),
        len(keep),
        len(concept_cols),
        labels_arr.sum(),
    )
    return ConceptDataset(
        concepts=concepts[:, keep],
        labels=labels_arr,
        n_classes=2,
        splits=splits,
        concept_names=[header[concept_cols[j]] for j in keep],
        sources=images,
        metadata={"source": "SkinCon", "annotations": str(annotations_csv), "metric": "balanced_error"},
    )
