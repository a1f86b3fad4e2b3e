"""Federated training across hospitals: one algorithm interface, an in-process engine,
strategies, secure aggregation, differential privacy, site governance and a Flower
adapter (:mod:`phems_clinical.federation.flower`). Patient-level data never leave a
site: a site's ``local_update`` returns only population-level arrays, and the server
sees only their sum.

By purpose: the algorithm interface and keys (``Algorithm``, ``site_round_key``,
``server_round_key``, ``sum_payloads``; :mod:`~phems_clinical.federation.core`);
strategies (``fedavg``, ``fedprox``, ``fedadam``, ``fedyogi``, ``Examples``) and the
registry that builds them by name (``build_algorithm``, ``ALGORITHMS``); the engine
(``run_federated``, ``FederatedRun``, checkpoints); federated FOCEI and Bayesian
references (``fed_focei``, ``pooled_reference``); PK site cohorts (``pad_sites``,
``cohorts_by_site``); secure aggregation (``secure_sum``, ``SecAggConfig``,
``secagg_aggregator``); differential privacy (``DPConfig``, ``SiteDPConfig``,
``calibrate_noise_multiplier``); site governance (``load_policy``,
``check_request``, ``sign_request``, the audit log ``append_entry`` /
``verify_log``, ``SiteGate``) and message checks (``MessageRejected``). Names are
imported from their submodules on first use (:func:`phems_clinical.lazy_exports`).
"""

from phems_clinical import lazy_exports

_EXPORTS = {
    ".bayes": ("pooled_reference",),
    ".core": ("Algorithm", "derive_site_key", "flatten_payload", "kept_site_secret",
              "server_round_key", "simulated_site_keys", "site_round_key",
              "site_secret_keys", "site_size", "sum_payloads", "tree_digest"),
    ".dp": ("DPConfig", "PrivacyBudgetExceeded", "SiteDPConfig",
            "calibrate_noise_multiplier"),
    ".engine": ("CheckpointError", "FederatedRun", "FederationAborted", "RoundRecord",
                "checkpoint_path", "load_checkpoint", "run_federated",
                "save_checkpoint"),
    ".focei": ("fed_focei",),
    ".gate": ("SiteGate",),
    ".governance": ("AuditLogError", "IntegrityError", "PolicyError",
                    "PolicyViolation", "Request", "append_entry", "canonical_json",
                    "check_request", "create_site_key", "generate_user_key",
                    "load_policy", "load_site_key", "load_spend", "log_head",
                    "read_log", "record_spend", "sign_request", "summarise_payload",
                    "verify_log", "verify_request"),
    ".messages": ("MessageRejected", "declared_fields"),
    ".pk_sites": ("SiteCohort", "cohorts_by_site", "n_occasions_all", "pad_sites",
                  "pooled"),
    ".registry": ("ALGORITHMS", "FEDOPT", "build_algorithm", "build_fedopt",
                  "estimates_table"),
    ".secagg": ("SecAggAbort", "SecAggConfig", "SecAggError",
                "SecAggThresholdWarning", "generate_identity", "plain_sum",
                "secure_sum"),
    ".secure": ("FOCEI_SECAGG", "default_secagg_config", "secagg_aggregator"),
    ".site_errors": ("SiteProtocolError",),
    ".strategies": ("Examples", "fedadam", "fedavg", "fedprox", "fedyogi",
                    "objective_from_loss"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ALGORITHMS", "Algorithm", "AuditLogError", "CheckpointError", "DPConfig",
    "Examples", "FEDOPT", "FOCEI_SECAGG", "FederatedRun", "FederationAborted",
    "IntegrityError", "MessageRejected", "PolicyError", "PolicyViolation",
    "PrivacyBudgetExceeded", "Request", "RoundRecord", "SecAggAbort", "SecAggConfig",
    "SecAggError", "SecAggThresholdWarning", "SiteCohort", "SiteDPConfig", "SiteGate",
    "SiteProtocolError", "append_entry", "build_algorithm", "build_fedopt",
    "calibrate_noise_multiplier", "canonical_json", "check_request", "checkpoint_path",
    "cohorts_by_site", "create_site_key", "declared_fields", "default_secagg_config",
    "derive_site_key", "estimates_table", "fed_focei", "fedadam", "fedavg", "fedprox",
    "fedyogi", "flatten_payload", "generate_identity", "generate_user_key",
    "kept_site_secret", "load_checkpoint", "load_policy", "load_site_key", "load_spend",
    "log_head", "n_occasions_all", "objective_from_loss", "pad_sites", "plain_sum",
    "pooled", "pooled_reference", "read_log", "record_spend", "run_federated",
    "save_checkpoint", "secagg_aggregator", "secure_sum", "server_round_key",
    "sign_request", "simulated_site_keys", "site_round_key", "site_secret_keys",
    "site_size", "sum_payloads", "summarise_payload", "tree_digest", "verify_log",
    "verify_request",
]
