"""Cohort simulator against its declared design and the generating model.

Individual clearances are checked against the published Jivi equation written out
here independently (Solms et al., Clin Pharmacokinet 2020;59:605-616:
CL = 1.09 (LBW/49.1)^0.707 (VWF/110)^-0.604 exp(eta)); etas against Omega;
sampling times against the ISTH-style windows; BLQ flags against the LLOQ.
"""

import jax
import numpy as np
import pytest

from phems_clinical.data.nonmem import read_nonmem
from phems_clinical.pk.library import load_product
from phems_clinical.pk.simulate import (
    SPARSE_EHL,
    SPARSE_SHL,
    HospitalSpec,
    simulate_cohort,
    simulate_hospitals,
)


@pytest.fixture(scope="module")
def jivi_large():
    model = load_product("jivi")
    events, truth = simulate_cohort(
        jax.random.key(5),
        model,
        HospitalSpec("H", 1000, design="sparse", washout_fraction=0.5),
    )
    return model, events, truth


def test_individual_parameters_follow_published_equation(jivi_large):
    _, events, truth = jivi_large
    cov = events.groupby("ID").first()
    cl = (
        1.09
        * (cov.LBW / 49.1) ** 0.707
        * (cov.VWF / 110) ** -0.604
        * np.exp(truth.set_index("ID").ETA_CL)
    )
    np.testing.assert_allclose(truth.set_index("ID").CL, cl, rtol=1e-10)
    v1 = 26.2 * (cov.LBW / 49.1) ** 0.887 * np.exp(truth.set_index("ID").ETA_V1)
    np.testing.assert_allclose(truth.set_index("ID").V1, v1, rtol=1e-10)


def test_etas_have_the_model_covariance(jivi_large):
    model, _, truth = jivi_large
    emp = np.cov(truth[["ETA_CL", "ETA_V1"]].to_numpy().T)
    # SE of a variance estimate from n=1000 is ~4.5%; 15% is > 3 SE
    np.testing.assert_allclose(np.diag(emp), np.diag(model.omega), rtol=0.15)
    corr = emp[0, 1] / np.sqrt(emp[0, 0] * emp[1, 1])
    assert corr == pytest.approx(0.449, abs=0.08)


def test_sampling_windows_dosing_history_and_blq(jivi_large):
    model, events, _ = jivi_large
    windows = SPARSE_EHL  # Jivi is an extended half-life product
    for _, g in events.groupby("ID"):
        doses, obs = g[g.EVID == 1], g[g.EVID == 0]
        study = doses.TIME.max()
        if len(doses) > 1:  # no washout: prophylaxis every 48 h before the study dose
            np.testing.assert_allclose(np.diff(doses.TIME), 48.0)
        tad = np.sort(obs.TIME.to_numpy() - study)
        for t, (nominal, half) in zip(tad, windows, strict=True):
            assert nominal - half - 1e-3 <= t <= nominal + half + 1e-3
    obs = events[events.EVID == 0]
    assert (obs.loc[obs.BLQ == 1, "DV"].isna()).all()
    assert (obs.loc[obs.BLQ == 0, "DV"] >= obs.loc[obs.BLQ == 0, "LLOQ"]).all()
    assert 0.2 < (events.groupby("ID").EVID.sum() > 1).mean() < 0.8  # ~50% no washout
    data = read_nonmem(events, required_covariates=model.covariate_names)
    assert data.exclusions == []


def test_standard_half_life_windows_and_hospital_case_mix():
    model = load_product("advate")
    hospitals = [
        HospitalSpec("kids", 15, age_range=(1, 12), design="sparse2"),
        HospitalSpec("adults", 15, age_range=(18, 65), design="rich"),
    ]
    events, truth = simulate_hospitals(jax.random.key(3), model, hospitals)
    assert truth.ID.is_unique and len(truth) == 30
    first = events.groupby("ID").first()
    assert first.loc[first.SITE == "kids", "AGE"].between(1, 12).all()
    assert first.loc[first.SITE == "adults", "AGE"].between(18, 65).all()
    kids = events[(events.SITE == "kids") & (events.EVID == 0)]
    assert kids.groupby("ID").size().eq(2).all()
    tad = kids.TIME - kids.ID.map(events[events.EVID == 1].groupby("ID").TIME.max())
    lo = min(t - w for t, w in (SPARSE_SHL[0], SPARSE_SHL[-1]))
    hi = max(t + w for t, w in (SPARSE_SHL[0], SPARSE_SHL[-1]))
    assert tad.between(lo, hi).all()


def test_same_key_same_cohort():
    model = load_product("kovaltry")
    spec = HospitalSpec("H", 8)
    a = simulate_cohort(jax.random.key(9), model, spec)[0]
    b = simulate_cohort(jax.random.key(9), model, spec)[0]
    c = simulate_cohort(jax.random.key(10), model, spec)[0]
    assert a.equals(b) and not a.equals(c)
