"""Haemophilia population pharmacokinetics.

By purpose: the closed-form engine (``concentration``, ``dose_response``,
``macro_constants``, ``steady_state``; :mod:`~phems_clinical.pk.analytic`) and
derived quantities (``auc``, ``clearance``, ``terminal_half_life``,
``time_to_threshold``, ``summarise``; :mod:`~phems_clinical.pk.derived`); model
specifications and the product library (``PopModel``, ``load_model``,
``parse_model``, ``save_model``, ``load_product``, ``list_products``;
:mod:`~phems_clinical.pk.spec`, :mod:`~phems_clinical.pk.library`); the population
model's pure functions (``PopParams``, ``initial_params``, ``predict``,
``individual_parameters``; :mod:`~phems_clinical.pk.model`); estimation by FOCEI
(``fit_focei``, ``focei_objective``), NUTS and SVI (``fit_nuts``, ``fit_svi``:
:mod:`~phems_clinical.pk.bayes`, which loads NumPyro) and individual forecasts
(``fit_map``, ``laplace_draws``); dosing (``recommend``, ``validated_range``,
``round_to_vials``); diagnostics and the cohort simulator (``simulate_cohort``,
``simulate_hospitals``). Names are imported from their submodules on first use
(:func:`phems_clinical.lazy_exports`), so ``import phems_clinical.pk`` loads no JAX.
"""

from phems_clinical import lazy_exports

_EXPORTS = {
    ".analytic": ("concentration", "dose_response", "macro_constants", "steady_state"),
    ".bayes": ("BayesResult", "Priors", "fit_nuts", "fit_svi", "library_priors",
               "population_model", "sample_random_effects", "weak_priors"),
    ".derived": ("DEFAULT_THRESHOLDS", "auc", "auc_inf", "clearance",
                 "effective_half_life", "incremental_recovery", "summarise",
                 "terminal_half_life", "time_to_level", "time_to_threshold", "vss"),
    ".diagnostics": ("compute_diagnostics", "simulate_replicates"),
    ".dosing": ("MAX_DOSE_IU_KG", "SteadyState", "default_intervals",
                "detect_regimen", "minimal_dose", "prior_predictive", "recommend",
                "round_down_to_vials", "round_to_vials", "steady_state_schedule",
                "time_above_per_week", "trough_probability", "validated_range",
                "vial_combination"),
    ".focei": ("FOCEIResult", "build_focei", "fit_focei", "focei_objective",
               "r_standard_errors"),
    ".forecast": ("fit_map", "fit_map_batch", "fit_nuts_individual", "laplace_draws"),
    ".library": ("DEFAULT_PRODUCT", "UnknownProductError", "list_products",
                 "load_product", "product_info", "products_table", "resolve_product"),
    ".model": ("PopParams", "covariate_vector", "individual_parameters",
               "initial_params", "likelihood_cohort", "n_occasions", "predict",
               "residual_variance", "typical_parameters"),
    ".occasions": ("occasion_concentration",),
    ".packing": ("Packer", "build_packer"),
    ".simulate": ("DESIGNS", "HospitalSpec", "default_hospitals", "draw_kappa",
                  "simulate_cohort", "simulate_hospitals", "simulate_observations"),
    ".spec": ("ModelSpecError", "PopModel", "Residual", "load_model", "parse_model",
              "save_model", "to_spec", "with_values"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "BayesResult", "DEFAULT_PRODUCT", "DEFAULT_THRESHOLDS", "DESIGNS", "FOCEIResult",
    "HospitalSpec", "MAX_DOSE_IU_KG", "ModelSpecError", "Packer", "PopModel",
    "PopParams", "Priors", "Residual", "SteadyState", "UnknownProductError", "auc",
    "auc_inf", "build_focei", "build_packer", "clearance", "compute_diagnostics",
    "concentration", "covariate_vector", "default_hospitals", "default_intervals",
    "detect_regimen", "dose_response", "draw_kappa", "effective_half_life", "fit_focei",
    "fit_map", "fit_map_batch", "fit_nuts", "fit_nuts_individual", "fit_svi",
    "focei_objective", "incremental_recovery", "individual_parameters",
    "initial_params", "laplace_draws", "library_priors", "likelihood_cohort",
    "list_products", "load_model", "load_product", "macro_constants", "minimal_dose",
    "n_occasions", "occasion_concentration", "parse_model", "population_model",
    "predict", "prior_predictive", "product_info", "products_table",
    "r_standard_errors", "recommend", "residual_variance", "resolve_product",
    "round_down_to_vials", "round_to_vials", "sample_random_effects", "save_model",
    "simulate_cohort", "simulate_hospitals", "simulate_observations",
    "simulate_replicates", "steady_state", "steady_state_schedule", "summarise",
    "terminal_half_life", "time_above_per_week", "time_to_level", "time_to_threshold",
    "to_spec", "trough_probability", "typical_parameters", "validated_range",
    "vial_combination", "vss", "weak_priors", "with_values",
]
