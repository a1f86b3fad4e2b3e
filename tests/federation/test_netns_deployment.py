"""The multi-machine Flower deployment (phems_clinical.federation.flower.deploy).

* fast: each role's step writes what that role holds and refuses bad input by
  option name; the command lines verify the consortium CA and authenticate;
* slow: ``experiments/deployment/netns_federation.sh`` runs a coordinator and
  three hospitals in separate network namespaces with the documented commands;
  the fit equals the in-process engine's bit for bit, a hospital cannot reach
  another hospital, and nothing is left behind. Skipped where network namespaces
  cannot be made (not root, or a container without the capability).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from phems_clinical.federation.flower import deploy

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "deployment" / "netns_federation.sh"


def _site(tmp_path):
    site = tmp_path / "hospital" / "site"
    site.mkdir(parents=True)
    (site / "cohort.csv").write_text("ID,TIME,AMT,DV\n")
    return site


def test_roles_hold_only_their_files(tmp_path):
    from cryptography import x509

    info = deploy.coordinator_init(tmp_path / "coord", "10.77.0.1:9092")
    ca = Path(info["ca_cert"])
    cert = x509.load_pem_x509_certificate(
        (tmp_path / "coord" / "superlink" / "server.pem").read_bytes()
    )
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.read_bytes()))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == [
        "10.77.0.1",
        "127.0.0.1",
    ]
    assert Path(info["ca_key"]).stat().st_mode & 0o077 == 0
    with pytest.raises(deploy.DeployError, match="already holds a CA"):
        deploy.coordinator_init(tmp_path / "coord", "10.77.0.1:9092")
    deploy.coordinator_init(tmp_path / "coord", "link.example.org:9092", reissue=True)
    assert ca.read_bytes() == Path(info["ca_cert"]).read_bytes()  # CA kept

    site = _site(tmp_path)
    home = tmp_path / "hospital" / "deploy"
    got = deploy.site_init(home, site, ca)
    keys = home / "keys"
    assert sorted(p.name for p in keys.iterdir()) == [
        "site_mac.key",
        "supernode",
        "supernode.pub",
    ]
    assert all(
        p.stat().st_mode & 0o077 == 0 for p in keys.iterdir() if p.suffix != ".pub"
    )
    assert got["fingerprint"] == deploy.public_key_fingerprint(keys / "supernode.pub")
    assert not any(site.glob("*key*"))  # no key in the site folder

    cmd, env = deploy.site_supernode(home, "10.77.0.1:9092", 1, 3)
    assert cmd[cmd.index("--root-certificates") + 1] == str(home / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(keys / "supernode")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "--insecure" not in cmd
    config = cmd[cmd.index("--node-config") + 1]
    assert f"site-dir={json.dumps(str(site))}" in config and "site-index=1" in config
    assert env["FLWR_HOME"] == str(home / "flwr_home")
    link, _ = deploy.coordinator_superlink(tmp_path / "coord")
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert link[link.index("--database") + 1].endswith("state.db")


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda t, ca, site: deploy.coordinator_init(t / "c2", "10.77.0.1"),
            "--address: expected HOST:PORT",
        ),
        (
            lambda t, ca, site: deploy.site_init(site / "deploy", site, ca),
            "outside the site folder",
        ),
        (lambda t, ca, site: deploy.site_init(t / "h", t, ca), "holds no cohort.csv"),
        (
            lambda t, ca, site: deploy.site_init(
                t / "h", site, t / "coord" / "superlink" / "server.pem"
            ),
            "--ca: .* is not a CA certificate",
        ),
        (
            lambda t, ca, site: deploy.site_init(
                t / "h", site, ca, policy=t / "none.yaml"
            ),
            "--policy: .* does not exist",
        ),
        (
            lambda t, ca, site: deploy.site_supernode(t / "h", "10.77.0.1:9092", 3, 3),
            "--site-index: expected 0..2",
        ),
        (
            lambda t, ca, site: deploy.public_key_fingerprint(ca),
            "--public-key: .* not an OpenSSH public key",
        ),
        (
            lambda t, ca, site: deploy.run_settings_for(
                t / "coord", "fit", deploy.RunSettings()
            ),
            "no hospital is registered",
        ),
    ],
)
def test_bad_input_names_the_option(tmp_path, call, match):
    info = deploy.coordinator_init(tmp_path / "coord", "10.77.0.1:9092")
    site = _site(tmp_path)
    if "site-index" in match:
        deploy.site_init(tmp_path / "h", site, Path(info["ca_cert"]))
    with pytest.raises(deploy.DeployError, match=match):
        call(tmp_path, Path(info["ca_cert"]), site)


def _netns_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    done = subprocess.run(
        ["bash", str(SCRIPT), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PHEMS_NETNS_TAG": f"pt{os.getpid()}"},
    )
    if done.returncode == 77:
        return done.stderr.strip() or "network namespaces are not permitted"
    if done.returncode != 0:
        return f"namespace check failed: {done.stderr.strip()}"
    return None


@pytest.mark.slow
def test_netns_deployment_equals_in_process_engine(tmp_path):
    why = _netns_reason()
    if why:
        pytest.skip(why)
    from phems_clinical.federation import engine
    from phems_clinical.federation.flower import config as fconfig
    from phems_clinical.federation.focei import fed_focei
    from phems_clinical.federation.pk_sites import n_occasions_all, pad_sites
    from phems_clinical.pk.library import load_product

    tag = f"pt{os.getpid() % 100000}"
    work = tmp_path / "work"
    run = subprocess.run(
        ["bash", str(SCRIPT), str(work), "2"],
        capture_output=True,
        text=True,
        timeout=1500,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "PHEMS_NETNS_TAG": tag,
            "SEED": "5",
        },
    )
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True
    ).stdout
    assert tag not in listed, "namespaces left behind"
    assert run.returncode == 0, run.stderr[-3000:]

    # The same data and seed in process.
    model = load_product("advate")
    cohorts = [
        fconfig.read_site_cohort(
            fconfig.site_config(
                {"site-dir": str(work / f"hospital_{k}" / "site"), "site-index": k}
            ),
            model,
        )
        for k in range(3)
    ]
    algorithm = fed_focei(model, n_occasions_all(cohorts))
    key = jax.random.key(5)
    ref = engine.run_federated(
        key, algorithm, pad_sites(cohorts), max_rounds=2, vectorise=False
    )
    result = json.loads(
        (work / "coordinator" / "runs" / "fit" / "result.json").read_text()
    )
    assert result["status"] == "completed" and result["rounds"] == 2
    server, _, history = engine.load_checkpoint(
        work / "coordinator" / "runs" / "fit" / "checkpoint",
        algorithm.init_server(key),
        [],
    )
    for got, want in zip(
        jax.tree.leaves(server), jax.tree.leaves(ref.server), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(
        list(result["estimates"].values()),
        np.asarray(algorithm.result(ref.server)["estimates"]),
    )
    assert [h.participants for h in history] == [h.participants for h in ref.history]

    # Every hospital held a policy: it admitted the signed request and logged
    # each message it sent (the admission and 2 rounds).
    from phems_clinical.federation import governance as gov

    for k in range(3):
        mac = gov.load_site_key(
            work / f"hospital_{k}" / "deploy" / "keys" / "site_mac.key"
        )
        audit = gov.verify_log(work / f"hospital_{k}" / "site" / "audit.jsonl", key=mac)
        assert audit.ok and audit.n_entries == 3
    # Isolation: before it, hospital 0 reached hospital 1's listener; after it,
    # not (while the listener still answered locally and hospital 0 reached the
    # SuperLink during the run).
    reach = json.loads((work / "reachability.json").read_text())
    assert reach["before"]["h0_to_h1"] is True
    assert reach["after"]["h0_to_h1"] is False
    assert reach["after"]["h1_to_itself"] is True
    assert reach["during_run"] == {"h0_to_superlink": True, "h0_to_h1": False}
    if reach["firewall"]:  # the hospitals accept no inbound connection
        assert reach["before"]["coord_to_h1"] is True
        assert reach["after"]["coord_to_h1"] is False
