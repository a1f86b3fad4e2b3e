"""Noise addition, coarsening and level microaggregation of longitudinal data."""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical.privacy.perturb import (
    LongitudinalRoles,
    PerturbError,
    ValueColumn,
    additive_noise,
    coarsen,
    il1s,
    multiplicative_noise,
    perturb_longitudinal,
)

# Statistical checks use fixed keys and n = 200 000 draws; each tolerance is
# >= 6 standard errors of its statistic, so a correct implementation fails with
# probability < 1e-8 per check (TEST_FAILURE_RATE in numpyro's sense).
N = 200_000


def test_multiplicative_noise_mean_and_cv():
    f = multiplicative_noise(jax.random.key(1), np.ones(N), 0.2)
    # mean 1, SE 0.2 / sqrt(N) = 4.5e-4
    assert abs(f.mean() - 1.0) < 3e-3
    # CV 0.2: SE of the SD ~ 0.2 * sqrt(0.5 + ...) / sqrt(N) ~ 3.5e-4
    assert abs(f.std() / f.mean() - 0.2) < 3e-3
    # log-normal: log factor ~ N(-s^2/2, s^2), s^2 = log(1.04)
    s2 = np.log(1.04)
    np.testing.assert_allclose(np.log(f).mean(), -s2 / 2, atol=3e-3)
    np.testing.assert_allclose(np.log(f).var(), s2, rtol=0.02)
    x = np.array([10.0, np.nan, 5.0])
    y = multiplicative_noise(jax.random.key(2), x, 0.1)
    assert np.isnan(y[1]) and (y[[0, 2]] > 0).all()
    np.testing.assert_array_equal(multiplicative_noise(jax.random.key(2), x, 0.0), x)


def test_additive_noise_matches_sdcmicro_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 15, N)
    y = additive_noise(jax.random.key(3), x, 0.5)
    d = y - x
    assert abs(d.mean()) < 6 * 7.5 / np.sqrt(N)
    np.testing.assert_allclose(d.std(), 0.5 * x.std(ddof=1), rtol=0.01)
    z = additive_noise(jax.random.key(3), x, 0.5, sd=2.0)
    np.testing.assert_allclose((z - x).std(), 1.0, rtol=0.01)
    # same key, same noise (a reproducible release)
    np.testing.assert_array_equal(additive_noise(jax.random.key(3), x, 0.5), y)


def test_coarsen_hand_cases():
    x = np.array([0.0, 0.4, 0.5, 2.99, 3.0, 3.4342, 23.1125, 47.6513, np.nan])
    np.testing.assert_array_equal(coarsen(x, 1.0), [0, 0, 1, 3, 3, 3, 23, 48, np.nan])
    np.testing.assert_array_equal(
        coarsen(x, 6.0, mode="up"), [0, 6, 6, 6, 6, 6, 24, 48, np.nan]
    )
    np.testing.assert_array_equal(
        coarsen(x, 6.0, mode="down"), [0, 0, 0, 0, 0, 0, 18, 42, np.nan]
    )
    # a value on the grid up to floating rounding stays on it
    assert coarsen(np.array([0.1 * 3 / 0.1 * 2]), 6.0, mode="up")[0] == 6.0
    np.testing.assert_array_equal(coarsen(np.array([97.3, 97.35]), 0.5), [97.5, 97.5])
    with pytest.raises(PerturbError, match="grid"):
        coarsen(x, 0.0)
    with pytest.raises(PerturbError, match="mode"):
        coarsen(x, 1.0, mode="sideways")


def test_il1s_hand_case():
    a = pd.DataFrame({"v": [1.0, 2.0, 3.0]})  # SD 1
    b = pd.DataFrame({"v": [1.0, 2.0, 3.0 + np.sqrt(2) * 3]})
    assert il1s(a, b, ["v"])["v"] == pytest.approx(1.0)  # mean |d| 3 sqrt2/3


