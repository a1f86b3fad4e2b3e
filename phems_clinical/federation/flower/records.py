"""Population-level arrays <-> Flower ``ArrayRecord`` (float64, bit-exact).

``flwr.app.Array`` stores an array with ``numpy.save`` (never pickled), so a
float64 payload crosses the wire bit for bit: the Flower run and the in-process
engine sum the very same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from phems_clinical.federation.messages import MessageRejected


def arrays_to_record(arrays: Mapping[str, Any]) -> ArrayRecord:
    """An ``ArrayRecord`` of float64 copies of ``arrays`` (a payload or a
    broadcast)."""
    return ArrayRecord(
        {
            name: Array(np.array(value, dtype=np.float64, order="C"))
            for name, value in arrays.items()
        }
    )


def record_to_arrays(
    record: ArrayRecord, spec: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """The arrays of ``record``; with ``spec`` (``{name: shape}``) the names and
    shapes must be exactly those declared.

    Raises
    ------
    MessageRejected
        On a missing or extra field, a wrong shape, or a dtype other than float64.
    """
    arrays = {name: record[name].numpy() for name in record}
    for name, value in arrays.items():
        if value.dtype != np.float64:
            raise MessageRejected(f"{name}: dtype {value.dtype}, expected float64")
    if spec is not None:
        if set(arrays) != set(spec):
            raise MessageRejected(f"fields {sorted(arrays)}, expected {sorted(spec)}")
        for name, shape in spec.items():
            if arrays[name].shape != tuple(shape):
                raise MessageRejected(
                    f"{name}: shape {arrays[name].shape}, expected {tuple(shape)}"
                )
    return arrays


def array_record(content: RecordDict, name: str) -> ArrayRecord:
    """The ``ArrayRecord`` ``name`` of a message's content, else
    ``MessageRejected``."""
    record = content.get(name)
    if not isinstance(record, ArrayRecord):
        raise MessageRejected(
            f"record {name!r}: expected an ArrayRecord, got {type(record).__name__}"
        )
    return record


def config_record(content: RecordDict, name: str) -> ConfigRecord:
    """The ``ConfigRecord`` ``name`` of a message's content, else
    ``MessageRejected``."""
    record = content.get(name)
    if not isinstance(record, ConfigRecord):
        raise MessageRejected(
            f"record {name!r}: expected a ConfigRecord, got {type(record).__name__}"
        )
    return record


def config_int(record: Mapping[str, Any], name: str) -> int:
    """The integer field ``name`` of a config record (a bool is refused), else
    ``MessageRejected``."""
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageRejected(
            f"field {name!r}: expected an integer, got {type(value).__name__}"
        )
    return value


__all__ = [
    "array_record",
    "arrays_to_record",
    "config_int",
    "config_record",
    "record_to_arrays",
]
