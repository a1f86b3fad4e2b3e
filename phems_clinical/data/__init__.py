"""Hospital data: the Cohort pytree, the NONMEM-style reader/validator, demographics.

By purpose: the cohort pytree (``Cohort``, ``stack_subjects``); the NONMEM-style
reader and validator (``read_nonmem``, ``to_cohort``, ``from_cohort``, ``PKData``,
``DataValidationError``, ``Issue``, ``Exclusion``, ``load_schema``); paediatric
demographics (``simulate_demographics``, ``fat_free_mass``, ``lean_body_weight``,
``growth_medians``); the clinician's dosing request (``parse_request``,
``DosingRequest``, ``FieldError``, ``RequestError``); patient-level splits
(``split_ids``, ``holdout_split``). The use cases' data live in subpackages with
their own faces: :mod:`~phems_clinical.data.picu`,
:mod:`~phems_clinical.data.cardiac`, :mod:`~phems_clinical.data.omop`.

Names are imported from their submodules on first use
(:func:`phems_clinical.lazy_exports`), so importing a light submodule such as
:mod:`~phems_clinical.data.plausibility` loads neither JAX nor pandas.
"""

from phems_clinical import lazy_exports

_EXPORTS = {
    ".cohort": ("Cohort", "stack_subjects"),
    ".demographics": (
        "fat_free_mass",
        "growth_medians",
        "lean_body_weight",
        "simulate_demographics",
    ),
    ".dosing_request": (
        "DosingOptions",
        "DosingRequest",
        "FieldError",
        "Infusion",
        "Level",
        "RequestError",
        "parse_request",
    ),
    ".nonmem": (
        "DataValidationError",
        "Exclusion",
        "Issue",
        "PKData",
        "from_cohort",
        "load_schema",
        "read_nonmem",
        "to_cohort",
    ),
    ".split": ("holdout_split", "split_ids"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "Cohort",
    "DataValidationError",
    "DosingOptions",
    "DosingRequest",
    "Exclusion",
    "FieldError",
    "Infusion",
    "Issue",
    "Level",
    "PKData",
    "RequestError",
    "fat_free_mass",
    "from_cohort",
    "growth_medians",
    "holdout_split",
    "lean_body_weight",
    "load_schema",
    "parse_request",
    "read_nonmem",
    "simulate_demographics",
    "split_ids",
    "stack_subjects",
    "to_cohort",
]
