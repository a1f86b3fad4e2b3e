"""Lattice search and Mondrian, checked by anonymity.py."""

import itertools

import numpy as np
import pandas as pd
import pytest

from phems_clinical.privacy.anonymity import (
    discernibility,
    equivalence_classes,
    k_anonymity,
    l_diversity,
    t_closeness,
)
from phems_clinical.privacy.hierarchies import (
    Hierarchy,
    categorical,
    interval,
    paediatric_age,
)
from phems_clinical.privacy.search import (
    SearchError,
    generalise,
    lattice_search,
    mondrian,
)

SEX = Hierarchy("sex", ())  # level 0 original, level 1 '*'


def hand_table():
    return pd.DataFrame(
        {
            "age": [100, 200, 400, 800, 2000, 2500],
            "sex": ["F", "F", "M", "M", "F", "F"],
            "dx": ["a", "b", "a", "b", "a", "c"],
        }
    )


def hier():
    return {"age": paediatric_age(), "sex": SEX}


def random_table(seed, n=60):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.integers(0, 18 * 365, n),
            "weight": rng.uniform(2, 80, n).round(1),
            "sex": rng.choice(["F", "M"], n),
            "dx": rng.choice(["asthma", "sepsis", "cardiac", "renal"], n),
        }
    )


def rand_hier():
    return {
        "age": paediatric_age(),
        "weight": interval("weight", (10, 20, 40), lower=0, upper=160),
        "sex": SEX,
    }


# ------------------------------------------------------------- hand-worked
def test_hand_worked_k2_no_suppression():
    df = hand_table()
    r = lattice_search(df, hier(), k=2)
    assert r.levels == {"age": 1, "sex": 0}
    assert r.data["age"].tolist() == [
        "1-11 m",
        "1-11 m",
        "1-4 y",
        "1-4 y",
        "5-9 y",
        "5-9 y",
    ]
    assert r.metrics["information_loss"] == pytest.approx(1 / 6)
    assert r.changes["quasi_identifiers"] == {
        "age": {"level": 1, "cells_changed": 6},
        "sex": {"level": 0, "cells_changed": 0},
    }
    assert r.changes["suppressed_rows"] == 0 and not r.suppressed.any()
    assert k_anonymity(r.data, ["age", "sex"]) == 2
    assert df["age"].tolist()[0] == 100  # input untouched


def test_hand_worked_k3_with_and_without_suppression():
    df = hand_table()
    r = lattice_search(df, hier(), k=3)
    assert r.levels == {"age": 3, "sex": 1}  # only the top node works
    assert r.metrics["information_loss"] == 1.0
    # suppressing the two boys (1/3) beats full generalisation: loss 8/12
    r = lattice_search(df, hier(), k=3, max_suppression=1 / 3)
    assert r.levels == {"age": 3, "sex": 0}
    assert r.suppressed.tolist() == [False, False, True, True, False, False]
    assert r.metrics["information_loss"] == pytest.approx(8 / 12)
    assert (r.data.loc[r.suppressed, ["age", "sex"]] == "*").all().all()
    assert r.changes["suppressed_rows"] == 2
    assert r.changes["suppressed_share"] == pytest.approx(1 / 3)
    assert r.changes["quasi_identifiers"]["sex"]["cells_changed"] == 2
    assert k_anonymity(r.data, ["age", "sex"], suppressed=r.suppressed) == 4
    # a limit just below 1/3 forbids it
    r = lattice_search(df, hier(), k=3, max_suppression=0.33)
    assert r.levels == {"age": 3, "sex": 1} and not r.suppressed.any()


def test_ties_go_to_lowest_levels():
    # (1, 0) and (1, 1) both give three classes of 2: C_DM = 12 each
    for supp in (0.0, 0.1):
        r = lattice_search(
            hand_table(), hier(), k=2, metric="discernibility", max_suppression=supp
        )
        assert r.levels == {"age": 1, "sex": 0}
        assert r.metrics["information_loss"] == 12


def test_no_pruning_with_suppression():
    # level 0 is k=2 after suppressing 4/6 (loss 2/3); its successor level 1
    # needs no suppression (loss 1/3) and must not be pruned
    df = pd.DataFrame({"age": [100, 100, 150, 160, 170, 180]})
    r = lattice_search(df, {"age": paediatric_age()}, k=2, max_suppression=0.7)
    assert r.levels == {"age": 1} and not r.suppressed.any()
    assert r.metrics["information_loss"] == pytest.approx(1 / 3)
    assert r.metrics["nodes_pruned"] == 0


