"""``phems federate``: a federated population-PK fit over hospitals, in process.

Reads one NONMEM-style CSV with a ``SITE`` column (each site's rows are checked on
their own, as they would be inside that hospital), runs the chosen algorithm with
the in-process engine (optionally with secure aggregation and a pooled
comparison), and writes ``result.json``. Flower deployment of the same algorithms:
``python -m phems_clinical.federation.flower.launch`` (see the README).

``--out`` is refused before any work when it holds files (unless ``overwrite``,
which replaces it as a whole); ``result.json`` is written into a temporary
folder renamed into place at the end (:func:`phems_clinical.outputs.staged_dir`).
Non-finite federated estimates are an error, never a result; a ``--checkpoint``
folder must lie outside ``--out``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd

from phems_clinical.app.fit import FitFailedError, resolve_model
from phems_clinical.app.omop import is_omop, model_factor, pk_events_from_omop
from phems_clinical.federation.engine import RoundRecord, run_federated
from phems_clinical.federation.gate import SiteGate, head
from phems_clinical.federation.governance import load_policy
from phems_clinical.federation.pk_sites import (
    cohorts_by_site,
    n_occasions_all,
    pad_sites,
    pooled,
)
from phems_clinical.federation.registry import build_algorithm, estimates_table
from phems_clinical.federation.secure import (
    default_secagg_config,
    secagg_aggregator,
)
from phems_clinical.outputs import check_out, staged_dir, strict_json
from phems_clinical.provenance import code_state, versions


def site_gates(
    policy_dir: Path,
    sites: list[str],
    request: str,
    key_dir: Path | None,
    requester: str = "",
    experiment: str = "",
) -> list[SiteGate]:
    """Each site's gate from ``policy_dir/<site>.yaml`` (all sites must have one),
    for the data user's signed ``request``; each site's MAC key is
    ``key_dir/<site>.key`` (created on first use), outside ``policy_dir``."""
    if not request:
        raise ValueError(
            "--request: required with --site-policy-dir (a signed "
            "request from 'phems governance sign-request')"
        )
    if key_dir is None:
        raise ValueError(
            "--site-key-dir: required with --site-policy-dir (a folder "
            "outside it for the sites' audit MAC keys)"
        )
    missing = [s for s in sites if not (policy_dir / f"{s}.yaml").exists()]
    if missing:
        raise ValueError(
            f"--site-policy-dir: no policy for site(s) "
            f"{', '.join(missing)} (expected {policy_dir}/<site>.yaml)"
        )
    return [
        SiteGate(
            load_policy(policy_dir / f"{s}.yaml"),
            policy_dir / f"{s}.audit.jsonl",
            policy_dir / f"{s}.ledger.json",
            request,
            Path(key_dir) / f"{s}.key",
            policy_dir / f"{s}.admissions",
            "",
            requester,
            experiment,
        )
        for s in sites
    ]


def _history(records: list[RoundRecord]) -> list[dict]:
    return [
        {
            "round": r.round,
            "participants": list(r.participants),
            "dropped": [{"site": k, "reason": why} for k, why in r.dropped],
            "attempts": r.attempts,
            "seconds": round(r.seconds, 4),
        }
        for r in records
    ]


def _pooled_reference(name, model, cohorts, n_occ, seed) -> tuple[dict, float]:
    t0 = time.perf_counter()
    if name in ("ep", "consensus_mc"):
        from phems_clinical.federation.bayes import pooled_reference

        ref = pooled_reference(
            jax.random.key(seed), model, pooled(cohorts), n_occ=n_occ
        )
        table = {
            n: {"estimate": float(m), "sd": float(s)}
            for n, m, s in zip(
                ref.natural_names, ref.natural_mean, ref.natural_sd, strict=True
            )
        }
    else:
        from phems_clinical.pk.focei import fit_focei

        ref = fit_focei(model, pooled(cohorts), covariance=False)
        if not ref.converged:
            raise FitFailedError(
                f"--compare-pooled: the pooled FOCEI reference fit "
                f"failed: {ref.message}. Nothing was written"
            )
        table = {
            n: {"estimate": float(v)}
            for n, v in zip(ref.natural_names, ref.estimates, strict=True)
        }
    return table, time.perf_counter() - t0


def _nonfinite(table: dict) -> list[str]:
    """Names of the estimates (or posterior SDs) in ``table`` that are not
    finite (a standard error is only given where it exists)."""
    return [
        name
        for name, entry in table.items()
        if not all(math.isfinite(entry[k]) for k in ("estimate", "sd") if k in entry)
    ]


def run_federate(
    data: str | Path,
    model_ref: str,
    algorithm: str,
    out: str | Path,
    *,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    secagg: bool = False,
    min_sites: int | None = None,
    checkpoint: str | Path | None = None,
    compare_pooled: bool = False,
    progress: bool = True,
    policy_dir: str | Path | None = None,
    requester: str = "",
    experiment: str = "",
    request: str = "",
    site_key_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Run a federated fit and write ``out/result.json``; returns its content.

    ``out`` must be missing or empty unless ``overwrite`` (checked before any
    work; then replaced as a whole at the end). Raises :class:`FitFailedError`
    when an estimate is not finite (nothing is written).

    With ``policy_dir``, every site must have ``<policy_dir>/<site>.yaml``
    (``data_schemas/site_policy.schema.json``); the run is checked against each
    before anything is computed (``request``: the data user's signed request),
    each site's outgoing messages are appended to ``<site>.audit.jsonl`` and its ε
    spent per executed round to ``<site>.ledger.json`` there, both MAC'd with the
    key ``<site_key_dir>/<site>.key``.
    """
    out = check_out(out, overwrite=overwrite)
    if checkpoint is not None and _inside(Path(checkpoint), out):
        raise ValueError(
            f"--checkpoint: {checkpoint} lies inside --out {out}, which "
            "is replaced as a whole at the end; choose a folder outside "
            "it"
        )
    model = resolve_model(model_ref)
    omop_load = None
    if is_omop(data):  # each site's OMOP database
        events, omop_load = pk_events_from_omop(data, factor=model_factor(model))
    else:
        events = pd.read_csv(data)
    names, cohorts = cohorts_by_site(events, model)
    gates = (
        None
        if policy_dir is None
        else site_gates(
            Path(policy_dir),
            names,
            request,
            None if site_key_dir is None else Path(site_key_dir),
            requester,
            experiment,
        )
    )
    n_occ = n_occasions_all(cohorts)
    sites = pad_sites(cohorts)
    alg = build_algorithm(
        algorithm, model, n_sites=len(sites), n_occ=n_occ, options=options
    )
    log: list = []
    aggregator = cfg = None
    if secagg:
        cfg = default_secagg_config(len(sites), min_sites)
        aggregator = secagg_aggregator(cfg, log, n_sites=len(sites))
    fields: set[str] = set()

    def on_round(rec, server):
        if progress:
            print(
                f"[phems federate] round {rec.round + 1}: sites "
                f"{len(rec.participants)}/{len(sites)}"
                + (f", dropped {list(rec.dropped)}" if rec.dropped else "")
                + f", {rec.seconds:.2f} s",
                flush=True,
            )

    t0 = time.perf_counter()
    run = run_federated(
        jax.random.key(seed),
        alg,
        sites,
        aggregator=aggregator,
        min_sites=min_sites,
        checkpoint_dir=checkpoint,
        on_round=on_round,
        gates=gates,
        on_message=lambda r, k, p: fields.update(p),
    )
    seconds = time.perf_counter() - t0
    estimates = estimates_table(model, run.result)
    bad = _nonfinite(estimates)
    if bad:
        raise FitFailedError(
            f"--data: the federated {algorithm} fit ended with non-finite "
            f"estimates of {', '.join(bad)} after {run.rounds} round(s); check the "
            "sites' data and --options. Nothing was written"
            + (" (the checkpoint is kept)" if checkpoint is not None else "")
        )
    result = {
        "algorithm": algorithm,
        "model": model.name,
        "seed": seed,
        "sites": [
            {"name": n, "n_patients": c.n_subjects}
            for n, c in zip(names, cohorts, strict=True)
        ],
        "rounds": run.rounds,
        "converged": run.converged,
        "stopped_by": run.result.get("stopped_by"),
        "seconds": round(seconds, 3),
        "estimates": estimates,
        "messages": {
            "fields": sorted(fields),
            "checked_against": "data_schemas/federation_message.schema.json",
        },
        "secure_aggregation": None
        if cfg is None
        else {
            **cfg._asdict(),
            "max_error_bound": max(r.max_error_bound for r in log),
            "bytes_per_site_per_round": int(
                np.mean([b for r in log for b in r.bytes_per_site.values()])
            ),
        },
        "privacy": run.privacy,
        "site_governance": None
        if gates is None
        else [
            {
                "site": n,
                "audit_log": str(g.audit_log),
                "ledger": str(g.ledger),
                "audit_head": "{}:{}".format(*head(g)),
            }
            for n, g in zip(names, gates, strict=True)
        ],
        "history": _history(run.history),
        "omop_load": omop_load,
        "versions": versions(),
        "code": code_state("phems_clinical/federation"),
    }
    if compare_pooled:
        ref, ref_seconds = _pooled_reference(algorithm, model, cohorts, n_occ, seed)
        fed = result["estimates"]
        result["pooled"] = {
            "seconds": round(ref_seconds, 3),
            "estimates": ref,
            "max_relative_difference": max(
                abs(fed[k]["estimate"] / ref[k]["estimate"] - 1)
                for k in ref
                if ref[k]["estimate"] != 0
            ),
        }
    with staged_dir(out, overwrite=overwrite) as tmp:
        (tmp / "result.json").write_text(
            json.dumps(strict_json(result), indent=2, allow_nan=False)
        )
    return result


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


__all__ = ["run_federate"]
