"""Sessions: tests (CI: CPU, Triton interpreter, `ci` profile), properties (`thorough`), gpu (whole suite on CUDA),
bench, report, lint.

CPU sessions install the CPU build of torch 2.13.0 that this machine carries (never a multi-GB CUDA build); the
gpu and bench sessions use the interpreter's own CUDA torch and triton (venv_backend='none')."""
import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

CPU_TORCH = "torch==2.13.0"
TRITON = "triton==3.6.0"
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4", "numpy"]
REPORT_DEPS = ["matplotlib", "jinja2"]
CPU_ENV = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}


def cpu_install(session, *extra):
    session.install(CPU_TORCH, TRITON, *TEST_DEPS, *extra)


@nox.session
def tests(session):
    """What CI runs: every property on CPU in the Triton interpreter with the fast, deterministic `ci` profile."""
    cpu_install(session)
    session.run("python", "-m", "pytest", "properties", "-q", "-p", "no:cacheprovider", *session.posargs,
                env=dict(CPU_ENV, DELTACHECK_PROFILE="ci"))


@nox.session
def properties(session):
    """The property suite with the `thorough` hypothesis profile (many examples) on CPU."""
    cpu_install(session)
    session.run("python", "-m", "pytest", "properties", "-q", *session.posargs,
                env=dict(CPU_ENV, DELTACHECK_PROFILE="thorough"))


@nox.session(venv_backend="none")
def gpu(session):
    """The whole property suite on CUDA (bf16 included) with the interpreter's CUDA torch and triton."""
    os.makedirs("reports/data", exist_ok=True)
    session.run("python3", "-m", "pytest", "properties", "-q", *session.posargs,
                env={"DELTACHECK_PROFILE": os.environ.get("DELTACHECK_PROFILE", "dev"),
                     "DELTACHECK_RECORD": "reports/data/verification-gpu.json"})


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", ".")
