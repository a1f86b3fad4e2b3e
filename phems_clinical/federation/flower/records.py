"""Population-level arrays <-> Flower ``ArrayRecord`` (float64, bit-exact).

``flwr.app.Array`` stores an array with ``numpy.save`` (never pickled), so a
float64 payload crosses the wire bit for bit: the Flower run and the in-process
engine sum the very same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from phems_clinical.federation.messages import MessageRejected


def arrays_to_record(arrays: Mapping[str, Any]) -> ArrayRecord:
    """An ``ArrayRecord`` of float64 copies of ``arrays`` (a payload or a
    broadcast)."""
    return ArrayRecord({name: Array(np.array(value, dtype=np.float64, order="C"))
                        for name, value in arrays.items()})


def record_to_arrays(record: ArrayRecord,
                     spec: Mapping[str, tuple[int, ...]] | None = None
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
                raise MessageRejected(f"{name}: shape {arrays[name].shape}, expected "
                                      f"{tuple(shape)}")
    return arrays


__all__ = ["arrays_to_record", "record_to_arrays"]
