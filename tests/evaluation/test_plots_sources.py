"""Side-by-side figures of evaluation.plots: the statistics they draw against hand
computations on tiny tables, small cells left out, PNG output, and the use cases'
plot hooks."""

import numpy as np
import pandas as pd
import pytest

from phems_clinical import usecases
from phems_clinical.evaluation.plots import (
    band_figure,
    binned_quantiles,
    covariate_figure,
    covariate_shares,
    edges_from_bounds,
    occupation,
    occupation_figure,
)
from phems_clinical.usecases.haemophilia import time_after_dose

PNG = b"\x89PNG\r\n\x1a\n"


def _levels():
    # bin [0, 10): six patients, levels 1..6; bin [10, 20): four patients only
    a = pd.DataFrame(
        {"id": [1, 2, 3, 4, 5, 6], "t": [1.0, 2, 3, 4, 5, 6], "y": [1.0, 2, 3, 4, 5, 6]}
    )
    b = pd.DataFrame({"id": [1, 2, 3, 4], "t": [11.0, 12, 13, 14], "y": [9.0, 9, 9, 9]})
    extra = pd.DataFrame({"id": [7, 8], "t": [25.0, 5.0], "y": [100.0, np.nan]})
    return pd.concat([a, b, extra], ignore_index=True)


def test_binned_quantiles_hand_worked():
    q = binned_quantiles({"real": _levels()}, "t", "y", edges=[0, 10, 20], unit="id")
    # numpy linear quantiles of 1..6: position p * 5 -> 1.5, 3.5, 5.5; the bin of
    # four patients is left out, the row past the edges and the missing level
    # are not counted
    assert q.bin.tolist() == [0]
    row = q.iloc[0]
    assert (row.q10, row.q50, row.q90) == pytest.approx((1.5, 3.5, 5.5))
    assert (row.n, row.n_units, row.x_mid) == (6, 6, 3.5)
    q4 = binned_quantiles(
        {"real": _levels()}, "t", "y", edges=[0, 10, 20], unit="id", min_units=4
    )
    assert q4.bin.tolist() == [0, 1] and q4.q50.iloc[1] == 9.0


def test_units_are_counted_per_hospital():
    # the same patient number at two hospitals is two patients
    df = pd.DataFrame(
        {
            "hospital": ["a"] * 3 + ["b"] * 2,
            "id": [1, 2, 3, 1, 2],
            "t": [1.0] * 5,
            "y": [1.0, 2, 3, 4, 5],
        }
    )
    q = binned_quantiles({"s": df}, "t", "y", edges=[0, 2], unit=("hospital", "id"))
    assert q.n_units.tolist() == [5]
    assert binned_quantiles({"s": df}, "t", "y", edges=[0, 2], unit="id").empty


def test_bad_input_names_source_and_column():
    with pytest.raises(ValueError, match="source 'anon'.*'y'"):
        binned_quantiles(
            {"anon": _levels().drop(columns="y")}, "t", "y", edges=[0, 1], unit="id"
        )
    with pytest.raises(ValueError, match="edges"):
        binned_quantiles({"a": _levels()}, "t", "y", edges=[1, 1], unit="id")
    with pytest.raises(ValueError, match=r"unit column\(s\) \['pid'\]"):
        binned_quantiles({"a": _levels()}, "t", "y", edges=[0, 1], unit="pid")


def _pathways():
    # four episodes leave CICU for the ward on days 1, 2, 3, 4; the fourth dies
    # instead; all still followed on day 10 (no censoring before)
    rows = []
    for e, d in enumerate([1.0, 2.0, 3.0, 4.0]):
        nxt = "DEAD" if e == 3 else "WARD"
        rows.append((e, "CICU", 0.0, d, nxt))
        if nxt == "WARD":
            rows.append((e, "WARD", d, 10.0, "CENSORED"))
    return pd.DataFrame(
        rows, columns=["episode_id", "state", "entry", "exit", "next_state"]
    )


