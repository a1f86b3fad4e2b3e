"""One scorecard for every data source: real, anonymised and synthetic.

Every source is scored with the same metrics, in three groups:

* **fidelity**: how closely the derived table resembles the real one
  (:mod:`phems_clinical.privacy.fidelity`);
* **utility**: how well analyses run on the source reproduce those run on real data
  (train on the source, test on held-out real data; popPK bias; forecast accuracy).
  These numbers come from the model code and are plugged in by name;
* **privacy**: residual disclosure risk, by attacks with attack and control sets
  (anonymeter method, :mod:`phems_clinical.privacy.attacks`), membership inference,
  distance to the closest record (secondary) and, for anonymised tables, k, l, t and
  re-identification risk (:mod:`phems_clinical.privacy.anonymity`).

The scorecard is an :class:`xarray.Dataset` with dims ``("source", "metric")`` and
data variables ``value``, ``ci_low``, ``ci_high`` (NaN where a metric does not apply
to a source, or where no interval exists). Each metric carries its group, direction,
target, acceptance band, plain-language caption and reference as coordinates, and
each source its kind, generator, differential-privacy (epsilon, delta) and unit of
privacy, so the file is self-describing and round-trips through netCDF
(``engine="h5netcdf"``). :func:`assess` turns the acceptance bands into per-cell
flags; :mod:`phems_clinical.evaluation.scorecard_report` renders them as HTML.

Metric registry
---------------
:data:`METRICS` maps a metric name to a :class:`MetricSpec`. A name of the form
``prefix_<param>`` is a pattern: ``pk_bias_cl`` and ``pk_bias_v1`` both use the
``pk_bias_<param>`` entry, with the parameter named in the caption. Names that are
not registered raise :class:`UnknownMetricError`; a caller with a metric of its own
passes its :class:`MetricSpec` in ``extra_metrics`` (explicit, so nothing reaches a
data controller without a caption and a target).

Acceptance bands: ``bound="absolute"`` flags a value outside ``[lower, upper]``;
``bound="relative_to_real"`` flags ``value - value_of_the_real_source`` outside
``[lower, upper]`` (the first source of kind ``"real"`` is the reference);
``bound="none"`` shows the value without a flag. Where no published threshold
exists, the band is ours and the reference says so.

References
----------
* EMA Policy 0070 external guidance (EMA/90915/2016, 2018) and Health Canada: 0.09
  re-identification risk threshold; applied to synthetic data by El Emam, Mosquera,
  Hoptroff, JMIR 2020;22:e23139.
* Giomi et al., "A Unified Framework for Quantifying Privacy Risk in Synthetic Data",
  PoPETs 2023(2):312-328 (anonymeter): singling-out, linkability, inference risk.
* Stadler, Oprisanu & Troncoso, USENIX Security 2022: membership inference, AUC 0.5.
* Snoke, Raab, Nowok, Dibben & Slavkovic, JRSS-A 2018;181(3):663-688: pMSE ratio 1.
* Rankin et al., JMIR Med Inform 2020;8:e18910: train-synthetic-test-real deltas.
* SDMetrics documentation (https://docs.sdv.dev/sdmetrics): Column Shapes, Column
  Pair Trends, MissingValueSimilarity.
* The popPK bias band (< 20 %) is ours, as no published popPK fit on derived data
  exists.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version
from numbers import Real
from typing import NamedTuple

import jax
import numpy as np
import pandas as pd
import xarray as xr

from phems_clinical.privacy import anonymity as _anon
from phems_clinical.privacy import attacks as _attacks
from phems_clinical.privacy import fidelity as _fid
from phems_clinical.rng import numpy_generator

__all__ = [
    "GROUPS",
    "KINDS",
    "METRICS",
    "FIDELITY_METRICS",
    "MetricSpec",
    "Score",
    "ScorecardInputError",
    "UnknownMetricError",
    "anonymity_scores",
    "as_score",
    "assess",
    "build_scorecard",
    "fidelity_scores",
    "metric_spec",
    "target_text",
    "utility_scores",
    "pooled_risk",
    "privacy_scores",
]

GROUPS = ("fidelity", "utility", "privacy")
KINDS = ("real", "anonymised", "synthetic")
_BETTER = ("higher", "lower", "closer_to_target")
_BOUNDS = ("absolute", "relative_to_real", "none")
_INF = math.inf
_NAN = math.nan

#: Re-identification risk threshold (EMA Policy 0070, EMA/90915/2016).
RISK_THRESHOLD = _anon.DEFAULT_RISK_THRESHOLD

_EMA = (
    "EMA Policy 0070 (EMA/90915/2016) and Health Canada: risk threshold 0.09; "
    "applied to synthetic data by El Emam et al., JMIR 2020;22:e23139"
)
_ANONYMETER = (
    "Giomi et al., PoPETs 2023(2):312-328 (anonymeter method); threshold: " + _EMA
)
_OURS = "flag limit is ours (no published threshold)"
_RANKIN = (
    "Rankin et al., JMIR Med Inform 2020;8:e18910 (synthetic-trained models "
    "typically 0.06-0.19 worse); flag limit is ours"
)


class ScorecardInputError(ValueError):
    """Scores or source metadata that cannot be put on a scorecard."""


class UnknownMetricError(ScorecardInputError):
    """A metric name that is not in :data:`METRICS` nor in ``extra_metrics``."""


class Score(NamedTuple):
    """One scorecard cell: the value, its 95 % interval (NaN when none), the
    sample size ``n`` the interval rests on (attacks, patients; NaN unknown) and,
    when the metric cannot tell good from bad at this size, why
    (``uninformative``; empty when it can). An anonymeter-style risk also keeps
    its counts: ``successes`` of the ``n`` attacks on training targets and
    ``control_successes`` of the ``n`` on control targets (NaN otherwise), so
    that releases of one mechanism can be pooled (:func:`pooled_risk`)."""

    value: float
    ci_low: float = _NAN
    ci_high: float = _NAN
    n: float = _NAN
    uninformative: str = ""
    successes: float = _NAN
    control_successes: float = _NAN


class MetricSpec(NamedTuple):
    """What a metric means and when it is flagged.

    ``group`` in :data:`GROUPS`; ``better`` in ``higher``/``lower``/
    ``closer_to_target``; ``target`` the ideal value (NaN: the real source's
    value); ``lower``/``upper`` the acceptance band (see ``bound``: ``absolute``,
    ``relative_to_real`` or ``none``); ``label`` a short name; ``caption`` one
    plain-language sentence for a data controller; ``reference`` the source of the
    target and band; ``exact``: the value is a property of the released table
    itself (k, l, t, prosecutor risk), not an estimate, so it needs no interval.
    """

    group: str
    better: str
    target: float
    lower: float
    upper: float
    bound: str
    label: str
    caption: str
    reference: str
    exact: bool = False


def _m(
    group, better, target, lower, upper, bound, label, caption, reference, exact=False
):
    return MetricSpec(
        group,
        better,
        float(target),
        float(lower),
        float(upper),
        bound,
        label,
        caption,
        reference,
        bool(exact),
    )


#: Metric registry, in display order within each group.
METRICS: dict[str, MetricSpec] = {
    # ------------------------------------------------------------------ fidelity
    "column_shapes": _m(
        "fidelity",
        "higher",
        1.0,
        0.9,
        _INF,
        "absolute",
        "Column shapes",
        "How closely each column's distribution matches the real data, averaged "
        "over columns (1 minus the Kolmogorov-Smirnov distance for numbers or the "
        "total variation distance for categories; 1 = identical).",
        "SDMetrics Column Shapes (KSComplement/TVComplement); " + _OURS,
    ),
    "max_column_statistic": _m(
        "fidelity",
        "lower",
        0.0,
        -_INF,
        0.2,
        "absolute",
        "Worst column",
        "Largest difference between the real and the derived distribution of any "
        "single column (Kolmogorov-Smirnov or total variation distance; 0 = "
        "identical, 1 = no overlap).",
        "Kolmogorov-Smirnov / total variation distance; " + _OURS,
    ),
    "mean_missing_diff": _m(
        "fidelity",
        "lower",
        0.0,
        -_INF,
        0.05,
        "absolute",
        "Missing values",
        "Average difference between real and derived data in the share of missing "
        "values per column (0.05 = 5 percentage points).",
        "SDMetrics MissingValueSimilarity; " + _OURS,
    ),
    "pair_trends": _m(
        "fidelity",
        "higher",
        1.0,
        0.9,
        _INF,
        "absolute",
        "Relationships",
        "How well relationships between pairs of columns are kept (correlations "
        "and contingency tables; 1 = all relationships as in the real data).",
        "SDMetrics Column Pair Trends (CorrelationSimilarity, "
        "ContingencySimilarity); " + _OURS,
    ),
    "mean_abs_diff": _m(
        "fidelity",
        "lower",
        0.0,
        -_INF,
        0.1,
        "absolute",
        "Pair differences",
        "Average change in the association between pairs of columns (Pearson "
        "correlation or Cramer's V; 0 = unchanged).",
        "SDMetrics Column Pair Trends (CorrelationSimilarity); " + _OURS,
    ),
    "mean_abs_diff_pearson": _m(
        "fidelity",
        "lower",
        0.0,
        -_INF,
        0.1,
        "absolute",
        "Numeric correlations",
        "Average change in the correlation between pairs of numeric columns "
        "(Pearson r; 0 = unchanged, 0.1 = correlations off by 0.1 on average).",
        "SDMetrics CorrelationSimilarity; " + _OURS,
    ),
    "mean_abs_diff_cramers_v": _m(
        "fidelity",
        "lower",
        0.0,
        -_INF,
        0.1,
        "absolute",
        "Category associations",
        "Average change in the association between pairs of columns involving a "
        "category (Cramer's V; 0 = unchanged).",
        "Cramer's V (Cramer, Mathematical Methods of Statistics, 1946); " + _OURS,
    ),
    "detection_auc": _m(
        "fidelity",
        "closer_to_target",
        0.5,
        -_INF,
        0.6,
        "absolute",
        "Detectability",
        "How well a classifier tells derived records from real ones (0.5 = it "
        "cannot tell them apart, 1 = it always can).",
        "Target 0.5: Snoke et al., JRSS-A 2018;181(3):663-688; synthgauge docs; "
        + _OURS,
    ),
    "pmse_ratio_perm": _m(
        "fidelity",
        "closer_to_target",
        1.0,
        -_INF,
        3.0,
        "absolute",
        "Propensity score (pMSE ratio)",
        "Propensity mean squared error divided by its value for indistinguishable "
        "data (1 = indistinguishable; larger = easier to tell derived from real "
        "records).",
        "Snoke, Raab, Nowok, Dibben & Slavkovic, JRSS-A 2018;181:663-688, "
        "permutation null; target 1; " + _OURS,
    ),
    "pmse_ratio": _m(
        "fidelity",
        "closer_to_target",
        1.0,
        _NAN,
        _NAN,
        "none",
        "pMSE ratio (published null)",
        "Propensity mean squared error divided by the published null value; for "
        "two samples of one distribution it centres at 1/(1 - share of derived "
        "rows), i.e. 2 for equal sizes, so no flag is set.",
        "Snoke et al., JRSS-A 2018;181:663-688; see phems_clinical.privacy.fidelity",
    ),
    "pmse": _m(
        "fidelity",
        "lower",
        0.0,
        _NAN,
        _NAN,
        "none",
        "pMSE",
        "Propensity mean squared error (0 = a classifier's predictions carry no "
        "information about which records are derived).",
        "Woo et al., J Priv Confid 2009; Snoke et al., JRSS-A 2018",
    ),
    # ------------------------------------------------------------------- utility
    "auroc": _m(
        "utility",
        "higher",
        _NAN,
        -0.05,
        _INF,
        "relative_to_real",
        "Sepsis model AUROC",
        "Sepsis model trained on this source and tested on held-out real "
        "patients: area under the ROC curve (0.5 = chance, 1 = perfect).",
        _RANKIN,
    ),
    "auprc": _m(
        "utility",
        "higher",
        _NAN,
        -0.05,
        _INF,
        "relative_to_real",
        "Sepsis model AUPRC",
        "Sepsis model trained on this source and tested on held-out real "
        "patients: area under the precision-recall curve (higher = better).",
        _RANKIN,
    ),
    "brier": _m(
        "utility",
        "lower",
        _NAN,
        -_INF,
        0.02,
        "relative_to_real",
        "Sepsis model Brier score",
        "Sepsis model trained on this source and tested on held-out real "
        "patients: mean squared error of the predicted probabilities (0 = "
        "perfect).",
        _RANKIN,
    ),
    "calibration_slope": _m(
        "utility",
        "closer_to_target",
        1.0,
        0.8,
        1.2,
        "absolute",
        "Sepsis model calibration slope",
        "Sepsis model trained on this source and tested on held-out real "
        "patients: calibration slope (1 = predicted risks neither too extreme "
        "nor too modest).",
        "Van Calster et al., J Clin Epidemiol 2016;74:167-176 (ideal 1); " + _OURS,
    ),
    "calibration_intercept": _m(
        "utility",
        "closer_to_target",
        0.0,
        _NAN,
        _NAN,
        "none",
        "Sepsis model calibration intercept",
        "Sepsis model trained on this source and tested on held-out real "
        "patients: whether predicted risks are too high (< 0) or too low (> 0) on "
        "average (0 = right on average).",
        "Van Calster et al., J Clin Epidemiol 2016;74:167-176 (ideal 0)",
    ),
    "ece": _m(
        "utility",
        "lower",
        _NAN,
        -_INF,
        0.02,
        "relative_to_real",
        "Sepsis model calibration error",
        "Sepsis model trained on this source and tested on held-out real "
        "patients: average gap between predicted and observed risk over 10 risk "
        "bins (0 = perfect).",
        "Naeini et al., AAAI 2015 (expected calibration error); " + _OURS,
    ),
    "sepsis_clinical_utility": _m(
        "utility",
        "higher",
        _NAN,
        -0.05,
        _INF,
        "relative_to_real",
        "Sepsis alarm utility",
        "Sepsis model trained on this source and tested on held-out real "
        "patients: PhysioNet 2019 clinical utility of its alarms (1 = ideal, 0 = "
        "no alarms).",
        "Reyna et al., Crit Care Med 2020;48:210-217 (PhysioNet/CinC 2019); " + _OURS,
    ),
    "c_index": _m(
        "utility",
        "higher",
        _NAN,
        -0.05,
        _INF,
        "relative_to_real",
        "Cardiac model C-index",
        "Cardiac pathway model fitted on this source and tested on held-out real "
        "patients: concordance of predicted risk with observed outcomes (0.5 = "
        "chance, 1 = perfect).",
        _RANKIN,
    ),
    "brier_death_30d": _m(
        "utility",
        "lower",
        _NAN,
        -_INF,
        0.02,
        "relative_to_real",
        "Cardiac 30-day death Brier score",
        "Cardiac pathway model fitted on this source and tested on held-out real "
        "patients: Brier score of the predicted 30-day death risk (0 = perfect).",
        _RANKIN,
    ),
    "brier_death_360d": _m(
        "utility",
        "lower",
        _NAN,
        -_INF,
        0.02,
        "relative_to_real",
        "Cardiac 1-year death Brier score",
        "Cardiac pathway model fitted on this source and tested on held-out real "
        "patients: Brier score of the predicted 1-year death risk (0 = perfect).",
        _RANKIN,
    ),
    "brier_readmit_30d": _m(
        "utility",
        "lower",
        _NAN,
        -_INF,
        0.02,
        "relative_to_real",
        "Cardiac 30-day readmission Brier score",
        "Cardiac pathway model fitted on this source and tested on held-out real "
        "patients: Brier score of the predicted 30-day readmission risk, death "
        "competing (0 = perfect).",
        _RANKIN,
    ),
    "brier_readmit_360d": _m(
        "utility",
        "lower",
        _NAN,
        -_INF,
        0.02,
        "relative_to_real",
        "Cardiac 1-year readmission Brier score",
        "Cardiac pathway model fitted on this source and tested on held-out real "
        "patients: Brier score of the predicted 1-year readmission risk, death "
        "competing (0 = perfect).",
        _RANKIN,
    ),
    "auroc_cicu_7d": _m(
        "utility",
        "higher",
        _NAN,
        -0.05,
        _INF,
        "relative_to_real",
        "Cardiac 7-day CICU AUROC",
        "Cardiac pathway model fitted on this source and tested on held-out real "
        "patients: AUROC for still being in cardiac intensive care at day 7.",
        _RANKIN,
    ),
    "pk_bias_<param>": _m(
        "utility",
        "closer_to_target",
        0.0,
        -0.2,
        0.2,
        "absolute",
        "PK bias <param>",
        "Relative bias of the population <param> estimated by the popPK model "
        "fitted on this source, compared with the fit on real data (0.1 = 10 % "
        "too high; 0 = no bias).",
        "acceptance |bias| < 20 % is ours (no published popPK fit on derived data)",
    ),
    "forecast_mdape": _m(
        "utility",
        "lower",
        _NAN,
        -_INF,
        5.0,
        "relative_to_real",
        "Forecast error (MDAPE, %)",
        "Dosing tool with its prior taken from this source: median absolute "
        "percentage error of the forecast factor level, in % (20 = 20 %).",
        "Sheiner & Beal, J Pharmacokinet Biopharm 1981;9:503-512 (prediction "
        "error); " + _OURS,
    ),
    "forecast_mdpe": _m(
        "utility",
        "closer_to_target",
        0.0,
        -20.0,
        20.0,
        "absolute",
        "Forecast bias (MDPE, %)",
        "Dosing tool with its prior taken from this source: median percentage "
        "error of the forecast factor level, in % (0 = unbiased; 10 = 10 % too "
        "high).",
        "Sheiner & Beal, J Pharmacokinet Biopharm 1981;9:503-512; " + _OURS,
    ),
    "forecast_within_20": _m(
        "utility",
        "higher",
        _NAN,
        -0.1,
        _INF,
        "relative_to_real",
        "Forecasts within 20 %",
        "Dosing tool with its prior taken from this source: share of forecast "
        "factor levels within 20 % of the measured level (1 = all).",
        _OURS,
    ),
    "suppressed_share": _m(
        "utility",
        "lower",
        0.0,
        -_INF,
        0.1,
        "absolute",
        "Records suppressed",
        "Share of patient records removed by the anonymisation (0.1 = 10 %).",
        "context-free anonymisation lost over a third of records in claims data "
        "(npj Digit Med 2026, doi:10.1038/s41746-026-02622-5); " + _OURS,
        exact=True,
    ),
    "generalisation_loss": _m(
        "utility",
        "lower",
        0.0,
        _NAN,
        _NAN,
        "none",
        "Generalisation loss",
        "How much the quasi-identifiers were coarsened, averaged over records and "
        "columns (0 = original detail, 1 = fully generalised).",
        "Sweeney, IJUFKS 2002;10(5):571-588 (1 - precision)",
        exact=True,
    ),
    # ------------------------------------------------------------------- privacy
    "singling_out_risk": _m(
        "privacy",
        "lower",
        0.0,
        -_INF,
        RISK_THRESHOLD,
        "absolute",
        "Singling-out risk (one value)",
        "Extra chance that an attacker can use this dataset to single out one "
        "real patient by a single distinctive value, compared with patients the "
        "dataset was not made from (0 = no better than for unseen patients, 1 = "
        "always).",
        _ANONYMETER,
    ),
    "singling_out_risk_multivariate": _m(
        "privacy",
        "lower",
        0.0,
        -_INF,
        RISK_THRESHOLD,
        "absolute",
        "Singling-out risk (combination)",
        "Extra chance that an attacker can use this dataset to single out one "
        "real patient by a combination of values such as age band, sex and "
        "weight, compared with patients the dataset was not made from (0 = no "
        "better than for unseen patients).",
        _ANONYMETER,
    ),
    "linkability_risk": _m(
        "privacy",
        "lower",
        0.0,
        -_INF,
        RISK_THRESHOLD,
        "absolute",
        "Linkability risk",
        "Extra chance that an attacker holding two separate pieces of a patient's "
        "record (for example demographics and measurements) can link them "
        "through this dataset, compared with patients the dataset was not made "
        "from (0 = no better than for unseen patients).",
        _ANONYMETER,
    ),
    "inference_risk": _m(
        "privacy",
        "lower",
        0.0,
        -_INF,
        RISK_THRESHOLD,
        "absolute",
        "Attribute-inference risk",
        "Extra chance that an attacker who knows some of a patient's details can "
        "correctly guess a sensitive value (for example the diagnosis) from this "
        "dataset, compared with patients the dataset was not made from (0 = no "
        "better than for unseen patients).",
        _ANONYMETER,
    ),
    "mia_auc": _m(
        "privacy",
        "closer_to_target",
        0.5,
        -_INF,
        0.6,
        "absolute",
        "Membership inference (AUC)",
        "How well an attacker can tell whether a given patient's record was used "
        "to build this dataset, from how close it lies to a released record (0.5 "
        "= cannot tell, 1 = always can).",
        "Target 0.5: Stadler, Oprisanu & Troncoso, USENIX Security 2022; " + _OURS,
    ),
    "dcr_share": _m(
        "privacy",
        "closer_to_target",
        0.5,
        -_INF,
        0.6,
        "absolute",
        "Closest-record share (secondary)",
        "Share of released records that lie closer to a patient used to build "
        "them than to a patient who was not used (0.5 = no closer). A secondary "
        "measure only: it can miss copied data.",
        "DCR can pass data open to membership inference ('The DCR Delusion', "
        "arXiv 2505.01524; Ganev & De Cristofaro, arXiv 2312.05114); " + _OURS,
    ),
    "k_anonymity": _m(
        "privacy",
        "higher",
        _NAN,
        12.0,
        _INF,
        "absolute",
        "k-anonymity",
        "Every released patient shares the combination of indirectly identifying "
        "values (such as age band, sex, weight band) with at least k-1 others; "
        "k is the smallest such group.",
        "Sweeney, IJUFKS 2002; 1/k <= 0.09 needs k >= 12 (" + _EMA + "; "
        "1/11 = 0.091 is often quoted as 0.09)",
        exact=True,
    ),
    "prosecutor_risk_max": _m(
        "privacy",
        "lower",
        0.0,
        -_INF,
        RISK_THRESHOLD,
        "absolute",
        "Re-identification risk (highest)",
        "Highest chance of re-identifying a patient for an attacker who knows the "
        "patient is in the data and knows the identifying values (1/k).",
        "El Emam, Guide to the De-identification of Personal Health Information, "
        "2013; " + _EMA,
        exact=True,
    ),
    "prosecutor_risk_mean": _m(
        "privacy",
        "lower",
        0.0,
        -_INF,
        RISK_THRESHOLD,
        "absolute",
        "Re-identification risk (average)",
        "Average over patients of the chance of re-identification for an "
        "attacker who knows the patient is in the data.",
        "El Emam 2013; " + _EMA,
        exact=True,
    ),
    "records_at_risk": _m(
        "privacy",
        "lower",
        0.0,
        -_INF,
        0.0,
        "absolute",
        "Records at risk",
        "Share of released patients whose re-identification risk is above 0.09 "
        "(0.05 = 5 %).",
        "El Emam 2013; " + _EMA,
        exact=True,
    ),
    "journalist_risk_max": _m(
        "privacy",
        "lower",
        0.0,
        -_INF,
        RISK_THRESHOLD,
        "absolute",
        "Re-identification risk (journalist)",
        "Highest chance of re-identifying a patient for an attacker who does not "
        "know whether the patient is in the data (uses population group sizes).",
        "El Emam 2013; " + _EMA,
        exact=True,
    ),
    "marketer_risk": _m(
        "privacy",
        "lower",
        0.0,
        -_INF,
        RISK_THRESHOLD,
        "absolute",
        "Re-identification risk (marketer)",
        "Expected share of patients an attacker would re-identify when trying to "
        "match everyone at once.",
        "El Emam 2013; " + _EMA,
        exact=True,
    ),
    "l_diversity": _m(
        "privacy",
        "higher",
        _NAN,
        2.0,
        _INF,
        "absolute",
        "l-diversity",
        "Smallest number of different sensitive values (for example diagnoses) "
        "within any group of patients who look alike; 1 means some group "
        "reveals its sensitive value.",
        "Machanavajjhala et al., ACM TKDD 2007;1(1):3 (l >= 2 avoids certain "
        "disclosure)",
        exact=True,
    ),
    "l_diversity_entropy": _m(
        "privacy",
        "higher",
        _NAN,
        2.0,
        _INF,
        "absolute",
        "Entropy l-diversity",
        "Like l-diversity, but counting how evenly the sensitive values are "
        "spread within each group (exp of the entropy; 1 = one value only).",
        "Machanavajjhala et al., ACM TKDD 2007;1(1):3; " + _OURS,
        exact=True,
    ),
    "t_closeness": _m(
        "privacy",
        "lower",
        0.0,
        -_INF,
        0.2,
        "absolute",
        "t-closeness",
        "Largest difference between the sensitive values within a group of "
        "look-alike patients and in the whole dataset (earth mover's distance; "
        "0 = every group looks like the whole).",
        "Li, Li & Venkatasubramanian, ICDE 2007:106-115; " + _OURS,
        exact=True,
    ),
}

#: Headline fidelity metrics returned by :func:`fidelity_scores`.
FIDELITY_METRICS = (
    "column_shapes",
    "max_column_statistic",
    "mean_missing_diff",
    "pair_trends",
    "mean_abs_diff_pearson",
    "mean_abs_diff_cramers_v",
    "detection_auc",
    "pmse_ratio_perm",
)

_PATTERNS = {name.split("<", 1)[0]: name for name in METRICS if "<" in name}


def metric_spec(
    name: str, extra_metrics: Mapping[str, MetricSpec] | None = None
) -> MetricSpec:
    """The :class:`MetricSpec` of ``name`` (patterns such as ``pk_bias_<param>``
    filled in), from ``extra_metrics`` first, then :data:`METRICS`.

    Examples
    --------
    >>> metric_spec("pk_bias_cl").label
    'PK bias CL'
    >>> metric_spec("singling_out_risk").upper
    0.09
    """
    if extra_metrics and name in extra_metrics:
        spec = extra_metrics[name]
        if not isinstance(spec, MetricSpec):
            raise ScorecardInputError(
                f"extra_metrics[{name!r}]: expected a MetricSpec, got "
                f"{type(spec).__name__}"
            )
        _check_spec(name, spec)
        return spec
    if name in METRICS and "<" not in name:
        return METRICS[name]
    for prefix, pattern in _PATTERNS.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            param = name[len(prefix) :].upper()
            spec = METRICS[pattern]
            return spec._replace(
                label=spec.label.replace("<param>", param),
                caption=spec.caption.replace("<param>", param),
            )
    raise UnknownMetricError(f"unknown metric {name!r}")


def _check_spec(name: str, spec: MetricSpec) -> None:
    if spec.group not in GROUPS:
        raise ScorecardInputError(
            f"metric {name!r}: group must be one of {GROUPS}, got {spec.group!r}"
        )
    if spec.better not in _BETTER:
        raise ScorecardInputError(
            f"metric {name!r}: better must be one of {_BETTER}, got {spec.better!r}"
        )
    if spec.bound not in _BOUNDS:
        raise ScorecardInputError(
            f"metric {name!r}: bound must be one of {_BOUNDS}, got {spec.bound!r}"
        )
    if not spec.caption.strip():
        raise ScorecardInputError(
            f"metric {name!r}: a plain-language caption is required"
        )


for _name, _spec in METRICS.items():
    _check_spec(_name, _spec)


# ---------------------------------------------------------------------- scores
def as_score(x) -> Score:
    """A :class:`Score` from a Score, an attacks ``Risk`` / ``MembershipResult``,
    a ``(value, ci_low, ci_high)`` tuple, or a real number or 0-d numpy/JAX array
    (no interval)."""
    if isinstance(x, Score):
        return Score(
            float(x.value),
            float(x.ci_low),
            float(x.ci_high),
            float(x.n),
            str(x.uninformative),
            float(x.successes),
            float(x.control_successes),
        )
    if isinstance(x, _attacks.Risk):
        n = int(x.n_attacks)
        return Score(
            float(x.value),
            float(x.ci_low),
            float(x.ci_high),
            float(n),
            successes=_wilson_count(x.attack_rate, n),
            control_successes=_wilson_count(x.control_rate, n),
        )
    if isinstance(x, _attacks.MembershipResult):
        return Score(
            float(x.auc),
            float(x.ci_low),
            float(x.ci_high),
            float(min(x.n_members, x.n_nonmembers)),
        )
    if isinstance(x, tuple) and len(x) == 3:
        return Score(*(float(v) for v in x))
    if (
        isinstance(x, np.ndarray | jax.Array)
        and x.ndim == 0
        and np.issubdtype(x.dtype, np.number)
        and x.dtype != bool
    ):
        return Score(float(x))
    if isinstance(x, bool) or not isinstance(x, Real | np.number):
        raise ScorecardInputError(
            f"a score must be a number, a Score or a "
            f"(value, ci_low, ci_high) tuple, got {x!r}"
        )
    return Score(float(x))


def _wilson_count(rate: float, n: int) -> float:
    """The success count behind a Wilson centre ``rate = (s + z^2/2) / (n + z^2)``
    of :func:`phems_clinical.privacy.attacks.wilson_rate` (95 %), i.e. ``s``."""
    from scipy.stats import norm

    z2 = float(norm.ppf(0.975)) ** 2
    return float(round(rate * (n + z2) - z2 / 2))


def pooled_risk(scores: Sequence[Score]) -> Score:
    """The residual risk of one release mechanism from several independent
    releases of it (e.g. each hospital's), pooling the attack trials: the
    anonymeter risk of the summed counts, ``(a - c) / (1 - c)`` with ``a`` and
    ``c`` the Wilson rates of sum(successes) / sum(n) and sum(control_successes)
    / sum(n) and their propagated error (Giomi et al., PoPETs 2023(2):312-328;
    Wilson, JASA 1927;22:209-212). It is the risk of the mechanism at these
    sizes, not of any one release: a single site's release can be riskier.

    Every score needs its counts (``successes``, ``control_successes``, ``n``);
    a score without them is an error naming its position."""
    scores = [as_score(x) for x in scores]
    if not scores:
        raise ScorecardInputError("pooled_risk: no scores to pool")
    bad = [
        i
        for i, x in enumerate(scores)
        if not all(math.isfinite(v) for v in (x.n, x.successes, x.control_successes))
    ]
    if bad:
        raise ScorecardInputError(
            f"pooled_risk: score(s) at position {bad} carry "
            "no attack counts (successes, control_successes"
            ", n)"
        )
    n = int(sum(x.n for x in scores))
    s = int(sum(x.successes for x in scores))
    c = int(sum(x.control_successes for x in scores))
    return as_score(_attacks.residual_risk(s, n, c, n))


_UTILITY_NAMES = {  # phems_clinical.evaluation.utility name -> (metric, scale)
    "auroc": ("auroc", 1.0),
    "auprc": ("auprc", 1.0),
    "brier": ("brier", 1.0),
    "calibration_slope": ("calibration_slope", 1.0),
    "calibration_intercept": ("calibration_intercept", 1.0),
    "ece": ("ece", 1.0),
    "utility": ("sepsis_clinical_utility", 1.0),
    "c_death": ("c_index", 1.0),
    "c_index": ("c_index", 1.0),
    "brier_death_30d": ("brier_death_30d", 1.0),
    "brier_death_360d": ("brier_death_360d", 1.0),
    "brier_readmit_30d": ("brier_readmit_30d", 1.0),
    "brier_readmit_360d": ("brier_readmit_360d", 1.0),
    "auc_cicu_gt7": ("auroc_cicu_7d", 1.0),
    "auroc_cicu_7d": ("auroc_cicu_7d", 1.0),
    "mdape": ("forecast_mdape", 1.0),
    "mpe": ("forecast_mdpe", 1.0),
    "within20": ("forecast_within_20", 1.0),
}
_REL_BIAS = re.compile(r"^rel_bias\[(THETA|CV_IIV)\(([A-Za-z0-9_]+)\)\]$")


def utility_scores(metrics: Mapping[str, float]) -> dict[str, Score]:
    """Scorecard cells from the dicts of :mod:`phems_clinical.evaluation.utility`.

    Renames to the registry (``c_death`` -> ``c_index``, ``auc_cicu_gt7`` ->
    ``auroc_cicu_7d``, ``utility`` -> ``sepsis_clinical_utility``, ``mdape`` /
    ``mpe`` / ``within20`` -> ``forecast_mdape`` / ``forecast_mdpe`` /
    ``forecast_within_20``, ``rel_bias[THETA(CL)]`` -> ``pk_bias_cl``,
    ``rel_bias[CV_IIV(CL)]`` -> ``pk_bias_cv_iiv_cl``), keeps ``mdape`` and
    ``mpe`` in % (one unit in every table), and folds ``<name>_ci_low`` /
    ``<name>_ci_high`` into the interval of ``<name>``. Bookkeeping entries (sizes,
    thresholds, losses, ``pass[...]``, ``real_prior_*``, ``delta_*``...) are left
    out: the scorecard compares sources through the real source's column.
    """
    out: dict[str, Score] = {}
    for name, v in metrics.items():
        if name.endswith(("_ci_low", "_ci_high")):
            continue
        m = _REL_BIAS.match(name)
        if m:
            kind, param = m.groups()
            key = "pk_bias_" + ("" if kind == "THETA" else "cv_iiv_") + param.lower()
            scale = 1.0
        elif name in _UTILITY_NAMES:
            key, scale = _UTILITY_NAMES[name]
        else:
            continue
        lo = metrics.get(f"{name}_ci_low", _NAN)
        hi = metrics.get(f"{name}_ci_high", _NAN)
        out[key] = Score(*(float(x) * scale for x in (as_score(v).value, lo, hi)))
    return out


_COLUMN_METRICS = (
    "column_shapes",
    "max_column_statistic",
    "mean_missing_diff",
    "pair_trends",
    "mean_abs_diff",
    "mean_abs_diff_pearson",
    "mean_abs_diff_cramers_v",
)


def _column_metrics(real: pd.DataFrame, derived: pd.DataFrame) -> dict[str, float]:
    """The column and pair metrics of ``fidelity_summary`` (same definitions)."""
    cols = _fid.column_fidelity(real, derived)
    pairs = _fid.pairwise_fidelity(real, derived)
    sims = np.where(
        pairs.metric == "pearson", 1 - pairs.abs_diff / 2, 1 - pairs.abs_diff
    )
    sims = sims[~np.isnan(sims)]
    return {
        "column_shapes": float(cols.score.mean()),
        "max_column_statistic": float(cols.statistic.max()),
        "mean_missing_diff": float(cols.missing_diff.mean()),
        **_fid.pairwise_summary(pairs),
        "pair_trends": float(np.mean(sims)) if sims.size else _NAN,
    }


def hanley_mcneil(auc: float, n1: int, n0: int) -> tuple[float, float]:
    """95 % interval of an AUC, +-1.96 SE of Hanley & McNeil (Radiology
    1982;143:29-36), clipped to [0, 1]."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (
        n1 * n0
    )
    se = math.sqrt(max(var, 0.0))
    return max(0.0, auc - 1.96 * se), min(1.0, auc + 1.96 * se)


