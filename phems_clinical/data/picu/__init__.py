"""PICU data: the hourly-stay simulator (OMOP CDM 5.4 tables) and the OMOP -> hourly
table conversion used by the Phoenix scores and the sepsis models."""

from phems_clinical.data.picu.hourly import (
    HOURLY_COLUMNS,
    HourlyTableError,
    hourly_table,
)
from phems_clinical.data.picu.simulate import (
    AGE_BANDS_MONTHS,
    DEFAULT_CASE_MIX,
    DEFAULT_SITES,
    PicuCohort,
    simulate_picu,
    simulate_sites,
)

__all__ = [
    "AGE_BANDS_MONTHS",
    "DEFAULT_CASE_MIX",
    "DEFAULT_SITES",
    "HOURLY_COLUMNS",
    "HourlyTableError",
    "PicuCohort",
    "hourly_table",
    "simulate_picu",
    "simulate_sites",
]
