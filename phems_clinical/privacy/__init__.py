"""Privacy of derived data sets (issue 6): anonymity checks, re-identification risk
and utility-loss metrics (:mod:`phems_clinical.privacy.anonymity`)."""

from phems_clinical.privacy.anonymity import (
    DEFAULT_RISK_THRESHOLD,
    AnonymityInputError,
    anonymity_report,
    average_class_size,
    discernibility,
    equivalence_classes,
    generalisation_loss,
    journalist_risk,
    k_anonymity,
    l_diversity,
    marketer_risk,
    prosecutor_risk,
    suppressed_share,
    t_closeness,
)

__all__ = [
    "DEFAULT_RISK_THRESHOLD", "AnonymityInputError", "anonymity_report",
    "average_class_size", "discernibility", "equivalence_classes",
    "generalisation_loss", "journalist_risk", "k_anonymity", "l_diversity",
    "marketer_risk", "prosecutor_risk", "suppressed_share", "t_closeness",
]
