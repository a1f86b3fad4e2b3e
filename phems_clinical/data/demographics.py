"""Virtual patient covariates for paediatric-to-adult haemophilia cohorts.

Haemophilia A and B are X-linked, so cohorts are male by default; girls and women
(symptomatic carriers) can be added with ``female_fraction``. Every quantity uses
the units of ``data_schemas/pk_dataset.schema.json``: AGE y, WT and LBW/FFM kg, HT cm,
BMI kg/m2, VWF IU/dL, HCT %; SEX 0 male / 1 female; BGO 1 = blood group O.

The body-size formulas (:func:`lean_body_weight`, :func:`fat_free_mass`) are pure
array functions that accept numpy or JAX arrays (so they can sit inside ``jax.jit``);
:func:`simulate_demographics` is the pandas edge and takes an explicit JAX key.

References
----------
.. [CDC] Kuczmarski RJ, Ogden CL, Guo SS, et al. 2000 CDC Growth Charts for the United
   States: methods and development. Vital Health Stat 11. 2002;(246):1-190.
.. [WHO] WHO Multicentre Growth Reference Study Group. WHO Child Growth Standards based
   on length/height, weight and age. Acta Paediatr Suppl. 2006;450:76-85.
.. [NCD] NCD Risk Factor Collaboration. A century of trends in adult human height.
   eLife. 2016;5:e13410 (young European men about 178 cm, women about 164 cm).
.. [James] James WPT. Research on obesity: a report of the DHSS/MRC group. London:
   HMSO; 1976.
.. [Jan] Janmahasatian S, Duffull SB, Ash S, et al. Quantification of lean bodyweight.
   Clin Pharmacokinet. 2005;44(10):1051-1065.
.. [AlS] Al-Sallami HS, Goulding A, Grant A, et al. Prediction of fat-free mass in
   children. Clin Pharmacokinet. 2015;54(11):1169-1178. doi:10.1007/s40262-015-0277-z
.. [Gill] Gill JC, Endres-Brooks J, Bauer PJ, et al. The effect of ABO blood group on
   the diagnosis of von Willebrand disease. Blood. 1987;69(6):1691-1695.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from phems_clinical._typing import Key
from phems_clinical.rng import numpy_generator

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "GROWTH_REFERENCE",
    "fat_free_mass",
    "growth_medians",
    "lean_body_weight",
    "simulate_demographics",
]

# --------------------------------------------------------------- growth reference
# Median height (cm) and weight (kg) by age. 0-1 y: WHO 2006 standards [WHO]; 2-20 y:
# CDC 2000 charts [CDC] (values read from the published percentile tables and rounded;
# "roughly correct" is the aim, within about 2%); adults: height from [NCD] for
# European adults, weight from a BMI of about 24-26 kg/m2 (median adult BMI ~25).
# Columns: age (y), median height (cm), median weight (kg).
_BOYS = np.array(
    [
        [0.0, 49.9, 3.3],
        [0.5, 67.6, 7.9],
        [1.0, 75.7, 9.6],
        [2.0, 86.8, 12.5],
        [3.0, 95.5, 14.3],
        [4.0, 102.5, 16.3],
        [5.0, 109.2, 18.4],
        [6.0, 115.6, 20.7],
        [7.0, 121.9, 22.9],
        [8.0, 128.0, 25.6],
        [9.0, 133.6, 28.6],
        [10.0, 138.8, 31.9],
        [11.0, 143.6, 35.6],
        [12.0, 149.1, 40.0],
        [13.0, 156.0, 45.3],
        [14.0, 163.0, 50.8],
        [15.0, 169.0, 56.0],
        [16.0, 173.2, 60.8],
        [17.0, 175.3, 64.5],
        [18.0, 176.1, 67.2],
        [19.0, 176.6, 69.1],
        [20.0, 176.8, 70.6],
        [25.0, 178.0, 75.0],
        [30.0, 178.0, 78.0],
        [45.0, 178.0, 81.0],
        [65.0, 178.0, 81.0],
    ]
)
_GIRLS = np.array(
    [
        [0.0, 49.1, 3.2],
        [0.5, 65.7, 7.3],
        [1.0, 74.0, 8.9],
        [2.0, 85.5, 12.0],
        [3.0, 94.5, 14.0],
        [4.0, 101.6, 16.0],
        [5.0, 108.4, 18.0],
        [6.0, 115.0, 20.3],
        [7.0, 121.0, 22.6],
        [8.0, 127.0, 25.6],
        [9.0, 132.8, 28.7],
        [10.0, 138.6, 32.3],
        [11.0, 144.8, 36.9],
        [12.0, 151.0, 41.5],
        [13.0, 156.4, 45.8],
        [14.0, 159.6, 49.4],
        [15.0, 161.7, 52.1],
        [16.0, 162.5, 53.5],
        [17.0, 162.9, 54.6],
        [18.0, 163.1, 56.0],
        [19.0, 163.2, 57.0],
        [20.0, 163.3, 57.7],
        [25.0, 164.0, 61.0],
        [30.0, 164.0, 63.0],
        [45.0, 164.0, 66.0],
        [65.0, 164.0, 67.0],
    ]
)

#: Median growth curves, ``{"male" | "female": (n, 3) array of age y, HT cm, WT kg}``.
GROWTH_REFERENCE = {"male": _BOYS, "female": _GIRLS}

# Spread around the medians. Height: coefficient of variation about 4% at all ages
# (CDC SDs: ~3.5 cm at 2 y, ~6 cm at 10 y, ~7.5 cm at 15 y; adults SD ~7 cm for men
# [NCD]), a little wider in puberty, when timing varies. Weight: log-normal, with a
# log-SD that widens from ~0.11 in toddlers to ~0.19 around puberty (the CDC weight
# percentiles are right-skewed), ~0.17 in adults.
_SPREAD = np.array(
    [  # age, CV of height, log-SD of weight
        [0.0, 0.040, 0.11],
        [2.0, 0.040, 0.11],
        [5.0, 0.042, 0.13],
        [8.0, 0.043, 0.16],
        [10.0, 0.044, 0.19],
        [13.0, 0.047, 0.20],
        [15.0, 0.045, 0.18],
        [18.0, 0.040, 0.17],
        [65.0, 0.040, 0.17],
    ]
)
_RHO_HT_WT = 0.5  # correlation of the height and weight z-scores (heavier if taller)
_Z_MAX = 3.0  # z-scores beyond +-3 are redrawn (keeps values physiological)

# Blood group O about 45% in Europeans; VWF:Ag log-normal by ABO [Gill] (means 74.8
# U/dL for O, 105.9 A, 116.9 B, 123.3 AB; non-O pooled here as ~105), rising with age
# (about +0.6%/y, i.e. +20% from 30 to 65 y), log-SD 0.3 (CV ~30%).
_P_GROUP_O = 0.45
_VWF_MEDIAN = {"O": 75.0, "nonO": 105.0}  # IU/dL at _VWF_REF_AGE
_VWF_REF_AGE, _VWF_AGE_SLOPE, _VWF_LOG_SD = 30.0, 0.006, 0.30
_VWF_RANGE = (10.0, 400.0)

# Haematocrit (%), mean by age: ~35-37% in young children, rising through puberty to
# ~44% in men and ~40% in women (approximate paediatric reference intervals, e.g.
# Nathan and Oski's Hematology of Infancy and Childhood, reference-value appendix).
_HCT_BOYS = np.array(
    [
        [0.5, 35.0],
        [2.0, 36.0],
        [6.0, 37.5],
        [12.0, 40.0],
        [15.0, 42.0],
        [18.0, 44.0],
        [65.0, 44.0],
    ]
)
_HCT_GIRLS = np.array(
    [
        [0.5, 35.0],
        [2.0, 36.0],
        [6.0, 37.5],
        [12.0, 39.0],
        [15.0, 39.5],
        [18.0, 40.0],
        [65.0, 40.0],
    ]
)
_HCT_SD = {"child": 2.5, "adult": 3.0}
_HCT_RANGE = (25.0, 55.0)

_P_OSA = 0.7  # one-stage clotting assay is still the most common in routine labs


def growth_medians(age_y, sex) -> tuple[np.ndarray, np.ndarray]:
    """Median height (cm) and weight (kg) for age, interpolated in the reference.

    Parameters
    ----------
    age_y : array_like
        Age, y (clamped to 0-65 y, the span of the table).
    sex : array_like
        0 male, 1 female.

    Returns
    -------
    height_cm, weight_kg : ndarray
        Medians from :data:`GROWTH_REFERENCE` ([WHO] below 2 y, [CDC] 2-20 y, adult
        values above), linearly interpolated between tabulated ages.
    """
    age = np.asarray(age_y, dtype=float)
    female = np.asarray(sex) == 1
    out = []
    for j in (1, 2):
        boys = np.interp(age, _BOYS[:, 0], _BOYS[:, j])
        girls = np.interp(age, _GIRLS[:, 0], _GIRLS[:, j])
        out.append(np.where(female, girls, boys))
    return out[0], out[1]


# ------------------------------------------------------------------ size formulas


def _xp(*xs):
    """jax.numpy when any input is a JAX array (so the formula traces), else numpy."""
    return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def lean_body_weight(wt_kg, ht_cm, sex):
    """Lean body weight (kg) by the James formula [James].

    ``LBW = 1.10 WT - 128 (WT/HT)**2`` for men and ``1.07 WT - 148 (WT/HT)**2`` for
    women (WT kg, HT cm). The project uses it as the size descriptor of the Kovaltry
    (Garmann 2017, Haemophilia 23:528) and Jivi (Solms 2020, Clin Pharmacokinet
    59:605) models, as the project brief states.

    Parameters
    ----------
    wt_kg : array_like
        Body weight, kg.
    ht_cm : array_like
        Height, cm.
    sex : array_like
        0 male, 1 female.

    Returns
    -------
    array
        LBW, kg (numpy, or JAX if any input is a JAX array).

    Notes
    -----
    The formula was derived in adults. It is quadratic in weight, peaks at
    ``WT = 1.10 HT**2 / 256`` (men) and falls for higher weights, so it
    underestimates LBW in obesity (BMI above ~35-40) and can even turn negative
    (Janmahasatian 2005 [Jan]). In children it has not been validated; it is used
    here only because the published FVIII models were fitted with it.
    """
    xp = _xp(wt_kg, ht_cm, sex)
    wt, ht = xp.asarray(wt_kg, dtype=float), xp.asarray(ht_cm, dtype=float)
    female = xp.asarray(sex) == 1
    a = xp.where(female, 1.07, 1.10)
    b = xp.where(female, 148.0, 128.0)
    return a * wt - b * (wt / ht) ** 2


def fat_free_mass(wt_kg, ht_cm, sex, age_y):
    """Fat-free mass (kg): Janmahasatian 2005 for adults, Al-Sallami 2015 for children.

    Adults (AGE >= 18 y) [Jan]: ``FFM = 9270 WT / (6680 + 216 BMI)`` for men and
    ``9270 WT / (8780 + 244 BMI)`` for women. Children (AGE < 18 y) [AlS] multiply the
    same expressions by a maturation factor, ``0.88 + 0.12 / (1 + (AGE/13.4)**-12.7)``
    for boys and ``1.11 - 0.11 / (1 + (AGE/7.1)**-1.1)`` for girls. This is the
    split used by Chelle 2019 (J Pharmacokinet Pharmacodyn 46:427) for FVIII.

    Parameters
    ----------
    wt_kg : array_like
        Body weight, kg.
    ht_cm : array_like
        Height, cm.
    sex : array_like
        0 male, 1 female.
    age_y : array_like
        Age, y.

    Returns
    -------
    array
        FFM, kg (numpy, or JAX if any input is a JAX array).

    Notes
    -----
    Al-Sallami et al. developed their equation in children aged 3-18 y; below 3 y
    it is an extrapolation. At 18 y the switch to the adult equation is not smooth:
    the paediatric factor is ~0.997 for boys but ~1.03 for girls.
    """
    xp = _xp(wt_kg, ht_cm, sex, age_y)
    wt, ht = xp.asarray(wt_kg, dtype=float), xp.asarray(ht_cm, dtype=float)
    age = xp.asarray(age_y, dtype=float)
    female = xp.asarray(sex) == 1
    bmi = wt / (ht / 100.0) ** 2
    adult = 9270.0 * wt / xp.where(female, 8780.0 + 244.0 * bmi, 6680.0 + 216.0 * bmi)
    # Keep the age base positive so (age/7.1)**-1.1 is finite at age 0; the adult
    # branch is selected there anyway only for age >= 18.
    a = xp.maximum(age, 1e-3)
    boys = 0.88 + 0.12 / (1.0 + (a / 13.4) ** -12.7)
    girls = 1.11 - 0.11 / (1.0 + (a / 7.1) ** -1.1)
    maturation = xp.where(age >= 18.0, 1.0, xp.where(female, girls, boys))
    return maturation * adult


# --------------------------------------------------------------------- simulation


def _correlated_z(rng: np.random.Generator, n: int, rho: float) -> np.ndarray:
    """(n, 2) standard normals with correlation ``rho``; pairs beyond +-3 redrawn."""
    z = np.empty((n, 2))
    todo = np.arange(n)
    while todo.size:
        e = rng.standard_normal((todo.size, 2))
        pair = np.column_stack([e[:, 0], rho * e[:, 0] + np.sqrt(1 - rho**2) * e[:, 1]])
        z[todo] = pair
        todo = todo[np.any(np.abs(pair) > _Z_MAX, axis=1)]
    return z


def simulate_demographics(
    key: Key,
    n: int,
    *,
    age_range: tuple[float, float] = (1.0, 65.0),
    age_distribution: str | Sequence[float] | np.ndarray = "uniform",
    female_fraction: float = 0.0,
) -> pd.DataFrame:
    """Simulate covariates of a virtual haemophilia cohort.

    Parameters
    ----------
    key : jax.random.key
        Typed PRNG key; the same key gives the same cohort.
    n : int
        Number of patients.
    age_range : (float, float)
        Ages (y) for ``age_distribution="uniform"``.
    age_distribution : "uniform" or array of ages
        ``"uniform"`` draws ages uniformly on ``age_range``; an array is an empirical
        age distribution (y) that is resampled with replacement (``age_range`` is
        then not used). Pass ``[a]`` for a cohort all aged ``a``.
    female_fraction : float
        Probability that a patient is female (default 0: haemophilia is X-linked).

    Returns
    -------
    pandas.DataFrame
        One row per patient: ``AGE`` (y), ``SEX`` (0 male, 1 female), ``WT`` (kg),
        ``HT`` (cm), ``BMI`` (kg/m2), ``LBW`` (kg, James), ``FFM`` (kg,
        Janmahasatian/Al-Sallami), ``BGO`` (1 = blood group O), ``VWF`` (IU/dL),
        ``HCT`` (%), ``ASSAY`` (``"OSA"`` or ``"CSA"``). Values lie in the ranges of
        ``pk_dataset.schema.json``.

    Notes
    -----
    Height and weight are drawn around the age- and sex-specific medians of
    :data:`GROWTH_REFERENCE` with z-scores correlated at 0.5 and truncated at +-3;
    height is normal (CV ~4%), weight log-normal, so the adult BMI is log-normal with
    median ~25 kg/m2. BGO ~ Bernoulli(0.45); VWF log-normal with median 75 (group O)
    or 105 IU/dL (non-O) at 30 y [Gill], rising 0.6%/y with age; HCT normal around
    age-specific means; ASSAY is OSA with probability 0.7.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if not 0.0 <= female_fraction <= 1.0:
        raise ValueError(f"female_fraction must be in [0, 1], not {female_fraction}")
    rng = numpy_generator(key)

    if isinstance(age_distribution, str):
        if age_distribution != "uniform":
            raise ValueError(
                f"age_distribution must be 'uniform' or an array of ages,"
                f" not {age_distribution!r}"
            )
        lo, hi = map(float, age_range)
        if not 0.0 <= lo <= hi <= 110.0:
            raise ValueError(
                f"age_range must satisfy 0 <= low <= high <= 110, not {age_range}"
            )
        age = rng.uniform(lo, hi, size=n)
    else:
        pool = np.asarray(age_distribution, dtype=float).ravel()
        if pool.size == 0 or not np.all((pool >= 0) & (pool <= 110)):
            raise ValueError("age_distribution must hold ages between 0 and 110 y")
        age = rng.choice(pool, size=n, replace=True)

    sex = (rng.uniform(size=n) < female_fraction).astype(int)

    ht_med, wt_med = growth_medians(age, sex)
    cv_ht = np.interp(age, _SPREAD[:, 0], _SPREAD[:, 1])
    sd_logwt = np.interp(age, _SPREAD[:, 0], _SPREAD[:, 2])
    z = _correlated_z(rng, n, _RHO_HT_WT)
    ht = ht_med * (1.0 + cv_ht * z[:, 0])
    wt = wt_med * np.exp(sd_logwt * z[:, 1])
    bmi = wt / (ht / 100.0) ** 2

    bgo = (rng.uniform(size=n) < _P_GROUP_O).astype(int)
    vwf_med = np.where(bgo == 1, _VWF_MEDIAN["O"], _VWF_MEDIAN["nonO"])
    vwf_med = vwf_med * np.exp(_VWF_AGE_SLOPE * (age - _VWF_REF_AGE))
    vwf = np.clip(vwf_med * np.exp(_VWF_LOG_SD * rng.standard_normal(n)), *_VWF_RANGE)

    hct_mean = np.where(
        sex == 1,
        np.interp(age, _HCT_GIRLS[:, 0], _HCT_GIRLS[:, 1]),
        np.interp(age, _HCT_BOYS[:, 0], _HCT_BOYS[:, 1]),
    )
    hct_sd = np.where(age >= 18.0, _HCT_SD["adult"], _HCT_SD["child"])
    hct = np.clip(hct_mean + hct_sd * rng.standard_normal(n), *_HCT_RANGE)

    assay = np.where(rng.uniform(size=n) < _P_OSA, "OSA", "CSA")

    import pandas as pd  # here: the dosing tool needs this module, not pandas

    return pd.DataFrame(
        {
            "AGE": age,
            "SEX": sex,
            "WT": wt,
            "HT": ht,
            "BMI": bmi,
            "LBW": np.asarray(lean_body_weight(wt, ht, sex)),
            "FFM": np.asarray(fat_free_mass(wt, ht, sex, age)),
            "BGO": bgo,
            "VWF": vwf,
            "HCT": hct,
            "ASSAY": pd.Series(assay, dtype=object),
        }
    )
