"""Hospital data: the Cohort pytree, the NONMEM-style reader/validator, demographics."""

from phems_clinical.data.cohort import Cohort, stack_subjects
from phems_clinical.data.demographics import (
    fat_free_mass,
    lean_body_weight,
    simulate_demographics,
)
from phems_clinical.data.dosing_request import (
    DosingOptions,
    DosingRequest,
    FieldError,
    Infusion,
    Level,
    RequestError,
    parse_request,
)
from phems_clinical.data.nonmem import (
    DataValidationError,
    Exclusion,
    Issue,
    PKData,
    from_cohort,
    read_nonmem,
    to_cohort,
)

__all__ = [
    "Cohort", "DataValidationError", "Exclusion", "Issue", "PKData", "fat_free_mass",
    "from_cohort", "lean_body_weight", "read_nonmem", "simulate_demographics",
    "stack_subjects", "to_cohort",
    "DosingOptions", "DosingRequest", "FieldError", "Infusion", "Level",
    "RequestError", "parse_request",
]
