"""Hypothesis profiles and the verification record.

Profiles (one test body for quick and deep runs), chosen by DELTACHECK_PROFILE:
  ci        fast and deterministic (derandomize), what `nox -s tests` runs
  gpu       ci's examples without shrinking (a failure on a lent GPU is reported as drawn, not minimized:
            shrinking recompiles kernels for every candidate and can take minutes)
  dev       the default: a few more random examples
  thorough  many examples, for `nox -s properties` and the GPU
"""
import glob
import json
import os
import platform

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

from ops.common.utils import interpreting
from properties import interpreter_tf32, tolerances

if interpreting():  # the interpreter's tf32 products rounded as the GPU's tensor cores round them
    interpreter_tf32.install()

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=6, derandomize=True, **_common)
settings.register_profile("gpu", max_examples=6, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_common)
settings.register_profile("dev", max_examples=20, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("DELTACHECK_PROFILE", "dev"))

# pytest-xdist workers share the machine's cores: left alone, each worker's torch takes them all for intra-op
# threads (the float64 references run on the CPU), 16 workers x 16 threads on the lent GPU machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

# `record` is function-scoped on purpose: it appends to one list across all hypothesis examples of a test.


@pytest.fixture
def record():
    """record(name, err, bound, **fields): keep a measured error for the verification report."""
    return tolerances.keep


def _gpu_durations():
    """{(module, test name): seconds} from the GPU runs committed under reports/data/*/ (the longest seen; a test
    of a peer's conformance run and of ours have different names)."""
    import xml.etree.ElementTree as ET

    from benchmarks.gpu_summary import junit_cases
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seen = {}
    for path in glob.glob(os.path.join(root, "reports", "data", "*", "*.junit.xml")):  # the suite, conformance runs
        try:
            cases = list(junit_cases(ET.parse(path).getroot()))
        except (OSError, ET.ParseError):
            continue
        for cls, name, _, _, _, seconds in cases:
            seen[(cls, name)] = max(seen.get((cls, name), 0.0), seconds)
    return seen


_COLLECTED = []  # node ids of this session's tests, in run order (the record's meta: a test never reported is
                 # then visible as not run)


def longest_first(items, seconds, workers):
    """Longest-processing-time-first order for `workers` pytest-xdist workers under `--dist load
    --maxschedchunk 1`, which hands each worker two tests to start and then one more whenever one finishes: the
    tests sorted by their earlier duration (unknown ones as the longest, stable otherwise), with the first
    `workers` pairs each made of one long and one short test, so no worker starts on two of the longest."""
    order = sorted(items, key=lambda it: -seconds(it))
    if workers < 2 or len(order) < 4 * workers:
        return order
    long, short, middle = order[:workers], order[-workers:][::-1], order[workers:-workers]
    return [t for pair in zip(long, short) for t in pair] + middle


def _reported(paths):
    """Node ids of the tests that reported an outcome (passed, failed, error, skipped) in these junit files."""
    import xml.etree.ElementTree as ET

    from benchmarks.gpu_summary import junit_cases, junit_nodeid
    done = set()
    for path in paths:
        for cls, name, outcome, _, _, _ in junit_cases(ET.parse(path).getroot()):
            if name and outcome != "cut_off":
                done.add(junit_nodeid(cls, name))
    return done


def pytest_collection_modifyitems(session, config, items):
    """On a GPU, run the tests that took longest in earlier GPU runs first (longest_first): a time-limited run
    then ends with short tests, not with one long test started last. DELTACHECK_NOT_REPORTED_IN=JUNIT[,JUNIT]
    runs only the tests those runs never reported (cut off by their time limit); the rest are deselected, and
    `python3 -m benchmarks.gpu_summary merge-runs` joins the runs' results."""
    resume = os.environ.get("DELTACHECK_NOT_REPORTED_IN")
    if resume:
        done = _reported([p for p in resume.split(",") if p])
        config.hook.pytest_deselected(items=[it for it in items if it.nodeid in done])
        items[:] = [it for it in items if it.nodeid not in done]
    if torch.cuda.is_available():
        seen = _gpu_durations()
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        items[:] = longest_first(
            items, lambda it: seen.get((it.module.__name__ if it.module else "", it.name), float("inf")), workers)
    _COLLECTED[:] = [it.nodeid for it in items]


def _meta(exitstatus=None, collected=None):
    meta = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
                torch=torch.__version__, profile=os.environ.get("DELTACHECK_PROFILE", "dev"), exitstatus=exitstatus)
    if collected or _COLLECTED:
        meta["collected"] = list(collected or _COLLECTED)
    return meta


def _write_part(exitstatus=None):
    """Under pytest-xdist, a worker's records so far -> PATH.<worker> (after every test, so a worker stopped by a
    time limit keeps what it measured; the controller merges the parts)."""
    path, worker = os.environ.get("DELTACHECK_RECORD"), os.environ.get("PYTEST_XDIST_WORKER")
    if path and worker and tolerances.RECORDS:
        with open(f"{path}.{worker}.tmp", "w") as f:
            json.dump(dict(meta=_meta(exitstatus), records=tolerances.RECORDS), f)
        os.replace(f"{path}.{worker}.tmp", f"{path}.{worker}")


_FAULT_MARKS = ("illegal memory access", "unspecified launch failure", "misaligned address", "illegal instruction",
                "device-side assert")
_FAULTED = []


def _device_fault(exc) -> bool:
    """A CUDA fault (illegal address, launch failure): the process's CUDA context is lost with it."""
    if isinstance(getattr(exc, "exceptions", None), (list, tuple)):  # an exception group (hypothesis, 3.11+)
        return any(_device_fault(e) for e in exc.exceptions)
    return any(m in str(exc) for m in _FAULT_MARKS) or (exc.__cause__ is not None and _device_fault(exc.__cause__))


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and _device_fault(call.excinfo.value):
        _FAULTED.append(item.nodeid)


def pytest_runtest_logfinish(nodeid, location):
    """After a test that faulted the GPU, a pytest-xdist worker exits: every later CUDA call in it would fail
    whatever it runs, so the controller starts a fresh worker and the fault stays with the test that caused it
    (xdist reports that test as the one the worker crashed in)."""
    _write_part()
    if _FAULTED and os.environ.get("PYTEST_XDIST_WORKER"):
        import sys
        sys.stderr.write(f"deltacheck: CUDA fault in {_FAULTED[-1]}; this worker exits so the next tests get a "
                         "fresh CUDA context\n")
        sys.stderr.flush()
        os._exit(70)


def pytest_sessionfinish(session, exitstatus):
    """Write the records to $DELTACHECK_RECORD. Under pytest-xdist each worker writes PATH.<worker> and the
    controller, which finishes last, merges them into PATH."""
    path = os.environ.get("DELTACHECK_RECORD")
    if not path:
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _write_part(int(exitstatus))
        return
    collected = None
    for part in sorted(glob.glob(glob.escape(path) + ".gw*")):
        if part.endswith(".tmp"):  # a write cut off mid-way (the complete previous part is beside it)
            os.remove(part)
            continue
        with open(part) as f:
            doc = json.load(f)
        tolerances.RECORDS.extend(doc["records"])
        collected = collected or doc.get("meta", {}).get("collected")
        os.remove(part)
    if not tolerances.RECORDS:
        return
    with open(path, "w") as f:
        json.dump(dict(meta=_meta(int(exitstatus), collected), records=tolerances.RECORDS), f, indent=1)