def fidelity_scores(
    key,
    real: pd.DataFrame,
    derived: pd.DataFrame,
    *,
    metrics: Sequence[str] = FIDELITY_METRICS,
    folds: int = 5,
    n_permutations: int = 20,
    n_boot: int = 40,
) -> dict[str, Score]:
    """Fidelity of ``derived`` to ``real``, each with a 95 % interval.

    The values are those of
    :func:`phems_clinical.privacy.fidelity.fidelity_summary` (``metrics`` picks
    which; default :data:`FIDELITY_METRICS`; the pMSE ratio is the
    permutation-null one, which centres at 1 for indistinguishable data).
    Intervals: column and pair metrics +-1.96 bootstrap SD, the rows (patients)
    of both tables resampled ``n_boot`` times, clipped to [0, 1] (normal
    bootstrap interval, Efron & Tibshirani, An Introduction to the Bootstrap,
    1993, ch. 13; percentile intervals of a resampled distance are shifted by its
    upward bias); detection AUC by Hanley & McNeil with the cross-validated
    predictions taken as one test set; pMSE ratio +-1.96 SD of its permutation
    null (the spread of the ratio when the tables are alike).

    The pMSE ratio is *uninformative* when even perfectly separable tables could
    not reach the flag limit: perfect separation gives pMSE = c(1 - c), c = share
    of derived rows (Snoke, Raab, Nowok, Dibben & Slavkovic, JRSS-A 2018), so the
    largest reachable ratio is c(1 - c) / E_perm[pMSE]; a logistic model with about
    as many parameters as rows fits any labels and makes this ~1 (the cell's
    ``uninformative`` says so). ``key`` drives the folds, permutations and
    resamples.
    """
    for m in metrics:
        metric_spec(m)
    if "pmse_ratio_perm" in metrics and n_permutations < 1:
        raise ScorecardInputError(
            "n_permutations: pmse_ratio_perm needs at least 1 "
            f"permutation, got {n_permutations}"
        )
    if n_boot < 0:
        raise ScorecardInputError(f"n_boot: expected >= 0, got {n_boot}")
    k_sum, k_boot = jax.random.split(key)
    summary = _fid.fidelity_summary(
        k_sum, real, derived, folds=folds, n_permutations=n_permutations
    )
    absent = [m for m in metrics if m not in summary]
    if absent:
        raise ScorecardInputError(
            f"metrics {absent} are not fidelity_summary outputs ({sorted(summary)})"
        )
    n0, n1 = len(real), len(derived)
    n = float(min(n0, n1))
    out = {m: Score(float(summary[m]), n=n) for m in metrics}
    boot_m = [m for m in metrics if m in _COLUMN_METRICS]
    if boot_m and n_boot:
        rng = numpy_generator(k_boot)
        reps = np.array(
            [
                [v[m] for m in boot_m]
                for v in (
                    _column_metrics(
                        real.iloc[rng.integers(0, n0, n0)].reset_index(drop=True),
                        derived.iloc[rng.integers(0, n1, n1)].reset_index(drop=True),
                    )
                    for _ in range(n_boot)
                )
            ]
        )
        finite = np.isfinite(reps).sum(axis=0)
        sd = np.full(len(boot_m), _NAN)  # no interval from fewer than 2 finite
        ok = finite >= 2
        sd[ok] = np.nanstd(reps[:, ok], axis=0, ddof=1)
        for j, m in enumerate(boot_m):
            v = out[m].value
            lo, hi = np.clip([v - 1.96 * sd[j], v + 1.96 * sd[j]], 0.0, 1.0)
            out[m] = Score(v, float(lo), float(hi), n)
    if "detection_auc" in out:
        v = out["detection_auc"].value
        out["detection_auc"] = Score(v, *hanley_mcneil(v, n1, n0), n)
    if "pmse_ratio_perm" in out:
        # the permutation null of fidelity_summary, redrawn with its own key
        _, k_pmse = jax.random.split(k_sum)
        _, perm, _, c, _ = _fid.pmse_parts(
            k_pmse, real, derived, True, n_permutations, 1e-6
        )
        v, null_mean = out["pmse_ratio_perm"].value, float(np.mean(perm))
        reach = c * (1 - c) / null_mean if null_mean > 0 else _NAN
        limit = METRICS["pmse_ratio_perm"].upper
        if not reach >= limit:
            out["pmse_ratio_perm"] = Score(
                v,
                n=n,
                uninformative=(
                    f"uninformative at n = {n0} + {n1} rows: even perfectly separable "
                    f"data would give a ratio of only {reach:.3g} (limit {limit:g}); "
                    f"the propensity model has about as many parameters as rows"
                ),
            )
        else:
            half = (
                1.96 * float(np.std(perm, ddof=1)) / null_mean
                if len(perm) > 1
                else _NAN
            )
            out["pmse_ratio_perm"] = Score(v, max(0.0, v - half), v + half, n)
    return out


