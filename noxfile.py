"""Sessions: tests (CI: CPU, Triton interpreter, `ci` profile), properties (`thorough`), gpu (whole suite on CUDA),
conformance (the conformance properties against named implementations, e.g. `nox -s conformance -- fla`), bench,
report, lint.

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


@nox.session(venv_backend="none")
def conformance(session):
    """The conformance properties (properties/test_conformance.py) against the implementations named after `--`
    (form names of benchmarks/registry.py, or `ours`, `fla`, `all`; default ours), with this interpreter's torch
    (and fla, for `fla`: `pip install -e .[peers]`), recording to reports/data/conformance-<names>.json and
    .junit.xml for the report's conformance table. On a machine with no GPU the run is the interpreter's: peers
    that cannot run there are reported unsupported."""
    impls = ",".join(session.posargs) or "ours"
    tag = impls.replace(",", "+")
    os.makedirs("reports/data", exist_ok=True)
    env = {"DELTACHECK_IMPLS": impls, "DELTACHECK_PROFILE": os.environ.get("DELTACHECK_PROFILE", "ci"),
           "DELTACHECK_RECORD": f"reports/data/conformance-{tag}.json"}
    try:
        import torch
        if not torch.cuda.is_available():
            env.update(CPU_ENV)
    except ImportError:
        session.error("conformance uses this interpreter's torch: install torch (and fla-core for `fla`) first")
    session.run("python3", "-m", "pytest", "properties/test_conformance.py", "-q", "-p", "no:cacheprovider",
                f"--junitxml=reports/data/conformance-{tag}.junit.xml", env=env, success_codes=[0, 1])


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def report(session):
    """Main job: the property suite on this machine's CPU (Triton interpreter, `ci` profile), recording every
    measured error, a tiny CPU accuracy sweep, then the HTML report (reports/site/index.html) with the committed
    GPU data beside it. Failing properties do not stop the report: its verification matrix shows them."""
    cpu_install(session, *REPORT_DEPS)
    os.makedirs("reports/data", exist_ok=True)
    record, junit = "reports/data/verification-cpu.json", "reports/data/verification-cpu.junit.xml"
    for stale in (record, junit):
        if os.path.exists(stale):
            os.remove(stale)
    session.run("python", "-m", "pytest", "properties", "-q", "-p", "no:cacheprovider",
                "--continue-on-collection-errors", f"--junitxml={junit}", *session.posargs,
                env=dict(CPU_ENV, DELTACHECK_PROFILE="ci", DELTACHECK_RECORD=record), success_codes=[0, 1])
    session.run("python", "-m", "benchmarks.accuracy", "--out", "reports/data", "--file", "accuracy-cpu.json",
                env=CPU_ENV, success_codes=[0, 1])
    session.run("python", "-m", "reports.build")


@nox.session(venv_backend="none")
def bench(session):
    """On a GPU machine, with its own CUDA torch and triton (and fla when installed): the speed sweep, decode and
    the accuracy sweep inside one time budget (default 420 s; `-- --budget-s N` and any harness option), writing
    reports/data/<gpu>/ (bench.json/.csv, accuracy.json/.csv, plots/)."""
    session.run("python3", "-m", "benchmarks.harness", "--accuracy", "--plots", *session.posargs)
