"""k, l, t, re-identification risk and utility loss (phems_clinical.privacy.anonymity).

Hand-worked tables (reasoning in comments) and literal numbers from pycanon 1.3.6
(an independent implementation, run in its own venv because it pins numpy==2.0.2,
pandas==2.3.3, scipy==1.15.3) on seeded random tables rebuilt here.
"""

import math

import numpy as np
import pandas as pd
import pytest

from phems_clinical.privacy import (
    AnonymityInputError,
    anonymity_report,
    average_class_size,
    discernibility,
    equivalence_classes,
    generalisation_loss,
    journalist_risk,
    k_anonymity,
    l_diversity,
    marketer_risk,
    prosecutor_risk,
    suppressed_share,
    t_closeness,
)
from phems_clinical.privacy import anonymity as an

QI = ["age", "sex"]


def hand_table() -> pd.DataFrame:
    # EC1 (c, F): flu, flu, cold      size 3
    # EC2 (c, M): flu, asthma         size 2
    # EC3 (t, F): flu, cold, asthma, asthma, cold   size 5;  n = 10
    return pd.DataFrame(
        {
            "age": ["c", "c", "c", "c", "c", "t", "t", "t", "t", "t"],
            "sex": ["F", "F", "F", "M", "M", "F", "F", "F", "F", "F"],
            "diag": [
                "flu",
                "flu",
                "cold",
                "flu",
                "asthma",
                "flu",
                "cold",
                "asthma",
                "asthma",
                "cold",
            ],
        }
    )


def test_classes_k_and_l_by_hand():
    df = hand_table()
    ec = equivalence_classes(df, QI)
    assert ec.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]  # sorted QI order
    assert k_anonymity(df, QI) == 2  # sizes 3, 2, 5
    # distinct values per EC: 2 (flu, cold), 2 (flu, asthma), 3 -> l = 2
    assert l_diversity(df, QI, "diag") == 2
    # entropy l: EC1 p = (2/3, 1/3): exp(H) = 3 / 2**(2/3) = 1.88988;
    # EC2 exp(ln 2) = 2; EC3 p = (.2, .4, .4): 5**.2 * 2.5**.8 = 2.871 -> min = EC1
    assert l_diversity(df, QI, "diag", kind="entropy") == pytest.approx(
        3 / 2 ** (2 / 3), rel=1e-12
    )


def test_missing_qi_is_a_value_and_suppression_excludes():
    df = pd.DataFrame({"age": [np.nan, np.nan, 3.0], "sex": ["F", "F", "F"]})
    ec = equivalence_classes(df, QI)
    assert ec.tolist() == [1, 1, 0]  # NaN sorts last, its own class of size 2
    assert k_anonymity(df, QI) == 1
    sup = np.array([False, False, True])
    assert equivalence_classes(df, QI, sup).isna().tolist() == [False, False, True]
    assert k_anonymity(df, QI, suppressed=sup) == 2


def test_t_categorical_equal_distance_by_hand():
    # table p (flu, cold, asthma) = (.4, .3, .3)
    # EC1 q = (2/3, 1/3, 0): 1/2 (.2667 + .0333 + .3) = .3
    # EC2 q = (.5, 0, .5):   1/2 (.1 + .3 + .2) = .3
    # EC3 q = (.2, .4, .4):  1/2 (.2 + .1 + .1) = .2   -> t = .3
    assert t_closeness(hand_table(), QI, "diag") == pytest.approx(0.3, abs=1e-12)


def salary_table(first_class) -> pd.DataFrame:
    # Li, Li & Venkatasubramanian 2007, Section 4: salaries 3k..11k, one each, so
    # P is uniform 1/9 over m = 9 ordered values.
    sal = np.arange(3, 12) * 1000
    return pd.DataFrame(
        {"zip": np.where(np.isin(sal, first_class), "A", "B"), "salary": sal}
    )


def test_t_ordered_salary_example_li_2007():
    # EC A = {3k, 4k, 5k}: r = q - p = (2,2,2,-1,-1,-1,-1,-1,-1)/9; cumulative
    # (2,4,6,5,4,3,2,1,0)/9 sums to 27/9 = 3; EMD = 3/(m-1) = 3/8 = .375.
    # EC B = six values at 1/6: cumulative (-2,-4,-6,-5,-4,-3,-2,-1,0)/18 ->
    # 27/18/8 = .1875, so t = .375.
    df = salary_table([3000, 4000, 5000])
    assert t_closeness(df, "zip", "salary") == pytest.approx(0.375, abs=1e-12)
    # EC A = {3k, 5k, 9k}: r = (2,-1,2,-1,-1,-1,2,-1,-1)/9, cumulative
    # (2,1,3,2,1,0,2,1,0)/9 = 12/9, /8 = 1/6 (0.167 in the paper); EC B: 12/18/8
    df = salary_table([3000, 5000, 9000])
    assert t_closeness(df, "zip", "salary") == pytest.approx(1 / 6, abs=1e-12)
    # forced equal distance on {3k,4k,5k}: 1/2 (3 * 2/9 + 6 * 1/9) = 2/3
    df = salary_table([3000, 4000, 5000])
    assert t_closeness(df, "zip", "salary", ordered=False) == pytest.approx(2 / 3)


