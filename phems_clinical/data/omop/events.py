"""OMOP event tables (visit_occurrence, visit_detail, drug_exposure,
procedure_occurrence) from arrays, for the simulators: one builder that names each
table's columns."""

from __future__ import annotations

import numpy as np
import pandas as pd

from phems_clinical.data.omop.concepts import TYPE_EHR

#: (id, concept, start date, start datetime, end date, end datetime, type concept)
EVENT_COLUMNS = {
    "visit_occurrence": (
        "visit_occurrence_id",
        "visit_concept_id",
        "visit_start_date",
        "visit_start_datetime",
        "visit_end_date",
        "visit_end_datetime",
        "visit_type_concept_id",
    ),
    "visit_detail": (
        "visit_detail_id",
        "visit_detail_concept_id",
        "visit_detail_start_date",
        "visit_detail_start_datetime",
        "visit_detail_end_date",
        "visit_detail_end_datetime",
        "visit_detail_type_concept_id",
    ),
    "drug_exposure": (
        "drug_exposure_id",
        "drug_concept_id",
        "drug_exposure_start_date",
        "drug_exposure_start_datetime",
        "drug_exposure_end_date",
        "drug_exposure_end_datetime",
        "drug_type_concept_id",
    ),
    "procedure_occurrence": (
        "procedure_occurrence_id",
        "procedure_concept_id",
        "procedure_date",
        "procedure_datetime",
        "procedure_end_date",
        "procedure_end_datetime",
        "procedure_type_concept_id",
    ),
}


def _ns(t) -> np.ndarray:
    return np.asarray(t).astype("datetime64[ns]")


def event_table(
    table: str,
    *,
    ids,
    person_id,
    concept_id,
    start,
    end,
    visit_occurrence_id=None,
    visit_detail_id=None,
    type_concept_id: int = TYPE_EHR,
    **extra,
) -> pd.DataFrame:
    """One row per event: ids, persons, concepts, start/end datetimes (ns, or
    datetime64 arrays) with their dates (midnight), the record type (EHR), the visit
    and visit detail when given, then ``extra`` columns (e.g.
    ``drug_source_value``)."""
    id_, concept, d0, t0, d1, t1, type_ = EVENT_COLUMNS[table]
    start, end = _ns(start), _ns(end)
    n = len(start)
    links = {
        name: np.asarray(v, np.int64)
        for name, v in (
            ("visit_occurrence_id", visit_occurrence_id),
            ("visit_detail_id", visit_detail_id),
        )
        if v is not None
    }
    return pd.DataFrame(
        {
            id_: np.asarray(ids, np.int64),
            "person_id": np.asarray(person_id, np.int64),
            concept: np.asarray(concept_id, np.int64),
            d0: start.astype("datetime64[D]").astype("datetime64[ns]"),
            t0: start,
            d1: end.astype("datetime64[D]").astype("datetime64[ns]"),
            t1: end,
            type_: np.full(n, type_concept_id, np.int64),
            **links,
            **extra,
        }
    )


__all__ = ["EVENT_COLUMNS", "event_table"]
