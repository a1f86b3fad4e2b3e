"""``phems dose``: one patient's PK curve and prophylaxis regimens from 2-3 levels.

The clinical work is :func:`phems_clinical.dosing.workflow.assess` (request in,
result, figure and report out); this module only calls it and writes the files.
:func:`run_dose` is the entry point of the command line and the web app;
:func:`write_dose_outputs` writes ``result.json``, ``curve.png`` and
``report.html`` through :func:`phems_clinical.outputs.staged_dir`: all three files
or none, and an earlier patient's folder is never replaced without ``overwrite``.
"""

from __future__ import annotations

import json
from pathlib import Path

from phems_clinical.data.dosing_request import (
    DosingRequest,
    FieldError,
    RequestError,
)
from phems_clinical.dosing.workflow import METHODS, Assessment, assess
from phems_clinical.dosing.workflow import for_figure as _for_display  # noqa: F401  (app.cli redraws with it)
from phems_clinical.outputs import staged_dir

__all__ = [
    "METHODS",
    "DoseOutput",
    "FieldError",
    "RequestError",
    "redraw_dose",
    "run_dose",
    "write_dose_outputs",
]

#: ``result`` (``result.json`` with ``result["display"]``), ``curve_png`` and
#: ``report_html``.
DoseOutput = Assessment


def run_dose(
    request: DosingRequest | dict | str | bytes,
    *,
    method: str = "map",
    seed: int | None = None,
    previous: dict | None = None,
) -> DoseOutput:
    """One patient's assessment: :func:`phems_clinical.dosing.workflow.assess`.

    ``previous`` is an earlier result of the same patient, shown beside this one.
    Raises :class:`RequestError` naming the field of every problem with the input.
    """
    return assess(request, method=method, seed=seed, previous=previous)


def redraw_dose(result: dict, previous: dict | None = None) -> DoseOutput:
    """A stored result's figure and report, redrawn (with ``previous`` beside
    it): :func:`phems_clinical.dosing.workflow.redraw`."""
    from phems_clinical.dosing.workflow import redraw

    return redraw(result, previous)


def write_dose_outputs(
    output: DoseOutput, out_dir: str | Path, *, overwrite: bool = False
) -> list[Path]:
    """Write ``result.json``, ``curve.png`` and ``report.html`` into ``out_dir``.

    All three or none: they are written into a temporary sibling folder that is
    renamed to ``out_dir`` at the end (:func:`phems_clinical.outputs.staged_dir`).
    A non-empty ``out_dir`` (e.g. the previous patient's report) is refused with
    :class:`~phems_clinical.outputs.OutputExistsError` naming ``--out`` unless
    ``overwrite``, and then replaced as a whole.
    """
    names = ("result.json", "curve.png", "report.html")
    text = json.dumps(output.result, indent=2, allow_nan=False)
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / names[0]).write_text(text, encoding="utf-8")
        (tmp / names[1]).write_bytes(output.curve_png)
        (tmp / names[2]).write_text(output.report_html, encoding="utf-8")
    return [Path(out_dir) / n for n in names]
