"""What a site says when it fails: a fixed category and an opaque reference.

An exception raised while a site handles a message may hold patient-level text:
a data validator names the row, the patient ID and the value it rejected, a file
error names the hospital's path, a policy refusal names what the site allows. None
of it may leave the site. :func:`record_site_error` turns any exception into a
:class:`SiteError` -- one of :data:`CATEGORIES` and a random reference of
:data:`REFERENCE_HEX` hex digits from the operating system's CSPRNG
(:func:`secrets.token_hex`) -- and appends the full text and traceback, under that
reference, to the site's own log (JSON lines, never sent). Only
:attr:`SiteError.reason` (``"category reference"``) goes to the server, which
accepts nothing else (:func:`parse_reason`); a site's operator finds the detail
by the reference.

:func:`guarded` wraps any site-side message handler (the Flower ClientApp's
``query`` and ``train``, and any later protocol stage) so that every exception
becomes such a reply. The in-process engine records its simulated sites' failures
the same way (their log is the ``phems_clinical.site`` logger).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import re
import secrets
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from phems_clinical.data.nonmem import DataValidationError
from phems_clinical.federation.dp import PrivacyBudgetExceeded
from phems_clinical.federation.governance import PolicyError, PolicyViolation
from phems_clinical.federation.messages import MessageRejected

CATEGORIES = (
    "invalid_data",
    "policy_refused",
    "budget_exceeded",
    "protocol_error",
    "internal_error",
    "injected_failure",
)
"""The only words about a failure that leave a site:

* ``invalid_data``: the site's data failed validation or could not be read;
* ``policy_refused``: the site's policy refuses the run (or the policy file is
  invalid);
* ``budget_exceeded``: the run would take the site past its privacy budget;
* ``protocol_error``: a message the site cannot act on (wrong site, round or
  shape), or a payload its own schema check refused to send;
* ``internal_error``: anything else;
* ``injected_failure``: fault injection in tests.
"""

REFERENCE_HEX = 12
"""Hex digits of a reference (48 random bits: a site's log has no collisions)."""

LOG_FILE = "site_errors.jsonl"
"""Name of a site's error log inside its node-local state folder."""

LOGGER = logging.getLogger("phems_clinical.site")
"""The log of a site without a folder (the in-process engine's simulated sites, or
a node whose configuration could not be read): local, never sent."""

_REASON = re.compile(rf"({'|'.join(CATEGORIES)}) ([0-9a-f]{{{REFERENCE_HEX}}})")


class InjectedFailure(RuntimeError):
    """A failure injected for a fault-tolerance test."""


class SiteProtocolError(ValueError):
    """A message the site cannot act on (e.g. meant for another site)."""


class SiteError(NamedTuple):
    """A failure as the server may see it: its category and the site's reference."""

    category: str
    reference: str

    @property
    def reason(self) -> str:
        """``"category reference"``: the whole text that leaves the site."""
        return f"{self.category} {self.reference}"


_BY_TYPE: tuple[
    tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...
] = (
    (InjectedFailure, "injected_failure"),
    ((PolicyViolation, PolicyError), "policy_refused"),
    (PrivacyBudgetExceeded, "budget_exceeded"),
    ((MessageRejected, SiteProtocolError), "protocol_error"),
    ((DataValidationError, FileNotFoundError, UnicodeDecodeError), "invalid_data"),
)


def category_of(err: BaseException) -> str:
    """The :data:`CATEGORIES` entry of ``err`` (``internal_error`` if none fits)."""
    for kinds, category in _BY_TYPE:
        if isinstance(err, kinds):
            return category
    return "internal_error"


def new_reference() -> str:
    """A fresh reference: :data:`REFERENCE_HEX` hex digits from the OS CSPRNG."""
    return secrets.token_hex(REFERENCE_HEX // 2)


def record_site_error(
    err: BaseException,
    log: Path | None,
    *,
    stage: str,
    context: Mapping[str, int | str] | None = None,
) -> SiteError:
    """Categorise ``err``, append its full text and traceback to the site's log and
    return what may leave the site.

    Parameters
    ----------
    err : exception
        What the site's handler raised.
    log : path or None
        The site's own error log (JSON lines, created ``0600``); ``None`` (or a log
        that cannot be written) logs to :data:`LOGGER` instead.
    stage : str
        Which handler failed (``"query"``, ``"train"``, ...).
    context : mapping, optional
        Site-side context kept with the entry (round, site index, ...).
    """
    error = SiteError(category_of(err), new_reference())
    entry = {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "reference": error.reference,
        "category": error.category,
        "stage": stage,
        **dict(context or {}),
        "type": type(err).__name__,
        "message": str(err),
        "traceback": "".join(traceback.format_exception(err)),
    }
    if log is not None:
        try:
            log = Path(log)
            log.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
            LOGGER.error("site %s failed: %s (detail in %s)", stage, error.reason, log)
            return error
        except OSError:
            pass
    LOGGER.error("site %s failed: %s\n%s", stage, error.reason, entry["traceback"])
    return error


def parse_reason(text: Any) -> SiteError | None:
    """The :class:`SiteError` of a reply's reason, or None unless ``text`` is
    exactly ``"category reference"`` (the server stores nothing else)."""
    if not isinstance(text, str):
        return None
    match = _REASON.fullmatch(text)
    return None if match is None else SiteError(match[1], match[2])


def read_site_log(log: Path, reference: str) -> dict | None:
    """The site's log entry of ``reference`` (for the site's operator), or None."""
    path = Path(log)
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry.get("reference") == reference:
            return entry
    return None


R = TypeVar("R")


def guarded(
    stage: str, log_of: Callable[..., Path | None], on_error: Callable[..., R]
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorate a site-side handler so that no exception text leaves the site.

    The handler's arguments are passed to ``log_of`` (the site's log, or None) and,
    on a failure, with the :class:`SiteError` first, to ``on_error``, whose return
    value (e.g. a Flower error reply) replaces the handler's. ``log_of`` failing is
    itself caught (the detail then goes to :data:`LOGGER`).
    """

    def decorate(handler: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(handler)
        def run(*args: Any, **kwargs: Any) -> R:
            try:
                return handler(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 -- every failure is categorised
                try:
                    log = log_of(*args, **kwargs)
                except Exception:  # noqa: BLE001
                    log = None
                return on_error(
                    record_site_error(err, log, stage=stage), *args, **kwargs
                )

        return run

    return decorate


__all__ = [
    "CATEGORIES",
    "InjectedFailure",
    "LOG_FILE",
    "LOGGER",
    "REFERENCE_HEX",
    "SiteError",
    "SiteProtocolError",
    "category_of",
    "guarded",
    "new_reference",
    "parse_reason",
    "read_site_log",
    "record_site_error",
]
