"""The clinician's dosing tool as a use case (below ``phems_clinical.app``).

* :mod:`~phems_clinical.dosing.workflow`: a dosing request in, one result out
  (:func:`~phems_clinical.dosing.workflow.assess`): model and product, the
  acknowledgement of unverified model sections, covariates, range and level
  checks, assay conversion, the individual fit, summaries and regimens;
* :mod:`~phems_clinical.dosing.wording`: every text and number shown in the three
  views (command line, report, web page), built once into ``result["display"]``;
* :mod:`~phems_clinical.dosing.assay`: one-stage/chromogenic conversion of measured
  levels to the model's assay;
* :mod:`~phems_clinical.dosing.regimens`: the regimen designer;
* :mod:`~phems_clinical.dosing.history`: a clinic's local store of assessments.

Submodules are imported on use (``import phems_clinical.dosing`` loads nothing
heavy).
"""
