"""Red team: a malicious SecAgg server (Bonawitz et al., ACM CCS 2017, sections 4
and 6; IACR ePrint 2017/281) tries to unmask one hospital's input.

Each attack is written as the server would run it, against the site functions of
:mod:`phems_clinical.federation.secagg`, and is shown to work against the earlier,
honest-but-curious protocol (unsigned key advertisements, no consistency round, any
threshold): that behaviour is reproduced here either by switching off the one check
that now stops the attack (``monkeypatch``) or by ``_old_site_unmask``, a copy of
the earlier ``site_unmask``. Then the same attack runs against the current code and
must fail.
"""

import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from phems_clinical.federation import secagg
from phems_clinical.federation.secagg import (
    AdvertiseKeys,
    ConsistencyRequest,
    SecAggConfig,
    SecAggError,
    SecAggThresholdWarning,
    UnmaskRequest,
    UnmaskShares,
    generate_identity,
    secure_sum,
    server_collect_consistency,
    server_collect_keys,
    server_collect_masked,
    server_route_shares,
    site_advertise_keys,
    site_consistency_check,
    site_masked_input,
    site_share_keys,
    site_unmask,
)
from phems_clinical.federation.secure import default_secagg_config

ROUND = 11
D = 64
K5 = ("a", "b", "c", "d", "x")  # x is the victim of the dropout equivocation
LOW_T = pytest.mark.filterwarnings(
    "ignore::phems_clinical.federation.secagg.SecAggThresholdWarning"
)


def _inputs(ids, seed=0):
    rng = np.random.default_rng(seed)
    return {s: rng.integers(0, 2**16, D, dtype=np.uint64) for s in ids}


def _advertise(ids, cfg, idents, round_id=ROUND):
    trusted = {s: pk for s, (_, pk) in idents.items()}
    adverts, states = {}, {}
    for s in ids:
        adverts[s], states[s] = site_advertise_keys(
            s, cfg, idents[s][0], trusted, round_id=round_id
        )
    return adverts, states


def _until_masked(qs, cfg, idents=None, round_id=ROUND):
    """Honest stages 0-2: (site states at stage 3, roster, masked inputs, server)."""
    ids = sorted(qs)
    idents = idents or {s: generate_identity() for s in ids}
    adverts, states = _advertise(ids, cfg, idents, round_id)
    roster, server = server_collect_keys(
        cfg, adverts, round_id=round_id, n_sites=len(idents)
    )
    shares = {}
    for s in ids:
        shares[s], states[s] = site_share_keys(states[s], roster)
    inboxes, server = server_route_shares(server, shares)
    masked = {}
    for s in ids:
        masked[s], states[s] = site_masked_input(states[s], inboxes[s], qs[s])
    return states, roster, masked, server


def _unmask(victim, y, b, mask_sk, roster, peers, cfg, round_id=ROUND):
    """The server's last step: ``q = y - PRG(b) -+ PRG(s_vp)`` for the victim."""
    m = cfg.ring_bits
    q = np.asarray(y, np.uint64) - secagg._prg(b, D, m)
    for p in peers:
        if p != victim:
            mask = secagg._prg(
                secagg._pair_seed(mask_sk, roster[p].mask_pk, round_id, victim, p), D, m
            )
            q = q - mask if p > victim else q + mask
    return secagg._reduce(q, m)


def _old_site_unmask(state, survivors, dropped):
    """``site_unmask`` as it was (honest-but-curious): no consistency round, no
    signatures; the request need only partition the site's U2 with it a survivor."""
    survivors, dropped = set(survivors), set(dropped)
    if (
        survivors & dropped
        or survivors | dropped != set(state.peers)
        or state.site_id not in survivors
    ):
        raise SecAggError("partition")
    secagg._require(len(survivors), state.cfg.threshold, 3)
    return UnmaskShares(
        {v: state.shares[v][1] for v in sorted(survivors)},
        {v: state.shares[v][0] for v in sorted(dropped)},
    )


# ------------------------------------------------------------ key substitution


