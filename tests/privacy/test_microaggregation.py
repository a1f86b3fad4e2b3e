"""MDAV microaggregation: hand-worked groupings and invariants."""

import numpy as np
import pandas as pd
import pytest

from phems_clinical.privacy.microaggregation import (
    MicroaggregationError,
    mdav,
    microaggregate,
)


def _partition(groups):
    return sorted(
        sorted(np.nonzero(groups == g)[0].tolist()) for g in np.unique(groups)
    )


def test_mdav_hand_worked_1d():
    # x = 1 2 3 10 11 12 20 21, k = 2 (n = 8 >= 3k = 6):
    #  centroid 10; farthest r = 21 (d 11 > 9); farthest from 21: s = 1.
    #  r's group: 21 + nearest 20 -> {20, 21}; s's group: 1 + nearest 2 -> {1, 2}.
    #  4 remain (3 10 11 12): 2k <= 4 < 3k: centroid 9, farthest 3 (d 6 > 3);
    #  3 + nearest 10 -> {3, 10}; the rest {11, 12}.
    # MDAV is a heuristic: {3, 10} is not what an optimal partition would pick.
    x = np.array([1, 2, 3, 10, 11, 12, 20, 21], float)[:, None]
    g = mdav(x, 2)
    assert _partition(g) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g.tolist() == [1, 1, 2, 2, 3, 3, 0, 0]  # order groups were formed


def test_mdav_hand_worked_2d():
    # points (0,0) (0,1) (1,0) (9,9) (9,10) (10,9) (5,5), k = 3, n = 7 (< 3k = 9;
    # >= 2k = 6): centroid (34/7, 34/7) = (4.857, 4.857); squared distances:
    #  (0,0) 47.18, (0,1) 38.47, (1,0) 38.47, (9,9) 34.31, (9,10) 43.02,
    #  (10,9) 43.02, (5,5) 0.04 -> r = (0,0); its 2 nearest: (0,1), (1,0)
    #  (d^2 = 1 each) -> {0, 1, 2}; the rest {3, 4, 5, 6} is the last group.
    x = np.array([[0, 0], [0, 1], [1, 0], [9, 9], [9, 10], [10, 9], [5, 5]], float)
    assert _partition(mdav(x, 3)) == [[0, 1, 2], [3, 4, 5, 6]]


def test_mdav_ties_by_input_order():
    x = np.zeros((4, 1))
    assert _partition(mdav(x, 2)) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("n,k", [(7, 1), (30, 3), (101, 5), (57, 10), (12, 12)])
def test_group_sizes_and_means(n, k):
    rng = np.random.default_rng(n * 100 + k)
    df = pd.DataFrame(
        {
            "a": rng.lognormal(size=n),
            "b": rng.normal(50, 10, n),
            "c": rng.integers(0, 3, n).astype(float),
            "id": np.arange(n),
        }
    )
    res = microaggregate(df, ["a", "b", "c"], k)
    assert (res.sizes >= k).all()
    assert (res.sizes <= max(2 * k - 1, k)).all()
    assert res.sizes.sum() == n
    np.testing.assert_allclose(
        res.data[["a", "b", "c"]].mean(), df[["a", "b", "c"]].mean(), rtol=1e-12
    )
    # every released vector is shared by its whole group (>= k rows)
    counts = res.data.groupby(["a", "b", "c"]).size()
    assert counts.min() >= k
    assert res.data["id"].tolist() == list(range(n))  # other columns untouched
    if k == 1:
        pd.testing.assert_frame_equal(res.data, df)


def test_standardise_changes_the_grouping_by_scale():
    # z-scores: a = (-1, -1, 1, 1), b = (-1.34, 0.45, -0.45, 1.34); from row 0
    # (farthest from the centroid, first of the tie with row 3) the squared
    # distances are 3.2 (row 1), 4.8 (row 2): groups {0, 1}, {2, 3}. On the raw
    # scale b's range of 150 swamps a's 10: 10000 (row 1) vs 2600 (row 2).
    df = pd.DataFrame({"a": [0.0, 0.0, 10.0, 10.0], "b": [0.0, 100.0, 50.0, 150.0]})
    assert _partition(microaggregate(df, ["a", "b"], 2).groups) == [[0, 1], [2, 3]]
    raw = microaggregate(df, ["a", "b"], 2, standardise=False)
    assert _partition(raw.groups) == [[0, 2], [1, 3]]


def test_trajectories_in_wide_form():
    # three patients near one trajectory, three near another: group means are
    # the two mean trajectories
    t1 = np.array([[10, 8, 6], [11, 9, 7], [12, 10, 8]], float)
    t2 = t1 + 50
    wide = pd.DataFrame(np.vstack([t1, t2]), columns=["h0", "h1", "h2"])
    res = microaggregate(wide, ["h0", "h1", "h2"], 3)
    np.testing.assert_allclose(res.data.iloc[:3], np.tile([11, 9, 7], (3, 1)))
    np.testing.assert_allclose(res.data.iloc[3:], np.tile([61, 59, 57], (3, 1)))


def test_bad_inputs_name_the_problem():
    df = pd.DataFrame({"a": [1.0, np.nan, 3.0], "s": ["x", "y", "z"]})
    with pytest.raises(MicroaggregationError, match="'a'.*1 missing"):
        microaggregate(df, ["a"], 2)
    with pytest.raises(MicroaggregationError, match="'s'.*numeric"):
        microaggregate(df, ["s"], 2)
    with pytest.raises(MicroaggregationError, match=r"\['q'\]"):
        microaggregate(df, ["q"], 2)
    with pytest.raises(MicroaggregationError, match="k=5 is impossible"):
        microaggregate(df.fillna(0.0), ["a"], 5)
    with pytest.raises(MicroaggregationError, match="k: expected"):
        mdav(np.zeros((3, 1)), 0)
