"""Structured configuration of an experiment run: a misspelt key or a
wrong type fails when Hydra composes the config, before anything runs.

Config groups (``configs/``): ``use_case``, ``model``, ``source`` (composed into
``sources.<name>``), ``inference``, ``federation``, ``experiment`` (the committed
studies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DataConfig:
    """Where each site's data come from: ``omop`` (a folder of ``<site>.duckdb``)
    or, when null, ``n_sites`` simulated hospitals of ``n_per_site`` patients.
    ``holdout_site``: the hospital kept out of training (null: the last one);
    ``test_fraction``: share of each training hospital's patients held out."""

    omop: str | None = None
    n_sites: int = 5
    n_per_site: int = 40
    holdout_site: str | None = None
    test_fraction: float = 0.5


@dataclass
class SourceConfig:
    """One data source (:class:`phems_clinical.evaluation.sources.SourceSpec`):
    ``kind`` real | anonymised | synthetic; ``method``: lattice | mondrian
    (anonymised), default (the use case's generator) | copula | mst (synthetic)."""

    kind: str = MISSING
    method: str = "default"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferenceConfig:
    """The federated strategy (null: the use case's default) and its options
    (``rounds``, ``learning_rate``, ``local_steps``...)."""

    strategy: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DPSettings:
    """Patient-level DP-SGD of training, by its target ε per site (null: off)."""

    epsilon: float | None = None
    delta: float | None = None
    clip: float = 1.0
    accountant: str = "rdp"
    sampling_rate: float = 1.0


@dataclass
class FederationConfig:
    """``engine`` inprocess | flower | pooled; ``sites``: the training hospitals
    (null: all but the held-out one); ``min_sites`` per round; ``secagg``."""

    engine: str = "inprocess"
    sites: list[str] | None = None
    min_sites: int | None = None
    secagg: bool = False
    dp: DPSettings = field(default_factory=DPSettings)


@dataclass
class EvaluationConfig:
    """``n_attacks``: attacks per privacy-risk estimate (anonymeter)."""

    n_attacks: int = 100


@dataclass
class ExperimentConfig:
    experiment_name: str = "fviii_side_by_side"
    seed: int = 0
    use_case: str = "haemophilia"
    model: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    progress: bool = True  # bars with ETA on stderr when it is a terminal


ConfigStore.instance().store(name="experiment_schema", node=ExperimentConfig)
