"""Privacy of derived data sets.

By purpose: anonymity checks, re-identification risk and utility-loss metrics
(``k_anonymity``, ``l_diversity``, ``t_closeness``, ``prosecutor_risk``,
``anonymity_report``; :mod:`.anonymity`); paediatric generalisation hierarchies
(``paediatric_age``, ``height_cm``, ``weight_kg``, ``interval``, ``categorical``;
:mod:`.hierarchies`); per-patient date shifting (``shift_dates``,
``shift_tables``, ``draw_shifts``; :mod:`.dates`); full-domain lattice search and
Mondrian (``lattice_search``, ``mondrian``; :mod:`.search`); microaggregation
(``mdav``, ``microaggregate``); perturbation of longitudinal values
(``perturb_longitudinal``, ``additive_noise``, ``multiplicative_noise``); the
release pipeline (``anonymise``, ``anonymise_longitudinal``, ``Roles``,
``check_table``); the target-risk search (``search_target_risk``,
``default_ladder``); fidelity metrics (``column_fidelity``, ``pairwise_fidelity``,
``pmse``, ``pmse_ratio``, ``detection_auc``; :mod:`.fidelity`); privacy attacks by
the anonymeter method (``singling_out_risk``, ``linkability_risk``,
``inference_risk``, ``membership_inference``; :mod:`.attacks`); the operating
system's generator for privacy randomness (``secret_generator``, ``new_secret``;
:mod:`.secret_rng`). The synthesisers are in :mod:`.synth`. ``privacy`` depends
only on ``data``. The date hierarchy is
:func:`phems_clinical.privacy.hierarchies.dates` (not re-exported here, where the
name is the :mod:`.dates` module). The anonymity, hierarchy, date and search
names are imported with the package; the others on first use
(:func:`phems_clinical.lazy_exports`)."""

from phems_clinical import lazy_exports
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

_EXPORTS = {
    ".attacks": (
        "inference_risk",
        "linkability_risk",
        "membership_inference",
        "residual_risk",
        "singling_out_risk",
    ),
    ".dates": ("draw_shifts", "shift_tables"),
    ".fidelity": (
        "FidelityInputError",
        "column_fidelity",
        "cramers_v",
        "detection_auc",
        "fidelity_summary",
        "logistic_transfer",
        "pairwise_fidelity",
        "pmse",
        "pmse_ratio",
        "total_variation",
    ),
    ".hierarchies": ("lifespan_age", "suppress_only"),
    ".microaggregation": ("MicroaggregationError", "mdav", "microaggregate"),
    ".perturb": (
        "LongitudinalRoles",
        "PerturbError",
        "ValueColumn",
        "additive_noise",
        "coarsen",
        "multiplicative_noise",
        "perturb_longitudinal",
    ),
    ".release": (
        "AnonymiseError",
        "Roles",
        "anonymise",
        "anonymise_longitudinal",
        "check_table",
        "patient_table",
    ),
    ".search": ("generalise",),
    ".secret_rng": ("new_secret", "secret_generator"),
    ".target_risk": (
        "Setting",
        "TargetRiskError",
        "default_ladder",
        "search_target_risk",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "AnonymisationResult",
    "AnonymiseError",
    "AnonymityInputError",
    "DEFAULT_RISK_THRESHOLD",
    "DateShiftError",
    "FidelityInputError",
    "Hierarchy",
    "HierarchyError",
    "LongitudinalRoles",
    "MicroaggregationError",
    "PerturbError",
    "Roles",
    "SearchError",
    "Setting",
    "TargetRiskError",
    "ValueColumn",
    "additive_noise",
    "already_shifted",
    "anonymise",
    "anonymise_longitudinal",
    "anonymity_report",
    "average_class_size",
    "categorical",
    "check_covers",
    "check_nested",
    "check_table",
    "coarsen",
    "column_fidelity",
    "cramers_v",
    "default_ladder",
    "detection_auc",
    "discernibility",
    "draw_shifts",
    "equivalence_classes",
    "fidelity_summary",
    "generalisation_loss",
    "generalise",
    "height_cm",
    "ich_e11_age",
    "inference_risk",
    "interval",
    "journalist_risk",
    "k_anonymity",
    "l_diversity",
    "lattice_search",
    "lifespan_age",
    "linkability_risk",
    "logistic_transfer",
    "marketer_risk",
    "mdav",
    "membership_inference",
    "microaggregate",
    "mondrian",
    "multiplicative_noise",
    "new_secret",
    "paediatric_age",
    "pairwise_fidelity",
    "patient_table",
    "perturb_longitudinal",
    "pmse",
    "pmse_ratio",
    "prosecutor_risk",
    "residual_risk",
    "search_target_risk",
    "secret_generator",
    "shift_dates",
    "shift_tables",
    "singling_out_risk",
    "suppress_only",
    "suppressed_share",
    "t_closeness",
    "total_variation",
    "weight_kg",
]
