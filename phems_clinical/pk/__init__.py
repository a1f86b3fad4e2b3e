"""Haemophilia population pharmacokinetics.

Engine (:mod:`~phems_clinical.pk.analytic`, :mod:`~phems_clinical.pk.derived`), model
specification and product library (:mod:`~phems_clinical.pk.spec`,
:mod:`~phems_clinical.pk.library`), the population model's pure functions
(:mod:`~phems_clinical.pk.model`), FOCEI (:mod:`~phems_clinical.pk.focei`), NUTS and SVI
(:mod:`phems_clinical.pk.bayes`, imported on demand: it loads NumPyro), diagnostics
and the cohort simulator. Names are imported from their submodules on first use
(:func:`phems_clinical.lazy_exports`).
"""

from phems_clinical import lazy_exports

_EXPORTS = {
    ".analytic": ("concentration", "dose_response", "macro_constants"),
    ".derived": ("DEFAULT_THRESHOLDS", "auc", "auc_inf", "clearance",
                 "effective_half_life", "incremental_recovery", "summarise",
                 "terminal_half_life", "time_to_threshold", "vss"),
    ".diagnostics": ("compute_diagnostics", "simulate_replicates"),
    ".focei": ("FOCEIResult", "fit_focei", "focei_objective"),
    ".library": ("list_products", "load_product"),
    ".model": ("PopParams", "individual_parameters", "initial_params", "predict",
               "typical_parameters"),
    ".simulate": ("HospitalSpec", "default_hospitals", "simulate_cohort",
                  "simulate_hospitals"),
    ".spec": ("ModelSpecError", "PopModel", "load_model", "parse_model"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