def _table():
    # three courses: levels 10, 20, 40 (geometric means), a covariate and times
    rows = []
    for pid, lev, cov in ((1, 10.0, 50.0), (2, 20.0, 60.0), (3, 40.0, 70.0)):
        for t, r in ((0.0, np.nan), (3.4, 2.0), (23.1, 1.0), (47.6, 0.5)):
            rows.append(
                {
                    "ID": pid,
                    "TIME": t,
                    "DV": np.nan if np.isnan(r) else lev * r,
                    "HR": 100.0 + pid + t / 10,
                    "VWF": cov,
                }
            )
    return pd.DataFrame(rows)


ROLES = LongitudinalRoles(
    course="ID",
    values={
        "DV": ValueColumn("multiplicative", lower=0.0),
        "HR": ValueColumn("additive", lower=0.0, resolution=1.0),
        "VWF": ValueColumn("multiplicative", per="course"),
    },
    times=("TIME",),
)


def test_time_coarsening_keeps_order_on_the_grid():
    out = perturb_longitudinal(jax.random.key(0), _table(), ROLES, time_grid=6.0)
    assert out.data["TIME"].tolist()[:4] == [0.0, 6.0, 24.0, 48.0]
    pd.testing.assert_frame_equal(
        out.data.drop(columns="TIME"), _table().drop(columns="TIME")
    )
    assert out.report["il1s"]["TIME"] > 0 and out.report["il1s"]["DV"] == 0


def test_level_microaggregation_hand_case():
    # k = 3: one group of all courses; DV levels (mean log) log 10 + c, log 20 + c,
    # log 40 + c with c = mean log(2, 1, 0.5) = 0; the group level is the
    # geometric mean 20, so course 1's series is scaled by 2, course 3's by 1/2.
    # HR levels 100 + id + mean(t)/10 = 102.8525, 103.8525, 104.8525 (mean t =
    # 74.1 / 4): group mean 103.8525, every series shifted, its shape kept.
    t = _table()
    out = perturb_longitudinal(jax.random.key(0), t, ROLES, micro_k=3).data
    np.testing.assert_allclose(
        out["DV"].to_numpy(), (t["DV"] * np.repeat([2.0, 1.0, 0.5], 4)).to_numpy()
    )
    np.testing.assert_allclose(out.groupby("ID")["HR"].mean(), [103.8525] * 3)
    np.testing.assert_allclose(out["HR"].diff().iloc[1:4], t["HR"].diff().iloc[1:4])
    np.testing.assert_allclose(
        out.groupby("ID")["VWF"].first(), [60.0] * 3, rtol=0.02
    )  # geometric mean of 50, 60, 70
    with pytest.raises(PerturbError, match="micro_k=4 is impossible.*3 courses"):
        perturb_longitudinal(jax.random.key(0), t, ROLES, micro_k=4)


def test_noise_per_row_and_per_course():
    t = _table()
    out = perturb_longitudinal(jax.random.key(5), t, ROLES, noise=0.3).data
    assert out["DV"].isna().tolist() == t["DV"].isna().tolist()
    assert (out["DV"].dropna() != t["DV"].dropna()).all()
    # per course: one factor for all rows of a course
    assert (out.groupby("ID")["VWF"].nunique() == 1).all()
    assert (out.groupby("ID")["VWF"].first() != t.groupby("ID")["VWF"].first()).all()
    # HR rounded to its resolution and clipped to its range
    assert (out["HR"] == out["HR"].round()).all() and (out["HR"] >= 0).all()
    again = perturb_longitudinal(jax.random.key(5), t, ROLES, noise=0.3).data
    pd.testing.assert_frame_equal(out, again)


def test_bad_options_are_named():
    t = _table()
    with pytest.raises(PerturbError, match="noise"):
        perturb_longitudinal(jax.random.key(0), t, ROLES, noise=-1.0)
    with pytest.raises(PerturbError, match="micro_k"):
        perturb_longitudinal(jax.random.key(0), t, ROLES, micro_k=0)
    with pytest.raises(PerturbError, match="course column 'stay'"):
        perturb_longitudinal(
            jax.random.key(0), t, LongitudinalRoles(course="stay"), noise=0.1
        )
    with pytest.raises(PerturbError, match="no value columns"):
        perturb_longitudinal(
            jax.random.key(0),
            t,
            LongitudinalRoles(course="ID", times=("TIME",)),
            micro_k=2,
        )
