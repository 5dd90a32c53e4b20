"""The smallest synthetic training run the command-line tests use (seconds on a CPU)."""

TINY = [
    "data.n_concepts=8",
    "data.n_features=8",
    "data.n_classes=4",
    "data.n_groups=2",
    "data.samples_per_class=20",
    "data.concept_group_size=2",
    "train.concept_hidden=[8]",
    "train.max_epochs=3",
]
