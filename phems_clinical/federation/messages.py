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
    raise MessageRejected(f"algorithm {algorithm_name!r}: not declared in "
                          "federation_message.schema.json")


def envelope(algorithm_name: str, round_: int, payload: Mapping[str, Any]) -> dict:
    """The JSON-able description of a payload (names, shapes, dtypes; no values)."""
    return {"algorithm": algorithm_name, "round": int(round_),
            "arrays": {k: {"shape": list(np.shape(v)),
                           "dtype": str(np.asarray(v).dtype)}
                       for k, v in payload.items()}}


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
            raise MessageRejected(f"{algorithm.name}.{name}: the algorithm declares "
                                  f"shape {want}, the schema rank {declared[name]}")
        if tuple(np.shape(value)) != want:
            raise MessageRejected(f"{algorithm.name}.{name}: shape "
                                  f"{tuple(np.shape(value))}, expected {want}")


__all__ = ["MessageRejected", "check_payload", "declared_fields", "envelope",
           "load_message_schema"]
