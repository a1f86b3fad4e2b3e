"""phems_clinical: federated, privacy-preserving clinical models for paediatric hospitals.

Subpackages, in import order (imports flow one way):
``data`` -> ``pk`` -> (federation, evaluation: later) -> ``app``.
"""

__version__ = "0.1.0"