# ------------------------------------------------------------- brute force
def brute_force(df, h, k, ldiv, max_supp, metric):
    qis = list(h)
    best = None
    for node in itertools.product(*(range(h[c].height + 1) for c in qis)):
        lv = dict(zip(qis, node, strict=True))
        g = generalise(df, h, lv)
        ec = equivalence_classes(g, qis).to_numpy(dtype=int)
        size = np.bincount(ec)[ec]
        bad = size < k
        if ldiv is not None:
            nd = g.assign(ec=ec).groupby("ec")["dx"].nunique().to_numpy()[ec]
            bad |= nd < ldiv
        if bad.mean() > max_supp or bad.all():
            continue
        assert k_anonymity(g, qis, suppressed=bad) >= k
        n, m = len(df), len(qis)
        if metric == "loss":
            frac = sum(lv[c] / h[c].height for c in qis)
            val = (frac * (n - bad.sum()) + m * bad.sum()) / (n * m)
        else:
            val = discernibility(g, qis, suppressed=bad)
        cand = (round(val, 12), sum(node), node)
        best = cand if best is None or cand < best else best
    return best


@pytest.mark.parametrize(
    "seed,k,ldiv,max_supp,metric",
    [
        (0, 3, None, 0.0, "loss"),
        (1, 5, None, 0.1, "loss"),
        (2, 4, None, 0.05, "discernibility"),
        (3, 3, 3, 0.1, "loss"),
        (4, 2, None, 0.0, "discernibility"),
        (5, 4, 3, 0.2, "discernibility"),
    ],
)
def test_optimal_vs_brute_force(seed, k, ldiv, max_supp, metric):
    df = random_table(seed)
    h = rand_hier()
    sens = "dx" if ldiv else None
    r = lattice_search(
        df, h, k=k, l=ldiv, sensitive=sens, max_suppression=max_supp, metric=metric
    )
    want = brute_force(df, h, k, ldiv, max_supp, metric)
    assert tuple(r.levels.values()) == want[2]
    assert r.metrics["information_loss"] == pytest.approx(want[0])
    qis = list(h)
    assert k_anonymity(r.data, qis, suppressed=r.suppressed) >= k
    assert r.suppressed.mean() <= max_supp + 1e-12
    if ldiv:
        assert l_diversity(r.data, qis, "dx", suppressed=r.suppressed) >= ldiv
    if max_supp == 0.0:
        assert r.metrics["nodes_pruned"] > 0  # monotone: successors skipped


def test_suppression_helps_and_limit_respected():
    df = random_table(7, n=80)
    h = rand_hier()
    losses = []
    for lim in (0.0, 0.05, 0.2):
        r = lattice_search(df, h, k=4, max_suppression=lim)
        assert r.suppressed.mean() <= lim
        assert k_anonymity(r.data, list(h), suppressed=r.suppressed) >= 4
        losses.append(r.metrics["information_loss"])
    assert losses[0] >= losses[1] >= losses[2]
    assert losses[2] < losses[0]


def test_t_closeness_holds():
    df = random_table(8)
    h = rand_hier()
    r0 = lattice_search(df, h, k=3, max_suppression=0.1)
    r = lattice_search(df, h, k=3, sensitive="dx", t=0.15, max_suppression=0.1)
    assert r.levels != r0.levels  # t binds
    assert t_closeness(r.data, list(h), "dx", suppressed=r.suppressed) <= 0.15
    assert r.metrics["t"] <= 0.15
    assert r.suppressed.mean() <= 0.1


def test_categorical_hierarchy_and_missing_values():
    df = pd.DataFrame(
        {
            "ward": ["picu", "nicu", "picu", "ward", "nicu", "ward"],
            "age": [10, np.nan, 400, 800, 20, np.nan],
        }
    )
    h = {
        "ward": categorical("ward", [{"picu": "icu", "nicu": "icu", "ward": "ward"}]),
        "age": paediatric_age(),
    }
    r = lattice_search(df, h, k=2)
    assert k_anonymity(r.data, ["ward", "age"]) >= 2


