"""Structured configuration of an experiment run (issue 7): a misspelt key or a
wrong type fails when Hydra composes the config, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DataConfig:
    """Where each site's data come from: ``omop`` (a folder of ``<site>.duckdb``)
    or, when null, ``n_sites`` simulated hospitals of ``n_per_site`` patients."""

    omop: str | None = None
    n_sites: int = 5
    n_per_site: int = 40
    holdout_site: str | None = None
    test_fraction: float = 0.5


@dataclass
class SourceConfig:
    """One data source (see :class:`phems_clinical.evaluation.sources.SourceSpec`)."""

    kind: str = MISSING
    method: str = "none"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class FederationConfig:
    algorithm: str = "fed_focei"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationConfig:
    n_attacks: int = 100


@dataclass
class ExperimentConfig:
    experiment_name: str = "fviii_side_by_side"
    seed: int = 0
    use_case: str = "haemophilia"
    model: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    federation: FederationConfig = field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


ConfigStore.instance().store(name="experiment_schema", node=ExperimentConfig)