def _substitute_keys(adverts, victim, how):
    """The roster the server sends the victim: every peer's X25519 keys replaced by
    keys the server made (it keeps the private halves)."""
    fakes, roster = {}, dict(adverts)
    server_id = Ed25519PrivateKey.generate()
    for p in adverts:
        if p == victim:
            continue
        fakes[p] = (X25519PrivateKey.generate(), X25519PrivateKey.generate())
        mpk, epk = (k.public_key().public_bytes_raw() for k in fakes[p])
        sig = {
            "keep_signature": adverts[p].signature,
            "server_signs": server_id.sign(secagg._advert_message(ROUND, p, mpk, epk)),
        }[how]
        roster[p] = AdvertiseKeys(mpk, epk, sig)
    return roster, fakes


def _key_substitution_attack(qs, cfg, how):
    """Run the attack on victim ``v``; returns its input as the server rebuilds it."""
    ids = sorted(qs)
    idents = {s: generate_identity() for s in ids}
    adverts, states = _advertise(ids, cfg, idents)
    roster, fakes = _substitute_keys(adverts, "v", how)
    boxes, state_v = site_share_keys(states["v"], roster)  # refused now
    # The server opens every share v encrypted to a peer: t = K - 1 of each secret.
    key_shares, seed_shares = [], []
    for p, box in boxes.ciphertexts.items():
        k = secagg._share_key(
            fakes[p][1].private_bytes_raw(), adverts["v"].enc_pk, ROUND, "v", p
        )
        plain = secagg._open(k, secagg._info(b"share", ROUND, "v", p), box)
        n = len(secagg._share_header(ROUND, "v", p))
        key_shares.append(plain[n : n + secagg._SHARE_BYTES])
        seed_shares.append(plain[n + secagg._SHARE_BYTES :])
    mask_sk = secagg._shamir_combine(key_shares, cfg.threshold, "key")
    b = secagg._shamir_combine(seed_shares, cfg.threshold, "b")
    assert (
        X25519PrivateKey.from_private_bytes(mask_sk).public_key().public_bytes_raw()
        == adverts["v"].mask_pk
    )
    # It feeds v well-formed shares from its fake peers and receives y_v.
    point = secagg._share_points(ids)["v"]
    inbox = {}
    for p in fakes:
        junk = secagg._shamir_split(bytes(32), [point], cfg.threshold)[point]
        k = secagg._share_key(
            fakes[p][1].private_bytes_raw(), adverts["v"].enc_pk, ROUND, p, "v"
        )
        inbox[p] = secagg._seal(
            k,
            secagg._info(b"share", ROUND, p, "v"),
            secagg._share_header(ROUND, p, "v") + junk + junk,
        )
    y, _ = site_masked_input(state_v, inbox, qs["v"])
    return _unmask("v", y.y, b, mask_sk, roster, ids, cfg)


@pytest.mark.parametrize("how", ["keep_signature", "server_signs"])
def test_key_substitution(monkeypatch, how):
    """K=4, t=3=K-1. The server swaps every peer's keys in the victim's roster for
    its own. With advertisements unchecked (as before) it decrypts the victim's
    K-1 >= t shares of both secrets and recovers the victim's input exactly; now the
    victim refuses the roster before sharing anything."""
    cfg = SecAggConfig(clip=1.0, bits=16, threshold=3)
    qs = _inputs(("a", "b", "c", "v"))
    with monkeypatch.context() as m:
        m.setattr(secagg, "_verify", lambda *args: True)  # unsigned, as before
        assert np.array_equal(_key_substitution_attack(qs, cfg, how), qs["v"])
    with pytest.raises(
        SecAggError, match="no valid signature by its trusted identity key"
    ):
        _key_substitution_attack(qs, cfg, how)


