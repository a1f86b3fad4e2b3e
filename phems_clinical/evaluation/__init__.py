"""Evaluation of models and derived data: real, anonymised and synthetic sources
compared side by side.

By purpose: the derived sources of an experiment (``SourceSpec``,
``default_sources``, ``derive``, ``split_patients``, ``score_sources``;
:mod:`~phems_clinical.evaluation.sources`); the privacy scorecard (``Score``,
``build_scorecard``, ``pooled_risk``, ``utility_scores``, ``write_scorecard``,
``render_scorecard_html``, ``rank_sources``); utility metrics per use case
(``sepsis_utility``, ``cardiac_utility``, ``pk_forecast_accuracy``,
``pk_parameter_bias``; :mod:`~phems_clinical.evaluation.utility`); patient
profiles (``profile``, ``pk_profile``, ``picu_profile``, ``cardiac_profile``);
survival references (``aalen_johansen_multistate``); figures (``gof_figure``,
``vpc_figure``, ``band_figure``, ``covariate_figure``, ``occupation_figure``,
``risk_utility_map``) and the HTML report (``render_report``, ``curve_figure``).
The per-use-case evaluations are used as modules
(:mod:`~phems_clinical.evaluation.sepsis_eval`,
:mod:`~phems_clinical.evaluation.cardiac_eval`). Names are imported from their
submodules on first use (:func:`phems_clinical.lazy_exports`).
"""

from phems_clinical import lazy_exports

_EXPORTS = {
    ".plots": (
        "band_figure",
        "covariate_figure",
        "gof_figure",
        "occupation_figure",
        "risk_utility_map",
        "spread_figure",
        "vpc_figure",
    ),
    ".profiles": ("cardiac_profile", "picu_profile", "pk_profile", "profile"),
    ".report": ("curve_figure", "render_report"),
    ".scorecard": (
        "RISK_THRESHOLD",
        "Score",
        "ScorecardInputError",
        "as_score",
        "build_scorecard",
        "pooled_risk",
        "utility_scores",
    ),
    ".scorecard_report": (
        "rank_sources",
        "render_scorecard_html",
        "utility_loss",
        "worst_attack",
        "write_scorecard",
    ),
    ".sources": (
        "SourceError",
        "SourceSpec",
        "TARGET_RISKS",
        "default_sources",
        "derive",
        "profile_domain",
        "score_sources",
        "split_patients",
    ),
    ".survival": ("aalen_johansen_multistate",),
    ".utility": (
        "UtilityInputError",
        "cardiac_utility",
        "pk_forecast_accuracy",
        "pk_parameter_bias",
        "sepsis_utility",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "RISK_THRESHOLD",
    "Score",
    "ScorecardInputError",
    "SourceError",
    "SourceSpec",
    "TARGET_RISKS",
    "UtilityInputError",
    "aalen_johansen_multistate",
    "as_score",
    "band_figure",
    "build_scorecard",
    "cardiac_profile",
    "cardiac_utility",
    "covariate_figure",
    "curve_figure",
    "default_sources",
    "derive",
    "gof_figure",
    "occupation_figure",
    "picu_profile",
    "pk_forecast_accuracy",
    "pk_parameter_bias",
    "pk_profile",
    "pooled_risk",
    "profile",
    "profile_domain",
    "rank_sources",
    "render_report",
    "render_scorecard_html",
    "risk_utility_map",
    "score_sources",
    "sepsis_utility",
    "split_patients",
    "spread_figure",
    "utility_loss",
    "utility_scores",
    "vpc_figure",
    "worst_attack",
    "write_scorecard",
]
