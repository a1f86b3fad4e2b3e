"""The runner's tasks now live with their use case (:mod:`phems_clinical.usecases`,
``UseCase.task``); these names are re-exported until their last users move."""

from __future__ import annotations

from phems_clinical import usecases
from phems_clinical.usecases.task import (
    Fitted,
    Problem,
    Task,
    flat_estimates,
    stack_sites,
)

__all__ = ["Fitted", "Problem", "Task", "flat_estimates", "get_task", "stack_sites"]


def get_task(use_case: str) -> Task:
    """The task of ``use_case`` (:func:`phems_clinical.usecases.get`)."""
    return usecases.get(use_case).task
