"""What the Flower apps read from their configuration: run settings, the algorithm,
and a site's own data directory.

Nothing here imports Flower, so the launcher and the tests can use it without a
running federation.

* The **run config** (``[tool.flwr.app.config]`` of the app's ``pyproject.toml``,
  overridden with ``flwr run --run-config``) is the same for the server and every
  site: seed, algorithm, product, rounds, thresholds, output paths.
* The **node config** (``flower-supernode --node-config``) is one hospital's own:
  its data directory and its index among the simulated sites. A SuperNode reads
  nothing but that directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from phems_clinical.data.cohort import Cohort
from phems_clinical.federation.core import Algorithm

# Names only (the registry module itself is imported when an algorithm is built).
REGISTERED = (
    "fed_focei",
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "ep",
    "consensus_mc",
)

DATA_FILE = "cohort.csv"
"""Default name of a site's NONMEM-style event table inside its directory."""

STATE_DIR = "flower_state"
"""Default folder (inside the site directory) of the node-local site state."""

IDENTITY_FILE = "secagg_identity.key"
"""Default file (inside the site directory) of the site's Ed25519 SecAgg identity
key (raw 32 bytes, mode 0600)."""

TRUSTED_FILE = "secagg_trusted.json"
"""Default file (inside the site directory) of the site's trusted identity roster
(``{site id: hex Ed25519 public key}``, from the hospitals' out-of-band exchange)."""


class RunSettings(NamedTuple):
    """The run config of a federated Flower run (keys as in ``pyproject.toml``).

    Attributes
    ----------
    seed : int
        The run seed: the server's key is ``jax.random.key(seed)`` and simulated
        site ``k``'s is ``core.simulated_site_keys(key, num_sites)[k]``, exactly as
        in :func:`phems_clinical.federation.engine.run_federated`.
    algorithm : str
        Name in :data:`ALGORITHMS` (those of
        :mod:`phems_clinical.federation.registry`: ``"fed_focei"``, ``"fedadam"``,
        ``"ep"``, ...).
    product : str
        Library model (``phems_clinical.pk.library``), e.g. ``"advate"``.
    n_occ : int
        Occasions the model allows for; 0 takes the largest over the sites (asked
        in the opening query round).
    num_sites : int
        K, the number of SuperNodes the server waits for.
    min_sites : int
        Fewest sites a round may complete with; 0 means all K.
    rounds : int
        Most rounds; 0 means the algorithm's own ``max_rounds``.
    round_timeout : float
        Seconds the server waits for a round's replies.
    connect_timeout : float
        Seconds the server waits for K SuperNodes to connect.
    retries : int
        Extra attempts of a round that gathered fewer than ``min_sites`` replies.
    out : str
        Path of the result JSON (written by the ServerApp).
    checkpoint_dir : str
        Server checkpoint folder ('' for none); a run resumes from it.
    job : str
        Name of the job under which sites keep their state ('' = per Flower run);
        a resumed run must use the same name.
    options : str
        The algorithm's options as a JSON object ('' = its defaults), as for
        ``phems federate --options``.
    requester, experiment : str
        Who runs what, as the coordinator claims it (optional; a site with a
        policy refuses a claim that differs from the signed ``request``).
    request : str
        The data user's signed request (``phems governance sign-request``): what
        a site with a policy (``site_policy.yaml``) authenticates before reading
        any data (:func:`site_gate`, :mod:`phems_clinical.federation.gate`).
    secagg : bool
        Sum the sites' payloads with secure aggregation (Bonawitz et al., CCS
        2017; :mod:`~phems_clinical.federation.flower.secagg_transport`).
    secagg_clip, secagg_bits, secagg_threshold : float, int, int
        Its clip (payload units), quantisation bits and Shamir threshold; 0 takes
        ``federation.secure.default_secagg_config`` (1e6, 48, K - 1 or min-sites).
    use_case : str
        What the run fits (:mod:`~phems_clinical.federation.flower.tasks`):
        ``haemophilia`` (population PK of ``product``), ``picu`` (sepsis early
        warning), ``cardiac`` (multi-state pathways).
    model : str
        The use case's model settings as a JSON object ('' = its defaults), e.g.
        ``{"architecture": "logistic", "horizon_h": 6}`` (picu) or
        ``{"ridge": 0.001}`` (cardiac); haemophilia takes ``product``.
    """

    seed: int = 0
    algorithm: str = "fed_focei"
    product: str = "advate"
    n_occ: int = 0
    num_sites: int = 3
    min_sites: int = 0
    rounds: int = 3
    round_timeout: float = 300.0
    connect_timeout: float = 120.0
    retries: int = 2
    out: str = ""
    checkpoint_dir: str = ""
    job: str = ""
    options: str = ""
    requester: str = ""
    experiment: str = ""
    request: str = ""
    secagg: bool = False
    secagg_clip: float = 0.0
    secagg_bits: int = 0
    secagg_threshold: int = 0
    use_case: str = "haemophilia"
    model: str = ""


