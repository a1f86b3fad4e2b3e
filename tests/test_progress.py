"""Progress events (phems_clinical.progress): the engine reports one step per
round with the server's objective, the pipeline reports derive/score/train steps
with their totals, listeners never change results, bars are off unless stderr is
a terminal, and the log listener records each stage with its duration."""

import io
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phems_clinical import progress as pg
from phems_clinical.federation.core import Algorithm
from phems_clinical.federation.engine import run_federated


class _Server(NamedTuple):
    x: jax.Array
    f: jax.Array
    round: jax.Array


def _gradient_descent(
    targets_dim: int = 2, lr: float = 0.5, max_rounds: int = 50
) -> Algorithm:
    """Federated gradient descent on sum_i 0.5 |x - y_i|^2, declared under the
    ``fed_focei`` message (ofv, grad): the server's objective after round r is
    that of the point it evaluated in round r, by hand below."""

    def init_server(key):
        del key
        return _Server(
            jnp.zeros(targets_dim), jnp.asarray(jnp.inf), jnp.zeros((), jnp.int32)
        )

    def local_update(message, site, state, key):
        del key
        r = message["x"] - site.y
        ofv = 0.5 * jnp.sum(jnp.where(site.mask[:, None], r, 0.0) ** 2)
        grad = jnp.sum(jnp.where(site.mask[:, None], r, 0.0), axis=0)
        return {"ofv": ofv, "grad": grad}, state, {}

    def aggregate(server, total, key):
        del key
        return _Server(
            server.x - lr * total["grad"] / 6.0, total["ofv"], server.round + 1
        )

    return Algorithm(
        "fed_focei",
        init_server,
        lambda site: jnp.zeros(()),
        lambda s: {"x": s.x},
        local_update,
        aggregate,
        lambda s: jnp.max(jnp.abs(s.x - 1.0)) < 1e-3,
        lambda s: {"x": s.x, "ofv": s.f, "rounds": int(s.round)},
        {"ofv": (), "grad": (targets_dim,)},
        max_rounds=max_rounds,
    )


class _Site(NamedTuple):
    y: jax.Array
    mask: jax.Array


def _sites():
    # three sites of two patients each; every patient at (1, 1) +- 0.5: the
    # optimum is x = (1, 1), reached geometrically at rate 1 - lr = 0.5
    offs = jnp.asarray([[0.5, -0.5], [-0.5, 0.5]])
    return [_Site(1.0 + offs * s, jnp.ones(2, bool)) for s in (1.0, -1.0, 0.0)]


def test_engine_reports_every_round_with_its_objective():
    events = []
    alg = _gradient_descent()
    run = run_federated(jax.random.key(0), alg, _sites(), progress=events.append)
    quiet = run_federated(jax.random.key(0), alg, _sites())
    np.testing.assert_array_equal(
        np.asarray(run.server.x), np.asarray(quiet.server.x)
    )  # observes only
    assert events[0] == pg.ProgressEvent(
        "start", "rounds", 0, None, "", {"at_most": 50, "resumed_at": 0}
    )
    steps = [e for e in events if e.kind == "step"]
    assert [e.done for e in steps] == list(range(1, run.rounds + 1))
    assert all(
        e.total is None and e.info["at_most"] == 50 and e.info["sites"] == "3/3"
        for e in steps
    )
    # by hand: x_r = 1 - 0.5^r in both coordinates (the mean of the y_i is
    # (1, 1), the step halves the distance); round r's objective is the one the
    # sites evaluated at x_{r-1}: sum_i 0.5 |x_{r-1} - y_i|^2
    ys = np.concatenate([np.asarray(s.y) for s in _sites()])
    for e in steps:
        x = 1.0 - 0.5 ** (e.done - 1)
        want = 0.5 * np.sum((x - ys) ** 2)
        assert e.info["ofv"] == pytest.approx(want, rel=1e-12)
    assert events[-1].kind == "end" and events[-1].done == run.rounds
    assert events[-1].info == {"converged": True} and run.converged
    # x_r within 1e-3 of 1 first at r = 10 (0.5^10 < 1e-3 < 0.5^9)
    assert run.rounds == 10


def test_the_round_is_compiled_once():
    """The toy server starts with a weak-typed objective (``jnp.asarray(inf)``)
    and aggregates to a strong one: the engine makes the start strong, so rounds
    2.. reuse round 1's compiled call instead of compiling it again (the second
    compile of fed_focei's whole round took as long as the first)."""
    from phems_clinical.federation.engine import _compile

    alg = _gradient_descent()
    assert alg.init_server(jax.random.key(0)).f.weak_type
    run = run_federated(jax.random.key(0), alg, _sites(), max_rounds=3)
    assert run.rounds == 3
    assert _compile(alg).whole_round._cache_size() == 1


def test_training_labels_the_rounds_with_the_source():
    from phems_clinical.runner.training import FederationSettings, train

    events = []
    run, _ = train(
        jax.random.key(0),
        lambda opts: _gradient_descent(),
        _sites(),
        FederationSettings(),
        label="real (inprocess)",
        progress=events.append,
    )
    assert {e.label for e in events} == {"real (inprocess)"}
    assert sum(e.kind == "step" for e in events) == run.rounds