def test_roster_forgeries_refused():
    """Replaying a peer's genuine advertisement from another round, adding a site
    outside the trusted roster, dropping or swapping the victim's own entry, or
    leaving fewer than t entries: the victim refuses each."""
    cfg = SecAggConfig(clip=1.0, bits=16, threshold=3)
    ids = ("a", "b", "c", "v")
    idents = {s: generate_identity() for s in ids}
    adverts, states = _advertise(ids, cfg, idents)
    old, _ = _advertise(ids, cfg, idents, round_id=ROUND - 1)
    evil_sk, evil_pk = generate_identity()
    trusted_evil = {s: pk for s, (_, pk) in idents.items()} | {"evil": evil_pk}
    evil, _ = site_advertise_keys(
        "evil", SecAggConfig(1.0, 16, 3), evil_sk, trusted_evil, round_id=ROUND
    )
    v = states["v"]
    cases = {
        "replayed from round 10": (dict(adverts, a=old["a"]), "valid signature"),
        "site outside the roster": (dict(adverts, evil=evil), "not in the trusted"),
        "own entry missing": ({s: adverts[s] for s in "abc"}, "own keys"),
        "own entry swapped": (dict(adverts, v=old["v"]), "valid signature"),
        "two entries": ({s: adverts[s] for s in "av"}, "threshold=3"),
        "malformed": (dict(adverts, a=(b"k" * 32,)), "malformed"),
    }
    for roster, match in cases.values():
        with pytest.raises(SecAggError, match=match):
            site_share_keys(v, roster)
    site_share_keys(v, adverts)  # the honest roster is accepted


# ------------------------------------------------------- dropout equivocation


def _equivocate(states, roster, masked, g1, g2, colluders, cfg):
    """The server tells ``g1`` (with x) that x's input arrived (U3 = all) and
    ``g2`` that x dropped (U3' = all but x); colluding sites sign both and hand over
    the shares they hold. Returns x's input as the server rebuilds it, or raises
    SecAggError when an honest site refuses."""
    u3 = tuple(sorted(states))
    u3x = tuple(s for s in u3 if s != "x")
    requests = {1: ConsistencyRequest(u3), 2: ConsistencyRequest(u3x)}
    signed, sigs = {1: {}, 2: {}}, {1: {}, 2: {}}
    for g, group in ((1, g1), (2, g2)):
        for s in (*group, *colluders):
            msg, signed[g][s] = site_consistency_check(states[s], requests[g])
            sigs[g][s] = msg.signature
    b_shares = [states[c].shares["x"][1] for c in colluders]
    key_shares = [states[c].shares["x"][0] for c in colluders]
    for s in g1:
        out, _ = site_unmask(signed[1][s], UnmaskRequest(u3, (), sigs[1]))
        b_shares.append(out.self_mask_shares["x"])
    for s in g2:
        out, _ = site_unmask(signed[2][s], UnmaskRequest(u3x, ("x",), sigs[2]))
        key_shares.append(out.mask_key_shares["x"])
    b = secagg._shamir_combine(b_shares, cfg.threshold, "b of x")
    mask_sk = secagg._shamir_combine(key_shares, cfg.threshold, "key of x")
    return _unmask("x", masked["x"].y, b, mask_sk, roster, u3, cfg)


def _splits(honest):
    """Every way to split the honest sites other than x into the two groups."""
    others = [s for s in honest if s != "x"]
    for r in range(len(others) + 1):
        for g2 in itertools.combinations(others, r):
            yield ("x", *[s for s in others if s not in g2]), g2


@LOW_T
def test_dropout_equivocation_with_threshold_two(monkeypatch):
    """K=5, t=2 (what min_sites=2 used to set). The old protocol: x's masked input
    arrives; the server asks {x, a} to unmask with x among the survivors and {c, d}
    with x dropped; it rebuilds both of x's secrets and x's input, exactly. Even the
    signed consistency round does not stop this at t=2 (two signers suffice), which
    is why t <= K/2 is now refused: by the site, the server, secure_sum and
    default_secagg_config."""
    cfg = SecAggConfig(clip=1.0, bits=16, threshold=2)
    qs = _inputs(K5, seed=1)
    with monkeypatch.context() as m:
        m.setattr(secagg, "_check_threshold", lambda *args: None)
        states, roster, masked, _ = _until_masked(qs, cfg)
        b_shares = [
            _old_site_unmask(states[s], K5, ()).self_mask_shares["x"]
            for s in ("x", "a")
        ]
        key_shares = [
            _old_site_unmask(
                states[s], [u for u in K5 if u != "x"], ("x",)
            ).mask_key_shares["x"]
            for s in ("c", "d")
        ]
        b = secagg._shamir_combine(b_shares, 2, "b")
        mask_sk = secagg._shamir_combine(key_shares, 2, "key")
        assert np.array_equal(
            _unmask("x", masked["x"].y, b, mask_sk, roster, K5, cfg), qs["x"]
        )
        # The consistency round alone: two signatures over each U3 suffice.
        assert np.array_equal(
            _equivocate(states, roster, masked, ("x", "a"), ("c", "d"), (), cfg),
            qs["x"],
        )
    idents = {s: generate_identity() for s in K5}
    with pytest.raises(ValueError, match="^threshold: expected more than half"):
        _advertise(K5, cfg, idents)
    with pytest.raises(ValueError, match="^threshold: expected more than half"):
        server_collect_keys(cfg, {}, n_sites=5)
    with pytest.raises(ValueError, match="^threshold: expected more than half"):
        secure_sum(None, {s: np.zeros(2) for s in K5}, cfg)
    with pytest.raises(ValueError, match="^min_sites"):
        default_secagg_config(5, 2)