def test_occupation_shares_hand_worked():
    occ = occupation(
        {"real": _pathways()}, ["CICU", "WARD", "DEAD"], [0.5, 2.5, 5.0]
    ).pivot(index="time", columns="state", values="share")
    # day 2.5: two in CICU, two on the ward; day 5: three on the ward, one dead
    assert occ.loc[0.5].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert occ.loc[2.5, ["CICU", "WARD", "DEAD"]].tolist() == pytest.approx(
        [0.5, 0.5, 0.0]
    )
    assert occ.loc[5.0, ["CICU", "WARD", "DEAD"]].tolist() == pytest.approx(
        [0.0, 0.75, 0.25]
    )
    with pytest.raises(ValueError, match="states"):
        occupation({"real": _pathways()}, ["CICU", "WARD"], [1.0])


def test_covariate_shares_hand_worked():
    # six patients (two rows each): ages 1, 2, 3, 4, 5 in [0, 10), 15 in [10, 20)
    df = pd.DataFrame(
        {
            "id": np.repeat(np.arange(6), 2),
            "age": np.repeat([1.0, 2, 3, 4, 5, 15], 2),
            "sex": np.repeat(list("FFFFFM"), 2),
        }
    )
    s = covariate_shares({"real": df}, "age", unit="id", edges=[0, 10, 20])
    assert s["count"].tolist() == [5, 1]
    assert s.share.iloc[0] == pytest.approx(5 / 6) and np.isnan(s.share.iloc[1])
    c = covariate_shares(
        {"real": df}, "sex", unit="id", categories=["F", "M"], min_units=1
    )
    assert c.share.tolist() == pytest.approx([5 / 6, 1 / 6])
    assert edges_from_bounds((0, 80, 16))[:3].tolist() == [0.0, 5.0, 10.0]
    e = edges_from_bounds((0, 99, 2, "log1p"))
    assert e.tolist() == pytest.approx([0.0, 9.0, 99.0])  # log1p(9) = log1p(99) / 2


def test_figures_are_png():
    lv = {"real": _levels(), "synthetic": _levels().assign(y=lambda d: d.y * 2)}
    assert band_figure(
        lv,
        "t",
        ["y", "y"],
        edges=[0, 10, 20],
        unit="id",
        xlabel="h",
        ylabels=["a", "b"],
        log_y=[True, False],
    ).startswith(PNG)
    assert occupation_figure(
        {"real": _pathways()}, ["CICU", "WARD", "DEAD"], [0.0, 1.0, 5.0], xlabel="days"
    ).startswith(PNG)
    df = pd.DataFrame(
        {"id": range(6), "age": [1.0, 2, 3, 4, 5, 15], "sex": list("FFFFFM")}
    )
    assert covariate_figure(
        {"real": df},
        ["age", "sex"],
        unit="id",
        bins={"age": [0, 10, 20], "sex": ["F", "M"]},
    ).startswith(PNG)


def test_time_after_dose_hand_worked():
    # doses at 0 and 24 h; levels at 4, 20 (first dose), 28 (second), one BLQ
    ev = pd.DataFrame(
        {
            "hospital": "a",
            "ID": 1,
            "TIME": [0.0, 4.0, 20.0, 24.0, 28.0, 30.0],
            "EVID": [1, 0, 0, 1, 0, 0],
            "BLQ": [0, 0, 0, 0, 0, 1],
            "DV": [np.nan, 50.0, 10.0, np.nan, 60.0, 0.5],
        }
    )
    out = time_after_dose(ev, ("hospital", "ID"))
    assert out.TAD.tolist() == [4.0, 20.0, 4.0]


@pytest.mark.parametrize("name", usecases.BUILTIN)
def test_every_use_case_draws_covariates(name):
    uc = usecases.get(name)
    assert any("Covariates" in t for t in uc.plots) and len(uc.plots) >= 2
