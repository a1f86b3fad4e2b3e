"""Privacy of derived data sets: anonymity checks,
re-identification risk and utility-loss metrics (:mod:`.anonymity`), paediatric
generalisation hierarchies (:mod:`.hierarchies`), per-patient date shifting
(:mod:`.dates`), full-domain lattice search and Mondrian (:mod:`.search`), the
Gaussian copula synthesiser (:mod:`.synth`), fidelity metrics (:mod:`.fidelity`)
and privacy attacks by the anonymeter method (:mod:`.attacks`). ``privacy``
depends only on ``data``. The date hierarchy is
:func:`phems_clinical.privacy.hierarchies.dates` (not re-exported here, where the
name is the :mod:`.dates` module)."""

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
from phems_clinical.privacy.dates import (
    DateShiftError,
    already_shifted,
    shift_dates,
)
from phems_clinical.privacy.hierarchies import (
    Hierarchy,
    HierarchyError,
    categorical,
    check_covers,
    check_nested,
    height_cm,
    ich_e11_age,
    interval,
    paediatric_age,
    weight_kg,
)
from phems_clinical.privacy.search import (
    AnonymisationResult,
    SearchError,
    lattice_search,
    mondrian,
)

__all__ = [
    "AnonymisationResult", "SearchError", "lattice_search", "mondrian",
    "DateShiftError", "Hierarchy", "HierarchyError", "already_shifted",
    "categorical", "check_covers", "check_nested", "height_cm",
    "ich_e11_age", "interval", "paediatric_age", "shift_dates", "weight_kg",
    "DEFAULT_RISK_THRESHOLD", "AnonymityInputError", "anonymity_report",
    "average_class_size", "discernibility", "equivalence_classes",
    "generalisation_loss", "journalist_risk", "k_anonymity", "l_diversity",
    "marketer_risk", "prosecutor_risk", "suppressed_share", "t_closeness",
]
