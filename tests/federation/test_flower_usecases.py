"""Every use case on the Flower apps (phems_clinical.federation.flower.tasks).

* the summed rounds' arrays and the per-use-case query replies are declared in
  ``federation_message.schema.json`` and checked like payloads (names, shapes,
  finite values; errors name fields, never values); an unknown use case is refused
  by name;
* the ServerApp's loop over an in-memory Grid whose sites run the real ClientApp
  handlers (each site reading only its own folder) equals the runner's in-process
  problem + engine for the same seed: PICU bit for bit (weights, threshold,
  held-out metrics), cardiac to 1e-12; with secure aggregation the sums stay
  within the recorded quantisation bounds;
* slow: real Flower processes on loopback (one SuperLink, a SuperNode per site)
  through :func:`phems_clinical.runner.training.train_flower` equal the same
  in-process runs.
"""

import itertools
import json
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower adapter needs flwr>=1.41,<1.42")

from flwr.app import Message, MessageType  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from phems_clinical import usecases  # noqa: E402
from phems_clinical.app.derive import load_use_case  # noqa: E402
from phems_clinical.federation.flower import client_app  # noqa: E402
from phems_clinical.federation.flower import tasks as ft  # noqa: E402
from phems_clinical.federation.flower.config import (  # noqa: E402
    RunSettings,
    to_run_config,
)
from phems_clinical.federation.flower.launch import secagg_identities  # noqa: E402
from phems_clinical.federation.flower.server_app import run_server  # noqa: E402
from phems_clinical.federation.messages import MessageRejected  # noqa: E402
from phems_clinical.runner.experiment import simulate_sites  # noqa: E402
from phems_clinical.runner.training import (  # noqa: E402
    FederationSettings,
    train,
    train_flower,
)