def test_helpers_offset_and_label_events():
    got = []
    part = pg.within(got.append, offset=6, total=9, suffix=" at H2")
    pg.begin(part, "score", 3)
    pg.step(part, "score", 2, 3, "synthetic")
    pg.note(part, "hello")
    pg.end(part, "score", 3, 3)
    assert got == [
        pg.ProgressEvent("step", "score", 8, 9, "synthetic at H2", {}),
        pg.ProgressEvent("note", "", 0, None, "hello", {}),
    ]
    got.clear()
    pg.step(pg.labelled(got.append, "real"), "rounds", 1, None)
    assert got[0].label == "real"
    assert pg.within(pg.silent, 0, 1) is pg.silent
    assert pg.labelled(pg.silent, "x") is pg.silent


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_only_on_a_terminal_and_when_enabled():
    assert pg.bars(stream=io.StringIO())[0] is pg.silent  # a file or a pipe
    assert pg.bars(enabled=False, stream=_Terminal())[0] is pg.silent  # quiet
    term = _Terminal()
    listener, close = pg.bars(stream=term)
    assert listener is not pg.silent
    pg.begin(listener, "derive", 4)
    pg.step(listener, "derive", 2, 4, "real at H1")
    pg.end(listener, "derive", 4, 4)
    pg.begin(listener, "rounds", None, at_most=2000)
    pg.step(listener, "rounds", 7, None, at_most=2000, ofv=123.4)
    close()
    text = term.getvalue()
    assert "derive" in text and "4/4" in text and "real at H1" in text
    assert "at most 2000" in text and "ofv 123.4" in text
    assert "7round" in text.replace(" ", "")  # a count without a total: no ETA


def test_log_listener_records_stages_with_durations(caplog):
    log = logging.getLogger("phems_clinical.test_progress")
    listener = pg.log_events(log, every=5)
    with caplog.at_level(logging.DEBUG, logger=log.name):
        pg.begin(listener, "train", 2)
        for r in range(1, 12):
            pg.step(listener, "rounds", r, None, at_most=100, ofv=1.5)
        pg.note(listener, "real: 11 rounds (Cauchy test)")
        pg.end(listener, "train", 2, 2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "train: started (2 steps)"
    # rounds 1, 5, 10 of 11 (every 5th and the first)
    assert [ln.split()[1] for ln in lines if ln.startswith("rounds")] == [
        "1",
        "5",
        "10",
    ]
    assert "at most 100, ofv 1.5" in lines[1]
    assert lines[-2] == "real: 11 rounds (Cauchy test)"
    assert lines[-1].startswith("train: finished after 2 steps in ")
    assert lines[-1].endswith(" s")


def test_pipeline_reports_derive_score_and_train_totals(tmp_path):
    """A tiny PICU run (3 hospitals, one held out; two sources, both the real
    data; 3 FedAdam rounds): the pipeline's events count sources x sites, sites
    x sources and sources, and listening changes no result."""
    from phems_clinical import usecases
    from phems_clinical.app.derive import load_use_case
    from phems_clinical.evaluation.sources import SourceSpec
    from phems_clinical.runner.experiment import simulate_sites
    from phems_clinical.runner.pipeline import run_pipeline
    from phems_clinical.runner.training import FederationSettings

    simulate_sites("picu", jax.random.key(3), 3, 30, None, tmp_path)
    sites, _ = load_use_case("picu", omop=str(tmp_path))
    sites = {s: d.drop(columns="SITE", errors="ignore") for s, d in sites.items()}
    task = usecases.get("picu").task
    model = task.model_from_config({})
    sources = [
        SourceSpec("real", "real"),
        SourceSpec("again", "real"),
    ]  # a second source; real is fastest
    names = list(sites)

    def run(progress):
        return run_pipeline(
            jax.random.key(1),
            task,
            sites,
            model,
            sources,
            holdout_site=names[2],
            n_attacks=10,
            progress=progress,
            federation=FederationSettings(options={"rounds": 3}),
        )

    events = []
    got = run(events.append)
    by = {
        t: [e for e in events if e.task == t]
        for t in ("derive", "score", "train", "rounds")
    }
    assert [(e.kind, e.done, e.total) for e in by["derive"]] == [
        ("start", 0, 4),
        ("step", 1, 4),
        ("step", 2, 4),
        ("step", 3, 4),
        ("step", 4, 4),
        ("end", 4, 4),
    ]
    assert [e.label for e in by["derive"][1:5]] == [
        f"{src} at {s}" for src in ("real", "again") for s in names[:2]
    ]
    assert [(e.kind, e.done, e.total) for e in by["score"]] == [
        ("start", 0, 4),
        ("step", 1, 4),
        ("step", 2, 4),
        ("step", 3, 4),
        ("step", 4, 4),
        ("end", 4, 4),
    ]
    assert by["score"][3].label == f"real at {names[1]}"
    assert [(e.kind, e.done, e.label) for e in by["train"]] == [
        ("start", 0, ""),
        ("step", 1, "real"),
        ("step", 2, "again"),
        ("end", 2, ""),
    ]
    rounds = [e for e in by["rounds"] if e.kind == "step"]
    assert [e.done for e in rounds] == [1, 2, 3] * 2
    assert {e.label.split()[0] for e in rounds} == {"real", "again"}
    notes = [e.label for e in events if e.kind == "note"]
    assert notes[0] == "derived real at 2 sites"
    assert notes[-1].startswith("again: 3 rounds")
    quiet = run(None)
    assert quiet.sources == got.sources
