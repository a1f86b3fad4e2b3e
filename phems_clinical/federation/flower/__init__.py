"""The federated algorithms as a Flower (``flwr>=1.41,<1.42``) deployment.

The same :class:`~phems_clinical.federation.core.Algorithm` that
:func:`~phems_clinical.federation.engine.run_federated` runs in one process runs
here as a Flower ServerApp (:mod:`.server_app`) and ClientApp (:mod:`.client_app`),
with one SuperNode per hospital:

* each SuperNode reads only its own site directory (``--node-config
  "site-dir='...' site-index=k"``), and keeps its site state (e.g. its patients'
  ETA modes) in that node's state folder (:mod:`.site_state`);
* only the algorithm's declared population-level payload leaves a site, checked
  against ``federation_message.schema.json`` before it is sent and again when the
  server receives it;
* the server adds the payloads in site-index order and draws the same keys as the
  in-process engine, so for the same seed both give the same estimates.

:mod:`.launch` starts a SuperLink and K SuperNodes as separate processes on
loopback (optionally with TLS and SuperNode authentication) and runs the app with
``flwr run``. Flower runs every message in a new process; :mod:`.compiled` keeps the
traced site update in the node's JAX cache folder so that a round does not trace it
again.

This package imports Flower only in :mod:`.server_app`, :mod:`.client_app` and
:mod:`.records`; the configuration and the launcher work without it.
"""

from phems_clinical.federation.flower.config import (
    ALGORITHMS,
    RunSettings,
    SiteConfig,
    build_algorithm,
    run_settings,
    site_config,
)

__all__ = [
    "ALGORITHMS",
    "RunSettings",
    "SiteConfig",
    "build_algorithm",
    "run_settings",
    "site_config",
]
