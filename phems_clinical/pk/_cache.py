"""One cache of compiled functions per population-model object.

``PopModel`` holds arrays, so it is not hashable; estimators key their compiled
functions on ``id(model)`` and keep the model alive in the cache so that the id
stays unique. Reusing the same model object therefore reuses compiled code (warm
fits); a new model object compiles afresh.

With ``persist=True`` the jitted functions that ``build`` returns are also kept
between processes (:mod:`phems_clinical.pk.export_cache`): a new process, or a new
model object with the same specification, loads the traced program instead of
tracing it again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from phems_clinical.pk.spec import PopModel

_CACHE: dict[tuple, tuple[PopModel, Any]] = {}
_MAX_ENTRIES = 64


def per_model(
    model: PopModel, tag: tuple, build: Callable[[], Any], *, persist: bool = False
) -> Any:
    """``build()`` once per ``(model object, tag)``; later calls return the result.

    ``persist``: ``build()`` returns a jitted function (or a tuple of them) of
    positional array arguments, which is wrapped by
    :func:`~phems_clinical.pk.export_cache.persistent` (``tag`` must then name
    everything, beyond the model and the argument shapes, that the program
    depends on)."""
    key = (id(model), *tag)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    if len(_CACHE) >= _MAX_ENTRIES:
        _CACHE.pop(next(iter(_CACHE)))
    value = build()
    if persist:
        from phems_clinical.pk.export_cache import persistent

        value = persistent(value, model, tag)
    _CACHE[key] = (model, value)
    return value