SEED = 5
ROUNDS = 2


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Three tiny simulated hospitals per use case (two train, one held out)."""
    out = {}
    for use_case, n in (("picu", 24), ("cardiac", 80)):
        folder = tmp_path_factory.mktemp(use_case)
        simulate_sites(use_case, jax.random.key(3), 3, n, None, folder)
        sites, _ = load_use_case(use_case, omop=str(folder))
        out[use_case] = [sites[s].drop(columns="SITE", errors="ignore") for s in sites]
    return out


@pytest.fixture
def ids(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _model_json(use_case, model):
    return json.dumps(model._asdict() if use_case == "picu" else dict(model))


def _in_process(use_case, frames, options):
    task = usecases.get(use_case).task
    model = task.model_from_config({})
    prob = task.problem(jax.random.key(SEED), frames, task.strategy, model)
    run, _ = train(
        jax.random.key(SEED),
        prob.build,
        prob.sites,
        FederationSettings(options=options),
    )
    return task, model, prob.finish(run.result), run


def _site_dirs(use_case, frames, root: Path):
    uc = ft.use_case(use_case)
    dirs = []
    for k, df in enumerate(frames):
        d = root / f"site_{k}"
        d.mkdir(parents=True, exist_ok=True)
        ft.write_table(df, d / uc.data_file)
        dirs.append(d)
    return dirs


class _AppGrid:
    """An in-memory ``Grid`` whose nodes run the ClientApp's handlers on their own
    site folder (query, train, train.secagg), as a SuperNode would."""

    def __init__(self, dirs, settings, secagg=False):
        self.run_config = to_run_config(settings)
        self.nodes = {
            100 + k: {
                "site-dir": str(d),
                "site-index": k,
                "num-sites": len(dirs),
                **({"secagg-required": True} if secagg else {}),
            }
            for k, d in enumerate(dirs)
        }
        self.outbox, self.ids, self.seen = {}, itertools.count(), []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        out = []
        for msg in messages:
            mid = f"msg-{next(self.ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            node = self.nodes[msg.metadata.dst_node_id]
            kind = msg.metadata.message_type
            self.seen.append(
                (kind, dict(msg.content["config"]) if "config" in msg.content else {})
            )
            if kind == MessageType.QUERY:
                content = client_app.site_query(node, self.run_config, 1)
            elif kind == MessageType.TRAIN:
                content = client_app.site_update(msg.content, node, self.run_config, 1)
            else:
                content = client_app.site_secagg(msg.content, node, self.run_config, 1)
            self.outbox[mid] = Message(content, reply_to=msg)
            out.append(mid)
        return out

    def pull_messages(self, message_ids):
        return [self.outbox.pop(m) for m in message_ids if m in self.outbox]


def _settings(use_case, model, tmp_path, **kw):
    task = usecases.get(use_case).task
    return RunSettings(
        seed=SEED,
        algorithm=task.strategy,
        use_case=use_case,
        model=_model_json(use_case, model),
        num_sites=2,
        rounds=ROUNDS,
        options=json.dumps({"rounds": ROUNDS}),
        round_timeout=60.0,
        out=str(tmp_path / "result.json"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        job="fit",
        **kw,
    )


def _fitted(task, report, settings, model):
    sums = {
        s: {f: np.asarray(v) for f, v in fields.items()}
        for s, fields in report["summaries"].items()
    }
    result = {
        k: (np.asarray(v) if isinstance(v, list) else v)
        for k, v in report["result"].items()
    }
    return task.flower_fitted(result, settings, sums, model)


# ------------------------------------------------------------------ contracts
def test_unknown_use_case_is_refused_by_name():
    with pytest.raises(ValueError, match="run config use-case: 'oncology'"):
        ft.use_case("oncology")


def test_every_summed_round_is_declared_in_the_schema():
    """Each stage's fields and ranks are exactly the schema's
    ``$defs/summary_<stage>`` (what may leave a site), and its round number lies
    apart from the training rounds."""
    defs = ft.load_message_schema()["$defs"]
    settings = RunSettings(use_case="picu")
    for name in ft.USE_CASES:
        uc = ft.use_case(name)
        assert uc.query in defs and "site-index" in defs[uc.query]["required"]
        for stage in uc.before + uc.after:
            declared = defs[f"summary_{stage.name}"]["properties"]
            spec = stage.spec(settings, {})
            assert set(spec) == set(declared)
            assert all(len(spec[f]) == len(declared[f]["x-shape"]) for f in spec)
            assert ft.stage_round(uc, stage.name) >= ft.SUMMARY_ROUND
            assert stage.clip > 0


def test_summaries_are_checked_like_payloads():
    spec = {"D": (2, 3), "E": (2, 3), "Dx": (2, 1), "Dx2": (2, 1), "n": ()}
    good = {f: np.ones(s) for f, s in spec.items()}
    ft.check_summary("cardiac_stats", good, spec)
    secret = 4711.25
    for bad, why in (
        ({**good, "ids": np.ones(2)}, "fields expected exactly"),
        ({k: v for k, v in good.items() if k != "n"}, "fields"),
        ({**good, "D": np.ones((3, 3))}, "cardiac_stats.D: shape"),
        ({**good, "n": np.array(np.nan)}, "finite"),
        ({**good, "E": np.full((2, 3), secret, np.int64)}, "dtype"),
    ):
        with pytest.raises(MessageRejected, match=why) as err:
            ft.check_summary("cardiac_stats", bad, spec)
        assert "4711" not in str(err.value)
    with pytest.raises(MessageRejected, match="not declared"):
        ft.check_summary("picu_rows", good, spec)


def test_query_replies_are_checked_per_use_case():
    picu = ft.use_case("picu")
    assert ft.check_query({"site-index": 1, "n-stays": 4, "n-hours": 9}, picu, 2) == {
        "site-index": 1,
        "n-stays": 4,
        "n-hours": 9,
    }
    for bad, why in (
        ({"site-index": 0, "n-stays": 4}, "expected exactly"),
        ({"site-index": 0, "n-stays": 0, "n-hours": 9}, "n-stays"),
        ({"site-index": 0, "n-stays": "MRN-1", "n-hours": 9}, "n-stays"),
        ({"site-index": 2, "n-stays": 4, "n-hours": 9}, "site-index"),
        ({"site-index": 0, "n-stays": 4, "n-hours": 9, "mrn": 7}, "expected exactly"),
    ):
        with pytest.raises(MessageRejected, match=why) as err:
            ft.check_query(bad, picu, 2)
        assert "MRN" not in str(err.value)


def test_secure_sum_bound_refuses_by_field():
    stage = ft.use_case("picu").before[0]
    with pytest.raises(ValueError, match="total_sq exceed the secure-aggregation"):
        ft.check_clip(stage, {"count": np.ones(2), "total_sq": np.array([1e14])})


def test_site_table_reads_back_exactly(frames, tmp_path):
    df = frames["cardiac"][0]
    ft.write_table(df, tmp_path / "sojourns.csv")
    from phems_clinical.federation.flower.config import SiteConfig

    back = ft.read_table(SiteConfig(tmp_path, 0), ft.use_case("cardiac"))
    for c in ("entry", "exit", "weight_z", "age_days"):
        np.testing.assert_array_equal(back[c].to_numpy(), df[c].to_numpy())
    with pytest.raises(FileNotFoundError, match="no picu table"):
        ft.read_table(SiteConfig(tmp_path, 0), ft.use_case("picu"))


# ------------------------------------------- the apps over an in-memory grid
def test_picu_apps_equal_the_in_process_runner(frames, ids, tmp_path):
    """Flower's PICU run (standardisation sums, FedAdam, threshold round) gives
    bit for bit the runner's in-process weights, threshold and held-out scores;
    only counts and population sums cross."""
    train_frames, held = frames["picu"][:2], frames["picu"][2]
    task, model, ref, run = _in_process("picu", train_frames, {"rounds": ROUNDS})
    settings = _settings("picu", model, tmp_path)
    grid = _AppGrid(_site_dirs("picu", train_frames, tmp_path / "sites"), settings)
    report = run_server(grid, settings)
    assert report["status"] == "completed" and report["rounds"] == ROUNDS
    np.testing.assert_array_equal(
        np.asarray(report["result"]["x"]), np.asarray(run.result["x"])
    )
    ours = _fitted(task, report, settings, model)
    assert ours.estimates == ref.estimates  # threshold, train utility, intercept
    assert task.evaluate(ours, held, model) == task.evaluate(ref, held, model)
    assert [s["stage"] for s in report["summary_rounds"]] == [
        "picu_stats",
        "picu_threshold",
    ]
    stages = {c.get("stage") for kind, c in grid.seen if kind == MessageType.TRAIN}
    assert stages == {None, "picu_stats", "picu_threshold"}


def test_cardiac_apps_equal_the_in_process_runner_and_resume(frames, ids, tmp_path):
    """Cardiac: the scaling totals summed over Flower give the in-process
    objective; a run cut after one round resumes from its checkpoint (and the
    kept sums) to the uninterrupted result."""
    train_frames, held = frames["cardiac"][:2], frames["cardiac"][2]
    task, model, ref, run = _in_process("cardiac", train_frames, {"rounds": ROUNDS})
    settings = _settings("cardiac", model, tmp_path)
    grid = _AppGrid(_site_dirs("cardiac", train_frames, tmp_path / "sites"), settings)
    first = run_server(grid, settings._replace(rounds=1))
    assert first["rounds"] == 1 and first["resumed_after"] == 0
    report = run_server(grid, settings)
    assert report["resumed_after"] == 1 and report["rounds"] == ROUNDS
    assert report["summary_rounds"] == []  # the sums came with the checkpoint
    np.testing.assert_allclose(
        np.asarray(report["result"]["x"]),
        np.asarray(run.result["x"]),
        rtol=0,
        atol=1e-12,
    )
    ours = _fitted(task, report, settings, model)
    for k, v in ref.estimates.items():
        assert ours.estimates[k] == pytest.approx(v, rel=0, abs=1e-12)
    for k, v in task.evaluate(ref, held, model).items():
        assert task.evaluate(ours, held, model)[k] == pytest.approx(v, abs=1e-9)


def test_cardiac_apps_under_secure_aggregation(frames, ids, tmp_path):
    """With ``secagg`` every sum (the scaling totals and each round's payloads)
    arrives only as a securely aggregated sum; the result stays within the
    recorded quantisation bounds of the in-process run, and no site's summand
    leaves in the clear."""
    train_frames = frames["cardiac"][:2]
    task, model, ref, run = _in_process("cardiac", train_frames, {"rounds": ROUNDS})
    settings = _settings("cardiac", model, tmp_path, secagg=True)
    dirs = _site_dirs("cardiac", train_frames, tmp_path / "sites")
    secagg_identities(dirs)
    grid = _AppGrid(dirs, settings, secagg=True)
    report = run_server(grid, settings)
    sec = report["secure_aggregation"]
    assert sec["summaries"]["cardiac_stats"]["bits"] == ft.SECAGG_BITS
    assert report["summary_rounds"][0]["secure"] is True
    assert all(
        "secagg-round-id" in c for kind, c in grid.seen if kind == MessageType.TRAIN
    )
    x, x_ref = np.asarray(report["result"]["x"]), np.asarray(run.result["x"])
    assert not np.array_equal(x, x_ref)  # quantised sums: not the clear ones
    np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="secagg-round-id"):  # no clear summand
        client_app.site_update(
            _summary_message(settings), grid.nodes[100], grid.run_config, 1
        )


def _summary_message(settings):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    return RecordDict(
        {
            "broadcast": ArrayRecord({}),
            "config": ConfigRecord(
                {
                    "round": ft.SUMMARY_ROUND,
                    "site-index": 0,
                    "num-sites": 2,
                    "n-episodes": 80,
                    "state-from": 0,
                    "stage": "cardiac_stats",
                }
            ),
        }
    )


# --------------------------------------------------------- real processes
@pytest.mark.slow
@pytest.mark.parametrize("use_case", ["picu", "cardiac"])
def test_loopback_use_case_equals_in_process(use_case, frames, tmp_path):
    """One SuperLink and a SuperNode per site as separate processes (TLS, node
    authentication) through the runner's Flower engine: the in-process result for
    the same seed (PICU bit for bit, cardiac to 1e-12), threshold included."""
    train_frames = frames[use_case][:2]
    task, model, ref, run = _in_process(use_case, train_frames, {"rounds": ROUNDS})
    fitted, calibration, res = train_flower(
        task,
        None,
        SEED,
        train_frames,
        task.strategy,
        model,
        FederationSettings("flower", options={"rounds": ROUNDS}),
        tmp_path,
    )
    assert calibration == {} and res["rounds"] == ROUNDS
    for k, v in ref.estimates.items():
        assert fitted.estimates[k] == pytest.approx(v, rel=0, abs=1e-12)
    if use_case == "picu":
        assert fitted.estimates == ref.estimates