def _check_frames(train, control, derived) -> list[str]:
    for name, df in (("train", train), ("control", control), ("derived", derived)):
        if not isinstance(df, pd.DataFrame):
            raise ScorecardInputError(
                f"{name}: expected a pandas DataFrame, got {type(df).__name__}"
            )
        if len(df) < 2:
            raise ScorecardInputError(
                f"{name}: at least 2 rows are needed, got {len(df)}"
            )
    cols = list(derived.columns)
    for name, df in (("train", train), ("control", control)):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ScorecardInputError(
                f"{name}: column(s) {missing} of the derived table are missing"
            )
    return cols


def _subsample(key, df: pd.DataFrame, n: int) -> pd.DataFrame:
    if len(df) <= n:
        return df.reset_index(drop=True)
    idx = np.sort(np.asarray(jax.random.permutation(key, len(df)))[:n])
    return df.iloc[idx].reset_index(drop=True)


def privacy_scores(
    key,
    train: pd.DataFrame,
    control: pd.DataFrame,
    derived: pd.DataFrame,
    *,
    aux_cols: Sequence[str] | None = None,
    secret: str | Sequence[str] | None = None,
    link_cols: tuple[Sequence[str], Sequence[str]] | None = None,
    n_attacks: int = 500,
    n_cols: int = 3,
) -> dict[str, Score]:
    """Attack-based privacy risk of releasing ``derived``, made from ``train``.

    ``control`` holds real records of the same population that were *not* used to
    make ``derived`` (anonymeter's control set, the membership holdout). The
    residual risk compares success on the training records with success on the
    control records, and a predicate singles out one record more often in a
    smaller table, so the two sets must be of equal size: the larger of ``train``
    and ``control`` is subsampled (with ``key``) to the size of the smaller, and
    every attack runs on these equal sets. All frames must be in the
    representation of ``derived`` (for anonymised data: generalise ``train`` and
    ``control`` the same way), one row per patient.

    Returns ``singling_out_risk`` (univariate), ``singling_out_risk_multivariate``
    (``n_cols`` conditions), ``linkability_risk`` (the attacker holds the two
    column groups ``link_cols``; default: ``aux_cols`` cut in two halves),
    ``inference_risk`` (only with ``secret``; the attacker knows ``aux_cols``,
    default all other columns; with several secrets the highest risk),
    ``mia_auc`` (distance-based membership inference, train vs control) and
    ``dcr_share`` (secondary; target 0.5 as the sets are of equal size). Risks
    carry the Wilson-based interval of the anonymeter method, the AUC a
    Hanley-McNeil interval, the DCR share a Wilson interval over the derived
    rows. When no predicate singles out a derived record at all, the singling-out
    risk is 0 with the interval [0, 0] (no attack can be built).
    """
    cols = _check_frames(train, control, derived)
    secrets = (
        []
        if secret is None
        else ([secret] if isinstance(secret, str) else list(secret))
    )
    bad = [s for s in secrets if s not in cols]
    if bad:
        raise ScorecardInputError(
            f"secret column(s) {bad} are not columns of the derived table {cols}"
        )
    if aux_cols is None:
        aux = [c for c in cols if c not in secrets]
    else:
        aux = list(aux_cols)
        bad = [c for c in aux if c not in cols]
        if bad:
            raise ScorecardInputError(
                f"aux_cols {bad} are not columns of the derived table {cols}"
            )
    if link_cols is None:
        if len(aux) < 2:
            raise ScorecardInputError(
                "link_cols: need two column groups; aux_cols "
                f"{aux} has fewer than 2 columns to split"
            )
        half = len(aux) // 2
        link_cols = (aux[:half], aux[half:])
    if n_attacks < 1:
        raise ScorecardInputError(f"n_attacks: expected >= 1, got {n_attacks}")
    ks = jax.random.split(key, 8)
    n = min(len(train), len(control))
    ori = _subsample(ks[0], train, n)
    ctrl = _subsample(ks[1], control, n)
    n_att = min(n_attacks, n)
    out: dict[str, Score] = {}
    for name, mode, k in (
        ("singling_out_risk", "univariate", ks[2]),
        ("singling_out_risk_multivariate", "multivariate", ks[3]),
    ):
        try:
            out[name] = as_score(
                _attacks.singling_out_risk(
                    k,
                    ori[cols],
                    derived[cols],
                    ctrl[cols],
                    n_attacks=n_att,
                    mode=mode,
                    n_cols=n_cols,
                )
            )
        except ValueError as err:
            if "no predicate" not in str(err):
                raise
            out[name] = Score(
                0.0, 0.0, 0.0, float(n_att), successes=0.0, control_successes=0.0
            )  # no attack exists
    out["linkability_risk"] = as_score(
        _attacks.linkability_risk(
            ori, derived, ctrl, aux_cols=link_cols, n_attacks=n_att, key=ks[4]
        )
    )
    if secrets:
        risks = [
            _attacks.inference_risk(
                ori,
                derived,
                ctrl,
                aux_cols=[c for c in aux if c != s],
                secret=s,
                n_attacks=n_att,
                key=jax.random.fold_in(ks[5], i),
            )
            for i, s in enumerate(secrets)
        ]
        out["inference_risk"] = as_score(max(risks, key=lambda r: r.value))
    out["mia_auc"] = as_score(
        _attacks.membership_inference(ks[6], ori, ctrl, derived, n=n, cols=cols)
    )
    share = _attacks.distance_to_closest_record(
        ori, derived, ctrl, cols=cols
    ).share_closer_to_train
    # Wilson interval over the derived rows (ties, counted 1/2, rounded)
    centre, err = _attacks.wilson_rate(int(round(share * len(derived))), len(derived))
    out["dcr_share"] = Score(
        share, max(0.0, centre - err), min(1.0, centre + err), float(len(derived))
    )
    return out


