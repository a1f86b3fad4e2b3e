"""What may leave a site: ``data_schemas/federation_message.schema.json``.

:func:`check_payload` runs on every payload before it is aggregated (in process) or
sent (Flower). It accepts a payload only when

1. its envelope (algorithm, round, field names, ranks, dtypes) validates against
   the JSON schema, whose per-algorithm ``additionalProperties: false`` admits only
   the declared population-level arrays; and
2. every array has exactly the shape the algorithm declared in
   :attr:`~phems_clinical.federation.core.Algorithm.message_spec`, whose rank is the
   schema's ``x-shape`` (those sizes are fixed by the model, never by the number of
   patients).

:func:`check_query_reply` does the same for the opening query round's reply
(``$defs/query_reply``: the site's index and its cohort's sizes, counts only), at
the site before it is sent and at the server on receipt. Its error texts name the
field and what was expected, never the value received.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from typing import Any

import jsonschema
import numpy as np

from phems_clinical.resources import schemas_dir


class MessageRejected(ValueError):
    """A payload does not match the federation message contract."""


@cache
def load_message_schema() -> dict:
    """The parsed ``federation_message.schema.json``."""
    return json.loads((schemas_dir() / "federation_message.schema.json").read_text())


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = load_message_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def declared_fields(algorithm_name: str) -> dict[str, list[str]]:
    """``{field: symbolic shape}`` the schema allows for ``algorithm_name``."""
    schema = load_message_schema()
    for clause in schema["allOf"]:
        cond = clause["if"]["properties"]["algorithm"]
        names = cond.get("enum", [cond.get("const")])
        if algorithm_name in names:
            ref = clause["then"]["properties"]["arrays"]["$ref"].split("/")[-1]
            props = schema["$defs"][ref]["properties"]
            return {k: v["x-shape"] for k, v in props.items()}
    raise MessageRejected(
        f"algorithm {algorithm_name!r}: not declared in federation_message.schema.json"
    )


def envelope(algorithm_name: str, round_: int, payload: Mapping[str, Any]) -> dict:
    """The JSON-able description of a payload (names, shapes, dtypes; no values)."""
    return {
        "algorithm": algorithm_name,
        "round": int(round_),
        "arrays": {
            k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
            for k, v in payload.items()
        },
    }


def check_payload(algorithm, payload: Mapping[str, Any], round_: int = 0) -> None:
    """Raise :class:`MessageRejected` unless ``payload`` may leave the site."""
    env = envelope(algorithm.name, round_, payload)
    errors = sorted(_validator().iter_errors(env), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.path) or "message"
        raise MessageRejected(f"{algorithm.name} payload {where}: {e.message}")
    declared = declared_fields(algorithm.name)
    for name, value in payload.items():
        want = tuple(algorithm.message_spec[name])
        if len(want) != len(declared[name]):
            raise MessageRejected(
                f"{algorithm.name}.{name}: the algorithm declares "
                f"shape {want}, the schema rank {declared[name]}"
            )
        if tuple(np.shape(value)) != want:
            raise MessageRejected(
                f"{algorithm.name}.{name}: shape "
                f"{tuple(np.shape(value))}, expected {want}"
            )


@cache
def _def_validator(name: str) -> jsonschema.Draft202012Validator:
    """The validator of the schema's ``$defs/<name>`` (built once)."""
    schema = load_message_schema()["$defs"][name]
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def query_fields() -> tuple[str, ...]:
    """The fields of a query reply, as declared in the schema."""
    return tuple(load_message_schema()["$defs"]["query_reply"]["properties"])


def _expected(prop: Mapping[str, Any]) -> str:
    return f"an integer >= {prop['minimum']}"


def check_query_reply(
    reply: Mapping[str, Any], num_sites: int | None = None
) -> dict[str, int]:
    """The query reply as ``{field: int}``; raises :class:`MessageRejected` unless it
    holds exactly the declared counts (and, with ``num_sites``, a site index in
    ``0..num_sites - 1``). The error names the field, never the value."""
    fields = query_fields()
    if not isinstance(reply, Mapping):
        raise MessageRejected(f"query reply: expected a record of {', '.join(fields)}")
    reply = dict(reply)
    extra = [k for k in reply if k not in fields]
    if extra:  # the names a site sent are not echoed
        raise MessageRejected(
            f"query reply: {len(extra)} undeclared field(s); "
            f"expected only {', '.join(fields)}"
        )
    errors = sorted(
        _def_validator("query_reply").iter_errors(reply),
        key=lambda e: (list(e.path), e.validator),
    )
    if errors:
        e = errors[0]
        if e.validator == "required":
            missing = [k for k in fields if k not in reply]
            raise MessageRejected(f"query reply: missing {', '.join(missing)}")
        name = str(e.path[0]) if e.path else "reply"
        prop = load_message_schema()["$defs"]["query_reply"]["properties"][name]
        raise MessageRejected(f"query reply {name}: expected {_expected(prop)}")
    out = {k: int(reply[k]) for k in fields}
    if num_sites is not None and not out["site-index"] < num_sites:
        raise MessageRejected(f"query reply site-index: expected 0..{num_sites - 1}")
    return out


def check_audit_head(record: Mapping[str, Any]) -> dict[str, Any]:
    """The audit-log anchor of a reply (``$defs/audit_head``: ``seq`` and the hex
    MAC ``head``); raises :class:`MessageRejected` naming the field, never the
    value."""
    schema = load_message_schema()["$defs"]["audit_head"]
    if not isinstance(record, Mapping) or set(record) != set(schema["required"]):
        raise MessageRejected("audit record: expected exactly seq and head")
    errors = list(_def_validator("audit_head").iter_errors(dict(record)))
    if errors:
        name = str(errors[0].path[0]) if errors[0].path else "record"
        raise MessageRejected(
            f"audit record {name}: expected {schema['properties'][name]['description']}"
        )
    return {"seq": int(record["seq"]), "head": str(record["head"])}


__all__ = [
    "MessageRejected",
    "check_audit_head",
    "check_payload",
    "check_query_reply",
    "declared_fields",
    "envelope",
    "load_message_schema",
    "query_fields",
]
