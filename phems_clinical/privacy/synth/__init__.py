"""Synthetic data generators (issue 6, section 2). :mod:`.copula`: a Gaussian copula
for one table with categorical, bounded and missing values (frequency-interval
encoding after Patki et al. 2016; SDV itself is BUSL-1.1 and not used)."""

from phems_clinical.privacy.synth.copula import (
    ColumnMarginal,
    CopulaInputError,
    CopulaModel,
    fit_copula,
    nearest_pd_correlation,
    sample_copula,
)

__all__ = [
    "ColumnMarginal",
    "CopulaInputError",
    "CopulaModel",
    "fit_copula",
    "nearest_pd_correlation",
    "sample_copula",
]