def anonymity_scores(
    df: pd.DataFrame,
    qis: str | Sequence[str],
    sensitive: str | Sequence[str] | None = None,
    *,
    population=None,
    suppressed=None,
    threshold: float = RISK_THRESHOLD,
    levels=None,
    heights=None,
) -> dict[str, Score]:
    """k, l, t, re-identification risk and suppression of an anonymised table.

    Wraps :func:`phems_clinical.privacy.anonymity.anonymity_report` (arguments as
    there). With several sensitive columns, ``l_diversity`` and
    ``l_diversity_entropy`` are the smallest and ``t_closeness`` the largest over
    them (the worst case). ``journalist_risk_max`` only with ``population``;
    ``generalisation_loss`` only with ``levels`` and ``heights``.
    """
    rep = _anon.anonymity_report(
        df,
        qis,
        sensitive,
        population=population,
        suppressed=suppressed,
        threshold=threshold,
        levels=levels,
        heights=heights,
    )
    out = {
        "k_anonymity": Score(float(rep["k"])),
        "prosecutor_risk_max": Score(rep["prosecutor"]["max"]),
        "prosecutor_risk_mean": Score(rep["prosecutor"]["mean"]),
        "records_at_risk": Score(rep["prosecutor"]["records_at_risk"]),
        "marketer_risk": Score(float(rep["marketer"])),
        "suppressed_share": Score(float(rep["suppressed_share"])),
    }
    if "journalist" in rep:
        out["journalist_risk_max"] = Score(rep["journalist"]["max"])
    if "sensitive" in rep:
        per = rep["sensitive"].values()
        out["l_diversity"] = Score(float(min(s["l_distinct"] for s in per)))
        out["l_diversity_entropy"] = Score(float(min(s["l_entropy"] for s in per)))
        out["t_closeness"] = Score(float(max(s["t"] for s in per)))
    if "generalisation_loss" in rep:
        out["generalisation_loss"] = Score(float(rep["generalisation_loss"]))
    return out


