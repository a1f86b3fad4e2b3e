"""An in-memory Flower Grid whose nodes are the real ClientApp, for the SecAgg
tests (tests/federation/test_flower_secagg.py) and their red-team counterparts
(tests/security/test_flower_secagg_attacks.py).

Every message the ServerApp sends and every reply crosses Flower's wire format
(deflated into its object store form and inflated again); ``Grid.transcript``
keeps the bytes of every reply the server received. Imported after the test
module's ``pytest.importorskip("flwr")``.
"""

import itertools
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip(
    "flwr", reason="the Flower adapter needs flwr>=1.41,<1.42, which is not installed"
)

from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import (  # noqa: E402
    get_all_nested_objects,
)
from flwr.supercore.inflatable.inflatable_utils import (  # noqa: E402
    inflate_object_from_contents,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from phems_clinical.federation.core import Algorithm, flatten_payload  # noqa: E402
from phems_clinical.federation.flower import client_app  # noqa: E402
from phems_clinical.federation.flower import config as fconfig  # noqa: E402
from phems_clinical.federation.flower import secagg_transport as st  # noqa: E402
from phems_clinical.federation.flower.launch import (  # noqa: E402
    secagg_identities,
    simulate_sites,
)
from phems_clinical.federation.flower.records import record_to_arrays  # noqa: E402
from phems_clinical.federation.flower.server_app import run_server  # noqa: E402

D = 2


def wire_bytes(record) -> dict:
    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}


def over_the_wire(record):
    """Deflate a record into Flower's object store form and inflate it again."""
    return inflate_object_from_contents(record.object_id, wire_bytes(record))


def toy(settings, n_occ) -> Algorithm:
    """A weighted average on the site's cohort (mean concentration and mean dose),
    whose site state changes the payload; named fedavg for the message schema."""
    del settings, n_occ

    def init_server(key):
        del key
        return {"w": jnp.zeros(D), "round": jnp.zeros((), jnp.int32)}

    def local_update(message, site, state, key):
        data = site.cohort
        n = jnp.sum(data.obs_mask).astype(jnp.float64)
        dv = jnp.sum(jnp.where(data.obs_mask, data.obs_dv, 0.0)) / n
        dose = jnp.sum(data.dose_amt) / jnp.maximum(jnp.sum(data.dose_amt > 0), 1)
        target = jnp.stack([dv, dose / 100.0])
        delta = (
            n * (target - message["w"]) + state + 1e-3 * jax.random.normal(key, (D,))
        )
        return {"delta": delta, "weight": n}, state + 1.0, {}

    def aggregate(server, total, key):
        del key
        return {
            "w": server["w"] + total["delta"] / total["weight"],
            "round": server["round"] + 1,
        }

    return Algorithm(
        "fedavg",
        init_server,
        lambda data: jnp.zeros(D),
        lambda s: {"w": s["w"]},
        local_update,
        aggregate,
        lambda s: s["round"] >= 100,
        lambda s: {"w": s["w"]},
        {"delta": (D,), "weight": ()},
        max_rounds=100,
    )


class Grid:
    """The part of ``flwr.serverapp.Grid`` the ServerApp uses, in memory: each node
    is the real ClientApp (``client_app.app``) with its own node config; every
    message and reply crosses Flower's wire format. ``transcript`` keeps the bytes
    of every reply the server received; ``drop`` silences (stage, round, site)."""

    def __init__(self, node_configs, run_config, drop=(), tamper=None, replay=()):
        self.nodes = {100 + k: cfg for k, cfg in enumerate(node_configs)}
        self.run_config = run_config
        self.drop, self.tamper, self.replay = set(drop), tamper, set(replay)
        self.replayed = {}
        self.outbox, self.transcript, self.replies = {}, [], []
        self.ids = itertools.count()
        self.seen_files: list[tuple[str, int]] = []

    def get_node_ids(self):
        return list(self.nodes)

    def _stage(self, msg):
        if msg.metadata.message_type == st.MESSAGE_TYPE:
            head = msg.content["config"]
            return str(head["stage"]), int(head["round"])
        if msg.metadata.message_type == MessageType.TRAIN:
            return "train", int(msg.content["config"]["round"])
        return "query", -1

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = f"msg-{next(self.ids)}"
            msg.metadata.__dict__["_message_id"] = mid  # as HttpGrid.push_messages
            node = msg.metadata.dst_node_id
            stage, r = self._stage(msg)
            if self.tamper is not None:  # a dishonest server's edit
                msg.content = self.tamper(stage, msg.content)
            msg.content = over_the_wire(msg.content)
            ctx = Context(
                run_id=1,
                node_id=node,
                node_config=self.nodes[node],
                state=RecordDict(),
                run_config=self.run_config,
            )
            reply = client_app.app(msg, ctx)
            if (stage, r, node - 100) in self.replay:  # the same message again
                self.replayed[stage, r, node - 100] = client_app.app(msg, ctx)
            folder = Path(self.nodes[node]["state-dir"]) / "job"
            self.seen_files += [
                (p.name, stat.S_IMODE(p.stat().st_mode))
                for p in folder.glob("secagg-*.json")
            ]
            if (stage, r, node - 100) in self.drop:
                ids.append(mid)
                continue
            if not reply.has_error():
                self.transcript.append(b"".join(wire_bytes(reply.content).values()))
                self.replies.append((stage, r, node - 100, reply.content))
                reply = Message(over_the_wire(reply.content), reply_to=msg)
            self.outbox[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(m) for m in message_ids if m in self.outbox]


def make_site_dirs(folder):
    """Three simulated hospitals in ``folder``, each with its SecAgg identity and
    the trusted roster (as the loopback launcher writes them)."""
    dirs = simulate_sites(jax.random.key(11), folder, 24)
    secagg_identities(dirs)
    return dirs


def use_toy(monkeypatch) -> None:
    """Register :func:`toy` as algorithm ``toy`` and give Flower messages a task
    identity (as inside a Flower app process)."""
    monkeypatch.setitem(fconfig.ALGORITHMS, "toy", toy)
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def run_grid(
    dirs,
    tmp,
    *,
    secure,
    drop=(),
    required=True,
    fail=None,
    tamper=None,
    replay=(),
    site_keys=None,
    **kw,
):
    settings = fconfig.RunSettings(
        algorithm="toy",
        num_sites=3,
        rounds=2,
        seed=3,
        round_timeout=0.3,
        job="job",
        secagg=secure,
        **kw,
    )
    nodes = [
        {
            "site-dir": str(d),
            "site-index": k,
            "num-sites": 3,
            "state-dir": str(tmp / f"state_{k}"),
            "secagg-required": required,
            **({"fail-rounds": fail[k]} if fail and k in fail else {}),
            **({"site-key": str(site_keys[k])} if site_keys else {}),
        }
        for k, d in enumerate(dirs)
    ]
    grid = Grid(nodes, fconfig.to_run_config(settings), drop, tamper, replay)
    return run_server(grid, settings), grid


def train_payloads(grid, r=0) -> dict[int, np.ndarray]:
    """What a curious server reads from a plain run: each site's payload of round
    ``r``, flattened as SecAgg would."""
    return {
        k: flatten_payload(
            record_to_arrays(c["payload"]), {"delta": (D,), "weight": ()}
        )
        for stage, rr, k, c in grid.replies
        if stage == "train" and rr == r and "payload" in c
    }
