"""Hospital data: the Cohort pytree, the NONMEM-style reader/validator, demographics.

Names are imported from their submodules on first use
(:func:`phems_clinical.lazy_exports`), so importing a light submodule such as
:mod:`~phems_clinical.data.plausibility` loads neither JAX nor pandas.
"""

from phems_clinical import lazy_exports

_EXPORTS = {
    ".cohort": ("Cohort", "stack_subjects"),
    ".demographics": ("fat_free_mass", "lean_body_weight", "simulate_demographics"),
    ".dosing_request": ("DosingOptions", "DosingRequest", "FieldError", "Infusion",
                        "Level", "RequestError", "parse_request"),
    ".nonmem": ("DataValidationError", "Exclusion", "Issue", "PKData", "from_cohort",
                "read_nonmem", "to_cohort"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "Cohort", "DataValidationError", "Exclusion", "Issue", "PKData", "fat_free_mass",
    "from_cohort", "lean_body_weight", "read_nonmem", "simulate_demographics",
    "stack_subjects", "to_cohort",
    "DosingOptions", "DosingRequest", "FieldError", "Infusion", "Level",
    "RequestError", "parse_request",
]