def run_settings(run_config: Mapping[str, Any]) -> RunSettings:
    """Read :class:`RunSettings` from a Flower run config (``kebab-case`` keys).

    Unknown keys are an error (a typo must not silently fall back to a default).
    """
    fields = {name.replace("_", "-"): name for name in RunSettings._fields}
    unknown = sorted(set(run_config) - set(fields))
    if unknown:
        raise ValueError(
            f"run config: unknown keys {unknown}; expected some of {sorted(fields)}"
        )
    defaults = RunSettings()
    values = {}
    for key, name in fields.items():
        if key in run_config:
            kind = type(getattr(defaults, name))
            if kind is bool and not isinstance(run_config[key], bool):
                raise ValueError(
                    f"run config {key}: expected true or false, got {run_config[key]!r}"
                )
            values[name] = kind(run_config[key])
    settings = RunSettings(**values)
    if settings.num_sites < 1:
        raise ValueError(
            f"run config num-sites: expected >= 1, got {settings.num_sites}"
        )
    if not 0 <= settings.min_sites <= settings.num_sites:
        raise ValueError(
            f"run config min-sites: expected 0..{settings.num_sites}, "
            f"got {settings.min_sites}"
        )
    return settings


def to_run_config(settings: RunSettings) -> dict[str, Any]:
    """The inverse of :func:`run_settings` (``kebab-case`` keys)."""
    return {k.replace("_", "-"): v for k, v in settings._asdict().items()}


def _from_registry(name: str) -> Callable[[RunSettings, int], Algorithm]:
    def build(settings: RunSettings, n_occ: int) -> Algorithm:
        from phems_clinical.federation.registry import build_algorithm
        from phems_clinical.pk.library import load_product

        options = json.loads(settings.options) if settings.options else {}
        if not isinstance(options, dict):
            raise ValueError("run config options: expected a JSON object")
        return build_algorithm(
            name,
            load_product(settings.product),
            n_sites=settings.num_sites,
            n_occ=n_occ,
            options=options,
        )

    return build


ALGORITHMS: dict[str, Callable[[RunSettings, int], Algorithm]] = {
    name: _from_registry(name) for name in REGISTERED
}
"""Algorithm builders by name: ``(settings, n_occ) -> Algorithm``, the same
registry as ``phems federate``; the server and every site call the same builder."""


def build_algorithm(settings: RunSettings, *, n_occ: int) -> Algorithm:
    """The :class:`~phems_clinical.federation.core.Algorithm` a run config names.

    Parameters
    ----------
    settings : RunSettings
        The run's settings (:func:`run_settings`).
    n_occ : int
        Occasions the population model allows for (agreed in the query round).
    """
    try:
        builder = ALGORITHMS[settings.algorithm]
    except KeyError:
        raise ValueError(
            f"run config algorithm: {settings.algorithm!r} is not one "
            f"of {sorted(ALGORITHMS)}"
        ) from None
    return builder(settings, int(n_occ))


def algorithm_tag(settings: RunSettings, n_occ: int) -> tuple[str, list[Path]]:
    """What determines the traced ``local_update`` besides its argument shapes: a
    text of the settings the builder reads, and the model files it loads (keys of
    the export cache, :mod:`~phems_clinical.federation.flower.compiled`)."""
    from phems_clinical.resources import configs_dir

    tag = (
        f"{settings.algorithm}|product={settings.product}|n_occ={int(n_occ)}|"
        f"seed={settings.seed}|num_sites={settings.num_sites}|"
        f"options={settings.options}|use_case={settings.use_case}|"
        f"model={settings.model}"
    )
    return tag, sorted((configs_dir() / "model").glob("*.yaml"))


def product_model(settings: RunSettings):
    """The library population model of the run (``settings.product``)."""
    from phems_clinical.pk.library import load_product

    return load_product(settings.product)


class SiteConfig(NamedTuple):
    """A SuperNode's own configuration (its ``--node-config``).

    Attributes
    ----------
    site_dir : Path
        The hospital's data directory; the node reads nothing else.
    site_index : int
        The site's position among the simulated sites (its key and its place in
        the server's sum).
    num_sites : int or None
        K as the node was told (checked against the run's, when given).
    data_file : str
        Event table inside ``site_dir``.
    state_dir : Path or None
        Where the node keeps its state between rounds (node-local); None:
        ``site_dir / STATE_DIR`` (see :attr:`state_path`).
    fail_rounds : frozenset of int
        Fault injection for tests: rounds in which this site raises.
    site_key : Path or None
        The site's audit/ledger MAC key file (``site-key``), outside ``site_dir``;
        required when the site has a policy.
    secagg_required : bool
        The site sends its payload only under secure aggregation (fails closed).
    secagg_identity, secagg_trusted : Path or None
        The site's Ed25519 identity key and its trusted identity roster
        (:data:`IDENTITY_FILE`, :data:`TRUSTED_FILE` in ``site_dir`` by default).
    """

    site_dir: Path
    site_index: int
    num_sites: int | None = None
    data_file: str = DATA_FILE
    state_dir: Path | None = None
    fail_rounds: frozenset[int] = frozenset()
    site_key: Path | None = None
    secagg_required: bool = False
    secagg_identity: Path | None = None
    secagg_trusted: Path | None = None

    @property
    def state_path(self) -> Path:
        """The node-local state folder: ``state_dir``, else
        ``site_dir / STATE_DIR``."""
        return (
            self.state_dir
            if self.state_dir is not None
            else (self.site_dir / STATE_DIR)
        )


