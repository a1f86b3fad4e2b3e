"""Haemophilia population pharmacokinetics.

Engine (:mod:`~phems_clinical.pk.analytic`, :mod:`~phems_clinical.pk.derived`), model
specification and product library (:mod:`~phems_clinical.pk.spec`,
:mod:`~phems_clinical.pk.library`), the population model's pure functions
(:mod:`~phems_clinical.pk.model`), FOCEI (:mod:`~phems_clinical.pk.focei`), NUTS and SVI
(:mod:`phems_clinical.pk.bayes`, imported on demand: it loads NumPyro), diagnostics
and the cohort simulator.
"""

from phems_clinical.pk.analytic import concentration, dose_response, macro_constants
from phems_clinical.pk.derived import (
    DEFAULT_THRESHOLDS,
    auc,
    auc_inf,
    clearance,
    effective_half_life,
    incremental_recovery,
    summarise,
    terminal_half_life,
    time_to_threshold,
    vss,
)
from phems_clinical.pk.diagnostics import compute_diagnostics, simulate_replicates
from phems_clinical.pk.focei import FOCEIResult, fit_focei, focei_objective
from phems_clinical.pk.library import list_products, load_product
from phems_clinical.pk.model import (
    PopParams,
    individual_parameters,
    initial_params,
    predict,
    typical_parameters,
)
from phems_clinical.pk.simulate import (
    HospitalSpec,
    default_hospitals,
    simulate_cohort,
    simulate_hospitals,
)
from phems_clinical.pk.spec import ModelSpecError, PopModel, load_model, parse_model

__all__ = [
    "DEFAULT_THRESHOLDS", "FOCEIResult", "HospitalSpec", "ModelSpecError", "PopModel",
    "PopParams", "auc", "auc_inf", "clearance", "compute_diagnostics", "concentration",
    "default_hospitals", "dose_response", "effective_half_life", "fit_focei",
    "focei_objective", "incremental_recovery", "individual_parameters",
    "initial_params", "list_products", "load_model", "load_product",
    "macro_constants", "parse_model", "predict", "simulate_cohort",
    "simulate_hospitals", "simulate_replicates", "summarise", "terminal_half_life",
    "time_to_threshold", "typical_parameters", "vss",
]
