"""Generalisation hierarchies on hand-worked values, and bad input."""

import numpy as np
import pandas as pd
import pytest

from phems_clinical.privacy.hierarchies import (
    Hierarchy,
    HierarchyError,
    categorical,
    check_covers,
    check_nested,
    dates,
    height_cm,
    ich_e11_age,
    interval,
    paediatric_age,
    weight_kg,
)

Y = 365.25


def test_paediatric_age_day_boundaries():
    h = paediatric_age()
    assert h.height == 3
    days = [
        0,
        27,
        28,
        364,
        365,
        366,
        1826,
        1827,
        3652,
        3653,
        5478,
        5479,
        17 * 365 + 364,
        6574,
    ]
    want = [
        "0-27 d",
        "0-27 d",
        "1-11 m",
        "1-11 m",
        "1-11 m",
        "1-4 y",
        "1-4 y",
        "5-9 y",
        "5-9 y",
        "10-14 y",
        "10-14 y",
        "15-17 y",
        "15-17 y",
        "15-17 y",
    ]
    assert h.generalise(days, 1).tolist() == want
    assert h.generalise(days, 2).tolist() == (
        ["0-11 m"] * 5 + ["1-9 y"] * 4 + ["10-17 y"] * 5
    )
    assert h.generalise(days, 3).tolist() == ["*"] * len(days)
    assert h.generalise(days, 0).tolist() == days


def test_paediatric_age_months_and_years():
    m = paediatric_age(unit="months")
    assert m.generalise([0.9, 11.0, 11.99, 12.0, 59.99, 60.0], 1).tolist() == [
        "0-27 d",
        "1-11 m",
        "1-11 m",
        "1-4 y",
        "1-4 y",
        "5-9 y",
    ]
    y = paediatric_age(unit="years")
    assert y.generalise([4.999, 5.0, 9.99, 10.0, 17.999, 15.0], 1).tolist() == [
        "1-4 y",
        "5-9 y",
        "5-9 y",
        "10-14 y",
        "15-17 y",
        "15-17 y",
    ]
    with pytest.raises(HierarchyError, match="weeks"):
        paediatric_age(unit="weeks")


def test_paediatric_age_not_covered_names_value_and_row():
    h = paediatric_age(unit="years")
    s = pd.Series(
        [3.0, 18.0, -0.1, 7.0, 42.0], index=[10, 11, 12, 13, 14], name="age_y"
    )
    with pytest.raises(HierarchyError, match=r"18\.0 \(row 11\)") as e:
        h.generalise(s, 1)
    assert "-0.1 (row 12)" in str(e.value) and "age_y" in str(e.value)
    assert e.value.uncovered.index.tolist() == [11, 12, 14]  # all, at once
    with pytest.raises(HierarchyError, match="6575"):
        paediatric_age().generalise([6575], 1)
    with pytest.raises(HierarchyError, match="expected a numeric age"):
        paediatric_age().generalise(pd.Series(["3 d"]), 1)


def test_missing_values_stay_missing_below_top():
    h = paediatric_age()
    out = h.generalise(pd.Series([np.nan, 30.0]), 1)
    assert out.isna().tolist() == [True, False] and out[1] == "1-11 m"
    assert h.generalise(pd.Series([np.nan, 30.0]), 3).tolist() == ["*", "*"]


def test_ich_e11_groups_and_non_nesting():
    h = ich_e11_age()
    got = h.generalise([27, 28, 730, 731, 4382, 4383, 6574], 1).tolist()
    assert got == [
        "term newborn 0-27 d",
        "infant/toddler 28 d-23 m",
        "infant/toddler 28 d-23 m",
        "child 2-11 y",
        "child 2-11 y",
        "adolescent 12-17 y",
        "adolescent 12-17 y",
    ]
    ages = np.arange(0, 6574)
    check_nested(paediatric_age(), ages)  # the default hierarchy nests
    mixed = Hierarchy("age", (paediatric_age().levels[0], h.levels[0]), covers=h.covers)
    with pytest.raises(HierarchyError, match="not nested"):
        check_nested(mixed, ages)  # 1-4 y straddles 2 y; 10-14 y straddles 12 y