def site_config(node_config: Mapping[str, Any]) -> SiteConfig:
    """Read :class:`SiteConfig` from a SuperNode's node config.

    Keys: ``site-dir`` (required), ``site-index`` (required), ``num-sites``,
    ``data-file``, ``state-dir``, ``site-key`` (the MAC key file of the site's
    audit log and ledger), ``fail-rounds`` (comma-separated rounds, for
    fault-injection tests), ``secagg-required`` (true: refuse to send a payload
    unmasked), ``secagg-identity`` and ``secagg-trusted`` (paths).
    """
    missing = [k for k in ("site-dir", "site-index") if k not in node_config]
    if missing:
        raise ValueError(
            f"node config: missing {missing}; start the SuperNode with "
            "--node-config \"site-dir='/path/to/site' site-index=0\""
        )
    site_dir = Path(str(node_config["site-dir"])).expanduser().resolve()
    state = node_config.get("state-dir")
    fails = str(node_config.get("fail-rounds", "")).strip()
    required = node_config.get("secagg-required", False)
    if not isinstance(required, bool):
        raise ValueError(
            f"node config secagg-required: expected true or false, got {required!r}"
        )

    def path(key: str, default: str) -> Path:
        return (
            Path(str(node_config.get(key) or site_dir / default)).expanduser().resolve()
        )

    return SiteConfig(
        site_dir=site_dir,
        site_index=int(node_config["site-index"]),
        num_sites=(
            int(node_config["num-sites"]) if "num-sites" in node_config else None
        ),
        data_file=str(node_config.get("data-file", DATA_FILE)),
        state_dir=(
            Path(str(state)).expanduser().resolve() if state else site_dir / STATE_DIR
        ),
        fail_rounds=frozenset(int(r) for r in fails.split(",") if r.strip()),
        site_key=(
            Path(str(node_config["site-key"])).expanduser().resolve()
            if node_config.get("site-key")
            else None
        ),
        secagg_required=required,
        secagg_identity=path("secagg-identity", IDENTITY_FILE),
        secagg_trusted=path("secagg-trusted", TRUSTED_FILE),
    )


POLICY_FILE = "site_policy.yaml"
"""A site's policy inside its folder (``data_schemas/site_policy.schema.json``)."""


def site_gate(site: SiteConfig, settings: RunSettings, run_id: Any = None):
    """The site's :class:`~phems_clinical.federation.gate.SiteGate` when its folder
    holds ``site_policy.yaml`` (audit log ``audit.jsonl``, privacy ledger
    ``privacy_ledger.json`` and admission records ``admissions/`` next to it; the
    MAC key from the node config's ``site-key``), else None.

    Raises ``IntegrityError`` (field ``site_key``) for a policy without a key.
    """
    from phems_clinical.federation.gate import SiteGate
    from phems_clinical.federation.governance import IntegrityError, load_policy

    path = site.site_dir / POLICY_FILE
    if not path.exists():
        return None
    if site.site_key is None:
        raise IntegrityError(
            "site_key",
            "node config site-key: required when the "
            "site folder holds site_policy.yaml (a key file "
            "outside the site folder)",
        )
    return SiteGate(
        load_policy(path),
        site.site_dir / "audit.jsonl",
        site.site_dir / "privacy_ledger.json",
        settings.request,
        site.site_key,
        site.site_dir / "admissions",
        "" if run_id is None else str(run_id),
        settings.requester,
        settings.experiment,
    )


def read_site_cohort(site: SiteConfig, model) -> Cohort:
    """The site's cohort from its event table (checked by
    :func:`phems_clinical.data.nonmem.read_nonmem`)."""
    from phems_clinical.data.nonmem import read_nonmem, to_cohort

    path = site.site_dir / site.data_file
    if not path.is_file():
        raise FileNotFoundError(f"site {site.site_index}: no event table {path}")
    data = read_nonmem(path, required_covariates=model.covariate_names)
    return to_cohort(data, model.covariate_names)[0]


def site_shape(cohort: Cohort) -> dict[str, int]:
    """The sizes a site reports in the query round (counts, no patient values):
    subjects, doses and samples per subject, occasions."""
    from phems_clinical.pk.model import n_occasions

    return {
        "n-sub": int(cohort.n_subjects),
        "n-dose": int(cohort.dose_time.shape[-1]),
        "n-obs": int(cohort.obs_time.shape[-1]),
        "n-occ": int(n_occasions(cohort)),
    }


__all__ = [
    "ALGORITHMS",
    "DATA_FILE",
    "IDENTITY_FILE",
    "RunSettings",
    "STATE_DIR",
    "SiteConfig",
    "TRUSTED_FILE",
    "algorithm_tag",
    "build_algorithm",
    "product_model",
    "read_site_cohort",
    "run_settings",
    "site_config",
    "site_shape",
    "to_run_config",
]
