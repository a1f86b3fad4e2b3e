"""The clinician's dosing tool as a use case (below ``phems_clinical.app``).

* :mod:`~phems_clinical.dosing.workflow`: a dosing request in, one result out
  (``assess``, ``Assessment``, ``METHODS``, ``redraw``,
  ``requires_acknowledgement``): model and product, the acknowledgement of
  unverified model sections, covariates, range and level checks, assay
  conversion, the individual fit, summaries and regimens;
* :mod:`~phems_clinical.dosing.wording`: every text and number shown in the three
  views (command line, report, web page), built once into ``result["display"]``
  (``display``, ``as_text``);
* :mod:`~phems_clinical.dosing.assay`: one-stage/chromogenic conversion of
  measured levels to the model's assay (``conversion``);
* :mod:`~phems_clinical.dosing.regimens`: the regimen designer
  (``design_regimens``, ``evaluate_regimen``, ``parse_schedule``, ``Schedule``);
* :mod:`~phems_clinical.dosing.history`: a clinic's local store of assessments
  (``open_store``, ``save_assessment``, ``list_patients``, ``StoreError``).

Names are imported from their submodules on first use
(:func:`phems_clinical.lazy_exports`): ``import phems_clinical.dosing`` loads
nothing heavy.
"""

from phems_clinical import lazy_exports

_EXPORTS = {
    ".assay": ("conversion",),
    ".history": ("StoreError", "list_patients", "open_store", "save_assessment"),
    ".regimens": ("Schedule", "design_regimens", "evaluate_regimen", "parse_schedule"),
    ".wording": ("as_text", "display"),
    ".workflow": (
        "METHODS",
        "Assessment",
        "assess",
        "redraw",
        "requires_acknowledgement",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "Assessment",
    "METHODS",
    "Schedule",
    "StoreError",
    "as_text",
    "assess",
    "conversion",
    "design_regimens",
    "display",
    "evaluate_regimen",
    "list_patients",
    "open_store",
    "parse_schedule",
    "redraw",
    "requires_acknowledgement",
    "save_assessment",
]