def test_t_ordered_categorical_follows_category_order(monkeypatch):
    df = salary_table([3000, 4000, 5000])
    codes = df["salary"] // 1000
    names = [f"s{c:02d}" for c in range(11, 2, -1)]  # descending names
    cat = pd.Categorical(
        [f"s{c:02d}" for c in codes], categories=names[::-1], ordered=True
    )
    df2 = df.assign(salary=cat)
    assert t_closeness(df2, "zip", "salary") == pytest.approx(0.375)
    # the dense block path gives the same answer when split into tiny chunks
    monkeypatch.setattr(an, "_CHUNK_CELLS", 1)
    assert t_closeness(df, "zip", "salary") == pytest.approx(0.375)
    assert t_closeness(hand_table(), QI, "diag") == pytest.approx(0.3)


def population() -> pd.DataFrame:
    # population class sizes F: (c,F) 6, (c,M) 4, (t,F) 20, (t,M) 10
    keys = [("c", "F", 6), ("c", "M", 4), ("t", "F", 20), ("t", "M", 10)]
    return pd.DataFrame([(a, s) for a, s, f in keys for _ in range(f)], columns=QI)


def test_risks_by_hand():
    df = hand_table()
    # prosecutor: sizes 3, 2, 5 -> max 1/2; mean = 3 classes / 10 records;
    # all 1/|EC| > .09 -> share 1; threshold .25: EC1 (1/3), EC2 (1/2) -> 5/10
    assert prosecutor_risk(df, QI) == pytest.approx(
        {"max": 0.5, "mean": 0.3, "records_at_risk": 1.0}
    )
    assert prosecutor_risk(df, QI, threshold=0.25)["records_at_risk"] == 0.5
    # journalist: 1/F = 1/6, 1/4, 1/20 -> max .25; mean = (3/6+2/4+5/20)/10 = .125
    # records at risk (> .09): EC1 + EC2 = 5/10
    expect = {"max": 0.25, "mean": 0.125, "records_at_risk": 0.5}
    assert journalist_risk(df, QI, population()) == pytest.approx(expect)
    sizes = population().groupby(QI).size()  # Series keyed by the QI tuple
    assert journalist_risk(df, QI, sizes) == pytest.approx(expect)
    # marketer: (1/n) sum f_j / F_j = .125; without population = 3/10
    assert marketer_risk(df, QI, population()) == pytest.approx(0.125)
    assert marketer_risk(df, QI) == pytest.approx(0.3)


def test_utility_by_hand():
    df = hand_table()
    assert discernibility(df, QI) == 9 + 4 + 25
    sup = np.zeros(10, dtype=bool)
    sup[9] = True  # one EC3 record suppressed: 9 + 4 + 16 + 1 * 10
    assert discernibility(df, QI, sup) == 39
    assert suppressed_share(df, sup) == pytest.approx(0.1)
    assert suppressed_share(df) == 0.0
    assert average_class_size(df, QI, k=2) == pytest.approx(10 / 3 / 2)
    assert average_class_size(df, QI) == pytest.approx(10 / 3 / 2)  # achieved k
    # per-record levels / heights: age 0, 1/4, 2/4, 2/4; sex 0, 0, 1, 1 -> 3.25 / 8
    lv = pd.DataFrame({"age": [0, 1, 2, 2], "sex": [0, 0, 1, 1]})
    h = {"age": 4, "sex": 1}
    assert generalisation_loss(lv, h) == pytest.approx(0.40625)
    assert generalisation_loss({"age": 2, "sex": 0}, h) == pytest.approx(0.25)


def test_report_and_risk_ordering():
    df = hand_table()
    rep = anonymity_report(
        df,
        QI,
        "diag",
        population(),
        levels={"age": 1, "sex": 0},
        heights={"age": 2, "sex": 1},
    )
    assert rep["k"] == 2 and rep["n_classes"] == 3 and rep["discernibility"] == 38
    assert rep["sensitive"]["diag"]["l_distinct"] == 2
    assert rep["sensitive"]["diag"]["t"] == pytest.approx(0.3)
    assert rep["generalisation_loss"] == pytest.approx(0.25)
    p, j, m = rep["prosecutor"], rep["journalist"], rep["marketer"]
    assert p["max"] >= j["max"] >= j["mean"] == pytest.approx(m)
    assert p["mean"] >= m


