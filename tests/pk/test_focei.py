"""FOCEI against NONMEM 7.5.1 on the public phenobarbital data set (pheno_real).

Reference files in ``tests/reference/nonmem_pheno`` are NONMEM's own outputs as shipped
with Pharmpy (pharmpy-core 2.1.1, ``internals/example_models``): ``pheno.ext`` (final
estimates, OFV and standard errors), ``pheno.phi`` (per-subject ETAs and OBJ) and
``pheno.lst``. The data are Grasela & Donn, Dev Pharmacol Ther 1985;8:374-383.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from phems_clinical.pk.focei import fit_focei, focei_objective
from phems_clinical.pk.model import PopParams, initial_params
from phems_clinical.pk.spec import load_model
from phems_clinical.resources import configs_dir

REF = Path(__file__).parents[1] / "reference" / "nonmem_pheno"

# pheno.ext, row -1000000000 (final) and -1000000001 (standard errors,
# $COVARIANCE UNCONDITIONAL = sandwich R^-1 S R^-1).
NONMEM_OFV = 586.27605628520962
NONMEM_THETA = np.array([4.69555e-03, 9.84258e-01, 1.58920e-01])
NONMEM_OMEGA = np.array([2.93508e-02, 2.79060e-02])
NONMEM_SIGMA = 1.32410e-02
# order: THETA1..3, OMEGA11, OMEGA22, SIGMA11
NONMEM_SE = np.array(
    [2.09967e-04, 2.68946e-02, 8.37555e-02, 1.34156e-02, 7.47591e-03, 2.27991e-03]
)
# pheno.lst: ETASHRINKSD(%)
NONMEM_SHRINK_SD = np.array([4.7580e01, 1.3581e01])


@pytest.fixture(scope="module")
def pheno():
    from phems_clinical.data.nonmem import read_nonmem, to_cohort

    model = load_model(configs_dir() / "model" / "pheno.yaml")
    data = read_nonmem(REF / "pheno.dta", dv_unit=None)
    cohort, ids = to_cohort(data, model.covariate_names)
    phi = pd.read_csv(REF / "pheno.phi", sep=r"\s+", skiprows=1)
    assert [int(i) for i in ids] == phi["ID"].tolist()
    return model, cohort, phi


def _nonmem_params(model):
    # theta holds every fixed effect, the fixed WGT exponents (= 1) included
    free = [i for i, t in enumerate(model.thetas) if not t.fixed]
    theta = initial_params(model).theta.at[jnp.array(free)].set(NONMEM_THETA)
    return PopParams(
        theta=theta,
        omega=jnp.diag(NONMEM_OMEGA),
        omega_iov=jnp.zeros((0,)),
        sigma=jnp.array([0.0, np.sqrt(NONMEM_SIGMA)]),
        baseline=jnp.asarray(0.0),
    )


def test_objective_at_nonmem_estimates(pheno):
    """OFV to >= 5 significant digits (here ~1e-8 relative); per-subject OBJ too."""
    model, cohort, phi = pheno
    ofv, per, b = focei_objective(model, cohort, _nonmem_params(model))
    assert float(ofv) == pytest.approx(NONMEM_OFV, rel=1e-6)
    np.testing.assert_allclose(
        np.asarray(per), phi["OBJ"].to_numpy(), rtol=1e-5, atol=1e-5
    )
    # conditional ETAs (NONMEM POSTHOC/FNLETA) within 1e-4
    np.testing.assert_allclose(
        np.asarray(b), phi[["ETA(1)", "ETA(2)"]].to_numpy(), atol=1e-4
    )


def test_fit_reproduces_nonmem(pheno):
    """Estimates within 1% of NONMEM, OFV to 5 significant digits, SEs within 10%."""
    model, cohort, phi = pheno
    fit = fit_focei(model, cohort)
    assert fit.converged, fit.message
    assert fit.ofv == pytest.approx(NONMEM_OFV, rel=5e-6)
    assert fit.ofv <= NONMEM_OFV + 1e-4  # NONMEM stops at 3.8 significant digits
    np.testing.assert_allclose(fit.estimates[:3], NONMEM_THETA, rtol=0.01)
    np.testing.assert_allclose(
        np.diag(np.asarray(fit.params.omega)), NONMEM_OMEGA, rtol=0.01
    )
    assert float(fit.params.sigma[1]) ** 2 == pytest.approx(NONMEM_SIGMA, rel=0.01)
    np.testing.assert_allclose(
        fit.etas, phi[["ETA(1)", "ETA(2)"]].to_numpy(), atol=2e-3
    )
    names = list(fit.natural_names)
    assert names == [
        "THETA(CL)",
        "THETA(V1)",
        "THETA(V_APGR)",
        "OMEGA(CL,CL)",
        "OMEGA(V1,V1)",
        "SIGMA(proportional)",
    ]
    np.testing.assert_allclose(fit.se_sandwich, NONMEM_SE, rtol=0.10)
    assert np.all(fit.se > 0)
    # eta shrinkage, NONMEM ETASHRINKSD, to 1 percentage point
    np.testing.assert_allclose(fit.shrinkage_sd, NONMEM_SHRINK_SD, atol=1.0)


def test_cwres_pred_ipred_match_nonmem_table(pheno):
    """CWRES (Hooker 2007, eigenvalue square root) vs NONMEM's pheno.tab."""
    from phems_clinical.pk.diagnostics import compute_diagnostics

    model, cohort, _ = pheno
    _, _, b = focei_objective(model, cohort, _nonmem_params(model))
    d = compute_diagnostics(model, cohort, _nonmem_params(model), b)
    tab = pd.read_csv(REF / "pheno.tab", sep=r"\s+", skiprows=1)
    obs = tab[tab.DV > 0]
    m = np.asarray(cohort.obs_mask)
    np.testing.assert_allclose(d.cwres[m], obs.CWRES.to_numpy(), atol=2e-4)
    # the table prints 5 significant digits
    np.testing.assert_allclose(d.pred[m], obs.PRED.to_numpy(), rtol=5e-5)
    np.testing.assert_allclose(d.ipred[m], obs.CIPREDI.to_numpy(), rtol=5e-5)


