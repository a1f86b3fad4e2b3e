"""Synthetic data generators, each per site, seeded by an
explicit JAX key and reproducible:

- :mod:`.copula`: Gaussian copula for one table with categorical, bounded and
  missing values (frequency-interval encoding after Patki et al. 2016; SDV itself
  is BUSL-1.1 and not used);
- :mod:`.mst`: differentially private MST marginals (McKenna, Miklau & Sheldon
  2021) on mbi, with its (epsilon, delta) and zCDP accounting;
- :mod:`.pk_virtual`: pharmacometric virtual patients (covariates by the copula,
  concentrations through the population model with the original designs);
- :mod:`.picu_sequences`: hourly PICU stays (patient-level latents, autoregressive
  dynamics, measurement masks, death ends the stay);
- :mod:`.pathways`: cardiac patient pathways (piecewise-constant transition rates
  per risk group, simulated forward; nothing after death).
"""

from phems_clinical.privacy.synth.copula import (
    ColumnMarginal,
    CopulaInputError,
    CopulaModel,
    fit_copula,
    nearest_pd_correlation,
    sample_copula,
)
from phems_clinical.privacy.synth.mst import (
    MSTBudget,
    MSTInputError,
    MSTModel,
    fit_mst,
    mst_budget,
    mst_input_report,
    sample_mst,
)
from phems_clinical.privacy.synth.pathways import (
    PathwayInputError,
    PathwayModel,
    fit_pathways,
    sample_pathways,
)
from phems_clinical.privacy.synth.picu_sequences import (
    PicuSequenceError,
    PicuSequenceModel,
    fit_picu_sequences,
    sample_picu_sequences,
)

__all__ = [
    "ColumnMarginal",
    "CopulaInputError",
    "CopulaModel",
    "fit_copula",
    "nearest_pd_correlation",
    "sample_copula",
    "MSTBudget",
    "MSTInputError",
    "MSTModel",
    "fit_mst",
    "mst_budget",
    "mst_input_report",
    "sample_mst",
    "PicuSequenceError",
    "PicuSequenceModel",
    "fit_picu_sequences",
    "sample_picu_sequences",
    "PathwayInputError",
    "PathwayModel",
    "fit_pathways",
    "sample_pathways",
]