# ------------------------------------------------------------------- the Dataset
def _created_by() -> str:
    try:
        v = _pkg_version("phems_clinical")
    except PackageNotFoundError:  # pragma: no cover - source checkout
        v = "unknown"
    return f"phems_clinical {v} (phems_clinical.evaluation.scorecard)"


def _meta_float(
    src: str, field: str, x, *, positive: bool = False, below_one: bool = False
) -> float:
    if x is None:
        return _NAN
    if isinstance(x, bool) or not isinstance(x, Real | np.number):
        raise ScorecardInputError(
            f"sources_meta[{src!r}][{field!r}]: expected a number or None, got {x!r}"
        )
    v = float(x)
    if math.isnan(v):
        return v
    if positive and not v > 0:
        raise ScorecardInputError(
            f"sources_meta[{src!r}][{field!r}]: must be > 0 "
            f"(NaN or None = not differentially private), "
            f"got {v}"
        )
    if below_one and not 0 <= v < 1:
        raise ScorecardInputError(
            f"sources_meta[{src!r}][{field!r}]: must lie in [0, 1), got {v}"
        )
    if not positive and not below_one and v < 0:
        raise ScorecardInputError(
            f"sources_meta[{src!r}][{field!r}]: must be >= 0, got {v}"
        )
    return v


