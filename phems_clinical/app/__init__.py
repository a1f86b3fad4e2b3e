"""The ``phems`` command line and the clinic's web app (the top layer).

By purpose: the command line (``main``, ``build_parser`` and its error contract
``user_error_message`` / ``internal_error_message``;
:mod:`~phems_clinical.app.cli`); population fits (``run_fit``, ``FitFailedError``;
:mod:`~phems_clinical.app.fit`); the dosing tool's outputs (``run_dose``,
``write_dose_outputs``, ``DoseOutput``; :mod:`~phems_clinical.app.dose`);
federated runs (``run_federate``); anonymised and synthetic derivations of a use
case's table (``load_use_case``; :mod:`~phems_clinical.app.derive`); the web app
(``create_app``; :mod:`~phems_clinical.app.web`). Names are imported from their
submodules on first use (:func:`phems_clinical.lazy_exports`): ``phems --help``
loads neither JAX nor pandas.
"""

from phems_clinical import lazy_exports

_EXPORTS = {
    ".cli": ("build_parser", "internal_error_message", "main", "user_error_message"),
    ".derive": ("load_use_case",),
    ".dose": ("DoseOutput", "run_dose", "write_dose_outputs"),
    ".federate": ("run_federate",),
    ".fit": ("FitFailedError", "run_fit"),
    ".web": ("create_app",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "DoseOutput",
    "FitFailedError",
    "build_parser",
    "create_app",
    "internal_error_message",
    "load_use_case",
    "main",
    "run_dose",
    "run_federate",
    "run_fit",
    "user_error_message",
    "write_dose_outputs",
]
