"""Sepsis and cardiac-pathway models and the clinical scores (Phoenix, pSOFA).

* :mod:`phems_clinical.models.scores`: Phoenix Sepsis Score, Phoenix-8 and pSOFA from
  the hourly PICU table.
* :mod:`phems_clinical.models.sepsis`: sepsis prediction (regularised logistic model on
  windowed features; temporal-convolution model on the hourly sequence).
* :mod:`phems_clinical.models.multistate`: cardiac pathways as a multi-state model with
  piecewise-constant transition hazards.
"""
