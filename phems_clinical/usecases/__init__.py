"""The use cases, one module each: :mod:`.haemophilia`, :mod:`.picu`,
:mod:`.cardiac`.

Each module defines one :class:`UseCase` object, ``USE_CASE``, that owns what
the rest of the suite needs to know about the use case: its OMOP loader and
simulators, the roles of its analysis table for the anonymiser, its patient
profile and the attack columns, its synthetic generator and utility metrics, and
the runner's :class:`~phems_clinical.usecases.task.Task`. The layers below
(data, models, privacy, federation, evaluation) receive the object or its parts
as arguments and never branch on a use case's name; ``phems run`` and the
``phems`` commands above ask :func:`get`.

Adding a use case: a module ``phems_clinical/usecases/<name>.py`` with its
``USE_CASE`` (found by its file name) and its configs (``configs/use_case``,
``configs/model``, ``configs/experiment``); :func:`registered` adds one for a
while (tests).

Importing this package loads no heavy library; :func:`get` imports the module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from phems_clinical.usecases.base import UseCase, UseCaseError

__all__ = ["BUILTIN", "UseCase", "UseCaseError", "get", "names", "registered"]

#: The first use cases, in the order the commands list them; any other module of
#: this package (not a helper below) is a use case too, listed after them.
BUILTIN: tuple[str, ...] = ("haemophilia", "picu", "cardiac")
#: Modules of this package that are not use cases.
HELPERS = frozenset({"base", "task", "omop_sites"})


@cache
def _modules() -> tuple[str, ...]:
    """Use-case modules of this package (file names only; nothing imported)."""
    found = {
        m.name
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_") and m.name not in HELPERS
    }
    return tuple(n for n in BUILTIN if n in found) + tuple(sorted(found - set(BUILTIN)))


_EXTRA: dict[str, UseCase] = {}


def names() -> tuple[str, ...]:
    """The names of every use case (this package's modules, then any
    registered)."""
    return _modules() + tuple(n for n in _EXTRA if n not in _modules())


def get(name: str | UseCase) -> UseCase:
    """The :class:`UseCase` called ``name`` (or ``name`` itself); an unknown name
    is a :class:`UseCaseError` listing the valid ones."""
    if isinstance(name, UseCase):
        return name
    if name in _EXTRA:
        return _EXTRA[name]
    if not isinstance(name, str) or name not in _modules():
        raise UseCaseError(f"use_case: {name!r} is not one of {', '.join(names())}")
    uc = importlib.import_module(f"phems_clinical.usecases.{name}").USE_CASE
    if not isinstance(uc, UseCase) or uc.name != name:
        raise UseCaseError(
            f"phems_clinical.usecases.{name}.USE_CASE: expected the "
            f"UseCase named {name!r}"
        )
    return uc


@contextmanager
def registered(uc: UseCase) -> Iterator[UseCase]:
    """``uc`` known to :func:`get` and :func:`names` inside the ``with`` block only
    (a use case defined outside the package, e.g. in a test)."""
    if not isinstance(uc, UseCase):
        raise UseCaseError(f"registered: expected a UseCase, got {type(uc).__name__}")
    if uc.name in _modules() or uc.name in _EXTRA:
        raise UseCaseError(f"use case {uc.name!r} is already registered")
    _EXTRA[uc.name] = uc
    try:
        yield uc
    finally:
        _EXTRA.pop(uc.name, None)
