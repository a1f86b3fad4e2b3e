"""PK virtual patients."""

import jax
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from phems_clinical.data.nonmem import read_nonmem
from phems_clinical.pk.library import load_product
from phems_clinical.pk.model import initial_params
from phems_clinical.pk.simulate import HospitalSpec, simulate_cohort
from phems_clinical.privacy.synth.pk_virtual import (
    VirtualPopulationError,
    fit_virtual_population,
    sample_virtual_population,
)

N_VIRTUAL = 400


def _ks_threshold(n: int, m: int, alpha: float = 1e-3) -> float:
    """Two-sample KS critical value c(alpha) * sqrt((n + m) / (n m))."""
    return np.sqrt(-np.log(alpha / 2) / 2) * np.sqrt((n + m) / (n * m))


@pytest.fixture(scope="module")
def model():
    return load_product("advate")


@pytest.fixture(scope="module")
def source(model):
    # one hospital (one compilation); 30% sampled on top of prophylaxis, so the
    # designs differ (3 prior doses, times shifted)
    hospital = HospitalSpec("h", 80, design="rich", washout_fraction=0.7)
    events, _ = simulate_cohort(jax.random.key(11), model, hospital)
    return events


@pytest.fixture(scope="module")
def vpm(source, model):
    return fit_virtual_population(source, model, initial_params(model))


@pytest.fixture(scope="module")
def virtual(vpm):
    return sample_virtual_population(jax.random.key(5), vpm, N_VIRTUAL)


def test_same_key_same_output(vpm, virtual):
    ev, tr = sample_virtual_population(jax.random.key(5), vpm, N_VIRTUAL)
    pd.testing.assert_frame_equal(ev, virtual[0])
    pd.testing.assert_frame_equal(tr, virtual[1])
    ev2, _ = sample_virtual_population(jax.random.key(6), vpm, N_VIRTUAL)
    assert not ev2["DV"].equals(ev["DV"])


def test_read_nonmem_accepts_output(virtual, model):
    ev, truth = virtual
    data = read_nonmem(ev, required_covariates=model.covariate_names)
    assert data.events["ID"].nunique() == N_VIRTUAL
    assert not data.exclusions or all("BLQ" not in str(x) for x in data.exclusions)
    assert list(truth["ID"]) == list(pd.unique(ev["ID"]))
    assert {"CL", "V1", "ETA_CL", "ETA_V1"} <= set(truth.columns)


def _rows(events: pd.DataFrame, covs: list[str]) -> set:
    """(covariates + design) tuple per subject."""
    out = set()
    for _, g in events.groupby("ID", sort=False):
        d, o = g[g["EVID"] == 1], g[g["EVID"] == 0]
        t0 = d["TIME"].min()
        out.add(
            (
                tuple(np.round(g[covs].iloc[0].to_numpy(float), 6)),
                tuple(np.round(d["TIME"] - t0, 4)),
                tuple(d["AMT"]),
                tuple(np.round(o["TIME"] - t0, 4)),
            )
        )
    return out


def test_no_original_id_or_row(source, virtual, model):
    ev, truth = virtual
    src_ids = set(source["ID"].astype(str))
    assert not src_ids & set(ev["ID"].astype(str))
    assert not src_ids & set(truth["ID"].astype(str))
    covs = ["WT", "AGE", "HT", "SEX"]
    assert not _rows(source, covs) & _rows(ev, covs)
    # the covariate rows themselves are new too
    src_cov = {tuple(r) for r in source.groupby("ID")[covs].first().to_numpy()}
    syn_cov = {tuple(r) for r in ev.groupby("ID")[covs].first().to_numpy()}
    assert not src_cov & syn_cov


def test_covariate_marginals(source, virtual):
    ev, _ = virtual
    src = source.groupby("ID").first()
    syn = ev.groupby("ID").first()
    # 80 source subjects vs 400: the KS critical value at alpha = 1e-3 (~0.24) is
    # what a correct sampler exceeds once in 1000 draws per column.
    crit = _ks_threshold(len(src), len(syn))
    for c in ("WT", "AGE", "HT", "VWF"):
        ks = stats.ks_2samp(src[c], syn[c]).statistic
        assert ks < crit, (c, ks, crit)
    assert abs(src["SEX"].mean() - syn["SEX"].mean()) < 0.15
    assert set(syn["SITE"]) == set(src["SITE"])


def test_concentration_median_matches_source(source, virtual):
    ev, _ = virtual
    # rich-design times are fixed, so the washout subjects of the source and of the
    # virtual cohort share them; ~55 source subjects: the SE of a log-median is
    # ~1.25 * 0.35 / sqrt(55) ~ 0.06, so a 25% tolerance on the ratio is ~4 SE.
    for t in (1.0, 6.0, 24.0):
        a = source[(source["EVID"] == 0) & (source["TIME"] == t)]["DV"].dropna()
        b = ev[(ev["EVID"] == 0) & (ev["TIME"] == t)]["DV"].dropna()
        assert len(a) >= 40 and len(b) >= 200
        ratio = float(np.median(b) / np.median(a))
        assert 0.75 < ratio < 1.33, (t, ratio)


def test_doses_are_weight_based(virtual):
    ev, _ = virtual
    d = ev[ev["EVID"] == 1]
    per_kg = d["AMT"] / d["WT"]
    assert per_kg.min() >= 49.0 and per_kg.median() < 60.0
    assert np.all(np.mod(d["AMT"], 250.0) == 0)


def test_individual_etas_in_copula(source, model):
    ids = source["ID"].unique()
    rng = np.random.default_rng(0)
    ind = pd.DataFrame(
        {
            "ID": ids,
            "ETA_CL": rng.normal(0, 0.3, len(ids)),
            "ETA_V1": rng.normal(0, 0.2, len(ids)),
        }
    )
    vpm = fit_virtual_population(source, model, initial_params(model), individual=ind)
    _, truth = sample_virtual_population(jax.random.key(1), vpm, N_VIRTUAL)
    assert not set(np.round(truth["ETA_CL"], 10)) & set(np.round(ind["ETA_CL"], 10))
    with pytest.raises(VirtualPopulationError, match="ETA_V1"):
        fit_virtual_population(
            source, model, initial_params(model), individual=ind.drop(columns="ETA_V1")
        )


def test_bad_input(source, model):
    p = initial_params(model)
    small = source[source["ID"] <= 9]
    with pytest.raises(VirtualPopulationError, match="at least 10 subjects"):
        fit_virtual_population(small, model, p)
    with pytest.raises(VirtualPopulationError, match="AGE"):
        fit_virtual_population(source.drop(columns="AGE"), model, p)
    with pytest.raises(VirtualPopulationError, match="WT, AGE"):
        fit_virtual_population(source.drop(columns=["AGE", "WT"]), model, p)
    vpm = fit_virtual_population(source, model, p)
    with pytest.raises(VirtualPopulationError, match="positive integer"):
        sample_virtual_population(jax.random.key(0), vpm, 0)
