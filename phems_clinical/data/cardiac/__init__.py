"""Paediatric cardiac-surgery pathways: the OMOP simulator and OMOP -> sojourn table.

* :mod:`phems_clinical.data.cardiac.simulate`: episodes (referral, admission, index
  operation by STAT category, CICU, ward, discharge, readmission, reintervention,
  death) as OMOP CDM 5.4 tables, calibrated to STS/STAT benchmarks.
* :mod:`phems_clinical.data.cardiac.pathways`: validated OMOP tables -> one row per
  post-operative state sojourn (``data_schemas/cardiac_pathway.schema.json``).
"""

from phems_clinical.data.cardiac.simulate import (
    CONCEPTS,
    REFERENCE_CASE_MIX,
    SITE_CASE_MIX,
    STATES,
    TARGET_LOS,
    TARGET_MORTALITY,
    TRANSITIONS,
    CardiacCohort,
    CaseMix,
    expected_weight_kg,
    simulate_cardiac,
    simulate_sites,
)

__all__ = [
    "CONCEPTS",
    "REFERENCE_CASE_MIX",
    "SITE_CASE_MIX",
    "STATES",
    "TARGET_LOS",
    "TARGET_MORTALITY",
    "TRANSITIONS",
    "CardiacCohort",
    "CaseMix",
    "expected_weight_kg",
    "simulate_cardiac",
    "simulate_sites",
]
