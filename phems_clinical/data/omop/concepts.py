"""Named OMOP concept ids used by the suite (OMOP CDM v5.4 standard vocabularies).

Every id here is a row of ``data_schemas/omop/concepts.csv`` (with its name, domain,
vocabulary, code, whether it was verified and a ``note``), which
:func:`phems_clinical.data.omop.create_cdm` loads into the ``concept`` table.
Standard ids are OMOP vocabulary ids (LOINC for labs and vitals, SNOMED for
conditions and procedures, RxNorm ingredients for drugs). Codes without a standard
concept use local ids >= :data:`LOCAL_MIN` (the OMOP convention for
site-defined concepts: OHDSI, "The Book of OHDSI", 2021, ch. 5).

Units are not coded (``unit_concept_id`` is left NULL); the unit is written to
``unit_source_value`` as listed in :data:`UNITS` (UCUM).
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import pandas as pd

from phems_clinical.resources import schemas_dir

__all__ = [
    "CONCEPTS_FILE",
    "CONDITION",
    "DEATH_TYPE",
    "DRUG",
    "GENDER",
    "LOCAL_MIN",
    "MEASUREMENT",
    "OBSERVATION",
    "OPERATOR",
    "PK_COVARIATE",
    "PK_COVARIATE_OTHER",
    "PROCEDURE",
    "ROUTE",
    "TYPE_EHR",
    "UNITS",
    "VISIT",
    "VISIT_DETAIL",
    "all_ids",
    "bundled_concepts",
]

CONCEPTS_FILE = "omop/concepts.csv"

#: Smallest local (site-defined) concept id.
LOCAL_MIN = 2_000_000_000

GENDER = {"male": 8507, "female": 8532}
VISIT = {"inpatient": 9201, "outpatient": 9202, "er": 9203}
VISIT_DETAIL = {"icu": 32037, "ward": 8717, "or": 2_000_000_101}
#: "EHR": every ``*_type_concept_id`` of the simulated data.
TYPE_EHR = 32817
DEATH_TYPE = TYPE_EHR

MEASUREMENT = {
    "hr": 3027018,
    "resp_rate": 3024171,
    "sbp": 3004249,
    "dbp": 3012888,
    "map": 3027598,
    "spo2": 40762499,
    "temp": 3020891,
    "gcs": 3032652,
    "fio2": 3020716,
    "pao2": 3027801,
    "paco2": 3027946,
    "lactate": 3047181,
    "platelets": 3024929,
    "inr": 3022217,
    "d_dimer": 3051714,
    "fibrinogen": 3016407,
    "glucose": 3004501,
    "anc": 3013650,
    "alc": 3004327,
    "wbc": 3000905,
    "creatinine": 3016723,
    "bilirubin": 3024128,
    "alt": 3006923,
    "weight": 3025315,
    "height": 3036277,
    "fviii_activity": 3019250,
    "fix_activity": 3006109,
}

#: UCUM unit written to ``measurement.unit_source_value`` for each key.
UNITS = {
    "hr": "/min",
    "resp_rate": "/min",
    "sbp": "mm[Hg]",
    "dbp": "mm[Hg]",
    "map": "mm[Hg]",
    "spo2": "%",
    "temp": "Cel",
    "gcs": "{score}",
    "fio2": "1",
    "pao2": "mm[Hg]",
    "paco2": "mm[Hg]",
    "lactate": "mmol/L",
    "platelets": "10*3/uL",
    "inr": "{INR}",
    "d_dimer": "mg/L{FEU}",
    "fibrinogen": "mg/dL",
    "glucose": "mg/dL",
    "anc": "10*3/uL",
    "alc": "10*3/uL",
    "wbc": "10*3/uL",
    "creatinine": "mg/dL",
    "bilirubin": "mg/dL",
    "alt": "U/L",
    "weight": "kg",
    "height": "cm",
    "fviii_activity": "[IU]/dL",
    "fix_activity": "[IU]/dL",
}

OBSERVATION = {"fixed_pupils": 2_000_000_201}

DRUG = {
    "epinephrine": 1343916,
    "norepinephrine": 1321341,
    "dopamine": 1337860,
    "dobutamine": 1337720,
    "milrinone": 1368671,
    "vasopressin": 1507835,
    "ceftriaxone": 1777806,
    "vancomycin": 1707687,
    "meropenem": 1709170,
    "piperacillin": 1746114,
    "fviii": 2_000_000_301,
    "fix": 2_000_000_302,
}

PROCEDURE = {
    "imv": 4230167,
    "oxygen_therapy": 4239130,
    "blood_culture": 4107893,
    "stat1": 2_000_000_401,
    "stat2": 2_000_000_402,
    "stat3": 2_000_000_403,
    "stat4": 2_000_000_404,
    "stat5": 2_000_000_405,
}

CONDITION = {
    "sepsis": 132797,
    "septic_shock": 196236,
    "haemophilia_a": 2_000_000_501,
    "haemophilia_b": 2_000_000_502,
    "congenital_heart_disease": 2_000_000_601,
}

#: Measurement value operators (``measurement.operator_concept_id``).
OPERATOR = {"<": 4171756, "=": 4172703}
#: drug_exposure.route_concept_id (SNOMED route).
ROUTE = {"intravenous": 4171047}

#: Haemophilia PK covariates (NONMEM column -> (table, concept id)). SEX and AGE go
#: to ``person`` (gender, birth); ASSAY and LLOQ to the level's source value.
PK_COVARIATE = {
    "WT": ("measurement", 3025315),
    "HT": ("measurement", 3036277),
    "BMI": ("measurement", 3038553),
    "HCT": ("measurement", 3023314),
    "LBW": ("measurement", 2_000_000_701),
    "FFM": ("measurement", 2_000_000_702),
    "VWF": ("measurement", 2_000_000_704),
    "BGO": ("observation", 2_000_000_703),
}
#: Any other numeric covariate: observation with this id, name in the source value.
PK_COVARIATE_OTHER = 2_000_000_799


def _groups() -> list[dict]:
    return [
        GENDER,
        VISIT,
        VISIT_DETAIL,
        MEASUREMENT,
        OBSERVATION,
        DRUG,
        PROCEDURE,
        CONDITION,
        OPERATOR,
        ROUTE,
        {k: v for k, (_, v) in PK_COVARIATE.items()},
        {"type_ehr": TYPE_EHR, "pk_other": PK_COVARIATE_OTHER},
    ]


def all_ids() -> set[int]:
    """Every concept id named in this module."""
    return {int(v) for g in _groups() for v in g.values()}


def _path() -> Path:
    return schemas_dir() / CONCEPTS_FILE


@lru_cache(maxsize=1)
def _bundled() -> pd.DataFrame:
    with open(_path(), encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    df = pd.DataFrame(rows)
    df["concept_id"] = df["concept_id"].astype("int64")
    for c in ("standard", "verified"):
        df[c] = df[c].map({"true": True, "false": False}).astype(bool)
    return df


def bundled_concepts() -> pd.DataFrame:
    """``data_schemas/omop/concepts.csv`` as a DataFrame (a copy).

    Columns: concept_id (int64), concept_name, domain_id, vocabulary_id,
    concept_class_id, concept_code, standard (bool), verified (bool), note.
    """
    return _bundled().copy()
