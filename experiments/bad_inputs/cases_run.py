"""Bad Hydra overrides of ``phems run``: each must exit 2 naming
the setting before any hospital is simulated or loaded. Run as subprocesses (the
Hydra app owns the interpreter's exit)."""

from pathlib import Path

from harness import Case


def _run(*overrides: str):
    return lambda t: ["run", *overrides, f"hydra.run.dir={t / 'run'}"]


def _omop(tmp: Path, n: int, garbage: bool = True) -> str:
    folder = tmp / "omop"
    folder.mkdir()
    for i in range(n):
        (folder / f"site{i}.duckdb").write_bytes(b"garbage" * 1000 if garbage else b"")
    return str(folder)


def _case(name: str, names: str, *overrides: str) -> Case:
    return Case("phems run", name, names, argv=_run(*overrides), subprocess=True)


CASES = [
    _case("typo in a key", r"n_sitez", "data.n_sitez=3"),
    _case("wrong type", r"data\.n_sites|n_sites", "data.n_sites=five"),
    _case("unknown experiment", r"experiment/fviiii", "experiment=fviiii"),
    _case("override without =", r"override 'seed'", "seed"),
    _case("seed 10^30", r"seed", "seed=1000000000000000000000000000000"),
    _case("negative seed", r"seed", "seed=-1"),
    _case("one hospital", r"data\.n_sites", "data.n_sites=1"),
    _case("negative patients per site", r"data\.n_per_site", "data.n_per_site=-5"),
    _case("test fraction above 1", r"data\.test_fraction", "data.test_fraction=1.5"),
    _case("unknown held-out hospital", r"data\.holdout_site", "data.holdout_site=x"),
    _case(
        "unknown source kind",
        r"sources\.synthetic\.kind",
        "sources.synthetic.kind=fake",
    ),
    _case(
        "unknown anonymiser",
        r"sources\.anonymised\.method",
        "sources.anonymised.method=kmeans",
    ),
    _case(
        "k larger than the hospitals",
        r"sources\.anonymised\.options\.k",
        "sources.anonymised.options.k=500",
    ),
    _case(
        "unknown source option",
        r"sources\.anonymised\.options.*kk",
        "+sources.anonymised.options.kk=3",
    ),
    _case("unknown engine", r"federation\.engine", "federation.engine=grpc"),
    _case("unknown strategy", r"inference\.strategy", "inference.strategy=newton"),
    _case("rounds 0", r"inference\.options\.rounds", "+inference.options.rounds=0"),
    _case(
        "epsilon 0",
        r"federation\.dp\.epsilon",
        "inference=fedadam",
        "federation.dp.epsilon=0",
    ),
    _case("DP with federated FOCEI", r"federation\.dp", "federation.dp.epsilon=1"),
    _case(
        "delta above 1",
        r"federation\.dp\.delta",
        "inference=fedadam",
        "federation.dp.epsilon=1",
        "federation.dp.delta=2",
    ),
    _case(
        "secure aggregation of the pooled reference",
        r"federation\.secagg",
        "federation=pooled",
        "federation.secagg=true",
    ),
    _case(
        "Flower with an edited population model",
        r"model:.*flower.*library",
        "federation=flower",
        "model.name=edited",
    ),
    _case(
        "min_sites above the sites", r"federation\.min_sites", "federation.min_sites=9"
    ),
    _case("unknown training site", r"federation\.sites", "federation.sites=[x]"),
    _case("no attacks", r"evaluation\.n_attacks", "evaluation.n_attacks=0"),
    _case(
        "sweep with one bad job",
        r"job .*data\.n_per_site",
        "-m",
        "seed=0,1",
        "data.n_per_site=40,5",
    ),
    _case("OMOP folder missing", r"data\.omop", "data.omop=nowhere"),
    Case(
        "phems run",
        "OMOP folder with one site",
        r"data\.omop",
        argv=lambda t: [
            "run",
            f"data.omop={_omop(t, 1)}",
            f"hydra.run.dir={t / 'run'}",
        ],
        subprocess=True,
    ),
    Case(
        "phems run",
        "OMOP databases corrupt",
        r"DuckDB|site0\.duckdb",
        argv=lambda t: [
            "run",
            f"data.omop={_omop(t, 2)}",
            f"hydra.run.dir={t / 'run'}",
        ],
        subprocess=True,
    ),
    Case(
        "phems run",
        "PK demo: unknown method",
        r"method",
        argv=lambda t: [
            "run",
            "--config-name",
            "pk_demo",
            "method=saem",
            f"hydra.run.dir={t / 'run'}",
        ],
        subprocess=True,
    ),
    Case(
        "phems run",
        "PK demo: no patients",
        r"cohort\.n_patients",
        argv=lambda t: [
            "run",
            "--config-name",
            "pk_demo",
            "cohort.n_patients=0",
            f"hydra.run.dir={t / 'run'}",
        ],
        subprocess=True,
    ),
    Case(
        "phems run",
        "PK demo: unknown method option",
        r"method_options.*num_step",
        argv=lambda t: [
            "run",
            "--config-name",
            "pk_demo",
            "method=svi",
            "+method_options.num_step=10",
            f"hydra.run.dir={t / 'run'}",
        ],
        subprocess=True,
    ),
]
