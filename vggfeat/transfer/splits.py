"""Seeded train/validation/test splits: per-class counts (Caltech), fractions (folders)."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, train_test_split

from ..data.sources import InputError


def per_class_split(labels: np.ndarray, *, n_train: int, n_test: int | None, seed: int,
                    class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n_train`` random images per class for training, then up to ``n_test`` (None: all the
    rest) for testing.  Returns sorted index arrays; the same seed gives the same split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) <= n_train:
            name = class_names[c] if class_names else c
            raise InputError(f"class {name} has {len(members)} images; {n_train} for training "
                             "and at least one for testing are needed (lower --train-per-class)")
        train.append(members[:n_train])
        test.append(members[n_train:None if n_test is None else n_train + n_test])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def fraction_split(labels: np.ndarray, *, train_fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split keeping ``train_fraction`` of every class for training."""
    train, test = train_test_split(np.arange(len(labels)), train_size=train_fraction,
                                   stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


def holdout(train: np.ndarray, labels: np.ndarray | None, *, fraction: float = 0.2, seed: int,
            groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of a training split (stratified when ``labels`` are given) to
    choose hyper-parameters; returns (fit, validation) index arrays.

    ``groups`` (one per sample of the whole dataset, e.g. the image of each person) keeps the
    samples of a group on one side: ``fraction`` of the groups is held out.  Two people of one
    image share the whole image's descriptor, so splitting them would score C on samples it
    was fitted on.
    """
    if groups is not None:
        if labels is not None:
            raise ValueError("holdout by groups is not stratified: give labels or groups")
        split = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        fit, val = next(split.split(train, groups=np.asarray(groups)[train]))
        return np.sort(train[fit]), np.sort(train[val])
    fit, val = train_test_split(train, test_size=fraction, random_state=seed,
                                stratify=None if labels is None else labels[train])
    return np.sort(fit), np.sort(val)
