"""Seeded splits of a site's patients (shared by the sepsis and cardiac
commands, the data controller's commands and the experiment runner): training vs
held-out real patients within a site, and a held-out hospital."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
import pandas as pd


def split_ids(key, ids, test_fraction: float) -> tuple[set, set]:
    """A seeded random split of a site's patient/stay ids into (train, test); the
    test share is held out real data for that site's evaluation."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction: {test_fraction} is not in (0, 1)")
    ids = np.unique(np.asarray(ids))
    order = np.asarray(jax.random.permutation(key, len(ids)))
    n_test = max(1, int(round(test_fraction * len(ids))))
    return set(ids[order[n_test:]].tolist()), set(ids[order[:n_test]].tolist())


def holdout_split(
    key,
    frames: Mapping[str, pd.DataFrame],
    id_col: str,
    holdout: str | None,
    test_fraction: float,
) -> tuple[str, dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """The held-out hospital (default: the last site) and, for every other site, a
    seeded split of its rows by ``id_col`` into training and held-out test rows:
    ``(holdout, train, test)``."""
    names = list(frames)
    holdout = holdout or names[-1]
    if holdout not in frames:
        raise ValueError(
            f"--holdout: {holdout!r} is not one of the sites {', '.join(names)}"
        )
    if len(names) < 2:
        raise ValueError("--holdout: at least one other site is needed to train")
    train, test = {}, {}
    for i, n in enumerate(x for x in names if x != holdout):
        df = frames[n]
        tr, te = split_ids(jax.random.fold_in(key, i), df[id_col], test_fraction)
        train[n], test[n] = df[df[id_col].isin(tr)], df[df[id_col].isin(te)]
    return holdout, train, test


__all__ = ["holdout_split", "split_ids"]