def test_iov_single_occasion_equals_summed_iiv():
    """Exact identity for the IOV path: with one occasion per subject, IIV Omega plus
    IOV variance b on CL is the same marginal model as IIV Omega + b e_CL e_CL'.
    FOCEI's objective is then identical (the mode of eta_CL + kappa is the same and,
    by the matrix determinant lemma, so is log det Omega_full + log det H), and the
    mode of kappa is its Gaussian conditional mean given the summed effects u:
    kappa = b (Omega'^-1 u)_CL."""
    import jax

    from phems_clinical.data.nonmem import read_nonmem, to_cohort
    from phems_clinical.pk.model import initial_params
    from phems_clinical.pk.simulate import HospitalSpec, simulate_cohort
    from phems_clinical.pk.spec import parse_model

    base = {
        "name": "iov_check",
        "structure": {"compartments": 1},
        "parameters": {"CL": {"value": 2.0}, "V1": {"value": 30.0}},
        "covariates": [
            {
                "parameter": "CL",
                "covariate": "WT",
                "effect": "power",
                "reference": 50,
                "coefficient": 0.75,
            }
        ],
        "residual": {"proportional": 0.12, "additive": 0.5},
    }
    a, b = 0.06, 0.04
    with_iov = parse_model(
        {
            **base,
            "iiv": {"parameters": ["CL", "V1"], "variance": [[a, 0.01], [0.01, 0.03]]},
            "iov": {"parameters": ["CL"], "sd": [b**0.5]},
        }
    )
    summed = parse_model(
        {
            **base,
            "iiv": {
                "parameters": ["CL", "V1"],
                "variance": [[a + b, 0.01], [0.01, 0.03]],
            },
        }
    )
    events, _ = simulate_cohort(
        jax.random.key(11),
        with_iov,
        HospitalSpec("H", 20, design="sparse", washout_fraction=0.5),
    )
    cohort, _ = to_cohort(read_nonmem(events, required_covariates=("WT",)), ("WT",))
    ofv_iov, per_iov, b_iov = focei_objective(
        with_iov, cohort, initial_params(with_iov)
    )
    ofv_sum, per_sum, b_sum = focei_objective(summed, cohort, initial_params(summed))
    np.testing.assert_allclose(np.asarray(per_iov), np.asarray(per_sum), rtol=1e-9)
    assert float(ofv_iov) == pytest.approx(float(ofv_sum), rel=1e-10)
    eta_cl, kappa = np.asarray(b_iov[:, 0]), np.asarray(b_iov[:, 2])
    np.testing.assert_allclose(eta_cl + kappa, np.asarray(b_sum[:, 0]), atol=1e-7)
    u = np.asarray(b_sum[:, :2])
    np.testing.assert_allclose(
        kappa, b * np.linalg.solve(summed.omega, u.T)[0], atol=1e-7
    )