# pycanon 1.3.6 oracle. Tables rebuilt from the seed, written to CSV, read back in
# the pycanon venv; numbers below are its output (repr), e.g.
#   from pycanon import anonymity as a; d = pd.read_csv(...)
#   a.k_anonymity(d, qi), a.l_diversity(d, qi, [s]),
#   a.entropy_l_diversity(d, qi, [s]), a.t_closeness(d, qi, [s])
# Notes: pycanon's entropy l is int(min exp(H)) (floored), so floor ours to compare.
# pycanon's t uses, for a numeric SA, the ordered EMD over the sorted distinct values
# present (np.unique), 1/(m-1) sum |cumulative r| - the same as ours; for strings the
# equal distance. Gotcha: pycanon indexes ECs with data.iloc[groupby labels], so a
# row-filtered frame raises IndexError (or silently uses wrong rows) unless you call
# reset_index(drop=True) first; we group positionally and need no reset.
# pycanon also drops NaN QI keys (groupby dropna=True); these tables have no NaN.
def random_table(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.choice(["0-1", "1-4", "5-9", "10-14"], n),
            "sex": rng.choice(["F", "M"], n),
            "ward": rng.choice(["A", "B", "C"], n, p=[0.5, 0.3, 0.2]),
            "diag": rng.choice(["sepsis", "asthma", "cardiac", "trauma", "other"], n),
            "los": rng.integers(1, 9, n),
        }
    )


QI3, QI2 = ("age", "sex", "ward"), ("age", "sex")
# (seed, n, qis, k, {sa: (l_distinct, floor entropy l, t)})
PYCANON = [
    (
        1,
        60,
        QI3,
        1,
        {"diag": (1, 1, 0.8333333333333334), "los": (1, 1, 0.5619047619047617)},
    ),
    (
        1,
        60,
        QI2,
        3,
        {"diag": (3, 2, 0.43333333333333335), "los": (3, 2, 0.26190476190476186)},
    ),
    (2, 200, QI3, 3, {"diag": (2, 1, 0.615), "los": (2, 1, 0.2749999999999999)}),
    (2, 200, QI2, 20, {"diag": (5, 4, 0.275), "los": (7, 5, 0.10456521739130437)}),
    (
        3,
        500,
        QI3,
        5,
        {"diag": (3, 2, 0.4121818181818182), "los": (5, 4, 0.2624761904761905)},
    ),
    (
        3,
        500,
        QI2,
        55,
        {"diag": (5, 4, 0.17894736842105263), "los": (8, 6, 0.12956929637526654)},
    ),
]


@pytest.mark.parametrize(("seed", "n", "qis", "k", "expect"), PYCANON)
def test_against_pycanon(seed, n, qis, k, expect):
    df = random_table(seed, n)
    qis = list(qis)
    assert k_anonymity(df, qis) == k
    for sa, (l_dist, l_ent, t) in expect.items():
        assert l_diversity(df, qis, sa) == l_dist
        assert math.floor(l_diversity(df, qis, sa, kind="entropy")) == l_ent
        assert t_closeness(df, qis, sa) == pytest.approx(t, rel=1e-12)


def test_pycanon_values_survive_row_filtering():
    # same numbers on a filtered frame with a gappy index (pycanon needs a reset)
    df = random_table(2, 200)
    kept = df[df["ward"] != "A"]
    assert l_diversity(kept, list(QI2), "diag") == l_diversity(
        kept.reset_index(drop=True), list(QI2), "diag"
    )


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda d: k_anonymity(d, ["age", "postcode"]), "postcode"),
        (lambda d: l_diversity(d, QI, "icd10"), "icd10"),
        (lambda d: t_closeness(d, QI, "age"), "age"),
        (lambda d: l_diversity(d, QI, "diag", kind="recursive"), "kind"),
        (lambda d: k_anonymity(d.iloc[:0], QI), "empty"),
        (lambda d: k_anonymity(d, []), "quasi_identifiers"),
        (lambda d: average_class_size(d, QI, k=0), "k"),
        (lambda d: average_class_size(d, QI, k=11), "[1, 10]"),
        (lambda d: prosecutor_risk(d, QI, threshold=0.0), "threshold"),
        (lambda d: prosecutor_risk(d, QI, threshold=1.5), "threshold"),
        (lambda d: k_anonymity(d, QI, suppressed=[True]), "suppressed"),
        (lambda d: k_anonymity(d, QI, suppressed=np.ones(10, bool)), "suppressed"),
        (lambda d: journalist_risk(d, QI, population().query("sex == 'F'")), "absent"),
        (lambda d: journalist_risk(d, QI, population().drop(columns="sex")), "sex"),
        (lambda d: journalist_risk(d, QI, d.iloc[:6]), "smaller"),
        (lambda d: t_closeness(d.assign(s=[1.0] * 9 + [np.nan]), QI, "s"), "'s'"),
        (lambda d: generalisation_loss({"age": 3}, {"age": 2}), "'age'"),
        (lambda d: generalisation_loss({"ward": 1}, {"age": 2}), "ward"),
    ],
)
def test_bad_input_names_the_problem(call, needle):
    with pytest.raises(AnonymityInputError) as err:
        call(hand_table())
    assert needle in str(err.value)
