"""Exported programs in the user cache (phems_clinical.pk.export_cache): a program
loaded in a later process (here: a new wrapper, which cannot see the first one's
memory) gives bit-identical results to the traced one; damaged, mismatched or
foreign cache files are ignored and rebuilt, never run."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phems_clinical.pk import export_cache as ec
from phems_clinical.pk._cache import per_model
from phems_clinical.pk.library import load_product


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PHEMS_CACHE_DIR", str(tmp_path))
    return tmp_path / "programs"


def _build(model):
    """A small program of the model: a key, an array, a Python float."""
    theta = jnp.asarray(model.theta_values)

    def f(key, x, scale):
        noise = jax.random.normal(key, x.shape)
        return {"y": jnp.exp(-theta[0] * x) * scale + noise, "n": jnp.sum(x > 1.0)}

    return jax.jit(f)


def _args():
    return jax.random.key(3), jnp.linspace(0.0, 3.0, 7), 2.5


def _fresh(model, tag=("toy",)):
    """A new wrapper, as a new process would have (nothing in memory)."""
    return ec.persistent(_build(model), model, tag)


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
        for x, y in zip(la, lb, strict=True)
    )


def _source(fn):
    return list(fn.sources.values())


def test_reloaded_program_is_bit_identical(cache):
    m = load_product("advate")
    first = _fresh(m)
    out1 = first(*_args())
    assert _source(first) == ["exported"]
    assert len(list(cache.glob("toy-*.jaxexp"))) == 1
    again = _fresh(m)
    out2 = again(*_args())
    assert _source(again) == ["loaded"]
    assert _same(out1, out2)
    assert _same(out1, _build(m)(*_args()))  # and the plain jitted function
    # another argument shape is another program
    again(jax.random.key(3), jnp.ones(4), 2.5)
    assert _source(again) == ["loaded", "exported"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_file_is_rebuilt(cache, damage):
    m = load_product("advate")
    expected = _fresh(m)(*_args())
    (path,) = cache.glob("toy-*.jaxexp")
    blob = path.read_bytes()
    path.write_bytes(
        {
            "truncate": blob[: len(blob) // 2],
            "flip": blob[:-100] + bytes([blob[-100] ^ 0xFF]) + blob[-99:],
            "empty": b"",
            "garbage": b"\x00" * 64,
        }[damage]
    )
    fn = _fresh(m)
    assert _same(fn(*_args()), expected)
    assert _source(fn) == ["exported"]
    assert not list(cache.glob(".*tmp"))  # no temporary file left
    third = _fresh(m)  # the rewritten file is whole: it loads
    assert _same(third(*_args()), expected)
    assert _source(third) == ["loaded"]


def test_program_of_another_model_is_not_used(cache):
    a = load_product("advate")
    thetas = list(a.thetas)
    thetas[0] = dataclasses.replace(thetas[0], value=thetas[0].value * 2.0)
    b = dataclasses.replace(a, thetas=tuple(thetas))
    assert ec.model_digest(a) != ec.model_digest(b)
    assert ec.model_digest(a) == ec.model_digest(load_product("advate"))
    out_a = _fresh(a)(*_args())
    (path_a,) = cache.glob("toy-*.jaxexp")
    # put model a's program under the file name of model b's key
    fn_b = _fresh(b)
    leaves, tree = jax.tree.flatten(_args())
    key_b = ec._key((fn_b.tag, *fn_b.parts), leaves, tree)
    path_b = cache / f"toy-{key_b[:40]}.jaxexp"
    path_b.write_bytes(path_a.read_bytes())
    out_b = fn_b(*_args())
    assert _source(fn_b) == ["exported"]
    assert _same(out_b, _build(b)(*_args()))
    assert not np.array_equal(out_a["y"], out_b["y"])


def test_tag_is_part_of_the_key(cache):
    m = load_product("advate")
    _fresh(m, ("toy", 1))(*_args())
    fn = _fresh(m, ("toy", 2))
    fn(*_args())
    assert _source(fn) == ["exported"]
    assert len(list(cache.glob("toy-*.jaxexp"))) == 2


def test_cache_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PHEMS_CACHE_DIR", "off")
    monkeypatch.chdir(tmp_path)
    m = load_product("advate")
    fn = _fresh(m)
    assert _same(fn(*_args()), _build(m)(*_args()))
    assert ec.program_folder() is None
    assert list(tmp_path.iterdir()) == []


def test_inside_a_transformation_it_is_inlined(cache):
    m = load_product("advate")
    fn = _fresh(m)
    xs = jnp.stack([jnp.linspace(0.0, 3.0, 7)] * 2)
    out = jax.vmap(lambda x: fn(jax.random.key(3), x, 2.5))(xs)
    assert fn.sources == {}  # nothing exported from a traced call
    assert _same(jax.tree.map(lambda v: v[0], out), _build(m)(*_args()))


def test_fit_map_reloaded_in_a_new_model_object(cache):
    """The dosing path's MAP program: a second model object (as in a new
    process) loads it and gives the same mode and covariance, bit for bit."""
    from phems_clinical.data.cohort import stack_subjects
    from phems_clinical.pk.forecast import _compiled_map, fit_map
    from phems_clinical.pk.model import initial_params

    row = dict(
        dose_time=[0.0],
        dose_amt=[1000.0],
        dose_dur=[0.17],
        dose_occ=[0],
        obs_time=[4.0, 24.0],
        obs_dv=[40.2, 10.1],
        obs_blq=[False, False],
        obs_lloq=[0.0, 0.0],
        obs_occ=[0, 0],
        covariates=[25.0, 8.0],
    )
    subject = jax.tree.map(lambda x: x[0], stack_subjects([row]))
    m1, m2 = load_product("advate"), load_product("advate")
    r1 = fit_map(m1, initial_params(m1), subject)
    r2 = fit_map(m2, initial_params(m2), subject)
    assert _source(_compiled_map(m1, 1, False)) == ["exported"]
    assert _source(_compiled_map(m2, 1, False)) == ["loaded"]
    assert _same(r1, r2)
    assert type(r2).__name__ == "MAPResult"
    assert float(r2.grad_norm) < 1e-6


def test_per_model_without_persist_is_unchanged(cache):
    m = load_product("advate")
    fn = per_model(m, ("toy-plain",), lambda: _build(m))
    assert not isinstance(fn, ec.Persistent)
    fn(*_args())
    assert not cache.exists()


def test_dosing_assessment_reloaded_is_bit_identical(cache):
    """The whole MAP assessment (fit, draws, prior predictive, forecasts,
    regimens): with every program dropped from memory, as in a new process, it
    loads each one from the cache and gives the same result, bit for bit."""
    from phems_clinical.dosing.workflow import assess

    root = Path(__file__).resolve().parents[2]
    request = json.loads(
        (root / "data_schemas" / "examples" / "dosing_request.minimal.json").read_text()
    )
    # programs an earlier test of this process holds in memory were written to
    # another cache folder: start as a new process would, from this one
    ec.forget_programs()
    first = assess(request, seed=0).result
    written = {p.name for p in cache.glob("*.jaxexp")}
    ec.forget_programs()
    used = {}
    second = assess(request, seed=0).result
    for fn in ec._INSTANCES:
        for how in fn.sources.values():
            used.setdefault(fn.tag, set()).add(how)
    assert {"map", "laplace_draws", "prior_predictive", "dosing"} <= set(used)
    assert all(how == {"loaded"} for how in used.values()), used
    assert {p.name for p in cache.glob("*.jaxexp")} == written
    first.pop("assessed", None)
    second.pop("assessed", None)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"PHEMS_CACHE_DIR": "off"}, None),
        ({"PHEMS_CACHE_DIR": "OFF"}, None),
        ({"PHEMS_CACHE_DIR": "/x/y"}, Path("/x/y")),
        ({"XDG_CACHE_HOME": "/xdg"}, Path("/xdg/phems_clinical/jax")),
        ({"XDG_CACHE_HOME": "relative"}, Path.home() / ".cache/phems_clinical/jax"),
        ({}, Path.home() / ".cache/phems_clinical/jax"),
    ],
)
def test_cache_dir(monkeypatch, env, expected):
    from phems_clinical.runtime import cache_dir

    monkeypatch.delenv("PHEMS_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cache_dir() == expected
    programs = ec.program_folder()
    assert programs == (None if expected is None else expected / "programs")
