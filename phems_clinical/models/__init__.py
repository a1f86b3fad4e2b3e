"""Sepsis and cardiac-pathway models and the clinical scores (Phoenix, pSOFA).

* :mod:`phems_clinical.models.scores`: Phoenix Sepsis Score, Phoenix-8, pSOFA and
  PELOD-2 from the hourly PICU table (``phoenix``, ``phoenix8``, ``psofa``,
  ``pelod2``, ``sepsis_onset``, ``suspected_infection``, ``ScoreInputError``).
* :mod:`phems_clinical.models.sepsis_features`: model inputs from the hourly table
  (``build_site``, ``feature_names``, ``feature_stats``, ``FeatureStats``,
  ``SepsisInputError``).
* :mod:`phems_clinical.models.sepsis`: sepsis prediction (regularised logistic model
  on windowed features; temporal-convolution model on the hourly sequence).
* :mod:`phems_clinical.models.multistate`: cardiac pathways as a multi-state model
  with piecewise-constant transition hazards (``MultistateSpec``,
  ``DEFAULT_SPEC``, ``EpisodeExamples``).

Both models offer the same verbs (``init_params``, ``make_loss``, ``fit``...), so
these are used through their module: ``from phems_clinical.models import sepsis``.
Names are imported from their submodules on first use
(:func:`phems_clinical.lazy_exports`).
"""

from phems_clinical import lazy_exports

_EXPORTS = {
    ".multistate": ("DEFAULT_SPEC", "EpisodeExamples", "MultistateSpec"),
    ".scores": (
        "ScoreInputError",
        "pelod2",
        "phoenix",
        "phoenix8",
        "psofa",
        "sepsis_onset",
        "suspected_infection",
    ),
    ".sepsis_features": (
        "FeatureStats",
        "SepsisInputError",
        "build_site",
        "feature_names",
        "feature_stats",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "DEFAULT_SPEC",
    "EpisodeExamples",
    "FeatureStats",
    "MultistateSpec",
    "ScoreInputError",
    "SepsisInputError",
    "build_site",
    "feature_names",
    "feature_stats",
    "pelod2",
    "phoenix",
    "phoenix8",
    "psofa",
    "sepsis_onset",
    "suspected_infection",
]
