"""Virtual haemophilia cohorts drawn from any population model.

A cohort is simulated as a pharmacometric virtual population: covariates
(:func:`phems_clinical.data.demographics.simulate_demographics`), individual
parameters ``TV(covariates) * exp(eta + kappa)``, dosing histories (a PK-study dose
after washout, or on top of a prophylaxis history without washout), sampling times
from a design, and residual error; samples under the LLOQ are flagged BLQ. The result
is a NONMEM-style event table accepted by :func:`phems_clinical.data.nonmem.read_nonmem`
plus a table of the true individual parameters.

Sampling designs (hours after the start of the PK-study infusion):

* ``rich``: 0.25, 0.5, 1, 3, 6, 9, 24, 28, 32, 48 (a washout PK study as in
  Björkman et al., Blood 2012;119:612-618, 11 samples cut to 10);
* ``sparse`` (ISTH-style, 3 samples): about 4, 24 and 48 h for standard half-life
  FVIII, 4, 48 and 72 h for extended half-life products and FIX (windows of
  +-1 h, +-4 h, +-4 h; Iorio et al., Res Pract Thromb Haemost 2018;2:535-548);
* ``sparse2``: the first and last of the sparse samples.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phems_clinical._typing import Array, Float, Key
from phems_clinical.data.cohort import stack_subjects
from phems_clinical.data.demographics import simulate_demographics
from phems_clinical.pk.model import (
    PopParams,
    individual_parameters,
    initial_params,
    predict,
    residual_variance,
)
from phems_clinical.pk.spec import PopModel
from phems_clinical.rng import numpy_generator

RICH_TIMES = (0.25, 0.5, 1.0, 3.0, 6.0, 9.0, 24.0, 28.0, 32.0, 48.0)
SPARSE_SHL = ((4.0, 1.0), (24.0, 4.0), (48.0, 4.0))  # (nominal h, half-window h)
SPARSE_EHL = ((4.0, 1.0), (48.0, 4.0), (72.0, 4.0))
DESIGNS = ("rich", "sparse", "sparse2")

if TYPE_CHECKING:  # pandas is loaded only when a cohort is simulated
    import pandas as pd


class HospitalSpec(NamedTuple):
    """Case-mix of one simulated hospital.

    ``washout_fraction`` of patients have a washout PK study; the others are sampled
    after a dose given on top of ``prior_doses`` prophylactic doses every
    ``interval_h`` hours (no washout), which the event history then carries.
    """

    name: str
    n_patients: int
    age_range: tuple[float, float] = (1.0, 65.0)
    design: str = "sparse"
    dose_IU_per_kg: float = 50.0
    washout_fraction: float = 1.0
    prior_doses: int = 3
    interval_h: float = 48.0
    infusion_h: float = 10.0 / 60.0
    occasions: int = 1
    lloq_IU_dL: float = 1.0


def _sample_times(rng: np.random.Generator, design: str, extended: bool) -> np.ndarray:
    if design == "rich":
        return np.array(RICH_TIMES)
    windows: tuple[tuple[float, float], ...] = SPARSE_EHL if extended else SPARSE_SHL
    if design == "sparse2":
        windows = (windows[0], windows[-1])
    elif design != "sparse":
        raise ValueError(f"design: {design!r} is not one of {DESIGNS}")
    return np.array([rng.uniform(t - w, t + w) for t, w in windows])


def round_dose(dose: float, vials: list[float]) -> float:
    """``dose`` (IU) rounded up to a whole number of the smallest vial (250 IU
    when none is given), at least one vial."""
    step = min(vials) if vials else 250.0
    return float(max(step, math.ceil(dose / step - 1e-9) * step))


def draw_kappa(
    key: Key, omega_iov: Float[Array, "n_kappa n_kappa"], shape: tuple[int, ...]
) -> Float[Array, "*shape n_kappa"]:
    """Inter-occasion effects ``kappa ~ N(0, omega_iov)``, independent over ``shape``
    (e.g. ``(n_subjects, n_occasions)``); the full (correlated) IOV block."""
    omega_iov = jnp.asarray(omega_iov)
    n_kappa = omega_iov.shape[0]
    if n_kappa == 0:
        return jnp.zeros((*shape, 0))
    chol = jnp.linalg.cholesky(omega_iov)
    return jax.random.normal(key, (*shape, n_kappa)) @ chol.T


def simulate_observations(
    k_kappa: Key, k_eps: Key, model: PopModel, p: PopParams, cohort, eta, n_occ: int
) -> tuple[np.ndarray, np.ndarray]:
    """Observed levels (IU/dL, with the model's residual error) and individual
    parameters of a stacked cohort for given random effects ``eta`` (n, n_eta);
    inter-occasion effects ``kappa ~ N(0, omega_iov)`` (the full IOV block, each
    occasion independently) are drawn from ``k_kappa``, residuals (in the model's
    residual form) from ``k_eps``. Parameters switch at each occasion's first dose
    for all drug in the body (:func:`~phems_clinical.pk.model.predict`). Shared by
    :func:`simulate_cohort` and the PK virtual population
    (:mod:`phems_clinical.privacy.synth.pk_virtual`)."""
    n = eta.shape[0]
    kappa = draw_kappa(k_kappa, p.omega_iov, (n, n_occ))
    f = jax.vmap(lambda s, e, k: predict(model, s, p.theta, e, k, p.baseline))(
        cohort, eta, kappa
    )
    sd = jnp.sqrt(residual_variance(f, p.sigma, model.residual.form))
    y = np.asarray(f + sd * jax.random.normal(k_eps, f.shape))
    indiv = np.asarray(
        jax.vmap(lambda e, k, c: individual_parameters(model, p.theta, e, k, c)[0])(
            eta, kappa, cohort.covariates
        )
    )
    return y, indiv


def simulate_cohort(
    key: Key,
    model: PopModel,
    hospital: HospitalSpec,
    *,
    params: PopParams | None = None,
    id_offset: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Simulate one hospital's cohort from ``model``.

    Parameters
    ----------
    key : jax PRNG key
        Source of all randomness (same key -> same cohort).
    model : PopModel
        Population model (product library entry or fitted model).
    hospital : HospitalSpec
        Size, ages, design and dosing of the hospital's patients.
    params : PopParams, optional
        Population values; default: those of the model specification.
    id_offset : int
        Subject IDs are ``id_offset + 1 ..``.

    Returns
    -------
    events : pandas.DataFrame
        NONMEM-style rows ``ID, SITE, TIME (h), AMT (IU), DUR (h), DV (IU/dL),
        MDV, EVID, BLQ, LLOQ (IU/dL), OCC`` and covariate columns.
    truth : pandas.DataFrame
        One row per subject: ``ID, SITE``, true individual parameters of the first
        occasion (``CL`` dL/h, ``V1`` dL, ...) and etas ``ETA_<param>``.
    """
    if hospital.design not in DESIGNS:
        raise ValueError(f"design: {hospital.design!r} is not one of {DESIGNS}")
    p = initial_params(model) if params is None else params
    k_demo, k_eta, k_kappa, k_eps, k_np = jax.random.split(key, 5)
    n = hospital.n_patients
    demo = simulate_demographics(k_demo, n, age_range=hospital.age_range)
    demo["ASSAY"] = (demo["ASSAY"] == "OSA").astype(int)
    ref = model.reference_covariates
    for c in model.covariate_names:
        if c not in demo:
            demo[c] = ref.get(c, 0.0)
    rng = numpy_generator(k_np)
    extended = model.extended_half_life
    vials = [float(v) for v in model.metadata.get("vial_sizes_IU", [250.0])]

    subjects: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for i in range(n):
        wt = float(demo["WT"].iloc[i])
        dose = round_dose(hospital.dose_IU_per_kg * wt, vials)
        washout = rng.uniform() < hospital.washout_fraction
        dose_t: list[float] = []
        dose_occ: list[int] = []
        obs_t: list[float] = []
        obs_occ: list[int] = []
        t0 = 0.0
        if not washout:
            for k in range(hospital.prior_doses):
                dose_t.append(k * hospital.interval_h)
                dose_occ.append(0)
            t0 = hospital.prior_doses * hospital.interval_h
        for occ in range(hospital.occasions):
            dose_t.append(t0)
            dose_occ.append(occ)
            ts = t0 + _sample_times(rng, hospital.design, extended)
            obs_t.extend(ts)
            obs_occ.extend([occ] * len(ts))
            t0 = float(ts.max()) + 96.0  # washout before the next study occasion
        subjects.append(
            dict(
                dose_time=np.array(dose_t),
                dose_amt=np.full(len(dose_t), dose),
                dose_dur=np.full(len(dose_t), hospital.infusion_h),
                dose_occ=np.array(dose_occ),
                obs_time=np.array(obs_t),
                obs_dv=np.zeros(len(obs_t)),
                obs_blq=np.zeros(len(obs_t), np.bool_),
                obs_lloq=np.full(len(obs_t), hospital.lloq_IU_dL),
                obs_occ=np.array(obs_occ),
                covariates=[float(demo[c].iloc[i]) for c in model.covariate_names],
            )
        )

    cohort = stack_subjects(subjects)
    n_occ = max(1, hospital.occasions)
    eta = (
        jax.random.multivariate_normal(k_eta, jnp.zeros(model.n_eta), p.omega, (n,))
        if model.n_eta
        else jnp.zeros((n, 0))
    )
    y, indiv = simulate_observations(k_kappa, k_eps, model, p, cohort, eta, n_occ)

    cov_cols = [c for c in demo.columns]
    for i, s in enumerate(subjects):
        sid = id_offset + i + 1
        covs = {c: demo[c].iloc[i] for c in cov_cols}
        for t, occ in zip(s["dose_time"], s["dose_occ"], strict=True):
            rows.append(
                dict(
                    ID=sid,
                    SITE=hospital.name,
                    TIME=round(float(t), 4),
                    AMT=float(s["dose_amt"][0]),
                    DUR=hospital.infusion_h,
                    DV=np.nan,
                    MDV=1,
                    EVID=1,
                    BLQ=0,
                    LLOQ=np.nan,
                    OCC=int(occ) + 1,
                    **covs,
                )
            )
        for j, (t, occ) in enumerate(zip(s["obs_time"], s["obs_occ"], strict=True)):
            value = float(y[i, j])
            blq = value < hospital.lloq_IU_dL
            rows.append(
                dict(
                    ID=sid,
                    SITE=hospital.name,
                    TIME=round(float(t), 4),
                    AMT=0.0,
                    DUR=0.0,
                    DV=np.nan if blq else round(value, 4),
                    MDV=0,
                    EVID=0,
                    BLQ=int(blq),
                    LLOQ=hospital.lloq_IU_dL,
                    OCC=int(occ) + 1,
                    **covs,
                )
            )
    import pandas as pd

    events = (
        pd.DataFrame(rows)
        .sort_values(
            ["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable"
        )
        .reset_index(drop=True)
    )
    truth = pd.DataFrame(indiv, columns=list(model.structural))
    truth.insert(0, "SITE", hospital.name)
    truth.insert(0, "ID", np.arange(n) + id_offset + 1)
    for k, name in enumerate(model.iiv_parameters):
        truth[f"ETA_{name}"] = np.asarray(eta)[:, k]
    return events, truth


def simulate_hospitals(
    key: Key,
    model: PopModel,
    hospitals: list[HospitalSpec],
    *,
    params: PopParams | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Simulate several hospitals with different case-mix; IDs are unique overall."""
    import pandas as pd

    events, truths, offset = [], [], 0
    for h, k in zip(hospitals, jax.random.split(key, len(hospitals)), strict=True):
        e, t = simulate_cohort(k, model, h, params=params, id_offset=offset)
        events.append(e)
        truths.append(t)
        offset += h.n_patients
    return (pd.concat(events, ignore_index=True), pd.concat(truths, ignore_index=True))


def default_hospitals(n_total: int = 100) -> list[HospitalSpec]:
    """Three hospitals with different case-mix (ages, designs, washout practice)."""
    a, b = n_total // 3, n_total // 3
    return [
        HospitalSpec(
            "paediatric",
            a,
            age_range=(1.0, 12.0),
            design="sparse",
            washout_fraction=0.3,
        ),
        HospitalSpec(
            "adolescent", b, age_range=(10.0, 18.0), design="rich", washout_fraction=1.0
        ),
        HospitalSpec(
            "adult",
            n_total - a - b,
            age_range=(18.0, 65.0),
            design="sparse",
            washout_fraction=0.5,
        ),
    ]


__all__ = [
    "DESIGNS",
    "HospitalSpec",
    "default_hospitals",
    "draw_kappa",
    "simulate_cohort",
    "simulate_hospitals",
    "round_dose",
]