@LOW_T
@pytest.mark.parametrize("threshold", [3, 4])
def test_dropout_equivocation_fails_without_colluders(threshold):
    """K=5, t=3 or 4, the server alone: no split of the honest sites gives it t
    shares of both of x's secrets; an honest site refuses first."""
    cfg = SecAggConfig(clip=1.0, bits=16, threshold=threshold)
    qs = _inputs(K5, seed=2)
    states, roster, masked, _ = _until_masked(qs, cfg)
    n = 0
    for g1, g2 in _splits(K5):
        with pytest.raises(SecAggError, match="valid consistency signature|shares"):
            _equivocate(states, roster, masked, g1, g2, (), cfg)
        n += 1
    assert n == 16


@LOW_T
def test_dropout_equivocation_with_a_colluder():
    """One site colluding with the server signs both U3 and hands over its shares.
    At t=3 of K=5 (accepted, with SecAggThresholdWarning) the attack works: the
    documented limit t > (K + colluders) / 2. At t=4 no split works."""
    qs = _inputs(K5, seed=3)
    with pytest.warns(SecAggThresholdWarning, match="colluding with 1 site"):
        secagg.check_config(SecAggConfig(1.0, 16, 3), 5)
    cfg = SecAggConfig(clip=1.0, bits=16, threshold=3)
    states, roster, masked, _ = _until_masked(qs, cfg)
    assert np.array_equal(
        _equivocate(states, roster, masked, ("x", "a"), ("b", "d"), ("c",), cfg),
        qs["x"],
    )
    cfg = SecAggConfig(clip=1.0, bits=16, threshold=4)
    states, roster, masked, _ = _until_masked(qs, cfg)
    honest = [s for s in K5 if s != "c"]
    for g1, g2 in _splits(honest):
        with pytest.raises(SecAggError, match="valid consistency signature|shares"):
            _equivocate(states, roster, masked, g1, g2, ("c",), cfg)


# --------------------------------------------- forged and replayed signatures


def _to_unmasking(qs, cfg, idents, round_id, drop=("x",)):
    """Honest stages 0-3 with ``drop`` sending no masked input."""
    ids = sorted(qs)
    adverts, states = _advertise(ids, cfg, idents, round_id)
    roster, server = server_collect_keys(cfg, adverts, round_id=round_id)
    shares = {}
    for s in ids:
        shares[s], states[s] = site_share_keys(states[s], roster)
    inboxes, server = server_route_shares(server, shares)
    masked = {}
    for s in ids:
        if s not in drop:
            masked[s], states[s] = site_masked_input(states[s], inboxes[s], qs[s])
    check, server = server_collect_masked(server, masked)
    signed = {}
    for s in check.survivors:
        signed[s], states[s] = site_consistency_check(states[s], check)
    request, server = server_collect_consistency(server, signed)
    return states, request


