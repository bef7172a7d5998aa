"""How a fitted baseline chooses its hyper-parameters: on the tuning split when that split can rank, else by
cross-validation within train. The held_out rows take no part (``fit`` is never handed them).

The rule, per (task, horizon):

1. Count the tuning split's *positive subjects*: subjects with at least one positive row of that
   task-horizon (rows of one subject are correlated, so subjects, not rows, say how well the split can
   rank).
2. At least ``MIN_TUNING_POSITIVE_SUBJECTS``: choose on the tuning rows (method ``"tuning"``).
3. Fewer: choose by K-fold cross-validation on the train rows (method ``"cv_within_train"``), with folds
   that keep each subject's rows together and balance subjects with a positive row across folds
   (scikit-learn ``StratifiedGroupKFold`` over rows, each row labelled with its subject's outcome), then
   refit on all train rows with the chosen value.
4. When train holds fewer than two subjects of each outcome no fold split exists: the configured default
   is used (method ``"default"``).

``record`` is the ``selection`` entry of ``info.json``::

    {"method": "tuning" | "cv_within_train" | "default", "tuning_positive_subjects": n,
     "tuning_positive_rows": n, "folds": k (null unless cv_within_train), "chosen": {...},
     "scores": [{<candidate>, "auroc": mean AUROC}, ...], "threshold_positive_subjects": 30}
"""

from __future__ import annotations

import numpy as np
import polars as pl

# Below this many positive subjects a tuning AUROC is too coarse to rank a handful of candidate settings:
# with 30 positives and a true AUROC of 0.8 its standard error is already about 0.05 (Hanley and McNeil 1982,
# Radiology 143:29), 0.085 with 10, while the candidates differ by a few hundredths.
MIN_TUNING_POSITIVE_SUBJECTS = 30
TUNING, CV_WITHIN_TRAIN, DEFAULT = "tuning", "cv_within_train", "default"


def positive_counts(rows: pl.DataFrame) -> tuple[int, int]:
    """Subjects with at least one positive row, and positive rows, of label ``rows``.

    >>> positive_counts(pl.DataFrame({"subject_id": [1, 1, 2, 3], "boolean_value": [True, True, False, True]}))
    (2, 3)
    """
    positive = rows.filter(pl.col("boolean_value"))
    return int(positive["subject_id"].n_unique()), positive.height


def method(tuning: pl.DataFrame) -> str:
    """``"tuning"`` when the tuning rows hold at least ``MIN_TUNING_POSITIVE_SUBJECTS`` positive subjects
    (and a negative row), else ``"cv_within_train"``."""
    subjects, rows = positive_counts(tuning)
    can_rank = subjects >= MIN_TUNING_POSITIVE_SUBJECTS and tuning.height > rows
    return TUNING if can_rank else CV_WITHIN_TRAIN


def subject_outcome(rows: pl.DataFrame) -> np.ndarray:
    """Per row, 1 when its subject has any positive row among ``rows`` (0 otherwise)."""
    positive = rows.filter(pl.col("boolean_value"))["subject_id"].unique()
    return rows["subject_id"].is_in(positive.implode()).to_numpy().astype(np.int64)


def subject_folds(rows: pl.DataFrame, n_folds: int, seed: int) -> np.ndarray | None:
    """The fold (0..k-1) of each row of ``rows``: every subject's rows in one fold, subjects with a positive
    row spread evenly over the folds. k is ``n_folds``, or fewer when train holds fewer subjects of an
    outcome; None when no split into two folds exists."""
    outcome = subject_outcome(rows)
    subjects = rows.select("subject_id", pl.Series("outcome", outcome)).unique()
    per_outcome = subjects.group_by("outcome").len()["len"].to_list()
    k = min([n_folds, *per_outcome]) if len(per_outcome) == 2 else 0
    if k < 2:
        return None
    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.full(rows.height, -1, np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for index, (_train, validation) in enumerate(splitter.split(np.zeros(rows.height), outcome, rows["subject_id"])):
        fold[validation] = index
    return fold


def record(how: str, tuning: pl.DataFrame, folds: int | None, chosen: dict, scores: list | None = None) -> dict:
    """The ``selection`` entry of info.json (module docstring)."""
    subjects, rows = positive_counts(tuning)
    return {"method": how, "tuning_positive_subjects": subjects, "tuning_positive_rows": rows,
            "folds": folds if how == CV_WITHIN_TRAIN else None, "chosen": chosen, "scores": scores or [],
            "threshold_positive_subjects": MIN_TUNING_POSITIVE_SUBJECTS}
