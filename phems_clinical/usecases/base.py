"""The :class:`UseCase` record: everything the lower layers need to know about
one use case, handed to them as an argument (they never branch on its name).

Imports nothing heavy, so listing the use cases (``phems --help``) stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

#: Column naming the hospital in the tables handed to :attr:`UseCase.plots`.
PLOT_SITE = "hospital"


class UseCaseError(ValueError):
    """An unknown or malformed use case (names the valid ones)."""


class UseCase(NamedTuple):
    """One use case of the suite, owned by one module of :mod:`phems_clinical.
    usecases`.

    name : the config/CLI name (``use_case``, ``--use-case``).
    unit : the unit of one profile row, i.e. the unit of privacy of profile-level
        DP ("patient", "ICU stay", "surgical episode").
    roles : :class:`phems_clinical.privacy.release.Roles` of the analysis table
        (patient id, identifiers, quasi-identifiers and their hierarchies,
        sensitive attributes, date columns, derived columns and their recompute).
    profile : analysis table -> one row per :attr:`unit` (the table the fidelity
        and privacy metrics compare, :mod:`phems_clinical.evaluation.profiles`).
    profile_bounds : public bounds of the profile columns, never read from data:
        ``(lower, upper, bins)`` (``+ ("log1p",)`` for bins equal on the log1p
        scale) or a category list (the MST domain, categorical copula columns).
    may_be_missing : profile columns that can be missing (NaN) in a profile.
    attack_columns : ``(aux columns an attacker knows, secret attribute)`` of the
        singling-out, linkability and inference attacks.
    generator : name of the longitudinal synthetic method (``synthetic`` source).
    synthesise : ``(key, data, options, model, params) -> (table, report)``: the
        longitudinal generator fitted on ``data`` and sampled (``options["n"]``
        units, default as many as ``data``).
    utility : ``(key, source table, train, holdout, model, reference) -> {metric:
        value}``: train-on-source, test-on-real metrics of the full table (dicts
        of :mod:`phems_clinical.evaluation.utility`), or None.
    load : ``(omop, model=None) -> ({site: analysis table}, {site: load report})``
        from OMOP databases (a ``<site>.duckdb`` file, a folder, a URL).
    simulate : ``(key, n_sites, n_per_site, model) -> {site: OMOP tables}``: the
        runner's simulated hospitals, named by :attr:`site_names`.
    site_names : ``n_sites -> [site]`` of :attr:`simulate`.
    simulate_default : ``(key, n, product) -> {site: (OMOP tables, truth or
        None)}``: the simulator's own default hospitals (``phems omop simulate``).
    task : the runner's :class:`phems_clinical.usecases.task.Task` (federated
        model, strategies, evaluation).
    outcome : ``(outcome, baseline features)`` of the death model that every
        source gets on its profiles (train on source, test on real), or None.
    reference_fit : ``(train, model) -> fit`` of the real training data that
        :attr:`utility` compares a source with (population PK), or None.
    default_model : the ``--model`` of ``phems anonymise|synthesize`` when none
        is given (a library product), or None when the use case has no model to
        name there.
    plots : title -> ``function(tables by source name) -> (PNG bytes,
        caption)``: the use case's figures of a side-by-side comparison
        (concentration-time, trajectories, occupation curves, covariates), drawn
        by the report without knowing the use case. Each table is a source's
        analysis table, the training hospitals' stacked, with the column
        :data:`PLOT_SITE` naming the hospital.
    """

    name: str
    unit: str
    roles: Any
    profile: Callable[[Any], Any]
    profile_bounds: Mapping[str, Any]
    may_be_missing: frozenset[str]
    attack_columns: tuple[tuple[str, ...], str]
    generator: str
    synthesise: Callable[..., tuple[Any, dict]]
    utility: Callable[..., dict] | None
    load: Callable[..., tuple[dict, dict]]
    simulate: Callable[..., dict]
    site_names: Callable[[int], list[str]]
    simulate_default: Callable[..., dict]
    task: Any
    outcome: tuple[str, tuple[str, ...]] | None = None
    reference_fit: Callable[[Any, Any], Any] | None = None
    default_model: str | None = None
    plots: Mapping[str, Callable[[Mapping[str, Any]], tuple[bytes, str]]] = {}

    @property
    def patient_id(self) -> str:
        """The column naming a patient (unit of the k-anonymity and the split)."""
        return self.roles.patient_id

    @property
    def log_columns(self) -> list[str]:
        """Profile columns binned on the log1p scale (a 4-tuple bound)."""
        return [
            c
            for c, v in self.profile_bounds.items()
            if not isinstance(v, list) and len(v) > 3
        ]

    @property
    def categorical(self) -> list[str]:
        """Profile columns whose bounds are a category list."""
        return [c for c, v in self.profile_bounds.items() if isinstance(v, list)]
