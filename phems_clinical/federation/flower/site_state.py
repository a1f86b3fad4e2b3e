"""Node-local site state between rounds (e.g. a site's patients' ETA modes).

Flower starts a new ``flwr-clientapp`` process for every message, so a site's state
(``Algorithm.init_site`` / ``local_update``) lives on the node's disk, in the
site's own state folder, and never in a message.

File ``entering-<r>.eqx`` is the state the site starts round ``r`` from: its output
of round ``r - 1``. The server's message names the round whose state to use
(``state-from``), the one after the site's last *accepted* round, so a site whose
reply was dropped restarts from its last accepted state -- exactly as the
in-process engine keeps a dropped site's state unchanged. Older files are pruned.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import equinox as eqx

_NAME = re.compile(r"entering-(\d+)\.eqx$")


def state_path(directory: Path, round_: int) -> Path:
    """File of the state entering ``round_``."""
    return Path(directory) / f"entering-{int(round_):06d}.eqx"


def load_site_state(directory: Path, round_: int, like: Any) -> Any:
    """The state entering ``round_`` (shaped like ``like``); ``like`` itself for
    round 0 (the algorithm's ``init_site``)."""
    if round_ == 0:
        return like
    path = state_path(directory, round_)
    if not path.is_file():
        raise FileNotFoundError(
            f"site state {path} is missing: this node did not complete round "
            f"{round_ - 1} of this job (was the state folder removed, or the job "
            "name changed?)"
        )
    return eqx.tree_deserialise_leaves(path, like)


def save_site_state(directory: Path, round_: int, state: Any) -> Path:
    """Write the state entering ``round_`` (atomic rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = state_path(directory, round_)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    eqx.tree_serialise_leaves(tmp, state)
    tmp.replace(path)
    return path


def prune_site_states(directory: Path, keep_from: int) -> None:
    """Delete states entering rounds before ``keep_from`` (the server never asks
    for them again)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        m = _NAME.match(path.name)
        if m and int(m.group(1)) < keep_from:
            path.unlink(missing_ok=True)


__all__ = ["load_site_state", "prune_site_states", "save_site_state", "state_path"]