# ------------------------------------------------------------- idempotence
def test_idempotent_lattice():
    df = random_table(9)
    h = rand_hier()
    r = lattice_search(df, h, k=3, max_suppression=0.1)
    pd.testing.assert_frame_equal(r.apply(df), r.data)
    pd.testing.assert_frame_equal(r.apply(r.data), r.data)
    pd.testing.assert_frame_equal(generalise(r.data, h, r.levels), r.data)
    again = lattice_search(r.data, h, k=3, max_suppression=0.1)
    pd.testing.assert_frame_equal(again.data, r.data)
    assert again.levels == r.levels
    assert (again.suppressed == r.suppressed).all()
    assert again.changes["suppressed_rows"] == 0
    assert all(
        v["cells_changed"] == 0 for v in again.changes["quasi_identifiers"].values()
    )
    g = generalise(df, h, {"age": 1, "weight": 2, "sex": 0})
    pd.testing.assert_frame_equal(
        generalise(g, h, {"age": 1, "weight": 2, "sex": 0}), g
    )
    with pytest.raises(SearchError, match="original values"):
        generalise(g, h, {"age": 2, "weight": 2, "sex": 0})
    with pytest.raises(SearchError, match="already anonymised"):
        lattice_search(r.data, h, k=5)


# ------------------------------------------------------------- Mondrian
@pytest.mark.parametrize("k", [2, 5, 13])
def test_mondrian_classes_and_cover(k):
    df = random_table(10, n=100)[["age", "weight", "dx"]]
    r = mondrian(df, ["age", "weight"], k)
    parts = r.metrics["partitions"]
    allrows = np.sort(np.concatenate(parts))
    assert (allrows == np.arange(len(df))).all()  # each row exactly once
    assert min(len(p) for p in parts) >= k
    assert k_anonymity(r.data, ["age", "weight"]) >= k
    assert len(parts) > 1
    for p in parts:  # ranges cover the class's original values
        lab = r.data["age"].iloc[p[0]]
        lo, hi = (float(x) for x in lab.strip("[]").split(","))
        ages = df["age"].iloc[p]
        assert lo == ages.min() and hi == ages.max()
        assert (r.data["age"].iloc[p] == lab).all()
    assert equivalence_classes(r.data, ["age", "weight"]).nunique() == len(parts)


def test_mondrian_hand_worked_and_ordered_categorical():
    sev = pd.Categorical(
        ["mild", "mild", "moderate", "severe", "severe", "mild"],
        categories=["mild", "moderate", "severe"],
        ordered=True,
    )
    df = pd.DataFrame({"x": [1, 2, 3, 10, 11, 12], "sev": sev})
    r = mondrian(df, ["x"], 3)
    assert r.data["x"].tolist() == ["[1, 3]"] * 3 + ["[10, 12]"] * 3
    assert r.changes["quasi_identifiers"]["x"]["cells_changed"] == 6
    r = mondrian(df, ["sev"], 2)
    assert set(r.data["sev"]) <= {
        "{mild}",
        "{moderate, severe}",
        "{severe}",
        "{mild, moderate}",
    }
    assert k_anonymity(r.data, ["sev"]) >= 2


def test_mondrian_l_diversity_and_idempotence():
    df = random_table(11, n=120)
    r = mondrian(df, ["age", "weight"], 4, l=3, sensitive="dx")
    assert l_diversity(r.data, ["age", "weight"], "dx") >= 3
    assert k_anonymity(r.data, ["age", "weight"]) >= 4
    again = mondrian(r.data, ["age", "weight"], 4, l=3, sensitive="dx")
    pd.testing.assert_frame_equal(again.data, r.data)
    pd.testing.assert_frame_equal(r.apply(r.data), r.data)


# ------------------------------------------------------------- errors
def test_errors():
    df = hand_table()
    with pytest.raises(SearchError, match="'weight'"):
        lattice_search(
            df, {**hier(), "weight": interval("weight", lower=0, upper=9)}, k=2
        )
    with pytest.raises(ValueError, match="k=7 is impossible"):
        lattice_search(df, hier(), k=7)
    with pytest.raises(SearchError, match="k=7 is impossible"):
        mondrian(df, ["age"], 7)
    with pytest.raises(SearchError, match="'height'"):
        mondrian(df, ["age", "height"], 2)
    with pytest.raises(
        SearchError, match=r"no lattice node.*best k reached .* is 6.*100\.0%"
    ):
        lattice_search(df, hier(), k=2, l=4, sensitive="dx")
    with pytest.raises(SearchError, match="only 3 distinct"):
        mondrian(df, ["age"], 2, l=4, sensitive="dx")
    with pytest.raises(SearchError, match="numbers or ordered"):
        mondrian(df, ["sex"], 2)
    with pytest.raises(SearchError, match="sensitive"):
        lattice_search(df, hier(), k=2, l=2)
    with pytest.raises(SearchError, match="metric"):
        lattice_search(df, hier(), k=2, metric="entropy")