def test_forged_and_replayed_consistency_signatures():
    """K=5, t=4, x dropped before masking. The server wants a's masking-key share
    of x and b shares of the others with fewer than t genuine signatures over this
    round's U3. Before, no signature was asked for at all; now every forgery is
    refused, and the genuine request still answered."""
    cfg = SecAggConfig(clip=1.0, bits=16, threshold=4)
    qs = _inputs(K5, seed=4)
    idents = {s: generate_identity() for s in K5}
    prev_states, prev = _to_unmasking(qs, cfg, idents, ROUND - 1)
    states, request = _to_unmasking(qs, cfg, idents, ROUND)
    u3, sigs = request.survivors, request.signatures
    assert u3 == ("a", "b", "c", "d") and request.dropped == ("x",)
    assert _old_site_unmask(states["a"], u3, ("x",)).mask_key_shares["x"]
    server_key = Ed25519PrivateKey.generate()
    x_sig = Ed25519PrivateKey.from_private_bytes(idents["x"][0]).sign(
        secagg._consistency_message(ROUND, u3)
    )  # x's key, had it signed
    three = {s: sigs[s] for s in "abc"}
    forged = {
        "none": {},
        "three genuine": three,
        "random bytes": three | {"d": bytes(64)},
        "server's own key": three
        | {"d": server_key.sign(secagg._consistency_message(ROUND, u3))},
        "a's signature as d's": three | {"d": sigs["a"]},
        "replayed from round 10": prev.signatures,
        "d's replayed": three | {"d": prev.signatures["d"]},
        "a non-member's": three | {"x": x_sig},
        "outside the roster": three | {"evil": sigs["d"]},
        "wrong length": three | {"d": sigs["d"][:63]},
    }
    for bad in forged.values():
        with pytest.raises(SecAggError, match="valid consistency signature"):
            site_unmask(states["a"], UnmaskRequest(u3, ("x",), bad))
    out, _ = site_unmask(states["a"], request)
    assert set(out.mask_key_shares) == {"x"}
    assert prev_states["a"].u3 == u3


def test_unmask_request_must_match_the_signed_u3():
    """A request with genuine signatures but another U3 (x moved into the
    survivors, or a survivor moved out) or a different dropped list is refused."""
    cfg = SecAggConfig(clip=1.0, bits=16, threshold=4)
    qs = _inputs(K5, seed=5)
    idents = {s: generate_identity() for s in K5}
    states, request = _to_unmasking(qs, cfg, idents, ROUND)
    sigs = request.signatures
    for bad in (
        UnmaskRequest(K5, (), sigs),
        UnmaskRequest(("a", "b", "c"), ("d", "x"), sigs),
        UnmaskRequest(request.survivors, (), sigs),
        UnmaskRequest(request.survivors, ("x",), list(sigs.values())),
    ):
        with pytest.raises(SecAggError, match="unmask request"):
            site_unmask(states["a"], bad)


def test_second_unmask_request_refused():
    """After answering, a site refuses any further request in the round, e.g. one
    that would move x into the survivors (this guard existed before; kept)."""
    cfg = SecAggConfig(clip=1.0, bits=16, threshold=4)
    qs = _inputs(K5, seed=6)
    idents = {s: generate_identity() for s in K5}
    states, request = _to_unmasking(qs, cfg, idents, ROUND)
    _, after = site_unmask(states["a"], request)
    for again in (request, UnmaskRequest(K5, (), request.signatures)):
        with pytest.raises(SecAggError, match="stage"):
            site_unmask(after, again)


def test_consistency_check_refusals():
    """A site signs only a U3 of at least t sites that holds it and lies within
    its U2, and only once per round."""
    cfg = SecAggConfig(clip=1.0, bits=16, threshold=4)
    qs = _inputs(K5, seed=7)
    states, _, _, _ = _until_masked(qs, cfg)
    a = states["a"]
    for bad, match in (
        (("a", "b", "c"), "threshold=4"),
        (("b", "c", "d", "x"), "among the survivors"),
        (("a", "b", "c", "d", "zz"), "within U2"),
        (("b", "a", "c", "d"), "sorted"),
    ):
        with pytest.raises(SecAggError, match=match):
            site_consistency_check(a, ConsistencyRequest(bad))
    _, signed = site_consistency_check(a, ConsistencyRequest(K5))
    with pytest.raises(SecAggError, match="stage"):
        site_consistency_check(signed, ConsistencyRequest(K5))


def test_server_cannot_shrink_k():
    """The server claims a federation of 3 (t=2 would then be a majority); the
    site counts K in its own trusted roster (5) and refuses t=2."""
    cfg = SecAggConfig(clip=1.0, bits=16, threshold=2)
    idents = {s: generate_identity() for s in K5}
    secagg.check_config(cfg, 3)
    trusted = {s: pk for s, (_, pk) in idents.items()}
    with pytest.raises(ValueError, match="^threshold: .*5 sites"):
        site_advertise_keys("a", cfg, idents["a"][0], trusted)
