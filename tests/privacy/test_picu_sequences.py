"""Synthetic hourly PICU sequences: reproducibility, constraints, fidelity, dynamics.

Source: 150 simulated stays (phems_clinical.data.picu.simulate_picu); synthetic: 300
stays. Statistical bounds are for these fixed keys; they were set at ~2-3 standard
errors of the quantity at these sizes (stated next to each bound), so a regression of
the generator (e.g. losing the dynamics or the event coupling) fails them.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical.data.picu import HOURLY_COLUMNS, hourly_table, simulate_picu
from phems_clinical.models import scores
from phems_clinical.privacy.fidelity import column_fidelity
from phems_clinical.privacy.synth.picu_sequences import (
    VALUE_COLUMNS,
    PicuSequenceError,
    fit_picu_sequences,
    sample_picu_sequences,
)

_SCHEMA = (
    Path(__file__).resolve().parents[2] / "data_schemas" / "sepsis_hourly.schema.json"
)
N_SOURCE, N_SYN = 150, 300


@pytest.fixture(scope="module")
def real():
    sim = simulate_picu(jax.random.key(11), n_stays=N_SOURCE, site="tertiary")
    return hourly_table(sim.tables, site="tertiary")


@pytest.fixture(scope="module")
def model(real):
    return fit_picu_sequences(real)


@pytest.fixture(scope="module")
def syn(model):
    return sample_picu_sequences(jax.random.key(5), model, N_SYN)


def _within_acf(df: pd.DataFrame, col: str) -> float:
    """Lag-1 autocorrelation of ``col`` after removing each stay's mean (1 h pairs)."""
    df = df.sort_values(["stay_id", "hour"])
    x = df[col].to_numpy(float) - df.groupby("stay_id")[col].transform("mean").to_numpy(
        float
    )
    sid, hour = df["stay_id"].to_numpy(), df["hour"].to_numpy()
    ok = (
        (sid[1:] == sid[:-1])
        & (hour[1:] == hour[:-1] + 1)
        & ~np.isnan(x[1:])
        & ~np.isnan(x[:-1])
    )
    a, b = x[1:][ok], x[:-1][ok]
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _stay_level(df: pd.DataFrame) -> pd.DataFrame:
    return df.groupby("stay_id").agg(
        first=("hour", "min"),
        last=("hour", "max"),
        n=("hour", "size"),
        nuniq=("hour", "nunique"),
        died=("died", "max"),
        died_min=("died", "min"),
        persons=("person_id", "nunique"),
    )


# ------------------------------------------------------------------ reproducibility
def test_same_key_same_table_and_other_key_differs(model):
    a = sample_picu_sequences(jax.random.key(3), model, 20)
    b = sample_picu_sequences(jax.random.key(3), model, 20)
    c = sample_picu_sequences(jax.random.key(4), model, 20)
    pd.testing.assert_frame_equal(a, b)
    assert not a["hr"].equals(c["hr"])


def test_fit_is_deterministic(real, model):
    again = fit_picu_sequences(real)
    np.testing.assert_array_equal(again.phi_own, model.phi_own)
    np.testing.assert_array_equal(again.loadings, model.loadings)


# ------------------------------------------------------------------ constraints
def test_columns_dtypes_and_ids(real, syn):
    assert tuple(syn.columns) == HOURLY_COLUMNS
    pd.testing.assert_series_equal(syn.dtypes, real.dtypes)
    assert set(syn["site"]) == {"tertiary"}
    assert set(syn["sex"].dropna()) <= {"F", "M"}
    real_ids = set(real["person_id"]) | set(real["stay_id"])
    assert not (set(syn["person_id"]) | set(syn["stay_id"])) & real_ids
    assert syn["stay_id"].nunique() == N_SYN


def test_hours_contiguous_one_person_per_stay_and_death(syn):
    st = _stay_level(syn)
    assert (st["first"] == 0).all()
    assert (st["last"] == st["n"] - 1).all() and (st["nuniq"] == st["n"]).all()
    assert (st["persons"] == 1).all()
    assert syn.groupby("person_id")["stay_id"].nunique().max() == 1
    # died is a per-stay flag as in hourly_table; the stay ends at the death hour,
    # so no row of a died stay lies after its last (death) hour
    assert (st["died"] == st["died_min"]).all()
    assert set(syn["died"]) <= {0, 1}
    assert syn["stay_id"].is_monotonic_increasing
    assert (syn.groupby("stay_id")["hour"].diff().dropna() == 1).all()


def test_death_coding_matches_the_source(real, syn):
    # the source codes died identically on every row of a stay (hourly_table)
    rs = _stay_level(real)
    assert (rs["died"] == rs["died_min"]).all()
    p_real = rs["died"].mean()
    p_syn = _stay_level(syn)["died"].mean()
    se = np.sqrt(max(p_real, 0.01) * (1 - p_real) / N_SYN)
    assert abs(p_syn - p_real) <= 3 * se + 1 / N_SOURCE


def test_values_inside_schema_and_source_bounds(real, syn):
    props = json.loads(_SCHEMA.read_text())["properties"]
    for c in VALUE_COLUMNS:
        x = syn[c].dropna()
        lo, hi = props[c].get("minimum", -np.inf), props[c].get("maximum", np.inf)
        assert ((x >= lo) & (x <= hi)).all(), c
        assert x.min() >= real[c].min() and x.max() <= real[c].max(), c
    assert (syn["spo2"].dropna() <= 100).all()
    assert syn["fio2"].dropna().between(0.21, 1.0).all()
    assert (syn["hr"].dropna() > 0).all()
    assert set(syn["fixed_pupils"].dropna()) <= {0.0, 1.0}
    assert (syn["gcs"].dropna() == syn["gcs"].dropna().round()).all()
    for c in ("imv", "other_respiratory_support", "antimicrobial", "culture"):
        assert set(syn[c]) <= {0, 1}, c
    assert not ((syn["imv"] == 1) & (syn["other_respiratory_support"] == 1)).any()
    assert syn["vasoactives"].between(0, 6).all()
    assert syn.groupby("stay_id")["culture"].sum().max() <= 1


