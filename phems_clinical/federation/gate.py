"""A site's gate in a federated run: its policy checked before any computation,
every outgoing message checked and logged, and the privacy spent recorded.

The in-process engine and the Flower client call the same three functions:
:func:`admit` once before the site computes anything, :func:`release` for every
payload before it leaves, and :func:`settle` after the run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

from phems_clinical.federation import dp as dpm
from phems_clinical.federation import governance as gov


class SiteGate(NamedTuple):
    """What a site enforces for one run: its policy, its tamper-evident audit log,
    its privacy ledger, and who asks for what."""

    policy: gov.SitePolicy
    audit_log: Path
    ledger: Path
    requester: str
    experiment: str


def planned_privacy(algorithm, n_patients: int, rounds: int
                    ) -> tuple[float | None, float]:
    """(ε, δ) a run of ``rounds`` rounds spends at a site of ``n_patients``
    (``None, 0`` without patient-level DP; unit: one patient)."""
    if algorithm.dp is None:
        return None, 0.0
    steps = rounds * algorithm.dp_steps_per_round
    return (dpm.epsilon(algorithm.dp, n_patients, steps),
            dpm.resolve_delta(algorithm.dp, n_patients))


def admit(gate: SiteGate, algorithm, n_patients: int, rounds: int) -> None:
    """Refuse (``PolicyViolation``) a run the site's policy does not allow."""
    eps, delta = planned_privacy(algorithm, n_patients, rounds)
    spent = gov.load_spend(gate.ledger)
    request = gov.Request(gate.requester, gate.experiment, algorithm.name,
                          int(n_patients), tuple(algorithm.message_spec), eps,
                          int(rounds), delta)
    gov.check_request(gate.policy, request, spent.epsilon, spent_delta=spent.delta)


def release(gate: SiteGate, payload: dict[str, Any], round_: int,
            recipient: str = "server") -> dict:
    """Check an outgoing payload's fields against the policy and append it to the
    audit log (shapes and hashes only); returns the log entry."""
    gov.check_payload(gate.policy, payload)
    return gov.append_entry(gate.audit_log, requester=gate.requester,
                            experiment=gate.experiment, round=int(round_),
                            recipient=recipient,
                            summary=gov.summarise_payload(payload))


def settle(gate: SiteGate, algorithm, n_patients: int, rounds: int) -> None:
    """Record the privacy a finished (or stopped) run spent at the site."""
    eps, delta = planned_privacy(algorithm, n_patients, rounds)
    # ε = inf (a DP mechanism without noise) is "no DP" to the policy, which
    # admits it only where the data user may run without DP; nothing is recorded.
    if eps is not None and math.isfinite(eps) and rounds > 0:
        gov.record_spend(gate.ledger, gate.requester, eps, delta=delta,
                         experiment=gate.experiment)


__all__ = ["SiteGate", "admit", "planned_privacy", "release", "settle"]