def test_interval_weight_and_height():
    w = weight_kg()
    v = [0, 4.99, 5, 14.9, 15, 19.99, 299.9]
    assert w.generalise(v, 1).tolist() == [
        "[0, 5)",
        "[0, 5)",
        "[5, 10)",
        "[10, 15)",
        "[15, 20)",
        "[15, 20)",
        "[295, 300)",
    ]
    assert w.generalise(v, 2).tolist()[3:5] == ["[10, 20)", "[10, 20)"]
    assert w.generalise(v, 3).tolist()[4] == "[0, 20)"
    assert w.height == 4
    h = height_cm()
    assert h.generalise([45.0, 49.9, 50.0, 176.0], 1).tolist() == [
        "[45, 50)",
        "[45, 50)",
        "[50, 55)",
        "[175, 180)",
    ]
    assert h.generalise([45.0, 59.9, 60.0], 2).tolist() == [
        "[40, 50)",
        "[50, 60)",
        "[60, 70)",
    ]
    check_nested(h, np.linspace(20, 259.9, 500))
    with pytest.raises(HierarchyError, match=r"300 \(row 1\)"):
        w.generalise([10, 300], 1)
    with pytest.raises(HierarchyError, match=r"19\.5 \(row 0\)"):
        h.generalise([19.5], 2)


def test_interval_rejects_bad_definitions():
    with pytest.raises(HierarchyError, match="multiple"):
        interval("w", (5, 7), lower=0, upper=10)
    with pytest.raises(HierarchyError, match="lower < upper"):
        interval("w", (5,), lower=10, upper=10)
    g = interval("g", (0.5, 1), lower=0.25, upper=2)
    assert g.generalise([0.25, 0.8, 1.3], 1).tolist() == [
        "[0.25, 0.75)",
        "[0.75, 1.25)",
        "[1.25, 1.75)",
    ]


def test_dates_month_year():
    h = dates("admit")
    s = pd.Series(
        pd.to_datetime(["2023-01-31 23:59", "2023-02-01 00:00", None]), name="admit"
    )
    assert h.generalise(s, 1).tolist()[:2] == ["2023-01", "2023-02"]
    assert h.generalise(s, 2).tolist()[:2] == ["2023", "2023"]
    assert pd.isna(h.generalise(s, 2)[2])
    assert h.generalise(s, 3).tolist() == ["*"] * 3
    with pytest.raises(HierarchyError, match="expected datetime64"):
        h.generalise(pd.Series(["2023-01-01"], name="admit"), 1)


def test_categorical_chain_and_coverage():
    h = categorical(
        "dx",
        [
            {"J18": "pneumonia", "J15": "pneumonia", "A41": "sepsis"},
            {"pneumonia": "infection", "sepsis": "infection"},
        ],
    )
    s = pd.Series(["J18", "A41", "J15"])
    assert h.generalise(s, 1).tolist() == ["pneumonia", "sepsis", "pneumonia"]
    assert h.generalise(s, 2).tolist() == ["infection"] * 3
    assert h.height == 3
    with pytest.raises(HierarchyError) as e:
        check_covers(h, pd.Series(["J18", "Q21", "Z99", "Q21"], name="dx"))
    assert "'Q21' (row 1)" in str(e.value) and "'Z99' (row 2)" in str(e.value)
    assert e.value.uncovered.tolist() == ["Q21", "Z99", "Q21"]
    with pytest.raises(HierarchyError, match="sepsis"):
        categorical("dx", [{"A41": "sepsis"}, {"pneumonia": "infection"}])


def test_level_out_of_range():
    with pytest.raises(HierarchyError, match="0..3"):
        paediatric_age().generalise([1], 4)