def test_age_advances_with_the_hour_as_in_the_source(real, syn):
    for df in (real, syn):
        a0 = df.groupby("stay_id")["age_months"].transform("first")
        np.testing.assert_allclose(df["age_months"] - a0, df["hour"] / 730.5, atol=1e-9)
    assert (syn["age_months"] >= 0).all()


# ------------------------------------------------------------------ fidelity
def test_marginals_and_missingness(real, syn):
    drop = ["person_id", "stay_id"]
    cf = column_fidelity(real.drop(columns=drop), syn.drop(columns=drop))
    cf = cf.set_index("column")
    # hourly values: rank-mapped onto the source quantiles -> KS only from rounding
    assert (cf.loc[list(VALUE_COLUMNS), "statistic"] <= 0.02).all()
    # stay-level copula draws (300 stays vs 150): KS/TV ~ 2-3 SE
    assert cf.loc["age_months", "statistic"] <= 0.15
    assert cf.loc["hour", "statistic"] <= 0.12
    for c in (
        "imv",
        "other_respiratory_support",
        "vasoactives",
        "antimicrobial",
        "culture",
    ):
        assert cf.loc[c, "statistic"] <= 0.08, c
    # stay-level categories: TV over stays (row-level TV is weighted by LOS)
    first = [d.groupby("stay_id")[["sex", "died"]].first() for d in (real, syn)]
    stay = column_fidelity(*first).set_index("column")["statistic"]
    assert (stay <= 0.12).all(), stay  # SE of a share at 150 vs 300 stays ~0.05
    # missingness: per-stay rates by support state; FiO2 depends on support share
    miss = cf.loc[list(VALUE_COLUMNS), "missing_diff"]
    assert (miss.drop("fio2") <= 0.04).all(), miss.sort_values().tail()
    assert miss["fio2"] <= 0.08


def test_hr_autocorrelation_close_and_shuffled_copy_fails(real, syn):
    r_real, r_syn = _within_acf(real, "hr"), _within_acf(syn, "hr")
    assert r_real > 0.7  # simulator: severity + AR(1) noise with phi 0.8
    assert abs(r_syn - r_real) <= 0.08
    # mutation: shuffle the hours within each stay -> no serial dependence
    rng = np.random.default_rng(0)
    shuf = real.copy()
    shuf["hr"] = shuf.groupby("stay_id")["hr"].transform(
        lambda s: s.sample(frac=1.0, random_state=rng).to_numpy()
    )
    assert abs(_within_acf(shuf, "hr") - r_real) > 0.08


def test_organ_support_co_occurs(real, syn):
    def corr(df):
        return np.corrcoef(df["imv"], df["vasoactives"] > 0)[0, 1]

    assert corr(real) > 0.3
    # 0.22-0.56 over sampling keys 5-8 (real 0.56): the co-occurrence is kept in
    # part (stay-level presence via the copula, hour-level via the latent link)
    assert corr(syn) > 0.35 * corr(real)
    # mutation: vasoactive hours moved to random hours of the same stay
    rng = np.random.default_rng(1)
    mut = syn.copy()
    mut["vasoactives"] = mut.groupby("stay_id")["vasoactives"].transform(
        lambda s: s.sample(frac=1.0, random_state=rng).to_numpy()
    )
    assert corr(mut) < corr(syn) - 0.05


def test_phoenix_sepsis_prevalence_close(real, syn):
    p_real = scores.sepsis_onset(real).notna().mean()
    p_syn = scores.sepsis_onset(syn).notna().mean()
    # SE of the difference at 150 vs 300 stays and p ~ 0.15: ~0.035; bound ~ 2.5 SE
    assert abs(p_syn - p_real) <= 0.09, (p_real, p_syn)
    # onsets happen inside the stays' culture/antimicrobial work-ups
    assert p_syn > 0.02


# ------------------------------------------------------------------ bad input
def test_refuses_three_stays(real):
    three = real[real["stay_id"].isin(real["stay_id"].unique()[:3])]
    with pytest.raises(PicuSequenceError, match=r"3 stays.*min_stays=10"):
        fit_picu_sequences(three)


def test_missing_column_is_named(real):
    with pytest.raises(PicuSequenceError, match="'culture'"):
        fit_picu_sequences(real.drop(columns="culture"))


def test_gap_in_hours_is_refused(real):
    with pytest.raises(PicuSequenceError, match="'hour'"):
        fit_picu_sequences(real.drop(index=real.index[5]))


def test_bad_options(model, real):
    with pytest.raises(PicuSequenceError, match="n_stays"):
        sample_picu_sequences(jax.random.key(0), model, 0)
    with pytest.raises(PicuSequenceError, match="n_factors"):
        fit_picu_sequences(real, n_factors=0)
    with pytest.raises(PicuSequenceError, match="DataFrame"):
        fit_picu_sequences(real.to_numpy())


def test_site_override(model):
    out = sample_picu_sequences(jax.random.key(0), model, 3, site="district")
    assert set(out["site"]) == {"district"}


def test_sepsis_pipeline_runs_unchanged(syn):
    from phems_clinical.models import sepsis_features

    onset = scores.sepsis_onset(syn)
    site = sepsis_features.build_site(syn, onset, max_hours=48)
    assert site is not None
    assert np.isfinite(scores.phoenix(syn)["total"]).all()