_META_KEYS = {"kind", "generator", "epsilon", "delta", "unit_of_privacy", "n_rows"}


def build_scorecard(
    scores: Mapping[str, Mapping[str, object]],
    *,
    sources_meta: Mapping[str, Mapping[str, object]],
    use_case: str,
    seed: int,
    extra_metrics: Mapping[str, MetricSpec] | None = None,
) -> xr.Dataset:
    """Put the scores of every source on one scorecard.

    Parameters
    ----------
    scores : mapping source -> mapping metric -> score
        A score is a :class:`Score`, an attacks ``Risk``/``MembershipResult``, a
        ``(value, ci_low, ci_high)`` tuple or a number. Metrics a source lacks are
        NaN ("not applicable"), e.g. k-anonymity for a synthetic source.
    sources_meta : mapping source -> dict
        ``kind`` (required; ``"real"``, ``"anonymised"`` or ``"synthetic"``),
        ``generator`` (str), ``epsilon`` and ``delta`` (differential privacy;
        None/NaN = not DP; epsilon > 0, delta in [0, 1)), ``unit_of_privacy``
        (e.g. ``"patient"``), ``n_rows``. ``generator`` falls back to
        ``method``. Other keys (scalars only) are kept as JSON in the ``extra``
        coordinate (e.g. fit time).
    use_case, seed
        Stored as attributes (``seed`` is the run's seed, for provenance).
    extra_metrics : mapping name -> MetricSpec, optional
        Metrics not in :data:`METRICS`; anything else unknown raises
        :class:`UnknownMetricError`, naming every unknown metric.

    Returns
    -------
    xarray.Dataset
        dims ``("source", "metric")``; variables ``value``, ``ci_low``,
        ``ci_high``, ``n`` (sample size of the interval), ``uninformative``
        (reason, or empty); metric coords ``group, better, target, lower, upper,
        bound, label, caption, reference, exact``; source coords ``kind,
        generator, epsilon, delta, unit, n_rows, extra``; attrs ``use_case, seed,
        created_by``. Metrics are ordered by group (fidelity, utility, privacy),
        then registry order.
    """
    if not isinstance(scores, Mapping) or not scores:
        raise ScorecardInputError(
            "scores: expected a non-empty mapping source -> {metric: score}"
        )
    sources = [str(s) for s in scores]
    if len(set(sources)) != len(sources):
        raise ScorecardInputError(f"scores: duplicate source names {sources}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ScorecardInputError(f"seed: expected an integer, got {seed!r}")
    if not isinstance(use_case, str) or not use_case:
        raise ScorecardInputError(
            f"use_case: expected a non-empty string, got {use_case!r}"
        )
    missing_meta = [s for s in scores if s not in sources_meta]
    if missing_meta:
        raise ScorecardInputError(
            f"sources_meta: no entry for source(s) "
            f"{missing_meta}; each needs at least 'kind'"
        )
    names: list[str] = []
    for src, cells in scores.items():
        if not isinstance(cells, Mapping):
            raise ScorecardInputError(
                f"scores[{src!r}]: expected a mapping metric "
                f"-> score, got {type(cells).__name__}"
            )
        names += [m for m in cells if m not in names]
    if not names:
        raise ScorecardInputError("scores: no source has any metric value")
    specs, unknown = {}, []
    for m in names:
        try:
            specs[m] = metric_spec(m, extra_metrics)
        except UnknownMetricError:
            unknown.append(m)
    if unknown:
        known = list(METRICS)
        raise UnknownMetricError(
            f"unknown metric name(s) {unknown}; registered: {known} (a name "
            "'pk_bias_<param>' matches any parameter); pass a MetricSpec in "
            "extra_metrics to add a metric"
        )
    order = list(METRICS)

    def rank(m: str):
        reg = next(
            (
                i
                for i, k in enumerate(order)
                if k == m or ("<" in k and m.startswith(k.split("<")[0]))
            ),
            len(order),
        )
        return GROUPS.index(specs[m].group), reg, m

    metrics = sorted(names, key=rank)
    shape = (len(sources), len(metrics))
    val, lo, hi, nn, succ, ctrl = (np.full(shape, np.nan) for _ in range(6))
    why = np.full(shape, "", dtype=object)
    for i, cells in enumerate(scores.values()):
        for m, x in cells.items():
            try:
                s = as_score(x)
            except ScorecardInputError as err:
                raise ScorecardInputError(
                    f"scores[{sources[i]!r}][{m!r}]: {err}"
                ) from None
            j = metrics.index(m)
            (
                val[i, j],
                lo[i, j],
                hi[i, j],
                nn[i, j],
                why[i, j],
                succ[i, j],
                ctrl[i, j],
            ) = s
    meta = {
        k: []
        for k in ("kind", "generator", "epsilon", "delta", "unit", "n_rows", "extra")
    }
    for src in scores:
        md = sources_meta[src]
        extra = {}
        for k in sorted(set(md) - _META_KEYS):
            v = md[k]
            if isinstance(v, np.generic):
                v = v.item()
            if v is not None and not isinstance(v, str | int | float | bool):
                raise ScorecardInputError(
                    f"sources_meta[{src!r}][{k!r}]: extra metadata must be a "
                    f"string, number, bool or None, got {type(v).__name__}"
                )
            extra[str(k)] = v
        meta["extra"].append(json.dumps(extra, sort_keys=True))
        kind = md.get("kind")
        if kind not in KINDS:
            raise ScorecardInputError(
                f"sources_meta[{src!r}]['kind']: expected one of {KINDS}, got {kind!r}"
            )
        meta["kind"].append(kind)
        meta["generator"].append(str(md.get("generator") or md.get("method") or ""))
        meta["epsilon"].append(
            _meta_float(src, "epsilon", md.get("epsilon"), positive=True)
        )
        meta["delta"].append(_meta_float(src, "delta", md.get("delta"), below_one=True))
        meta["unit"].append(str(md.get("unit_of_privacy") or ""))
        meta["n_rows"].append(_meta_float(src, "n_rows", md.get("n_rows")))
    sp = [specs[m] for m in metrics]

    def strs(xs):
        return ("metric", np.array(xs, dtype=object))

    coords = {
        "source": ("source", np.array(sources, dtype=object)),
        "metric": ("metric", np.array(metrics, dtype=object)),
        "kind": ("source", np.array(meta["kind"], dtype=object)),
        "generator": ("source", np.array(meta["generator"], dtype=object)),
        "epsilon": ("source", np.array(meta["epsilon"], dtype=float)),
        "delta": ("source", np.array(meta["delta"], dtype=float)),
        "unit": ("source", np.array(meta["unit"], dtype=object)),
        "n_rows": ("source", np.array(meta["n_rows"], dtype=float)),
        "extra": ("source", np.array(meta["extra"], dtype=object)),
        "group": strs([s.group for s in sp]),
        "better": strs([s.better for s in sp]),
        "target": ("metric", np.array([s.target for s in sp], dtype=float)),
        "lower": ("metric", np.array([s.lower for s in sp], dtype=float)),
        "upper": ("metric", np.array([s.upper for s in sp], dtype=float)),
        "bound": strs([s.bound for s in sp]),
        "label": strs([s.label for s in sp]),
        "caption": strs([s.caption for s in sp]),
        "reference": strs([s.reference for s in sp]),
        "exact": ("metric", np.array([s.exact for s in sp], dtype=bool)),
    }
    dims = ("source", "metric")
    ds = xr.Dataset(
        {
            "value": (dims, val),
            "ci_low": (dims, lo),
            "ci_high": (dims, hi),
            "n": (dims, nn),
            "uninformative": (dims, why),
            "successes": (dims, succ),
            "control_successes": (dims, ctrl),
        },
        coords=coords,
        attrs={
            "use_case": str(use_case),
            "seed": int(seed),
            "created_by": _created_by(),
        },
    )
    ds["value"].attrs["description"] = "metric value (see caption)"
    ds["ci_low"].attrs["description"] = "lower end of the 95 % interval (NaN: none)"
    ds["ci_high"].attrs["description"] = "upper end of the 95 % interval (NaN: none)"
    ds["n"].attrs["description"] = (
        "sample size of the interval: attacks or patients (NaN: unknown)"
    )
    ds["uninformative"].attrs["description"] = (
        "why the metric cannot tell good from bad at this size (empty: it can)"
    )
    ds["epsilon"].attrs["description"] = "DP epsilon (NaN: not differentially private)"
    for name, (long_name, units) in {
        "value": ("metric value", "see label (per metric)"),
        "ci_low": ("lower end of the 95 % interval", "see label (per metric)"),
        "ci_high": ("upper end of the 95 % interval", "see label (per metric)"),
        "n": ("sample size of the interval", "1"),
        "successes": ("successful attacks", "1"),
        "control_successes": ("successful control attacks", "1"),
    }.items():
        ds[name].attrs.update(long_name=long_name, units=units)
    return ds


# ------------------------------------------------------------------------ flags
def _g(x: float) -> str:
    return f"{x:.3g}"


def needed_n(
    value: float, ci_low: float, ci_high: float, n: float, limit: float
) -> float:
    """Sample size at which the 95 % interval would exclude ``limit``, the value
    staying as observed: n_req = n (h / |value - limit|)^2, h the half-width on
    the side facing the limit. Wilson, Hanley-McNeil and bootstrap half-widths
    shrink as 1/sqrt(n) (to first order), so the half-width at n_req is
    |value - limit|. NaN without an interval or n; inf when value == limit."""
    if any(math.isnan(x) for x in (value, ci_low, ci_high, n, limit)):
        return _NAN
    gap = abs(value - limit)
    if gap == 0:
        return _INF
    h = (value - ci_low) if limit < value else (ci_high - value)
    if h <= 0:  # clipped at a bound of the scale: use the other side
        h = max(ci_high - value, value - ci_low)
    return float(math.ceil(n * (h / gap) ** 2))


def _get(ds: xr.Dataset, name: str, i: int, j: int, default):
    return ds[name].values[i, j] if name in ds else default


_REF_NOTES = {
    "privacy": "reference: what an unprotected release of these real records "
    "would leak",
    "fidelity": "reference: how far two real samples of this size differ "
    "(held-out vs training patients)",
    "utility": "real-data reference",
}


def _verdict(lo: float, hi: float, lower: float, upper: float) -> str:
    if lo >= lower and hi <= upper:
        return "ok"
    if hi < lower or lo > upper:
        return "flagged"
    return "inconclusive"


def assess(ds: xr.Dataset) -> xr.Dataset:
    """Per cell: ``status`` and a plain-language ``note``; never a pass from a
    point value alone.

    ``status``: ``"ok"`` (within target: the whole 95 % interval inside the
    acceptance band), ``"flagged"`` (outside target: the whole interval outside;
    ``note`` says which way, e.g. ``"above 0.09 threshold"``), ``"inconclusive"``
    (the interval spans a limit, or there is no interval; ``note`` gives the
    sample size that would settle it, :func:`needed_n`), ``"uninformative"``
    (the metric cannot flag anything at this size, e.g. a fidelity metric
    whose real-vs-real reference value is already outside its band; ``note``
    says why),
    ``"reference"`` (a source of kind ``real``: the baseline the others are
    compared with, not a release), ``"not applicable"`` (NaN value) or ``"no
    threshold"``. Metrics marked ``exact`` (properties of the released table:
    k, l, t, prosecutor risk) are judged on their value. A metric judged
    relative to real data is judged on the difference, its interval combining
    both cells' half-widths in quadrature (as if independent: conservative
    where they share test patients).
    """
    kinds = [str(k) for k in ds["kind"].values]
    ref_i = kinds.index("real") if "real" in kinds else None
    status = np.empty(ds["value"].shape, dtype=object)
    note = np.empty(ds["value"].shape, dtype=object)
    exact = (
        ds["exact"].values.astype(bool)
        if "exact" in ds.coords
        else np.zeros(ds.sizes["metric"], bool)
    )
    for j in range(ds.sizes["metric"]):
        bound, group = str(ds["bound"].values[j]), str(ds["group"].values[j])
        lower, upper = float(ds["lower"].values[j]), float(ds["upper"].values[j])
        ref = _NAN if ref_i is None else float(ds["value"].values[ref_i, j])
        for i in range(ds.sizes["source"]):
            v = float(ds["value"].values[i, j])
            lo = float(ds["ci_low"].values[i, j])
            hi = float(ds["ci_high"].values[i, j])
            n = float(_get(ds, "n", i, j, _NAN))
            why = str(_get(ds, "uninformative", i, j, ""))
            if math.isnan(v):
                status[i, j], note[i, j] = "not applicable", "not applicable"
                continue
            if kinds[i] == "real":
                status[i, j], note[i, j] = "reference", _REF_NOTES[group]
                continue
            if bound == "none":
                status[i, j] = "no threshold"
                note[i, j] = "no threshold (for information)"
                continue
            if why:
                status[i, j], note[i, j] = "uninformative", why
                continue
            if (
                group == "fidelity"
                and bound == "absolute"
                and not math.isnan(ref)
                and not lower <= ref <= upper
            ):
                status[i, j] = "uninformative"
                note[i, j] = (
                    f"uninformative at this size: two real samples "
                    f"(held-out vs training patients) already give "
                    f"{_g(ref)}, outside the limit"
                )
                continue
            has_ci = not (math.isnan(lo) or math.isnan(hi))
            if bound == "relative_to_real":
                if math.isnan(ref):
                    status[i, j] = "no threshold"
                    note[i, j] = "no real-data value to compare with"
                    continue
                rlo = float(ds["ci_low"].values[ref_i, j])
                rhi = float(ds["ci_high"].values[ref_i, j])
                d = v - ref
                if has_ci:
                    rh = 0.0 if math.isnan(rlo) or math.isnan(rhi) else (rhi - rlo) / 2
                    h = math.hypot((hi - lo) / 2, rh)
                    dlo, dhi = d - h, d + h
                else:
                    dlo = dhi = d
                st = (
                    _verdict(dlo, dhi, lower, upper)
                    if has_ci or exact[j]
                    else "inconclusive"
                )
                rel = f"{d:+.3g} vs real data ({_g(ref)})"
                if st == "ok":
                    nt = f"within target ({rel})"
                elif st == "flagged":
                    nt = (
                        f"{_g(-d)} below real data ({_g(ref)}); limit "
                        f"{_g(-lower)} below"
                        if d < lower
                        else f"{_g(d)} above real data ({_g(ref)}); limit "
                        f"{_g(upper)} above"
                    )
                elif has_ci:
                    nt = (
                        f"inconclusive: difference {rel}, 95 % interval "
                        f"{dlo:+.3g} to {dhi:+.3g} spans the limit"
                    )
                else:
                    nt = (
                        f"inconclusive: no interval ({rel}; a point value "
                        f"alone is no verdict)"
                    )
                status[i, j], note[i, j] = st, nt
                continue
            if exact[j]:
                lo = hi = v
            elif not has_ci:
                side = "within" if lower <= v <= upper else "outside"
                status[i, j] = "inconclusive"
                note[i, j] = (
                    f"inconclusive: no interval (point value {side} "
                    f"target; a point value alone is no verdict)"
                )
                continue
            st = _verdict(lo, hi, lower, upper)
            if st == "ok":
                nt = "within target"
            elif st == "flagged":
                nt = (
                    f"below {_g(lower)} threshold"
                    if hi < lower
                    else f"above {_g(upper)} threshold"
                )
            else:
                limit = upper if hi > upper else lower
                req = needed_n(v, lo, hi, n, limit)
                nt = (
                    f"inconclusive: 95 % interval {_g(lo)}\u2013{_g(hi)} spans "
                    f"the {_g(limit)} limit"
                )
                if math.isfinite(req):
                    nt += (
                        f"; about n = {int(req)} would settle it at this "
                        f"value (now n = {int(n)})"
                    )
            status[i, j], note[i, j] = st, nt
    dims = ("source", "metric")
    return xr.Dataset(
        {"status": (dims, status), "note": (dims, note)},
        coords={"source": ds["source"], "metric": ds["metric"]},
    )


def target_text(spec_row: Mapping[str, object]) -> str:
    """Human-readable target and flag limit of one metric (used by the report)."""
    better, bound = spec_row["better"], spec_row["bound"]
    t, lo, hi = (float(spec_row[k]) for k in ("target", "lower", "upper"))
    if bound == "relative_to_real":
        if better == "higher":
            return f"as high as real data; flagged if more than {_g(-lo)} lower"
        if better == "lower":
            return f"as low as real data; flagged if more than {_g(hi)} higher"
        return f"as real data; flagged outside {_g(lo)} to {_g(hi)} of it"
    ideal = "" if math.isnan(t) else f"ideal {_g(t)}; "
    if bound == "none":
        return f"{ideal}no threshold".strip("; ")
    if math.isinf(lo) and not math.isinf(hi):
        return f"{ideal}flagged above {_g(hi)}"
    if math.isinf(hi) and not math.isinf(lo):
        return f"{ideal}flagged below {_g(lo)}"
    return f"{ideal}flagged outside {_g(lo)} to {_g(hi)}"
