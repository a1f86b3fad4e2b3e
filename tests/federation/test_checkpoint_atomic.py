"""Checkpoints are one file written atomically and verified on load: a kill
while saving leaves the previous round's checkpoint, and a damaged or foreign
checkpoint is an error naming its folder, never a silent resume (the old two-file
format resumed with one round too many)."""

import hashlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phems_clinical import outputs
from phems_clinical.federation import engine
from phems_clinical.federation.engine import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    run_federated,
    save_checkpoint,
)
from phems_clinical.federation.strategies import fedadam, objective_from_loss

ROUNDS = 6


@pytest.fixture(scope="module")
def setup(logistic_sites):
    sites, _, loss = logistic_sites
    alg = fedadam(
        objective_from_loss(loss),
        jnp.zeros(3),
        learning_rate=0.5,
        server_learning_rate=0.3,
        local_steps=3,
        max_rounds=ROUNDS,
    )
    return alg, sites, run_federated(jax.random.key(5), alg, sites)


def _like(alg, sites):
    return alg.init_server(jax.random.key(5)), [alg.init_site(s) for s in sites]


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@pytest.mark.parametrize("where", ["serialise", "rename"])
def test_kill_while_saving_keeps_the_previous_round(
    setup, tmp_path, monkeypatch, where
):
    """Killed while writing round 4's checkpoint (half the state serialised, or at
    the rename): the file still holds round 3, byte for byte, and the resumed run
    equals the uninterrupted one round for round."""
    alg, sites, ref = setup
    run_federated(jax.random.key(5), alg, sites, checkpoint_dir=tmp_path, stop_after=3)
    before = checkpoint_path(tmp_path).read_bytes()
    if where == "serialise":

        def half(buf, tree):
            buf.write(b"\x00" * 16)
            raise Killed

        monkeypatch.setattr(engine.eqx, "tree_serialise_leaves", half)
    else:

        def killed(src, dst):
            raise Killed

        monkeypatch.setattr(outputs.os, "replace", killed)
    with pytest.raises(Killed):
        run_federated(jax.random.key(5), alg, sites, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    assert checkpoint_path(tmp_path).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.eqx"]
    resumed = run_federated(jax.random.key(5), alg, sites, checkpoint_dir=tmp_path)
    assert resumed.rounds == ROUNDS
    assert [r.round for r in resumed.history] == list(range(ROUNDS))
    _same(resumed.server, ref.server)


def _saved(setup, tmp_path):
    alg, sites, _ = setup
    run_federated(jax.random.key(5), alg, sites, checkpoint_dir=tmp_path, stop_after=3)
    return checkpoint_path(tmp_path).read_bytes()


def _split(raw):
    magic, rest = raw.split(b"\n", 1)
    manifest, digest, state = rest.split(b"\n", 2)
    return magic + b"\n", manifest, digest, state


def _flip(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1 :]


def _resign(manifest: dict) -> tuple[bytes, bytes]:
    m = json.dumps(manifest).encode()
    return m, hashlib.sha256(m).hexdigest().encode()


def _corrupt(part, raw):
    magic, manifest, digest, state = _split(raw)
    if part == "magic":
        return b"PHEMS-CHECKPOINT 0\n" + raw[len(magic) :]
    if part == "manifest":
        return (
            magic
            + manifest.replace(b'"round": 3', b'"round": 4')
            + b"\n"
            + digest
            + b"\n"
            + state
        )
    if part == "digest":
        return magic + manifest + b"\n" + _flip(digest, 0) + b"\n" + state
    if part == "state":
        return magic + manifest + b"\n" + digest + b"\n" + _flip(state, len(state) // 2)
    if part == "truncated":
        return raw[: len(raw) - 10]
    meta = json.loads(manifest)
    if part == "round count":  # re-signed: as if the history had lost a round
        meta["history"] = meta["history"][:2]
    elif part == "round order":
        meta["history"][2]["round"] = 1
    m, d = _resign(meta)
    return magic + m + b"\n" + d + b"\n" + state


@pytest.mark.parametrize(
    "part, why",
    [
        ("magic", "not a checkpoint of this format"),
        ("manifest", "manifest does not match its SHA-256"),
        ("digest", "manifest does not match its SHA-256"),
        ("state", "state does not match the SHA-256"),
        ("truncated", "state does not match the SHA-256"),
        ("round count", "says 3 rounds but its history has [0, 1]"),
        ("round order", "says 3 rounds but its history has [0, 1, 1]"),
    ],
)
def test_each_corrupted_part_is_refused_naming_the_folder(setup, tmp_path, part, why):
    alg, sites, _ = setup
    raw = _saved(setup, tmp_path)
    assert load_checkpoint(tmp_path, *_like(alg, sites))[2][-1].round == 2
    checkpoint_path(tmp_path).write_bytes(_corrupt(part, raw))
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path))) as err:
        run_federated(jax.random.key(5), alg, sites, checkpoint_dir=tmp_path)
    assert why in str(err.value)


def test_foreign_state_is_refused(setup, tmp_path):
    alg, sites, _ = setup
    _saved(setup, tmp_path)
    server, states = _like(alg, sites)
    with pytest.raises(CheckpointError, match="does not fit this run"):
        load_checkpoint(tmp_path, server, states[:2])  # fewer sites
    wider = jax.tree.map(lambda x: jnp.zeros((*jnp.shape(x), 2)), server)
    with pytest.raises(CheckpointError, match="does not fit this run"):
        load_checkpoint(tmp_path, wider, states)  # another model's parameters


def test_old_two_file_checkpoint_is_refused(setup, tmp_path):
    alg, sites, _ = setup
    server, states = _like(alg, sites)
    import equinox as eqx

    eqx.tree_serialise_leaves(tmp_path / "state.eqx", (server, states))
    (tmp_path / "history.json").write_text("[]")
    with pytest.raises(CheckpointError, match="not a checkpoint of this format"):
        load_checkpoint(tmp_path, server, states)
    (tmp_path / "state.eqx").unlink()
    with pytest.raises(CheckpointError, match="older two-file format"):
        load_checkpoint(tmp_path, server, states)


def test_history_round_trips_with_audit_heads(tmp_path):
    rec = engine.RoundRecord(0, (0, 2), ((1, "timeout"),), 2, 0.5, ((0, 7, "ab12"),))
    save_checkpoint(tmp_path, {"x": jnp.ones(2)}, [], [rec])
    _, _, history = load_checkpoint(tmp_path, {"x": jnp.zeros(2)}, [])
    assert history == [rec]
