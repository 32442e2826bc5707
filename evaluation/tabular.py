"""Utility of synthetic rows (tabular data): logistic-regression TSTR and the bounds check.

- :func:`logistic_accuracy`: a logistic regression (scikit-learn, features standardised
  with the training set's mean and spread) trained on one labelled table and scored on
  another. Trained on synthetic rows and tested on real ones it is TSTR (train synthetic,
  test real; Esteban et al. 2017); trained on real rows it is the real->real ceiling.
- :func:`in_bounds_fraction`: per column, the share of values inside the declared
  [min, max] (``deployment.table`` / the CSV's ``feature-min``/``feature-max``).

Arrays in, numbers out (docs/architecture.md §1): the CLI and benchmarks read the files.
"""

from __future__ import annotations

import numpy as np


def logistic_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                      *, max_iter: int = 2000) -> float:
    """Accuracy on (``test_x``, ``test_y``) of a standardised logistic regression fitted to
    (``train_x``, ``train_y``). A training set with a single class predicts that class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, test_x = np.asarray(train_x, np.float64).reshape(len(train_x), -1), \
        np.asarray(test_x, np.float64).reshape(len(test_x), -1)
    train_y, test_y = np.asarray(train_y).reshape(-1), np.asarray(test_y).reshape(-1)
    if len(np.unique(train_y)) < 2:
        return float(np.mean(test_y == train_y[0]))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def in_bounds_fraction(x: np.ndarray, lower: np.ndarray | list[float],
                       upper: np.ndarray | list[float]) -> np.ndarray:
    """Per column, the fraction of rows of ``x`` ([N, D]) with ``lower <= value <= upper``."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    lo, hi = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    return ((x >= lo) & (x <= hi)).mean(axis=0)


def to_original_units(x: np.ndarray, lower: np.ndarray | list[float], upper: np.ndarray | list[float]) -> np.ndarray:
    """Values in [0, 1] (the model's data space) mapped back to the columns' original units
    with the declared bounds, then clamped inside them."""
    lo, hi = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return np.clip(lo + np.clip(x, 0.0, 1.0) * (hi - lo), lo, hi)
